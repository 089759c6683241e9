//! Welleck et al.'s sequence-level unlikelihood: penalise repeated n-grams in the model's own
//! greedy continuations.
//!
//! Welleck, Kulikov, Roller, Dinan, Cho, Weston, "Neural Text Generation with Unlikelihood
//! Training", ICLR 2020, <https://arxiv.org/abs/1908.04319>; reference code
//! `facebookresearch/unlikelihood_training` (`custom/sequence_penalty_loss.py`,
//! `custom/gpt2/run_gpt2.py`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::UnlikelihoodConfig;

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, as_ids, as_mask, check_bt, check_logits,
    check_overflow, check_reduction, check_shape, count_and_check_ids, finish, masked_sum,
    token_losses,
};
use super::kernel::{self, fused, inject, logp_at, threads};
use super::rows::{RowLoss, Rows, eval_rows, log1m_p, neg_log1m_grad};
use super::ul_annotated::label_candidates;
use crate::bridge::CpuSlice;
use crate::{Error, LossOutput, Reduction, Result};

/// Which continuation tokens [`sequence_ul_loss`] penalises.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub enum SeqUlMask<'a> {
    /// Every token of an n-gram (`n = SequenceUlConfig::ngram_n`) that already occurred earlier
    /// in the same continuation ([`repeat_ngram_mask`]); the default.
    #[default]
    RepeatNgram,
    /// A caller mask `[B, Tc]` (bool or integer 0/1). Upstream's `'random'` candidates are this
    /// with a Bernoulli(0.5) mask drawn by the caller.
    Explicit(&'a Tensor),
}

/// Configuration of [`sequence_ul_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequenceUlConfig {
    /// n-gram length of [`SeqUlMask::RepeatNgram`] (default 4, the README and GPT-2 script value;
    /// fairseq's argparse default is 1).
    pub ngram_n: usize,
    /// Reduction (default `Mean` over valid continuation tokens, repeated or not: upstream's
    /// `ntokens`).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at penalised positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for SequenceUlConfig {
    fn default() -> Self {
        SequenceUlConfig {
            ngram_n: 4,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl SequenceUlConfig {
    /// Sets [`SequenceUlConfig::ngram_n`].
    pub fn with_ngram_n(mut self, n: usize) -> Self {
        self.ngram_n = n;
        self
    }

    /// Sets [`SequenceUlConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`SequenceUlConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`SequenceUlConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        if self.ngram_n < 1 {
            return Err(Error::InvalidConfig {
                op: "sequence_ul_loss",
                name: "ngram_n",
                reason: "must be at least 1".to_string(),
            });
        }
        check_reduction("sequence_ul_loss", self.reduction)
    }
}

/// Repeat mask of one sequence: for each start `j = 0 ..= len − n` whose window is entirely
/// valid, in order, mark the window if the n-gram was seen at an earlier start, then record it.
fn repeat_mask_row(tokens: &[i64], valid: &[bool], n: usize, out: &mut [bool]) {
    let mut seen: HashSet<&[i64]> = HashSet::new();
    if n == 0 || n > tokens.len() {
        return;
    }
    for j in 0..=tokens.len() - n {
        if !valid[j..j + n].iter().all(|&v| v) {
            continue;
        }
        let gram = &tokens[j..j + n];
        if !seen.insert(gram) {
            out[j..j + n].iter_mut().for_each(|m| *m = true);
        }
    }
}

/// The repeated-n-gram mask of continuations `[B, Tc]`: every token of an n-gram that already
/// occurred at an earlier start in the same continuation (overlaps count; the prefix is not
/// part of "seen"; windows touching an invalid position are skipped).
///
/// ```text
/// m[b, j..j+n) = 1  if  ŷ[b, j..j+n) = ŷ[b, i..i+n) for some i < j,   j = 0 … Tc − n
/// ```
///
/// Upstream loops over `range(len − n)` and so never tests the last n-gram:
/// `[0,1,2,3,0,1,2,3]` with `n = 4` gives all zeros upstream and `[0,0,0,0,1,1,1,1]` here.
///
/// Computed on the host (the tokens are read back once).
///
/// # Shapes
///
/// `continuation`: `[B, Tc]` integer; `valid`: optional `[B, Tc]` bool (default all true).
/// Returns `[B, Tc]` bool on the device of `continuation`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::InvalidConfig`] for `n = 0`.
///
/// # Example
///
/// ```
/// use amend_losses::token::repeat_ngram_mask;
/// use tch::Tensor;
///
/// let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3, 1]).reshape([1, 9]);
/// let m = repeat_ngram_mask(&y, None, 4)?;
/// assert_eq!(Vec::<bool>::try_from(m.reshape([-1]))?, [false, false, false, false, true, true, true, true, false]);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn repeat_ngram_mask(
    continuation: &Tensor,
    valid: Option<&Tensor>,
    n: usize,
) -> Result<Tensor> {
    const OP: &str = "repeat_ngram_mask";
    if n < 1 {
        return Err(Error::InvalidConfig {
            op: OP,
            name: "n",
            reason: "must be at least 1".into(),
        });
    }
    let size = continuation.size();
    let &[b, tc] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "continuation",
            expected: "[B, Tc]".to_string(),
            got: size,
        });
    };
    let device = continuation.device();
    let tokens = Vec::<i64>::try_from(
        &as_ids(OP, "continuation", continuation)?.f_reshape([-1])?.f_to(tch::Device::Cpu)?,
    )?;
    let valid = match valid {
        Some(v) => {
            check_shape(OP, "valid", v, &[b, tc], "[B, Tc] =", device)?;
            Vec::<bool>::try_from(
                &as_mask(OP, "valid", v)?.f_reshape([-1])?.f_to(tch::Device::Cpu)?,
            )?
        }
        None => vec![true; tokens.len()],
    };
    let mut mask = vec![false; tokens.len()];
    let tc = tc as usize;
    if tc > 0 {
        for ((tok, val), out) in tokens.chunks(tc).zip(valid.chunks(tc)).zip(mask.chunks_mut(tc)) {
            repeat_mask_row(tok, val, n, out);
        }
    }
    Ok(Tensor::f_from_slice(&mask)?.f_reshape([b, tc as i64])?.f_to(device)?)
}

/// The sequence-UL row formula on penalised rows: `−log(1 − p_ŷ)`.
pub(crate) struct SeqUlRows;

impl RowLoss for SeqUlRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let lp = rows.log_probs()?;
        let all = rows.labels.f_ones_like()?.f_to_kind(Kind::Bool)?;
        let cand = label_candidates(rows, &all)?;
        Ok(log1m_p(lp, &rows.z, &cand)?.lam.f_squeeze_dim(1)?.f_neg()?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let all = rows.labels.f_ones_like()?.f_to_kind(Kind::Bool)?;
        let cand = label_candidates(rows, &all)?;
        let lm = log1m_p(lp, &rows.z, &cand)?;
        let value = lm.lam.f_squeeze_dim(1)?.f_neg()?;
        let grad = if want_grad { Some(neg_log1m_grad(lp, &lp.p()?, &cand, &lm)?) } else { None };
        Ok((value, grad))
    }
}

/// Sequence-level unlikelihood loss on the model's own continuations.
///
/// ```text
/// ℓ_t = −m_t · log(1 − p(ŷ_t | prefix, ŷ_<t))        ∂ℓ_t/∂z = m_t · p_ŷ (e_ŷ − q⁽ŷ⁾)
/// ```
///
/// `ŷ` is a continuation produced by the model itself (greedy, in eval mode, for example with
/// [`greedy_continuation`]); `z[b, t]` are the logits that score `ŷ[b, t]` given the prefix and
/// `ŷ[b, <t]`, recomputed with gradient (there is no gradient through the argmax). `m` is the
/// mask of [`SeqUlMask`] (default: repeated `ngram_n`-grams). There is no `α`: the trainer
/// mixes this loss with MLE updates (upstream uses it on half of the updates).
///
/// Every valid continuation token counts, penalised or not (`count = #valid`, upstream's
/// `ntokens`), so `Mean` matches upstream's normalisation. `log(1 − p)` is exact; upstream
/// clamps `1 − p` at `1e-20`.
///
/// # Metrics
///
/// `seq_ul/repeat_fraction` (fraction of valid tokens penalised) and `seq_ul/repeat_mass` (mean
/// `p_ŷ` over penalised tokens).
///
/// # Shapes
///
/// * `logits`: `[B, Tc, V]` (use [`continuation_logits`] to cut them from a full forward pass).
/// * `continuation`: `[B, Tc]` integer; `valid`: optional `[B, Tc]` bool (default all true).
/// * Output: see [`Reduction`]; one part `"tokens"` with `count = #valid`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::VocabTooSmall`], [`Error::LabelOutOfRange`] (a valid continuation token outside
/// `[0, V)`), [`Error::NonFiniteLogits`], [`Error::InvalidConfig`] (`ngram_n = 0`).
///
/// # Example
///
/// ```
/// use amend_losses::token::{SeqUlMask, SequenceUlConfig, sequence_ul_loss};
/// use tch::{Kind, Tensor};
///
/// // "a b a b" with n = 2: the second "a b" is a repeat; each row puts p = 0.9 on its token.
/// let y = Tensor::from_slice(&[0i64, 1, 0, 1]).reshape([1, 4]);
/// let logits = y.one_hot(3).to_kind(Kind::Float) * (0.9f64 / 0.05).ln();
/// let cfg = SequenceUlConfig::default().with_ngram_n(2);
/// let out = sequence_ul_loss(&logits, &y, None, SeqUlMask::RepeatNgram, &cfg)?;
/// // two penalised tokens, −log(0.1) each, averaged over 4 valid tokens
/// assert!((out.loss.double_value(&[]) - 2.0 * 10f64.ln() / 4.0).abs() < 1e-5);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn sequence_ul_loss(
    logits: &Tensor,
    continuation: &Tensor,
    valid: Option<&Tensor>,
    mask: SeqUlMask<'_>,
    cfg: &SequenceUlConfig,
) -> Result<LossOutput> {
    const OP: &str = "sequence_ul_loss";
    cfg.validate()?;
    let (dims, kind) = check_logits(OP, logits)?;
    let device = logits.device();
    check_bt(OP, "continuation", continuation, dims, device)?;
    if let Some(v) = valid {
        check_bt(OP, "valid", v, dims, device)?;
    }
    if let SeqUlMask::Explicit(m) = mask {
        check_bt(OP, "mask", m, dims, device)?;
    }
    let tokens = as_ids(OP, "continuation", continuation)?;
    let valid_mask = match valid {
        Some(v) => as_mask(OP, "valid", v)?,
        None => Tensor::f_ones([dims.b, dims.t], (Kind::Bool, device))?,
    };
    let count = count_and_check_ids(OP, "continuation", &tokens, &valid_mask, dims.v)?;
    let m = match mask {
        SeqUlMask::RepeatNgram => repeat_ngram_mask(&tokens, Some(&valid_mask), cfg.ngram_n)?,
        SeqUlMask::Explicit(m) => as_mask(OP, "mask", m)?,
    };
    let penalised = m.f_logical_and(&valid_mask)?;
    let n_pen = i64::try_from(&penalised.f_sum(Kind::Int64)?)?;
    let plan = Plan::new(dims, kind, tokens, penalised, n_pen)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = sequence_ul_kernel(OP, &plan, logits, count, cfg)?
    {
        return Ok(out);
    }
    let prep = plan.select(OP, logits, None, cfg.non_finite)?;
    let mut sink = MetricSink::default();
    sink.add_value("seq_ul/repeat_fraction", n_pen as f64, count as f64)?;
    let row_loss = eval_rows(&SeqUlRows, &prep.rows, cfg.backend, &mut |rows, _| {
        let p_y = rows.log_probs()?.at(&rows.labels)?.f_exp()?;
        sink.add("seq_ul/repeat_mass", &p_y.f_sum(None::<Kind>)?, n_pen as f64)
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits])?;
    finish(OP, tok, count, cfg.reduction, sink.finish()?)
}

/// The `count` of [`sequence_ul_loss`]: the number of valid continuation tokens (all of them
/// when `valid` is `None`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `valid` differs from `continuation` in shape,
/// [`Error::DtypeMismatch`] for a float `valid`.
///
/// # Example
///
/// ```
/// use amend_losses::token::count_active_sequence_ul;
/// use tch::Tensor;
///
/// let y = Tensor::from_slice(&[4i64, 4, 4, 4]).reshape([1, 4]);
/// let valid = Tensor::from_slice(&[true, true, true, false]).reshape([1, 4]);
/// assert_eq!(count_active_sequence_ul(&y, Some(&valid))?, 3.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn count_active_sequence_ul(continuation: &Tensor, valid: Option<&Tensor>) -> Result<f64> {
    const OP: &str = "count_active_sequence_ul";
    match valid {
        Some(v) => {
            check_shape(
                OP,
                "valid",
                v,
                &continuation.size(),
                "the shape of continuation",
                continuation.device(),
            )?;
            Ok(i64::try_from(&as_mask(OP, "valid", v)?.f_sum(Kind::Int64)?)? as f64)
        }
        None => Ok(continuation.numel() as f64),
    }
}

/// A greedy continuation produced by [`greedy_continuation`].
#[derive(Debug)]
pub struct GreedyContinuation {
    /// Continuation tokens `ŷ` `[B, Tc]` (i64). After a row's EOS, its tokens are EOS.
    pub tokens: Tensor,
    /// Valid continuation positions `[B, Tc]` bool: up to and including the first EOS.
    pub valid: Tensor,
    /// Prefix followed by the continuation `[B, P + Tc]`: feed it to the model (with gradient)
    /// and cut the logits with [`continuation_logits`].
    pub sequence: Tensor,
    /// Prefix length `P`.
    pub prefix_len: i64,
}

/// Greedy decoding through a caller-supplied model step, for [`sequence_ul_loss`].
///
/// Starting from `prefix` `[B, P]`, calls `next_token_logits(tokens)` with the tokens so far
/// `[B, P + t]` and appends `argmax` of the returned `[B, V]` logits, `max_new_tokens` times
/// (or until every row has emitted `eos_id`). Runs under `no_grad`. The closure may keep its own
/// KV cache and only read the last column. This keeps `amend-losses` independent of any model
/// crate: wrap your model's forward (eval mode) in the closure.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] / [`Error::DtypeMismatch`] for a bad prefix or bad logits returned
/// by the closure, [`Error::Callback`] when the closure fails.
///
/// # Example
///
/// ```
/// use amend_losses::token::{SeqUlMask, SequenceUlConfig, continuation_logits, greedy_continuation, sequence_ul_loss};
/// use tch::{Kind, Tensor};
///
/// // A "model" that always predicts token (last + 1) mod 3: its continuations repeat.
/// let model = |tokens: &Tensor| -> Result<Tensor, tch::TchError> {
///     let seq = tokens.size()[1];
///     let next = (tokens.narrow(1, seq - 1, 1).squeeze_dim(1) + 1).remainder(3);
///     Ok(next.one_hot(3).to_kind(Kind::Float) * 5.0)
/// };
/// let prefix = Tensor::from_slice(&[0i64]).reshape([1, 1]);
/// let cont = greedy_continuation(&prefix, 6, None, model)?;
/// assert_eq!(Vec::<i64>::try_from(cont.tokens.reshape([-1]))?, [1, 2, 0, 1, 2, 0]);
///
/// // Recompute the logits of the whole sequence with gradient and cut the continuation part.
/// let full: Vec<Tensor> = (0..cont.sequence.size()[1])
///     .map(|t| model(&cont.sequence.narrow(1, 0, t + 1)).unwrap())
///     .collect();
/// let logits = Tensor::stack(&full, 1).set_requires_grad(true);
/// let z = continuation_logits(&logits, cont.prefix_len)?;
/// let cfg = SequenceUlConfig::default().with_ngram_n(3);
/// let out = sequence_ul_loss(&z, &cont.tokens, Some(&cont.valid), SeqUlMask::RepeatNgram, &cfg)?;
/// assert_eq!(out.metrics.mean("seq_ul/repeat_fraction"), Some(0.5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn greedy_continuation<F, E>(
    prefix: &Tensor,
    max_new_tokens: usize,
    eos_id: Option<i64>,
    mut next_token_logits: F,
) -> Result<GreedyContinuation>
where
    F: FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    const OP: &str = "greedy_continuation";
    let size = prefix.size();
    let &[b, p] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "prefix",
            expected: "[B, P]".to_string(),
            got: size,
        });
    };
    let device = prefix.device();
    let mut seq = as_ids(OP, "prefix", prefix)?;
    let mut done = Tensor::f_zeros([b], (Kind::Bool, device))?;
    let mut valid_cols = Vec::with_capacity(max_new_tokens);
    let _guard = tch::no_grad_guard();
    for _ in 0..max_new_tokens {
        let logits =
            next_token_logits(&seq).map_err(|e| Error::Callback { op: OP, source: e.into() })?;
        let ls = logits.size();
        if ls.len() != 2 || ls[0] != b {
            return Err(Error::ShapeMismatch {
                op: OP,
                name: "next_token_logits",
                expected: format!("[B, V] with B = {b}"),
                got: ls,
            });
        }
        super::common::compute_kind(OP, "next_token_logits", &logits)?;
        let mut next = logits.f_argmax(-1, false)?.f_to(device)?;
        valid_cols.push(done.f_logical_not()?);
        if let Some(eos) = eos_id {
            next = next.f_masked_fill(&done, eos)?;
            done = done.f_logical_or(&next.f_eq(eos)?)?;
        }
        seq = Tensor::f_cat(&[&seq, &next.f_unsqueeze(1)?], 1)?;
        if eos_id.is_some() && bool::try_from(&done.f_all()?)? {
            break;
        }
    }
    let tc = valid_cols.len() as i64;
    let valid = if valid_cols.is_empty() {
        Tensor::f_zeros([b, 0], (Kind::Bool, device))?
    } else {
        Tensor::f_stack(&valid_cols, 1)?
    };
    let tokens = seq.f_narrow(1, p, tc)?;
    Ok(GreedyContinuation { tokens, valid, sequence: seq, prefix_len: p })
}

/// The logits that score a continuation: `logits[:, P − 1 .. P − 1 + Tc]` of a forward pass over
/// `[prefix ++ continuation]` of length `P + Tc` (the logits at position `t` predict token
/// `t + 1`).
///
/// # Shapes
///
/// `logits`: `[B, P + Tc, V]` → `[B, Tc, V]` (a view).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `logits` is not 3-D, [`Error::InvalidInput`] unless
/// `1 ≤ prefix_len ≤ P + Tc`.
///
/// # Example
///
/// ```
/// use amend_losses::token::continuation_logits;
/// use tch::{Kind, Tensor};
///
/// let logits = Tensor::zeros([2, 7, 5], (Kind::Float, tch::Device::Cpu));
/// assert_eq!(continuation_logits(&logits, 3)?.size(), [2, 4, 5]);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn continuation_logits(logits: &Tensor, prefix_len: i64) -> Result<Tensor> {
    const OP: &str = "continuation_logits";
    let size = logits.size();
    let &[_, len, _] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "logits",
            expected: "[B, P + Tc, V]".to_string(),
            got: size,
        });
    };
    if prefix_len < 1 || prefix_len > len {
        return Err(Error::InvalidInput {
            op: OP,
            name: "prefix_len",
            reason: format!("must be in [1, {len}], got {prefix_len}"),
        });
    }
    Ok(logits.f_narrow(1, prefix_len - 1, len - prefix_len)?)
}

/// [`sequence_ul_loss`] on the fused unlikelihood kernel: one candidate per penalised row (its
/// continuation token), no NLL term, `α = 1`. `count` is the number of valid tokens (the
/// normalisation); `None`: a row was rejected as non-finite, take the composite path.
fn sequence_ul_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    count: i64,
    cfg: &SequenceUlConfig,
) -> Result<Option<LossOutput>> {
    let cand = plan.labels.f_where_scalarother(&plan.active, -1)?.f_contiguous()?;
    let ids = CpuSlice::<i64>::strict(&cand, op, "continuation")?;
    let kcfg = UnlikelihoodConfig::default().with_alpha(1.0).with_threads(threads());
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        let c = amend_kernels::Candidates::Padded { ids: ids.as_slice(), width: 1 };
        amend_kernels::unlikelihood(io, vocab, None, c, None, &kcfg, loss)
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let (l_y, _) = tch::no_grad(|| logp_at(op, logits, &plan.labels, &plan.active))?;
    let mut sink = MetricSink::default();
    sink.add_value("seq_ul/repeat_fraction", plan.count as f64, count as f64)?;
    sink.add("seq_ul/repeat_mass", &masked_sum(&l_y.f_exp()?, &plan.active)?, plan.count as f64)?;
    check_overflow(op, &tok, cfg.non_finite, &[logits])?;
    finish(op, tok, count, cfg.reduction, sink.finish()?).map(Some)
}
