//! RRHF: rank responses to align language models with human feedback, plus an SFT term on the
//! best response.
//!
//! Paper: Yuan et al., [arXiv 2304.05302](https://arxiv.org/abs/2304.05302) (§3.1, Eqs. 1–5).
//! Reference code: `GanjinZero/RRHF train.py`. Unlike the reference (correct only with one
//! query per device batch), pairs are formed explicitly inside each query group.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::candidates::CandidateSet;
use super::common::{
    add_mean, cfg, compute_kind, count_f64, finish, first_true, part, select, with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// Normalisation of the SFT term on the best candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SftNorm {
    /// `−S/n`, token mean over the response (default).
    #[default]
    TokenMean,
    /// `−S`, the paper's Eq. 4 literally.
    Sum,
    /// `−S/T_pad`: the reference code averages the best candidate's log-probs over the whole
    /// padded row (prompt and padding count as zeros).
    PaddedRowMean {
        /// The padded row length `T_pad` > 0 of the reference's batch.
        t_pad: i64,
    },
}

/// Configuration of [`rrhf_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RrhfConfig {
    /// λ ≥ 0 in `p = S / n^λ` (RRHF's `length_penalty`). Default 1.0 (paper Eq. 1); 0 gives
    /// summed log-probs, which favour short responses.
    pub length_penalty: f64,
    /// Weight of the ranking term (RRHF's `rrhf_weight`). Default 1.0: every released launch
    /// script passes 1 (the dataclass default of 100 is not what was run; 10 and 100 are
    /// reported worse).
    #[serde(alias = "rrhf_weight")]
    pub rank_weight: f64,
    /// Weight of the SFT term. Default 1.0.
    pub sft_weight: f64,
    /// Normalisation of the SFT term. Default [`SftNorm::TokenMean`].
    pub sft_norm: SftNorm,
    /// Candidates with no scored token. Default [`EmptyPolicy::Error`]; `Mask` drops the
    /// candidate (and a group left without candidates).
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`] (over groups).
    pub reduction: Reduction,
}

impl Default for RrhfConfig {
    fn default() -> Self {
        Self {
            length_penalty: 1.0,
            rank_weight: 1.0,
            sft_weight: 1.0,
            sft_norm: SftNorm::TokenMean,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(RrhfConfig {
    with_length_penalty => length_penalty: f64,
    with_rank_weight => rank_weight: f64,
    with_sft_weight => sft_weight: f64,
    with_sft_norm => sft_norm: SftNorm,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

pub(crate) fn validate_ranking(
    op: &'static str,
    length_penalty: f64,
    rank_weight: f64,
    sft_weight: f64,
    sft_norm: SftNorm,
) -> Result<()> {
    cfg::nonnegative(op, "length_penalty", length_penalty)?;
    cfg::nonnegative(op, "rank_weight", rank_weight)?;
    cfg::nonnegative(op, "sft_weight", sft_weight)?;
    if let SftNorm::PaddedRowMean { t_pad } = sft_norm
        && t_pad <= 0
    {
        return Err(Error::InvalidConfig {
            op,
            name: "sft_norm",
            reason: format!("padded_row_mean needs t_pad > 0, got {t_pad}"),
        });
    }
    Ok(())
}

impl RrhfConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_ranking(
            "rrhf_loss",
            self.length_penalty,
            self.rank_weight,
            self.sft_weight,
            self.sft_norm,
        )
    }

    pub(crate) fn ranking(&self) -> Ranking {
        Ranking {
            length_penalty: self.length_penalty,
            rank_weight: self.rank_weight,
            sft_weight: self.sft_weight,
            sft_norm: self.sft_norm,
            reduction: self.reduction,
        }
    }
}

/// The parameters of the shared RRHF/NEAT core.
pub(crate) struct Ranking {
    pub length_penalty: f64,
    pub rank_weight: f64,
    pub sft_weight: f64,
    pub sft_norm: SftNorm,
    pub reduction: Reduction,
}

/// Validated candidate slots: user mask, `valid` (mask and, under the policy, non-empty), and
/// whether each group still has a candidate.
pub(crate) struct Slots {
    pub valid: Tensor,
    pub group_valid: Tensor,
}

pub(crate) fn slots(op: &'static str, c: &CandidateSet, policy: EmptyPolicy) -> Result<Slots> {
    let (g, k) = (c.groups(), c.candidates());
    let device = c.sum.device();
    let user = match &c.mask {
        Some(m) => m.shallow_clone(),
        None => Tensor::f_ones([g, k], (Kind::Bool, device))?,
    };
    if g > 0 {
        let empty_group = if k == 0 {
            Tensor::f_ones([g], (Kind::Bool, device))?
        } else {
            user.f_any_dim(1, false)?.f_logical_not()?
        };
        if let Some((index, _)) = first_true(&empty_group)? {
            return Err(Error::EmptyCandidateSet { op, group: index[0] });
        }
    }
    let ne = c.len.f_gt(0)?;
    let empty = ne.f_logical_not()?.f_logical_and(&user)?;
    if policy == EmptyPolicy::Error
        && let Some((index, _)) = first_true(&empty)?
    {
        return Err(Error::EmptySequence { op, index: index[0] * k + index[1] });
    }
    let valid = ne.f_logical_and(&user)?;
    let group_valid = if k == 0 {
        Tensor::f_zeros([g], (Kind::Bool, device))?
    } else {
        valid.f_any_dim(1, false)?
    };
    Ok(Slots { valid, group_valid })
}

/// [`Error::NonFiniteReward`] at the first used reward that is not finite.
pub(crate) fn check_rewards(op: &'static str, rewards: &Tensor, used: &Tensor) -> Result<()> {
    let bad = rewards.f_isfinite()?.f_logical_not()?.f_logical_and(used)?;
    match first_true(&bad)? {
        Some((index, count)) => Err(Error::NonFiniteReward { op, index, count }),
        None => Ok(()),
    }
}

/// First index along dim 1 where `hit` is true (`K` where none), `[G]`.
fn first_index(hit: &Tensor, k: i64) -> Result<Tensor> {
    let idx = Tensor::f_arange(k, (Kind::Int64, hit.device()))?.f_expand(hit.size(), false)?;
    Ok(idx.f_where_scalarother(hit, k)?.f_amin([1i64].as_slice(), false)?)
}

/// The ranking loss of RRHF and NEAT over effective rewards `r [G, K]` (f64, meaningful where
/// `valid`), with the SFT target chosen among `eligible`; `neg` marks NegPrompt candidates for
/// the NEAT metrics.
pub(crate) fn ranking_loss(
    c: &CandidateSet,
    r: &Tensor,
    sl: &Slots,
    eligible: &Tensor,
    neg: Option<&Tensor>,
    prm: &Ranking,
) -> Result<LossOutput> {
    let k = c.candidates();
    let kind = compute_kind(c.sum.kind());
    let valid = &sl.valid;
    let s = select(&c.sum.f_to_kind(kind)?, valid)?;
    let n = c.len.f_clamp_min(1)?.f_to_kind(kind)?;
    let p = if prm.length_penalty == 0.0 {
        s.shallow_clone()
    } else {
        select(&s.f_div(&n.f_pow_tensor_scalar(prm.length_penalty)?)?, valid)?
    };
    let r = r.f_where_scalarother(valid, 0.0)?;

    // Comparable pairs (i, j): both present, r_i < r_j (strict: ties form no pair).
    let pair_ok = valid.f_unsqueeze(2)?.f_logical_and(&valid.f_unsqueeze(1)?)?;
    let cmp = r.f_unsqueeze(2)?.f_lt_tensor(&r.f_unsqueeze(1)?)?.f_logical_and(&pair_ok)?;
    let diff = p.f_unsqueeze(2)?.f_sub(&p.f_unsqueeze(1)?)?; // p_i − p_j
    let hinge = select(&diff.f_relu()?, &cmp)?;
    let l_rank = hinge.f_sum_dim_intlist([1i64, 2].as_slice(), false, kind)?; // [G]

    // SFT target: first maximum of r among eligible candidates.
    let r_elig = r.f_where_scalarother(eligible, f64::NEG_INFINITY)?;
    let r_max = r_elig.f_amax([1i64].as_slice(), true)?;
    let best_hit = r.f_eq_tensor(&r_max)?.f_logical_and(eligible)?;
    let best = first_index(&best_hit, k)?;
    let has_target = best.f_lt(k)?;
    let best_safe = best.f_where_scalarother(&has_target, 0)?.f_unsqueeze(1)?;
    let s_best = s.f_gather(1, &best_safe, false)?.f_squeeze_dim(1)?;
    let l_sft = match prm.sft_norm {
        SftNorm::TokenMean => {
            let n_best = n.f_gather(1, &best_safe, false)?.f_squeeze_dim(1)?;
            s_best.f_div(&n_best)?.f_neg()?
        }
        SftNorm::Sum => s_best.f_neg()?,
        SftNorm::PaddedRowMean { t_pad } => s_best.f_div_scalar(-(t_pad as f64))?,
    };
    let l_sft = select(&l_sft, &has_target)?;
    let per_group =
        l_rank.f_mul_scalar(prm.rank_weight)?.f_add(&l_sft.f_mul_scalar(prm.sft_weight)?)?;
    let per_group = select(&per_group, &sl.group_valid)?;

    // Metrics.
    let _guard = tch::no_grad_guard();
    let mut metrics = Metrics::new();
    let r_low = r.f_where_scalarother(valid, f64::INFINITY)?;
    let r_min = r_low.f_amin([1i64].as_slice(), true)?;
    let worst = first_index(&r.f_eq_tensor(&r_min)?.f_logical_and(valid)?, k)?;
    let worst_safe = worst.f_where_scalarother(&sl.group_valid, 0)?.f_unsqueeze(1)?;
    let p_best = p.f_gather(1, &best_safe, false)?.f_squeeze_dim(1)?;
    let p_worst = p.f_gather(1, &worst_safe, false)?.f_squeeze_dim(1)?;
    let s_worst = s.f_gather(1, &worst_safe, false)?.f_squeeze_dim(1)?;
    add_mean(&mut metrics, "rewards/chosen", &p_best, &has_target)?;
    add_mean(&mut metrics, "rewards/rejected", &p_worst, &sl.group_valid)?;
    add_mean(&mut metrics, "rewards/margins", &p_best.f_sub(&p_worst)?, &has_target)?;
    add_mean(&mut metrics, "logps/chosen", &s_best, &has_target)?;
    add_mean(&mut metrics, "logps/rejected", &s_worst, &sl.group_valid)?;
    let correct = p.f_unsqueeze(2)?.f_lt_tensor(&p.f_unsqueeze(1)?)?.f_logical_and(&cmp)?;
    metrics.add("rewards/accuracies", count_f64(&correct)?, count_f64(&cmp)?);
    let n_groups = count_f64(&sl.group_valid)?;
    add_mean(&mut metrics, "rrhf/rank_loss", &l_rank, &sl.group_valid)?;
    add_mean(&mut metrics, "rrhf/sft_loss", &l_sft, &has_target)?;
    metrics.add("rrhf/num_pairs", count_f64(&cmp)?, n_groups);
    if let Some(neg) = neg {
        add_mean(&mut metrics, "neat/neg_logps", &p, neg)?;
        let involves = neg.f_unsqueeze(2)?.f_logical_or(&neg.f_unsqueeze(1)?)?;
        let neg_pairs = cmp.f_logical_and(&involves)?;
        metrics.add(
            "neat/neg_pair_accuracy",
            count_f64(&correct.f_logical_and(&involves)?)?,
            count_f64(&neg_pairs)?,
        );
        let without = sl.group_valid.f_logical_and(&has_target.f_logical_not()?)?;
        metrics.add("neat/groups_without_sft_target", count_f64(&without)?, n_groups);
    }
    drop(_guard);
    let parts = vec![part("groups", &per_group, &sl.group_valid, 1.0)?];
    finish(per_group, parts, metrics, prm.reduction)
}

/// RRHF: pairwise ranking hinge on length-normalised scores plus SFT on the best candidate.
///
/// ```text
/// p_i    = S_i / n_i^λ                                   λ = length_penalty
/// L_rank = Σ_{(i,j): r_i < r_j} max(0, p_i − p_j)        strict <: ties form no pair; a SUM
/// i*     = first argmax_i r_i                            (lowest index among tied maxima)
/// L_sft  = −S_{i*}/n_{i*} (TokenMean) | −S_{i*} (Sum) | −S_{i*}/T_pad (PaddedRowMean)
/// L_g    = rank_weight · L_rank + sft_weight · L_sft
/// loss   = mean over groups (part "groups", count G); never summed over groups
/// ∂L_rank/∂p_k = #{j: r_k < r_j, p_k > p_j} − #{i: r_i < r_k, p_i > p_k}
/// metrics: rewards/chosen, rewards/rejected = p of the best / worst (first argmin r),
///          rewards/margins, rewards/accuracies (comparable pairs with p_i < p_j),
///          logps/chosen, logps/rejected = S of the best / worst, rrhf/rank_loss,
///          rrhf/sft_loss, rrhf/num_pairs (comparable pairs per group)
/// ```
///
/// K = 1 degenerates to SFT; all rewards tied give `L_rank = 0` and SFT on candidate 0; equal
/// scores contribute 0 value and 0 subgradient. Rewards of absent slots are never read.
///
/// # Shapes
///
/// See [`CandidateSet`]; `per_example`: `[G]`.
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::NonFiniteReward`], [`Error::EmptyCandidateSet`] (a group
/// whose mask is all false), [`Error::EmptySequence`] (a candidate with `n = 0`, under
/// [`EmptyPolicy::Error`]; its index is `g·K + k`).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{rrhf_loss, CandidateSet, RrhfConfig};
/// use tch::Tensor;
///
/// let sum = Tensor::from_slice(&[-3.5f64, -0.6, -0.8, -2.0]).view([1, 4]);
/// let len = Tensor::from_slice(&[3i64, 2, 4, 2]).view([1, 4]);
/// let rewards = Tensor::from_slice(&[0.5f64, 2.0, 1.0, 2.0]).view([1, 4]);
/// let out = rrhf_loss(&CandidateSet::new(&sum, &len, &rewards)?, &RrhfConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 1.2).abs() < 1e-9); // L_rank 0.9 + L_sft 0.3
/// assert_eq!(out.metrics.mean("rewards/accuracies"), Some(0.6));
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn rrhf_loss(candidates: &CandidateSet, cfg: &RrhfConfig) -> Result<LossOutput> {
    const OP: &str = "rrhf_loss";
    cfg.validate()?;
    let sl = slots(OP, candidates, cfg.empty_policy)?;
    check_rewards(OP, &candidates.rewards, &sl.valid)?;
    let r = candidates.rewards.f_to_kind(Kind::Double)?;
    ranking_loss(candidates, &r, &sl, &sl.valid, None, &cfg.ranking())
}
