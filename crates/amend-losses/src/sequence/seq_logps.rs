//! The shared primitive of every sequence-level loss: per-sequence log-probabilities of the
//! response tokens.
//!
//! Every loss of [`crate::sequence`] is written in terms of the summed log-probability `S` of a
//! response, its token count `n` and the length-normalised mean `A = S/n`, as TRL's
//! `dpo_trainer.py` does (selected-token log-softmax of the shifted logits, non-completion
//! positions zeroed, summed over the sequence).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::common::{
    bool_mask, check_device, check_finite, check_float, check_integer, check_rank, check_shape,
    compute_kind, first_true, nonempty, safe_mean, with_setters,
};
use amend_kernels::{SelectedLogpConfig, SelectedLogpOut};

use crate::bridge::CpuSlice;
use crate::token::kernel;
use crate::token::{NonFinitePolicy, TokenBackend};
use crate::{Error, Result};

/// What a length-normalised loss does with a sequence that has no scored token (`n = 0`).
///
/// `A = S/n`, IPO, SimPO, ORPO, SimNPO, the CP statistic φ and the RRHF/NEAT scores are undefined
/// for such a sequence. TRL clamps `n ≥ 1` in IPO; the official SimPO and the ORPO trainer divide
/// unguarded (NaN). `amend` makes the choice explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EmptyPolicy {
    /// Return [`Error::EmptySequence`] naming the first empty sequence (default).
    #[default]
    Error,
    /// Drop the example (a pair, a sequence, or one candidate of a ranking group) from the
    /// values, sums and counts: it contributes exactly 0 with a zero gradient.
    Mask,
}

/// Options of [`seq_logps`] and [`seq_logps_fused_linear`](super::seq_logps_fused_linear).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeqLogpsConfig {
    /// Also return the per-token log-probs `[B, T−1]` (exact zeros at unscored positions) in
    /// [`SeqLogps::per_token`]. Default `false`. Contrastive perplexity's reference form, ORPO's
    /// prompt-and-response NLL via [`SeqLogps::f_restrict`] and token-level diagnostics need it.
    pub return_per_token: bool,
    /// Also compute the by-products TRL logs (`mean_token_accuracy`, `logits/chosen`) into
    /// [`SeqLogps::stats`]. Default `false`: it costs an argmax and a sum over the scored rows.
    pub token_stats: bool,
    /// What to do with a non-finite log-prob at a scored position. Default
    /// [`NonFinitePolicy::Error`]: a NaN or `+inf` logit in a scored row, or a row with no finite
    /// logit, is [`Error::NonFiniteLogits`]; a target token whose logit is `−inf` (probability 0,
    /// `S = −inf`) is [`Error::NonFinite`]. [`NonFinitePolicy::Propagate`] skips the check and its
    /// device sync. `−inf` logits off the target are always fine (vocabulary masks), and rows
    /// that are not scored are never read, so NaN there is always harmless.
    pub non_finite: NonFinitePolicy,
    /// How the selected-token log-probs and their gradient are computed. Default
    /// [`TokenBackend::Auto`]: the fused kernel of `amend-kernels`
    /// ([`selected_logp`](amend_kernels::selected_logp) with a row scale of −1, which writes
    /// `log p_y` and `e_y − p` in one sweep, injected into autograd per row) for CPU f32 logits
    /// (or hidden states, on the fused-linear path), tch ops (`logsumexp` and `gather` on the
    /// scored rows) everywhere else. [`TokenBackend::Kernel`] insists on the kernel (an error for
    /// other inputs); [`TokenBackend::Composite`] and [`TokenBackend::ClosedForm`] both select
    /// the tch ops. Both give the same values and gradients to f32 rounding; a batch the kernel
    /// rejects as non-finite is evaluated with tch ops, so [`SeqLogpsConfig::non_finite`] behaves
    /// the same on every backend.
    pub backend: TokenBackend,
}

with_setters!(SeqLogpsConfig {
    with_return_per_token => return_per_token: bool,
    with_token_stats => token_stats: bool,
    with_non_finite => non_finite: NonFinitePolicy,
    with_backend => backend: TokenBackend,
});

/// Token-level by-products of [`seq_logps`], as exact `(sum, count)` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TokenStats {
    /// Scored tokens whose target is the argmax of the logits (first maximum on ties).
    pub correct: f64,
    /// Scored tokens.
    pub scored: f64,
    /// Sum of all logits of the scored rows.
    pub logit_sum: f64,
    /// Number of logits summed (`scored · V`).
    pub logit_count: f64,
}

impl TokenStats {
    /// `correct / scored` (TRL `mean_token_accuracy`); 0 without scored tokens.
    pub fn accuracy(&self) -> f64 {
        if self.scored == 0.0 { 0.0 } else { self.correct / self.scored }
    }

    /// Mean logit over the scored rows and the vocabulary (TRL `logits/chosen`); 0 when empty.
    pub fn mean_logit(&self) -> f64 {
        if self.logit_count == 0.0 { 0.0 } else { self.logit_sum / self.logit_count }
    }
}

/// Per-sequence log-probabilities: the input of every sequence-level loss.
///
/// ```text
/// lp[b,t] = log_softmax(logits[b,t,:])[input_ids[b,t+1]]      t = 0 .. T−2
/// m[b,t]  = completion_mask[b,t+1]
/// S[b]    = Σ_t m[b,t]·lp[b,t]     n[b] = Σ_t m[b,t]     A[b] = S[b]/n[b]
/// ```
///
/// Built by [`seq_logps`] (from logits), by
/// [`seq_logps_fused_linear`](super::seq_logps_fused_linear) (from hidden states and the LM head)
/// or by [`SeqLogps::from_sums`] (from precomputed sums, for example a reference model's cached
/// log-probs or the CLI's parity inputs).
#[derive(Debug)]
pub struct SeqLogps {
    /// `S`, `[B]`, f32 (f64 for f64 inputs), on the autograd graph of the logits.
    pub sum: Tensor,
    /// `n`, `[B]` i64: the number of scored tokens.
    pub len: Tensor,
    /// `lp` with exact zeros at unscored positions, `[B, T−1]`, when requested
    /// ([`SeqLogpsConfig::return_per_token`]; always present on the fused-linear path).
    pub per_token: Option<Tensor>,
    /// `m`, `[B, T−1]` bool; `None` when built from precomputed sums.
    pub mask: Option<Tensor>,
    /// Token accuracy and mean logit, when requested ([`SeqLogpsConfig::token_stats`]).
    pub stats: Option<TokenStats>,
}

impl SeqLogps {
    /// Wraps precomputed sums `S [B]` (any float kind) and counts `n [B]` (any integer kind).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] unless both are `[B]`, [`Error::DtypeMismatch`] for a non-float
    /// `sum` or a non-integer `len`, [`Error::DeviceMismatch`], [`Error::InvalidInput`] for a
    /// negative count, [`Error::NonFinite`] for a non-finite sum.
    ///
    /// ```
    /// use amend_losses::sequence::SeqLogps;
    /// use tch::Tensor;
    ///
    /// let s = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f32, -12.0]), &Tensor::from_slice(&[5i64, 6]))?;
    /// assert_eq!(Vec::<f32>::try_from(s.f_mean()?)?, vec![-2.0, -2.0]);
    /// # Ok::<(), amend_losses::Error>(())
    /// ```
    pub fn from_sums(sum: &Tensor, len: &Tensor) -> Result<SeqLogps> {
        const OP: &str = "SeqLogps::from_sums";
        check_rank(OP, "sum", sum, 1, "[B]")?;
        check_float(OP, "sum", sum)?;
        check_integer(OP, "len", len)?;
        let b = sum.size()[0];
        check_shape(OP, "len", len, &[b], || format!("[B] = [{b}] matching `sum`"))?;
        check_device(OP, "len", len, sum.device())?;
        let len = len.f_to_kind(Kind::Int64)?;
        if let Some((index, count)) = first_true(&len.f_lt(0)?)? {
            return Err(Error::InvalidInput {
                op: OP,
                name: "len",
                reason: format!("{count} negative counts (first at {index:?})"),
            });
        }
        check_finite(OP, "sum", sum, None)?;
        Ok(SeqLogps { sum: sum.shallow_clone(), len, per_token: None, mask: None, stats: None })
    }

    /// Number of sequences `B`.
    pub fn batch_size(&self) -> i64 {
        self.sum.size()[0]
    }

    /// `A = S/n`, the length-normalised mean log-prob, `[B]`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptySequence`] naming the first sequence with `n = 0`.
    pub fn f_mean(&self) -> Result<Tensor> {
        let valid = nonempty("SeqLogps::f_mean", &self.len, None, EmptyPolicy::Error)?;
        safe_mean(&self.sum, &self.len, &valid)
    }

    /// Sequences `start .. start + length` (for example the chosen half of a concatenated
    /// chosen/rejected batch).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the range is outside `[0, B]`.
    pub fn f_narrow(&self, start: i64, length: i64) -> Result<SeqLogps> {
        let b = self.batch_size();
        if start < 0 || length < 0 || start + length > b {
            return Err(Error::InvalidInput {
                op: "SeqLogps::f_narrow",
                name: "range",
                reason: format!("{start}..{} is outside 0..{b}", start + length),
            });
        }
        let nar = |t: &Tensor| t.f_narrow(0, start, length);
        Ok(SeqLogps {
            sum: nar(&self.sum)?,
            len: nar(&self.len)?,
            per_token: self.per_token.as_ref().map(nar).transpose()?,
            mask: self.mask.as_ref().map(nar).transpose()?,
            stats: None,
        })
    }

    /// Splits into sequences `0 .. mid` and `mid .. B`; TRL concatenates chosen and rejected
    /// responses into one batch, so `f_split_at(B / 2)` gives `(chosen, rejected)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `mid` is outside `[0, B]`.
    pub fn f_split_at(&self, mid: i64) -> Result<(SeqLogps, SeqLogps)> {
        let b = self.batch_size();
        Ok((self.f_narrow(0, mid)?, self.f_narrow(mid, b - mid.clamp(0, b))?))
    }

    /// The same log-probs restricted to a sub-mask: `completion_mask` is `[B, T]` in the
    /// coordinates of the input ids (the position of a token, not of the logits predicting it),
    /// and must select a subset of the positions scored here.
    ///
    /// Typical use: score prompt and response once with the attention mask and
    /// `return_per_token`, then restrict to the response for ORPO's odds ratio and keep the full
    /// one for its NLL term.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] without `per_token` and `mask`, or when the sub-mask selects an
    /// unscored position; [`Error::ShapeMismatch`], [`Error::DeviceMismatch`].
    pub fn f_restrict(&self, completion_mask: &Tensor) -> Result<SeqLogps> {
        const OP: &str = "SeqLogps::f_restrict";
        let (Some(per_token), Some(mask)) = (&self.per_token, &self.mask) else {
            return Err(Error::InvalidInput {
                op: OP,
                name: "self",
                reason: "needs per-token log-probs (SeqLogpsConfig::return_per_token) and a mask"
                    .into(),
            });
        };
        let (b, tm1) = (mask.size()[0], mask.size()[1]);
        check_shape(OP, "completion_mask", completion_mask, &[b, tm1 + 1], || {
            format!("[B, T] = [{b}, {}]", tm1 + 1)
        })?;
        check_device(OP, "completion_mask", completion_mask, per_token.device())?;
        let sub = bool_mask(OP, "completion_mask", completion_mask)?.f_narrow(1, 1, tm1)?;
        if let Some((index, count)) = first_true(&sub.f_logical_and(&mask.f_logical_not()?)?)? {
            return Err(Error::InvalidInput {
                op: OP,
                name: "completion_mask",
                reason: format!(
                    "selects {count} unscored positions (first at shifted index {index:?})"
                ),
            });
        }
        let pt = per_token.f_where_scalarother(&sub, 0.0)?;
        let sum = pt.f_sum_dim_intlist([1i64].as_slice(), false, pt.kind())?;
        let len = sub.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?;
        Ok(SeqLogps { sum, len, per_token: Some(pt), mask: Some(sub), stats: None })
    }

    /// A copy cut off the autograd graph (a reference model's log-probs are constants).
    pub fn f_detach(&self) -> Result<SeqLogps> {
        Ok(SeqLogps {
            sum: self.sum.f_detach()?,
            len: self.len.shallow_clone(),
            per_token: self.per_token.as_ref().map(|t| t.f_detach()).transpose()?,
            mask: self.mask.as_ref().map(|t| t.shallow_clone()),
            stats: self.stats,
        })
    }
}

/// The active (scored) rows of a batch, shared by the logits and the fused-linear paths.
#[derive(Debug)]
pub(crate) struct ActiveRows {
    /// Indices into the `[B·T]` rows of the logits (or hidden states), ascending.
    pub rows: Tensor,
    /// Indices into the `[B·(T−1)]` shifted positions.
    pub idx: Tensor,
    /// Target token of each active row.
    pub targets: Tensor,
    /// `m`, `[B, T−1]` bool.
    pub mask: Tensor,
    /// `n`, `[B]` i64.
    pub len: Tensor,
}

/// Validates ids and mask against `[B, T]` and vocabulary `V`, and lists the scored rows.
pub(crate) fn active_rows(
    op: &'static str,
    b: i64,
    t: i64,
    vocab: i64,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    device: tch::Device,
) -> Result<ActiveRows> {
    check_integer(op, "input_ids", input_ids)?;
    check_shape(op, "input_ids", input_ids, &[b, t], || format!("[B, T] = [{b}, {t}]"))?;
    check_shape(op, "completion_mask", completion_mask, &[b, t], || {
        format!("[B, T] = [{b}, {t}]")
    })?;
    check_device(op, "input_ids", input_ids, device)?;
    check_device(op, "completion_mask", completion_mask, device)?;
    if vocab < 2 {
        return Err(Error::VocabTooSmall { op, vocab });
    }
    let mask_full = bool_mask(op, "completion_mask", completion_mask)?;
    let tm1 = (t - 1).max(0);
    let mask = mask_full.f_narrow(1, t - tm1, tm1)?; // [B, T−1]: position t+1 scores row t
    let ids = input_ids.f_to_kind(Kind::Int64)?.f_narrow(1, t - tm1, tm1)?;
    let out_of_range = ids.f_lt(0)?.f_logical_or(&ids.f_ge(vocab)?)?.f_logical_and(&mask)?;
    if let Some((index, count)) = first_true(&out_of_range)? {
        let value = i64::try_from(ids.f_get(index[0])?.f_get(index[1])?)?;
        return Err(Error::LabelOutOfRange {
            op,
            name: "input_ids",
            value,
            index: vec![index[0], index[1] + 1],
            count,
            vocab,
        });
    }
    let idx = mask.f_reshape([-1])?.f_nonzero()?.f_reshape([-1])?; // [N]
    let rows =
        if tm1 > 0 { idx.f_add(&idx.f_floor_divide_scalar(tm1)?)? } else { idx.shallow_clone() };
    let targets = ids.f_reshape([-1])?.f_index_select(0, &idx)?;
    let len = mask.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?;
    Ok(ActiveRows { rows, idx, targets, mask, len })
}

/// Log-probabilities `logits[r, y] − lse(logits[r, :])` of the selected rows `r` of a `[R, V]`
/// logits matrix, computed in `kind` (f32, or f64 for f64 inputs), with gradient
/// `onehot(y) − softmax` into those rows and nothing into the others.
///
/// On the kernel backend (CPU f32 logits with [`TokenBackend::Auto`] or
/// [`TokenBackend::Kernel`]) the fused selected-token kernel of `amend-kernels` computes value
/// and gradient in one sweep over the logits' own storage (row scale −1 on the selected rows, 0
/// elsewhere: `loss = log p_y`, `grad = e_y − p`), injected per row through
/// [`crate::bridge`]. Otherwise the tch composite selects the rows first (masked rows are never
/// read), then takes one `logsumexp` and one `gather`: the `[N, V]` log-softmax is never built.
/// A batch the kernel rejects as non-finite takes the composite.
pub(crate) fn selected_token_logps(
    op: &'static str,
    logits2d: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    kind: Kind,
    backend: TokenBackend,
) -> Result<Tensor> {
    if kernel::use_kernel(op, backend, logits2d)?
        && let Some(lp) = selected_token_logps_kernel(op, logits2d, rows, targets)?
    {
        return Ok(lp);
    }
    let x = logits2d.f_index_select(0, rows)?.f_to_kind(kind)?;
    let lse = x.f_logsumexp([1i64].as_slice(), false)?;
    let xy = x.f_gather(1, &targets.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?;
    Ok(xy.f_sub(&lse)?)
}

/// The kernel half of [`selected_token_logps`]; `None` when a selected row is not finite.
fn selected_token_logps_kernel(
    op: &'static str,
    logits2d: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
) -> Result<Option<Tensor>> {
    let r_total = logits2d.size()[0];
    let n = rows.size()[0];
    let device = logits2d.device();
    let labels =
        Tensor::f_zeros([r_total], (Kind::Int64, device))?.f_index_copy(0, rows, targets)?;
    let scale = Tensor::f_zeros([r_total], (Kind::Float, device))?.f_index_fill(0, rows, -1.0)?;
    let active = scale.f_ne(0.0)?;
    let ys = CpuSlice::<i64>::strict(&labels, op, "input_ids")?;
    let ss = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let cfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(kernel::threads());
    let Some(fused) = kernel::fused(op, logits2d, |io, vocab, loss| {
        let out = SelectedLogpOut::new(loss);
        amend_kernels::selected_logp(io, vocab, ys.as_slice(), Some(ss.as_slice()), &cfg, out)
    })?
    else {
        return Ok(None);
    };
    let lp = kernel::inject(logits2d, &fused, &active, n, crate::Reduction::Sum)?;
    Ok(Some(lp.f_index_select(0, rows)?))
}

/// Scatters per-row values `[N]` into `[B, T−1]` (zeros elsewhere) and sums each sequence.
pub(crate) fn assemble(
    lp_rows: &Tensor,
    active: &ActiveRows,
    b: i64,
    tm1: i64,
) -> Result<(Tensor, Tensor)> {
    let zeros = Tensor::f_zeros([b * tm1], (lp_rows.kind(), lp_rows.device()))?;
    let per_token = zeros.f_index_copy(0, &active.idx, lp_rows)?.f_reshape([b, tm1])?;
    let sum = per_token.f_sum_dim_intlist([1i64].as_slice(), false, lp_rows.kind())?;
    Ok((sum, per_token))
}

/// Per-sequence log-probabilities of the response tokens from logits.
///
/// ```text
/// lp[b,t] = logits[b,t,y] − lse(logits[b,t,:]),   y = input_ids[b,t+1]       (f32; f64 for f64)
/// S[b]    = Σ_t m[b,t]·lp[b,t],   m[b,t] = completion_mask[b,t+1],   n[b] = Σ_t m[b,t]
/// ∂lp[b,t]/∂logits[b,t,v] = onehot(y)_v − softmax(logits[b,t,:])_v
/// ```
///
/// Only the scored rows are read: they are selected before the arithmetic, so an unscored row
/// (prompt, padding, the last position) contributes exactly 0 and receives exactly 0 gradient,
/// even when it holds NaN. bf16 and f16 logits are upcast row by row to f32; the `[B, T−1, V]`
/// log-softmax is never materialised. Call it under `tch::no_grad` for a reference model (its
/// sums are then constants). For hidden states plus an LM head, use
/// [`seq_logps_fused_linear`](super::seq_logps_fused_linear), which never builds `[N, V]`.
///
/// # Shapes
///
/// * `logits`: `[B, T, V]`, any float kind
/// * `input_ids`: `[B, T]`, integer
/// * `completion_mask`: `[B, T]`, bool or 0/1 (1 on response tokens, including a trained EOS)
/// * returns [`SeqLogps`] with `sum [B]`, `len [B]`, `mask [B, T−1]`, optionally `per_token`
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::VocabTooSmall`] (`V < 2`), [`Error::LabelOutOfRange`] (a scored target outside
/// `[0, V)`; unscored positions may hold anything, such as `-100`), [`Error::InvalidInput`] (mask
/// values other than 0/1), [`Error::NonFiniteLogits`] / [`Error::NonFinite`] (a non-finite
/// log-prob at a scored position, see [`SeqLogpsConfig::non_finite`]), [`Error::Tch`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{seq_logps, SeqLogpsConfig};
/// use tch::{Kind, Tensor};
///
/// // One sequence of 4 tokens over a vocabulary of 3; the last two tokens are the response.
/// let logits = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 1.0, 2.0, -0.5, 0.0, 3.0, -1.0, 0.3, 0.1, 0.2])
///     .view([1, 4, 3])
///     .set_requires_grad(true);
/// let ids = Tensor::from_slice(&[0i64, 2, 1, 2]).view([1, 4]);
/// let mask = Tensor::from_slice(&[0i64, 0, 1, 1]).view([1, 4]);
/// let lp = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default())?;
/// assert!((f64::try_from(&lp.sum)? + 4.4374229356).abs() < 1e-5);
/// assert_eq!(i64::try_from(&lp.len)?, 2);
/// lp.sum.sum(Kind::Float).backward(); // rows 0 and 3 get exactly zero gradient
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn seq_logps(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    cfg: &SeqLogpsConfig,
) -> Result<SeqLogps> {
    const OP: &str = "seq_logps";
    check_rank(OP, "logits", logits, 3, "[B, T, V]")?;
    check_float(OP, "logits", logits)?;
    let (b, t, v) = (logits.size()[0], logits.size()[1], logits.size()[2]);
    let active = active_rows(OP, b, t, v, input_ids, completion_mask, logits.device())?;
    let kind = compute_kind(logits.kind());
    let tm1 = (t - 1).max(0);
    let logits2d = logits.f_reshape([b * t, v])?;
    let lp_rows =
        selected_token_logps(OP, &logits2d, &active.rows, &active.targets, kind, cfg.backend)?;
    if cfg.non_finite == NonFinitePolicy::Error {
        check_lp_finite(OP, &lp_rows, &active, tm1, |r| {
            Ok(logits2d.f_get(i64::try_from(active.rows.f_get(r)?)?)?)
        })?;
    }
    let stats = if cfg.token_stats {
        let _guard = tch::no_grad_guard();
        Some(token_stats_of_rows(&logits2d, &active.rows, &active.targets)?)
    } else {
        None
    };
    let (sum, per_token) = assemble(&lp_rows, &active, b, tm1)?;
    Ok(SeqLogps {
        sum,
        len: active.len,
        per_token: cfg.return_per_token.then_some(per_token),
        mask: Some(active.mask),
        stats,
    })
}

/// Errors at the first scored `[b, t]` (position of the logits row) whose log-prob is not
/// finite: [`Error::NonFiniteLogits`] when the row holds NaN or `+inf` or no finite logit,
/// [`Error::NonFinite`] when only the target's logit is `−inf`. `row_logits(i)` returns the
/// logits of active row `i` (only called on the error path).
pub(crate) fn check_lp_finite(
    op: &'static str,
    lp_rows: &Tensor,
    active: &ActiveRows,
    tm1: i64,
    row_logits: impl Fn(i64) -> Result<Tensor>,
) -> Result<()> {
    let bad = lp_rows.f_isfinite()?.f_logical_not()?;
    let Some((pos, count)) = first_true(&bad)? else { return Ok(()) };
    let flat = i64::try_from(active.idx.f_get(pos[0])?)?;
    let index = vec![flat / tm1, flat % tm1];
    let row = row_logits(pos[0])?;
    let broken = row.f_isnan()?.f_any()?.f_logical_or(&row.f_isposinf()?.f_any()?)?;
    let no_finite = row.f_isfinite()?.f_any()?.f_logical_not()?;
    if bool::try_from(broken.f_logical_or(&no_finite)?)? {
        let what = crate::error::describe_bad_row(&row)?;
        Err(Error::NonFiniteLogits { op, name: "logits", index, count, what })
    } else {
        Err(Error::NonFinite {
            op,
            name: "log-prob of the target token (its logit is -inf)",
            index,
            count,
        })
    }
}

/// [`token_stats`] of rows `rows` of `x [R, V]`, from per-row reductions of `x` (no copy of
/// the rows).
pub(crate) fn token_stats_of_rows(
    x: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
) -> Result<TokenStats> {
    let n = rows.size()[0];
    let v = x.size().get(1).copied().unwrap_or(0);
    if n == 0 {
        return Ok(TokenStats::default());
    }
    let x = x.f_detach()?;
    let am = x.f_argmax(1, false)?.f_index_select(0, rows)?;
    let correct = am.f_eq_tensor(targets)?.f_sum(Kind::Int64)?;
    let sums = x.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
    Ok(TokenStats {
        correct: i64::try_from(&correct)? as f64,
        scored: n as f64,
        logit_sum: f64::try_from(sums.f_index_select(0, rows)?.f_sum(Kind::Double)?)?,
        logit_count: (n * v) as f64,
    })
}

/// Accuracy and logit sums over the selected rows `x [N, V]`.
pub(crate) fn token_stats(x: &Tensor, targets: &Tensor) -> Result<TokenStats> {
    let n = x.size()[0];
    let v = x.size().get(1).copied().unwrap_or(0);
    if n == 0 {
        return Ok(TokenStats::default());
    }
    let correct = x.f_argmax(1, false)?.f_eq_tensor(targets)?.f_sum(Kind::Int64)?;
    Ok(TokenStats {
        correct: i64::try_from(&correct)? as f64,
        scored: n as f64,
        logit_sum: f64::try_from(x.f_sum(Kind::Double)?)?,
        logit_count: (n * v) as f64,
    })
}

impl TokenStats {
    /// Adds another batch's counts (exact under gradient accumulation).
    pub fn merge(&mut self, other: &TokenStats) {
        self.correct += other.correct;
        self.scored += other.scored;
        self.logit_sum += other.logit_sum;
        self.logit_count += other.logit_count;
    }
}
