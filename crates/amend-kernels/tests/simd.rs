//! Accuracy of the vectorised `exp` and `ln` against f64, on every instruction-set path this CPU
//! has (levels it lacks are skipped with a note on stderr).
//!
//! The bound of the exp is 4 ulp on [−87.3, 0] (kernels spec §8). The exhaustive check over every
//! f32 in that range is `#[ignore]`d (about 1.1e9 values); run it with
//! `cargo test --release -p amend-kernels --test simd -- --ignored`.

use amend_kernels::simd::{self, SimdLevel, exp_f32_on, ln_f32_on};
use proptest::prelude::*;

const ALL_LEVELS: [SimdLevel; 3] = [SimdLevel::Avx512, SimdLevel::Avx2Fma, SimdLevel::Portable];

/// The levels of [`ALL_LEVELS`] this CPU can run (always at least the portable one).
fn levels() -> Vec<SimdLevel> {
    ALL_LEVELS
        .into_iter()
        .filter(|l| {
            let ok = l.is_available();
            if !ok {
                eprintln!("skipping {}: not available on this CPU", l.name());
            }
            ok
        })
        .collect()
}

/// Error of `got` in units of the spacing of f32 at the exact value.
fn ulps(got: f32, exact: f64) -> f64 {
    let e = exact as f32;
    let spacing = f64::from(e.abs().next_up() - e.abs());
    (f64::from(got) - exact).abs() / spacing
}

fn max_exp_ulps(level: SimdLevel, xs: &[f32]) -> (f64, f32) {
    let mut y = vec![0.0f32; xs.len()];
    exp_f32_on(level, xs, &mut y).unwrap();
    xs.iter()
        .zip(&y)
        .map(|(&x, &v)| (ulps(v, f64::from(x).exp()), x))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

#[test]
fn exp_dense_sweep_within_4_ulp() {
    // 2M evenly spaced points over [−87.3, 0] plus the 64k floats nearest to 0.
    let mut xs: Vec<f32> = (0..2_000_000).map(|i| -87.3 * (i as f32) / 1_999_999.0).collect();
    let mut x = -0.0f32;
    for _ in 0..65_536 {
        xs.push(x);
        x = x.next_down();
    }
    for level in levels() {
        let (worst, at) = max_exp_ulps(level, &xs);
        assert!(worst <= 4.0, "{level:?}: {worst} ulp at x = {at}");
    }
}

/// Asking for a level the CPU lacks is not an error and not UB: it runs a level the CPU has
/// (the portable one), with the same accuracy.
#[test]
fn every_level_can_be_requested() {
    let xs: Vec<f32> = (0..1000).map(|i| -87.3 * (i as f32) / 999.0).collect();
    for level in ALL_LEVELS {
        let (worst, at) = max_exp_ulps(level, &xs);
        assert!(worst <= 4.0, "{level:?}: {worst} ulp at x = {at}");
        let mut y = vec![0.0f32; xs.len()];
        ln_f32_on(level, &xs[1..], &mut y[1..]).unwrap();
        assert!(y[1..].iter().all(|v| v.is_nan()), "{level:?}: ln of negative input");
    }
    assert!(simd::level().is_available());
}

/// The AVX-512 and AVX2 lanes compute the same operations, so their `exp` and `ln` agree bit
/// for bit (a NaN may differ in payload).
#[test]
fn vector_levels_agree_bit_for_bit() {
    if !SimdLevel::Avx512.is_available() || !SimdLevel::Avx2Fma.is_available() {
        eprintln!("skipping: needs both AVX-512 and AVX2 on this CPU");
        return;
    }
    let mut xs: Vec<f32> = (0..400_003).map(|i| -100.0 + 190.0 * (i as f32) / 400_002.0).collect();
    xs.extend([0.0, -0.0, f32::NEG_INFINITY, f32::INFINITY, f32::NAN, f32::MIN_POSITIVE, 1e-45]);
    let bits = |v: &[f32]| -> Vec<u32> {
        v.iter().map(|x| if x.is_nan() { f32::NAN.to_bits() } else { x.to_bits() }).collect()
    };
    let run = |f: fn(SimdLevel, &[f32], &mut [f32]) -> amend_kernels::Result<()>, l| {
        let mut y = vec![0.0f32; xs.len()];
        f(l, &xs, &mut y).unwrap();
        bits(&y)
    };
    assert_eq!(run(exp_f32_on, SimdLevel::Avx512), run(exp_f32_on, SimdLevel::Avx2Fma));
    assert_eq!(run(ln_f32_on, SimdLevel::Avx512), run(ln_f32_on, SimdLevel::Avx2Fma));
}

#[test]
fn exp_special_values() {
    let xs = [0.0f32, -0.0, f32::NEG_INFINITY, -87.31, -1e30, f32::NAN, 89.0, f32::INFINITY, -87.3];
    for level in levels() {
        let mut y = [0.0f32; 9];
        exp_f32_on(level, &xs, &mut y).unwrap();
        assert_eq!(y[0], 1.0, "{level:?}");
        assert_eq!(y[1], 1.0, "{level:?}");
        assert_eq!(y[2].to_bits(), 0, "{level:?}: exp(-inf) must be +0");
        assert_eq!(y[3].to_bits(), 0, "{level:?}: below -87.3 flushes to exactly 0");
        assert_eq!(y[4].to_bits(), 0, "{level:?}");
        assert!(y[5].is_nan(), "{level:?}: NaN propagates");
        assert_eq!(y[6], f32::INFINITY, "{level:?}");
        assert_eq!(y[7], f32::INFINITY, "{level:?}");
        assert!(
            y[8] > 0.0 && y[8].is_normal(),
            "{level:?}: exp(-87.3) is the smallest normal result"
        );
    }
}

#[test]
fn exp_rejects_length_mismatch() {
    let mut y = [0.0f32; 2];
    assert!(matches!(
        simd::exp_f32(&[0.0; 3], &mut y),
        Err(amend_kernels::KernelError::LengthMismatch { op: "exp_f32", expected: 3, got: 2, .. })
    ));
}

#[test]
fn ln_special_values_and_accuracy() {
    let xs = [1.0f32, 0.0, -1.0, f32::NAN, f32::INFINITY, f32::MIN_POSITIVE, 1e-45, 0.5, 2.0];
    for level in levels() {
        let mut y = [0.0f32; 9];
        ln_f32_on(level, &xs, &mut y).unwrap();
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], f32::NEG_INFINITY);
        assert!(y[2].is_nan() && y[3].is_nan());
        assert_eq!(y[4], f32::INFINITY);
        for i in [5, 6, 7, 8] {
            assert!(ulps(y[i], f64::from(xs[i]).ln()) <= 2.0, "{level:?}: ln({})", xs[i]);
        }
    }
}

/// An exact f64 `exp` of an f32 in the given range, in random-length batches (covering the
/// vector bodies and the scalar or masked tails).
fn batch(lo: f32, hi: f32) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(lo..=hi, 1..80)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn exp_within_4_ulp_of_f64(xs in batch(-87.3, 0.0)) {
        for level in levels() {
            let (worst, at) = max_exp_ulps(level, &xs);
            prop_assert!(worst <= 4.0, "{:?}: {} ulp at x = {}", level, worst, at);
        }
    }

    #[test]
    fn exp_positive_range_within_4_ulp(xs in batch(0.0, 88.0)) {
        for level in levels() {
            let (worst, at) = max_exp_ulps(level, &xs);
            prop_assert!(worst <= 4.0, "{:?}: {} ulp at x = {}", level, worst, at);
        }
    }

    #[test]
    fn ln_within_2_ulp_of_f64(es in prop::collection::vec(-125.0f32..127.0, 1..80)) {
        let xs: Vec<f32> = es.iter().map(|&e| e.exp2()).collect();
        for level in levels() {
            let mut y = vec![0.0f32; xs.len()];
            ln_f32_on(level, &xs, &mut y).unwrap();
            for (&x, &v) in xs.iter().zip(&y) {
                let exact = f64::from(x).ln();
                // Near x = 1 the result is tiny; judge it by absolute error instead.
                let ok = ulps(v, exact) <= 2.0 || (f64::from(v) - exact).abs() <= 2e-8;
                prop_assert!(ok, "{:?}: ln({}) = {}, exact {}", level, x, v, exact);
            }
        }
    }
}

#[test]
#[ignore = "exhaustive over ~1.1e9 floats; run in release (see the module docs)"]
fn exp_exhaustive_within_4_ulp() {
    let lo = (-87.3f32).to_bits();
    let levels = levels();
    let mut worst = vec![(0.0f64, 0.0f32); levels.len()];
    let mut chunk = Vec::with_capacity(1 << 20);
    let flush = |chunk: &mut Vec<f32>, worst: &mut [(f64, f32)]| {
        for (w, &level) in worst.iter_mut().zip(&levels) {
            let m = max_exp_ulps(level, chunk);
            if m.0 > w.0 {
                *w = m;
            }
        }
        chunk.clear();
    };
    // Negative floats: bit patterns from -0.0 (0x8000_0000) up to -87.3.
    for bits in 0x8000_0000u32..=lo {
        chunk.push(f32::from_bits(bits));
        if chunk.len() == chunk.capacity() {
            flush(&mut chunk, &mut worst);
        }
    }
    flush(&mut chunk, &mut worst);
    for (level, w) in levels.iter().zip(&worst) {
        println!("worst {}: {} ulp at x = {}", level.name(), w.0, w.1);
    }
    assert!(worst.iter().all(|w| w.0 <= 4.0), "{worst:?}");
}
