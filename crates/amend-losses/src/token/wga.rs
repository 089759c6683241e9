//! Weighted gradient ascent (WGA) on the forget tokens: ascent on `−log p_y`, each token weighted
//! by its own (detached) probability `p_y^β`, so tokens the model has already forgotten stop
//! pulling.
//!
//! Paper: Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
//! Beyond", [arXiv 2502.19301](https://arxiv.org/abs/2502.19301). Parity target:
//! `locuslab/open-unlearning` `src/trainer/utils.py::compute_wga_loss` (commit d3d7cf9, line 102)
//! and `configs/trainer/WGA.yaml` (β = 1).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::common::{
    MetricSink, NonFinitePolicy, TokenBackend, as_mask, check_reduction, finish, masked_sum,
};
use super::nll::{NllConfig, nll_loss};
use crate::{Error, LossOutput, Reduction, Result};

/// Configuration of [`wga_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WgaConfig {
    /// Exponent β ≥ 0 of the weight `p_y^β` (0 is plain gradient ascent). Default 1.0
    /// (open-unlearning).
    pub beta: f64,
    /// Label value of ignored positions. Default −100.
    pub ignore_index: i64,
    /// Reduction. Default `Mean` over the active tokens (open-unlearning's mean over labelled
    /// tokens).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions. Default: error.
    pub non_finite: NonFinitePolicy,
    /// Gradient path of the underlying log-probs (the fused kernel on CPU f32). Default: auto.
    pub backend: TokenBackend,
}

impl Default for WgaConfig {
    fn default() -> Self {
        WgaConfig {
            beta: 1.0,
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl WgaConfig {
    /// Sets [`WgaConfig::beta`].
    pub fn with_beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }

    /// Sets [`WgaConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`WgaConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        nonneg_exponent("wga_loss", "beta", self.beta)?;
        check_reduction("wga_loss", self.reduction)
    }
}

pub(crate) fn nonneg_exponent(op: &'static str, name: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig { op, name, reason: format!("must be finite and >= 0, got {v}") })
    }
}

/// `ℓ_t = w_t · log p_y,t` with constant weights `w = weight(−log p_y)`, through the NLL engine
/// (the fused kernel on CPU f32). Shared by WGA and SatImp.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_ascent(
    op: &'static str,
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    nll_cfg: NllConfig,
    reduction: Reduction,
    weight_name: &'static str,
    weight: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<LossOutput> {
    let ignore = nll_cfg.ignore_index;
    let nll = nll_loss(logits, labels, loss_mask, &nll_cfg.with_reduction(Reduction::Sum))?;
    let count = nll.count() as i64;
    // nll_loss validated the shapes and dtypes of labels and loss_mask.
    let mut active = labels.f_ne(ignore)?;
    if let Some(m) = loss_mask {
        active = active.f_logical_and(&as_mask(op, "loss_mask", m)?)?;
    }
    let tok = nll.per_example;
    let w = weight(&tok.f_detach()?)?.f_where_scalarother(&active, 0.0)?;
    // A token the model already gives probability 0 has weight 0 (for an exponent > 0): its term
    // is 0, the limit of p^β log p, not 0 · (−inf).
    let keep = w.f_ne(0.0)?;
    let out = w.f_mul(&tok)?.f_neg()?.f_where_scalarother(&keep, 0.0)?;
    let mut sink = MetricSink::default();
    let n = count as f64;
    sink.add(weight_name, &masked_sum(&w, &active)?, n)?;
    sink.add("forget/logp", &masked_sum(&tok.f_detach()?.f_neg()?, &active)?, n)?;
    finish(op, out, count, reduction, sink.finish()?)
}

/// Weighted gradient ascent on the forget tokens.
///
/// ```text
/// w_t = p_y,t^β                      (constant: no gradient flows through the weight)
/// ℓ_t = w_t · log p_y,t              on active positions (label ≠ ignore_index ∧ loss_mask)
/// ∂ℓ_t/∂z_t = w_t (e_y − p)
/// loss = mean over active tokens     (open-unlearning: −mean(w · CE))
/// ```
///
/// Minimising lowers `log p_y`, fastest on the tokens the model still predicts confidently; β = 0
/// is plain gradient ascent (`−NLL`). A token with `p_y = 0` contributes 0. Combine with a retain
/// term yourself (open-unlearning: `γ · forget + α · retain`, γ = α = 1, retain NLL): the
/// `(sum, count)` parts of both outputs normalise exactly across micro-batches.
///
/// # Metrics
///
/// `wga/weight` (mean `p_y^β`) and `forget/logp` (mean `log p_y`) over the active tokens.
///
/// # Shapes
///
/// `logits [B, T, V]` aligned with `labels [B, T]` (already shifted), `loss_mask` optional
/// `[B, T]`; output per [`Reduction`], one part `"tokens"`.
///
/// # Errors
///
/// As [`nll_loss`](super::nll_loss), and [`Error::InvalidConfig`] for a negative or non-finite β.
///
/// # Example
///
/// ```
/// use amend_losses::token::{WgaConfig, wga_loss};
/// use tch::Tensor;
///
/// // p_y = 1/2 at the one active position: ℓ = (1/2)^β · log(1/2).
/// let logits = Tensor::from_slice(&[0.0f64, 0.0]).reshape([1, 1, 2]);
/// let labels = Tensor::from_slice(&[1i64]).reshape([1, 1]);
/// let out = wga_loss(&logits, &labels, None, &WgaConfig::default().with_beta(2.0))?;
/// assert!((out.loss.double_value(&[]) - 0.25 * 0.5f64.ln()).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn wga_loss(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &WgaConfig,
) -> Result<LossOutput> {
    const OP: &str = "wga_loss";
    cfg.validate()?;
    let nll_cfg = NllConfig {
        ignore_index: cfg.ignore_index,
        reduction: Reduction::Sum,
        non_finite: cfg.non_finite,
        backend: cfg.backend,
    };
    let beta = cfg.beta;
    weighted_ascent(OP, logits, labels, loss_mask, nll_cfg, cfg.reduction, "wga/weight", |ce| {
        Ok(ce.f_mul_scalar(-beta)?.f_exp()?)
    })
}
