//! Causal language models over libtorch: GPT-2 and the Llama family, loaded from local Hugging Face
//! checkpoints (`config.json`, safetensors, `tokenizer.json`), with generation, scoring, hidden
//! states and the training utilities the rest of `amend` uses.
//!
//! Nothing is downloaded: models are read from local directories, and the tiny-model recipe builds
//! a small GPT-2-architecture model from text the project generates itself.
//!
//! Errors are the one enum [`Error`]; every variant that concerns a file names it, and tch errors
//! are kept as sources ([`Error::Tch`]).
#![doc(test(attr(deny(warnings))))]

mod error;

pub use error::{Error, Result};
