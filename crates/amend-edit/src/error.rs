//! The error type of `amend-edit`.

use std::path::PathBuf;

/// Errors returned by the editors and the editing metrics.
///
/// Every variant that concerns user data names the offending item (pair index and side, edit
/// index and field, layer, tensor key, file and line); foreign errors are kept as sources.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libtorch operation failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// Loading, running or saving the model failed.
    #[error(transparent)]
    Model(#[from] amend_models::Error),
    /// A loss rejected its input.
    #[error(transparent)]
    Loss(#[from] amend_losses::Error),
    /// An argument or data item is invalid.
    #[error("{op}: invalid `{name}`: {reason}")]
    InvalidInput {
        /// The operation.
        op: &'static str,
        /// The argument or data item.
        name: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Two tensors that must agree in shape do not.
    #[error("{op}: shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The argument.
        name: &'static str,
        /// The expected shape (`-1` for a free dimension).
        expected: Vec<i64>,
        /// The shape given.
        got: Vec<i64>,
    },
    /// The preferred and dis-preferred sides of the preference data differ in length.
    #[error(
        "{op}: {preferred} preferred texts but {dispreferred} dis-preferred texts (pairs must match one to one)"
    )]
    PairCountMismatch {
        /// The operation.
        op: &'static str,
        /// Number of preferred items.
        preferred: usize,
        /// Number of dis-preferred items.
        dispreferred: usize,
    },
    /// One preference pair is unusable (empty text, no tokens).
    #[error("preference pair {index} ({side}): {reason}")]
    InvalidPair {
        /// Index of the pair in the input (0-based).
        index: usize,
        /// `preferred` or `dispreferred`.
        side: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// One edit request is unusable (empty target, a target that tokenises to nothing, …).
    #[error("edit request {index}: field `{field}`: {reason}")]
    InvalidEdit {
        /// Index of the request in the input (0-based).
        index: usize,
        /// The field at fault (`target_new`, `prompt`, `rephrase[2]`, …).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The ProFS rank `k` is 0 (PF-6).
    #[error("ProFS: rank k must be at least 1")]
    ZeroRank,
    /// The ProFS rank exceeds the number of pairs or the hidden size (PF-6).
    #[error("ProFS: rank k = {k} exceeds min(n_pairs = {n_pairs}, hidden = {hidden})")]
    RankTooLarge {
        /// Requested rank.
        k: usize,
        /// Number of pairs used.
        n_pairs: usize,
        /// Hidden size.
        hidden: usize,
    },
    /// `RankPolicy::Error` and the layer's difference matrix has numerical rank below `k` (PF-7).
    #[error(
        "ProFS layer {layer}: rank k = {k} exceeds the numerical rank {r_eff} of the centred difference matrix (sigma_k / sigma_1 = {ratio:e})"
    )]
    RankDeficient {
        /// The layer.
        layer: usize,
        /// Requested rank.
        k: usize,
        /// Numerical rank.
        r_eff: usize,
        /// σ_k / σ_1.
        ratio: f64,
    },
    /// The layer's centred difference matrix is zero (identical pairs, or everything removed by
    /// centering) and `allow_degenerate_layers` is off (PF-8).
    #[error(
        "ProFS layer {layer}: the centred difference matrix is zero (identical pairs or everything removed by centering); set allow_degenerate_layers to skip the layer"
    )]
    DegenerateLayer {
        /// The layer.
        layer: usize,
    },
    /// A requested layer does not exist in the model (fine-tuning parameter selection).
    #[error(
        "{op}: layer {layer} does not exist: the model has {num_layers} layers (0..{num_layers}); requested layers: {requested}"
    )]
    LayerOutOfRange {
        /// The operation.
        op: &'static str,
        /// The first requested layer that does not exist.
        layer: usize,
        /// The requested layers as given (`2..9` or `1, 4, 7`).
        requested: String,
        /// Layers of the model.
        num_layers: usize,
    },
    /// A layer range is empty or reaches past the model's last layer (PF-11).
    #[error(
        "{op}: layer range {start}..{end} is invalid for a model with {num_layers} layers ({reason})"
    )]
    LayerRange {
        /// The operation.
        op: &'static str,
        /// First layer (inclusive).
        start: usize,
        /// End (exclusive).
        end: usize,
        /// Layers of the model.
        num_layers: usize,
        /// Why.
        reason: &'static str,
    },
    /// The model family is not in the ProFS target table (A.4), or a layer lacks the expected
    /// weight or has it with the wrong shape (PF-4). Nothing was modified.
    #[error("{op}: no edit target for model_type `{model_type}`{}: {reason}; expected keys: {}",
        layer.map_or(String::new(), |l| format!(" layer {l}")), expected.join(", "))]
    NoMatchingTarget {
        /// The operation.
        op: &'static str,
        /// The model's `model_type`.
        model_type: String,
        /// The layer, when one layer is at fault.
        layer: Option<usize>,
        /// The keys the target table expects.
        expected: Vec<String>,
        /// What is wrong.
        reason: String,
    },
    /// ProFS has reference defaults only for the reference checkpoints (A.5); other models need
    /// explicit `layers` and `k`.
    #[error(
        "ProFS has no default layers / rank for model_type `{model_type}` with {num_layers} layers, hidden {hidden}, MLP {intermediate} (defaults exist only for the reference checkpoints gpt2-medium, gpt-j-6b, mistral-7b, opt-6.7b); pass layers and k explicitly"
    )]
    NoDefaultForModel {
        /// The model's `model_type`.
        model_type: String,
        /// Layers.
        num_layers: usize,
        /// Hidden size.
        hidden: usize,
        /// MLP inner size.
        intermediate: usize,
    },
    /// A parameter selector matched no parameter of the model (an edit would be a no-op).
    #[error("{op}: parameter selector {selector} matches no parameter of this {model_type} model")]
    NoTrainableParams {
        /// The operation.
        op: &'static str,
        /// The selector, formatted.
        selector: String,
        /// The model's `model_type`.
        model_type: String,
    },
    /// A loss or gradient became non-finite while editing; the edit stopped.
    #[error("{op}: non-finite {what} ({value}) at step {step}")]
    NonFinite {
        /// The operation.
        op: &'static str,
        /// `loss` or `grad_norm`.
        what: &'static str,
        /// Optimizer step.
        step: usize,
        /// The value.
        value: f64,
    },
    /// Training diverged: after at least one optimizer step the loss, its gradient or the
    /// model's logits stopped being finite. The learning rate is the usual cause, so the message
    /// names it (the data and the starting model were fine at step 0).
    #[error(
        "{op}: training diverged after {step} optimizer step{} ({what}) at a peak learning rate of {lr:e}; lower the learning rate (`lr`, --lr on the command line)",
        if *step == 1 { "" } else { "s" }
    )]
    Diverged {
        /// The operation.
        op: &'static str,
        /// Optimizer steps taken before the failure.
        step: usize,
        /// The recipe's peak learning rate.
        lr: f64,
        /// What stopped being finite, in words.
        what: String,
    },
    /// A metric input is out of its domain (negative or NaN edit-score components, …).
    #[error("{op}: invalid metric input `{name}` = {value}: {reason}")]
    MetricDomain {
        /// The operation.
        op: &'static str,
        /// The component.
        name: String,
        /// The value.
        value: f64,
        /// Why.
        reason: &'static str,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON or JSONL file could not be parsed.
    #[error("{path}{}: invalid JSON: {source}", line.map_or(String::new(), |l| format!(" line {l}")))]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line for JSONL files.
        line: Option<usize>,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidInput`].
    pub(crate) fn invalid(
        op: &'static str,
        name: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidInput { op, name: name.into(), reason: reason.into() }
    }

    /// An [`Error::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
