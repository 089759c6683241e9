//! Sequence-level losses: the unit of comparison is a whole response.
//!
//! Everything here consumes one primitive, [`SeqLogps`] (summed and length-normalised
//! log-probabilities of the response tokens, from [`seq_logps`] or [`seq_logps_fused_linear`]),
//! and returns a [`LossOutput`](crate::LossOutput) whose metrics use TRL's names.
//!
//! | family | functions |
//! |---|---|
//! | primitive | [`seq_logps`], [`seq_logps_fused_linear`], [`SeqLogps::from_sums`] |
//! | contrastive perplexity | [`contrastive_perplexity_loss`] ([`CpForm::Paper`], [`CpForm::Reference`]), [`cp_phi`], [`cp_phi_reference`] |
//! | ranking | [`rrhf_loss`], [`neat_loss`] (reconstruction) over a [`CandidateSet`] |
//! | preference | [`dpo_loss`] (TRL 1.16's 15 loss types, mixtures, f-divergences; cDPO), [`dpo_loss_weighted`] + [`wpo_weights`] (WPO), [`ld_logps`] (LD-DPO), [`cpo_loss`] (CPO, AlphaPO), [`simpo_loss`], [`orpo_loss`], [`kto_loss`] |
//! | unlearning | [`gradient_ascent_loss`] (GA, GradDiff), [`npo_loss`], [`simnpo_loss`], [`rmu_loss`] (RMU, on hidden states); the token-level ones are in [`crate::token`] |
//!
//! The user guide with the formulas, the defaults and why, pitfalls and when to choose which
//! method is `docs/losses-sequence.md`.
//!
//! # Example: DPO from logits
//!
//! ```
//! use amend_losses::sequence::{dpo_loss, seq_logps, DpoConfig, SeqLogpsConfig};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(0);
//! // 2 pairs, concatenated TRL-style: rows 0..2 chosen, rows 2..4 rejected.
//! let logits = Tensor::randn([4, 6, 10], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let ref_logits = Tensor::randn([4, 6, 10], (Kind::Float, Device::Cpu));
//! let ids = Tensor::randint(10, [4, 6], (Kind::Int64, Device::Cpu));
//! let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1]).view([1, 6]).repeat([4, 1]);
//! let cfg = SeqLogpsConfig::default();
//! let (chosen, rejected) = seq_logps(&logits, &ids, &mask, &cfg)?.f_split_at(2)?;
//! let reference = tch::no_grad(|| seq_logps(&ref_logits, &ids, &mask, &cfg))?;
//! let (ref_c, ref_r) = reference.f_split_at(2)?;
//! let out = dpo_loss(&chosen, &rejected, &ref_c.sum, &ref_r.sum, &DpoConfig::default())?;
//! out.loss.backward();
//! println!("{:?}", out.metrics.to_means());
//! # Ok::<(), amend_losses::Error>(())
//! ```

mod candidates;
mod common;
mod contrastive_perplexity;
mod cpo;
mod dpo;
mod fused_linear;
mod gradient_ascent;
mod kto;
mod neat;
mod npo;
mod orpo;
mod rmu;
mod rrhf;
mod seq_logps;
mod simnpo;
mod simpo;

pub use candidates::{CandidateSet, Origin};
pub use contrastive_perplexity::{
    CP_REFERENCE_NONFINITE_NLL, CpConfig, CpForm, CpGroups, CpStatistic,
    contrastive_perplexity_loss, cp_default_alpha, cp_phi, cp_phi_from_logps, cp_phi_reference,
    cp_split_layout,
};
pub use cpo::{CpoConfig, CpoLossType, cpo_loss};
pub use dpo::{
    DpoConfig, DpoLossType, DpoLossTypes, FDivergence, dpo_loss, dpo_loss_weighted, ld_logps,
    wpo_weights,
};
pub use fused_linear::{FusedLinearConfig, FusedLinearSeqLogps, seq_logps_fused_linear};
pub use gradient_ascent::{GaNorm, GradientAscentConfig, gradient_ascent_loss};
pub use kto::{
    KtoConfig, KtoLossType, KtoReferencePoint, kto_loss, kto_reference_point,
    kto_reference_point_stats,
};
pub use neat::{NeatConfig, NegScoring, neat_loss};
pub use npo::{NpoConfig, npo_loss};
pub use orpo::{NllScope, ORPO_MAX_MEAN_LOGP, OrpoConfig, orpo_loss};
pub use rmu::{RmuConfig, rmu_control_vector, rmu_loss};
pub use rrhf::{RrhfConfig, SftNorm, rrhf_loss};
pub use seq_logps::{EmptyPolicy, SeqLogps, SeqLogpsConfig, TokenStats, seq_logps};
pub use simnpo::{SimNpoConfig, simnpo_loss};
pub use simpo::{SimPoConfig, gamma_from_ratio, simpo_loss};
