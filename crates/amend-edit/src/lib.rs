//! Model editing: subspace projection (ProFS / DeTox) and pure fine-tuning edits (FT-L, FT-M), with
//! the standard editing metrics (efficacy, paraphrase generalisation, locality, fluency, edit score).
//!
//! Edits write a new Hugging Face directory atomically and never touch the input checkpoint.
//! Errors are the one enum [`Error`], which wraps the model and loss errors as sources.
#![doc(test(attr(deny(warnings))))]

mod error;

pub use error::{Error, Result};
