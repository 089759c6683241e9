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

/// Writes `files` (name → bytes) into a new directory `out_dir`, atomically: into a temporary
/// directory next to it, synced, then renamed into place. An existing `out_dir` is an error
/// unless `overwrite`, in which case it is replaced only once the new directory is complete.
/// Used for outputs without weights (e.g. the metrics of single-mode edits).
///
/// # Errors
/// [`Error::InvalidInput`] for an existing output without `overwrite`; [`Error::Io`].
pub fn write_dir_atomically(
    out_dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    overwrite: bool,
) -> Result<PathBuf> {
    use std::io::Write;
    if out_dir.exists() && !overwrite {
        return Err(Error::invalid(
            "write_dir_atomically",
            out_dir.display().to_string(),
            "exists already (pass overwrite to replace it)",
        ));
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".amend-edit-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    for (name, bytes) in files {
        let path = tmp.path().join(name);
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))?;
    }
    let staged = tmp.keep();
    if out_dir.exists() {
        let old = parent.join(format!(
            ".amend-edit-old-{}",
            out_dir.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned())
        ));
        std::fs::rename(out_dir, &old).map_err(|e| Error::io(out_dir, e))?;
        if let Err(e) = std::fs::rename(&staged, out_dir) {
            let _ = std::fs::rename(&old, out_dir);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(Error::io(out_dir, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else if let Err(e) = std::fs::rename(&staged, out_dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(Error::io(out_dir, e));
    }
    Ok(out_dir.to_path_buf())
}
