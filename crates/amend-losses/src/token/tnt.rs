//! Targeted Negative Training (TNT): TNFF, TNRR, TNRF, TNFLL and TNRLL.
//!
//! Zhang, Ranganath, Tafvizi, "Towards Minimal Targeted Updates of Language Models with Targeted
//! Negative Training", TMLR 2024, <https://arxiv.org/abs/2406.13660>; reference code
//! `google/t5patches` (`t5patches/models.py`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{TntKernelConfig, TntRowStats};

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, check_fits_dtype, check_nonneg_finite,
    check_overflow, check_reduction, compute_kind, finish, masked_sum, plan_weighted,
    select_weighted, token_losses,
};
use super::kernel::{self, fused, inject, threads};
use super::rows::{
    LogProbs, RefParts, RowLoss, Rows, ce_grad, ce_value, eval_rows, kl_metric, label_log_target,
    rkl_grad, rkl_value, select_scalar, smooth,
};
use super::weights::TokenWeights;
use crate::bridge::CpuSlice;
use crate::{Error, LossOutput, Reduction, Result};

/// The five TNT variants, named `TN{negative}{positive}`: the divergence used at negative
/// positions, then the one used at positive positions (F = forward KL, reported as
/// cross-entropy; R = reverse KL; LL = label log-likelihood).
///
/// | variant | `w = −1` | `w = +1` |
/// |---|---|---|
/// | `Ff` (TNFF) | `α·CE(z; q)` | `CE(z; p°)` |
/// | `Fll` (TNFLL) | `α·CE(z; q)` | `−log p_y` |
/// | `Rr` (TNRR) | `α·KL(p ‖ S_ε(q))` | `KL(p ‖ S_ε(p°))` |
/// | `Rf` (TNRF) | `α·KL(p ‖ S_ε(q))` | `CE(z; S_ε(p°))` |
/// | `Rll` (TNRLL) | `α·KL(p ‖ S_ε(q))` | `CE(z; S_ε(e_y))` |
///
/// In serde and [`FromStr`](std::str::FromStr) the names are `tnff`, `tnrr`, `tnrf`, `tnfll`,
/// `tnrll` (case-insensitive for `from_str`; `ff`, `rr`, ... are accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TntVariant {
    /// TNFF: forward KL at negative and positive positions (the legacy `EncoderDecoderModelTN`).
    #[default]
    #[serde(rename = "tnff", alias = "ff")]
    Ff,
    /// TNRR: reverse KL at negative and positive positions.
    #[serde(rename = "tnrr", alias = "rr")]
    Rr,
    /// TNRF: reverse KL at negative positions, forward at positive ones.
    #[serde(rename = "tnrf", alias = "rf")]
    Rf,
    /// TNFLL: forward KL at negative positions, label log-likelihood at positive ones.
    #[serde(rename = "tnfll", alias = "fll")]
    Fll,
    /// TNRLL: reverse KL at negative positions, label-smoothed log-likelihood at positive ones.
    #[serde(rename = "tnrll", alias = "rll")]
    Rll,
}

impl TntVariant {
    /// All variants, in the order of the paper.
    pub const ALL: [TntVariant; 5] =
        [TntVariant::Ff, TntVariant::Rr, TntVariant::Rf, TntVariant::Fll, TntVariant::Rll];

    /// The paper's name (`"TNFF"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TntVariant::Ff => "TNFF",
            TntVariant::Rr => "TNRR",
            TntVariant::Rf => "TNRF",
            TntVariant::Fll => "TNFLL",
            TntVariant::Rll => "TNRLL",
        }
    }

    /// Whether negative positions use the reverse (smoothed) form, so `smoothing_eps` applies.
    pub fn uses_smoothing(self) -> bool {
        matches!(self, TntVariant::Rr | TntVariant::Rf | TntVariant::Rll)
    }
}

impl std::fmt::Display for TntVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TntVariant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_prefix("tn").unwrap_or(&lower);
        match name {
            "ff" => Ok(TntVariant::Ff),
            "rr" => Ok(TntVariant::Rr),
            "rf" => Ok(TntVariant::Rf),
            "fll" => Ok(TntVariant::Fll),
            "rll" => Ok(TntVariant::Rll),
            _ => Err(Error::InvalidConfig {
                op: "TntVariant::from_str",
                name: "variant",
                reason: format!(
                    "unknown TNT variant {s:?} (expected TNFF, TNRR, TNRF, TNFLL or TNRLL)"
                ),
            }),
        }
    }
}

/// Configuration of [`tnt_loss`].
///
/// Defaults follow `google/t5patches`: `alpha = 1e4`, `smoothing_eps = 1e-6`, `Sum` reduction.
/// The smoothing's uniform mass `V·ε/(1 + V·ε)` grows with the vocabulary (3.1 % at T5's 32128,
/// 4.8 % at 50257, 11.4 % at 128256); set `smoothing_eps = 0.0322 / V` to keep T5's 3.1 %.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TntConfig {
    /// Which TNT variant (default TNFF).
    pub variant: TntVariant,
    /// Weight `α ≥ 0` of the negative positions (default `1e4`, upstream; its tests use 1 and
    /// 0.5). The main knob of the trade-off between removing negatives and staying close to the
    /// reference.
    pub alpha: f64,
    /// Smoothing `ε > 0` of the reverse-form targets (TNRR, TNRF, TNRLL; default `1e-6`,
    /// upstream). Ignored by TNFF and TNFLL.
    pub smoothing_eps: f64,
    /// Reduction (default `Sum`, as upstream, which relies on Adafactor's scale invariance;
    /// `Mean` divides by the number of positions with `w ≠ 0`).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
    /// Compute the `tnt/*` metrics (default `true`; also for the fused-linear losses). On the
    /// fused kernel they come out of the loss's own sweep, while each row is in cache
    /// ([`amend_kernels::tnt_with_stats`]: no second pass over `[N, V]` in memory, a few light
    /// in-cache passes per row); on the composite path they cost extra tensor ops. A training
    /// loop that does not log them every step sets this to `false` (the loss, its gradient and
    /// the part counts are the same either way).
    pub metrics: bool,
}

impl Default for TntConfig {
    fn default() -> Self {
        TntConfig {
            variant: TntVariant::Ff,
            alpha: 1e4,
            smoothing_eps: 1e-6,
            reduction: Reduction::Sum,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
            metrics: true,
        }
    }
}

impl TntConfig {
    /// Rejects knobs that the compute dtype `kind` cannot hold (see `check_fits_dtype`).
    pub(crate) fn check_dtype(&self, op: &'static str, kind: tch::Kind) -> Result<()> {
        check_fits_dtype(op, "alpha", self.alpha, kind)?;
        check_fits_dtype(op, "smoothing_eps", self.smoothing_eps, kind)?;
        Ok(())
    }

    /// The default configuration of `variant`.
    pub fn new(variant: TntVariant) -> Self {
        TntConfig { variant, ..TntConfig::default() }
    }

    /// Sets [`TntConfig::variant`].
    pub fn with_variant(mut self, variant: TntVariant) -> Self {
        self.variant = variant;
        self
    }

    /// Sets [`TntConfig::alpha`].
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets [`TntConfig::smoothing_eps`].
    pub fn with_smoothing_eps(mut self, eps: f64) -> Self {
        self.smoothing_eps = eps;
        self
    }

    /// Sets [`TntConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`TntConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`TntConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets [`TntConfig::metrics`].
    pub fn with_metrics(mut self, metrics: bool) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "tnt_loss";
        check_nonneg_finite(OP, "alpha", self.alpha)?;
        check_nonneg_finite(OP, "smoothing_eps", self.smoothing_eps)?;
        if self.variant.uses_smoothing() && self.smoothing_eps == 0.0 {
            return Err(Error::InvalidConfig {
                op: OP,
                name: "smoothing_eps",
                reason: format!("{} needs smoothing_eps > 0", self.variant),
            });
        }
        check_reduction(OP, self.reduction)
    }
}

/// The TNT row formula.
pub(crate) struct TntRows {
    pub variant: TntVariant,
    pub alpha: f64,
    pub eps: f64,
}

impl TntRows {
    /// Per-row target log-probabilities `[n, V]` (constants) for `rows`.
    fn target(&self, rows: &Rows, lp: &LogProbs) -> Result<Tensor> {
        let neg = rows.neg()?;
        let neg2 = neg.f_unsqueeze(1)?;
        let RefParts { zo_r, lse_not_y, hot, .. } = rows.ref_parts()?;
        let logt = match self.variant {
            TntVariant::Ff | TntVariant::Rr | TntVariant::Rf => ideal_target(rows)?,
            TntVariant::Fll | TntVariant::Rll => {
                let logq = zo_r
                    .f_sub(&lse_not_y.f_unsqueeze(1)?)?
                    .f_masked_fill(hot, f64::NEG_INFINITY)?;
                logq.f_where_self(&neg2, &label_log_target(hot, zo_r)?)?
            }
        };
        let logt = if self.variant.uses_smoothing() { smooth(&logt, lp, self.eps)? } else { logt };
        Ok(logt.f_detach()?)
    }

    fn scale(&self, rows: &Rows) -> Result<Tensor> {
        select_scalar(rows.neg()?, self.alpha, 1.0, rows.z.f_kind()?)
    }
}

impl RowLoss for TntRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let lp = rows.log_probs()?;
        let logt = self.target(rows, lp)?;
        let value = match self.variant {
            TntVariant::Ff | TntVariant::Fll => ce_value(lp, &logt, false)?,
            TntVariant::Rr => rkl_value(lp, &logt)?,
            TntVariant::Rf | TntVariant::Rll => {
                rkl_value(lp, &logt)?.f_where_self(rows.neg()?, &ce_value(lp, &logt, false)?)?
            }
        };
        Ok(value.f_mul(&self.scale(rows)?)?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let logt = self.target(rows, lp)?;
        let scale = self.scale(rows)?;
        let p = lp.p()?;
        let (value, grad) = match self.variant {
            TntVariant::Ff | TntVariant::Fll => {
                let v = ce_value(lp, &logt, false)?;
                let g = if want_grad { Some(ce_grad(&p, &logt)?) } else { None };
                (v, g)
            }
            TntVariant::Rr => {
                let v = rkl_value(lp, &logt)?;
                let g = if want_grad { Some(rkl_grad(lp, &p, &logt, &v)?) } else { None };
                (v, g)
            }
            TntVariant::Rf | TntVariant::Rll => {
                let neg = rows.neg()?;
                let rkl = rkl_value(lp, &logt)?;
                let ce = ce_value(lp, &logt, false)?;
                let g = if want_grad {
                    let g_rkl = rkl_grad(lp, &p, &logt, &rkl)?;
                    Some(g_rkl.f_where_self(&neg.f_unsqueeze(1)?, &ce_grad(&p, &logt)?)?)
                } else {
                    None
                };
                (rkl.f_where_self(neg, &ce)?, g)
            }
        };
        let grad = match grad {
            Some(g) => Some(g.f_mul(&scale.f_unsqueeze(1)?)?),
            None => None,
        };
        Ok((value.f_mul(&scale)?, grad))
    }
}

/// The ideal (unsmoothed) per-row target: `q` (p° without y, renormalised by the masked
/// log-sum-exp) on negative rows, `p°` on positive rows; over the support of `z`.
fn ideal_target(rows: &Rows) -> Result<Tensor> {
    let neg = rows.neg()?;
    let RefParts { zo_r, lse, lse_not_y, hot } = rows.ref_parts()?;
    let norm = lse_not_y.f_where_self(neg, lse)?.f_unsqueeze(1)?;
    Ok(zo_r
        .f_sub(&norm)?
        .f_masked_fill(&hot.f_logical_and(&neg.f_unsqueeze(1)?)?, f64::NEG_INFINITY)?)
}

/// TNT diagnostics (see [`tnt_loss`] for the list), from the rows' cached log-probabilities and
/// reference parts.
pub(crate) fn tnt_metrics(rows: &Rows, row_loss: &Tensor, sink: &mut MetricSink) -> Result<()> {
    let lp = rows.log_probs()?;
    let neg = rows.neg()?;
    let pos = neg.f_logical_not()?;
    let n_neg = neg.f_sum(Kind::Float)?;
    let n_pos = pos.f_sum(Kind::Float)?;
    let RefParts { zo_r, lse, .. } = rows.ref_parts()?;
    let kl = kl_metric(lp, &ideal_target(rows)?)?;
    let labels = rows.labels.f_unsqueeze(1)?;
    let p_y = lp.at(&rows.labels)?.f_exp()?;
    let ref_p_y = zo_r.f_gather(1, &labels, false)?.f_squeeze_dim(1)?.f_sub(lse)?.f_exp()?;
    let argmax = rows.z.f_argmax(-1, false)?;
    let top1 = argmax.f_eq_tensor(&rows.labels)?.f_to_kind(Kind::Float)?;
    let agree = argmax.f_eq_tensor(&zo_r.f_argmax(-1, false)?)?.f_to_kind(Kind::Float)?;
    sink.add_counted("tnt/neg_mass", &masked_sum(&p_y, neg)?, &n_neg)?;
    sink.add_counted("tnt/ref_neg_mass", &masked_sum(&ref_p_y, neg)?, &n_neg)?;
    sink.add_counted("tnt/neg_top1", &masked_sum(&top1, neg)?, &n_neg)?;
    sink.add_counted("tnt/neg_kl", &masked_sum(&kl, neg)?, &n_neg)?;
    sink.add_counted("tnt/pos_kl", &masked_sum(&kl, &pos)?, &n_pos)?;
    sink.add_counted("tnt/pos_top1_agreement", &masked_sum(&agree, &pos)?, &n_pos)?;
    sink.add_counted("tnt/neg_loss", &masked_sum(row_loss, neg)?, &n_neg)?;
    sink.add_counted("tnt/pos_loss", &masked_sum(row_loss, &pos)?, &n_pos)?;
    Ok(())
}

/// Targeted Negative Training loss (TNFF, TNRR, TNRF, TNFLL, TNRLL).
///
/// Trains negative positions (`w = −1`) towards the reference distribution with the annotated
/// token removed and renormalised, and positive positions (`w = +1`) towards the reference itself
/// (self-distillation) or towards the label ("LL" variants). With `p = softmax(z)`,
/// `p° = softmax(z°)`:
///
/// ```text
/// q_v      = exp(z°_v − LSE_{u≠y}(z°)) for v ≠ y,  q_y = 0        (p° without y, renormalised)
/// S_ε(u)   = (u + ε) / (1 + V'ε)                                   (V' = number of finite logits)
/// CE(z; t) = −Σ_{t_v>0} t_v log p_v        KL(p‖d) = Σ_{p_v>0} p_v (log p_v − log d_v)
///
///            w = −1                 w = +1
/// TNFF       α·CE(z; q)             CE(z; p°)
/// TNFLL      α·CE(z; q)             −log p_y
/// TNRR       α·KL(p‖S_ε(q))         KL(p‖S_ε(p°))
/// TNRF       α·KL(p‖S_ε(q))         CE(z; S_ε(p°))
/// TNRLL      α·KL(p‖S_ε(q))         CE(z; S_ε(e_y))
///
/// ∂/∂z: forward forms  scale·(p − t);  reverse forms  scale·p ⊙ (log p − log d − KL)
/// ```
///
/// Forward terms are reported in cross-entropy form (target entropy included) and reverse terms
/// as true KL, as upstream. Positions with `w = 0` give 0. Upstream's `score_batch` equals
/// `−loss` under [`Reduction::PerSequence`].
///
/// Differences from upstream, all where upstream returns NaN, clamps or multiplies by a mask:
/// the negative target uses the masked log-sum-exp (upstream is NaN when every `p°_{v≠y}`
/// underflows); positions are masked by selection (a NaN at a `w = 0` position cannot leak);
/// `−inf` logits remove a token; weights other than −1, 0, +1 are rejected by
/// [`TokenWeights`].
///
/// The reverse forms have a vanishing gradient when the model is saturated on a negative token
/// (`p_y → 1`); the forward forms keep an O(1) push (`∂/∂z_y = α·p_y`).
///
/// # Metrics
///
/// `tnt/neg_mass` (mean `p_y` at negatives: how much probability the unwanted tokens still
/// get), `tnt/ref_neg_mass` (the same under the reference), `tnt/neg_top1` (fraction of negatives
/// that are still the argmax, i.e. greedy decoding would emit them), `tnt/neg_kl` (`KL(q‖p)` at
/// negatives: distance to the ideal target), `tnt/pos_kl` (`KL(p°‖p)` at positives: drift on
/// non-negative positions), `tnt/pos_top1_agreement` (argmax unchanged at positives),
/// `tnt/neg_loss` and `tnt/pos_loss` (mean token loss of each branch, `α` included). With
/// [`TntConfig::metrics`] `= false` none are computed (the fastest training step on the kernel).
///
/// # Shapes
///
/// * `logits`, `ref_logits`: `[B, T, V]`, f16 / bf16 / f32 / f64 (dtypes may differ);
///   `ref_logits` is always treated as a constant.
/// * `labels`: `[B, T]`, integer (only read where `w ≠ 0`).
/// * `weights`: `[B, T]` ([`TokenWeights`]).
/// * Output: see [`Reduction`]; `per_example` is `[B, T]`; one part `"tokens"` with
///   `count = #{w ≠ 0}`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::VocabTooSmall`], [`Error::LabelOutOfRange`] (at `w ≠ 0`),
/// [`Error::NonFiniteLogits`] (NaN / `+inf` at `w ≠ 0`, with the default policy) and
/// [`Error::InvalidConfig`] (`α` or `ε` negative or non-finite, `ε = 0` for a reverse variant).
///
/// # Example
///
/// ```
/// use amend_losses::token::{TntConfig, TntVariant, TokenWeights, tnt_loss};
/// use tch::Tensor;
///
/// // Example A of the spec: one negative position, V = 4.
/// let z = Tensor::from_slice(&[2.0f64, 1.0, 0.5, -1.0]).reshape([1, 1, 4]);
/// let z_ref = Tensor::from_slice(&[1.5f64, 1.2, 0.3, -0.5]).reshape([1, 1, 4]);
/// let labels = Tensor::from_slice(&[1i64]).reshape([1, 1]);
/// let w = TokenWeights::new(&Tensor::from_slice(&[-1i64]).reshape([1, 1]))?;
/// let cfg = TntConfig::new(TntVariant::Ff).with_alpha(1.0);
/// let out = tnt_loss(&z, &z_ref, &labels, &w, &cfg)?;
/// assert!((out.loss.double_value(&[]) - 1.092313506).abs() < 1e-8);
/// assert_eq!(out.count(), 1.0);
/// assert!(out.metrics.mean("tnt/neg_mass").unwrap() > 0.22);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn tnt_loss(
    logits: &Tensor,
    ref_logits: &Tensor,
    labels: &Tensor,
    weights: &TokenWeights,
    cfg: &TntConfig,
) -> Result<LossOutput> {
    const OP: &str = "tnt_loss";
    cfg.validate()?;
    cfg.check_dtype(OP, compute_kind(OP, "logits", logits)?)?;
    let plan = plan_weighted(OP, logits, Some(ref_logits), labels, weights)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = tnt_kernel(OP, &plan, logits, ref_logits, weights, cfg)?
    {
        return Ok(out);
    }
    let prep = select_weighted(OP, plan, logits, Some(ref_logits), weights, cfg.non_finite)?;
    let rows_loss = TntRows { variant: cfg.variant, alpha: cfg.alpha, eps: cfg.smoothing_eps };
    let mut sink = MetricSink::default();
    let row_loss = eval_rows(&rows_loss, &prep.rows, cfg.backend, &mut |rows, values| {
        if cfg.metrics { tnt_metrics(rows, values, &mut sink) } else { Ok(()) }
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits, ref_logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// The kernel's variant for a TNT variant.
pub(crate) fn kernel_variant(variant: TntVariant) -> amend_kernels::TntVariant {
    match variant {
        TntVariant::Ff => amend_kernels::TntVariant::Tnff,
        TntVariant::Rr => amend_kernels::TntVariant::Tnrr,
        TntVariant::Rf => amend_kernels::TntVariant::Tnrf,
        TntVariant::Fll => amend_kernels::TntVariant::Tnfll,
        TntVariant::Rll => amend_kernels::TntVariant::Tnrll,
    }
}

/// The kernel configuration of `cfg` (values in cross-entropy form for forward terms, as
/// upstream and as the composite path).
pub(crate) fn kernel_config(cfg: &TntConfig) -> TntKernelConfig {
    TntKernelConfig::new(kernel_variant(cfg.variant))
        .with_alpha(cfg.alpha)
        .with_smoothing_eps(cfg.smoothing_eps)
        .with_forward_value(amend_kernels::KlValue::CrossEntropy)
        .with_threads(threads())
}

/// [`tnt_loss`] on the fused kernel (`None`: a row was rejected as non-finite, take the
/// composite path).
fn tnt_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    ref_logits: &Tensor,
    weights: &TokenWeights,
    cfg: &TntConfig,
) -> Result<Option<LossOutput>> {
    let signs = weights.signs().f_to_kind(Kind::Float)?;
    let zo = CpuSlice::<f32>::new(ref_logits, op, "ref_logits")?;
    let y = CpuSlice::<i64>::new(&plan.labels, op, "labels")?;
    let w = CpuSlice::<f32>::new(&signs, op, "weights")?;
    let kcfg = kernel_config(cfg);
    // The metrics' per-row quantities come out of the same sweep (`tnt_with_stats`).
    let mut row_stats = Vec::new();
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        let (zo, y, w) = (zo.as_slice(), y.as_slice(), w.as_slice());
        if cfg.metrics {
            row_stats.resize(loss.len(), TntRowStats::INACTIVE);
            amend_kernels::tnt_with_stats(io, vocab, zo, y, w, &kcfg, loss, &mut row_stats)
        } else {
            amend_kernels::tnt(io, vocab, Some(zo), y, w, &kcfg, loss)
        }
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let mut sink = MetricSink::default();
    if cfg.metrics {
        let neg = weights.negative_mask()?;
        let stats = TntKernelStats::from_rows(&row_stats, &plan.labels, &neg, &plan.active)?;
        stats.record(&fused.values, &mut sink)?;
    }
    check_overflow(op, &tok, cfg.non_finite, &[logits, ref_logits])?;
    finish(op, tok, plan.count, cfg.reduction, sink.finish()?).map(Some)
}

/// The per-row quantities behind the TNT metrics, from the kernel's sweep
/// ([`amend_kernels::tnt_with_stats`]): the same metrics as [`tnt_metrics`] on the composite
/// path, with no extra pass over `[N, V]`.
pub(crate) struct TntKernelStats {
    neg: Tensor,
    pos: Tensor,
    /// `log p_y` at negative rows.
    l_y: Tensor,
    /// `log p°_y` (over the row vocabulary of `z`) at negative rows.
    ref_l_y: Tensor,
    /// `KL(t ‖ p)` to the ideal target (`q` at negatives, `p°` at positives).
    kl: Tensor,
    /// `argmax z = y`.
    top1: Tensor,
    /// `argmax z = argmax z°`.
    agree: Tensor,
}

impl TntKernelStats {
    /// Statistics from the kernel's rows `stats` (in the element order of `neg`), with `labels`,
    /// `neg` and `active` shaped like the leading dimensions (CPU).
    pub(crate) fn from_rows(
        stats: &[TntRowStats],
        labels: &Tensor,
        neg: &Tensor,
        active: &Tensor,
    ) -> Result<Self> {
        let shape = neg.size();
        let f32s = |f: fn(&TntRowStats) -> f32| {
            Tensor::from_slice(&stats.iter().map(f).collect::<Vec<f32>>()).f_view(shape.as_slice())
        };
        let ids = |f: fn(&TntRowStats) -> i64| {
            Tensor::from_slice(&stats.iter().map(f).collect::<Vec<i64>>()).f_view(shape.as_slice())
        };
        let am = ids(|s| s.argmax)?;
        let top1 = am.f_eq_tensor(&labels.f_view(shape.as_slice())?)?;
        let agree = am.f_eq_tensor(&ids(|s| s.ref_argmax)?)?;
        Ok(TntKernelStats {
            neg: neg.shallow_clone(),
            pos: active.f_logical_and(&neg.f_logical_not()?)?,
            l_y: f32s(|s| s.logp_y)?,
            ref_l_y: f32s(|s| s.ref_logp_y)?,
            kl: f32s(|s| s.kl)?,
            top1,
            agree,
        })
    }

    /// Adds the TNT metrics (see [`tnt_loss`]) given the token losses `values` (detached).
    pub(crate) fn record(&self, values: &Tensor, sink: &mut MetricSink) -> Result<()> {
        let (neg, pos) = (&self.neg, &self.pos);
        let n_neg = neg.f_sum(Kind::Float)?;
        let n_pos = pos.f_sum(Kind::Float)?;
        let f = |t: &Tensor| t.f_to_kind(Kind::Float);
        sink.add_counted("tnt/neg_mass", &masked_sum(&self.l_y.f_exp()?, neg)?, &n_neg)?;
        sink.add_counted("tnt/ref_neg_mass", &masked_sum(&self.ref_l_y.f_exp()?, neg)?, &n_neg)?;
        sink.add_counted("tnt/neg_top1", &masked_sum(&f(&self.top1)?, neg)?, &n_neg)?;
        sink.add_counted("tnt/neg_kl", &masked_sum(&self.kl, neg)?, &n_neg)?;
        sink.add_counted("tnt/pos_kl", &masked_sum(&self.kl, pos)?, &n_pos)?;
        sink.add_counted("tnt/pos_top1_agreement", &masked_sum(&f(&self.agree)?, pos)?, &n_pos)?;
        sink.add_counted("tnt/neg_loss", &masked_sum(values, neg)?, &n_neg)?;
        sink.add_counted("tnt/pos_loss", &masked_sum(values, pos)?, &n_pos)?;
        Ok(())
    }
}
