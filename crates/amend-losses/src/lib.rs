//! Losses for minimal targeted updates of language models, on tch (libtorch).
//!
//! `amend-losses` holds the training objectives that remove unwanted behaviour from a model while
//! changing everything else as little as possible: Targeted Negative Training (TNFF, TNRR, TNRF,
//! TNFLL, TNRLL) and its baselines, unlikelihood training, contrastive perplexity, ranking with
//! negative prompts (NEAT, on RRHF), and the preference and unlearning baselines people compare
//! against (DPO family, SimPO, ORPO, KTO, NPO, SimNPO, conditional NLL).
//!
//! # Conventions
//!
//! * Every loss is a free function over `&Tensor` plus a `*Config` struct (serde, `Default`,
//!   TRL-compatible field names) and returns [`Result`]`<`[`LossOutput`]`>`.
//! * Errors are the one enum [`Error`]; tch errors are wrapped as sources
//!   ([`Error::Tch`]), never stringified. Library code calls tch's fallible `f_*` methods only and
//!   does not panic on user input.
//! * [`Reduction`] decides the shape of [`LossOutput::loss`]; independently of it, every output
//!   carries `(sum, count)` parts for exact normalisation over gradient accumulation and
//!   data-parallel ranks (see [`LossOutput`]).
#![doc(test(attr(deny(warnings))))]

pub mod bridge;
mod error;
mod output;

pub use amend_kernels::{Reduction, SumCount};
pub use error::{Error, Result};
pub use output::{LossOutput, LossPart, Metrics};
