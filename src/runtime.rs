//! What libtorch this process runs on: version, location, device and threads.
//!
//! Used by `amend info` and the `smoke` example, which are the first things to run when checking
//! an installation.

use std::path::PathBuf;

/// A description of the libtorch runtime of this process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeInfo {
    /// Version of the loaded libtorch, read from the `torch/version.py` next to the loaded
    /// `libtorch_cpu.so` (for example `"2.13.0+cu130"`), if it could be found.
    pub libtorch_version: Option<String>,
    /// Folder the loaded `libtorch_cpu.so` comes from, if it could be found.
    pub libtorch_lib: Option<PathBuf>,
    /// The device `amend` uses by default (`Cuda(0)` when available, else `Cpu`).
    pub device: String,
    /// Whether CUDA is available to libtorch.
    pub cuda_available: bool,
    /// libtorch's intra-op thread count.
    pub threads: i32,
    /// Whether libtorch was built with MKL.
    pub has_mkl: bool,
    /// Whether libtorch was built with OpenMP.
    pub has_openmp: bool,
}

impl RuntimeInfo {
    /// Reads the runtime description of this process.
    pub fn detect() -> Self {
        // Touch libtorch first so that its shared library is mapped before /proc/self/maps is read.
        let threads = tch::get_num_threads();
        let cuda_available = tch::Cuda::is_available();
        let libtorch_lib = loaded_libtorch_dir();
        let libtorch_version = libtorch_lib.as_deref().and_then(read_torch_version);
        RuntimeInfo {
            libtorch_version,
            libtorch_lib,
            device: format!("{:?}", tch::Device::cuda_if_available()),
            cuda_available,
            threads,
            has_mkl: tch::utils::has_mkl(),
            has_openmp: tch::utils::has_openmp(),
        }
    }
}

impl std::fmt::Display for RuntimeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unknown = || "unknown".to_string();
        writeln!(
            f,
            "libtorch version : {}",
            self.libtorch_version.clone().unwrap_or_else(unknown)
        )?;
        writeln!(
            f,
            "libtorch lib     : {}",
            self.libtorch_lib.as_ref().map_or_else(unknown, |p| p.display().to_string())
        )?;
        writeln!(
            f,
            "device           : {} (cuda available: {})",
            self.device, self.cuda_available
        )?;
        writeln!(f, "threads          : {}", self.threads)?;
        write!(f, "mkl / openmp     : {} / {}", self.has_mkl, self.has_openmp)
    }
}

/// The folder of the `libtorch_cpu` shared library mapped into this process (Linux only).
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|line| line.split_whitespace().nth(5)).find_map(|path| {
        let p = PathBuf::from(path);
        let name = p.file_name()?.to_str()?;
        if name.starts_with("libtorch_cpu.") { p.parent().map(PathBuf::from) } else { None }
    })
}

/// Parses `__version__ = '2.13.0+cu130'` from `<lib>/../version.py` (the PyTorch wheel layout).
fn read_torch_version(lib_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("__version__")?.trim_start().strip_prefix('=')?;
        Some(rest.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
    })
}
