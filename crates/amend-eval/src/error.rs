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
    /// A data file is malformed.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Writing or reading JSON failed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The model has no tokenizer, which the operation needs.
    #[error("{op}: the model has no tokenizer (tokenizer.json)")]
    NoTokenizer {
        /// The operation.
        op: &'static str,
    },
    /// Drawing the plot failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The file being drawn.
        path: PathBuf,
        /// The backend's message (plotters' drawing errors are not `'static`).
        reason: String,
    },
    /// A method failed to train (for example a non-finite loss).
    #[error("{method} ({strength}): {source}")]
    Method {
        /// The method.
        method: String,
        /// Its sweep value.
        strength: String,
        /// The cause.
        #[source]
        source: Box<Error>,
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
