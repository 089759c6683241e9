//! The error type of `amend-kernels`.

/// Errors returned by the kernels of this crate.
///
/// Every variant names the operation (`op`, for example `"token_kl"`) that rejected its input, and
/// carries the sizes or indices needed to find the offending value. Kernels validate all of their
/// input before writing any output, so an error never leaves an output buffer half written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer does not have the length its shape requires.
    #[error("{op}: `{name}` has length {got}, expected {expected}")]
    LengthMismatch {
        /// Operation that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The vocabulary (row length) is smaller than 2.
    #[error("{op}: vocabulary size {vocab} is too small (at least 2 is required)")]
    VocabTooSmall {
        /// Operation that rejected the input.
        op: &'static str,
        /// Row length that was given.
        vocab: usize,
    },
    /// A label (or candidate id) of an active row is outside `[0, vocab)`.
    #[error("{op}: label {label} at row {row} is outside [0, {vocab})")]
    LabelOutOfRange {
        /// Operation that rejected the input.
        op: &'static str,
        /// Row index.
        row: usize,
        /// The offending label.
        label: i64,
        /// Vocabulary size.
        vocab: usize,
    },
    /// An active row has no finite logit (all entries are `-inf`), or holds a NaN or `+inf`.
    #[error("{op}: row {row} of `{name}` is not usable: {reason}")]
    NonFiniteRow {
        /// Operation that rejected the input.
        op: &'static str,
        /// Name of the argument (`"logits"`, `"ref_logits"`).
        name: &'static str,
        /// Row index.
        row: usize,
        /// What is wrong with the row.
        reason: &'static str,
    },
    /// A candidate token id of an unlikelihood row is outside `[0, vocab)` (negative ids mark
    /// empty slots and are skipped).
    #[error("{op}: candidate id {id} of row {row} is outside [0, {vocab})")]
    CandidateOutOfRange {
        /// Operation that rejected the input.
        op: &'static str,
        /// Row index.
        row: usize,
        /// The offending id.
        id: i64,
        /// Vocabulary size.
        vocab: usize,
    },
    /// An argument is outside its domain (a negative weight, a zero smoothing epsilon, ...).
    #[error("{op}: invalid `{name}`: {reason}")]
    InvalidArg {
        /// Operation that rejected the input.
        op: &'static str,
        /// Name of the argument.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// `Result` with [`KernelError`] as the default error type.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
