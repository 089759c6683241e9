//! Token-level losses: Targeted Negative Training, its baselines, unlikelihood training, NLL and
//! KL to a reference model.
//!
//! Every loss here scores one position at a time from logits `[B, T, V]` that are already
//! aligned with their labels (`logits[b, t]` scores `labels[b, t]`; shifting is the caller's job)
//! and returns a [`LossOutput`](crate::LossOutput) whose `per_example` holds the token losses
//! `[B, T]` (exact zeros at inactive positions) and whose single part `"tokens"` holds
//! `(sum, count)` for exact normalisation across micro-batches and ranks.
//!
//! | loss | function | active positions | default reduction |
//! |---|---|---|---|
//! | TNFF, TNRR, TNRF, TNFLL, TNRLL | [`tnt_loss`] | `w ≠ 0` | `Sum` |
//! | negative likelihood (NL) | [`nl_loss`] | `w ≠ 0` | `Sum` |
//! | unlikelihood on annotated tokens | [`ul_annotated_loss`] | `w ≠ 0` | `Sum` |
//! | Welleck token-level unlikelihood | [`welleck_ul_loss`] | label ∉ {pad, ignore} ∧ mask | `Mean` |
//! | sequence-level unlikelihood | [`sequence_ul_loss`] | `valid` | `Mean` |
//! | (conditional) NLL | [`nll_loss`], [`conditional_nll_loss`] | label ≠ ignore ∧ mask | `Mean` |
//! | forward / reverse KL to a reference | [`reference_kl_loss`] | `loss_mask` | `Mean` |
//! | unlearning: CE-U (self-distillation, label masked) | [`ceu_loss`] | label ≠ ignore ∧ mask, minus the first answer token | `Mean` |
//! | unlearning: UNDIAL (reference, label logit − β) | [`undial_loss`] | label ≠ ignore ∧ mask | `Mean` |
//! | unlearning: WGA (ascent weighted by `p^β`) | [`wga_loss`] | label ≠ ignore ∧ mask | `Mean` |
//! | unlearning: SatImp (ascent weighted by `p^β₁ (1−p)^β₂`) | [`satimp_loss`] | label ≠ ignore ∧ mask | `Mean` |
//!
//! The fused-linear entry points [`fused_linear_nll_loss`] and [`fused_linear_tnt_loss`] start
//! from hidden states and the LM head instead of logits and never materialise `[N, V]`.
//!
//! # Numerics shared by every loss
//!
//! * Arithmetic runs in f32 (f64 when the logits are f64); bf16 and f16 logits are upcast, and
//!   the gradient flows back in the logits' dtype. Reference logits are upcast independently and
//!   are always constants.
//! * Inactive positions are dropped before any arithmetic: their token loss and gradient are
//!   exactly 0 whatever they hold (NaN, ±inf, out-of-range labels).
//! * A `−inf` logit removes that token from the row (`p = 0`, gradient 0, no target mass), so
//!   vocabulary masks work with every loss; smoothing counts only the finite tokens.
//! * `log(1 − p)` is evaluated exactly (`log1p(−p)` below `p = 1/2`, a masked log-sum-exp
//!   above), without clamps, so unlikelihood terms keep a bounded, exact gradient when `p → 1`.
//! * NaN or `+inf` logits at active positions are an error by default
//!   ([`NonFinitePolicy::Error`]); [`NonFinitePolicy::Propagate`] skips the check (no device
//!   sync) and lets them reach that token's loss. Both behave the same on every backend.
//!
//! # Backends
//!
//! Every config has a [`TokenBackend`]. The default, [`TokenBackend::Auto`], runs the fused row
//! kernels of `amend-kernels` for CPU f32 logits (one sweep per row computes the token loss and
//! its gradient, SIMD `exp`, no `[N, V]` temporaries; the gradient is injected into autograd per
//! row) and tch autograd over stable composite ops everywhere else (other devices, bf16, f16,
//! f64). Every token loss has a kernel: TNT and annotated UL use `amend_kernels::tnt`, NL and NLL
//! `selected_logp`, Welleck and sequence UL `unlikelihood`, the reference KL `token_kl`. The
//! fused-linear losses run the kernels in place over one reused `[C, V]` chunk buffer.
//!
//! The user guide with formulas, defaults and pitfalls is `docs/losses-token.md`; the normative
//! specification is `specs/token-losses.md`.

mod ceu;
mod common;
mod fused_linear;
pub(crate) mod kernel;
mod nl;
mod nll;
mod reference_kl;
mod rows;
mod satimp;
mod sequence_ul;
mod tnt;
mod ul_annotated;
mod undial;
mod weights;
mod welleck_ul;
mod wga;

pub use ceu::{CeuConfig, ceu_loss};
pub use common::{NonFinitePolicy, TokenBackend};
pub use fused_linear::{
    FusedLinearOptions, LinearHead, Reference, fused_linear_nll_loss, fused_linear_tnt_loss,
};
pub use nl::{NlConfig, nl_loss};
pub use nll::{NllConfig, conditional_nll_loss, count_active_nll, nll_loss};
pub use reference_kl::{
    KlDirection, KlValue, RefKlConfig, count_active_reference_kl, reference_kl_loss,
};
pub use satimp::{SatImpConfig, satimp_loss};
pub use sequence_ul::{
    GreedyContinuation, SeqUlMask, SequenceUlConfig, continuation_logits, count_active_sequence_ul,
    greedy_continuation, repeat_ngram_mask, sequence_ul_loss,
};
pub use tnt::{TntConfig, TntVariant, tnt_loss};
pub use ul_annotated::{UlAnnotatedConfig, ul_annotated_loss};
pub use undial::{UndialConfig, undial_loss};
pub use weights::{TokenWeights, count_active_weighted};
pub use welleck_ul::{Candidates, WelleckUlConfig, count_active_welleck, welleck_ul_loss};
pub use wga::{WgaConfig, wga_loss};
