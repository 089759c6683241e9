//! Helpers shared by the integration tests.
#![allow(dead_code)]

use amend_testing::Tol;

/// f32 gradients: `F32_GRAD` (absolute 1e-6, for unit-scale gradients) plus a relative 1e-6
/// (about 8 ulp) for entries of scaled rows with `|g| > 1`.
pub const GRAD: Tol = Tol { rel: 1e-6, abs: 1e-6 };

/// Tolerance of the f64 oracles against float64 PyTorch values (different summation orders).
pub const ORACLE: Tol = Tol { rel: 1e-9, abs: 1e-11 };

pub fn to_f32(xs: &[f64]) -> Vec<f32> {
    xs.iter().map(|&x| x as f32).collect()
}

pub fn to_f64(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

/// Asserts `got` (f32) against `expected` within `tol`, naming the case.
#[track_caller]
pub fn close32(tol: Tol, what: &str, got: &[f32], expected: &[f64]) {
    tol.assert_all_close(what, &to_f64(got), expected);
}

/// Parses a JSON array of numbers where `"-inf"` stands for −∞.
pub fn nums(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| match x {
            serde_json::Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
            serde_json::Value::String(s) if s == "inf" => f64::INFINITY,
            _ => x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")),
        })
        .collect()
}

pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}
