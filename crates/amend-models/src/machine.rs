//! What this machine can run: libtorch's thread count and whether a model fits in memory.
//!
//! Both are checked before any work starts, so a typo (`--threads 0`, `--threads 100000`) or an
//! absurd `config.json` (`"n_layer": 1000000000`) is a clear error instead of a panic, a stack
//! overflow in libtorch's thread pool, or an allocation abort.
//!
//! ```
//! use amend_models::machine;
//!
//! assert!(machine::check_threads(0).is_err());
//! assert!(machine::check_threads(1).is_ok());
//! assert!(machine::check_threads(100_000).is_err());
//! machine::set_threads(1)?;
//! assert_eq!(tch::get_num_threads(), 1);
//! # Ok::<(), amend_models::Error>(())
//! ```

use std::path::Path;

use tch::Kind;

use crate::config::{Gpt2Config, LlamaConfig, ModelConfig};
use crate::error::{Error, Result};

/// How many threads per logical CPU [`check_threads`] accepts. More threads than CPUs only slow
/// libtorch down (its pool spins); the bound catches typos, not tuning.
pub const THREADS_PER_CPU: usize = 4;

/// Logical CPUs this process may use (cgroup and affinity limits included), at least 1.
pub fn logical_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The largest thread count [`check_threads`] accepts: [`THREADS_PER_CPU`] × [`logical_cpus`].
pub fn max_threads() -> usize {
    THREADS_PER_CPU * logical_cpus()
}

/// Checks a requested libtorch thread count: `1..=max_threads()`.
///
/// # Errors
/// [`Error::Threads`] for 0, a negative count or more than [`max_threads`].
pub fn check_threads(requested: i64) -> Result<i32> {
    let max = max_threads();
    match usize::try_from(requested) {
        Ok(n) if (1..=max).contains(&n) => Ok(i32::try_from(n).unwrap_or(i32::MAX)),
        _ => Err(Error::Threads { requested, max, cpus: logical_cpus() }),
    }
}

/// Sets libtorch's intra-op thread count (also the fused kernels' threads) after
/// [`check_threads`].
///
/// # Errors
/// [`Error::Threads`].
pub fn set_threads(requested: i64) -> Result<()> {
    let n = check_threads(requested)?;
    tch::set_num_threads(n);
    Ok(())
}

/// Memory this process may use in bytes: the machine's RAM, or the cgroup limit when it is
/// lower. `None` when it cannot be read (the size check is then skipped).
pub fn total_memory() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    let ram = sys.total_memory();
    let limit = sys.cgroup_limits().map(|c| c.total_memory).filter(|&m| m > 0);
    let m = limit.map_or(ram, |l| l.min(ram));
    (m > 0).then_some(m)
}

/// Number of parameters the configuration implies, in f64 so that absurd sizes cannot overflow
/// (exact below 2⁵³).
pub fn parameter_count(cfg: &ModelConfig) -> f64 {
    match cfg {
        ModelConfig::Gpt2(c) => gpt2_parameters(c),
        ModelConfig::Llama(c) => llama_parameters(c),
    }
}

fn gpt2_parameters(c: &Gpt2Config) -> f64 {
    let (v, p, h, i, l) = (
        c.vocab_size as f64,
        c.n_positions as f64,
        c.n_embd as f64,
        c.inner_size() as f64,
        c.n_layer as f64,
    );
    // ln_1, c_attn (3h×h + 3h), attn c_proj (h×h + h), ln_2, c_fc (h×i + i), mlp c_proj (i×h + h)
    let block =
        2.0 * h + (3.0 * h * h + 3.0 * h) + (h * h + h) + 2.0 * h + (h * i + i) + (i * h + h);
    let head = if c.tie_word_embeddings { 0.0 } else { v * h };
    v * h + p * h + l * block + 2.0 * h + head
}

fn llama_parameters(c: &LlamaConfig) -> f64 {
    let (v, h, i, l) = (
        c.vocab_size as f64,
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let qkv_bias = if c.has_qkv_bias() { q + 2.0 * kv } else { 0.0 };
    let o_bias = if c.attention_bias { h } else { 0.0 };
    let mlp_bias = if c.mlp_bias { 2.0 * i + h } else { 0.0 };
    let attn = h * q + 2.0 * h * kv + q * h + qkv_bias + o_bias;
    let mlp = 3.0 * h * i + mlp_bias;
    let block = 2.0 * h + attn + mlp;
    let head = if c.tie_word_embeddings { 0.0 } else { v * h };
    v * h + l * block + h + head
}

/// Bytes per element of a floating dtype amend computes in.
fn element_size(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 | Kind::Half => 2.0,
        Kind::Double => 8.0,
        _ => 4.0,
    }
}

/// Checks that the parameters of `cfg` in `kind` fit in this machine's memory, before anything
/// is allocated. `path` is the config file named in the error.
///
/// # Errors
/// [`Error::ModelTooLarge`].
pub fn check_model_fits(cfg: &ModelConfig, kind: Kind, path: &Path) -> Result<()> {
    let Some(memory) = total_memory() else { return Ok(()) };
    let parameters = parameter_count(cfg);
    let bytes = parameters * element_size(kind);
    if bytes <= memory as f64 {
        return Ok(());
    }
    let fields = match cfg {
        ModelConfig::Gpt2(c) => format!(
            "n_layer = {}, n_embd = {}, n_inner = {}, vocab_size = {}, n_positions = {}",
            c.n_layer,
            c.n_embd,
            c.inner_size(),
            c.vocab_size,
            c.n_positions
        ),
        ModelConfig::Llama(c) => format!(
            "num_hidden_layers = {}, hidden_size = {}, intermediate_size = {}, vocab_size = {}",
            c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
        ),
    };
    Err(Error::ModelTooLarge {
        path: path.to_path_buf(),
        parameters,
        bytes,
        dtype: crate::model::kind_name(kind).to_string(),
        memory,
        fields,
    })
}

/// `bytes` with a binary unit (`24.0 GiB`).
pub(crate) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes;
    for unit in UNITS {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{bytes:.3e} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_bounds() {
        assert!(matches!(check_threads(0), Err(Error::Threads { requested: 0, .. })));
        assert!(check_threads(-3).is_err());
        assert_eq!(check_threads(1).unwrap(), 1);
        assert_eq!(check_threads(max_threads() as i64).unwrap() as usize, max_threads());
        assert!(check_threads(max_threads() as i64 + 1).is_err());
        let msg = check_threads(100_000).unwrap_err().to_string();
        assert!(msg.contains("100000") && msg.contains("logical CPUs"), "{msg}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512.0), "512.0 B");
        assert_eq!(human_bytes(24.0 * 1024.0 * 1024.0 * 1024.0), "24.0 GiB");
    }
}
