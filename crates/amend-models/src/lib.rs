//! Causal language models over libtorch: GPT-2 and the Llama family, loaded from local Hugging
//! Face checkpoints (`config.json`, safetensors, `tokenizer.json`), with generation, scoring,
//! hidden states and the training utilities the rest of `amend` uses.
//!
//! Nothing is downloaded: models are read from local directories, and the tiny-model recipe builds
//! a small GPT-2-architecture model from text the project generates itself.
//!
//! | item | what it is |
//! |---|---|
//! | [`CausalLm`] | the trait losses, editing and comparisons use (forward, hidden states, LM head, parameters, tokenizer, device/dtype, train/eval, deep copy) |
//! | [`Gpt2`], [`Llama`], [`Model`], [`load`] | the adapters and the loader that picks one from `config.json` |
//! | [`config`] | typed `config.json` (field policy documented there) |
//! | [`generate`], [`GenerationConfig`] | greedy / sampled generation with a KV cache |
//! | [`score_texts`], [`score_continuations`] | per-token log-probabilities and perplexity |
//! | [`train`] | AdamW with weight-decay groups, schedules, clipping, accumulation, checkpoints, metrics log |
//! | [`machine`] | thread-count bounds and the model-size check against this machine's memory |
//! | [`output`] | output-path checks against the inputs, staged atomic writes, cleanup on interruption |
//! | [`recipe`] | the tiny-model recipe (BPE tokenizer + GPT-2 trained from scratch), synthetic corpus |
//!
//! Errors are the one enum [`Error`]; every variant that concerns a file names it, and tch errors
//! are kept as sources ([`Error::Tch`]).
//!
//! See `docs/models.md` for a usage guide.
#![doc(test(attr(deny(warnings))))]

mod auto;
mod checkpoint;
pub mod config;
mod core;
mod error;
pub mod generation;
mod gpt2;
mod layers;
mod llama;
pub mod machine;
mod model;
pub mod output;
mod params;
pub mod recipe;
pub mod scoring;
mod source;
pub mod tokenizer;
pub mod train;

pub use auto::{Model, load};
pub use checkpoint::{WEIGHTS_FILE, WEIGHTS_INDEX_FILE, read_safetensors};
pub use config::{Gpt2Config, LlamaConfig, LlamaFamily, ModelConfig, RopeScaling, UnknownFields};
pub use core::AUX_FILES;
pub use error::{Error, Result};
pub use generation::{FinishReason, Generation, GenerationConfig, generate, generate_ids};
pub use gpt2::Gpt2;
pub use layers::KvCache;
pub use llama::Llama;
pub use model::{
    CausalLm, ForwardOptions, ForwardOutput, LayerWeight, LoadOptions, LogitsMode, MlpWeight,
    NonFiniteWeights, SaveOptions, WeightLayout, kind_name, parse_kind,
};
pub use params::{Parameter, Params};
pub use scoring::{
    ScoreOptions, TokenScores, context_length, corpus_perplexity, score_continuations, score_ids,
    score_texts,
};
pub use tokenizer::Tokenizer;
