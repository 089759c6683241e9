//! The error type of `amend-models`.

use std::path::PathBuf;

/// Errors returned by model loading, saving, tokenisation, generation and training.
///
/// Every variant about a checkpoint names the file, tensor or config field at fault; foreign
/// errors (libtorch, I/O, JSON, safetensors, tokenizers) are kept as sources, never stringified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libtorch operation failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A config field is missing, unknown, unsupported or out of range.
    #[error("{path}: config field `{field}`: {reason}")]
    Config {
        /// The config file (or `<in memory>` for configs built in code).
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint's `model_type` is not one amend can run.
    #[error(
        "{path}: unsupported model_type `{model_type}` (supported: gpt2, llama, mistral, qwen2)"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `model_type` found.
        model_type: String,
    },
    /// A directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{path}: no model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// A safetensors file is malformed (bad header, overlapping offsets, …).
    #[error("{path}: invalid safetensors file: {source}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A safetensors file is damaged or not a safetensors file: the header length, the header's
    /// JSON, or one tensor's entry (dtype, shape, data offsets) is wrong; `problem` says what, in
    /// words.
    #[error("{path}: {}{problem}", tensor.as_ref().map(|t| format!("tensor `{t}`: ")).unwrap_or_default())]
    CorruptSafetensors {
        /// The file.
        path: PathBuf,
        /// The tensor whose header entry is wrong, if one is.
        tensor: Option<String>,
        /// What is wrong.
        problem: String,
    },
    /// A path goes through a symbolic link that leads nowhere (a loop, or a missing target).
    #[error("{path}: {problem}")]
    BrokenLink {
        /// The path as given (or the link in it that is broken).
        path: PathBuf,
        /// What is wrong, with the chain of links followed.
        problem: String,
    },
    /// A safetensors file is shorter or longer than its header says (a truncated download).
    #[error("{path}: {}", length_problem(*expected, *actual))]
    TruncatedFile {
        /// The file.
        path: PathBuf,
        /// The length the header implies.
        expected: u64,
        /// The length on disk.
        actual: u64,
    },
    /// A tensor a model needs is not in the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The checkpoint holds a tensor the model does not use (a different architecture or config).
    #[error("{path}: unexpected tensor `{name}` (not used by this {model_type} configuration)")]
    UnexpectedTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The configuration's `model_type`.
        model_type: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<i64>,
        /// The shape in the file.
        got: Vec<i64>,
    },
    /// A tensor is stored in a dtype amend cannot load (only F32, BF16, F16 and F64 are).
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// A tokenizer file could not be read or a text could not be (de)tokenised.
    #[error("{}: tokenizer error: {source}", path.as_ref().map_or("<in memory>".into(), |p| p.display().to_string()))]
    Tokenizer {
        /// The tokenizer file, when one is involved.
        path: Option<PathBuf>,
        /// The tokenizers-crate error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The tokenizer can produce ids the model has no embedding for.
    #[error(
        "{path}: tokenizer has {tokenizer_vocab} tokens (largest id {max_id}) but the model's vocabulary has {model_vocab} rows"
    )]
    TokenizerVocab {
        /// The tokenizer file.
        path: PathBuf,
        /// Vocabulary size of the tokenizer (with added tokens).
        tokenizer_vocab: usize,
        /// Largest id the tokenizer can produce.
        max_id: u32,
        /// Rows of the model's embedding matrix.
        model_vocab: usize,
    },
    /// A special-token id that the operation needs is outside the model's vocabulary.
    #[error(
        "{op}: {path}: `{field}` = {id} is outside the model's vocabulary ({model_vocab} rows), so it cannot be used; set `{field}` to an id below {model_vocab} (or to null) in that file"
    )]
    SpecialTokenOutOfVocab {
        /// The operation that needs the id.
        op: &'static str,
        /// The config file (`config.json` or `generation_config.json`).
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// The id.
        id: u32,
        /// Rows of the model's embedding matrix.
        model_vocab: usize,
    },
    /// The operation needs a tokenizer and the model has none.
    #[error("{op}: the model has no tokenizer (load a directory with tokenizer.json)")]
    NoTokenizer {
        /// The operation.
        op: &'static str,
    },
    /// The input to a model call is invalid (shapes, token ids, options).
    #[error("{op}: invalid `{name}`: {reason}")]
    InvalidInput {
        /// The operation.
        op: &'static str,
        /// The argument.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A text is longer than the model's context (nothing was run; see
    /// [`scoring`](crate::scoring) for the options that allow it).
    #[error(
        "{op}: text {index} has {tokens} tokens, more than the model's context of {context} tokens (`{field}` in config.json); cap the texts (`max_tokens`) or score them in sliding windows (`stride`)"
    )]
    TooLong {
        /// The operation.
        op: &'static str,
        /// 0-based index of the text.
        index: usize,
        /// Its length in tokens (with the BOS token, when one is added; after a cap).
        tokens: usize,
        /// The model's context in tokens.
        context: usize,
        /// The config field the context comes from (`n_positions`, `max_position_embeddings`).
        field: &'static str,
    },
    /// A weight holds NaN or ±inf (as the model would use it, after conversion to the load
    /// dtype); see [`NonFiniteWeights`](crate::NonFiniteWeights).
    #[error(
        "{path}: tensor `{name}` holds {count} non-finite value{} (the first, at {index:?}, is {value}){}",
        if *count == 1 { "" } else { "s" },
        match overflow {
            Some((from, to)) => format!(
                " after conversion from {from} to {to}: the stored values are finite but too large for {to}; load the model in float32 or bfloat16"
            ),
            None => " in the file: the checkpoint is damaged or the training that wrote it diverged; to load it anyway, set `non_finite: propagate` in LoadOptions (--allow-non-finite-weights on the command line)".to_string(),
        }
    )]
    NonFiniteWeights {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Non-finite entries.
        count: i64,
        /// Index of the first one.
        index: Vec<i64>,
        /// Its value (NaN, inf or -inf).
        value: f64,
        /// `(stored dtype, load dtype)` when the stored values are finite and the conversion
        /// overflowed.
        overflow: Option<(&'static str, &'static str)>,
    },
    /// A text has fewer than two tokens, so no token of it can be scored (the first token is
    /// only context); a perplexity over no tokens is undefined.
    #[error(
        "{op}: text {index} has {tokens} token{} ({}): nothing to score, a text needs at least two tokens (the first is only context)",
        if *tokens == 1 { "" } else { "s" },
        if *with_bos { "including the prepended BOS" } else { "after tokenisation" }
    )]
    NothingToScore {
        /// The operation.
        op: &'static str,
        /// 0-based index of the text.
        index: usize,
        /// Its length in tokens (0 or 1).
        tokens: usize,
        /// Whether a BOS token was prepended (and counted).
        with_bos: bool,
    },
    /// Two tensors that must agree in shape do not.
    #[error("{op}: shape mismatch: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The expected shape.
        expected: Vec<i64>,
        /// The shape given.
        got: Vec<i64>,
    },
    /// A parameter name is not part of the model.
    #[error("{op}: no parameter named `{name}`")]
    MissingParam {
        /// The operation.
        op: &'static str,
        /// The name asked for.
        name: String,
    },
    /// An optional capability of [`CausalLm`](crate::CausalLm) that this model does not provide.
    #[error("{op} is not supported by {model_type} models")]
    Unsupported {
        /// The capability.
        op: &'static str,
        /// The model's `model_type`.
        model_type: String,
    },
    /// A model cannot be written to the requested directory.
    #[error("cannot write a model to {path}: {reason}")]
    OutputDir {
        /// The requested output directory.
        path: PathBuf,
        /// Why (it is the input directory, exists already, …).
        reason: String,
    },
    /// An output path is refused, or writing an output failed (see [`crate::output`]).
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// A thread count outside `1..=max` (see [`crate::machine::check_threads`]).
    #[error(
        "{requested} threads: the thread count must be between 1 and {max} ({} per logical CPU; this machine has {cpus} logical CPUs): more threads than CPUs only slow libtorch down",
        crate::machine::THREADS_PER_CPU
    )]
    Threads {
        /// The count asked for.
        requested: i64,
        /// The largest count accepted.
        max: usize,
        /// Logical CPUs of this process.
        cpus: usize,
    },
    /// A configuration whose parameters cannot fit in this machine's memory (checked before
    /// anything is allocated, see [`crate::machine::check_model_fits`]).
    #[error(
        "{path}: the configuration describes {parameters:.3e} parameters ({} in {dtype}), more than this machine's memory ({}); check its sizes: {fields}",
        crate::machine::human_bytes(*bytes), crate::machine::human_bytes(*memory as f64)
    )]
    ModelTooLarge {
        /// The config file.
        path: PathBuf,
        /// Parameters the configuration implies.
        parameters: f64,
        /// Their size in bytes in `dtype`.
        bytes: f64,
        /// The dtype asked for.
        dtype: String,
        /// Memory of this machine (or its cgroup limit) in bytes.
        memory: u64,
        /// The size fields, as `name = value` pairs.
        fields: String,
    },
    /// A training run hit a non-finite loss or gradient norm.
    #[error("training step {step}: non-finite {what} ({value})")]
    NonFinite {
        /// The optimizer step.
        step: usize,
        /// `loss` or `grad_norm`.
        what: &'static str,
        /// The value seen.
        value: f64,
    },
}

fn length_problem(expected: u64, actual: u64) -> String {
    if actual < expected {
        format!(
            "the file has {actual} bytes but its header describes {expected}: the file is \
             truncated (an interrupted download or copy?); fetch it again"
        )
    } else {
        format!(
            "the file has {actual} bytes but its header describes only {expected}: the last {} \
             bytes belong to no tensor, so the file is damaged or not a safetensors file",
            actual - expected
        )
    }
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An [`Error::InvalidInput`].
    pub(crate) fn invalid(op: &'static str, name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput { op, name, reason: reason.into() }
    }

    /// An [`Error::Config`].
    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config { path: path.into(), field: field.into(), reason: reason.into() }
    }
}
