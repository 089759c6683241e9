//! State shared by every adapter (parameters, tokenizer, generation defaults, where the weights
//! came from) and the loading and saving of Hugging Face directories.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointReader, WEIGHTS_FILE, dtype_of};
use crate::config::ModelConfig;
use crate::generation::GenerationConfig;
use crate::model::{LoadOptions, SaveOptions, kind_name};
use crate::params::{Params, check_float_kind};
use crate::source::CheckpointWeights;
use crate::tokenizer::{OutOfVocabId, Tokenizer};
use crate::{Error, Result};

/// Tokenizer and generation files copied byte-for-byte from a checkpoint to a saved model.
pub const AUX_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Where a loaded model's weights came from, for faithful saving.
#[derive(Debug)]
pub(crate) struct Origin {
    /// Canonical checkpoint directory.
    pub dir: PathBuf,
    /// `config.json` as read.
    pub raw_config: Value,
    /// Parameter name → key in the file (they differ when a GPT-2 file lacks `transformer.`).
    pub file_keys: HashMap<String, String>,
    /// Parameter name → stored dtype.
    pub stored_kinds: HashMap<String, Kind>,
    /// Non-parameter buffers of the checkpoint (`attn.bias`, `rotary_emb.inv_freq`), written back
    /// unchanged.
    pub passthrough: Vec<(String, Tensor)>,
    /// `__metadata__` of the safetensors file.
    pub metadata: Option<HashMap<String, String>>,
}

/// The state every adapter carries besides its layers.
#[derive(Debug)]
pub(crate) struct Core {
    pub params: Params,
    pub tokenizer: Option<Tokenizer>,
    /// From `generation_config.json` (else from `config.json`), without special-token ids
    /// outside the vocabulary; `None` for a model built in code.
    pub generation: Option<GenerationConfig>,
    pub origin: Option<Origin>,
    /// Files written next to the weights on save (tokenizer, generation config, …).
    pub aux_files: BTreeMap<String, Vec<u8>>,
    pub training: bool,
}

impl Core {
    pub fn new(params: Params) -> Self {
        Core {
            params,
            tokenizer: None,
            generation: None,
            origin: None,
            aux_files: BTreeMap::new(),
            training: false,
        }
    }

    /// A copy for a deep-copied model with new `params`.
    pub fn copy_with(&self, mut params: Params) -> Result<Self> {
        let frozen: std::collections::HashSet<&str> =
            self.params.iter().filter(|p| !p.trainable()).map(|p| p.name()).collect();
        params.set_trainable(|p| !frozen.contains(p.name()))?;
        let origin = self.origin.as_ref().map(|o| Origin {
            dir: o.dir.clone(),
            raw_config: o.raw_config.clone(),
            file_keys: o.file_keys.clone(),
            stored_kinds: o.stored_kinds.clone(),
            passthrough: o
                .passthrough
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            metadata: o.metadata.clone(),
        });
        Ok(Core {
            params,
            tokenizer: self.tokenizer.clone(),
            generation: self.generation.clone(),
            origin,
            aux_files: self.aux_files.clone(),
            training: self.training,
        })
    }
}

/// A checkpoint directory opened for loading: config, weights and the pieces around them.
pub(crate) struct OpenedDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub raw_config: Value,
    pub weights: CheckpointWeights,
}

/// Reads `config.json` and the safetensors headers of `dir`.
pub(crate) fn open_dir(dir: &Path, opts: &LoadOptions) -> Result<OpenedDir> {
    check_float_kind("load", opts.kind)?;
    let dir = dir.canonicalize().map_err(|e| crate::checkpoint::io_error(dir, e))?;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| crate::checkpoint::io_error(&config_path, e))?;
    let raw_config: Value = serde_json::from_str(&text)
        .map_err(|source| Error::Json { path: config_path.clone(), source })?;
    let config = ModelConfig::from_hf_json(&raw_config, &config_path, opts.unknown_config_fields)?;
    crate::machine::check_model_fits(&config, opts.kind, &config_path)?;
    let ckpt = Checkpoint::open(&dir)?;
    let mut reader = CheckpointReader::new(ckpt, opts.kind, opts.device);
    reader.check_finite(opts.non_finite == crate::model::NonFiniteWeights::Error);
    Ok(OpenedDir { dir, config, raw_config, weights: CheckpointWeights::new(reader) })
}

/// Finishes loading: checks that every checkpoint tensor was used (keeping the `ignorable`
/// buffers for saving), reads the tokenizer, generation config and auxiliary files.
pub(crate) fn finish_load(
    opened: OpenedDir,
    params: Params,
    ignorable: impl Fn(&str) -> bool,
    opts: &LoadOptions,
) -> Result<Core> {
    let OpenedDir { dir, config, raw_config, mut weights } = opened;
    let mut passthrough = vec![];
    for key in weights.reader.unused() {
        if ignorable(&key) {
            let t = weights.reader.read_stored(&key)?;
            passthrough.push((key, t));
        } else {
            let file = weights
                .reader
                .checkpoint()
                .entries
                .get(&key)
                .map_or_else(|| dir.clone(), |e| e.file.clone());
            return Err(Error::UnexpectedTensor {
                path: file,
                name: key,
                model_type: config.model_type().to_string(),
            });
        }
    }
    let metadata = weights.reader.checkpoint().metadata.clone();
    let mut core = Core::new(params);

    // Special-token ids outside the vocabulary load (as in transformers) but are left out, with
    // a warning, and error only where they would be used (see `OutOfVocabId`).
    let vocab = config.vocab_size();
    let cfg_path = dir.join("config.json");
    let gen_path = dir.join("generation_config.json");
    let mut out_of_vocab = vec![];
    let special = config.special_tokens();
    let mut cfg_bos = special.bos_token_id;
    let mut cfg_eos = special.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default();
    let mut cfg_pad = special.pad_token_id;
    keep_in_vocab(&mut cfg_bos, &cfg_path, "bos_token_id", vocab, &mut out_of_vocab);
    retain_in_vocab(&mut cfg_eos, &cfg_path, "eos_token_id", vocab, &mut out_of_vocab);
    keep_in_vocab(&mut cfg_pad, &cfg_path, "pad_token_id", vocab, &mut out_of_vocab);
    let mut generation = if gen_path.is_file() {
        GenerationConfig::from_hf_file(&gen_path, &config)?
    } else {
        GenerationConfig::for_model_config(&config)
    };
    // Ids the generation config inherits from config.json were recorded above already.
    let gen_fields = if gen_path.is_file() { json_keys(&gen_path) } else { vec![] };
    let mut gen_bad = vec![];
    keep_in_vocab(&mut generation.bos_token_id, &gen_path, "bos_token_id", vocab, &mut gen_bad);
    retain_in_vocab(&mut generation.stop_token_ids, &gen_path, "eos_token_id", vocab, &mut gen_bad);
    keep_in_vocab(&mut generation.pad_token_id, &gen_path, "pad_token_id", vocab, &mut gen_bad);
    out_of_vocab.extend(gen_bad.into_iter().filter(|o| gen_fields.iter().any(|k| k == o.field)));
    for o in &out_of_vocab {
        tracing::warn!(
            path = %o.file.display(),
            field = o.field,
            id = o.id,
            vocab = o.model_vocab,
            "special token id outside the model's vocabulary: ignored (an error only where it \
             would be used, e.g. prepending a BOS token)"
        );
    }
    let tok_path = dir.join("tokenizer.json");
    if opts.load_tokenizer && tok_path.is_file() {
        let eos = if generation.stop_token_ids.is_empty() {
            cfg_eos
        } else {
            generation.stop_token_ids.clone()
        };
        let tok = Tokenizer::from_file(&tok_path)?
            .with_special_tokens(
                cfg_bos.or(generation.bos_token_id),
                eos,
                cfg_pad.or(generation.pad_token_id),
            )
            .with_out_of_vocab_ids(out_of_vocab);
        tok.check_fits(vocab, &tok_path)?;
        core.tokenizer = Some(tok);
    }
    core.generation = Some(generation);
    for name in AUX_FILES {
        let p = dir.join(name);
        if p.is_file() {
            core.aux_files
                .insert((*name).to_string(), std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
        }
    }
    core.origin = Some(Origin {
        dir,
        raw_config,
        file_keys: weights.file_keys,
        stored_kinds: weights.stored_kinds,
        passthrough,
        metadata,
    });
    Ok(core)
}

/// The top-level keys of a JSON object file (empty if it cannot be read: the caller has already
/// parsed the file successfully).
fn json_keys(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&t).ok())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Clears `id` if the vocabulary has no row for it, recording where it came from.
fn keep_in_vocab(
    id: &mut Option<u32>,
    file: &Path,
    field: &'static str,
    model_vocab: usize,
    out: &mut Vec<OutOfVocabId>,
) {
    if let Some(v) = *id
        && v as usize >= model_vocab
    {
        out.push(OutOfVocabId { file: file.to_path_buf(), field, id: v, model_vocab });
        *id = None;
    }
}

/// Drops the ids the vocabulary has no row for, recording where they came from.
fn retain_in_vocab(
    ids: &mut Vec<u32>,
    file: &Path,
    field: &'static str,
    model_vocab: usize,
    out: &mut Vec<OutOfVocabId>,
) {
    ids.retain(|&v| {
        let ok = (v as usize) < model_vocab;
        if !ok {
            out.push(OutOfVocabId { file: file.to_path_buf(), field, id: v, model_vocab });
        }
        ok
    });
}

/// One tensor queued for writing.
struct Pending {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Pending {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn tensor_bytes(t: &Tensor, kind: Kind) -> Result<Pending> {
    let _guard = tch::no_grad_guard();
    let t = t.f_detach()?.f_to_kind(kind)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    let dtype = dtype_of(kind)
        .ok_or_else(|| Error::invalid("save_pretrained", "dtype", format!("{kind:?}")))?;
    Ok(Pending { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Writes `core`'s model as a Hugging Face directory at `out` (see
/// [`CausalLm::save_pretrained`](crate::CausalLm::save_pretrained)).
pub(crate) fn save(
    core: &Core,
    config: &ModelConfig,
    out: &Path,
    opts: &SaveOptions,
) -> Result<PathBuf> {
    if let Some(k) = opts.dtype {
        check_float_kind("save_pretrained", k)?;
    }
    let out = absolute(out)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::OutputDir { path: out.clone(), reason: "no directory name".into() })?
        .to_owned();
    let parent = out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let parent = parent.canonicalize().map_err(|e| Error::io(&parent, e))?;
    let out = parent.join(&name);
    if let Some(origin) = &core.origin
        && (out.starts_with(&origin.dir) || origin.dir.starts_with(&out))
    {
        return Err(Error::OutputDir {
            path: out,
            reason: format!(
                "it is, contains or is inside the input directory {}",
                origin.dir.display()
            ),
        });
    }
    if out.exists() && !opts.overwrite {
        return Err(Error::OutputDir {
            path: out,
            reason: "it exists (set overwrite to replace it)".into(),
        });
    }
    if out.exists() && !out.is_dir() {
        return Err(Error::OutputDir {
            path: out,
            reason: "it exists and is not a directory".into(),
        });
    }

    // Assembled in a staging folder next to `out` (removed on an error or an interruption) and
    // renamed into place when complete; see `crate::output`.
    let staged = crate::output::Staged::dir("output", &out)?;
    let tmp_path = staged.path().to_path_buf();

    // Tensors: parameters under their file keys and stored dtypes, then pass-through buffers.
    let mut pending: Vec<(String, Pending)> = Vec::with_capacity(core.params.len());
    for p in core.params.iter() {
        let (key, stored) = match &core.origin {
            Some(o) => (
                o.file_keys.get(p.name()).cloned().unwrap_or_else(|| p.name().to_string()),
                o.stored_kinds.get(p.name()).copied(),
            ),
            None => (p.name().to_string(), None),
        };
        let kind = opts.dtype.or(stored).unwrap_or(p.tensor().f_kind()?);
        pending.push((key, tensor_bytes(p.tensor(), kind)?));
    }
    if let Some(o) = &core.origin {
        for (key, t) in &o.passthrough {
            let kind = t.f_kind()?;
            pending.push((key.clone(), tensor_bytes(t, kind)?));
        }
    }
    let mut metadata: HashMap<String, String> =
        core.origin.as_ref().and_then(|o| o.metadata.clone()).unwrap_or_default();
    metadata.insert("format".into(), "pt".into());
    let weights_path = tmp_path.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(
        pending.iter().map(|(k, p)| (k.as_str(), p)),
        Some(metadata),
        &weights_path,
    )
    .map_err(|source| Error::Safetensors { path: weights_path.clone(), source })?;
    drop(pending);

    // config.json: as read (dtype fields updated if the stored dtype changes), or generated.
    let mut cfg_json = match &core.origin {
        Some(o) => o.raw_config.clone(),
        None => {
            let mut v = config.to_hf_json();
            v["dtype"] = Value::from(kind_name(opts.dtype.unwrap_or(core.params.kind())));
            v
        }
    };
    if let (Some(k), Some(obj)) = (opts.dtype, cfg_json.as_object_mut()) {
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), Value::from(kind_name(k)));
            }
        }
    }
    let cfg_text = serde_json::to_string_pretty(&cfg_json)
        .map_err(|source| Error::Json { path: tmp_path.join("config.json"), source })?;
    write_file(&tmp_path.join("config.json"), cfg_text.as_bytes())?;

    for (name, bytes) in core.aux_files.iter().chain(&opts.extra_files) {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(Error::invalid(
                "save_pretrained",
                "extra_files",
                format!("`{name}` is not a plain file name"),
            ));
        }
        write_file(&tmp_path.join(name), bytes)?;
    }
    sync_file(&weights_path)?;
    sync_dir(&tmp_path)?;

    // Rename into place; an existing directory is replaced only now that the new one is complete.
    let replace =
        if opts.overwrite { crate::output::Replace::Any } else { crate::output::Replace::Never };
    Ok(staged.commit(replace)?)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        let cwd = std::env::current_dir().map_err(|e| Error::io(p, e))?;
        Ok(cwd.join(p))
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    // Directory fsync is best effort (not supported on every platform / filesystem).
    if let Ok(f) = File::open(path) {
        let _ = f.sync_all();
    }
    Ok(())
}
