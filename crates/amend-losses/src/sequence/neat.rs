//! NEAT: negative-prompt-driven alignment, **reconstructed** as RRHF over an expanded candidate
//! set.
//!
//! Paper: Qiao et al., "Negative-Prompt-driven Alignment for Generative Language Model",
//! [arXiv 2410.12194](https://arxiv.org/abs/2410.12194) (ICLR 2025 submission, withdrawn;
//! reviews at OpenReview `cywG53B2ZQ`). No public code exists and the paper's equations are not
//! known to this project. What the public record states: negative prompts generate undesirable
//! responses alongside positive examples, a ranking loss over an expanded preference set
//! (positive and negative examples) is combined with a language-modelling loss, training is
//! online in two stages (sample, then train), and a constant scores some dialogues.
//!
//! **Reconstruction (not from the paper):** the ranking loss is RRHF's pairwise hinge; the
//! candidate composition (dataset, policy and negative-prompt samples); both scoring modes of
//! negative-prompt samples and the `ForcedLowest` default; scoring negative-prompt samples
//! *without* the negative prompt in the context (sampling uses it, scoring does not, so the
//! penalty transfers to the un-prompted policy); weights 1, λ = 1 and the token-mean SFT
//! inherited from RRHF; choosing the SFT target among non-negative-prompt candidates only.
//! NEAT-PP is not implemented.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::candidates::{CandidateSet, Origin};
use super::common::{cfg, with_setters};
use super::rrhf::{Ranking, SftNorm, check_rewards, ranking_loss, slots, validate_ranking};
use super::seq_logps::EmptyPolicy;
use crate::{LossOutput, Reduction, Result};

/// How NegPrompt candidates are rewarded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NegScoring {
    /// Their rewards come from the same reward function as the others (they may outrank dataset
    /// responses; ties follow the RRHF rules).
    RewardModel,
    /// All NegPrompt candidates of a group get `min(other rewards) − delta`, below every other
    /// candidate and tied among themselves (default, `delta = 1`). Their given rewards are
    /// ignored; `delta` > 0 only changes logged rewards, never the loss.
    ForcedLowest {
        /// Gap below the lowest other reward, > 0.
        delta: f64,
    },
}

impl Default for NegScoring {
    fn default() -> Self {
        NegScoring::ForcedLowest { delta: 1.0 }
    }
}

/// Configuration of [`neat_loss`] (the RRHF knobs plus the NegPrompt handling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NeatConfig {
    /// λ ≥ 0 in `p = S / n^λ`. Default 1.0.
    pub length_penalty: f64,
    /// Weight of the ranking term. Default 1.0.
    #[serde(alias = "rrhf_weight")]
    pub rank_weight: f64,
    /// Weight of the language-modelling (SFT) term on the best candidate. Default 1.0.
    #[serde(alias = "nll_weight")]
    pub sft_weight: f64,
    /// Normalisation of the SFT term. Default [`SftNorm::TokenMean`].
    pub sft_norm: SftNorm,
    /// Rewards of NegPrompt candidates. Default `ForcedLowest { delta: 1.0 }`.
    pub neg_scoring: NegScoring,
    /// Whether a NegPrompt candidate may be the SFT target. Default `false`.
    pub sft_allow_negative_prompt: bool,
    /// Candidates with no scored token. Default [`EmptyPolicy::Error`].
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`] (over groups).
    pub reduction: Reduction,
}

impl Default for NeatConfig {
    fn default() -> Self {
        Self {
            length_penalty: 1.0,
            rank_weight: 1.0,
            sft_weight: 1.0,
            sft_norm: SftNorm::TokenMean,
            neg_scoring: NegScoring::default(),
            sft_allow_negative_prompt: false,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(NeatConfig {
    with_length_penalty => length_penalty: f64,
    with_rank_weight => rank_weight: f64,
    with_sft_weight => sft_weight: f64,
    with_sft_norm => sft_norm: SftNorm,
    with_neg_scoring => neg_scoring: NegScoring,
    with_sft_allow_negative_prompt => sft_allow_negative_prompt: bool,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl NeatConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "neat_loss";
        validate_ranking(
            OP,
            self.length_penalty,
            self.rank_weight,
            self.sft_weight,
            self.sft_norm,
        )?;
        if let NegScoring::ForcedLowest { delta } = self.neg_scoring {
            cfg::positive(OP, "neg_scoring.delta", delta)?;
        }
        Ok(())
    }
}

/// NEAT (reconstruction): RRHF over dataset, policy and negative-prompt candidates.
///
/// ```text
/// C(x) = D(x) ∪ S⁺(x) ∪ S⁻(x)        origins Dataset, Policy, NegPrompt
/// r    = reward(x, y)                 Dataset, Policy (and NegPrompt under RewardModel)
/// r⁻   = min_{non-NegPrompt} r − δ     NegPrompt under ForcedLowest (all tied: no pairs among them)
/// p    = S(y|x) / n^λ                 scored WITHOUT the negative prompt
/// L    = rank_weight · Σ_{r_i < r_j} max(0, p_i − p_j) + sft_weight · L_sft(best non-NegPrompt)
/// loss = mean over groups (part "groups", count G)
/// metrics: as RRHF, plus neat/neg_logps (mean p of NegPrompt), neat/neg_pair_accuracy
///          (comparable pairs involving a NegPrompt candidate ordered correctly),
///          neat/groups_without_sft_target
/// ```
///
/// Without NegPrompt candidates (or without `origin`) this is exactly [`rrhf_loss`](super::rrhf_loss).
/// A group with only NegPrompt candidates has no pairs (ForcedLowest) and no SFT target: its
/// loss is 0, it still counts in G, and `neat/groups_without_sft_target` records it. Sampling is
/// outside the loss: each round, sample S⁺ and S⁻ with the current policy, score them, compute
/// `S` under `π(·|x)`, take one or more steps, repeat.
///
/// # Shapes
///
/// See [`CandidateSet`] (`origin` optional); `per_example`: `[G]`.
///
/// # Errors
///
/// As [`rrhf_loss`](super::rrhf_loss). Under `ForcedLowest` the given rewards of NegPrompt
/// candidates are not read (they may be anything, even NaN).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{neat_loss, CandidateSet, NeatConfig, Origin};
/// use tch::Tensor;
///
/// let sum = Tensor::from_slice(&[-3.5f64, -0.6, -0.8, -2.0, -0.5, -2.1]).view([1, 6]);
/// let len = Tensor::from_slice(&[3i64, 2, 4, 2, 2, 3]).view([1, 6]);
/// let rewards = Tensor::from_slice(&[0.5f64, 2.0, 1.0, 2.0, 0.0, 0.0]).view([1, 6]);
/// use Origin::{Dataset as D, NegPrompt as N, Policy as P};
/// let cands = CandidateSet::new(&sum, &len, &rewards)?.with_origins(&[D, D, P, P, N, N])?;
/// let out = neat_loss(&cands, &NeatConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 3.6833333333).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn neat_loss(candidates: &CandidateSet, cfg: &NeatConfig) -> Result<LossOutput> {
    const OP: &str = "neat_loss";
    cfg.validate()?;
    let sl = slots(OP, candidates, cfg.empty_policy)?;
    let valid = &sl.valid;
    let neg = match &candidates.origin {
        Some(o) => o.f_eq(i64::from(Origin::NegPrompt.code()))?.f_logical_and(valid)?,
        None => valid.f_zeros_like()?,
    };
    let others = valid.f_logical_and(&neg.f_logical_not()?)?;
    let r_in = candidates.rewards.f_to_kind(Kind::Double)?;
    let r = match cfg.neg_scoring {
        NegScoring::RewardModel => {
            check_rewards(OP, &candidates.rewards, valid)?;
            r_in
        }
        NegScoring::ForcedLowest { delta } => {
            check_rewards(OP, &candidates.rewards, &others)?;
            let low = if candidates.candidates() == 0 {
                Tensor::f_zeros([candidates.groups(), 1], (Kind::Double, valid.device()))?
            } else {
                let m = r_in
                    .f_where_scalarother(&others, f64::INFINITY)?
                    .f_amin([1i64].as_slice(), true)?;
                m.f_where_scalarother(&m.f_isfinite()?, 0.0)?
            };
            let r_neg = low.f_sub_scalar(delta)?.f_expand(r_in.size(), false)?;
            r_neg.f_where_self(&neg, &r_in.f_where_scalarother(&others, 0.0)?)?
        }
    };
    let eligible = if cfg.sft_allow_negative_prompt { valid.shallow_clone() } else { others };
    let prm = Ranking {
        length_penalty: cfg.length_penalty,
        rank_weight: cfg.rank_weight,
        sft_weight: cfg.sft_weight,
        sft_norm: cfg.sft_norm,
        reduction: cfg.reduction,
    };
    ranking_loss(candidates, &r, &sl, &eligible, Some(&neg), &prm)
}
