//! SatImp: gradient ascent on the forget tokens weighted by saturation `p^β₁` and importance
//! `(1 − p)^β₂`, so both the already-forgotten and the still-certain tokens pull less than the
//! ones in between.
//!
//! Paper: Yang et al., "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
//! [arXiv 2505.11953](https://arxiv.org/abs/2505.11953). Parity target:
//! `locuslab/open-unlearning` `src/trainer/utils.py::compute_satimp_loss` (commit d3d7cf9,
//! line 118), `src/trainer/unlearn/satimp.py` (β₁ = 5, β₂ = 1).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::common::{NonFinitePolicy, TokenBackend, check_reduction};
use super::nll::NllConfig;
use super::wga::{nonneg_exponent, weighted_ascent};
use crate::{LossOutput, Reduction, Result};

/// Configuration of [`satimp_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SatImpConfig {
    /// Saturation exponent β₁ ≥ 0 (weight `p^β₁`). Default 5.0 (open-unlearning).
    pub beta1: f64,
    /// Importance exponent β₂ ≥ 0 (weight `(1 − p)^β₂`). Default 1.0 (open-unlearning).
    pub beta2: f64,
    /// Label value of ignored positions. Default −100.
    pub ignore_index: i64,
    /// Reduction. Default `Mean` over the active tokens.
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions. Default: error.
    pub non_finite: NonFinitePolicy,
    /// Gradient path of the underlying log-probs. Default: auto.
    pub backend: TokenBackend,
}

impl Default for SatImpConfig {
    fn default() -> Self {
        SatImpConfig {
            beta1: 5.0,
            beta2: 1.0,
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl SatImpConfig {
    /// Sets [`SatImpConfig::beta1`].
    pub fn with_beta1(mut self, v: f64) -> Self {
        self.beta1 = v;
        self
    }

    /// Sets [`SatImpConfig::beta2`].
    pub fn with_beta2(mut self, v: f64) -> Self {
        self.beta2 = v;
        self
    }

    /// Sets [`SatImpConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`SatImpConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`crate::Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        nonneg_exponent("satimp_loss", "beta1", self.beta1)?;
        nonneg_exponent("satimp_loss", "beta2", self.beta2)?;
        check_reduction("satimp_loss", self.reduction)
    }
}

/// SatImp on the forget tokens.
///
/// ```text
/// w_t = p_y,t^β₁ · (1 − p_y,t)^β₂    (constant; 1 − p = −expm1(log p), exact near p = 1)
/// ℓ_t = w_t · log p_y,t              on active positions
/// loss = mean over active tokens     (open-unlearning: −mean(w · CE))
/// ```
///
/// β₁ = β₂ = 0 is plain gradient ascent; β₂ = 0 is [`wga_loss`](super::wga_loss) with β = β₁.
/// Combine with a retain term yourself (open-unlearning's SatImp YAML: `gamma = 0.1` on the
/// forget loss, `alpha = 1.0` on the retain NLL).
///
/// # Metrics
///
/// `satimp/weight` (mean `w`) and `forget/logp` (mean `log p_y`) over the active tokens.
///
/// # Shapes
///
/// As [`wga_loss`](super::wga_loss).
///
/// # Errors
///
/// As [`nll_loss`](super::nll_loss), and [`crate::Error::InvalidConfig`] for a negative or
/// non-finite exponent.
///
/// # Example
///
/// ```
/// use amend_losses::token::{SatImpConfig, satimp_loss};
/// use tch::Tensor;
///
/// // p_y = 1/2: w = (1/2)^5 · (1/2)^1.
/// let logits = Tensor::from_slice(&[0.0f64, 0.0]).reshape([1, 1, 2]);
/// let labels = Tensor::from_slice(&[0i64]).reshape([1, 1]);
/// let out = satimp_loss(&logits, &labels, None, &SatImpConfig::default())?;
/// assert!((out.loss.double_value(&[]) - 0.5f64.powi(6) * 0.5f64.ln()).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn satimp_loss(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &SatImpConfig,
) -> Result<LossOutput> {
    const OP: &str = "satimp_loss";
    cfg.validate()?;
    let nll_cfg = NllConfig {
        ignore_index: cfg.ignore_index,
        reduction: Reduction::Sum,
        non_finite: cfg.non_finite,
        backend: cfg.backend,
    };
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    weighted_ascent(OP, logits, labels, loss_mask, nll_cfg, cfg.reduction, "satimp/weight", |ce| {
        let sat = ce.f_mul_scalar(-b1)?.f_exp()?;
        // (1 − p)^β₂ = exp(β₂ · log(−expm1(−ce))); pow keeps 0^0 = 1 for β₂ = 0.
        let imp = ce.f_neg()?.f_expm1()?.f_neg()?.f_pow_tensor_scalar(b2)?;
        Ok(sat.f_mul(&imp)?)
    })
}
