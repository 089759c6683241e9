//! [`SuppressionTask`]: the prompts, the detector of unwanted outputs and the given data of one
//! comparison, whether it comes from the synthetic generator ([`crate::synthetic`]) or from a
//! user's JSONL file ([`crate::user_data`]).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::detector::UnwantedWords;

/// Which part of the data an item belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Used to build the methods' training data.
    #[default]
    Train,
    /// Held out: used only by the metrics.
    Eval,
}

/// A response given with the task (user data), with its unwanted spans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnotatedResponse {
    /// The prompt.
    pub prompt: String,
    /// The response text (the continuation of the prompt, scored without special tokens).
    pub response: String,
    /// Byte ranges of unwanted content in `response` (empty: a clean response).
    pub unwanted_spans: Vec<Range<usize>>,
    /// Train or held out.
    pub split: Split,
}

impl AnnotatedResponse {
    /// Whether the response contains unwanted content.
    pub fn is_unwanted(&self) -> bool {
        !self.unwanted_spans.is_empty()
    }
}

/// Everything a comparison needs besides the base model.
///
/// * `train_prompts`: prompts whose samples from `p°` (annotated by the detector) are the
///   methods' training data, together with the `Train` items of `responses`.
/// * `eval_prompts`: held-out prompts on which the unwanted rate and `KL(p*‖p_new)` are
///   estimated (both need the detector).
/// * `control_prompts`: held-out prompts whose responses are clean, so that the ideal update
///   leaves them unchanged; `KL(p°‖p_new)` on them measures collateral drift.
/// * `negative_prefix`: text put before a prompt to elicit unwanted responses (NEAT's negative
///   prompt); its samples are scored without it.
/// * `heldout_texts`: clean held-out `(prompt, response)` pairs for the held-out perplexity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SuppressionTask {
    /// A short name for reports.
    pub name: String,
    /// Prompts sampled for training data.
    pub train_prompts: Vec<String>,
    /// Held-out prompts for the unwanted rate and `KL(p*‖p_new)`.
    pub eval_prompts: Vec<String>,
    /// Held-out prompts with clean responses, for `KL(p°‖p_new)`.
    pub control_prompts: Vec<String>,
    /// The negative-prompt prefix, if any.
    pub negative_prefix: Option<String>,
    /// The detector of unwanted outputs, if known.
    pub detector: Option<UnwantedWords>,
    /// Given annotated responses (user data).
    pub responses: Vec<AnnotatedResponse>,
    /// Clean held-out `(prompt, response)` pairs for perplexity.
    pub heldout_texts: Vec<(String, String)>,
}
