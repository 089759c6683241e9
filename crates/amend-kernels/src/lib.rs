//! Fused token-level loss and gradient kernels in pure Rust, with no libtorch dependency.
//!
//! `amend-kernels` is the numeric core of `amend`'s token-level losses. Every kernel works on plain
//! `f32` slices in row-major `[rows, vocab]` layout, computes the per-row loss **and** the gradient
//! with respect to the logits in one call ("gradient in forward"), and never allocates
//! `[rows, vocab]` temporaries: the extra memory is `O(threads · vocab)`. Because it does not link
//! libtorch it builds and tests anywhere, and other Rust frameworks can use it.
//!
//! # Kernels
//!
//! | kernel | computes | used by |
//! |---|---|---|
//! | [`selected_logp`] | `−log p_y` with label smoothing, z-loss, softcap, temperature; `LSE`, `log p_y` | NLL/CE, sequence log-probs (DPO family, SimPO, ORPO, KTO, NPO), NL |
//! | [`token_kl`] | forward or reverse KL to a target built in the kernel ([`KlTarget`]): reference softmax (distillation), TNT mask-and-renormalise, one-hot, label-smoothed, precomputed log-probs | distillation, TNT, reference KL, UNDIAL-style targets |
//! | [`unlikelihood`] | `−α Σ_c log(1 − p_c)` on sparse candidates ([`Candidates`]), exact `log(1 − p)`, plus optional NLL | annotated UL, Welleck token UL, sequence UL |
//! | [`tnt`] | a whole TNT variant (TNFF, TNRR, TNRF, TNFLL, TNRLL) or NL / annotated UL, per-row term by weight sign; [`tnt_with_stats`] adds the per-row diagnostics ([`TntRowStats`]) from the same sweep | `amend-losses`' token-level losses |
//!
//! All four take a [`LogitsIo`] (value only, gradient into a buffer, or gradient in place over
//! the logits), per-row outputs, an explicit thread count (rows are split over
//! `std::thread::scope` threads; there is no global pool, so nothing oversubscribes libtorch's
//! OpenMP pool), and return [`BatchStats`] (the f64 sum over rows and the active count).
//!
//! Each kernel has an f64 oracle in [`reference`](mod@reference) (simple, slow, obviously right) and a
//! straightforward sibling in [`naive`] (multi-pass, scalar `f32::exp`) that benchmarks compare
//! against. The vectorised `exp` and its accuracy bound are documented in [`simd`].
//!
//! # Numerics
//!
//! * f32 inside a row (8-lane AVX2 or 16-lane AVX-512 vector accumulators, summed in blocks of
//!   1024; f64 on the portable path), f64 across rows; results for 1 and N threads are bitwise
//!   identical.
//! * Stable log-sum-exp; the masked LSE `LSE_{v≠y}` is computed by skipping `y`, never by
//!   subtraction; `log(1 − p)` is exact (`log1p(−p)` or a masked LSE).
//! * Masking by selection: a term with zero target mass (forward) or zero probability
//!   (reverse) is skipped, never multiplied, so `−inf` logits are supported (they leave the row
//!   vocabulary) and NaN at inactive rows is never read.
//! * Inputs are validated before any output is written (lengths, labels, configuration). Rows
//!   with NaN, `+inf` or no finite logit are rejected with [`KernelError::NonFiniteRow`] while
//!   sweeping; the outputs are then reset to 0 (in-place calls validate every row first, so the
//!   logits survive a rejected call). No function panics on user input.
//!
//! # Conventions shared by the workspace
//!
//! * **Errors.** Each crate of the workspace has exactly one error enum built with `thiserror`
//!   ([`KernelError`] here). Variants are structured and name the operation (`op`) and the offending
//!   sizes or indices, so a caller can match on them; foreign errors are wrapped as sources with
//!   `#[from]`, never turned into strings. No public function panics on user input.
//! * **Reductions.** [`Reduction`] says how per-unit losses are combined. Every loss also reports the
//!   pair `(sum, count)` (see [`Reduction`]) so that a trainer can normalise exactly across
//!   gradient-accumulation steps and data-parallel ranks.
//! * **Numerics.** Inputs are `f32`, accumulation is `f32` inside a row and `f64` across rows;
//!   masking is done by selection (a masked row is never read), never by multiplying with zero.
#![doc(test(attr(deny(warnings))))]

mod batch;
mod error;
pub mod naive;
mod reduction;
pub mod reference;
mod row;
mod selected_logp;
pub mod simd;
mod tnt;
mod token_kl;
mod unlikelihood;

pub use batch::{BatchStats, LogitsIo};
pub use error::{KernelError, Result};
pub use reduction::{Reduction, SumCount};
pub use selected_logp::{SelectedLogpConfig, SelectedLogpOut, selected_logp};
pub use tnt::{TntKernelConfig, TntRowStats, TntVariant, tnt, tnt_with_stats};
pub use token_kl::{KlDirection, KlTarget, KlValue, TokenKlConfig, token_kl};
pub use unlikelihood::{Candidates, UnlikelihoodConfig, unlikelihood};
