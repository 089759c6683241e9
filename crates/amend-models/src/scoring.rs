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
//!
//! # Long texts
//!
//! [`score_texts`] never feeds the model more tokens than its context (`n_positions` for GPT-2,
//! `max_position_embeddings` for the Llama family, see [`context_length`]) unless asked to: a
//! longer text is refused with [`Error::TooLong`] before any forward pass. GPT-2 has no position
//! embedding past its context; RoPE models would run, but extrapolate silently (and attention is
//! quadratic in the length). Two options lift the refusal:
//!
//! * [`ScoreOptions::max_tokens`] alone keeps the first `N` tokens of each text (after the BOS
//!   token, when one is added) and records how many were dropped ([`TokenScores::truncated`]);
//!   above the context it is an explicit choice to extrapolate (refused for GPT-2);
//! * [`ScoreOptions::stride`] scores every token of the text in overlapping windows of
//!   `max_tokens` (default: the context) tokens, moving by `stride` tokens, as in transformers'
//!   perplexity guide:
//!
//! ```text
//! for begin in 0, stride, 2·stride, …:   end = min(begin + window, n)
//!     tokens prev_end..end are scored (those before are context only); prev_end = end
//! ```
//!
//! Every token after the first is scored exactly once, with at least `window − stride` tokens
//! of context (all tokens before it while it is in the first window); `stride < window` is
//! required so that none is left without context.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::ModelConfig;
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
    /// Sequences (texts or windows) per forward pass.
    pub batch_size: usize,
    /// Without [`stride`](Self::stride): keep the first `N` tokens of each longer text (see the
    /// [module docs](self)). With it: the window length (default: the model's context).
    pub max_tokens: Option<usize>,
    /// Score long texts whole in overlapping windows moved by this many tokens (`0 < stride <
    /// window`).
    pub stride: Option<usize>,
    /// Draw a progress bar (scored tokens) on stderr when it is a terminal.
    pub progress: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            add_special_tokens: true,
            prepend_bos: false,
            batch_size: 8,
            max_tokens: None,
            stride: None,
            progress: false,
        }
    }
}

/// The model's context in tokens and the `config.json` field it comes from: `n_positions` for
/// GPT-2, `max_position_embeddings` for the Llama family.
pub fn context_length(config: &ModelConfig) -> (usize, &'static str) {
    match config {
        ModelConfig::Gpt2(c) => (c.n_positions, "n_positions"),
        ModelConfig::Llama(c) => (c.max_position_embeddings, "max_position_embeddings"),
    }
}

/// Log-probabilities of the tokens of one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenScores {
    /// All token ids of the sequence.
    pub token_ids: Vec<u32>,
    /// Index of the first scored token (≥ 1).
    pub first_scored: usize,
    /// `logprobs[i] = log p(token_ids[first_scored + i] | token_ids[..first_scored + i])` (in
    /// sliding windows, given the tokens of the window before it).
    pub logprobs: Vec<f32>,
    /// Tokens dropped from the end of the text by [`ScoreOptions::max_tokens`] (not in
    /// `token_ids`).
    #[serde(default)]
    pub truncated: usize,
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

    /// Mean negative log-likelihood per scored token (NaN when nothing is scored: a mean over no
    /// tokens is undefined, and 0 would read as a perfect score).
    pub fn mean_nll(&self) -> f64 {
        if self.logprobs.is_empty() { f64::NAN } else { -self.sum_logprob() / self.count() as f64 }
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

/// Perplexity over several scored sequences (token-weighted): `exp(−Σ logprob / Σ count)`; NaN
/// when no token is scored.
pub fn corpus_perplexity(scores: &[TokenScores]) -> f64 {
    let (s, n) =
        scores.iter().fold((0.0, 0usize), |(s, n), x| (s + x.sum_logprob(), n + x.count()));
    if n == 0 { f64::NAN } else { (-s / n as f64).exp() }
}

/// Scores token sequences: the log-probability of every token from `first_scored[i]` on
/// (clamped to ≥ 1) given the tokens before it.
///
/// # Errors
/// [`Error::InvalidInput`] for empty sequences or mismatched lengths; [`Error::TooLong`] for a
/// sequence longer than GPT-2's `n_positions` (before any forward pass); errors of the forward
/// pass.
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
    // GPT-2 has no position past `n_positions`: refuse before any forward pass (a RoPE model
    // may be run past its context on purpose, as with `ScoreOptions::max_tokens`).
    if let Some(limit) = model.config().max_positions() {
        let (context, field) = context_length(model.config());
        if let Some((index, s)) = seqs.iter().enumerate().find(|(_, s)| s.len() > limit) {
            return Err(Error::TooLong { op: "score_ids", index, tokens: s.len(), context, field });
        }
    }
    score_batches(model, seqs, first_scored, batch_size, None)
}

/// [`score_ids`] without the argument checks, advancing `progress` by the tokens of each batch.
fn score_batches<M: CausalLm + ?Sized>(
    model: &M,
    seqs: &[Vec<u32>],
    first_scored: &[usize],
    batch_size: usize,
    progress: Option<&ProgressBar>,
) -> Result<Vec<TokenScores>> {
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
        if let Some(pb) = progress {
            pb.inc(chunk.iter().map(|s| s.len() as u64).sum());
        }
        let t = logits.size()[1];
        if t < 2 {
            for (s, &f) in chunk.iter().zip(starts) {
                out.push(TokenScores {
                    token_ids: s.clone(),
                    first_scored: f.max(1).min(s.len()),
                    logprobs: vec![],
                    truncated: 0,
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
            out.push(TokenScores {
                token_ids: s.clone(),
                first_scored: first,
                logprobs: lps,
                truncated: 0,
            });
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
/// A text longer than the model's context is refused before any forward pass unless
/// `opts.max_tokens` (truncation) or `opts.stride` (sliding windows) says what to do with it; see
/// the [module docs](self).
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
/// [`Error::NoTokenizer`]; [`Error::TooLong`] for a text longer than the context (with neither
/// option, or with a `max_tokens` above GPT-2's `n_positions`); [`Error::NothingToScore`] for a
/// text with fewer than two tokens; [`Error::InvalidInput`] for `batch_size` 0, `max_tokens`
/// below 2, a `stride` not below the window, or a
/// window above GPT-2's `n_positions`; as [`score_ids`].
pub fn score_texts<M: CausalLm + ?Sized>(
    model: &M,
    texts: &[&str],
    opts: &ScoreOptions,
) -> Result<Vec<TokenScores>> {
    const OP: &str = "score_texts";
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: OP })?;
    if opts.batch_size == 0 {
        return Err(Error::invalid(OP, "batch_size", "must be positive"));
    }
    if opts.max_tokens.is_some_and(|n| n < 2) {
        return Err(Error::invalid(
            OP,
            "max_tokens",
            "must be at least 2 (the first token of a text is only context)",
        ));
    }
    let (context, field) = context_length(model.config());
    // GPT-2 has no position embedding past its context; RoPE models can be asked to go beyond.
    let hard_limit = model.config().max_positions();
    let window = match opts.stride {
        None => None,
        Some(stride) => {
            let window = opts.max_tokens.unwrap_or(context);
            if let Some(limit) = hard_limit
                && window > limit
            {
                return Err(Error::invalid(
                    OP,
                    "max_tokens",
                    format!(
                        "a window of {window} tokens is longer than the model's context of \
                         {limit} tokens (`{field}`)"
                    ),
                ));
            }
            if stride == 0 || stride >= window {
                return Err(Error::invalid(
                    OP,
                    "stride",
                    format!(
                        "must be at least 1 and smaller than the window of {window} tokens, so \
                         that every token keeps some context (got {stride})"
                    ),
                ));
            }
            Some((window, stride))
        }
    };
    let bos = if opts.prepend_bos { bos_of(model, "prepend_bos")? } else { None };
    // Tokenise and check every text before any forward pass.
    let mut seqs = Vec::with_capacity(texts.len());
    let mut truncated = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let mut ids = tok.encode(text, opts.add_special_tokens)?;
        if let Some(b) = bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        if ids.len() < 2 {
            // The first token is only context: a perplexity over no tokens is undefined (not 1).
            return Err(Error::NothingToScore {
                op: OP,
                index: i,
                tokens: ids.len(),
                with_bos: bos.is_some(),
            });
        }
        let mut dropped = 0;
        if window.is_none() {
            if let Some(n) = opts.max_tokens
                && ids.len() > n
            {
                dropped = ids.len() - n;
                ids.truncate(n);
            }
            let allowed = match opts.max_tokens {
                Some(n) => hard_limit.map_or(n, |l| l.min(n)),
                None => context,
            };
            if ids.len() > allowed {
                return Err(Error::TooLong { op: OP, index: i, tokens: ids.len(), context, field });
            }
        }
        seqs.push(ids);
        truncated.push(dropped);
    }
    // The pieces fed to the model: whole texts, or windows (text, first scored, range).
    let mut pieces: Vec<Vec<u32>> = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (i, ids) in seqs.iter().enumerate() {
        match window {
            None => {
                pieces.push(ids.clone());
                starts.push(1);
                owner.push(i);
            }
            Some((w, stride)) => {
                for (begin, end, first) in windows(ids.len(), w, stride) {
                    pieces.push(ids[begin..end].to_vec());
                    starts.push(first);
                    owner.push(i);
                }
            }
        }
    }
    let pb = opts.progress.then(|| {
        let total = pieces.iter().map(|p| p.len() as u64).sum();
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "scoring {bar:30} {pos}/{len} tokens [{elapsed}, {eta} left]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    });
    let scored = score_batches(model, &pieces, &starts, opts.batch_size, pb.as_ref());
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let mut out: Vec<TokenScores> = seqs
        .into_iter()
        .zip(truncated)
        .map(|(ids, truncated)| TokenScores {
            first_scored: 1,
            token_ids: ids,
            logprobs: Vec::new(),
            truncated,
        })
        .collect();
    for (piece, i) in scored?.into_iter().zip(owner) {
        out[i].logprobs.extend(piece.logprobs);
    }
    Ok(out)
}

/// The windows `(begin, end, first_scored)` (`first_scored` relative to `begin`) of a sliding
/// window of `window` tokens moved by `stride < window` over `n` tokens: every token from 1 on is
/// scored by exactly one window.
fn windows(n: usize, window: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut begin, mut prev_end) = (0usize, 0usize);
    loop {
        let end = (begin + window).min(n);
        out.push((begin, end, (prev_end - begin).max(1)));
        if end == n {
            return out;
        }
        prev_end = end;
        begin += stride;
    }
}

/// Scores `continuation` given `prompt` for each pair: the prompt is tokenised with special
/// tokens (per `opts`), the continuation without, and only continuation tokens are scored.
///
/// # Errors
/// [`Error::NoTokenizer`]; [`Error::InvalidInput`] for an empty prompt or continuation; as
/// [`score_ids`] ([`Error::TooLong`] for a pair longer than GPT-2's `n_positions`).
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
