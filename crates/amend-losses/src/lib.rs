//! Losses for minimal targeted updates of language models, on tch (libtorch).
//!
//! `amend-losses` holds the training objectives that remove unwanted behaviour from a model while
//! changing everything else as little as possible: Targeted Negative Training (TNFF, TNRR, TNRF,
//! TNFLL, TNRLL) and its baselines, unlikelihood training, contrastive perplexity, ranking with
//! negative prompts (NEAT, on RRHF), and the preference and unlearning baselines people compare
//! against (DPO family, SimPO, ORPO, KTO, NPO, SimNPO, conditional NLL).
//!
//! # Conventions
//!
//! * Every loss is a free function over `&Tensor` plus a `*Config` struct (serde, `Default`,
//!   TRL-compatible field names) and returns [`Result`]`<`[`LossOutput`]`>`.
//! * Errors are the one enum [`Error`]; tch errors are wrapped as sources
//!   ([`Error::Tch`]), never stringified. Library code calls tch's fallible `f_*` methods only and
//!   does not panic on user input.
//! * [`Reduction`] decides the shape of [`LossOutput::loss`]; independently of it, every output
//!   carries `(sum, count)` parts for exact normalisation over gradient accumulation and
//!   data-parallel ranks (see [`LossOutput`]).
#![doc(test(attr(deny(warnings))))]

mod attach;
pub mod bridge;
mod error;
mod output;
pub mod sequence;
pub mod token;

pub use amend_kernels::{Reduction, SumCount};
pub use error::{Error, Result};
pub use output::{LossOutput, LossPart, Metrics};
pub use sequence::{
    CP_REFERENCE_NONFINITE_NLL, CandidateSet, CpConfig, CpForm, CpGroups, CpStatistic, CpoConfig,
    CpoLossType, DpoConfig, DpoLossType, DpoLossTypes, EmptyPolicy, FDivergence, FusedLinearConfig,
    FusedLinearSeqLogps, GaNorm, GradientAscentConfig, KtoConfig, KtoLossType, KtoReferencePoint,
    NeatConfig, NegScoring, NllScope, NpoConfig, ORPO_MAX_MEAN_LOGP, Origin, OrpoConfig, RmuConfig,
    RrhfConfig, SeqLogps, SeqLogpsConfig, SftNorm, SimNpoConfig, SimPoConfig, TokenStats,
    contrastive_perplexity_loss, cp_default_alpha, cp_phi, cp_phi_from_logps, cp_phi_reference,
    cp_split_layout, cpo_loss, dpo_loss, dpo_loss_weighted, gamma_from_ratio, gradient_ascent_loss,
    kto_loss, kto_reference_point, kto_reference_point_stats, ld_logps, neat_loss, npo_loss,
    orpo_loss, rmu_control_vector, rmu_loss, rrhf_loss, seq_logps, seq_logps_fused_linear,
    simnpo_loss, simpo_loss, wpo_weights,
};
pub use token::{
    Candidates, CeuConfig, KlDirection, KlValue, NlConfig, NllConfig, NonFinitePolicy, RefKlConfig,
    SatImpConfig, SeqUlMask, SequenceUlConfig, TntConfig, TntVariant, TokenBackend, TokenWeights,
    UlAnnotatedConfig, UndialConfig, WelleckUlConfig, WgaConfig, ceu_loss, conditional_nll_loss,
    nl_loss, nll_loss, reference_kl_loss, satimp_loss, sequence_ul_loss, tnt_loss,
    ul_annotated_loss, undial_loss, welleck_ul_loss, wga_loss,
};
