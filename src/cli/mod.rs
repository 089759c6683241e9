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

/// How the commands that read a model directory load it (`score`, `generate`, `edit`,
/// `compare --model`): one definition of the flags and of the [`LoadOptions`] they give.
///
/// [`LoadOptions`]: amend::models::LoadOptions
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoadArgs {
    /// Load configs with unknown config.json fields (with a warning) instead of failing.
    #[arg(long)]
    pub allow_unknown_config: bool,
    /// Load a model whose weights hold NaN or ±inf (refused by default, naming the file and the
    /// tensor); the outputs will be NaN or garbage.
    #[arg(long)]
    pub allow_non_finite_weights: bool,
}

impl LoadArgs {
    /// The load options these flags ask for, in `kind`.
    pub fn options(&self, kind: tch::Kind) -> amend::models::LoadOptions {
        use amend::models::{NonFiniteWeights, UnknownFields};
        amend::models::LoadOptions {
            kind,
            unknown_config_fields: if self.allow_unknown_config {
                UnknownFields::Warn
            } else {
                UnknownFields::Reject
            },
            non_finite: if self.allow_non_finite_weights {
                NonFiniteWeights::Propagate
            } else {
                NonFiniteWeights::Error
            },
            ..amend::models::LoadOptions::default()
        }
    }
}

/// `--threads` of the commands whose default is libtorch's own choice (`compare` runs on one
/// thread unless told otherwise and has its own flag).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ThreadsArgs {
    /// libtorch intra-op threads (also the fused kernels' threads), 1 to 4 per logical CPU
    /// (default: libtorch's choice).
    #[arg(long, value_name = "N", value_parser = threads_arg)]
    pub threads: Option<i32>,
}

impl ThreadsArgs {
    /// Sets libtorch's thread count when one was given (already checked by the parser).
    pub fn apply(&self) {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
    }
}
