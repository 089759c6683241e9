//! Unlikelihood on annotated tokens, the TNT paper's UL baseline.
//!
//! `google/t5patches` `ULModel` (`t5patches/models.py`); the unlikelihood term is Welleck et al.,
//! <https://arxiv.org/abs/1908.04319>, with the annotated token as the only candidate.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{TntKernelConfig, TntVariant};

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, check_fits_dtype, check_nonneg_finite,
    check_overflow, check_reduction, compute_kind, finish, masked_sum, plan_weighted,
    select_weighted, token_losses,
};
use super::kernel::{self, fused, inject, logp_at, threads};
use super::rows::{CandidateList, RowLoss, Rows, eval_rows, log1m_p, minus_onehot, neg_log1m_grad};
use super::weights::TokenWeights;
use crate::bridge::CpuSlice;
use crate::{LossOutput, Reduction, Result};

/// Configuration of [`ul_annotated_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UlAnnotatedConfig {
    /// Weight `α ≥ 0` of the negative positions (default `1e4`, upstream).
    pub alpha: f64,
    /// Reduction (default `Sum`, as upstream).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for UlAnnotatedConfig {
    fn default() -> Self {
        UlAnnotatedConfig {
            alpha: 1e4,
            reduction: Reduction::Sum,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl UlAnnotatedConfig {
    /// Rejects knobs that the compute dtype `kind` cannot hold (see `check_fits_dtype`).
    pub(crate) fn check_dtype(&self, op: &'static str, kind: tch::Kind) -> Result<()> {
        check_fits_dtype(op, "alpha", self.alpha, kind)?;
        Ok(())
    }

    /// Sets [`UlAnnotatedConfig::alpha`].
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets [`UlAnnotatedConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`UlAnnotatedConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`UlAnnotatedConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`](crate::Error::InvalidConfig)).
    pub fn validate(&self) -> Result<()> {
        check_nonneg_finite("ul_annotated_loss", "alpha", self.alpha)?;
        check_reduction("ul_annotated_loss", self.reduction)
    }
}

/// Rows whose only unlikelihood candidate is their own label, where `mask` holds.
pub(crate) fn label_candidates(rows: &Rows, mask: &Tensor) -> Result<CandidateList> {
    Ok(CandidateList { ids: rows.labels.f_unsqueeze(1)?, valid: mask.f_unsqueeze(1)? })
}

/// The UL-annotated row formula: `−log p_y` at positives, `−α·log(1 − p_y)` at negatives.
pub(crate) struct UlAnnotatedRows {
    pub alpha: f64,
}

impl RowLoss for UlAnnotatedRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let lp = rows.log_probs()?;
        let neg = rows.neg()?;
        let cand = label_candidates(rows, neg)?;
        let lam = log1m_p(lp, &rows.z, &cand)?.lam.f_squeeze_dim(1)?;
        let ul = lam.f_mul_scalar(-self.alpha)?;
        Ok(ul.f_where_self(neg, &lp.at(&rows.labels)?.f_neg()?)?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let neg = rows.neg()?;
        let cand = label_candidates(rows, neg)?;
        let lm = log1m_p(lp, &rows.z, &cand)?;
        let ul = lm.lam.f_squeeze_dim(1)?.f_mul_scalar(-self.alpha)?;
        let value = ul.f_where_self(neg, &lp.at(&rows.labels)?.f_neg()?)?;
        let grad = if want_grad {
            let p = lp.p()?;
            let g_neg = neg_log1m_grad(lp, &p, &cand, &lm)?.f_mul_scalar(self.alpha)?;
            let g_pos = minus_onehot(&p, &rows.labels)?;
            Some(g_neg.f_where_self(&neg.f_unsqueeze(1)?, &g_pos)?)
        } else {
            None
        };
        Ok((value, grad))
    }
}

/// Unlikelihood on annotated tokens: NLL at positive positions, `−α·log(1 − p_y)` at negative
/// ones (the annotated token is the only candidate).
///
/// ```text
/// w = +1:  ℓ = −log p_y                 ∂ℓ/∂z = p − e_y
/// w = −1:  ℓ = −α·log(1 − p_y)          ∂ℓ/∂z = α·p_y (e_y − q⁽ʸ⁾),  q⁽ʸ⁾_v = p_v/(1 − p_y) (v ≠ y), 0 at y
/// w =  0:  ℓ = 0
/// ```
///
/// `log(1 − p_y)` is exact: `log1p(−p_y)` for `p_y ≤ 1/2`, `LSE_{v≠y}(z) − LSE(z)` above. The
/// gradient is bounded (`‖∂ℓ/∂z‖₁ ≤ 2α`). Upstream computes `−log(1 − clip(p_y, 0, 1 − 1e-7))`;
/// in f32 the clip makes the loss saturate at 15.942385 with a zero gradient exactly where the
/// model is most confident in the unwanted token. Here the value is exact and the gradient is
/// `α·p_y(e_y − q)`, which stays O(α).
///
/// # Metrics
///
/// `ul/neg_mass` (mean `p_y` at negatives) and `ul/pos_nll` (mean NLL at positives).
///
/// # Shapes
///
/// As [`tnt_loss`](super::tnt_loss) without `ref_logits`.
///
/// # Errors
///
/// As [`nl_loss`](super::nl_loss) (no threshold).
///
/// # Example
///
/// ```
/// use amend_losses::token::{TokenWeights, UlAnnotatedConfig, ul_annotated_loss};
/// use tch::Tensor;
///
/// // E1 of the spec: p_y = 1 − 6.18e-9; the loss −log(1 − p_y) = 18.9013877 is exact in f32.
/// let z = Tensor::from_slice(&[0.0f32, 20.0, 0.0, 0.0]).reshape([1, 1, 4]).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[1i64]).reshape([1, 1]);
/// let w = TokenWeights::new(&Tensor::from_slice(&[-1i64]).reshape([1, 1]))?;
/// let out = ul_annotated_loss(&z, &labels, &w, &UlAnnotatedConfig::default().with_alpha(1.0))?;
/// assert!((out.loss.double_value(&[]) - 18.901387718).abs() < 2e-4);
/// out.loss.backward();
/// assert!((z.grad().double_value(&[0, 0, 1]) - 1.0).abs() < 1e-6);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn ul_annotated_loss(
    logits: &Tensor,
    labels: &Tensor,
    weights: &TokenWeights,
    cfg: &UlAnnotatedConfig,
) -> Result<LossOutput> {
    const OP: &str = "ul_annotated_loss";
    cfg.validate()?;
    cfg.check_dtype(OP, compute_kind(OP, "logits", logits)?)?;
    let plan = plan_weighted(OP, logits, None, labels, weights)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = ul_annotated_kernel(OP, &plan, logits, weights, cfg)?
    {
        return Ok(out);
    }
    let prep = select_weighted(OP, plan, logits, None, weights, cfg.non_finite)?;
    let rows_loss = UlAnnotatedRows { alpha: cfg.alpha };
    let (n_neg, n_pos) = (weights.num_negative() as f64, weights.num_positive() as f64);
    let mut sink = MetricSink::default();
    let row_loss = eval_rows(&rows_loss, &prep.rows, cfg.backend, &mut |rows, _| {
        let l_y = rows.log_probs()?.at(&rows.labels)?;
        let neg = rows.neg()?;
        sink.add("ul/neg_mass", &masked_sum(&l_y.f_exp()?, neg)?, n_neg)?;
        sink.add("ul/pos_nll", &masked_sum(&l_y.f_neg()?, &neg.f_logical_not()?)?, n_pos)?;
        Ok(())
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// [`ul_annotated_loss`] on the fused kernel ([`amend_kernels::tnt`], `UlAnnotated`); `None`: a
/// row was rejected as non-finite, take the composite path.
fn ul_annotated_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    weights: &TokenWeights,
    cfg: &UlAnnotatedConfig,
) -> Result<Option<LossOutput>> {
    let signs = weights.signs().f_to_kind(Kind::Float)?;
    let y = CpuSlice::<i64>::new(&plan.labels, op, "labels")?;
    let w = CpuSlice::<f32>::new(&signs, op, "weights")?;
    let kcfg =
        TntKernelConfig::new(TntVariant::UlAnnotated).with_alpha(cfg.alpha).with_threads(threads());
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        amend_kernels::tnt(io, vocab, None, y.as_slice(), w.as_slice(), &kcfg, loss)
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let neg = weights.negative_mask()?;
    let pos = plan.active.f_logical_and(&neg.f_logical_not()?)?;
    // p_y at the negatives (usually few rows): one value-only sweep over those rows.
    let (l_y, _) = tch::no_grad(|| logp_at(op, logits, &plan.labels, &neg))?;
    let (n_neg, n_pos) = (weights.num_negative() as f64, weights.num_positive() as f64);
    let mut sink = MetricSink::default();
    sink.add("ul/neg_mass", &masked_sum(&l_y.f_exp()?, &neg)?, n_neg)?;
    // At positives the token loss is −log p_y.
    sink.add("ul/pos_nll", &masked_sum(&fused.values, &pos)?, n_pos)?;
    check_overflow(op, &tok, cfg.non_finite, &[logits])?;
    finish(op, tok, plan.count, cfg.reduction, sink.finish()?).map(Some)
}
