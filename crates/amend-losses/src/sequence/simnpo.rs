//! SimNPO: reference-free NPO on length-normalised log-probs, for unlearning.
//!
//! Paper: Fan et al., [arXiv 2410.07163](https://arxiv.org/abs/2410.07163). Parity target:
//! `locuslab/open-unlearning src/trainer/unlearn/simnpo.py` and `configs/trainer/SimNPO.yaml`
//! (β = 4.5, δ = 0, forget weight γ = 0.125, retain weight α = 1). The paper's margin γ is
//! placed inside the β scale as open-unlearning does (the paper text is not confirmed on this).

use super::SeqLogps;
use super::common::{
    add_mean, cfg, check_float, check_rank, check_shape, compute_kind, finish, nll_part, nonempty,
    part, safe_mean, select, with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{LossOutput, Metrics, Reduction, Result};
use serde::{Deserialize, Serialize};

/// Configuration of [`simnpo_loss`]. open-unlearning's names (`gamma` for the forget weight,
/// `alpha` for the retain weight) are accepted when deserialising.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimNpoConfig {
    /// β > 0. Default 4.5.
    pub beta: f64,
    /// Margin δ (finite), inside the β scale. Default 0.
    pub delta: f64,
    /// Weight of the forget part (open-unlearning `gamma`; `npo_coeff` in
    /// `OPTML-Group/Unlearn-Simple`). Default 0.125.
    #[serde(alias = "gamma")]
    pub forget_weight: f64,
    /// Weight of the retain NLL part (open-unlearning `alpha`). Default 1.0.
    #[serde(alias = "alpha")]
    pub retain_weight: f64,
    /// Forget sequences with no scored token (`A` undefined). Default [`EmptyPolicy::Error`].
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for SimNpoConfig {
    fn default() -> Self {
        Self {
            beta: 4.5,
            delta: 0.0,
            forget_weight: 0.125,
            retain_weight: 1.0,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(SimNpoConfig {
    with_beta => beta: f64,
    with_delta => delta: f64,
    with_forget_weight => forget_weight: f64,
    with_retain_weight => retain_weight: f64,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl SimNpoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "simnpo_loss";
        cfg::positive(OP, "beta", self.beta)?;
        cfg::finite(OP, "delta", self.delta)?;
        cfg::nonnegative(OP, "forget_weight", self.forget_weight)?;
        cfg::nonnegative(OP, "retain_weight", self.retain_weight)
    }
}

/// SimNPO on the mean token log-probs of the forget responses, with an optional retain NLL.
///
/// ```text
/// A_b  = S_b / n_b;   ν_b = −A_b                     (mean token NLL)
/// L_b  = −(2/β) log σ(β(ν_b − δ)) = (2/β) softplus(β(A_b + δ))
/// ∂L_b/∂A_b = 2σ(β(A_b + δ))
/// loss = forget_weight · mean_b L_b + retain_weight · (−Σ S_retain / Σ n_retain)
/// parts: "forget" (count = valid sequences), "retain" (tokens, only with a retain batch)
/// metrics: rewards/rejected = β·A, logps/rejected = A, forget_loss, retain_loss
/// ```
///
/// `n` is the number of scored (shifted) tokens; open-unlearning counts the unshifted labels.
///
/// # Shapes
///
/// * `forget`: [`SeqLogps`] `[B]`;  `retain`: optional [`SeqLogps`] `[B']`
/// * `per_example`: `[B]`
///
/// # Errors
///
/// [`crate::Error::InvalidConfig`], [`crate::Error::ShapeMismatch`],
/// [`crate::Error::DtypeMismatch`], [`crate::Error::DeviceMismatch`],
/// [`crate::Error::EmptySequence`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{simnpo_loss, SeqLogps, SimNpoConfig};
/// use tch::Tensor;
///
/// let forget = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64, -7.0, -3.5]), &Tensor::from_slice(&[6i64, 4, 3]))?;
/// let out = simnpo_loss(&forget, None, &SimNpoConfig::default().with_forget_weight(1.0))?;
/// assert!((f64::try_from(&out.loss)? - 8.4996401017e-04).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn simnpo_loss(
    forget: &SeqLogps,
    retain: Option<&SeqLogps>,
    cfg: &SimNpoConfig,
) -> Result<LossOutput> {
    const OP: &str = "simnpo_loss";
    cfg.validate()?;
    check_rank(OP, "forget.sum", &forget.sum, 1, "[B]")?;
    check_float(OP, "forget.sum", &forget.sum)?;
    let b = forget.sum.size()[0];
    check_shape(OP, "forget.len", &forget.len, &[b], || format!("[B] = [{b}]"))?;
    let (kind, device) = (compute_kind(forget.sum.kind()), forget.sum.device());
    let valid = nonempty(OP, &forget.len, None, cfg.empty_policy)?;
    let a = safe_mean(&forget.sum.f_to_kind(kind)?, &forget.len, &valid)?;
    let x = a.f_add_scalar(cfg.delta)?.f_mul_scalar(cfg.beta)?; // β(A + δ) = −β(ν − δ)
    let per_example = select(&x.f_neg()?.f_log_sigmoid()?.f_mul_scalar(-2.0 / cfg.beta)?, &valid)?;
    let mut metrics = Metrics::new();
    add_mean(&mut metrics, "rewards/rejected", &a.f_mul_scalar(cfg.beta)?, &valid)?;
    add_mean(&mut metrics, "logps/rejected", &a, &valid)?;
    add_mean(&mut metrics, "forget_loss", &per_example, &valid)?;
    let mut parts = vec![part("forget", &per_example, &valid, cfg.forget_weight)?];
    if let Some(retain) = retain {
        let (p, (sum, count)) =
            nll_part(OP, "retain", retain, None, cfg.retain_weight, kind, device)?;
        metrics.add("retain_loss", sum, count);
        parts.push(p);
    }
    finish(per_example, parts, metrics, cfg.reduction)
}
