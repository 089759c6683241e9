//! Welleck et al.'s token-level unlikelihood training (previous-context candidates).
//!
//! Welleck, Kulikov, Roller, Dinan, Cho, Weston, "Neural Text Generation with Unlikelihood
//! Training", ICLR 2020, <https://arxiv.org/abs/1908.04319>; reference code
//! `facebookresearch/unlikelihood_training` (`custom/candidate_penalty_ce_loss.py`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::UnlikelihoodConfig;

use super::common::{
    Dims, MetricSink, NonFinitePolicy, Plan, Prepared, RowSelection, TokenBackend, as_ids, as_mask,
    check_bt, check_fits_dtype, check_logits, check_nonneg_finite, check_overflow, check_reduction,
    check_shape, count_and_check_ids, finish, masked_sum, token_losses, unravel,
};
use super::kernel::{self, argmax, fused, inject, logp_at, row_scale, threads};
use super::nll::nll_metrics;
use super::rows::{
    CandidateList, RowLoss, Rows, eval_rows, log1m_p, minus_onehot, neg_log1m_grad, row_sum,
};
use crate::bridge::CpuSlice;
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// Where the unlikelihood candidates of each position come from.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Candidates<'a> {
    /// Welleck's previous-context set: the distinct real labels at earlier positions of the
    /// same sequence, minus the current label (`C_t = {labels[b, j] : j < t} ∖ {labels[b, t]}`,
    /// without pad and `ignore_index`).
    PreviousContext,
    /// Caller-chosen candidates `[B, T, K]` (integer): negative entries are empty slots,
    /// duplicates count once, entries equal to the label or `pad_id` are dropped.
    Explicit(&'a Tensor),
}

/// Configuration of [`welleck_ul_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WelleckUlConfig {
    /// Weight `α ≥ 0` of the unlikelihood term (upstream `--rank-alpha`; default `1.0`, the
    /// README value).
    pub alpha: f64,
    /// Padding token id: never a candidate, and positions labelled with it are inactive
    /// (default `None`).
    pub pad_id: Option<i64>,
    /// Label value of ignored positions: never a candidate, inactive (default −100).
    pub ignore_index: i64,
    /// Reduction (default `Mean` over active tokens, fairseq's division by `ntokens`).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for WelleckUlConfig {
    fn default() -> Self {
        WelleckUlConfig {
            alpha: 1.0,
            pad_id: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl WelleckUlConfig {
    /// Rejects knobs that the compute dtype `kind` cannot hold (see `check_fits_dtype`).
    pub(crate) fn check_dtype(&self, op: &'static str, kind: tch::Kind) -> Result<()> {
        check_fits_dtype(op, "alpha", self.alpha, kind)?;
        Ok(())
    }

    /// Sets [`WelleckUlConfig::alpha`].
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets [`WelleckUlConfig::pad_id`].
    pub fn with_pad_id(mut self, pad_id: Option<i64>) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// Sets [`WelleckUlConfig::ignore_index`].
    pub fn with_ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Sets [`WelleckUlConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`WelleckUlConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`WelleckUlConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        check_nonneg_finite("welleck_ul_loss", "alpha", self.alpha)?;
        check_reduction("welleck_ul_loss", self.reduction)
    }

    /// Positions with a real label: not `ignore_index`, not `pad_id`.
    fn real(&self, labels: &Tensor) -> Result<Tensor> {
        let mut real = labels.f_ne(self.ignore_index)?;
        if let Some(pad) = self.pad_id {
            real = real.f_logical_and(&labels.f_ne(pad)?)?;
        }
        Ok(real)
    }
}

/// Deduplicates candidate lists: sorts each row, keeps the first of each run of equal valid ids,
/// and trims the columns to the longest list. Returns ids (0 at invalid slots) and validity.
fn dedup(ids: &Tensor, valid: &Tensor, vocab: i64) -> Result<CandidateList> {
    let k = ids.size()[1];
    let n = ids.size()[0];
    if k == 0 {
        return Ok(CandidateList { ids: ids.shallow_clone(), valid: valid.shallow_clone() });
    }
    let key = ids.f_where_scalarother(valid, vocab)?;
    let (sorted, _) = key.f_sort(-1, false)?;
    let first = Tensor::f_full([n, 1], -1, (Kind::Int64, ids.device()))?;
    let prev = Tensor::f_cat(&[&first, &sorted.f_narrow(1, 0, k - 1)?], 1)?;
    let keep = sorted.f_lt(vocab)?.f_logical_and(&sorted.f_ne_tensor(&prev)?)?;
    // Valid ids sort before the sentinel, so the longest list bounds the useful columns.
    let width = if n == 0 {
        0
    } else {
        i64::try_from(&sorted.f_lt(vocab)?.f_sum_dim_intlist(-1, false, Kind::Int64)?.f_max()?)?
    };
    let keep = keep.f_narrow(1, 0, width)?;
    let ids = sorted.f_narrow(1, 0, width)?.f_where_scalarother(&keep, 0)?;
    Ok(CandidateList { ids, valid: keep })
}

/// The candidate lists of the selected rows.
fn build_candidates(
    op: &'static str,
    candidates: Candidates<'_>,
    cfg: &WelleckUlConfig,
    labels: &Tensor,
    sel: &RowSelection,
    x: &Tensor,
    dims: Dims,
) -> Result<CandidateList> {
    let device = labels.device();
    let x = x.f_unsqueeze(1)?;
    match candidates {
        Candidates::PreviousContext => {
            let flat = sel.indices(device)?;
            let b_idx = flat.f_div_scalar_mode(dims.t.max(1), "floor")?;
            let t_idx = flat.f_remainder(dims.t.max(1))?;
            let ids = labels.f_index_select(0, &b_idx)?;
            let real = cfg.real(&ids)?;
            let before = Tensor::f_arange(dims.t, (Kind::Int64, device))?
                .f_unsqueeze(0)?
                .f_lt_tensor(&t_idx.f_unsqueeze(1)?)?;
            let valid = real.f_logical_and(&before)?.f_logical_and(&ids.f_ne_tensor(&x)?)?;
            dedup(&ids, &valid, dims.v)
        }
        Candidates::Explicit(c) => {
            let k = c.size().get(2).copied().unwrap_or(0);
            check_shape(op, "candidates", c, &[dims.b, dims.t, k], "[B, T, K] =", device)?;
            let c = as_ids(op, "candidates", c)?;
            let c = sel.rows(&c.f_reshape([dims.n(), k])?)?;
            let mut valid = c.f_ge(0)?.f_logical_and(&c.f_ne_tensor(&x)?)?;
            if let Some(pad) = cfg.pad_id {
                valid = valid.f_logical_and(&c.f_ne(pad)?)?;
            }
            let bad = valid.f_logical_and(&c.f_ge(dims.v)?)?;
            let nbad = i64::try_from(&bad.f_sum(Kind::Int64)?)?;
            if nbad > 0 {
                let first = i64::try_from(&bad.f_reshape([-1])?.f_nonzero()?.f_get(0)?.f_get(0)?)?;
                let value = i64::try_from(&c.f_reshape([-1])?.f_get(first)?)?;
                let (row, slot) = (first / k.max(1), first % k.max(1));
                let index = unravel(sel.flat_index(row)?, &[dims.b, dims.t]);
                return Err(Error::InvalidConfig {
                    op,
                    name: "candidates",
                    reason: format!(
                        "candidate id {value} at ({}, {}, {slot}) is outside [0, {}) ({nbad} such entries)",
                        index[0], index[1], dims.v
                    ),
                });
            }
            dedup(&c.f_where_scalarother(&valid, 0)?, &valid, dims.v)
        }
    }
}

/// The Welleck row formula: `−log p_x − α Σ_{c∈C} log(1 − p_c)`.
pub(crate) struct WelleckRows {
    pub alpha: f64,
}

impl RowLoss for WelleckRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let lp = rows.log_probs()?;
        let lam = log1m_p(lp, &rows.z, rows.cand()?)?.lam;
        let nll = lp.at(&rows.labels)?.f_neg()?;
        Ok(nll.f_sub(&row_sum(&lam)?.f_mul_scalar(self.alpha)?)?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let cand = rows.cand()?;
        let lm = log1m_p(lp, &rows.z, cand)?;
        let nll = lp.at(&rows.labels)?.f_neg()?;
        let value = nll.f_sub(&row_sum(&lm.lam)?.f_mul_scalar(self.alpha)?)?;
        let grad = if want_grad {
            let p = lp.p()?;
            let g_ul = neg_log1m_grad(lp, &p, cand, &lm)?;
            Some(minus_onehot(&p, &rows.labels)?.f_add(&g_ul.f_mul_scalar(self.alpha)?)?)
        } else {
            None
        };
        Ok((value, grad))
    }
}

/// Validation and row selection for [`welleck_ul_loss`].
fn plan(
    op: &'static str,
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    candidates: Candidates<'_>,
    cfg: &WelleckUlConfig,
) -> Result<Plan> {
    cfg.validate()?;
    let (dims, kind) = check_logits(op, logits)?;
    cfg.check_dtype(op, kind)?;
    let device = logits.device();
    check_bt(op, "labels", labels, dims, device)?;
    if let Some(m) = loss_mask {
        check_bt(op, "loss_mask", m, dims, device)?;
    }
    let labels = as_ids(op, "labels", labels)?;
    let real = cfg.real(&labels)?;
    let active = match loss_mask {
        Some(m) => real.f_logical_and(&as_mask(op, "loss_mask", m)?)?,
        None => real.shallow_clone(),
    };
    // Previous-context candidates read every real label, active or not.
    let count = match candidates {
        Candidates::PreviousContext => {
            count_and_check_ids(op, "labels", &labels, &real, dims.v)?;
            i64::try_from(&active.f_sum(Kind::Int64)?)?
        }
        Candidates::Explicit(_) => count_and_check_ids(op, "labels", &labels, &active, dims.v)?,
    };
    Plan::new(dims, kind, labels, active, count)
}

fn prepare(
    op: &'static str,
    plan: Plan,
    logits: &Tensor,
    candidates: Candidates<'_>,
    cfg: &WelleckUlConfig,
) -> Result<Prepared> {
    let labels = plan.labels.shallow_clone();
    let mut prep = plan.select(op, logits, None, cfg.non_finite)?;
    let (sel, dims) = (&prep.sel, prep.dims);
    prep.rows.cand =
        Some(build_candidates(op, candidates, cfg, &labels, sel, &prep.rows.labels, dims)?);
    Ok(prep)
}

/// [`welleck_ul_loss`] on the fused unlikelihood kernel, with the candidate lists padded to
/// `[B·T, K]` (`−1` = empty slot); `None`: a row was rejected as non-finite, take the
/// composite path.
fn welleck_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    candidates: Candidates<'_>,
    cfg: &WelleckUlConfig,
) -> Result<Option<LossOutput>> {
    let dims = plan.dims;
    let x = plan.sel.rows(&plan.labels.f_reshape([-1])?)?;
    let cand = build_candidates(op, candidates, cfg, &plan.labels, &plan.sel, &x, dims)?;
    let k = cand.ids.size()[1];
    let ids = cand.ids.f_where_scalarother(&cand.valid, -1)?;
    let full = Tensor::f_full([dims.n(), k], -1, (Kind::Int64, logits.device()))?.f_index_copy(
        0,
        &plan.sel.indices(logits.device())?,
        &ids,
    )?;
    let ids_s = CpuSlice::<i64>::strict(&full, op, "candidates")?;
    let scale = row_scale(&plan.active)?;
    let s = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let y = CpuSlice::<i64>::new(&plan.labels, op, "labels")?;
    let kcfg = UnlikelihoodConfig::default()
        .with_alpha(cfg.alpha)
        .with_ignore_index(None)
        .with_threads(threads());
    let width = usize::try_from(k).unwrap_or(0);
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        let c = amend_kernels::Candidates::Padded { ids: ids_s.as_slice(), width };
        amend_kernels::unlikelihood(
            io,
            vocab,
            Some(y.as_slice()),
            c,
            Some(s.as_slice()),
            &kcfg,
            loss,
        )
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let metrics =
        tch::no_grad(|| welleck_kernel_metrics(op, plan, logits, &full, &fused.values, cfg))?;
    check_overflow(op, &tok, cfg.non_finite, &[logits])?;
    finish(op, tok, plan.count, cfg.reduction, metrics).map(Some)
}

/// The metrics of [`welleck_ul_loss`] on the kernel path (value-only `log p_x`, gathered `p_c`).
fn welleck_kernel_metrics(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    full: &Tensor,
    values: &Tensor,
    cfg: &WelleckUlConfig,
) -> Result<Metrics> {
    let dims = plan.dims;
    let k = full.size()[1];
    let count = plan.count as f64;
    let active = &plan.active;
    let (l_x, lse) = logp_at(op, logits, &plan.labels, active)?;
    let nll = l_x.f_neg()?;
    // p_c = exp(z_c − LSE) at the valid slots.
    let valid = full.f_ge(0)?;
    let slots = full.f_clamp_min(0)?.f_reshape([dims.b, dims.t, k])?;
    let z_c = logits.f_detach()?.f_gather(2, &slots, false)?.f_reshape([dims.n(), k])?;
    let p_c = z_c
        .f_sub(&lse.f_reshape([-1, 1])?)?
        .f_exp()?
        .f_where_scalarother(&valid, 0.0)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?;
    let mut sink = MetricSink::default();
    sink.add("ul/nll", &masked_sum(&nll, active)?, count)?;
    if cfg.alpha > 0.0 {
        let penalty = masked_sum(&values.f_sub(&nll)?, active)?.f_div_scalar(cfg.alpha)?;
        sink.add("ul/candidate_penalty", &penalty, count)?;
    }
    sink.add("ul/num_candidates", &valid.f_sum(Kind::Float)?, count)?;
    sink.add("ul/candidate_mass", &p_c.f_sum(Kind::Double)?, count)?;
    let hit = argmax(logits)?.f_eq_tensor(&plan.labels)?.f_to_kind(Kind::Float)?;
    sink.add("mean_token_accuracy", &masked_sum(&hit, active)?, count)?;
    sink.finish()
}

/// Welleck et al.'s token-level unlikelihood loss: NLL plus a penalty on candidate tokens.
///
/// ```text
/// ℓ_t = −log p_x − α Σ_{c ∈ C_t} log(1 − p_c),   x = labels[b, t]
/// C_t = {labels[b, j] : j < t, labels[b, j] ∉ {pad_id, ignore_index}} ∖ {x}     (a set)
///
/// ∂ℓ_t/∂z_j = p_j(1 − αS') − δ_jx + α[j∈C'] r_j + α[d∈C_t] p_d(δ_jd − q⁽ᵈ⁾_j)
///   d = argmax z,  C' = C_t ∖ {d},  r_c = p_c/(1 − p_c),  S' = Σ_{C'} r_c,  q⁽ᵈ⁾ = p without d, renormalised
/// ```
///
/// Positions whose label is pad or `ignore_index`, or whose `loss_mask` is false, are inactive.
/// Candidates come from every earlier position of the *same* sequence with a real label, whether
/// or not its `loss_mask` is set. `log(1 − p_c)` is exact and its gradient bounded, with no
/// clamp.
///
/// Differences from upstream (`candidate_penalty_ce_loss.py`): upstream flattens the batch, so
/// candidates leak across sequences when `B > 1`; it flags the pad id and `pad²` as candidates at
/// every position; it computes UL terms at pad targets; and it clamps `1 − p` at `1e-5`.
///
/// # Metrics
///
/// `ul/nll` (mean NLL term), `ul/candidate_penalty` (mean `−Σ_c log(1 − p_c)`, without `α`;
/// absent when `α = 0`), `ul/num_candidates` (mean `|C_t|`), `ul/candidate_mass` (mean
/// `Σ_c p_c`), `mean_token_accuracy`.
///
/// # Shapes
///
/// * `logits`: `[B, T, V]`; `labels`: `[B, T]` integer; `loss_mask`: optional `[B, T]` bool.
/// * `Candidates::Explicit`: `[B, T, K]` integer.
/// * Output: see [`Reduction`]; one part `"tokens"` with `count` = active positions.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::VocabTooSmall`], [`Error::LabelOutOfRange`] (a real label outside `[0, V)`),
/// [`Error::NonFiniteLogits`], [`Error::InvalidConfig`] (`α` negative or non-finite, an explicit
/// candidate `≥ V`).
///
/// # Example
///
/// ```
/// use amend_losses::token::{Candidates, WelleckUlConfig, welleck_ul_loss};
/// use tch::Tensor;
///
/// // §12.5 of the spec: one sequence, labels [2, 1, 2, 3], α = 1.
/// let z = Tensor::from_slice(&[
///     0.1f64, 0.2, 1.5, -0.3, 0.4, 1.1, 0.9, 0.0, -0.2, 0.8, 1.3, 0.5, 0.3, 0.7, 0.6, 1.2,
/// ])
/// .reshape([1, 4, 4]);
/// let labels = Tensor::from_slice(&[2i64, 1, 2, 3]).reshape([1, 4]);
/// let cfg = WelleckUlConfig::default();
/// let out = welleck_ul_loss(&z, &labels, None, Candidates::PreviousContext, &cfg)?;
/// assert!((out.loss.double_value(&[]) - 1.112582).abs() < 1e-6);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn welleck_ul_loss(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    candidates: Candidates<'_>,
    cfg: &WelleckUlConfig,
) -> Result<LossOutput> {
    const OP: &str = "welleck_ul_loss";
    let plan = plan(OP, logits, labels, loss_mask, candidates, cfg)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = welleck_kernel(OP, &plan, logits, candidates, cfg)?
    {
        return Ok(out);
    }
    let prep = prepare(OP, plan, logits, candidates, cfg)?;
    let rows_loss = WelleckRows { alpha: cfg.alpha };
    let count = prep.count as f64;
    let alpha = cfg.alpha;
    let mut sink = MetricSink::default();
    let row_loss = eval_rows(&rows_loss, &prep.rows, cfg.backend, &mut |rows, values| {
        let lp = rows.log_probs()?;
        let cand = rows.cand()?;
        let nll = lp.at(&rows.labels)?.f_neg()?;
        let p_c = lp.p()?.f_gather(1, &cand.ids, false)?.f_where_scalarother(&cand.valid, 0.0)?;
        sink.add("ul/nll", &nll.f_sum(None::<Kind>)?, count)?;
        if alpha > 0.0 {
            // The penalty is what the loss adds to the NLL, divided by α (no recomputation).
            let penalty = values.f_sub(&nll)?.f_sum(None::<Kind>)?.f_div_scalar(alpha)?;
            sink.add("ul/candidate_penalty", &penalty, count)?;
        }
        sink.add("ul/num_candidates", &cand.valid.f_sum(Kind::Float)?, count)?;
        sink.add("ul/candidate_mass", &p_c.f_sum(None::<Kind>)?, count)?;
        nll_metrics(rows, &mut sink)
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// The `count` of [`welleck_ul_loss`]: positions whose label is neither `pad_id` nor
/// `ignore_index` and whose `loss_mask` is set (fairseq's `ntokens`). Depends only on labels and
/// masks.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `loss_mask` differs from `labels` in shape,
/// [`Error::DtypeMismatch`] for non-integer labels or a float mask.
///
/// # Example
///
/// ```
/// use amend_losses::token::{WelleckUlConfig, count_active_welleck};
/// use tch::Tensor;
///
/// let labels = Tensor::from_slice(&[2i64, 1, 0, 0]).reshape([1, 4]);
/// let cfg = WelleckUlConfig::default().with_pad_id(Some(0));
/// assert_eq!(count_active_welleck(&labels, None, &cfg)?, 2.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn count_active_welleck(
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &WelleckUlConfig,
) -> Result<f64> {
    const OP: &str = "count_active_welleck";
    let labels = as_ids(OP, "labels", labels)?;
    let mut active = cfg.real(&labels)?;
    if let Some(m) = loss_mask {
        check_shape(OP, "loss_mask", m, &labels.size(), "the shape of labels", labels.device())?;
        active = active.f_logical_and(&as_mask(OP, "loss_mask", m)?)?;
    }
    Ok(i64::try_from(&active.f_sum(Kind::Int64)?)? as f64)
}
