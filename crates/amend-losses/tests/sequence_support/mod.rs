//! Helpers shared by the `sequence_*` integration tests.
#![allow(dead_code)]

use amend_losses::Result;
use amend_losses::sequence::SeqLogps;
use tch::{Kind, Tensor};

/// Both kinds every spec vector runs in.
pub const KINDS: [Kind; 2] = [Kind::Double, Kind::Float];

/// A 1-D tensor of `kind`.
pub fn t(v: &[f64], kind: Kind) -> Tensor {
    Tensor::from_slice(v).to_kind(kind)
}

/// A 1-D leaf of `kind` that requires grad.
pub fn leaf(v: &[f64], kind: Kind) -> Tensor {
    t(v, kind).set_requires_grad(true)
}

/// An i64 tensor.
pub fn ti(v: &[i64]) -> Tensor {
    Tensor::from_slice(v)
}

/// Values of any tensor, flattened, as f64.
pub fn vals(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(x.detach().to_kind(Kind::Double).reshape([-1])).expect("tensor to vec")
}

/// Scalar value.
pub fn val(x: &Tensor) -> f64 {
    f64::try_from(x.detach().to_kind(Kind::Double).sum(Kind::Double)).expect("scalar")
}

/// `SeqLogps` over leaf sums; returns the leaf for gradients.
pub fn seqs(sums: &[f64], lens: &[i64], kind: Kind) -> Result<(SeqLogps, Tensor)> {
    let s = leaf(sums, kind);
    Ok((SeqLogps::from_sums(&s, &ti(lens))?, s))
}

/// Spec §9 tolerance on values: f64 |Δ| ≤ 1e-9 (relative 1e-8 for values in scientific
/// notation: pass `rel = true`), f32 |Δ| ≤ 1e-5·max(1, |x|).
#[track_caller]
pub fn assert_vals(kind: Kind, what: &str, got: &[f64], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let tol = match kind {
            Kind::Double => 1e-9,
            _ => 1e-5 * e.abs().max(1.0),
        };
        assert!((g - e).abs() <= tol, "{what}[{i}] ({kind:?}): got {g:.12}, expected {e:.12}");
    }
}

/// Values in scientific notation: relative 1e-8 in f64, f32 as [`assert_vals`].
#[track_caller]
pub fn assert_vals_rel(kind: Kind, what: &str, got: &[f64], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let tol = match kind {
            Kind::Double => 1e-8 * e.abs(),
            _ => 1e-5 * e.abs().max(1.0),
        };
        assert!((g - e).abs() <= tol, "{what}[{i}] ({kind:?}): got {g:e}, expected {e:e}");
    }
}

/// Gradients: f64 |Δ| ≤ 1e-7, f32 |Δ| ≤ 1e-5·max(1, |x|).
#[track_caller]
pub fn assert_grads(kind: Kind, what: &str, got: &[f64], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let tol = match kind {
            Kind::Double => 1e-7,
            _ => 1e-5 * e.abs().max(1.0),
        };
        assert!((g - e).abs() <= tol, "{what}[{i}] ({kind:?}): got {g:.12}, expected {e:.12}");
    }
}

/// Metric mean, panicking when missing.
#[track_caller]
pub fn metric(out: &amend_losses::LossOutput, name: &str) -> f64 {
    out.metrics.mean(name).unwrap_or_else(|| panic!("metric {name} missing"))
}
