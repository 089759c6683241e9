//! ProFS / DeTox: tuning-free editing by projecting an unwanted subspace out of the MLP value
//! weights (Uppaal et al., "DeTox" / "ProFS", ICLR 2025, <https://arxiv.org/abs/2405.13967>;
//! reference code `Uppaal/detox-edit`).
//!
//! ```text
//! x⁺_ℓ, x⁻_ℓ  = pooled hidden states after block ℓ of N preference pairs      [N, D]
//! T⁰_ℓ        = (X⁺_ℓ − X⁻_ℓ) / 2
//! T_ℓ         = T⁰_ℓ (I − v vᵀ)         v: top right singular vector of X⁺_ℓ (centering)
//! T_ℓ         = U Σ Vᵀ,   P_ℓ = V_k V_kᵀ  (the "unwanted" subspace, never materialised)
//! W_out,ℓ    ← (I − P_ℓ) applied on the output side of the MLP value weight
//! ```
//!
//! After the edit `MLP_ℓ(x) = (I − P_ℓ) W_out φ(W_in x) + b_out`: the MLP of an edited layer can
//! no longer write into `span(V_k)` (except through its bias).
//!
//! | step | function |
//! |---|---|
//! | pooled embeddings per layer | [`pooled_embeddings`], [`pool_hidden`] |
//! | basis of one layer (pure math) | [`profs_basis`], [`profs_bases`] |
//! | low-rank weight edit | [`apply_projection`], [`projected`] |
//! | targets per family, defaults | [`resolve_targets`], [`profs_defaults`] |
//! | the whole edit on a model | [`profs_edit`] (in memory), [`profs_edit_dir`] (directory to directory) |
//!
//! # Defaults
//!
//! `k` and the layer range default to the reference values **only** for the reference shapes
//! (gpt2-medium: layers 10..24, k = 2; GPT-J 6B: 10..27, k = 10; Mistral 7B: 15..32, k = 10;
//! OPT 6.7B: 10..32, k = 10). Any other model needs explicit `layers` and `k`
//! ([`Error::NoDefaultForModel`](crate::Error::NoDefaultForModel)).
//!
//! # Deliberate differences from `Uppaal/detox-edit`
//!
//! | id | reference | amend | parity option |
//! |---|---|---|---|
//! | D1 | pairs broken by independent sub-sampling (HEAD) | paired | [`Pairing::IndependentCompat`] |
//! | D2 | tail of N dropped (⌊N/50⌋ batches) | all N processed | — |
//! | D3 | mean pooling over pads, each side padded separately | mask-aware mean | [`Pooling::MeanAllPositions`] |
//! | D4 | OPT edit silently does nothing | explicit target table, error on no match | — |
//! | D5 | range beyond L silently truncated | error | — |
//! | D6 | last-block embedding post-`ln_f` for GPT-J only | one definition for all families | — |
//! | D7 | projector cast to fp16 before the matmul | f32 compute, one final cast | — |
//! | D8 | same SVD repeated per weight and for unedited layers | once per edited layer | — |
//! | D9 | k > min(N, D) → IndexError; k = D silently zeroes W | typed error; warning at k = D | — |
//!
//! The same list, with the parity options in use, is written to every manifest.

mod basis;
mod config;
mod edit;
mod embed;
mod project;
mod targets;

pub use basis::{DirectionSummary, LayerBasis, LayerSummary, check_rank, profs_bases, profs_basis};
pub use config::{BasisOptions, Centering, Pairing, Pooling, ProfsConfig, RankPolicy, SvdDtype};
pub use edit::{
    LENS_TOKENS, PairIndices, PreferencePair, ProfsReport, apply_bases,
    profs_deliberate_differences, profs_edit, profs_edit_dir, profs_manifest, sample_pair_indices,
};
pub use embed::{pool_hidden, pooled_embeddings};
pub use project::{Side, TensorChange, WeightLayout, apply_projection, projected};
pub use targets::{
    FamilyTargets, ReferenceDefault, ResolvedTarget, TARGET_TABLE, TargetDims, TargetRole,
    check_layer_range, family_targets, profs_defaults, reference_defaults, resolve_targets,
};
