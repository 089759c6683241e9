//! The error type of `amend-edit`.

/// Errors returned by the editors and the editing metrics.
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
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
