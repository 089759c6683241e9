//! The error type of `amend-losses`.

/// Errors returned by the losses of this crate.
///
/// Variants name the operation (`op`, the loss function) and the shapes or indices involved.
/// Errors from the layers below are kept as sources: [`Error::Tch`] for libtorch and
/// [`Error::Kernel`] for the fused kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libtorch operation failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// A fused kernel rejected its input.
    #[error(transparent)]
    Kernel(#[from] amend_kernels::KernelError),
    /// A tensor does not have the shape the loss requires.
    #[error("{op}: `{name}` has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// The required shape, in words (for example `"[B, T] matching logits [2, 3, 4]"`).
        expected: String,
        /// The shape that was given.
        got: Vec<i64>,
    },
    /// A tensor has an unsupported dtype.
    #[error("{op}: `{name}` has dtype {got:?}, expected {expected}")]
    DtypeMismatch {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// The accepted dtypes, in words.
        expected: &'static str,
        /// The dtype that was given.
        got: tch::Kind,
    },
    /// Tensors that must share a device do not.
    #[error("{op}: `{name}` is on {got:?}, but logits are on {expected:?}")]
    DeviceMismatch {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// Device of the logits.
        expected: tch::Device,
        /// Device of the argument.
        got: tch::Device,
    },
    /// The vocabulary is smaller than 2.
    #[error("{op}: vocabulary size {vocab} is too small (at least 2 is required)")]
    VocabTooSmall {
        /// Loss that rejected the input.
        op: &'static str,
        /// The vocabulary size.
        vocab: i64,
    },
    /// A label (or token id) at an active position is outside `[0, vocab)`.
    #[error(
        "{op}: `{name}` holds {value} at {index:?}, outside [0, {vocab}) ({count} such entries)"
    )]
    LabelOutOfRange {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// First offending value.
        value: i64,
        /// Its index.
        index: Vec<i64>,
        /// Number of offending entries.
        count: i64,
        /// Vocabulary size.
        vocab: i64,
    },
    /// A token weight is not exactly −1, 0 or +1.
    #[error(
        "token weights must be -1, 0 or +1; found {value} at {index:?} ({count} invalid entries)"
    )]
    InvalidTokenWeight {
        /// First offending value.
        value: f64,
        /// Its index.
        index: Vec<i64>,
        /// Number of invalid entries.
        count: i64,
    },
    /// A configuration value is outside its domain.
    #[error("{op}: invalid `{name}`: {reason}")]
    InvalidConfig {
        /// Loss that rejected the configuration.
        op: &'static str,
        /// Name of the field.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A sequence has no scored token, so a length-normalised statistic is undefined.
    #[error("{op}: sequence {index} has no scored token (use EmptyPolicy::Mask to drop it)")]
    EmptySequence {
        /// Loss that rejected the input.
        op: &'static str,
        /// Index of the sequence.
        index: i64,
    },
    /// A token loss is NaN or ±inf although the logits (and reference logits) of its row are
    /// all finite: an intermediate value overflowed the compute dtype. Reported under
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error) (the default).
    #[error(
        "{op}: the loss at position {index:?} is {value} although its logits are finite: a value \
         overflowed {dtype} ({count} such positions); the logits span more than {dtype} can hold as \
         log-probabilities, or a config value (alpha, temperature) is too large for them: use \
         smaller logits or values, or float64 inputs"
    )]
    LossOverflow {
        /// Loss that overflowed.
        op: &'static str,
        /// Index of the first such position.
        index: Vec<i64>,
        /// Its loss value (NaN, inf or -inf).
        value: f64,
        /// The compute dtype (`float32`, `bfloat16`, ...).
        dtype: &'static str,
        /// Number of non-finite token losses.
        count: i64,
    },
    /// Logits at an active position hold NaN or `+inf`, or have no finite entry, and the loss's
    /// non-finite policy is [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error) (the default).
    #[error(
        "{op}: `{name}` at active position {index:?} {what} ({count} such positions); \
         NaN, +inf and rows without a finite logit are rejected by default (set `non_finite` to \
         `propagate` to let them reach the loss)"
    )]
    NonFiniteLogits {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument (`"logits"`, `"ref_logits"`).
        name: &'static str,
        /// Index of the first offending position.
        index: Vec<i64>,
        /// Number of offending positions.
        count: i64,
        /// What is wrong with the first one: `"holds NaN"`, `"holds +inf"` or `"has no finite
        /// entry (every logit is -inf)"`.
        what: &'static str,
    },
    /// A caller-supplied closure (for example the model step of a generation helper) failed.
    #[error("{op}: the caller-supplied closure failed")]
    Callback {
        /// Operation that called the closure.
        op: &'static str,
        /// The closure's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Any other invalid input, described in words.
    #[error("{op}: invalid input `{name}`: {reason}")]
    InvalidInput {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A value that must be finite (a log-probability at an active position, a sequence sum, a
    /// reference sum or a statistic) is NaN or infinite.
    #[error("{op}: `{name}` is not finite at {index:?} ({count} non-finite entries)")]
    NonFinite {
        /// Loss that rejected the input.
        op: &'static str,
        /// Name of the argument (or of the derived quantity, for example `"log-probs"`).
        name: &'static str,
        /// Index of the first offending entry.
        index: Vec<i64>,
        /// Number of offending entries.
        count: i64,
    },
    /// A reward used for ranking (RRHF, NEAT) is NaN or infinite.
    #[error("{op}: reward at {index:?} is not finite ({count} non-finite rewards)")]
    NonFiniteReward {
        /// Loss that rejected the input.
        op: &'static str,
        /// Index `[group, candidate]` of the first offending reward.
        index: Vec<i64>,
        /// Number of offending rewards.
        count: i64,
    },
    /// A contrastive-perplexity anchor has no positive, so its prototype is undefined.
    #[error("{op}: anchor {group} has no positive (the prototype is undefined)")]
    NoPositives {
        /// Loss that rejected the input.
        op: &'static str,
        /// Index of the anchor (group).
        group: i64,
    },
    /// A ranking group (RRHF, NEAT) has no candidate left.
    #[error("{op}: group {group} has no candidate (its candidate mask is all false)")]
    EmptyCandidateSet {
        /// Loss that rejected the input.
        op: &'static str,
        /// Index of the group.
        group: i64,
    },
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with a logits row that failed the finiteness check (for
/// [`Error::NonFiniteLogits`]): NaN first, then `+inf`, else no finite entry.
pub(crate) fn describe_bad_row(row: &tch::Tensor) -> Result<&'static str> {
    if bool::try_from(row.f_isnan()?.f_any()?)? {
        Ok("holds NaN")
    } else if bool::try_from(row.f_isposinf()?.f_any()?)? {
        Ok("holds +inf")
    } else {
        Ok("has no finite entry (every logit is -inf)")
    }
}
