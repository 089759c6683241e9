//! The ProFS evaluation protocol helpers (spec A.8): sliding-window perplexity (PF-13) and greedy
//! continuations written as JSONL for an external toxicity scorer (PF-12).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_models::{CausalLm, GenerationConfig, generate};

use crate::{Error, Result};

/// How window NLLs become one perplexity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PplAggregation {
    /// `exp(mean over windows of each window's mean NLL)`, windows unweighted (the reference's
    /// and transformers' recipe; the default when comparing with the paper).
    #[default]
    WindowMean,
    /// `exp(Σ NLL / Σ scored tokens)`: the exact corpus perplexity.
    TokenMean,
}

/// Settings of [`sliding_window_perplexity`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PerplexityConfig {
    /// Window length (`None`: the model's position limit, `n_positions` /
    /// `max_position_embeddings`).
    pub window: Option<usize>,
    /// Stride between window starts.
    pub stride: usize,
    /// Aggregation.
    pub aggregation: PplAggregation,
}

impl Default for PerplexityConfig {
    fn default() -> Self {
        PerplexityConfig { window: None, stride: 512, aggregation: PplAggregation::WindowMean }
    }
}

/// The result of [`sliding_window_perplexity`] (window and stride are recorded, PF-13).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// The perplexity.
    pub perplexity: f64,
    /// Aggregation used.
    pub aggregation: PplAggregation,
    /// Window used.
    pub window: usize,
    /// Whether the window was overridden (differs from the model's position limit).
    pub window_overridden: bool,
    /// Stride used.
    pub stride: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Tokens of the text.
    pub tokens: usize,
}

/// Perplexity of a long text with a sliding window (transformers' recipe, used by the ProFS
/// reference on WikiText-2 joined with `"\n\n"`).
///
/// ```text
/// for begin in 0, stride, 2·stride, …:   end = min(begin + window, n)
///     scored positions: the last (end − prev_end) of the window (earlier ones are context only;
///                       the window's first token is never scored)
///     nll_w = mean NLL of the scored positions
/// WindowMean: ppl = exp(mean_w nll_w)      TokenMean: ppl = exp(Σ NLL / Σ scored)
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] for a text with fewer than 2 tokens, `stride = 0`, a window < 2 or
/// `stride > window`, or no window given for a model without a position limit;
/// [`Error::Model`]; [`Error::Tch`].
pub fn sliding_window_perplexity<M: CausalLm + ?Sized>(
    model: &M,
    text: &str,
    cfg: &PerplexityConfig,
) -> Result<PerplexityReport> {
    const OP: &str = "sliding_window_perplexity";
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: OP })?;
    let ids = tok.encode(text, true)?;
    let limit = model.config().max_positions();
    let window = cfg.window.or(limit).ok_or_else(|| {
        Error::invalid(OP, "window", "the model has no position limit: give a window")
    })?;
    if ids.len() < 2 {
        return Err(Error::invalid(OP, "text", "needs at least 2 tokens"));
    }
    if window < 2 || cfg.stride == 0 || cfg.stride > window {
        return Err(Error::invalid(
            OP,
            "stride",
            format!(
                "need 0 < stride ≤ window and window ≥ 2 (stride {}, window {window})",
                cfg.stride
            ),
        ));
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let n = ids.len();
    let (mut sum, mut count, mut window_nlls) = (0.0f64, 0usize, Vec::new());
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(n);
        let trg = end - prev_end;
        let chunk: Vec<i64> = ids[begin..end].iter().map(|&x| i64::from(x)).collect();
        let t = chunk.len();
        let x = Tensor::f_from_slice(&chunk)?.f_view([1, t as i64])?.f_to_device(device)?;
        let logits = model.forward(&x, None)?.f_to_kind(Kind::Float)?;
        // Position j (≥ 1) is predicted by logits j − 1; scored: j ≥ max(1, t − trg).
        let first = (t - trg).max(1);
        if first < t {
            let z = logits.f_narrow(1, first as i64 - 1, (t - first) as i64)?.f_squeeze_dim(0)?;
            let y = x.f_narrow(1, first as i64, (t - first) as i64)?.f_squeeze_dim(0)?;
            let lp = z.f_log_softmax(-1, Kind::Float)?.f_gather(1, &y.f_unsqueeze(1)?, false)?;
            let s = -lp.f_sum(Kind::Double)?.f_double_value(&[])?;
            let c = t - first;
            sum += s;
            count += c;
            window_nlls.push(s / c as f64);
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += cfg.stride;
    }
    let nll = match cfg.aggregation {
        PplAggregation::WindowMean => {
            window_nlls.iter().sum::<f64>() / window_nlls.len().max(1) as f64
        }
        PplAggregation::TokenMean => sum / count.max(1) as f64,
    };
    Ok(PerplexityReport {
        perplexity: nll.exp(),
        aggregation: cfg.aggregation,
        window,
        window_overridden: limit != Some(window),
        stride: cfg.stride,
        windows: window_nlls.len(),
        tokens_scored: count,
        tokens: n,
    })
}

/// One continuation for an external scorer (PF-12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continuation {
    /// The prompt.
    pub prompt: String,
    /// The generated continuation only (special tokens removed).
    pub continuation: String,
    /// The model id (directory or name).
    pub model: String,
}

/// Greedy continuations of `prompts` (the ProFS toxicity protocol: 10 new tokens, continuation
/// only), for scoring with Detoxify or any other scorer.
///
/// # Errors
/// [`Error::Model`] (generation errors).
pub fn greedy_continuations<M: CausalLm + ?Sized>(
    model: &M,
    model_id: &str,
    prompts: &[&str],
    max_new_tokens: usize,
) -> Result<Vec<Continuation>> {
    let mut cfg = GenerationConfig::greedy(max_new_tokens);
    cfg.stop_token_ids = model.generation_config().stop_token_ids;
    let gens = generate(model, prompts, &cfg)?;
    Ok(prompts
        .iter()
        .zip(gens)
        .map(|(p, g)| Continuation {
            prompt: p.to_string(),
            continuation: g.text.unwrap_or_default(),
            model: model_id.to_string(),
        })
        .collect())
}

/// Writes continuations as JSONL (`{"prompt", "continuation", "model"}` per line).
///
/// # Errors
/// [`Error::Io`]; [`Error::Json`].
pub fn write_continuations(path: &Path, items: &[Continuation]) -> Result<()> {
    let mut out = Vec::new();
    for c in items {
        serde_json::to_writer(&mut out, c).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            line: None,
            source,
        })?;
        out.push(b'\n');
    }
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&out).map_err(|e| Error::io(path, e))?;
    Ok(())
}
