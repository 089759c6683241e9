//! Forward and reverse KL to a reference model, per token: distillation and regularisation.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{KlTarget, TokenKlConfig};

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, as_ids, as_mask, check_bt, check_fits_dtype,
    check_logits, check_nonneg_finite, check_overflow, check_reduction, check_shape, compute_kind,
    count_and_check_ids, finish, token_losses,
};
use super::kernel::{self, argmax, fused, inject, row_scale, target_argmax, threads};
use super::rows::{
    LogProbs, RowLoss, Rows, ce_grad, ce_value, eval_rows, onehot, ref_log_target, rkl_grad,
    rkl_value, smooth,
};
use crate::bridge::CpuSlice;
use crate::{Error, LossOutput, Reduction, Result};

/// Direction of [`reference_kl_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KlDirection {
    /// `KL(t ‖ p)`: mass-covering; the usual distillation objective (default).
    #[default]
    Forward,
    /// `KL(p ‖ t)`: mode-seeking; the usual regulariser towards a reference policy.
    Reverse,
}

/// What a forward [`reference_kl_loss`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KlValue {
    /// The divergence `KL(t ‖ p) = CE(z; t) − H(t)` (0 when `p = t`; default).
    #[default]
    Divergence,
    /// The cross-entropy `CE(z; t) = −Σ t log p` (TNT's reported form). Same gradient.
    CrossEntropy,
}

/// Configuration of [`reference_kl_loss`].
///
/// TRL's `GKDConfig` calls the temperature `temperature` too; its `beta` (generalised JSD) has
/// no equivalent here (use [`KlDirection`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefKlConfig {
    /// Forward `KL(t‖p)` or reverse `KL(p‖t)` (default forward).
    pub direction: KlDirection,
    /// Divergence or cross-entropy value for the forward direction (default divergence; the
    /// reverse direction always reports the divergence).
    pub value: KlValue,
    /// Smoothing `ε ≥ 0` of the target, `t ← (t + ε)/(1 + V'ε)` (default 0). Required `> 0` for
    /// a reverse KL with `exclude`, whose target has a zero.
    pub smoothing_eps: f64,
    /// Temperature `τ > 0` applied to both logits before the softmax (default 1). The loss is
    /// not multiplied by `τ²`; scale it yourself for Hinton-style distillation.
    pub temperature: f64,
    /// Reduction (default `Mean` over the positions of `loss_mask`).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for RefKlConfig {
    fn default() -> Self {
        RefKlConfig {
            direction: KlDirection::Forward,
            value: KlValue::Divergence,
            smoothing_eps: 0.0,
            temperature: 1.0,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl RefKlConfig {
    /// Rejects knobs that the compute dtype `kind` cannot hold (see `check_fits_dtype`).
    pub(crate) fn check_dtype(&self, op: &'static str, kind: tch::Kind) -> Result<()> {
        check_fits_dtype(op, "smoothing_eps", self.smoothing_eps, kind)?;
        check_fits_dtype(op, "temperature", self.temperature, kind)?;
        Ok(())
    }

    /// Sets [`RefKlConfig::direction`].
    pub fn with_direction(mut self, direction: KlDirection) -> Self {
        self.direction = direction;
        self
    }

    /// Sets [`RefKlConfig::value`].
    pub fn with_value(mut self, value: KlValue) -> Self {
        self.value = value;
        self
    }

    /// Sets [`RefKlConfig::smoothing_eps`].
    pub fn with_smoothing_eps(mut self, eps: f64) -> Self {
        self.smoothing_eps = eps;
        self
    }

    /// Sets [`RefKlConfig::temperature`].
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets [`RefKlConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`RefKlConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`RefKlConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]); `has_exclude` says whether an
    /// `exclude` tensor is passed.
    pub fn validate(&self, has_exclude: bool) -> Result<()> {
        const OP: &str = "reference_kl_loss";
        check_nonneg_finite(OP, "smoothing_eps", self.smoothing_eps)?;
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::InvalidConfig {
                op: OP,
                name: "temperature",
                reason: format!("must be finite and > 0, got {}", self.temperature),
            });
        }
        if self.direction == KlDirection::Reverse && has_exclude && self.smoothing_eps == 0.0 {
            return Err(Error::InvalidConfig {
                op: OP,
                name: "smoothing_eps",
                reason: "a reverse KL to a target with an excluded token needs smoothing_eps > 0 \
                         (the excluded token has target probability 0)"
                    .to_string(),
            });
        }
        check_reduction(OP, self.reduction)
    }
}

/// The reference-KL row formula; `rows.labels` holds the excluded token or −1.
pub(crate) struct RefKlRows {
    pub direction: KlDirection,
    pub value: KlValue,
    pub eps: f64,
}

impl RefKlRows {
    fn target(&self, rows: &Rows, lp: &LogProbs) -> Result<Tensor> {
        let has_ex = rows.labels.f_ge(0)?;
        let ex_ids = rows.labels.f_clamp_min(0)?;
        let hot = onehot(&ex_ids, rows.vocab())?.f_logical_and(&has_ex.f_unsqueeze(1)?)?;
        let logt = ref_log_target(rows.zo()?, lp, Some(&hot))?;
        let logt = if self.eps > 0.0 { smooth(&logt, lp, self.eps)? } else { logt };
        Ok(logt.f_detach()?)
    }
}

impl RowLoss for RefKlRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let lp = rows.log_probs()?;
        let logt = self.target(rows, lp)?;
        match self.direction {
            KlDirection::Forward => ce_value(lp, &logt, self.value == KlValue::Divergence),
            KlDirection::Reverse => rkl_value(lp, &logt),
        }
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let logt = self.target(rows, lp)?;
        let p = lp.p()?;
        match self.direction {
            KlDirection::Forward => {
                let v = ce_value(lp, &logt, self.value == KlValue::Divergence)?;
                Ok((v, if want_grad { Some(ce_grad(&p, &logt)?) } else { None }))
            }
            KlDirection::Reverse => {
                let v = rkl_value(lp, &logt)?;
                let g = if want_grad { Some(rkl_grad(lp, &p, &logt, &v)?) } else { None };
                Ok((v, g))
            }
        }
    }
}

/// Per-token KL between the model and a reference model (or teacher), forward or reverse, with
/// an optional excluded token per position.
///
/// ```text
/// t = softmax(z°/τ), or with exclude[b,t] = e ≥ 0:  t_v = exp(z°_v/τ − LSE_{u≠e}(z°/τ)), t_e = 0
/// t ← (t + ε)/(1 + V'ε)                                   if ε > 0
/// p = softmax(z/τ)
///
/// Forward:  ℓ = KL(t‖p) = Σ_{t>0} t (log t − log p)   (or CE(z; t) = −Σ t log p)    ∂ℓ/∂(z/τ) = p − t
/// Reverse:  ℓ = KL(p‖t) = Σ_{p>0} p (log p − log t)                                 ∂ℓ/∂(z/τ) = p ⊙ (log p − log t − ℓ)
/// ```
///
/// TNT is this primitive with per-position branches: TNFF at a negative position is the forward
/// cross-entropy with `exclude = y`, TNRR the reverse KL with `exclude = y` and `ε = 1e-6`.
/// With `ε = 0` a reverse KL requires `supp(p) ⊆ supp(t)` (a violating row is `+inf`).
///
/// # Metrics
///
/// `kl` (mean token value, as reported) and `ref_kl/top1_agreement` (fraction of active
/// positions where the model's argmax equals the target's).
///
/// # Shapes
///
/// * `logits`, `ref_logits`: `[B, T, V]`, any float dtypes (`ref_logits` is a constant).
/// * `exclude`: optional `[B, T]` integer; `≥ 0` removes that token from the target, `< 0` none.
/// * `loss_mask`: optional `[B, T]` bool (default all true).
/// * Output: see [`Reduction`]; one part `"tokens"` with `count = #loss_mask`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::VocabTooSmall`], [`Error::LabelOutOfRange`] (an `exclude` id `≥ V`),
/// [`Error::NonFiniteLogits`], [`Error::InvalidConfig`] (`ε` negative or non-finite, `τ ≤ 0`,
/// reverse with `exclude` and `ε = 0`).
///
/// # Example
///
/// ```
/// use amend_losses::token::{KlDirection, RefKlConfig, reference_kl_loss};
/// use tch::Tensor;
///
/// let z = Tensor::from_slice(&[2.0f64, 1.0, 0.5, -1.0]).reshape([1, 1, 4]);
/// let z_ref = Tensor::from_slice(&[1.5f64, 1.2, 0.3, -0.5]).reshape([1, 1, 4]);
/// let fwd = reference_kl_loss(&z, &z_ref, None, None, &RefKlConfig::default())?;
/// assert!((fwd.loss.double_value(&[]) - 0.058896843).abs() < 1e-8);
/// let cfg = RefKlConfig::default().with_direction(KlDirection::Reverse);
/// let rev = reference_kl_loss(&z, &z_ref, None, None, &cfg)?;
/// assert!((rev.loss.double_value(&[]) - 0.054840218).abs() < 1e-8);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn reference_kl_loss(
    logits: &Tensor,
    ref_logits: &Tensor,
    exclude: Option<&Tensor>,
    loss_mask: Option<&Tensor>,
    cfg: &RefKlConfig,
) -> Result<LossOutput> {
    const OP: &str = "reference_kl_loss";
    cfg.validate(exclude.is_some())?;
    let (dims, kind) = check_logits(OP, logits)?;
    cfg.check_dtype(OP, kind)?;
    let device = logits.device();
    check_shape(OP, "ref_logits", ref_logits, &logits.size(), "the shape of logits", device)?;
    compute_kind(OP, "ref_logits", ref_logits)?;
    if let Some(e) = exclude {
        check_bt(OP, "exclude", e, dims, device)?;
    }
    if let Some(m) = loss_mask {
        check_bt(OP, "loss_mask", m, dims, device)?;
    }
    let active = match loss_mask {
        Some(m) => as_mask(OP, "loss_mask", m)?,
        None => Tensor::f_ones([dims.b, dims.t], (Kind::Bool, device))?,
    };
    let ex = match exclude {
        Some(e) => as_ids(OP, "exclude", e)?,
        None => Tensor::f_full([dims.b, dims.t], -1, (Kind::Int64, device))?,
    };
    // Only non-negative exclude ids are read; they must be token ids.
    let check = active.f_logical_and(&ex.f_ge(0)?)?;
    count_and_check_ids(OP, "exclude", &ex, &check, dims.v)?;
    let count = i64::try_from(&active.f_sum(Kind::Int64)?)?;
    let plan = Plan::new(dims, kind, ex, active, count)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) =
            reference_kl_kernel(OP, &plan, logits, ref_logits, exclude.is_some(), cfg)?
    {
        return Ok(out);
    }
    let mut prep = plan.select(OP, logits, Some(ref_logits), cfg.non_finite)?;
    if cfg.temperature != 1.0 {
        let inv = 1.0 / cfg.temperature;
        prep.rows.z = prep.rows.z.f_mul_scalar(inv)?;
        prep.rows.zo = Some(prep.rows.zo()?.f_mul_scalar(inv)?);
    }
    let count = prep.count;
    let rows_loss =
        RefKlRows { direction: cfg.direction, value: cfg.value, eps: cfg.smoothing_eps };
    let mut sink = MetricSink::default();
    let row_loss = eval_rows(&rows_loss, &prep.rows, cfg.backend, &mut |rows, values| {
        let logt = rows_loss.target(rows, rows.log_probs()?)?;
        let agree = rows.z.f_argmax(-1, false)?.f_eq_tensor(&logt.f_argmax(-1, false)?)?;
        sink.add("kl", &values.f_sum(None::<Kind>)?, count as f64)?;
        sink.add("ref_kl/top1_agreement", &agree.f_sum(Kind::Float)?, count as f64)
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits, ref_logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// The `count` of [`reference_kl_loss`]: the number of positions of `loss_mask` (`B·T` when
/// `None`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `loss_mask` is not `[b_sz, seq_len]`, [`Error::DtypeMismatch`]
/// for a float mask.
///
/// # Example
///
/// ```
/// use amend_losses::token::count_active_reference_kl;
/// use tch::Tensor;
///
/// let mask = Tensor::from_slice(&[true, false, true, true]).reshape([2, 2]);
/// assert_eq!(count_active_reference_kl(Some(&mask), 2, 2)?, 3.0);
/// assert_eq!(count_active_reference_kl(None, 2, 2)?, 4.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn count_active_reference_kl(
    loss_mask: Option<&Tensor>,
    b_sz: i64,
    seq_len: i64,
) -> Result<f64> {
    const OP: &str = "count_active_reference_kl";
    match loss_mask {
        Some(m) => {
            check_shape(OP, "loss_mask", m, &[b_sz, seq_len], "[B, T] =", m.device())?;
            Ok(i64::try_from(&as_mask(OP, "loss_mask", m)?.f_sum(Kind::Int64)?)? as f64)
        }
        None => Ok((b_sz * seq_len) as f64),
    }
}

/// [`reference_kl_loss`] on the fused KL kernel ([`amend_kernels::token_kl`] with a
/// `Reference` target built from `ref_logits` inside the kernel); `None`: a row was rejected as
/// non-finite, take the composite path.
fn reference_kl_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    ref_logits: &Tensor,
    has_exclude: bool,
    cfg: &RefKlConfig,
) -> Result<Option<LossOutput>> {
    let zo = CpuSlice::<f32>::new(ref_logits, op, "ref_logits")?;
    let ex = CpuSlice::<i64>::new(&plan.labels, op, "exclude")?;
    let scale = row_scale(&plan.active)?;
    let s = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let kcfg = TokenKlConfig::default()
        .with_direction(match cfg.direction {
            KlDirection::Forward => amend_kernels::KlDirection::Forward,
            KlDirection::Reverse => amend_kernels::KlDirection::Reverse,
        })
        .with_value(match cfg.value {
            KlValue::Divergence => amend_kernels::KlValue::Divergence,
            KlValue::CrossEntropy => amend_kernels::KlValue::CrossEntropy,
        })
        .with_smoothing_eps(cfg.smoothing_eps)
        .with_temperature(cfg.temperature)
        .with_ignore_index(None)
        .with_threads(threads());
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        let exclude = has_exclude.then_some(ex.as_slice());
        let target = KlTarget::Reference { ref_logits: zo.as_slice(), exclude };
        amend_kernels::token_kl(io, vocab, target, Some(s.as_slice()), &kcfg, loss)
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let count = plan.count as f64;
    let mut sink = MetricSink::default();
    let values = fused.values.f_where_scalarother(&plan.active, 0.0)?;
    sink.add("kl", &values.f_sum(Kind::Float)?, count)?;
    // The target's argmax: z° over the row vocabulary of z, without the excluded token
    // (temperature and smoothing do not move it).
    let am_t = if has_exclude || fused.stats.masked_vocab_rows > 0 {
        let exclude = has_exclude.then_some(&plan.labels);
        target_argmax(op, ref_logits, logits, exclude, &plan.active)?
    } else {
        argmax(ref_logits)?
    };
    let agree = argmax(logits)?.f_eq_tensor(&am_t)?.f_logical_and(&plan.active)?;
    sink.add("ref_kl/top1_agreement", &agree.f_sum(Kind::Float)?, count)?;
    check_overflow(op, &tok, cfg.non_finite, &[logits, ref_logits])?;
    finish(op, tok, plan.count, cfg.reduction, sink.finish()?).map(Some)
}
