//! The error type of `amend-eval`.

use std::path::PathBuf;

/// Errors returned by tasks, runners and reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libtorch operation failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// A loss rejected its input.
    #[error(transparent)]
    Loss(#[from] amend_losses::Error),
    /// A model operation failed.
    #[error(transparent)]
    Model(#[from] amend_models::Error),
    /// An edit failed.
    #[error(transparent)]
    Edit(#[from] amend_edit::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
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
