//! Reading safetensors checkpoints: one `model.safetensors` or a sharded set described by
//! `model.safetensors.index.json`.
//!
//! Headers are parsed and checked (offsets, sizes, file length) before any tensor is read, so a
//! truncated download is reported as [`Error::TruncatedFile`] naming the file. Tensors are then
//! read one at a time with positioned reads, so loading never holds more than one raw tensor
//! buffer besides the model itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::Metadata;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    pub file: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// Absolute byte offsets in `file`.
    pub start: u64,
    pub end: u64,
}

/// The tensors of a checkpoint directory, indexed by key.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    /// The directory (for messages).
    pub dir: PathBuf,
    pub entries: BTreeMap<String, TensorEntry>,
    /// `__metadata__` of the first file.
    pub metadata: Option<HashMap<String, String>>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens the weights of `dir`, checking every header.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(WEIGHTS_INDEX_FILE);
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            entries: BTreeMap::new(),
            metadata: None,
            files: vec![],
        };
        if single.is_file() {
            ckpt.add_file(&single, None)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|source| Error::Json { path: index.clone(), source })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            // shard file -> names the index assigns to it
            let mut shards: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(&index, format!("weight_map.{name}"), "not a file name")
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::config(
                        &index,
                        format!("weight_map.{name}"),
                        format!("shard `{file}` is not a plain file name"),
                    ));
                }
                shards.entry(file.to_string()).or_default().insert(name.clone());
            }
            for (file, names) in &shards {
                let path = dir.join(file);
                ckpt.add_file(&path, Some(names))?;
            }
            for name in map.keys() {
                if !ckpt.entries.contains_key(name) {
                    return Err(Error::MissingTensor { path: index.clone(), name: name.clone() });
                }
            }
        } else {
            return Err(Error::NoWeights { path: dir.to_path_buf() });
        }
        Ok(ckpt)
    }

    /// Parses one file's header; `expected` (sharded case) are the names the index puts there.
    fn add_file(&mut self, path: &Path, expected: Option<&BTreeSet<String>>) -> Result<()> {
        let (header_end, metadata) = read_header(path)?;
        let actual = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        let expected_len = header_end + metadata.data_len() as u64;
        if actual != expected_len {
            return Err(Error::TruncatedFile {
                path: path.to_path_buf(),
                expected: expected_len,
                actual,
            });
        }
        if self.metadata.is_none() {
            self.metadata = metadata.metadata().clone();
        }
        for (name, info) in metadata.tensors() {
            if let Some(names) = expected
                && !names.contains(&name)
            {
                return Err(Error::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name,
                    model_type: "index".into(),
                });
            }
            if self.entries.contains_key(&name) {
                return Err(Error::invalid(
                    "Checkpoint::open",
                    "weights",
                    format!("tensor `{name}` appears in more than one shard ({})", path.display()),
                ));
            }
            let shape = info.shape.iter().map(|&d| d as i64).collect();
            let (s, e) = info.data_offsets;
            self.entries.insert(
                name,
                TensorEntry {
                    file: path.to_path_buf(),
                    dtype: info.dtype,
                    shape,
                    start: header_end + s as u64,
                    end: header_end + e as u64,
                },
            );
        }
        if let Some(names) = expected {
            for name in names {
                if !self.entries.contains_key(name) {
                    return Err(Error::MissingTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                    });
                }
            }
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }
}

/// Reads and validates a safetensors header; returns the offset where the data starts.
fn read_header(path: &Path) -> Result<(u64, Metadata)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n_bytes = [0u8; 8];
    if file_len < 8 {
        return Err(Error::TruncatedFile {
            path: path.to_path_buf(),
            expected: 8,
            actual: file_len,
        });
    }
    f.read_exact(&mut n_bytes).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n_bytes);
    // safetensors caps headers at 100 MB.
    if n > 100_000_000 {
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            source: safetensors::SafeTensorError::HeaderTooLarge,
        });
    }
    if 8 + n > file_len {
        return Err(Error::TruncatedFile {
            path: path.to_path_buf(),
            expected: 8 + n,
            actual: file_len,
        });
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&header).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        source: safetensors::SafeTensorError::InvalidHeader(e),
    })?;
    let metadata: Metadata = serde_json::from_str(text).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        source: safetensors::SafeTensorError::InvalidHeaderDeserialization(e),
    })?;
    Ok((8 + n, metadata))
}

/// The tch kind of a safetensors dtype amend can load.
pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// The safetensors dtype of a tch kind.
pub(crate) fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Half => Some(Dtype::F16),
        Kind::Double => Some(Dtype::F64),
        Kind::Int64 => Some(Dtype::I64),
        Kind::Int => Some(Dtype::I32),
        Kind::Bool => Some(Dtype::BOOL),
        Kind::Uint8 => Some(Dtype::U8),
        _ => None,
    }
}

/// Hands out the tensors of a checkpoint by name, checking shapes and remembering what was used.
pub(crate) struct CheckpointReader {
    ckpt: Checkpoint,
    files: HashMap<PathBuf, File>,
    used: BTreeSet<String>,
    kind: Kind,
    device: Device,
}

impl CheckpointReader {
    pub fn new(ckpt: Checkpoint, kind: Kind, device: Device) -> Self {
        CheckpointReader { ckpt, files: HashMap::new(), used: BTreeSet::new(), kind, device }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    pub fn contains(&self, key: &str) -> bool {
        self.ckpt.entries.contains_key(key)
    }

    /// The stored dtype of `key`.
    pub fn stored_kind(&self, key: &str) -> Option<Kind> {
        self.ckpt.entries.get(key).and_then(|e| kind_of(e.dtype))
    }

    /// Reads `key` (file key), checks it has `shape`, converts to the target kind and device.
    pub fn read(&mut self, key: &str, shape: &[i64]) -> Result<Tensor> {
        self.read_as(key, shape, None)
    }

    /// As [`CheckpointReader::read`], converting to `kind` instead of the target kind when given.
    pub fn read_as(&mut self, key: &str, shape: &[i64], kind: Option<Kind>) -> Result<Tensor> {
        let entry = self
            .ckpt
            .entries
            .get(key)
            .ok_or_else(|| Error::MissingTensor {
                path: self.ckpt.dir.clone(),
                name: key.to_string(),
            })?
            .clone();
        if entry.shape != shape {
            return Err(Error::TensorShape {
                path: entry.file.clone(),
                name: key.to_string(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        if kind_of(entry.dtype).is_none() {
            return Err(Error::TensorDtype {
                path: entry.file.clone(),
                name: key.to_string(),
                dtype: format!("{:?}", entry.dtype),
            });
        }
        let tensor = self.read_raw(key, &entry)?;
        self.used.insert(key.to_string());
        let kind = kind.unwrap_or(self.kind);
        let t = if tensor.f_kind()? != kind { tensor.f_to_kind(kind)? } else { tensor };
        Ok(if self.device != Device::Cpu { t.f_to_device(self.device)? } else { t })
    }

    /// Reads a tensor as stored (no conversion), for pass-through buffers.
    pub fn read_stored(&mut self, key: &str) -> Result<Tensor> {
        let entry = self
            .ckpt
            .entries
            .get(key)
            .ok_or_else(|| Error::MissingTensor {
                path: self.ckpt.dir.clone(),
                name: key.to_string(),
            })?
            .clone();
        let t = self.read_raw(key, &entry)?;
        self.used.insert(key.to_string());
        Ok(t)
    }

    fn read_raw(&mut self, key: &str, entry: &TensorEntry) -> Result<Tensor> {
        let kind = match entry.dtype {
            Dtype::BOOL => Kind::Bool,
            Dtype::U8 => Kind::Uint8,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            d => kind_of(d).ok_or_else(|| Error::TensorDtype {
                path: entry.file.clone(),
                name: key.to_string(),
                dtype: format!("{d:?}"),
            })?,
        };
        if cfg!(target_endian = "big") {
            return Err(Error::invalid(
                "Checkpoint::read",
                "platform",
                "safetensors is little-endian; big-endian hosts are not supported",
            ));
        }
        let len = (entry.end - entry.start) as usize;
        let mut buf = vec![0u8; len];
        let file = match self.files.entry(entry.file.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&entry.file).map_err(|e| Error::io(&entry.file, e))?)
            }
        };
        file.seek(SeekFrom::Start(entry.start)).map_err(|e| Error::io(&entry.file, e))?;
        file.read_exact(&mut buf).map_err(|e| Error::io(&entry.file, e))?;
        Ok(Tensor::f_from_data_size(&buf, &entry.shape, kind)?)
    }

    /// Keys of the checkpoint that were not read.
    pub fn unused(&self) -> Vec<String> {
        self.ckpt.entries.keys().filter(|k| !self.used.contains(*k)).cloned().collect()
    }
}
