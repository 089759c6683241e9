//! The `amend_edit.json` manifest written next to every edited model (spec IO-5), and the
//! atomic write of the edited directory (IO-1 … IO-4, through
//! [`amend_models::CausalLm::save_pretrained`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use amend_models::{CausalLm, SaveOptions};

use crate::report::{DeliberateDifference, EditWarning};
use crate::{Error, Result};

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "amend_edit.json";

/// File name of the metrics JSON the CLI writes next to the weights.
pub const METRICS_FILE: &str = "amend_edit_metrics.json";

/// What an edited directory records about how it was made (IO-5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `profs` or `finetune`.
    pub method: String,
    /// Version of amend-edit that wrote it.
    pub amend_version: String,
    /// The input checkpoint directory, if the model was loaded from one.
    pub input_dir: Option<PathBuf>,
    /// SHA-256 of each input weight file (`*.safetensors`), by file name.
    pub input_weights_sha256: BTreeMap<String, String>,
    /// The full configuration (ProFS config or fine-tuning recipe).
    pub config: serde_json::Value,
    /// Keys of the tensors the edit changed.
    pub edited_keys: Vec<String>,
    /// Warnings issued during the edit.
    pub warnings: Vec<EditWarning>,
    /// Deliberate differences from the reference code, with the parity options in use.
    pub deliberate_differences: Vec<DeliberateDifference>,
    /// The method's report (per-layer k, k_eff, σ₁…σ_k for ProFS; data counts, steps and losses
    /// for fine-tuning).
    pub report: serde_json::Value,
}

impl Manifest {
    /// Serialises the manifest (pretty JSON).
    ///
    /// # Errors
    /// [`Error::Json`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: MANIFEST_FILE.into(),
            line: None,
            source,
        })
    }
}

/// SHA-256 (hex) of the weight files of the checkpoint in `dir`, by file name: the shards listed
/// in `model.safetensors.index.json` when there is one, else `model.safetensors`.
///
/// # Errors
/// [`Error::Io`]; [`Error::Json`] for an unreadable index.
pub fn hash_weight_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let index = dir.join(amend_models::WEIGHTS_INDEX_FILE);
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            line: None,
            source,
        })?;
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        names.sort();
        names.dedup();
        files.extend(names.into_iter().map(|n| (n.clone(), dir.join(n))));
    } else {
        let f = dir.join(amend_models::WEIGHTS_FILE);
        if f.is_file() {
            files.push((amend_models::WEIGHTS_FILE.to_string(), f));
        }
    }
    for (name, path) in files {
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        out.insert(name, h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    }
    Ok(out)
}

/// Edited directories written before [`amend_models::output::OUTPUT_MARKER`] existed: they hold
/// [`MANIFEST_FILE`] and only the files `amend edit` writes (the model files, the manifest and
/// the metrics), so `amend edit --overwrite` may replace them.
pub const EARLIER_OUTPUT: amend_models::output::Legacy =
    amend_models::output::Legacy { marker: MANIFEST_FILE, known: is_edit_output_file };

fn is_edit_output_file(name: &str) -> bool {
    ["config.json", amend_models::WEIGHTS_FILE, MANIFEST_FILE, METRICS_FILE].contains(&name)
        || amend_models::AUX_FILES.contains(&name)
}

fn model_err(e: amend_models::output::OutputError) -> Error {
    amend_models::Error::from(e).into()
}

/// Options of the edited-directory writers.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    /// Replace an existing output directory (only once the new one is complete).
    pub overwrite: bool,
    /// More files to write next to the weights (name → bytes), e.g. a metrics JSON.
    pub extra_files: BTreeMap<String, Vec<u8>>,
}

/// Writes `model` as a new Hugging Face directory with the manifest (and `opts.extra_files`)
/// next to the weights: atomically, never over the input directory, unedited tensors
/// bit-identical, tensor names, shapes and dtypes as in the input.
///
/// # Errors
/// [`Error::Model`] (`OutputDir`, `Io`, …); [`Error::Json`].
pub fn write_edited_model<M: CausalLm + ?Sized>(
    model: &M,
    out_dir: &Path,
    manifest: &Manifest,
    opts: &OutputOptions,
) -> Result<PathBuf> {
    let mut extra = opts.extra_files.clone();
    extra.insert(MANIFEST_FILE.to_string(), manifest.to_bytes()?);
    let save = SaveOptions { overwrite: opts.overwrite, dtype: None, extra_files: extra };
    Ok(model.save_pretrained(out_dir, &save)?)
}

/// Pretty JSON of any serialisable value (for manifests and metrics files).
///
/// # Errors
/// [`Error::Json`].
pub fn to_json_value<T: Serialize>(what: &str, v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|source| Error::Json { path: what.into(), line: None, source })
}

/// Writes `files` (name → bytes) into a new directory `out_dir`, atomically: into a staging
/// directory next to it (removed on an error or an interruption, see
/// [`amend_models::output::Staged`]), synced, then renamed into place. An existing `out_dir` is an error
/// unless `overwrite`, in which case it is replaced only once the new directory is complete.
/// `out_dir` may never be, contain or lie inside `input_dir` (after canonicalisation), even with
/// `overwrite`. Used for outputs without weights (e.g. the metrics of single-mode edits).
///
/// # Errors
/// [`Error::Model`] with `amend_models::Error::OutputDir` when `out_dir` is, contains or is
/// inside `input_dir`, exists without `overwrite`, or is not a directory; [`Error::Io`].
pub fn write_dir_atomically(
    out_dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    overwrite: bool,
    input_dir: Option<&Path>,
) -> Result<PathBuf> {
    let refuse = |path: &Path, reason: String| -> Error {
        amend_models::Error::OutputDir { path: path.to_path_buf(), reason }.into()
    };
    let absolute = if out_dir.is_absolute() {
        out_dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::io(out_dir, e))?.join(out_dir)
    };
    let name =
        absolute.file_name().ok_or_else(|| refuse(out_dir, "no directory name".into()))?.to_owned();
    let parent = absolute.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let parent = parent.canonicalize().map_err(|e| Error::io(&parent, e))?;
    let out_dir = &parent.join(name);
    if let Some(input) = input_dir {
        let input = input.canonicalize().map_err(|e| Error::io(input, e))?;
        if out_dir.starts_with(&input) || input.starts_with(out_dir) {
            return Err(refuse(
                out_dir,
                format!("it is, contains or is inside the input directory {}", input.display()),
            ));
        }
    }
    if out_dir.exists() && !overwrite {
        return Err(refuse(out_dir, "it exists (set overwrite to replace it)".into()));
    }
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(refuse(out_dir, "it exists and is not a directory".into()));
    }
    let staged = amend_models::output::Staged::dir("output", out_dir).map_err(model_err)?;
    for (name, bytes) in files {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(refuse(out_dir, format!("`{name}` is not a plain file name")));
        }
        staged.write_file(name, bytes).map_err(model_err)?;
    }
    let replace = if overwrite {
        amend_models::output::Replace::Any
    } else {
        amend_models::output::Replace::Never
    };
    staged.commit(replace).map_err(model_err)?;
    Ok(out_dir.to_path_buf())
}
