//! Subcommands of the `amend` binary. Each subcommand lives in its own file and only parses its
//! arguments and calls into the library crates.

pub mod compare;
pub mod edit;
pub mod generate;
pub mod info;
pub mod loss;
pub mod score;

/// `--threads N` of every command: 1 to 4 per logical CPU of this machine, checked by clap
/// before any work (see [`amend::models::machine::check_threads`]).
pub(crate) fn threads_arg(s: &str) -> Result<i32, String> {
    let n: i64 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    amend::models::machine::check_threads(n).map_err(|e| e.to_string())
}
