//! Subcommands of the `amend` binary. Each subcommand lives in its own file and only parses its
//! arguments and calls into the library crates.

pub mod compare;
pub mod edit;
pub mod generate;
pub mod info;
pub mod loss;
pub mod score;
