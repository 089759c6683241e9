//! Comparisons of minimal-update methods: the synthetic tasks with a known ideal update, the method
//! runners under equal budgets, the metrics (unwanted rate, `KL(p*‖p_new)`, KL to the base model on
//! clean prompts, held-out perplexity, wall time, peak memory) and the reports (markdown table,
//! JSON, SVG/PNG plot) that `amend compare` writes.
//!
//! Errors are the one enum [`Error`], which wraps the errors of the other crates as sources.
#![doc(test(attr(deny(warnings))))]

pub mod annotate;
pub mod base;
pub mod compare;
mod detector;
mod error;
pub mod frontier;
pub mod memory;
pub mod methods;
pub mod metrics;
pub mod pairs;
pub mod plot;
pub mod progress;
pub mod report;
pub mod synthetic;
pub mod task;
pub mod user_data;

pub use detector::UnwantedWords;
pub use error::{Error, Result};
pub use task::{AnnotatedResponse, Split, SuppressionTask};
