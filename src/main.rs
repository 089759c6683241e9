//! The `amend` command line tool.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;
mod interrupt;

/// amend: minimal targeted updates of language models.
///
/// Remove unwanted behaviour from a language model while changing everything else as little as
/// possible, and compare the methods that do it side by side.
#[derive(Debug, Parser)]
#[command(name = "amend", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Info(cli::info::InfoArgs),
    Score(cli::score::ScoreArgs),
    Generate(cli::generate::GenerateArgs),
    Compare(cli::compare::CompareArgs),
    Edit(cli::edit::EditArgs),
    Loss(cli::loss::LossArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::parse().command;
    interrupt::install();
    match command {
        Command::Info(args) => cli::info::run(&args),
        Command::Score(args) => cli::score::run(&args),
        Command::Generate(args) => cli::generate::run(&args),
        Command::Compare(args) => cli::compare::run(&args),
        Command::Edit(args) => cli::edit::run(&args),
        Command::Loss(args) => cli::loss::run(&args),
    }
}
