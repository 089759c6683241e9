//! SimPO: reference-free preference optimisation on length-normalised log-probs with a target
//! margin.
//!
//! Paper: Meng, Xia & Chen, [arXiv 2405.14734](https://arxiv.org/abs/2405.14734). Parity targets:
//! `princeton-nlp/SimPO scripts/simpo_trainer.py` (preference term) and TRL's CPO trainer with
//! `loss_type="simpo"` (`trl/experimental/cpo/cpo_trainer.py`, which adds the NLL term with
//! weight `cpo_alpha`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::SeqLogps;
use super::common::{
    cfg, finish, nll_part, nonempty, pairs, part, preference_metrics, safe_mean, select,
    with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{LossOutput, Metrics, Reduction, Result};

/// Configuration of [`simpo_loss`].
///
/// Defaults follow the official `scripts/simpo_config.py` (β = 2.0, γ/β = 0.25 → γ = 0.5, no SFT
/// term). TRL runs SimPO inside CPO with β = 0.1, `simpo_gamma` = 0.5 and `cpo_alpha` = 1.0: set
/// `nll_weight = 1.0` and `beta = 0.1` to match it. TRL's and the official names are accepted
/// when deserialising (`simpo_gamma`; `cpo_alpha`, `sft_weight`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimPoConfig {
    /// Reward scale β > 0. Default 2.0.
    pub beta: f64,
    /// Target reward margin γ (finite), in the units of `β · A`. Default 0.5. Official configs give
    /// γ/β; convert with [`gamma_from_ratio`].
    #[serde(alias = "simpo_gamma")]
    pub gamma: f64,
    /// Label smoothing ε ∈ [0, 1): `−(1−ε) log σ(u) − ε log σ(−u)`. Default 0.
    pub label_smoothing: f64,
    /// Weight of the token-mean NLL of the chosen responses (a second part). Default 0 (pure
    /// SimPO); TRL's CPO trainer uses 1.0.
    #[serde(alias = "cpo_alpha", alias = "sft_weight")]
    pub nll_weight: f64,
    /// Pairs with an empty chosen or rejected response (`A` undefined). Default
    /// [`EmptyPolicy::Error`]; the official trainer divides unguarded (NaN).
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for SimPoConfig {
    fn default() -> Self {
        Self {
            beta: 2.0,
            gamma: 0.5,
            label_smoothing: 0.0,
            nll_weight: 0.0,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(SimPoConfig {
    with_beta => beta: f64,
    with_gamma => gamma: f64,
    with_label_smoothing => label_smoothing: f64,
    with_nll_weight => nll_weight: f64,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl SimPoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "simpo_loss";
        cfg::positive(OP, "beta", self.beta)?;
        cfg::finite(OP, "gamma", self.gamma)?;
        cfg::half_open(OP, "label_smoothing", self.label_smoothing, 0.0, 1.0)?;
        cfg::nonnegative(OP, "nll_weight", self.nll_weight)
    }
}

/// γ from the official configs' `gamma_beta_ratio`: `γ = β · ratio`.
///
/// ```
/// assert_eq!(amend_losses::sequence::gamma_from_ratio(2.0, 0.25), 0.5);
/// ```
pub fn gamma_from_ratio(beta: f64, gamma_beta_ratio: f64) -> f64 {
    beta * gamma_beta_ratio
}

/// SimPO on length-normalised response log-probs (no reference model).
///
/// ```text
/// A   = S/n                                   mean token log-prob of a response
/// u   = β(A_c − A_r) − γ
/// L   = −(1−ε) log σ(u) − ε log σ(−u)         per pair; part "pairs", count = P
/// NLL = −Σ_pairs S_c / Σ_pairs n_c            part "tokens" with weight nll_weight (if > 0)
/// loss = mean_pairs L + nll_weight · NLL
/// metrics: rewards/* = β·A, logps/* = A, nll_loss (always logged)
/// ```
///
/// # Shapes
///
/// * `chosen`, `rejected`: [`SeqLogps`] over `P` pairs each
/// * `per_example`: `[P]`
///
/// # Errors
///
/// [`crate::Error::InvalidConfig`], [`crate::Error::ShapeMismatch`],
/// [`crate::Error::DtypeMismatch`], [`crate::Error::DeviceMismatch`],
/// [`crate::Error::EmptySequence`] (an empty response, under [`EmptyPolicy::Error`]).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{simpo_loss, SeqLogps, SimPoConfig};
/// use tch::Tensor;
///
/// let chosen = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f64]), &Tensor::from_slice(&[5i64]))?;
/// let rejected = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64]), &Tensor::from_slice(&[6i64]))?;
/// let out = simpo_loss(&chosen, &rejected, &SimPoConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 0.9740769842).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn simpo_loss(chosen: &SeqLogps, rejected: &SeqLogps, cfg: &SimPoConfig) -> Result<LossOutput> {
    const OP: &str = "simpo_loss";
    cfg.validate()?;
    let pr = pairs(OP, chosen, rejected)?;
    let all = Tensor::f_ones([pr.p], (tch::Kind::Bool, pr.device))?;
    let valid = nonempty(OP, &pr.n_c, Some(&all), cfg.empty_policy)?;
    let valid = nonempty(OP, &pr.n_r, Some(&valid), cfg.empty_policy)?;
    let a_c = safe_mean(&pr.s_c, &pr.n_c, &valid)?;
    let a_r = safe_mean(&pr.s_r, &pr.n_r, &valid)?;
    let u = a_c.f_sub(&a_r)?.f_mul_scalar(cfg.beta)?.f_sub_scalar(cfg.gamma)?;
    let eps = cfg.label_smoothing;
    let mut per_pair = u.f_log_sigmoid()?.f_mul_scalar(-(1.0 - eps))?;
    if eps > 0.0 {
        per_pair = per_pair.f_sub(&u.f_neg()?.f_log_sigmoid()?.f_mul_scalar(eps)?)?;
    }
    let per_pair = select(&per_pair, &valid)?;
    let mut metrics = Metrics::new();
    preference_metrics(
        &mut metrics,
        &a_c.f_mul_scalar(cfg.beta)?,
        &a_r.f_mul_scalar(cfg.beta)?,
        &a_c,
        &a_r,
        &valid,
    )?;
    let mut parts = vec![part("pairs", &per_pair, &valid, 1.0)?];
    let (nll, (nll_sum, nll_count)) =
        nll_part(OP, "tokens", chosen, Some(&valid), cfg.nll_weight, pr.kind, pr.device)?;
    metrics.add("nll_loss", nll_sum, nll_count);
    if cfg.nll_weight > 0.0 {
        parts.push(nll);
    }
    finish(per_pair, parts, metrics, cfg.reduction)
}
