//! Text generation: greedy decoding and sampling (temperature, top-k, top-p), batched with left
//! padding, with a KV cache, seeded and reproducible.
//!
//! # Sampling
//!
//! With `do_sample`, the next token of each row is drawn from the model's distribution after,
//! in this order (transformers' order):
//!
//! ```text
//! z ← logits / temperature
//! top-k:  keep z_i ≥ (k-th largest z)                          (ties at the boundary kept)
//! top-p:  sort descending; keep token i iff Σ_{j ranked before i} softmax(z)_j < top_p
//! y ~ softmax(z restricted to the kept tokens)
//! ```
//!
//! Sampling happens in Rust on f64 probabilities with one [`Xoshiro256PlusPlus`] stream per
//! prompt, seeded from `(seed, prompt index)`; results depend only on the seed, the prompt's
//! position in the list and the model, not on the batch size or on libtorch's global RNG (up to
//! floating-point differences between batch shapes).
//!
//! [`Xoshiro256PlusPlus`]: rand::rngs::Xoshiro256PlusPlus

use std::path::Path;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::{ModelConfig, TokenIds};
use crate::model::{CausalLm, ForwardOptions, LogitsMode};
use crate::tokenizer::{PaddingSide, pad_batch};
use crate::{Error, Result};

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Tokens to generate at most per prompt.
    pub max_new_tokens: usize,
    /// Sample (`true`) or decode greedily (`false`, the default).
    pub do_sample: bool,
    /// Softmax temperature when sampling (> 0).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens when sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (0 < p ≤ 1).
    pub top_p: Option<f64>,
    /// Generation of a row stops after any of these tokens (which is kept in the output).
    pub stop_token_ids: Vec<u32>,
    /// Id used for padding (default: the tokenizer's pad id, else the first stop id, else 0).
    pub pad_token_id: Option<u32>,
    /// Id used as the prompt when a prompt is empty.
    pub bos_token_id: Option<u32>,
    /// Seed of the sampling streams.
    pub seed: u64,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Apply the tokenizer's post-processor (e.g. a BOS token) to text prompts.
    pub add_special_tokens: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            stop_token_ids: vec![],
            pad_token_id: None,
            bos_token_id: None,
            seed: 0,
            batch_size: 16,
            add_special_tokens: true,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of `max_new_tokens`, stopping at the config's end-of-sequence ids.
    pub fn for_model_config(cfg: &ModelConfig) -> Self {
        let st = cfg.special_tokens();
        GenerationConfig {
            stop_token_ids: st.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            pad_token_id: st.pad_token_id,
            bos_token_id: st.bos_token_id,
            ..GenerationConfig::default()
        }
    }

    /// Reads a `generation_config.json`: `do_sample`, `temperature`, `top_k` (transformers'
    /// default 50 when absent; 0 disables it), `top_p`, `max_new_tokens`, `eos_token_id`,
    /// `pad_token_id`, `bos_token_id`; other keys are ignored.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::Config`] for a field of the wrong type.
    pub fn from_hf_file(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        #[derive(Deserialize)]
        struct Hf {
            do_sample: Option<bool>,
            temperature: Option<f64>,
            top_k: Option<usize>,
            top_p: Option<f64>,
            max_new_tokens: Option<usize>,
            eos_token_id: Option<TokenIds>,
            pad_token_id: Option<u32>,
            bos_token_id: Option<u32>,
        }
        let hf: Hf = serde_json::from_value(v)
            .map_err(|e| Error::config(path, "generation_config", e.to_string()))?;
        let mut g = GenerationConfig::for_model_config(cfg);
        g.do_sample = hf.do_sample.unwrap_or(false);
        g.temperature = hf.temperature.unwrap_or(1.0);
        g.top_k = match hf.top_k {
            None => Some(50),
            Some(0) => None,
            Some(k) => Some(k),
        };
        g.top_p = hf.top_p.filter(|&p| p < 1.0);
        if let Some(n) = hf.max_new_tokens {
            g.max_new_tokens = n;
        }
        if let Some(e) = hf.eos_token_id {
            g.stop_token_ids = e.to_vec();
        }
        g.pad_token_id = hf.pad_token_id.or(g.pad_token_id);
        g.bos_token_id = hf.bos_token_id.or(g.bos_token_id);
        Ok(g)
    }

    /// Greedy decoding.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig { max_new_tokens, ..GenerationConfig::default() }
    }

    /// Sampling at `temperature` with `seed`.
    pub fn sampling(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        GenerationConfig {
            max_new_tokens,
            do_sample: true,
            temperature,
            seed,
            ..GenerationConfig::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let op = "generate";
        if self.batch_size == 0 {
            return Err(Error::invalid(op, "batch_size", "must be positive"));
        }
        if self.do_sample {
            if !(self.temperature.is_finite() && self.temperature > 0.0) {
                return Err(Error::invalid(
                    op,
                    "temperature",
                    format!("{} must be > 0 when sampling", self.temperature),
                ));
            }
            if self.top_k == Some(0) {
                return Err(Error::invalid(op, "top_k", "must be at least 1"));
            }
            if let Some(p) = self.top_p
                && !(p > 0.0 && p <= 1.0)
            {
                return Err(Error::invalid(op, "top_p", format!("{p} is not in (0, 1]")));
            }
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// The result of generating from one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The generated ids (ending with the stop token when `finish_reason` is `Stop`).
    pub token_ids: Vec<u32>,
    /// `log p(token | prefix)` of each generated token under the model itself (temperature 1,
    /// no filtering), whatever the sampling settings.
    pub logprobs: Vec<f32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The generated text without special tokens (when the model has a tokenizer).
    pub text: Option<String>,
}

/// Generates a continuation of each text prompt.
///
/// ```
/// use amend_models::{generate, load, GenerationConfig, LoadOptions};
/// # let dir = "tests/fixtures/models/gpt2"; // a tiny random GPT-2
/// let model = load(dir, &LoadOptions::default())?;
/// let mut cfg = GenerationConfig::sampling(20, 0.8, 42);
/// cfg.top_p = Some(0.95);
/// let a = generate(&model, &["the cat", "a dog"], &cfg)?;
/// let b = generate(&model, &["the cat", "a dog"], &cfg)?;
/// assert_eq!(a, b); // same seed, same samples
/// assert!(a[0].token_ids.len() <= 20);
/// # Ok::<(), amend_models::Error>(())
/// ```
///
/// # Errors
/// [`Error::NoTokenizer`]; as [`generate_ids`].
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[&str],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: "generate" })?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode(p, cfg.add_special_tokens))
        .collect::<Result<Vec<_>>>()?;
    generate_ids(model, &ids, cfg)
}

/// Generates a continuation of each tokenised prompt.
///
/// # Errors
/// [`Error::InvalidInput`] for invalid settings, an empty prompt without a BOS id, or prompts
/// plus `max_new_tokens` longer than the model's position limit; errors of the forward pass.
pub fn generate_ids<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let _guard = tch::no_grad_guard();
    let tok = model.tokenizer();
    let bos = cfg.bos_token_id.or_else(|| tok.and_then(|t| t.bos_token_id()));
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| match (p.is_empty(), bos) {
            (false, _) => Ok(p.clone()),
            (true, Some(b)) => Ok(vec![b]),
            (true, None) => Err(
                match tok
                    .and_then(|t| t.out_of_vocab_ids().iter().find(|o| o.field == "bos_token_id"))
                {
                    Some(o) => o.error("generate (an empty prompt starts with the BOS token)"),
                    None => Error::invalid(
                        "generate",
                        "prompts",
                        format!("prompt {i} is empty and the model has no BOS token"),
                    ),
                },
            ),
        })
        .collect::<Result<_>>()?;
    let pad = cfg
        .pad_token_id
        .or_else(|| tok.map(|t| t.pad_token_id()))
        .or_else(|| cfg.stop_token_ids.first().copied())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_idx, chunk) in prompts.chunks(cfg.batch_size).enumerate() {
        let first = chunk_idx * cfg.batch_size;
        out.extend(generate_batch(model, chunk, first, pad, cfg)?);
    }
    Ok(out)
}

fn generate_batch<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    first_index: usize,
    pad: u32,
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    let device = model.device();
    let b = prompts.len();
    let max_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = max_prompt + cfg.max_new_tokens.max(1);
    if let Some(max) = model.config().max_positions()
        && capacity > max
    {
        return Err(Error::invalid(
            "generate",
            "max_new_tokens",
            format!(
                "a {max_prompt}-token prompt plus {} new tokens exceed the model's {max} positions",
                cfg.max_new_tokens
            ),
        ));
    }
    let mut rngs: Vec<Xoshiro256PlusPlus> = (0..b)
        .map(|i| Xoshiro256PlusPlus::seed_from_u64(stream_seed(cfg.seed, (first_index + i) as u64)))
        .collect();
    let mut gens: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_ids: p.clone(),
            token_ids: vec![],
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            text: None,
        })
        .collect();
    if cfg.max_new_tokens > 0 {
        let batch = pad_batch(prompts, pad, PaddingSide::Left, device)?;
        let mut mask = batch.attention_mask;
        let mut cache = model.new_kv_cache(b, capacity)?;
        let opts = ForwardOptions { hidden_states: false, logits: LogitsMode::Last };
        let mut logits = model
            .forward_with(&batch.input_ids, Some(&mask), Some(&mut cache), opts)?
            .logits
            .ok_or_else(|| Error::invalid("generate", "logits", "adapter returned no logits"))?;
        let mut done = vec![false; b];
        let vocab = logits.size()[2] as usize;
        for step in 0..cfg.max_new_tokens {
            let logp = logits
                .f_squeeze_dim(1)?
                .f_log_softmax(-1, Kind::Float)?
                .f_to_device(tch::Device::Cpu)?;
            let flat = Vec::<f32>::try_from(logp.f_flatten(0, -1)?)?;
            let mut next = Vec::with_capacity(b);
            for row in 0..b {
                if done[row] {
                    next.push(i64::from(pad));
                    continue;
                }
                let lp = &flat[row * vocab..(row + 1) * vocab];
                let id = if cfg.do_sample { sample(lp, cfg, &mut rngs[row]) } else { argmax(lp) };
                let g = &mut gens[row];
                g.token_ids.push(id as u32);
                g.logprobs.push(lp[id]);
                if cfg.stop_token_ids.contains(&(id as u32)) {
                    g.finish_reason = FinishReason::Stop;
                    done[row] = true;
                }
                next.push(id as i64);
            }
            if step + 1 == cfg.max_new_tokens || done.iter().all(|&d| d) {
                break;
            }
            let ids = Tensor::f_from_slice(&next)?.f_view([b as i64, 1])?.f_to_device(device)?;
            mask = Tensor::f_cat(&[&mask, &mask.f_ones_like()?.f_narrow(1, 0, 1)?], 1)?;
            logits =
                model.forward_with(&ids, Some(&mask), Some(&mut cache), opts)?.logits.ok_or_else(
                    || Error::invalid("generate", "logits", "adapter returned no logits"),
                )?;
        }
    }
    if let Some(tok) = model.tokenizer() {
        for g in &mut gens {
            let body = match g.finish_reason {
                FinishReason::Stop => &g.token_ids[..g.token_ids.len() - 1],
                FinishReason::Length => &g.token_ids[..],
            };
            g.text = Some(tok.decode(body, true)?);
        }
    }
    Ok(gens)
}

/// SplitMix64 of `seed` and `index`: independent streams per prompt.
fn stream_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the first maximum (NaN never wins).
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in xs.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best
}

/// Draws one id from `logp` (log-probabilities) after temperature, top-k and top-p.
pub(crate) fn sample(logp: &[f32], cfg: &GenerationConfig, rng: &mut Xoshiro256PlusPlus) -> usize {
    let kept = filtered_distribution(logp, cfg.temperature, cfg.top_k, cfg.top_p);
    let total: f64 = kept.iter().map(|&(_, p)| p).sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for &(i, p) in &kept {
        acc += p;
        if u < acc {
            return i;
        }
    }
    kept.last().map_or_else(|| argmax(logp), |&(i, _)| i)
}

/// The tokens kept by temperature, top-k and top-p, with unnormalised probabilities, most likely
/// first.
pub(crate) fn filtered_distribution(
    logp: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
) -> Vec<(usize, f64)> {
    let mut z: Vec<(usize, f64)> = logp
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i, f64::from(x) / temperature))
        .collect();
    if z.is_empty() {
        return vec![(argmax(logp), 1.0)];
    }
    z.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = top_k
        && k < z.len()
    {
        let kth = z[k - 1].1;
        z.retain(|&(_, v)| v >= kth);
    }
    let max = z[0].1;
    let mut probs: Vec<(usize, f64)> = z.iter().map(|&(i, v)| (i, (v - max).exp())).collect();
    if let Some(p) = top_p
        && p < 1.0
    {
        let total: f64 = probs.iter().map(|&(_, q)| q).sum();
        let mut before = 0.0;
        let mut keep = 0;
        for &(_, q) in &probs {
            if before / total < p {
                keep += 1;
                before += q;
            } else {
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logp(xs: &[f64]) -> Vec<f32> {
        let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        xs.iter().map(|x| (x - lse) as f32).collect()
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let lp = logp(&[3.0, 1.0, 2.0, 2.0, 0.0]);
        let kept: Vec<usize> =
            filtered_distribution(&lp, 1.0, Some(2), None).iter().map(|x| x.0).collect();
        assert_eq!(kept, vec![0, 2, 3]);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // probabilities 0.5, 0.3, 0.2
        let lp: Vec<f32> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln() as f32).collect();
        let ids = |p| {
            filtered_distribution(&lp, 1.0, None, Some(p)).iter().map(|x| x.0).collect::<Vec<_>>()
        };
        assert_eq!(ids(0.5), vec![0]);
        assert_eq!(ids(0.51), vec![0, 1]);
        assert_eq!(ids(0.8), vec![0, 1]);
        assert_eq!(ids(0.81), vec![0, 1, 2]);
        assert_eq!(ids(0.01), vec![0]);
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_distribution() {
        let lp: Vec<f32> = [0.6f64, 0.3, 0.1].iter().map(|p| p.ln() as f32).collect();
        let cfg = GenerationConfig { temperature: 0.5, ..GenerationConfig::sampling(1, 0.5, 7) };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample(&lp, &cfg, &mut rng)] += 1;
        }
        // p^(1/T) with T = 0.5: 0.36, 0.09, 0.01 normalised.
        let z = 0.36 + 0.09 + 0.01;
        for (c, p) in counts.iter().zip([0.36 / z, 0.09 / z, 0.01 / z]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "frequency {f} vs {p}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }
}
