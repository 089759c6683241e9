//! Fused token-level loss and gradient kernels in pure Rust, with no libtorch dependency.
//!
//! `amend-kernels` is the numeric core of `amend`'s token-level losses. Every kernel works on plain
//! `f32` slices in row-major `[rows, vocab]` layout, computes the per-row loss **and** the gradient
//! with respect to the logits in one sweep, and never allocates `[rows, vocab]` temporaries. Because
//! it does not link libtorch it builds and tests anywhere, and other Rust frameworks can use it.
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

mod error;
mod reduction;

pub use error::{KernelError, Result};
pub use reduction::{Reduction, SumCount};
