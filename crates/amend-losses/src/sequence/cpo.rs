//! CPO: reference-free contrastive preference optimisation with a behaviour-cloning NLL term,
//! and its AlphaPO reward shaping.
//!
//! Papers: CPO, Xu et al. [arXiv 2401.08417](https://arxiv.org/abs/2401.08417) (Eq. 3 and the
//! NLL regulariser); AlphaPO, [arXiv 2501.03884](https://arxiv.org/abs/2501.03884). Parity
//! targets: TRL 1.16 `trl/experimental/cpo/cpo_trainer.py` (`CPOTrainer.cpo_loss` and
//! `get_batch_loss_metrics`: `loss = mean(L) + cpo_alpha · NLL(chosen)`) and Liger-Kernel 0.8.5
//! `LigerFusedLinearCPOFunction.preference_loss_fn` (the sigmoid term), checked by
//! `scripts/gen_peer_fixtures.py`. SimPO with TRL's defaults is `loss_type = simpo` here; the
//! official SimPO defaults are [`simpo_loss`](super::simpo_loss).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    cfg, finish, nll_part, nonempty, pairs, part, preference_metrics, safe_mean, select,
    with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// The pairwise term of [`cpo_loss`] (TRL `CPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CpoLossType {
    /// `−(1−ε) log σ(βu) − ε log σ(−βu)`, `u = r_c − r_r` on summed log-probs (CPO Eq. 3 at
    /// ε = 0; default).
    #[default]
    Sigmoid,
    /// `max(0, 1 − βu)` on summed log-probs.
    Hinge,
    /// `(u − 1/(2β))²` on length-normalised log-probs.
    Ipo,
    /// SimPO inside CPO: `u − γ/β` in the sigmoid form, on length-normalised log-probs.
    Simpo,
}

impl CpoLossType {
    fn averages(self) -> bool {
        matches!(self, CpoLossType::Ipo | CpoLossType::Simpo)
    }
}

/// Configuration of [`cpo_loss`]. Field names and defaults follow TRL 1.16's `CPOConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpoConfig {
    /// Temperature β > 0. Default 0.1.
    pub beta: f64,
    /// The pairwise term. Default [`CpoLossType::Sigmoid`].
    pub loss_type: CpoLossType,
    /// Label smoothing ε ∈ `[0, 1)` (cDPO-style) of the sigmoid and simpo terms; must be 0 for hinge and
    /// IPO (TRL warns and ignores it). Default 0.
    pub label_smoothing: f64,
    /// Weight (finite, ≥ 0) of the NLL term on the chosen responses, a token mean
    /// `−Σ S_c / Σ n_c`. Default 1.0.
    pub cpo_alpha: f64,
    /// SimPO's target margin γ (finite), used by `simpo` only. Default 0.5.
    pub simpo_gamma: f64,
    /// AlphaPO's α (finite): with α ≠ 0 the rewards are `r = (1 − p^(−α))/α`, `p = e^(log-prob)`,
    /// instead of `r = log-prob`. Default 0 (plain CPO).
    pub alpha: f64,
    /// Pairs with an empty response under `ipo` or `simpo`. Default [`EmptyPolicy::Error`].
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for CpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: CpoLossType::Sigmoid,
            label_smoothing: 0.0,
            cpo_alpha: 1.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(CpoConfig {
    with_beta => beta: f64,
    with_loss_type => loss_type: CpoLossType,
    with_label_smoothing => label_smoothing: f64,
    with_cpo_alpha => cpo_alpha: f64,
    with_simpo_gamma => simpo_gamma: f64,
    with_alpha => alpha: f64,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl CpoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "cpo_loss";
        cfg::positive(OP, "beta", self.beta)?;
        cfg::nonnegative(OP, "cpo_alpha", self.cpo_alpha)?;
        cfg::finite(OP, "simpo_gamma", self.simpo_gamma)?;
        cfg::finite(OP, "alpha", self.alpha)?;
        match self.loss_type {
            CpoLossType::Sigmoid | CpoLossType::Simpo => {
                cfg::half_open(OP, "label_smoothing", self.label_smoothing, 0.0, 1.0)
            }
            CpoLossType::Hinge | CpoLossType::Ipo if self.label_smoothing != 0.0 => {
                Err(Error::InvalidConfig {
                    op: OP,
                    name: "label_smoothing",
                    reason: format!(
                        "is not used by {:?} (TRL ignores it with a warning); must be 0, got {}",
                        self.loss_type, self.label_smoothing
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

/// CPO: a reference-free pairwise term plus an NLL term on the chosen responses.
///
/// ```text
/// x   = S (sigmoid, hinge)  or  A = S/n (ipo, simpo)         per response
/// r   = x  (α = 0)   or   (1 − e^(−α x))/α  (AlphaPO)        reward
/// u   = r_c − r_r
/// sigmoid: L = −(1−ε) log σ(βu) − ε log σ(−βu)
/// simpo:   L = the same with u − γ/β
/// hinge:   L = max(0, 1 − βu)
/// ipo:     L = (u − 1/(2β))²
/// loss = mean over pairs of L + cpo_alpha · (−Σ S_c / Σ n_c)
/// metrics: rewards/chosen = β r_c, rewards/rejected = β r_r, rewards/margins,
///          rewards/accuracies, logps/chosen = x_c, logps/rejected = x_r, nll_loss
/// ```
///
/// Parts: `"pairs"` (count = valid pairs, weight 1) and `"tokens"` (the NLL, count = chosen
/// tokens of the valid pairs, weight `cpo_alpha`; absent when `cpo_alpha = 0`).
///
/// # Shapes
///
/// * `chosen`, `rejected`: [`SeqLogps`] over `P` pairs each (`sum [P]`, `len [P]`)
/// * `per_example`: `[P]`, the pairwise term
///
/// # Errors
///
/// [`Error::InvalidConfig`] (see [`CpoConfig::validate`]), [`Error::ShapeMismatch`],
/// [`Error::DtypeMismatch`], [`Error::DeviceMismatch`], [`Error::EmptySequence`] for an empty
/// response under `ipo` or `simpo`.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{cpo_loss, CpoConfig, SeqLogps};
/// use tch::Tensor;
///
/// let c = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f64]), &Tensor::from_slice(&[5i64]))?;
/// let r = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64]), &Tensor::from_slice(&[6i64]))?;
/// let out = cpo_loss(&c, &r, &CpoConfig::default())?;
/// // −log σ(0.1 · 2) + 1.0 · 10/5
/// let expect = (1.0 + (-0.2f64).exp()).ln() + 2.0;
/// assert!((f64::try_from(&out.loss)? - expect).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn cpo_loss(chosen: &SeqLogps, rejected: &SeqLogps, cfg: &CpoConfig) -> Result<LossOutput> {
    const OP: &str = "cpo_loss";
    cfg.validate()?;
    let pr = pairs(OP, chosen, rejected)?;
    let mut valid = Tensor::f_ones([pr.p], (Kind::Bool, pr.device))?;
    let (x_c, x_r) = if cfg.loss_type.averages() {
        valid = nonempty(OP, &pr.n_c, Some(&valid), cfg.empty_policy)?;
        valid = nonempty(OP, &pr.n_r, Some(&valid), cfg.empty_policy)?;
        (safe_mean(&pr.s_c, &pr.n_c, &valid)?, safe_mean(&pr.s_r, &pr.n_r, &valid)?)
    } else {
        (pr.s_c.shallow_clone(), pr.s_r.shallow_clone())
    };
    let reward = |x: &Tensor| -> Result<Tensor> {
        if cfg.alpha == 0.0 {
            Ok(x.shallow_clone())
        } else {
            let a = cfg.alpha;
            Ok(x.f_mul_scalar(-a)?.f_exp()?.f_neg()?.f_add_scalar(1.0)?.f_div_scalar(a)?)
        }
    };
    let (r_c, r_r) = (reward(&x_c)?, reward(&x_r)?);
    let u = r_c.f_sub(&r_r)?;
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let smoothed = |v: &Tensor| -> Result<Tensor> {
        let pos = v.f_log_sigmoid()?.f_mul_scalar(-(1.0 - eps))?;
        if eps == 0.0 {
            Ok(pos)
        } else {
            Ok(pos.f_sub(&v.f_neg()?.f_log_sigmoid()?.f_mul_scalar(eps)?)?)
        }
    };
    let per_pair = match cfg.loss_type {
        CpoLossType::Sigmoid => smoothed(&u.f_mul_scalar(beta)?)?,
        CpoLossType::Simpo => {
            smoothed(&u.f_sub_scalar(cfg.simpo_gamma / beta)?.f_mul_scalar(beta)?)?
        }
        CpoLossType::Hinge => u.f_mul_scalar(-beta)?.f_add_scalar(1.0)?.f_relu()?,
        CpoLossType::Ipo => u.f_sub_scalar(1.0 / (2.0 * beta))?.f_square()?,
    };
    let per_pair = select(&per_pair, &valid)?;
    let mut metrics = Metrics::new();
    preference_metrics(
        &mut metrics,
        &r_c.f_mul_scalar(beta)?,
        &r_r.f_mul_scalar(beta)?,
        &x_c,
        &x_r,
        &valid,
    )?;
    let mut parts = vec![part("pairs", &per_pair, &valid, 1.0)?];
    let (nll, (nll_sum, nll_count)) =
        nll_part(OP, "tokens", chosen, Some(&valid), cfg.cpo_alpha, pr.kind, pr.device)?;
    metrics.add("nll_loss", nll_sum, nll_count);
    if cfg.cpo_alpha > 0.0 {
        parts.push(nll);
    }
    finish(per_pair, parts, metrics, cfg.reduction)
}
