//! NL: negative likelihood on annotated tokens, the simplest TNT baseline.
//!
//! `google/t5patches` `NLModel` (`t5patches/models.py`), with the threshold implemented as its
//! docstring intends (see [`nl_loss`]).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{SelectedLogpConfig, SelectedLogpOut};

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, check_fits_dtype, check_nonneg_finite,
    check_overflow, check_reduction, compute_kind, finish, masked_sum, plan_weighted,
    select_weighted, token_losses,
};
use super::kernel::{self, fused, inject, override_rows, threads};
use super::rows::{RowLoss, Rows, eval_rows, minus_onehot};
use super::weights::TokenWeights;
use crate::bridge::{CpuBuf, CpuSlice};
use crate::{Error, LossOutput, Reduction, Result};

/// Configuration of [`nl_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NlConfig {
    /// Weight `α ≥ 0` of the negative positions (default `1e4`, upstream).
    pub alpha: f64,
    /// Floor `θ < 0` on `log p_y` at negative positions (default `Some(−10.3)`): once
    /// `log p_y < θ` the token loss is the constant `α·θ` and the gradient 0, so an unwanted
    /// token is not pushed down forever. `None` disables the floor (the loss is then unbounded
    /// below).
    pub threshold: Option<f64>,
    /// Reduction (default `Sum`, as upstream).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for NlConfig {
    fn default() -> Self {
        NlConfig {
            alpha: 1e4,
            threshold: Some(-10.3),
            reduction: Reduction::Sum,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl NlConfig {
    /// Rejects knobs that the compute dtype `kind` cannot hold (see `check_fits_dtype`).
    pub(crate) fn check_dtype(&self, op: &'static str, kind: tch::Kind) -> Result<()> {
        check_fits_dtype(op, "alpha", self.alpha, kind)?;
        Ok(())
    }

    /// Sets [`NlConfig::alpha`].
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets [`NlConfig::threshold`].
    pub fn with_threshold(mut self, threshold: Option<f64>) -> Self {
        self.threshold = threshold;
        self
    }

    /// Sets [`NlConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`NlConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`NlConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "nl_loss";
        check_nonneg_finite(OP, "alpha", self.alpha)?;
        if let Some(theta) = self.threshold
            && (!theta.is_finite() || theta >= 0.0)
        {
            return Err(Error::InvalidConfig {
                op: OP,
                name: "threshold",
                reason: format!("must be finite and < 0 (a log-probability), got {theta}"),
            });
        }
        check_reduction(OP, self.reduction)
    }
}

/// The NL row formula.
pub(crate) struct NlRows {
    pub alpha: f64,
    pub threshold: Option<f64>,
}

impl NlRows {
    /// Negative rows whose `log p_y` is below the floor (detached).
    fn floored(&self, l_y: &Tensor, neg: &Tensor) -> Result<Tensor> {
        match self.threshold {
            Some(theta) => Ok(l_y.f_detach()?.f_lt(theta)?.f_logical_and(neg)?),
            None => Ok(neg.f_zeros_like()?.f_to_kind(Kind::Bool)?),
        }
    }
}

impl RowLoss for NlRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        let l_y = rows.log_probs()?.at(&rows.labels)?;
        let neg = rows.neg()?;
        let floored = self.floored(&l_y, neg)?;
        let neg_value = l_y.f_mul_scalar(self.alpha)?.f_where_scalarother(
            &floored.f_logical_not()?,
            self.alpha * self.threshold.unwrap_or(0.0),
        )?;
        Ok(neg_value.f_where_self(neg, &l_y.f_neg()?)?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let l_y = lp.at(&rows.labels)?;
        let neg = rows.neg()?;
        let floored = self.floored(&l_y, neg)?;
        let neg_value = l_y.f_mul_scalar(self.alpha)?.f_where_scalarother(
            &floored.f_logical_not()?,
            self.alpha * self.threshold.unwrap_or(0.0),
        )?;
        let value = neg_value.f_where_self(neg, &l_y.f_neg()?)?;
        let grad = if want_grad {
            let g_pos = minus_onehot(&lp.p()?, &rows.labels)?;
            // Negative rows: α(e_y − p), or 0 when floored.
            let g_neg = g_pos
                .f_mul_scalar(-self.alpha)?
                .f_where_scalarother(&floored.f_logical_not()?.f_unsqueeze(1)?, 0.0)?;
            Some(g_neg.f_where_self(&neg.f_unsqueeze(1)?, &g_pos)?)
        } else {
            None
        };
        Ok((value, grad))
    }
}

/// NL (negative likelihood) on annotated tokens: gradient ascent on the log-likelihood of the
/// negative tokens, plain NLL on the positive ones.
///
/// ```text
/// w = +1:  ℓ = −log p_y                               ∂ℓ/∂z = p − e_y
/// w = −1:  ℓ = α·log p_y        if log p_y ≥ θ         ∂ℓ/∂z = α(e_y − p)
///          ℓ = α·θ              if log p_y < θ         ∂ℓ/∂z = 0          (θ = threshold)
/// w =  0:  ℓ = 0
/// ```
///
/// The loss is continuous at the floor. Difference from upstream: `t5patches` applies its
/// `10.3` cap to the signed loss, so it caps the *positive* NLL at 10.3 (zero gradient) and never
/// floors a negative token; here the floor acts on negatives, as its docstring intends ("stop
/// pushing a negative token down once `log p_y < −10.3`"), and positives are uncapped.
///
/// # Metrics
///
/// `nl/neg_logp` (mean `log p_y` at negatives), `nl/floored` (fraction of negatives at the
/// floor), `nl/pos_nll` (mean NLL at positives).
///
/// # Shapes
///
/// * `logits`: `[B, T, V]`; `labels`, `weights`: `[B, T]`.
/// * Output: see [`Reduction`]; one part `"tokens"` with `count = #{w ≠ 0}`.
///
/// # Errors
///
/// As [`tnt_loss`](super::tnt_loss), plus [`Error::InvalidConfig`] for a threshold that is
/// not a finite negative number.
///
/// # Example
///
/// ```
/// use amend_losses::token::{NlConfig, TokenWeights, nl_loss};
/// use tch::Tensor;
///
/// // E4 of the spec: log p_y = −12.000018432 is below θ = −10.3, so the loss is α·θ.
/// let z = Tensor::from_slice(&[12.0f64, 0.0, 0.0, 0.0]).reshape([1, 1, 4]);
/// let labels = Tensor::from_slice(&[1i64]).reshape([1, 1]);
/// let w = TokenWeights::new(&Tensor::from_slice(&[-1i64]).reshape([1, 1]))?;
/// let out = nl_loss(&z, &labels, &w, &NlConfig::default().with_alpha(1.0))?;
/// assert!((out.loss.double_value(&[]) + 10.3).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn nl_loss(
    logits: &Tensor,
    labels: &Tensor,
    weights: &TokenWeights,
    cfg: &NlConfig,
) -> Result<LossOutput> {
    const OP: &str = "nl_loss";
    cfg.validate()?;
    cfg.check_dtype(OP, compute_kind(OP, "logits", logits)?)?;
    let plan = plan_weighted(OP, logits, None, labels, weights)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = nl_kernel(OP, &plan, logits, weights, cfg)?
    {
        return Ok(out);
    }
    let prep = select_weighted(OP, plan, logits, None, weights, cfg.non_finite)?;
    let rows_loss = NlRows { alpha: cfg.alpha, threshold: cfg.threshold };
    let (n_neg, n_pos) = (weights.num_negative() as f64, weights.num_positive() as f64);
    let mut sink = MetricSink::default();
    let row_loss = eval_rows(&rows_loss, &prep.rows, cfg.backend, &mut |rows, _| {
        let l_y = rows.log_probs()?.at(&rows.labels)?;
        let neg = rows.neg()?;
        let floored = rows_loss.floored(&l_y, neg)?.f_to_kind(Kind::Float)?;
        sink.add("nl/neg_logp", &masked_sum(&l_y, neg)?, n_neg)?;
        sink.add("nl/floored", &floored.f_sum(Kind::Float)?, n_neg)?;
        sink.add("nl/pos_nll", &masked_sum(&l_y.f_neg()?, &neg.f_logical_not()?)?, n_pos)?;
        Ok(())
    })?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// [`nl_loss`] on the fused selected-token kernel: per-row scale `+1` at positives (`−log p_y`,
/// `p − e_y`) and `−α` at negatives (`α·log p_y`, `α(e_y − p)`), then the floor: negative rows
/// with `log p_y < θ` get the value `α·θ` and a zero gradient row. `None`: a row was rejected as
/// non-finite, take the composite path.
fn nl_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    weights: &TokenWeights,
    cfg: &NlConfig,
) -> Result<Option<LossOutput>> {
    let neg = weights.negative_mask()?;
    let pos = plan.active.f_logical_and(&neg.f_logical_not()?)?;
    // With α = 0 the negative rows still need log p_y (metrics): scale −1, zeroed afterwards.
    let neg_scale = if cfg.alpha > 0.0 { -cfg.alpha } else { -1.0 };
    let scale = pos
        .f_to_kind(Kind::Float)?
        .f_add(&neg.f_to_kind(Kind::Float)?.f_mul_scalar(neg_scale)?)?
        .f_contiguous()?;
    let s = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let y = CpuSlice::<i64>::new(&plan.labels, op, "labels")?;
    let mut logp = CpuBuf::empty(&plan.active.size())?;
    let kcfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(threads());
    let Some(mut fused) = fused(op, logits, |io, vocab, loss| {
        let out = SelectedLogpOut::new(loss).with_logp(logp.as_mut_slice());
        amend_kernels::selected_logp(io, vocab, y.as_slice(), Some(s.as_slice()), &kcfg, out)
    })?
    else {
        return Ok(None);
    };
    let l_y = logp.into_tensor();
    let floored = match cfg.threshold {
        Some(theta) => l_y.f_lt(theta)?.f_logical_and(&neg)?,
        None => neg.f_zeros_like()?,
    };
    let fixed = if cfg.alpha > 0.0 { floored.shallow_clone() } else { neg.shallow_clone() };
    override_rows(&mut fused, &fixed, cfg.alpha * cfg.threshold.unwrap_or(0.0))?;
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let (n_neg, n_pos) = (weights.num_negative() as f64, weights.num_positive() as f64);
    let mut sink = MetricSink::default();
    sink.add("nl/neg_logp", &masked_sum(&l_y, &neg)?, n_neg)?;
    sink.add("nl/floored", &floored.f_sum(Kind::Float)?, n_neg)?;
    sink.add("nl/pos_nll", &masked_sum(&l_y.f_neg()?, &pos)?, n_pos)?;
    check_overflow(op, &tok, cfg.non_finite, &[logits])?;
    finish(op, tok, plan.count, cfg.reduction, sink.finish()?).map(Some)
}
