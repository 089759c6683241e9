//! Model editing: subspace projection (ProFS / DeTox) and pure fine-tuning edits (FT-L, FT-M,
//! with the augmentation of Gangadhar & Stratos), with the standard editing metrics (efficacy,
//! paraphrase generalisation, locality, portability, fluency, edit score) in both protocol
//! families.
//!
//! | module | what |
//! |---|---|
//! | [`profs`] | ProFS: pooled embeddings, centred SVD basis, low-rank projection of the MLP value weights |
//! | [`ft`] | FT-L, FT-M, conditional likelihood with augmentation; single / sequential / batched edits |
//! | [`metrics`] | efficacy, paraphrase, locality, portability, fluency, edit score; `memit-prob`, `memit-tokacc`, `easyedit-tokacc` |
//! | [`tasks`] | the synthetic fact-edit task (seeded fact base, tiny GPT-2, counterfactual edits) |
//! | [`manifest`] | the `amend_edit.json` manifest and the atomic write of edited directories |
//!
//! Edits write a new Hugging Face directory atomically and never touch the input checkpoint.
//! Errors are the one enum [`Error`], which wraps the model and loss errors as sources.
//! The user guide is `docs/editing.md`; the JSONL schemas are in `docs/editing-data.md`.
#![doc(test(attr(deny(warnings))))]

mod error;
pub mod ft;
pub mod io;
pub mod manifest;
pub mod metrics;
pub mod profs;
pub mod report;
mod request;
pub mod tasks;
mod util;

pub use error::{Error, Result};
pub use report::{DeliberateDifference, EditWarning};
pub use request::{EditRequest, QaPair, validate_requests};
