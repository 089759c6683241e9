//! Scoring: per-token log-probabilities of given text, and perplexity.
//!
//! ```text
//! logprob_t = log softmax(logits_{t−1})[x_t]          for t ≥ first_scored (≥ 1)
//! perplexity = exp(−Σ_t logprob_t / #scored tokens)
//! ```
//!
//! The first token of a sequence has no prediction; models whose tokenizer adds a BOS token
//! (Llama, the tiny recipe) therefore score every text token, and for GPT-2 `prepend_bos` scores
//! the first word after `<|endoftext|>`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::{CausalLm, ForwardOptions};
use crate::tokenizer::{PaddingSide, pad_batch};
use crate::{Error, Result};

/// Options of [`score_texts`] and [`score_continuations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreOptions {
    /// Apply the tokenizer's post-processor (e.g. a BOS token).
    pub add_special_tokens: bool,
    /// Put the BOS id (or the first end-of-sequence id) before each text that does not start
    /// with it, so its first token is scored too.
    pub prepend_bos: bool,
    /// Sequences per forward pass.
    pub batch_size: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions { add_special_tokens: true, prepend_bos: false, batch_size: 8 }
    }
}

/// Log-probabilities of the tokens of one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenScores {
    /// All token ids of the sequence.
    pub token_ids: Vec<u32>,
    /// Index of the first scored token (≥ 1).
    pub first_scored: usize,
    /// `logprobs[i] = log p(token_ids[first_scored + i] | token_ids[..first_scored + i])`.
    pub logprobs: Vec<f32>,
}

impl TokenScores {
    /// Number of scored tokens.
    pub fn count(&self) -> usize {
        self.logprobs.len()
    }

    /// Sum of the log-probabilities (f64 accumulation).
    pub fn sum_logprob(&self) -> f64 {
        self.logprobs.iter().map(|&x| f64::from(x)).sum()
    }

    /// Mean negative log-likelihood per scored token (0 when nothing is scored).
    pub fn mean_nll(&self) -> f64 {
        if self.logprobs.is_empty() { 0.0 } else { -self.sum_logprob() / self.count() as f64 }
    }

    /// `exp(mean_nll)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// The scored token ids.
    pub fn scored_ids(&self) -> &[u32] {
        &self.token_ids[self.first_scored..]
    }
}

/// Perplexity over several scored sequences (token-weighted): `exp(−Σ logprob / Σ count)`.
pub fn corpus_perplexity(scores: &[TokenScores]) -> f64 {
    let (s, n) =
        scores.iter().fold((0.0, 0usize), |(s, n), x| (s + x.sum_logprob(), n + x.count()));
    if n == 0 { 1.0 } else { (-s / n as f64).exp() }
}

/// Scores token sequences: the log-probability of every token from `first_scored[i]` on
/// (clamped to ≥ 1) given the tokens before it.
///
/// # Errors
/// [`Error::InvalidInput`] for empty sequences or mismatched lengths; errors of the forward pass.
pub fn score_ids<M: CausalLm + ?Sized>(
    model: &M,
    seqs: &[Vec<u32>],
    first_scored: &[usize],
    batch_size: usize,
) -> Result<Vec<TokenScores>> {
    if seqs.len() != first_scored.len() {
        return Err(Error::invalid(
            "score_ids",
            "first_scored",
            format!("{} entries for {} sequences", first_scored.len(), seqs.len()),
        ));
    }
    if batch_size == 0 {
        return Err(Error::invalid("score_ids", "batch_size", "must be positive"));
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let pad = model.tokenizer().map_or(0, |t| t.pad_token_id());
    let mut out = Vec::with_capacity(seqs.len());
    for (chunk, starts) in seqs.chunks(batch_size).zip(first_scored.chunks(batch_size)) {
        let batch = pad_batch(chunk, pad, PaddingSide::Right, device)?;
        let logits = model
            .forward_with(
                &batch.input_ids,
                Some(&batch.attention_mask),
                None,
                ForwardOptions::logits(),
            )?
            .logits
            .ok_or_else(|| Error::invalid("score_ids", "logits", "adapter returned no logits"))?;
        let t = logits.size()[1];
        if t < 2 {
            for (s, &f) in chunk.iter().zip(starts) {
                out.push(TokenScores {
                    token_ids: s.clone(),
                    first_scored: f.max(1).min(s.len()),
                    logprobs: vec![],
                });
            }
            continue;
        }
        let pred = logits.f_narrow(1, 0, t - 1)?.f_to_kind(Kind::Float)?;
        let targets = batch.input_ids.f_narrow(1, 1, t - 1)?;
        let picked = pred.f_gather(2, &targets.f_unsqueeze(2)?, false)?.f_squeeze_dim(2)?;
        let lse = pred.f_logsumexp(&[2i64][..], false)?;
        let lp = picked.f_sub(&lse)?.f_to_device(tch::Device::Cpu)?;
        let cols = (t - 1) as usize;
        let flat = Vec::<f32>::try_from(lp.f_flatten(0, -1)?)?;
        for (row, (s, &f)) in chunk.iter().zip(starts).enumerate() {
            let first = f.max(1).min(s.len());
            let lps = (first..s.len()).map(|j| flat[row * cols + j - 1]).collect();
            out.push(TokenScores { token_ids: s.clone(), first_scored: first, logprobs: lps });
        }
    }
    Ok(out)
}

fn bos_of<M: CausalLm + ?Sized>(model: &M, op: &'static str) -> Result<Option<u32>> {
    match model.tokenizer() {
        Some(tok) => tok.bos_for(op),
        None => Ok(None),
    }
}

/// Scores texts: log-probabilities of every token after the first.
///
/// ```
/// use amend_models::{load, score_texts, LoadOptions, ScoreOptions};
/// # let dir = "tests/fixtures/models/gpt2"; // a tiny random GPT-2
/// let model = load(dir, &LoadOptions::default())?;
/// let s = score_texts(&model, &["the cat sat on the mat"], &ScoreOptions::default())?;
/// assert_eq!(s[0].count(), s[0].token_ids.len() - 1);
/// println!("perplexity {:.2}", s[0].perplexity());
/// # Ok::<(), amend_models::Error>(())
/// ```
///
/// # Errors
/// [`Error::NoTokenizer`]; [`Error::InvalidInput`] for a text with no tokens; as [`score_ids`].
pub fn score_texts<M: CausalLm + ?Sized>(
    model: &M,
    texts: &[&str],
    opts: &ScoreOptions,
) -> Result<Vec<TokenScores>> {
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: "score_texts" })?;
    let bos = if opts.prepend_bos { bos_of(model, "prepend_bos")? } else { None };
    let mut seqs = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let mut ids = tok.encode(text, opts.add_special_tokens)?;
        if let Some(b) = bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        if ids.is_empty() {
            return Err(Error::invalid("score_texts", "texts", format!("text {i} has no tokens")));
        }
        seqs.push(ids);
    }
    let starts = vec![1; seqs.len()];
    score_ids(model, &seqs, &starts, opts.batch_size)
}

/// Scores `continuation` given `prompt` for each pair: the prompt is tokenised with special
/// tokens (per `opts`), the continuation without, and only continuation tokens are scored.
///
/// # Errors
/// [`Error::NoTokenizer`]; [`Error::InvalidInput`] for an empty prompt or continuation; as
/// [`score_ids`].
pub fn score_continuations<M: CausalLm + ?Sized>(
    model: &M,
    pairs: &[(&str, &str)],
    opts: &ScoreOptions,
) -> Result<Vec<TokenScores>> {
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: "score_continuations" })?;
    let bos = if opts.prepend_bos { bos_of(model, "prepend_bos")? } else { None };
    let mut seqs = Vec::with_capacity(pairs.len());
    let mut starts = Vec::with_capacity(pairs.len());
    for (i, (prompt, cont)) in pairs.iter().enumerate() {
        let mut ids = tok.encode(prompt, opts.add_special_tokens)?;
        if let Some(b) = bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        let c = tok.encode(cont, false)?;
        if ids.is_empty() || c.is_empty() {
            return Err(Error::invalid(
                "score_continuations",
                "pairs",
                format!("pair {i}: prompt and continuation must both have tokens"),
            ));
        }
        starts.push(ids.len());
        ids.extend(c);
        seqs.push(ids);
    }
    score_ids(model, &seqs, &starts, opts.batch_size)
}

/// Log-probabilities `[b_sz, seq_len − 1]` of `input_ids[:, 1:]` under `logits[:, :-1]`, with
/// autograd (for training code that needs sequence log-likelihoods).
///
/// # Shapes
/// `logits: [b_sz, seq_len, vocab]`, `input_ids: [b_sz, seq_len]` → `[b_sz, seq_len − 1]` (f32).
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::Tch`].
pub fn next_token_logprobs(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let (ls, is) = (logits.size(), input_ids.size());
    if ls.len() != 3 || is.len() != 2 || ls[..2] != is[..] || ls[1] < 2 {
        return Err(Error::ShapeMismatch {
            op: "next_token_logprobs",
            expected: vec![is.first().copied().unwrap_or(0), is.get(1).copied().unwrap_or(0), -1],
            got: ls,
        });
    }
    let t = ls[1];
    let pred = logits.f_narrow(1, 0, t - 1)?.f_to_kind(Kind::Float)?;
    let targets = input_ids.f_narrow(1, 1, t - 1)?.f_to_kind(Kind::Int64)?;
    let picked = pred.f_gather(2, &targets.f_unsqueeze(2)?, false)?.f_squeeze_dim(2)?;
    Ok(picked.f_sub(&pred.f_logsumexp(&[2i64][..], false)?)?)
}
