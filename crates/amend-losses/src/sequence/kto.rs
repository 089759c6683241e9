//! KTO: prospect-theoretic optimisation on unpaired desirable and undesirable responses.
//!
//! Paper: Ethayarajh et al., [arXiv 2402.01306](https://arxiv.org/abs/2402.01306). Parity target:
//! TRL `trl/trainer/kto_trainer.py` (`kto_loss`, `loss_type` `kto` and `apo_zero_unpaired`) and
//! `kto_config.py` (defaults).

use amend_kernels::SumCount;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    add_mean, bool_mask, cfg, check_device, check_float, check_rank, check_shape, compute_kind,
    constant_input, count_f64, finish, part, select, with_setters,
};
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// The KTO variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KtoLossType {
    /// KTO with the estimated (or given) reference point z (default).
    #[default]
    Kto,
    /// APO-zero for unpaired data: z = 0, desirable `1 − σ(βρ)`, undesirable `σ(βρ)`; the
    /// weights still apply.
    ApoZeroUnpaired,
}

/// Configuration of [`kto_loss`]. Field names follow TRL's `KTOConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    /// β > 0. Default 0.1.
    pub beta: f64,
    /// λ_D ≥ 0, weight of desirable examples. Default 1.0.
    pub desirable_weight: f64,
    /// λ_U ≥ 0, weight of undesirable examples. Default 1.0.
    pub undesirable_weight: f64,
    /// The variant. Default [`KtoLossType::Kto`].
    pub loss_type: KtoLossType,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`] (over all examples).
    pub reduction: Reduction,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: KtoLossType::Kto,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(KtoConfig {
    with_beta => beta: f64,
    with_desirable_weight => desirable_weight: f64,
    with_undesirable_weight => undesirable_weight: f64,
    with_loss_type => loss_type: KtoLossType,
    with_reduction => reduction: Reduction,
});

impl KtoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "kto_loss";
        cfg::positive(OP, "beta", self.beta)?;
        cfg::nonnegative(OP, "desirable_weight", self.desirable_weight)?;
        cfg::nonnegative(OP, "undesirable_weight", self.undesirable_weight)
    }

    /// Whether `λ_D n_D / (λ_U n_U) ∈ [1, 4/3]`, the range outside of which TRL warns (it checks
    /// the whole dataset; so should you). `true` when either group is empty.
    pub fn weight_ratio_in_range(&self, n_desirable: usize, n_undesirable: usize) -> bool {
        if n_desirable == 0 || n_undesirable == 0 {
            return true;
        }
        let ratio = self.desirable_weight * n_desirable as f64
            / (self.undesirable_weight * n_undesirable as f64);
        (1.0..=4.0 / 3.0).contains(&ratio)
    }
}

/// Where KTO's reference point z comes from.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum KtoReferencePoint<'a> {
    /// Estimate `z = max(0, mean(S(y'|x) − R(y'|x)))` from this batch's mismatched pairs:
    /// example `i` scored with the completion of example `(i − 1) mod B`, under the policy
    /// (`policy_kl`) and the reference (`reference_kl`), both `[B]`, B ≥ 2. Detached.
    Estimate {
        /// Policy sums of the mismatched pairs, `[B]`.
        policy_kl: &'a Tensor,
        /// Reference sums of the mismatched pairs, `[B]`.
        reference_kl: &'a Tensor,
    },
    /// A given z ≥ 0, for example `max(0, sum/count)` of [`kto_reference_point_stats`]
    /// all-reduced over ranks (TRL gathers the per-rank means before clamping).
    Given(f64),
}

/// The `(Σ (S' − R'), count)` of a batch's mismatched pairs: all-reduce it over ranks, then
/// pass `KtoReferencePoint::Given(`[`kto_reference_point`]`(total))`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::NonFinite`].
pub fn kto_reference_point_stats(policy_kl: &Tensor, reference_kl: &Tensor) -> Result<SumCount> {
    const OP: &str = "kto_reference_point_stats";
    check_rank(OP, "policy_kl", policy_kl, 1, "[B]")?;
    check_float(OP, "policy_kl", policy_kl)?;
    let b = policy_kl.size()[0];
    let kind = compute_kind(policy_kl.kind());
    let p = constant_input(OP, "policy_kl", policy_kl, b, kind, policy_kl.device())?;
    let r = constant_input(OP, "reference_kl", reference_kl, b, kind, policy_kl.device())?;
    let diff = f64::try_from(p.f_sub(&r)?.f_sum(Kind::Double)?)?;
    Ok(SumCount::new(diff, b as f64))
}

/// `z = max(0, sum / count)` (0 for an empty pair).
pub fn kto_reference_point(stats: SumCount) -> f64 {
    stats.mean().max(0.0)
}

/// KTO on summed response log-probs of unpaired examples.
///
/// ```text
/// ρ = S − R                                   R: reference sums (constant)
/// z = max(0, mean_batch(S(y'|x) − R(y'|x)))   detached; or given
/// desirable:    L = λ_D · (1 − σ(β(ρ − z)))
/// undesirable:  L = λ_U · (1 − σ(β(z − ρ)))
/// ApoZeroUnpaired: z = 0, desirable λ_D(1 − σ(βρ)), undesirable λ_U σ(βρ)
/// loss = mean over all B examples (part "examples", count = n_D + n_U)
/// metrics: rewards/chosen, rewards/rejected = mean β·ρ over desirable / undesirable,
///          rewards/margins (their difference, count 1 per call), logps/chosen, logps/rejected
///          = mean S, kl = z (count 1 per call), kto/weight_ratio_out_of_range (0/1 per call,
///          only when both groups are present)
/// ```
///
/// Either group may be empty. z is a coupling inside the batch (part of the loss's definition);
/// for exact data parallelism all-reduce [`kto_reference_point_stats`] and pass
/// [`KtoReferencePoint::Given`]. `rewards/margins` is a per-call difference of means; for an
/// exact value over many micro-batches subtract the merged `rewards/rejected` from
/// `rewards/chosen`.
///
/// # Shapes
///
/// * `policy`: [`SeqLogps`] `[B]`;  `reference`: `[B]`;  `desirable`: `[B]` bool or 0/1
/// * `per_example`: `[B]`
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::InvalidInput`] (estimating z from fewer than 2 mismatched
/// pairs, or a negative or non-finite given z), [`Error::ShapeMismatch`],
/// [`Error::DtypeMismatch`], [`Error::DeviceMismatch`], [`Error::NonFinite`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{kto_loss, KtoConfig, KtoReferencePoint, SeqLogps};
/// use tch::Tensor;
///
/// let policy = SeqLogps::from_sums(&Tensor::from_slice(&[-9.0f64, -10.0]), &Tensor::from_slice(&[4i64, 5]))?;
/// let reference = Tensor::from_slice(&[-10.0f64, -9.5]);
/// let desirable = Tensor::from_slice(&[true, false]);
/// let out = kto_loss(&policy, &reference, &desirable, KtoReferencePoint::Given(0.2), &KtoConfig::default())?;
/// // ρ = [1.0, −0.5]: 1 − σ(0.1·0.8) and 1 − σ(0.1·0.7), averaged.
/// assert!((f64::try_from(&out.loss)? - (0.4800106598 + 0.4825071423) / 2.0).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn kto_loss(
    policy: &SeqLogps,
    reference: &Tensor,
    desirable: &Tensor,
    reference_point: KtoReferencePoint<'_>,
    cfg: &KtoConfig,
) -> Result<LossOutput> {
    const OP: &str = "kto_loss";
    cfg.validate()?;
    check_rank(OP, "policy.sum", &policy.sum, 1, "[B]")?;
    check_float(OP, "policy.sum", &policy.sum)?;
    let b = policy.sum.size()[0];
    let (kind, device) = (compute_kind(policy.sum.kind()), policy.sum.device());
    let r = constant_input(OP, "reference", reference, b, kind, device)?;
    check_shape(OP, "desirable", desirable, &[b], || format!("[B] = [{b}]"))?;
    check_device(OP, "desirable", desirable, device)?;
    let des = bool_mask(OP, "desirable", desirable)?;
    let und = des.f_logical_not()?;
    let z = match cfg.loss_type {
        KtoLossType::ApoZeroUnpaired => 0.0,
        KtoLossType::Kto => match reference_point {
            KtoReferencePoint::Given(z) => {
                if !(z.is_finite() && z >= 0.0) {
                    return Err(Error::InvalidInput {
                        op: OP,
                        name: "reference_point",
                        reason: format!("a given z must be finite and >= 0, got {z}"),
                    });
                }
                z
            }
            KtoReferencePoint::Estimate { policy_kl, reference_kl } => {
                check_shape(OP, "policy_kl", policy_kl, &[b], || format!("[B] = [{b}]"))?;
                if b < 2 {
                    return Err(Error::InvalidInput {
                        op: OP,
                        name: "policy_kl",
                        reason: format!(
                            "estimating z needs at least 2 examples (mismatched pairs), got {b}"
                        ),
                    });
                }
                kto_reference_point(kto_reference_point_stats(policy_kl, reference_kl)?)
            }
        },
    };
    let s = policy.sum.f_to_kind(kind)?;
    let rho = s.f_sub(&r)?;
    let beta = cfg.beta;
    let (l_des, l_und) = match cfg.loss_type {
        KtoLossType::Kto => (
            rho.f_sub_scalar(z)?.f_mul_scalar(beta)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?,
            rho.f_neg()?
                .f_add_scalar(z)?
                .f_mul_scalar(beta)?
                .f_sigmoid()?
                .f_neg()?
                .f_add_scalar(1.0)?,
        ),
        KtoLossType::ApoZeroUnpaired => {
            let sig = rho.f_mul_scalar(beta)?.f_sigmoid()?;
            (sig.f_neg()?.f_add_scalar(1.0)?, sig)
        }
    };
    let per_example = l_des
        .f_mul_scalar(cfg.desirable_weight)?
        .f_where_self(&des, &l_und.f_mul_scalar(cfg.undesirable_weight)?)?;
    let all = Tensor::f_ones([b], (Kind::Bool, device))?;

    let mut metrics = Metrics::new();
    let reward = rho.f_mul_scalar(beta)?;
    add_mean(&mut metrics, "rewards/chosen", &reward, &des)?;
    add_mean(&mut metrics, "rewards/rejected", &reward, &und)?;
    add_mean(&mut metrics, "logps/chosen", &s, &des)?;
    add_mean(&mut metrics, "logps/rejected", &s, &und)?;
    let (n_d, n_u) = (count_f64(&des)?, count_f64(&und)?);
    if n_d > 0.0 && n_u > 0.0 {
        let mc = metrics.mean("rewards/chosen").unwrap_or(0.0);
        let mr = metrics.mean("rewards/rejected").unwrap_or(0.0);
        metrics.add("rewards/margins", mc - mr, 1.0);
        let out = !cfg.weight_ratio_in_range(n_d as usize, n_u as usize);
        metrics.add("kto/weight_ratio_out_of_range", f64::from(u8::from(out)), 1.0);
    }
    if cfg.loss_type == KtoLossType::Kto {
        metrics.add("kl", z, 1.0);
    }
    let per_example = select(&per_example, &all)?;
    let parts = vec![part("examples", &per_example, &all, 1.0)?];
    finish(per_example, parts, metrics, cfg.reduction)
}
