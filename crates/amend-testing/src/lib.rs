//! Shared test support for the `amend` workspace (not published): the tolerance table every test
//! uses, and helpers to load committed fixtures.
//!
//! Tolerances are named so that every assertion says which one it uses:
//!
//! | name | use |
//! |---|---|
//! | [`F64`] | f64 paths against f64 oracles |
//! | [`F32`] | f32 losses against f64 oracles (relative 1e-5, absolute 1e-6) |
//! | [`F32_GRAD`] | f32 gradients (absolute 1e-6) |
//! | [`BF16`] | bf16 inputs (relative 2e-2) |
#![doc(test(attr(deny(warnings))))]

use std::path::{Path, PathBuf};

/// A relative-plus-absolute tolerance: `|a − b| ≤ abs + rel · max(|a|, |b|)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    /// Relative part.
    pub rel: f64,
    /// Absolute part.
    pub abs: f64,
}

/// f64 paths against f64 oracles.
pub const F64: Tol = Tol { rel: 1e-10, abs: 1e-12 };
/// f32 loss values against f64 oracles.
pub const F32: Tol = Tol { rel: 1e-5, abs: 1e-6 };
/// f32 gradients against f64 oracles.
pub const F32_GRAD: Tol = Tol { rel: 0.0, abs: 1e-6 };
/// bf16 inputs.
pub const BF16: Tol = Tol { rel: 2e-2, abs: 1e-3 };

impl Tol {
    /// Whether `a` and `b` agree within this tolerance (NaN never agrees; equal infinities do).
    pub fn close(self, a: f64, b: f64) -> bool {
        if a == b {
            return true;
        }
        (a - b).abs() <= self.abs + self.rel * a.abs().max(b.abs())
    }

    /// Panics with a readable message naming `what` and the first mismatch when `got` and
    /// `expected` differ beyond this tolerance or in length.
    #[track_caller]
    pub fn assert_all_close(self, what: &str, got: &[f64], expected: &[f64]) {
        assert_eq!(got.len(), expected.len(), "{what}: length {} != {}", got.len(), expected.len());
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            assert!(
                self.close(g, e),
                "{what}[{i}]: got {g:e}, expected {e:e} (|diff| = {:e}, tol rel {:e} abs {:e})",
                (g - e).abs(),
                self.rel,
                self.abs
            );
        }
    }
}

/// Path of a fixture file, relative to the calling crate's `tests/fixtures/` folder.
///
/// Pass `env!("CARGO_MANIFEST_DIR")` as `manifest_dir`.
pub fn fixture_path(manifest_dir: &str, name: &str) -> PathBuf {
    Path::new(manifest_dir).join("tests").join("fixtures").join(name)
}

/// Reads and parses a JSON fixture, panicking with the path on failure (tests only).
#[track_caller]
pub fn load_json_fixture<T: serde::de::DeserializeOwned>(manifest_dir: &str, name: &str) -> T {
    let path = fixture_path(manifest_dir, name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cannot parse fixture {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_rejects_nan_and_accepts_equal_infinities() {
        assert!(!F32.close(f64::NAN, f64::NAN));
        assert!(F32.close(f64::INFINITY, f64::INFINITY));
        assert!(F32.close(1.0, 1.0 + 5e-6));
        assert!(!F32.close(1.0, 1.0 + 5e-5));
    }
}
