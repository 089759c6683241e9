//! `amend`: minimal targeted updates of language models.
//!
//! This facade re-exports the workspace crates under short names and hosts the `amend` command
//! line tool. See the README for the quick start.
//!
//! | module | crate | what it holds |
//! |---|---|---|
//! | [`kernels`] | `amend-kernels` | fused token-level loss + gradient kernels (pure Rust) |
//! | [`losses`] | `amend-losses` | TNT, unlikelihood, CP, NEAT/RRHF and the preference baselines on tch |
//! | [`models`] | `amend-models` | GPT-2 and Llama-family models from Hugging Face checkpoints |
//! | [`edit`] | `amend-edit` | ProFS subspace projection and fine-tuning edits |
//! | [`eval`] | `amend-eval` | tasks, method runners, metrics and reports |
#![doc(test(attr(deny(warnings))))]

pub use amend_edit as edit;
pub use amend_eval as eval;
pub use amend_kernels as kernels;
pub use amend_losses as losses;
pub use amend_models as models;

pub mod runtime;

/// The README's Rust code, compiled and run as a doc test so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The most used types, for `use amend::prelude::*`.
pub mod prelude {
    pub use amend_kernels::{Reduction, SumCount};
    pub use amend_losses::{LossOutput, LossPart, Metrics};
}
