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
        if is_file(&single)? {
            ckpt.add_file(&single, None)?;
        } else if is_file(&index)? {
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
        let (header_end, header) = read_header(path)?;
        if self.metadata.is_none() {
            self.metadata = header.metadata;
        }
        for t in header.tensors {
            let name = t.name;
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
            let shape = t.shape.iter().map(|&d| d as i64).collect();
            let (s, e) = t.offsets;
            self.entries.insert(
                name,
                TensorEntry {
                    file: path.to_path_buf(),
                    dtype: t.dtype,
                    shape,
                    start: header_end + s,
                    end: header_end + e,
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

/// One tensor of a safetensors header.
#[derive(Debug)]
struct HeaderTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Offsets relative to the start of the data.
    offsets: (u64, u64),
}

/// A checked safetensors header.
#[derive(Debug)]
struct Header {
    metadata: Option<HashMap<String, String>>,
    /// Sorted by offset.
    tensors: Vec<HeaderTensor>,
}

/// The entries of a JSON object in file order, duplicates kept (serde_json's maps drop them).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

const NOT_SAFETENSORS: &str = "the file is damaged or not a safetensors file";

/// Reads and validates a safetensors header (length, UTF-8, JSON, duplicate names, dtypes,
/// offsets against shapes and each other, file length); returns the offset where the data
/// starts. Every problem is an [`Error::CorruptSafetensors`] or [`Error::TruncatedFile`] saying
/// what is wrong in words.
fn read_header(path: &Path) -> Result<(u64, Header)> {
    let corrupt = |tensor: Option<&str>, problem: String| Error::CorruptSafetensors {
        path: path.to_path_buf(),
        tensor: tensor.map(str::to_string),
        problem,
    };
    let mut f = File::open(path).map_err(|e| io_error(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(corrupt(
            None,
            format!(
                "the file has only {file_len} bytes, fewer than the 8-byte header length every \
                 safetensors file starts with: the file is truncated or not a safetensors file"
            ),
        ));
    }
    let mut n_bytes = [0u8; 8];
    f.read_exact(&mut n_bytes).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n_bytes);
    if n > file_len - 8 {
        return Err(corrupt(
            None,
            format!(
                "the header says it is {n} bytes long but the file has {file_len} bytes: the \
                 file is truncated or not a safetensors file"
            ),
        ));
    }
    // safetensors caps headers at 100 MB.
    if n > 100_000_000 {
        return Err(corrupt(
            None,
            format!(
                "the header says it is {n} bytes long, more than the 100 MB safetensors allows: \
                 {NOT_SAFETENSORS}"
            ),
        ));
    }
    if n < 2 {
        return Err(corrupt(
            None,
            format!(
                "the header is {n} bytes long, too short for the JSON object it must be: \
                 {NOT_SAFETENSORS}"
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&header).map_err(|e| {
        corrupt(
            None,
            format!(
                "the {n}-byte header is not UTF-8 text (bad byte at offset {} of it): \
                 {NOT_SAFETENSORS}",
                8 + e.valid_up_to()
            ),
        )
    })?;
    let entries: Entries = serde_json::from_str(text.trim_end_matches(' ')).map_err(|e| {
        corrupt(None, format!("the {n}-byte header is not a JSON object ({e}): {NOT_SAFETENSORS}"))
    })?;
    let mut metadata = None;
    let mut seen = BTreeSet::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(corrupt(
                Some(&name),
                format!(
                    "it is listed more than once in the header, so its data cannot be told \
                     apart: {NOT_SAFETENSORS}"
                ),
            ));
        }
        if name == "__metadata__" {
            let m: HashMap<String, String> = serde_json::from_value(value).map_err(|e| {
                corrupt(
                    None,
                    format!(
                        "the header's `__metadata__` is not an object of strings ({e}): \
                         {NOT_SAFETENSORS}"
                    ),
                )
            })?;
            metadata = Some(m);
            continue;
        }
        let raw: RawTensor = serde_json::from_value(value).map_err(|e| {
            corrupt(
                Some(&name),
                format!(
                    "its header entry is not {{\"dtype\", \"shape\", \"data_offsets\": [begin, \
                     end]}} ({e}): {NOT_SAFETENSORS}"
                ),
            )
        })?;
        let dtype: Dtype = serde_json::from_value(serde_json::Value::String(raw.dtype.clone()))
            .map_err(|_| {
                corrupt(Some(&name), format!("unknown dtype `{}`: {NOT_SAFETENSORS}", raw.dtype))
            })?;
        let (begin, end) = raw.data_offsets;
        if end < begin {
            return Err(corrupt(
                Some(&name),
                format!(
                    "its data_offsets [{begin}, {end}] end before they begin: {NOT_SAFETENSORS}"
                ),
            ));
        }
        let needed = raw
            .shape
            .iter()
            .try_fold(dtype.bitsize() as u128, |acc, &d| acc.checked_mul(d as u128))
            .map(|bits| bits.div_ceil(8));
        if needed != Some(u128::from(end - begin)) {
            let needed = needed.map_or("more than 2^128".to_string(), |b| b.to_string());
            return Err(corrupt(
                Some(&name),
                format!(
                    "its data_offsets [{begin}, {end}] hold {} bytes but shape {:?} of {dtype:?} \
                     needs {needed}: {NOT_SAFETENSORS}",
                    end - begin,
                    raw.shape
                ),
            ));
        }
        tensors.push(HeaderTensor { name, dtype, shape: raw.shape, offsets: (begin, end) });
    }
    tensors.sort_by_key(|t| t.offsets);
    let mut pos = 0u64;
    let mut prev: Option<&str> = None;
    for t in &tensors {
        let (begin, end) = t.offsets;
        if begin != pos {
            let problem = match (begin < pos, prev) {
                (true, Some(p)) => format!(
                    "its data_offsets [{begin}, {end}] overlap those of tensor `{p}`, which end \
                     at {pos}: {NOT_SAFETENSORS}"
                ),
                _ => format!(
                    "its data_offsets [{begin}, {end}] leave bytes {pos}..{begin} of the data \
                     unused (tensors must be packed one after another): {NOT_SAFETENSORS}"
                ),
            };
            return Err(corrupt(Some(&t.name), problem));
        }
        pos = end;
        prev = Some(&t.name);
    }
    let header_end = 8 + n;
    let expected = header_end + pos;
    if expected != file_len {
        return Err(Error::TruncatedFile { path: path.to_path_buf(), expected, actual: file_len });
    }
    Ok((header_end, Header { metadata, tensors }))
}

/// An I/O error on `path`, or [`Error::BrokenLink`] when a symbolic link on the way loops or
/// points to nothing.
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> Error {
    match broken_link(path) {
        Some(err) => err,
        None => Error::io(path, e),
    }
}

/// The first symbolic link on the way to `path` (its ancestors first) that loops or points to a
/// missing target.
pub(crate) fn broken_link(path: &Path) -> Option<Error> {
    let ancestors: Vec<&Path> = path.ancestors().collect();
    for p in ancestors.into_iter().rev() {
        if p.as_os_str().is_empty() {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return None;
        };
        if !meta.file_type().is_symlink() || std::fs::metadata(p).is_ok() {
            continue;
        }
        // Follow the chain by hand to say which of the two it is.
        let mut chain = vec![p.to_path_buf()];
        let mut cur = p.to_path_buf();
        for _ in 0..40 {
            let Ok(target) = std::fs::read_link(&cur) else { break };
            let next = match cur.parent() {
                Some(parent) if target.is_relative() => parent.join(&target),
                _ => target,
            };
            let looped = chain.iter().any(|c| same_place(c, &next));
            chain.push(next.clone());
            let shown: Vec<String> = chain.iter().map(|c| c.display().to_string()).collect();
            if looped {
                return Some(Error::BrokenLink {
                    path: p.to_path_buf(),
                    problem: format!(
                        "it is a loop of symbolic links ({}), so it leads to no file; make the \
                         link point to the real file or folder",
                        shown.join(" -> ")
                    ),
                });
            }
            match std::fs::symlink_metadata(&next) {
                Ok(m) if m.file_type().is_symlink() => cur = next,
                Ok(_) => break,
                Err(_) => {
                    return Some(Error::BrokenLink {
                        path: p.to_path_buf(),
                        problem: format!(
                            "it is a symbolic link to {}, which does not exist ({})",
                            next.display(),
                            shown.join(" -> ")
                        ),
                    });
                }
            }
        }
        return Some(Error::BrokenLink {
            path: p.to_path_buf(),
            problem: "it is a symbolic link that cannot be followed (too many links, or a loop)"
                .into(),
        });
    }
    None
}

/// Whether two paths name the same place, comparing their parents' canonical forms.
fn same_place(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            parent.canonicalize().map(|c| c.join(name)).unwrap_or_else(|_| p.to_path_buf())
        }
        _ => p.to_path_buf(),
    };
    norm(a) == norm(b)
}

/// Whether `path` is a file; `false` when nothing is there; a broken link or another I/O error
/// is an error (not "missing").
fn is_file(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.is_file()),
        Err(e) => match broken_link(path) {
            Some(err) => Err(err),
            None if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            None => Err(Error::io(path, e)),
        },
    }
}

/// Reads every tensor of one safetensors file (checked as checkpoints are), as stored.
///
/// # Errors
/// [`Error::Io`], [`Error::BrokenLink`], [`Error::CorruptSafetensors`], [`Error::TruncatedFile`]
/// (all naming the file, and the tensor where one is at fault), [`Error::TensorDtype`] for a
/// dtype libtorch has no kind for; [`Error::Tch`].
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut ckpt = Checkpoint { dir, entries: BTreeMap::new(), metadata: None, files: vec![] };
    ckpt.add_file(path, None)?;
    let names: Vec<String> = ckpt.entries.keys().cloned().collect();
    let mut reader = CheckpointReader::new(ckpt, Kind::Float, Device::Cpu);
    names
        .into_iter()
        .map(|n| {
            let t = reader.read_stored(&n)?;
            Ok((n, t))
        })
        .collect()
}

/// [`Error::NonFiniteWeights`] when `converted` (the weight as the model will use it) holds NaN
/// or ±inf, saying whether the stored values were already non-finite or overflowed the dtype.
fn check_finite_weight(file: &Path, name: &str, stored: &Tensor, converted: &Tensor) -> Result<()> {
    if bool::try_from(converted.f_isfinite()?.f_all()?)? {
        return Ok(());
    }
    let bad = converted.f_isfinite()?.f_logical_not()?;
    let count = i64::try_from(bad.f_sum(Kind::Int64)?)?;
    let flat_first = i64::try_from(bad.f_flatten(0, -1)?.f_nonzero()?.f_get(0)?.f_get(0)?)?;
    // The multi-index of the first offending entry, row-major.
    let mut index = vec![0i64; converted.dim()];
    let mut rest = flat_first;
    for (d, &n) in converted.size().iter().enumerate().rev() {
        index[d] = rest % n.max(1);
        rest /= n.max(1);
    }
    let value = converted.f_flatten(0, -1)?.f_double_value(&[flat_first])?;
    let stored_finite = bool::try_from(stored.f_isfinite()?.f_all()?)?;
    let dtype = crate::model::kind_name;
    let overflow = stored_finite.then(|| (dtype(stored.kind()), dtype(converted.kind())));
    Err(Error::NonFiniteWeights {
        path: file.to_path_buf(),
        name: name.to_string(),
        count,
        index,
        value,
        overflow,
    })
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
    check_finite: bool,
}

impl CheckpointReader {
    pub fn new(ckpt: Checkpoint, kind: Kind, device: Device) -> Self {
        CheckpointReader {
            ckpt,
            files: HashMap::new(),
            used: BTreeSet::new(),
            kind,
            device,
            check_finite: false,
        }
    }

    /// Makes [`read`](Self::read) refuse floating-point tensors that hold NaN or ±inf.
    pub fn check_finite(&mut self, on: bool) {
        self.check_finite = on;
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
        let stored = tensor.f_kind()?;
        let t = if stored != kind { tensor.f_to_kind(kind)? } else { tensor.shallow_clone() };
        if self.check_finite
            && matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
        {
            check_finite_weight(&entry.file, key, &tensor, &t)?;
        }
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
