//! NPO: negative preference optimisation, DPO without a winner, for unlearning.
//!
//! Paper: Zhang et al., [arXiv 2404.05868](https://arxiv.org/abs/2404.05868). Parity target:
//! `locuslab/open-unlearning src/trainer/utils.py` (`compute_dpo_loss` without a winner) and
//! `configs/trainer/NPO.yaml` (β = 0.1, forget weight γ = 1, retain weight α = 1).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    add_mean, cfg, check_float, check_rank, compute_kind, constant_input, finish, nll_part, part,
    with_setters,
};
use crate::{LossOutput, Metrics, Reduction, Result};

/// Configuration of [`npo_loss`]. open-unlearning's names (`gamma`, `alpha`) are accepted when
/// deserialising.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NpoConfig {
    /// β > 0. Default 0.1 (`configs/trainer/NPO.yaml`; the class default there is 1.0).
    pub beta: f64,
    /// Weight of the forget part (open-unlearning `gamma`). Default 1.0.
    #[serde(alias = "gamma")]
    pub forget_weight: f64,
    /// Weight of the retain NLL part, used when a retain batch is given (open-unlearning
    /// `alpha`). Default 1.0.
    #[serde(alias = "alpha")]
    pub retain_weight: f64,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for NpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, forget_weight: 1.0, retain_weight: 1.0, reduction: Reduction::Mean }
    }
}

with_setters!(NpoConfig {
    with_beta => beta: f64,
    with_forget_weight => forget_weight: f64,
    with_retain_weight => retain_weight: f64,
    with_reduction => reduction: Reduction,
});

impl NpoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        cfg::positive("npo_loss", "beta", self.beta)?;
        cfg::nonnegative("npo_loss", "forget_weight", self.forget_weight)?;
        cfg::nonnegative("npo_loss", "retain_weight", self.retain_weight)
    }
}

/// NPO on summed log-probs of the forget responses, with an optional retain NLL.
///
/// ```text
/// L_b   = −(2/β) log σ(−β(S_b − R_b)) = (2/β) softplus(β(S_b − R_b))     R: reference (constant)
/// ∂L_b/∂S_b = 2σ(β(S_b − R_b))          the adaptive weight; → 1 (gradient ascent) as β → 0
/// loss  = forget_weight · mean_b L_b + retain_weight · (−Σ S_retain / Σ n_retain)
/// parts: "forget" (count B), "retain" (count = retain tokens, only with a retain batch)
/// metrics: rewards/rejected = β(S − R), logps/rejected = S, npo/weight (mean 2σ(β(S − R))),
///          forget_loss, retain_loss
/// ```
///
/// Unbounded below by design (never clamped).
///
/// # Shapes
///
/// * `forget`: [`SeqLogps`] `[B]` (response tokens);  `forget_ref`: `[B]`
/// * `retain`: optional [`SeqLogps`] `[B']`
/// * `per_example`: `[B]` (unweighted `L_b`)
///
/// # Errors
///
/// [`crate::Error::InvalidConfig`], [`crate::Error::ShapeMismatch`],
/// [`crate::Error::DtypeMismatch`], [`crate::Error::DeviceMismatch`],
/// [`crate::Error::NonFinite`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{npo_loss, NpoConfig, SeqLogps};
/// use tch::Tensor;
///
/// let forget = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64, -7.0, -3.5]), &Tensor::from_slice(&[6i64, 4, 3]))?;
/// let reference = Tensor::from_slice(&[-11.5f64, -7.2, -4.0]);
/// let out = npo_loss(&forget, &reference, None, &NpoConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 13.9341098384).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn npo_loss(
    forget: &SeqLogps,
    forget_ref: &Tensor,
    retain: Option<&SeqLogps>,
    cfg: &NpoConfig,
) -> Result<LossOutput> {
    const OP: &str = "npo_loss";
    cfg.validate()?;
    check_rank(OP, "forget.sum", &forget.sum, 1, "[B]")?;
    check_float(OP, "forget.sum", &forget.sum)?;
    let b = forget.sum.size()[0];
    let (kind, device) = (compute_kind(forget.sum.kind()), forget.sum.device());
    let r = constant_input(OP, "forget_ref", forget_ref, b, kind, device)?;
    let s = forget.sum.f_to_kind(kind)?;
    let x = s.f_sub(&r)?.f_mul_scalar(cfg.beta)?; // β(S − R)
    let per_example = x.f_neg()?.f_log_sigmoid()?.f_mul_scalar(-2.0 / cfg.beta)?;
    let all = Tensor::f_ones([b], (Kind::Bool, device))?;
    let mut metrics = Metrics::new();
    add_mean(&mut metrics, "rewards/rejected", &x, &all)?;
    add_mean(&mut metrics, "logps/rejected", &s, &all)?;
    add_mean(&mut metrics, "npo/weight", &x.f_sigmoid()?.f_mul_scalar(2.0)?, &all)?;
    add_mean(&mut metrics, "forget_loss", &per_example, &all)?;
    let mut parts = vec![part("forget", &per_example, &all, cfg.forget_weight)?];
    if let Some(retain) = retain {
        let (p, (sum, count)) =
            nll_part(OP, "retain", retain, None, cfg.retain_weight, kind, device)?;
        metrics.add("retain_loss", sum, count);
        parts.push(p);
    }
    finish(per_example, parts, metrics, cfg.reduction)
}
