//! Output paths that never touch the inputs, and writes that are atomic and safe to interrupt.
//!
//! Every file and folder amend writes goes through this module:
//!
//! * [`check_outputs`] refuses, before any work, an output that is, contains or sits inside an
//!   input (compared on canonical paths: symbolic links, `..` and not-yet-existing outputs are
//!   resolved through their nearest existing ancestor; hard links to an input file are caught by
//!   file identity), two outputs that overlap, an output that is a symbolic link, and an existing
//!   non-empty folder that is not an earlier amend output.
//! * [`Staged`] assembles an output in a hidden staging folder next to it
//!   (`.amend-tmp-<pid>-XXXXXX`) and renames it into place only when it is complete. The staging
//!   folder holds an owner file (`.amend-owner`: process id, process start time, boot id, target)
//!   so that a later run can tell a dead run's leftovers from a live run's work.
//! * [`abandon_in_flight`] removes every unfinished output of this process; the `amend` binary
//!   calls it when it receives SIGINT or SIGTERM. [`remove_stale_stages`] removes the staging
//!   folders of runs that died without cleaning up (SIGKILL, power loss); [`Staged`] calls it on
//!   the folder it writes into.
//!
//! A folder amend writes holds [`OUTPUT_MARKER`] (`amend_output.json`), which lists the files
//! amend put there. Such a folder may be replaced by a later run only while it holds exactly
//! those files: a file a user added is never deleted, the run is refused instead.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// The file amend writes into every output folder, listing the files it wrote there.
pub const OUTPUT_MARKER: &str = "amend_output.json";

/// Prefix of the staging folders (hidden siblings of the output).
pub const STAGE_PREFIX: &str = ".amend-tmp-";

/// The owner file inside a staging folder.
const OWNER_FILE: &str = ".amend-owner";
/// The new output inside a staging folder.
const NEW: &str = "new";
/// An output being replaced, moved aside inside the staging folder.
const OLD: &str = "old";

/// Why an output path is refused or could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The output path is refused (it overlaps an input, exists, is a symbolic link, …).
    #[error("{label} {path}: {reason}")]
    Refused {
        /// What the path is (a command-line flag such as `--out`, or `output`).
        label: String,
        /// The path as given.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// Writing the output failed.
    #[error("cannot write {label} {target}: {doing}: {source}")]
    Io {
        /// What the path is (a command-line flag such as `--out`, or `output`).
        label: String,
        /// The output path as given.
        target: PathBuf,
        /// What failed, naming the file involved.
        doing: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, OutputError>;

/// Whether an output is a file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A single file (replaced atomically if it exists).
    File,
    /// A folder.
    Dir,
}

/// How earlier amend outputs written before [`OUTPUT_MARKER`] existed are recognised: `marker`
/// must exist in the folder and every entry must satisfy `known`.
#[derive(Debug, Clone, Copy)]
pub struct Legacy {
    /// A file every such output holds (e.g. `results.json`, `amend_edit.json`).
    pub marker: &'static str,
    /// Whether a file name is one such an output may hold.
    pub known: fn(&str) -> bool,
}

/// What to do with an existing output.
#[derive(Debug, Clone, Copy)]
pub enum Existing<'a> {
    /// Refuse it; `hint` says what to do (e.g. "pass --overwrite to replace it").
    Refuse {
        /// What the user can do.
        hint: &'a str,
    },
    /// Replace an empty folder or an earlier amend output that holds only amend's files;
    /// refuse anything else.
    ReplaceAmendOutput {
        /// Earlier outputs without [`OUTPUT_MARKER`] that may be replaced too.
        legacy: Option<Legacy>,
    },
    /// Replace an existing file (file outputs only).
    ReplaceFile,
}

/// One output of a command, for [`check_outputs`].
#[derive(Debug, Clone, Copy)]
pub struct OutputSpec<'a> {
    /// The flag that names it (`--out`, `--metrics`).
    pub label: &'a str,
    /// The path as given.
    pub path: &'a Path,
    /// File or folder.
    pub kind: OutputKind,
    /// What to do if it exists.
    pub existing: Existing<'a>,
}

fn refused(label: &str, path: &Path, reason: impl Into<String>) -> OutputError {
    OutputError::Refused { label: label.into(), path: path.to_path_buf(), reason: reason.into() }
}

fn io_err(label: &str, target: &Path, doing: String, source: std::io::Error) -> OutputError {
    OutputError::Io { label: label.into(), target: target.to_path_buf(), doing, source }
}

/// The canonical form of `path`, which need not exist: its nearest existing ancestor is
/// canonicalised (resolving symbolic links) and the rest is appended with `.` and `..` resolved
/// lexically (they name nothing that exists, so no link can hide among them).
///
/// # Errors
/// The error of canonicalising the existing ancestor (a symbolic-link loop, a dangling link, no
/// permission) or of reading the current directory.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mut existing = abs.as_path();
    let mut tail: Vec<Component<'_>> = Vec::new();
    loop {
        if existing.symlink_metadata().is_ok() {
            break;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                tail.push(last);
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize()?;
    for c in tail.into_iter().rev() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

fn shown(given: &Path, resolved: &Path) -> String {
    match std::path::absolute(given) {
        Ok(a) if a == resolved => given.display().to_string(),
        _ => format!("{} (resolved: {})", given.display(), resolved.display()),
    }
}

/// Refuses `out` (named by `label`) if it is, contains or sits inside one of `inputs` (flag,
/// path): compared on [`resolve`]d paths and, for existing files, on file identity. Inputs that
/// do not exist are skipped (reading them reports them). Returns the resolved output path.
///
/// # Errors
/// [`OutputError::Refused`].
pub fn check_disjoint(label: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<PathBuf> {
    let o = resolve(out)
        .map_err(|e| refused(label, out, format!("cannot resolve the path ({e}); check it")))?;
    for (ilabel, input) in inputs {
        if input.symlink_metadata().is_err() {
            continue;
        }
        let Ok(i) = resolve(input) else { continue };
        let relation = if o == i || same_file(&o, &i) {
            "is"
        } else if o.starts_with(&i) {
            "is inside"
        } else if i.starts_with(&o) {
            "contains"
        } else {
            continue;
        };
        return Err(refused(
            label,
            out,
            format!(
                "it {relation} the input {ilabel} {}; choose a {label} outside every input",
                shown(input, &i)
            ),
        ));
    }
    Ok(o)
}

/// The names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        v.push(e?.file_name().to_string_lossy().into_owned());
    }
    v.sort();
    Ok(v)
}

/// The contents of [`OUTPUT_MARKER`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    written_by: String,
    files: Vec<String>,
    #[serde(default)]
    note: String,
}

fn list_some(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s += &format!(" and {} more", names.len() - 5);
    }
    s
}

/// Whether the existing folder `dir` may be replaced: it is empty, or an earlier amend output
/// holding only the files amend wrote there (listed in its [`OUTPUT_MARKER`], or recognised by
/// `legacy`).
///
/// # Errors
/// [`OutputError::Refused`] naming the foreign files, or saying the folder is not an amend
/// output.
pub fn check_replaceable(label: &str, dir: &Path, legacy: Option<&Legacy>) -> Result<()> {
    let names = entries(dir)
        .map_err(|e| refused(label, dir, format!("cannot list the existing folder ({e})")))?;
    if names.is_empty() {
        return Ok(());
    }
    let foreign: Vec<String> = if let Ok(text) = std::fs::read_to_string(dir.join(OUTPUT_MARKER)) {
        let marker: Marker = serde_json::from_str(&text).map_err(|e| {
            refused(label, dir, format!("its {OUTPUT_MARKER} is not valid ({e}); choose another {label} or remove the folder yourself"))
        })?;
        let ours: BTreeSet<&str> = marker.files.iter().map(String::as_str).collect();
        names
            .iter()
            .filter(|n| *n != OUTPUT_MARKER && !ours.contains(n.as_str()))
            .cloned()
            .collect()
    } else if let Some(l) = legacy.filter(|l| dir.join(l.marker).is_file()) {
        names.iter().filter(|n| !(l.known)(n)).cloned().collect()
    } else {
        return Err(refused(
            label,
            dir,
            format!(
                "it exists, is not empty and is not an earlier amend output (it has no \
                 {OUTPUT_MARKER}); choose another {label}, or empty or remove the folder yourself"
            ),
        ));
    };
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(refused(
            label,
            dir,
            format!(
                "it is an earlier amend output but also holds files amend did not write ({}); \
                 move them out first or choose another {label}",
                list_some(&foreign)
            ),
        ))
    }
}

/// Checks every output of a command before any work: none is, contains or sits inside an input
/// or another output; none is a symbolic link; a file output is not a folder and a folder output
/// is not a file; an existing output is handled as its [`Existing`] says. Returns the resolved
/// paths, in order.
///
/// # Errors
/// [`OutputError::Refused`] naming the flag, the path and what to do.
pub fn check_outputs(outputs: &[OutputSpec<'_>], inputs: &[(&str, &Path)]) -> Result<Vec<PathBuf>> {
    let mut resolved = Vec::with_capacity(outputs.len());
    for (n, spec) in outputs.iter().enumerate() {
        let (label, path) = (spec.label, spec.path);
        if path.as_os_str().is_empty() {
            return Err(refused(label, path, "the path is empty; give a file or folder name"));
        }
        let r = check_disjoint(label, path, inputs)?;
        for other in &outputs[..n] {
            let o = resolve(other.path).unwrap_or_else(|_| other.path.to_path_buf());
            let relation = if o == r {
                "is"
            } else if r.starts_with(&o) {
                "is inside"
            } else if o.starts_with(&r) {
                "contains"
            } else {
                continue;
            };
            let why = if other.kind == OutputKind::Dir {
                " (that folder is written as a whole)"
            } else {
                ""
            };
            return Err(refused(
                label,
                path,
                format!(
                    "it {relation} the output {} {}{why}; choose a {label} outside it",
                    other.label,
                    other.path.display()
                ),
            ));
        }
        check_writable(label, path, &r)?;
        if let Ok(meta) = path.symlink_metadata() {
            if meta.file_type().is_symlink() {
                return Err(refused(
                    label,
                    path,
                    "it is a symbolic link; give the path it points to, or another path",
                ));
            }
            match (spec.kind, meta.is_dir()) {
                (OutputKind::File, true) => {
                    return Err(refused(label, path, "it is a folder; give a file name"));
                }
                (OutputKind::Dir, false) => {
                    return Err(refused(
                        label,
                        path,
                        format!("it exists and is not a folder; choose another {label}"),
                    ));
                }
                _ => {}
            }
            match spec.existing {
                Existing::Refuse { hint } => {
                    return Err(refused(label, path, format!("it exists; {hint}")));
                }
                Existing::ReplaceAmendOutput { legacy } => {
                    check_replaceable(label, path, legacy.as_ref())?;
                }
                Existing::ReplaceFile => {}
            }
        }
        resolved.push(r);
    }
    Ok(resolved)
}

/// Refuses an output whose folder cannot be created or written: the nearest existing ancestor of
/// its parent must be a folder in which a staging folder can be made (made and removed here).
fn check_writable(label: &str, given: &Path, resolved: &Path) -> Result<()> {
    let mut anc = resolved.parent().unwrap_or(resolved);
    while anc.symlink_metadata().is_err() {
        match anc.parent() {
            Some(p) => anc = p,
            None => break,
        }
    }
    if !anc.is_dir() {
        return Err(refused(
            label,
            given,
            format!(
                "it cannot be created: {} is not a folder; choose another {label}",
                anc.display()
            ),
        ));
    }
    tempfile::Builder::new()
        .prefix(&format!("{STAGE_PREFIX}probe-"))
        .tempdir_in(anc)
        .map(drop)
        .map_err(|e| {
            refused(
                label,
                given,
                format!(
                    "it cannot be written: cannot create files in {} ({e}); choose another {label}",
                    anc.display()
                ),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// In-flight outputs of this process (for the signal handler).

/// Something this process must undo if it is interrupted.
#[derive(Debug)]
enum Entry {
    /// A staging folder: removed.
    Stage(PathBuf),
    /// An output committed inside an open [`Transaction`]: the new output is at `target`, the
    /// one it replaced (if any) in `root/old`. Undone by removing `target` and putting the old
    /// one back; confirmed by removing `root`.
    Committed { root: PathBuf, target: PathBuf },
    /// An output this run created and has not confirmed yet: removed.
    Created(PathBuf),
}

#[derive(Debug)]
struct Registry {
    entries: Vec<(u64, Entry)>,
    /// The entries committed in the open transaction, if one is open.
    transaction: Option<Vec<u64>>,
}

static IN_FLIGHT: Mutex<Registry> = Mutex::new(Registry { entries: Vec::new(), transaction: None });
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn registry() -> MutexGuard<'static, Registry> {
    IN_FLIGHT.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn register(reg: &mut Registry, e: Entry) -> u64 {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    reg.entries.push((id, e));
    id
}

fn unregister(reg: &mut Registry, id: u64) -> Option<Entry> {
    let at = reg.entries.iter().position(|(i, _)| *i == id)?;
    Some(reg.entries.remove(at).1)
}

fn undo(e: Entry) {
    match e {
        Entry::Stage(root) => remove_stage(&root),
        Entry::Committed { root, target } => {
            remove_all(&target);
            let old = root.join(OLD);
            if old.symlink_metadata().is_ok() {
                let _ = std::fs::rename(&old, &target);
            }
            remove_stage(&root);
        }
        Entry::Created(p) => remove_all(&p),
    }
}

/// All-or-nothing for commands that write several outputs: while a transaction is open, every
/// output [`Staged::commit`] puts in place (in this process, by any library) stays undoable: an
/// output it replaced is kept aside. [`Transaction::confirm`] keeps the new outputs; dropping
/// the transaction unconfirmed (an error), or an interruption ([`abandon_in_flight`]), removes
/// them and puts back what they replaced.
#[derive(Debug)]
#[must_use = "the outputs are undone when the transaction is dropped without confirm()"]
pub struct Transaction {
    owner: bool,
    confirmed: bool,
}

impl Transaction {
    /// Opens a transaction (inside an open one, joins it: the outer one decides).
    pub fn begin() -> Self {
        let mut reg = registry();
        let owner = reg.transaction.is_none();
        if owner {
            reg.transaction = Some(Vec::new());
        }
        Transaction { owner, confirmed: false }
    }

    /// Keeps every output committed in the transaction.
    pub fn confirm(mut self) {
        self.confirmed = true;
        if self.owner {
            let mut reg = registry();
            for id in reg.transaction.take().unwrap_or_default() {
                if let Some(Entry::Committed { root, .. }) = unregister(&mut reg, id) {
                    remove_stage(&root);
                }
            }
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.owner && !self.confirmed {
            let mut reg = registry();
            for id in reg.transaction.take().unwrap_or_default().into_iter().rev() {
                if let Some(e) = unregister(&mut reg, id) {
                    undo(e);
                }
            }
        }
    }
}

/// Removes `path` (file or folder), retrying while another thread still adds files to it.
fn remove_all(path: &Path) {
    for _ in 0..50 {
        let res = match path.symlink_metadata() {
            Err(_) => return,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
        };
        if res.is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Removes every unfinished output of this process (staging folders, and outputs created but
/// not yet confirmed), waiting for a rename in progress to finish, and blocks every later write
/// of this process. Returns how many were removed. For a signal handler, which then ends the
/// process.
pub fn abandon_in_flight() -> usize {
    let mut reg = registry();
    let n = reg.entries.len();
    reg.transaction = None;
    for (_, e) in reg.entries.drain(..).rev() {
        undo(e);
    }
    // Keep the lock: no staging folder can be created or committed after this.
    std::mem::forget(reg);
    n
}

/// Removes a staging folder, its owner file last (so a half-removed one is still recognised).
fn remove_stage(root: &Path) {
    for sub in [NEW, OLD] {
        remove_all(&root.join(sub));
    }
    if let Ok(names) = entries(root) {
        for n in names.iter().filter(|n| *n != OWNER_FILE) {
            remove_all(&root.join(n));
        }
    }
    remove_all(root);
}

/// An output this run created, removed again unless [`CreatedGuard::keep`] is called (on an
/// error, or when the process is interrupted). Used when a command writes more than one output:
/// the first one is taken back if a later one fails.
#[derive(Debug)]
#[must_use = "the output is removed when the guard is dropped without keep()"]
pub struct CreatedGuard {
    id: u64,
    path: PathBuf,
    kept: bool,
}

impl CreatedGuard {
    /// Guards `path`. Register it before the output is created only if nothing existed there
    /// (or the user's earlier output would be removed on an interruption).
    pub fn new(path: &Path) -> Self {
        let id = register(&mut registry(), Entry::Created(path.to_path_buf()));
        CreatedGuard { id, path: path.to_path_buf(), kept: false }
    }

    /// Keeps the output.
    pub fn keep(mut self) {
        self.kept = true;
        unregister(&mut registry(), self.id);
    }
}

impl Drop for CreatedGuard {
    fn drop(&mut self) {
        if !self.kept {
            let mut reg = registry();
            if unregister(&mut reg, self.id).is_some() {
                remove_all(&self.path);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Owner files and stale staging folders.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Owner {
    pid: u32,
    start: Option<u64>,
    boot: Option<String>,
    target: PathBuf,
}

/// Start time of process `pid` (clock ticks since boot, `/proc/<pid>/stat` field 22).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// Whether the run that wrote `owner` is certainly gone (false when it cannot be told, e.g.
/// without `/proc`).
fn owner_is_dead(owner: &Owner) -> bool {
    let (Some(boot), Some(start)) = (boot_id(), owner.start) else { return false };
    if owner.boot.as_deref() != Some(boot.as_str()) {
        return true;
    }
    match process_start(owner.pid) {
        Some(s) => s != start,
        None => Path::new("/proc/self/stat").exists(),
    }
}

/// Removes the staging folders in `dir` left by amend runs that died without cleaning up
/// (killed with SIGKILL, power loss): only folders named `.amend-tmp-*` whose owner file names
/// a process that no longer runs. An output that was being replaced when its run died is put
/// back first if nothing has taken its place. Returns the folders removed.
pub fn remove_stale_stages(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(names) = entries(dir) else { return removed };
    for name in names.iter().filter(|n| n.starts_with(STAGE_PREFIX)) {
        let root = dir.join(name);
        if !root.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(root.join(OWNER_FILE)) else { continue };
        let Ok(owner) = serde_json::from_str::<Owner>(&text) else { continue };
        if !owner_is_dead(&owner) {
            continue;
        }
        let old = root.join(OLD);
        if old.exists() && owner.target.symlink_metadata().is_err() {
            let _ = std::fs::rename(&old, &owner.target);
        }
        remove_stage(&root);
        tracing::warn!(
            "removed {} left by an interrupted amend run (process {})",
            root.display(),
            owner.pid
        );
        removed.push(root);
    }
    removed
}

// ---------------------------------------------------------------------------------------------
// Staged writes.

/// What [`Staged::commit`] may do with an existing output.
#[derive(Debug, Clone, Copy)]
pub enum Replace {
    /// Fail if the output exists.
    Never,
    /// Replace an empty folder or an earlier amend output holding only amend's files
    /// ([`check_replaceable`]).
    AmendOutput(Option<Legacy>),
    /// Replace whatever is there (a file, or a folder and everything in it).
    Any,
}

/// An output being assembled in a staging folder next to it, renamed into place by
/// [`Staged::commit`] once complete. Dropped without commit (an error), or when the process is
/// interrupted ([`abandon_in_flight`]), the staging folder is removed and the output is left as
/// it was.
#[derive(Debug)]
pub struct Staged {
    id: u64,
    root: PathBuf,
    content: PathBuf,
    target: PathBuf,
    given: PathBuf,
    label: String,
    kind: OutputKind,
    done: bool,
}

impl Staged {
    /// Starts a staged folder output at `target` (named `label` in messages). The parent folder
    /// is created; stale staging folders of dead runs in it are removed.
    ///
    /// # Errors
    /// [`OutputError::Io`] naming `target`.
    pub fn dir(label: &str, target: &Path) -> Result<Self> {
        Self::new(label, target, OutputKind::Dir)
    }

    /// Starts a staged file output at `target` (see [`Staged::dir`]).
    ///
    /// # Errors
    /// [`OutputError::Io`] naming `target`.
    pub fn file(label: &str, target: &Path) -> Result<Self> {
        Self::new(label, target, OutputKind::File)
    }

    fn new(label: &str, given: &Path, kind: OutputKind) -> Result<Self> {
        let err = |doing: String, e: std::io::Error| io_err(label, given, doing, e);
        let abs =
            std::path::absolute(given).map_err(|e| err("cannot resolve the path".into(), e))?;
        let name = abs
            .file_name()
            .ok_or_else(|| refused(label, given, "the path has no file or folder name"))?
            .to_owned();
        let parent = abs.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        std::fs::create_dir_all(&parent)
            .map_err(|e| err(format!("cannot create the folder {}", parent.display()), e))?;
        let parent = resolve(&parent)
            .map_err(|e| err(format!("cannot resolve the folder {}", parent.display()), e))?;
        let target = parent.join(name);
        remove_stale_stages(&parent);
        let mut reg = registry();
        let root = tempfile::Builder::new()
            .prefix(&format!("{STAGE_PREFIX}{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(|e| {
                err(format!("cannot create a temporary folder in {}", parent.display()), e)
            })?
            .keep();
        let id = register(&mut reg, Entry::Stage(root.clone()));
        drop(reg);
        let staged = Staged {
            id,
            content: root.join(NEW),
            root,
            target,
            given: given.to_path_buf(),
            label: label.into(),
            kind,
            done: false,
        };
        let me = std::process::id();
        let owner = Owner {
            pid: me,
            start: process_start(me),
            boot: boot_id(),
            target: staged.target.clone(),
        };
        let owner_path = staged.root.join(OWNER_FILE);
        let bytes = serde_json::to_vec_pretty(&owner).map_err(std::io::Error::other);
        bytes
            .and_then(|b| std::fs::write(&owner_path, b))
            .map_err(|e| staged.io(format!("cannot write {}", owner_path.display()), e))?;
        if kind == OutputKind::Dir {
            std::fs::create_dir(&staged.content)
                .map_err(|e| staged.io(format!("cannot create {}", staged.content.display()), e))?;
        }
        Ok(staged)
    }

    fn io(&self, doing: String, e: std::io::Error) -> OutputError {
        io_err(&self.label, &self.given, doing, e)
    }

    /// Where to write: the staging folder (for [`Staged::dir`]) or the staging file (for
    /// [`Staged::file`]).
    pub fn path(&self) -> &Path {
        &self.content
    }

    /// The final path (absolute, parent canonicalised).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `bytes` to `name` in a staged folder, synced.
    ///
    /// # Errors
    /// [`OutputError::Io`].
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.content.join(name);
        let res = std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
        res.map_err(|e| self.io(format!("cannot write {name}"), e))
    }

    /// Moves the complete output into place (for a folder, after writing [`OUTPUT_MARKER`]
    /// listing its files). An existing output is dealt with as `replace` says, and removed only
    /// once the new one is in place. Returns the final path.
    ///
    /// # Errors
    /// [`OutputError::Refused`] for an existing output `replace` does not allow;
    /// [`OutputError::Io`] naming the output.
    pub fn commit(mut self, replace: Replace) -> Result<PathBuf> {
        if self.kind == OutputKind::Dir {
            let files = entries(&self.content)
                .map_err(|e| self.io(format!("cannot list {}", self.content.display()), e))?;
            let marker = Marker {
                written_by: format!("amend {}", env!("CARGO_PKG_VERSION")),
                files,
                note: "amend replaces this folder only while it holds exactly these files".into(),
            };
            let bytes = serde_json::to_vec_pretty(&marker).map_err(std::io::Error::other);
            bytes
                .and_then(|b| {
                    let mut f = std::fs::File::create(self.content.join(OUTPUT_MARKER))?;
                    f.write_all(&b)?;
                    f.sync_all()
                })
                .map_err(|e| self.io(format!("cannot write {OUTPUT_MARKER}"), e))?;
            if let Ok(d) = std::fs::File::open(&self.content) {
                let _ = d.sync_all();
            }
        }
        let mut reg = registry();
        let in_transaction = reg.transaction.is_some();
        let existing = self.target.symlink_metadata().ok();
        let mut moved_old = false;
        if let Some(meta) = existing {
            match replace {
                Replace::Never => {
                    return Err(refused(&self.label, &self.given, "it exists"));
                }
                Replace::AmendOutput(legacy) => {
                    if meta.is_dir() {
                        check_replaceable(&self.label, &self.target, legacy.as_ref())?;
                    }
                }
                Replace::Any => {}
            }
            if meta.is_dir() != (self.kind == OutputKind::Dir) {
                return Err(refused(
                    &self.label,
                    &self.given,
                    if meta.is_dir() { "it is a folder" } else { "it exists and is not a folder" },
                ));
            }
            // A file is renamed over atomically, except in a transaction, which must be able to
            // put it back.
            if meta.is_dir() || in_transaction {
                std::fs::rename(&self.target, self.root.join(OLD)).map_err(|e| {
                    self.io(format!("cannot move the existing {} aside", self.target.display()), e)
                })?;
                moved_old = true;
            }
        }
        if let Err(e) = std::fs::rename(&self.content, &self.target) {
            if moved_old {
                let _ = std::fs::rename(self.root.join(OLD), &self.target);
            }
            return Err(self.io(
                format!("cannot move the new output into place as {}", self.target.display()),
                e,
            ));
        }
        self.done = true;
        unregister(&mut reg, self.id);
        if let Some(list) = reg.transaction.as_mut() {
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            list.push(id);
            let entry = Entry::Committed { root: self.root.clone(), target: self.target.clone() };
            reg.entries.push((id, entry));
        } else {
            remove_stage(&self.root);
        }
        drop(reg);
        if let Some(parent) = self.target.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        Ok(self.target.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = registry();
            if unregister(&mut reg, self.id).is_some() {
                remove_stage(&self.root);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transactions are process-wide: the tests that write take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refuse_reason(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(OutputError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn resolve_handles_missing_tails_dots_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("real")).unwrap();
        assert_eq!(resolve(&base.join("real/a/b/../c/./d")).unwrap(), base.join("real/a/c/d"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
            assert_eq!(resolve(&base.join("link/new")).unwrap(), base.join("real/new"));
            assert_eq!(resolve(&base.join("link")).unwrap(), base.join("real"));
        }
    }

    #[test]
    fn outputs_overlapping_inputs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let data = tmp.path().join("data.jsonl");
        std::fs::write(&data, "").unwrap();
        let inputs = [("--model", model.as_path()), ("--data", data.as_path())];
        for (out, relation) in [
            (model.clone(), "it is the input --model"),
            (model.join("sub/out"), "it is inside the input --model"),
            (tmp.path().to_path_buf(), "it contains the input --model"),
            (data.clone(), "it is the input --data"),
            (model.join("config.json"), "it is inside the input --model"),
            (tmp.path().join("x/../model"), "it is the input --model"),
        ] {
            let reason = refuse_reason(check_disjoint("--out", &out, &inputs));
            assert!(reason.starts_with(relation), "{}: {reason}", out.display());
        }
        assert!(check_disjoint("--out", &tmp.path().join("out"), &inputs).is_ok());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&model, tmp.path().join("alias")).unwrap();
            let reason =
                refuse_reason(check_disjoint("--out", &tmp.path().join("alias/x"), &inputs));
            assert!(reason.contains("is inside the input --model"), "{reason}");
            std::fs::hard_link(&data, tmp.path().join("hard.jsonl")).unwrap();
            let reason =
                refuse_reason(check_disjoint("--out", &tmp.path().join("hard.jsonl"), &inputs));
            assert!(reason.starts_with("it is the input --data"), "{reason}");
        }
    }

    #[test]
    fn existing_outputs_are_replaced_only_when_amend_wrote_everything_in_them() {
        let _serial = serial();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let spec =
            |existing| OutputSpec { label: "--out", path: &out, kind: OutputKind::Dir, existing };
        let replace = Existing::ReplaceAmendOutput { legacy: None };
        assert!(check_outputs(&[spec(replace)], &[]).is_ok());
        std::fs::create_dir(&out).unwrap();
        assert!(check_outputs(&[spec(replace)], &[]).is_ok(), "an empty folder is replaceable");
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let reason = refuse_reason(check_outputs(&[spec(replace)], &[]));
        assert!(reason.contains("is not an earlier amend output"), "{reason}");
        std::fs::remove_file(out.join("notes.txt")).unwrap();

        let staged = Staged::dir("--out", &out).unwrap();
        staged.write_file("report.md", b"r").unwrap();
        staged.commit(Replace::AmendOutput(None)).unwrap();
        assert!(out.join(OUTPUT_MARKER).is_file());
        assert!(check_outputs(&[spec(replace)], &[]).is_ok());
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let reason = refuse_reason(check_outputs(&[spec(replace)], &[]));
        assert!(reason.contains("files amend did not write (notes.txt)"), "{reason}");
        let staged = Staged::dir("--out", &out).unwrap();
        staged.write_file("report.md", b"new").unwrap();
        assert!(staged.commit(Replace::AmendOutput(None)).is_err());
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
        assert_eq!(std::fs::read(out.join("report.md")).unwrap(), b"r");
        assert_eq!(entries(tmp.path()).unwrap(), vec!["out"], "no staging folder left");

        let reason = refuse_reason(check_outputs(
            &[spec(Existing::Refuse { hint: "pass --overwrite" })],
            &[],
        ));
        assert_eq!(reason, "it exists; pass --overwrite");

        // Legacy outputs: recognised by their marker file and known names.
        let legacy = Legacy {
            marker: "results.json",
            known: |n| ["results.json", "report.md"].contains(&n),
        };
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("results.json"), "{}").unwrap();
        assert!(check_replaceable("--out", &old, Some(&legacy)).is_ok());
        std::fs::write(old.join("model.safetensors"), "x").unwrap();
        assert!(check_replaceable("--out", &old, Some(&legacy)).is_err());
    }

    #[test]
    fn outputs_may_not_overlap_each_other_or_be_links_or_the_wrong_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let metrics = out.join("m.json");
        let dir = |p| OutputSpec {
            label: "--out",
            path: p,
            kind: OutputKind::Dir,
            existing: Existing::ReplaceAmendOutput { legacy: None },
        };
        let file = |p| OutputSpec {
            label: "--metrics",
            path: p,
            kind: OutputKind::File,
            existing: Existing::ReplaceFile,
        };
        let reason = refuse_reason(check_outputs(&[dir(&out), file(&metrics)], &[]));
        assert!(reason.contains("is inside the output --out"), "{reason}");
        let reason = refuse_reason(check_outputs(&[dir(&out), file(&out)], &[]));
        assert!(reason.starts_with("it is the output --out"), "{reason}");
        std::fs::create_dir(&out).unwrap();
        let reason = refuse_reason(check_outputs(&[file(&out)], &[]));
        assert!(reason.contains("is a folder"), "{reason}");
        let f = tmp.path().join("f");
        std::fs::write(&f, "").unwrap();
        let reason = refuse_reason(check_outputs(&[dir(&f)], &[]));
        assert!(reason.contains("is not a folder"), "{reason}");
        assert!(check_outputs(&[file(&f)], &[]).is_ok());
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&out, &link).unwrap();
            let reason = refuse_reason(check_outputs(&[dir(&link)], &[]));
            assert!(reason.contains("symbolic link"), "{reason}");
        }
    }

    #[test]
    fn dropped_and_abandoned_stages_leave_nothing() {
        let _serial = serial();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        {
            let staged = Staged::dir("--out", &out).unwrap();
            staged.write_file("a", b"1").unwrap();
        }
        assert_eq!(entries(tmp.path()).unwrap(), Vec::<String>::new());
        let f = Staged::file("--out", &tmp.path().join("x.bin")).unwrap();
        std::fs::write(f.path(), b"1").unwrap();
        let target = f.commit(Replace::Any).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"1");
        assert_eq!(entries(tmp.path()).unwrap(), vec!["x.bin"]);

        // A guard removes an output unless kept.
        let made = tmp.path().join("made");
        std::fs::create_dir(&made).unwrap();
        drop(CreatedGuard::new(&made));
        assert!(!made.exists());
        std::fs::create_dir(&made).unwrap();
        CreatedGuard::new(&made).keep();
        assert!(made.exists());
    }

    #[test]
    fn an_unconfirmed_transaction_undoes_its_outputs_and_restores_replaced_ones() {
        let _serial = serial();
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b.json"));
        let write_dir = |v: &[u8]| {
            let s = Staged::dir("--out", &a).unwrap();
            s.write_file("x", v).unwrap();
            s.commit(Replace::AmendOutput(None)).unwrap();
        };
        let write_file = |v: &[u8]| {
            let s = Staged::file("--metrics", &b).unwrap();
            std::fs::write(s.path(), v).unwrap();
            s.commit(Replace::Any).unwrap();
        };
        {
            let _t = Transaction::begin();
            write_dir(b"1");
            write_file(b"1");
            assert!(a.join("x").exists() && b.exists());
        }
        assert_eq!(entries(tmp.path()).unwrap(), Vec::<String>::new(), "nothing left");
        let t = Transaction::begin();
        write_dir(b"1");
        write_file(b"1");
        t.confirm();
        {
            let _t = Transaction::begin();
            write_dir(b"2");
            write_file(b"2");
            assert_eq!(std::fs::read(a.join("x")).unwrap(), b"2");
        }
        assert_eq!(std::fs::read(a.join("x")).unwrap(), b"1", "the earlier output is put back");
        assert_eq!(std::fs::read(&b).unwrap(), b"1");
        assert_eq!(entries(tmp.path()).unwrap(), vec!["a", "b.json"]);
    }

    #[test]
    fn stale_stages_of_dead_processes_are_removed_and_live_ones_kept() {
        if boot_id().is_none() {
            return; // no /proc: liveness cannot be told, nothing is ever removed
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let make = |name: &str, owner: Option<Owner>| {
            let root = dir.join(name);
            std::fs::create_dir_all(root.join(NEW)).unwrap();
            std::fs::write(root.join(NEW).join("model.safetensors"), "x").unwrap();
            if let Some(o) = owner {
                std::fs::write(root.join(OWNER_FILE), serde_json::to_vec(&o).unwrap()).unwrap();
            }
            root
        };
        let me = std::process::id();
        let alive =
            Owner { pid: me, start: process_start(me), boot: boot_id(), target: dir.join("a") };
        // A process id that cannot exist (above pid_max), so the run is certainly gone.
        let dead = Owner { pid: u32::MAX - 1, ..alive.clone() };
        let rebooted = Owner { boot: Some("another-boot".into()), ..alive.clone() };
        let live_root = make(".amend-tmp-1-live", Some(alive));
        let dead_root = make(".amend-tmp-2-dead", Some(dead.clone()));
        let reboot_root = make(".amend-tmp-3-boot", Some(rebooted));
        let unowned = make(".amend-tmp-4-nobody", None);
        let user = make("user-folder", Some(dead.clone()));
        // A dead run that had moved the old output aside: it is put back.
        let restoring =
            make(".amend-tmp-5-old", Some(Owner { target: dir.join("restored"), ..dead }));
        std::fs::create_dir(restoring.join(OLD)).unwrap();
        std::fs::write(restoring.join(OLD).join("keep.txt"), "old").unwrap();
        let mut removed = remove_stale_stages(dir);
        removed.sort();
        assert_eq!(removed, vec![dead_root, reboot_root, restoring]);
        assert!(live_root.exists() && unowned.exists() && user.exists());
        assert_eq!(std::fs::read(dir.join("restored/keep.txt")).unwrap(), b"old");
    }
}
