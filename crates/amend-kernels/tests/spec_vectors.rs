//! The numeric test vectors of the specs as named tests: kernels spec §10.1 (Example A, E1, E2,
//! E3) and the per-position cases of token-losses §12 (12.1 parity, 12.2, 12.3 token values and
//! T-MASK, 12.4 E1–E5, 12.5/12.6 Welleck positions, 12.7 sequence-UL positions).
//!
//! Every vector runs through the fused f32 kernel (tolerance: 1e-5 relative + 1e-6 absolute, as
//! §12 requires of f32 runs) and through the f64 oracle (1e-8 absolute for values printed with 9
//! decimals, 1e-6 for 6–7 decimals).

// Tables of spec vectors read best as tuples; one checker takes the whole position.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

mod common;

use amend_kernels::reference::{RefOutput, tnt_ref, token_kl_ref, unlikelihood_ref};
use amend_kernels::{
    BatchStats, Candidates, KlDirection, KlTarget, KlValue, LogitsIo, Reduction, SumCount,
    TntKernelConfig, TntVariant, TokenKlConfig, UnlikelihoodConfig, tnt, token_kl, unlikelihood,
};
use amend_testing::Tol;
use common::{to_f32, to_f64};

const F32_RUN: Tol = Tol { rel: 1e-5, abs: 1e-6 };
const F64_9: Tol = Tol { rel: 0.0, abs: 1e-8 };
const F64_6: Tol = Tol { rel: 0.0, abs: 1e-6 };

const Z_A: [f64; 4] = [2.0, 1.0, 0.5, -1.0];
const ZR_A: [f64; 4] = [1.5, 1.2, 0.3, -0.5];
const Y_A: i64 = 1;

fn cfg(variant: TntVariant, alpha: f64) -> TntKernelConfig {
    TntKernelConfig::new(variant).with_alpha(alpha).with_smoothing_eps(1e-6)
}

/// Runs the dispatcher on rows of `z`/`zr` in f32 (grad mode, then value mode, then in place)
/// and checks that the three agree bitwise; returns (loss, grad, stats).
fn run32(
    c: &TntKernelConfig,
    vocab: usize,
    z: &[f64],
    zr: &[f64],
    labels: &[i64],
    w: &[f64],
) -> (Vec<f32>, Vec<f32>, BatchStats) {
    let (zf, zrf, wf) = (to_f32(z), to_f32(zr), to_f32(w));
    let rows = labels.len();
    let (mut g, mut l) = (vec![f32::NAN; zf.len()], vec![f32::NAN; rows]);
    let stats =
        tnt(LogitsIo::grad(&zf, &mut g), vocab, Some(&zrf), labels, &wf, c, &mut l).unwrap();
    let mut lv = vec![0.0; rows];
    tnt(LogitsIo::value(&zf), vocab, Some(&zrf), labels, &wf, c, &mut lv).unwrap();
    assert_eq!(bits(&l), bits(&lv), "value-only loss differs from the gradient call");
    let (mut zi, mut li) = (zf.clone(), vec![0.0; rows]);
    tnt(LogitsIo::in_place(&mut zi), vocab, Some(&zrf), labels, &wf, c, &mut li).unwrap();
    assert_eq!(bits(&l), bits(&li), "in-place loss differs");
    assert_eq!(bits(&g), bits(&zi), "in-place gradient differs");
    (l, g, stats)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn run64(
    c: &TntKernelConfig,
    vocab: usize,
    z: &[f64],
    zr: &[f64],
    labels: &[i64],
    w: &[f64],
) -> RefOutput {
    tnt_ref(z, vocab, Some(zr), labels, w, c).unwrap()
}

/// One position of the dispatcher, checked in f32 and f64 against `(value, grad)`.
#[track_caller]
fn check_position(
    name: &str,
    c: &TntKernelConfig,
    z: &[f64],
    zr: &[f64],
    y: i64,
    w: f64,
    value: f64,
    grad: &[f64],
    tol64: Tol,
) {
    let v = z.len();
    let (l, g, _) = run32(c, v, z, zr, &[y], &[w]);
    F32_RUN.assert_all_close(&format!("{name} f32 value"), &to_f64(&l), &[value]);
    F32_RUN.assert_all_close(&format!("{name} f32 grad"), &to_f64(&g), grad);
    let o = run64(c, v, z, zr, &[y], &[w]);
    tol64.assert_all_close(&format!("{name} f64 value"), &o.loss, &[value]);
    tol64.assert_all_close(&format!("{name} f64 grad"), &o.grad, grad);
}

// --------------------------------------------------------------------------------------------
// Kernels spec §10.1 / token-losses §12.2: Example A.

const G_TNFF_NEG: [f64; 4] = [-0.086662112, 0.224207818, -0.073679046, -0.063866660];
const G_TNRR_NEG: [f64; 4] = [-1.658330108, 2.182057600, -0.410820591, -0.112906902];
const G_UL_NEG: [f64; 4] = [-0.176136997, 0.224207818, -0.039301476, -0.008769345];
const G_NLL: [f64; 4] = [0.609460038, -0.775792182, 0.135988916, 0.030343229];

#[test]
fn example_a_tnff_negative_cross_entropy_form() {
    for v in [TntVariant::Tnff, TntVariant::Tnfll] {
        check_position(
            "TNFF-",
            &cfg(v, 1.0),
            &Z_A,
            &ZR_A,
            Y_A,
            -1.0,
            1.092313506,
            &G_TNFF_NEG,
            F64_9,
        );
    }
}

#[test]
fn example_a_tnff_negative_kl_form() {
    let c = cfg(TntVariant::Tnff, 1.0).with_forward_value(KlValue::Divergence);
    check_position("TNFF- KL", &c, &Z_A, &ZR_A, Y_A, -1.0, 0.290062043, &G_TNFF_NEG, F64_9);
}

#[test]
fn example_a_reverse_negative() {
    for v in [TntVariant::Tnrr, TntVariant::Tnrf, TntVariant::Tnrll] {
        check_position(
            "TNRR-",
            &cfg(v, 1.0),
            &Z_A,
            &ZR_A,
            Y_A,
            -1.0,
            2.588033316,
            &G_TNRR_NEG,
            F64_9,
        );
    }
}

#[test]
fn example_a_ul_negative() {
    let c = cfg(TntVariant::UlAnnotated, 1.0);
    check_position("UL-", &c, &Z_A, &ZR_A, Y_A, -1.0, 0.253870601, &G_UL_NEG, F64_9);
}

#[test]
fn example_a_nl_negative() {
    let c = cfg(TntVariant::Nl { threshold: Some(-10.3) }, 1.0);
    let g: Vec<f64> = G_NLL.iter().map(|x| -x).collect();
    check_position("NL-", &c, &Z_A, &ZR_A, Y_A, -1.0, -1.495181898, &g, F64_9);
}

#[test]
fn example_a_tnff_positive() {
    let g = [0.150185668, -0.116031003, -0.002341866, -0.031812798];
    check_position(
        "TNFF+",
        &cfg(TntVariant::Tnff, 1.0),
        &Z_A,
        &ZR_A,
        Y_A,
        1.0,
        1.229384973,
        &g,
        F64_9,
    );
    let c = cfg(TntVariant::Tnff, 1.0).with_forward_value(KlValue::Divergence);
    check_position("TNFF+ KL", &c, &Z_A, &ZR_A, Y_A, 1.0, 0.058896843, &g, F64_9);
}

#[test]
fn example_a_tnrr_positive() {
    let g = [0.139009702, -0.105806832, -0.009780105, -0.023422765];
    check_position(
        "TNRR+",
        &cfg(TntVariant::Tnrr, 1.0),
        &Z_A,
        &ZR_A,
        Y_A,
        1.0,
        0.054840761,
        &g,
        F64_9,
    );
}

#[test]
fn example_a_tnrf_positive() {
    let g = [0.150186505, -0.116030642, -0.002342313, -0.031813550];
    check_position(
        "TNRF+",
        &cfg(TntVariant::Tnrf, 1.0),
        &Z_A,
        &ZR_A,
        Y_A,
        1.0,
        1.229387536,
        &g,
        F64_9,
    );
}

#[test]
fn example_a_nll_positive() {
    for v in [TntVariant::Tnfll, TntVariant::UlAnnotated, TntVariant::Nl { threshold: Some(-10.3) }]
    {
        check_position("NLL+", &cfg(v, 1.0), &Z_A, &ZR_A, Y_A, 1.0, 1.495181898, &G_NLL, F64_9);
    }
}

#[test]
fn example_a_tnrll_positive() {
    let g = [0.609459038, -0.775789182, 0.135987916, 0.030342229];
    check_position(
        "TNRLL+",
        &cfg(TntVariant::Tnrll, 1.0),
        &Z_A,
        &ZR_A,
        Y_A,
        1.0,
        1.495183398,
        &g,
        F64_9,
    );
}

/// The generic reference KL reproduces the §12.2 values (token-losses §12.2, last paragraph).
#[test]
fn example_a_reference_kl_forms() {
    let cases: [(KlDirection, KlValue, Option<i64>, f64, f64, &[f64]); 5] = [
        (
            KlDirection::Forward,
            KlValue::Divergence,
            None,
            0.0,
            0.058896843,
            &[0.150185668, -0.116031003, -0.002341866, -0.031812798],
        ),
        (KlDirection::Forward, KlValue::Divergence, Some(1), 0.0, 0.290062043, &G_TNFF_NEG),
        (KlDirection::Forward, KlValue::CrossEntropy, Some(1), 0.0, 1.092313506, &G_TNFF_NEG),
        (KlDirection::Reverse, KlValue::Divergence, Some(1), 1e-6, 2.588033316, &G_TNRR_NEG),
        (
            KlDirection::Reverse,
            KlValue::Divergence,
            None,
            0.0,
            0.054840218,
            &[0.139008922, -0.105806948, -0.009779592, -0.023422382],
        ),
    ];
    for (dir, value, ex, eps, expected, grad) in cases {
        let c =
            TokenKlConfig::default().with_direction(dir).with_value(value).with_smoothing_eps(eps);
        let exclude = ex.map(|e| [e]);
        let name = format!("{dir:?} {value:?} exclude={ex:?}");
        let (zf, zrf) = (to_f32(&Z_A), to_f32(&ZR_A));
        let (mut g, mut l) = ([0.0f32; 4], [0.0f32; 1]);
        let t = KlTarget::Reference { ref_logits: &zrf, exclude: exclude.as_ref().map(|e| &e[..]) };
        token_kl(LogitsIo::grad(&zf, &mut g), 4, t, None, &c, &mut l).unwrap();
        F32_RUN.assert_all_close(&name, &to_f64(&l), &[expected]);
        F32_RUN.assert_all_close(&name, &to_f64(&g), grad);
        let t = KlTarget::Reference {
            ref_logits: &ZR_A[..],
            exclude: exclude.as_ref().map(|e| &e[..]),
        };
        let o = token_kl_ref(&Z_A, 4, t, None, &c).unwrap();
        F64_9.assert_all_close(&name, &o.loss, &[expected]);
        F64_9.assert_all_close(&name, &o.grad, grad);
    }
}

// --------------------------------------------------------------------------------------------
// E1: current model saturated on the negative token.

const Z_E1: [f64; 4] = [0.0, 20.0, 0.0, 0.0];
const ZR_E1: [f64; 4] = [0.5, 1.0, 0.2, -0.3];

#[test]
fn e1_saturated_negative_tnff() {
    let g = [-0.456590316, 0.999999994, -0.338250425, -0.205159253];
    check_position(
        "E1 TNFF-",
        &cfg(TntVariant::Tnff, 1.0),
        &Z_E1,
        &ZR_E1,
        1,
        -1.0,
        20.000000006,
        &g,
        F64_9,
    );
}

#[test]
fn e1_saturated_negative_exact_unlikelihood() {
    let g = [-0.333333331, 0.999999994, -0.333333331, -0.333333331];
    let c = cfg(TntVariant::UlAnnotated, 1.0);
    check_position("E1 UL-", &c, &Z_E1, &ZR_E1, 1, -1.0, 18.901387718, &g, F64_9);
    // Not the clamped parity values (t5patches 15.942385, fairseq 11.512925) with zero gradient.
    let (l, g32, _) = run32(&c, 4, &Z_E1, &ZR_E1, &[1], &[-1.0]);
    assert!(l[0] > 18.9 && g32.iter().all(|v| v.is_finite() && *v != 0.0));
}

#[test]
fn e1_saturated_negative_tnrr_gradient_vanishes() {
    let c = cfg(TntVariant::Tnrr, 1.0);
    let (l, g, _) = run32(&c, 4, &Z_E1, &ZR_E1, &[1], &[-1.0]);
    F32_RUN.assert_all_close("E1 TNRR- f32", &to_f64(&l), &[13.815514350]);
    assert!(g.iter().all(|v| v.abs() <= 1e-6), "f32 gradient must vanish: {g:?}");
    let o = run64(&c, 4, &Z_E1, &ZR_E1, &[1], &[-1.0]);
    F64_9.assert_all_close("E1 TNRR- f64", &o.loss, &[13.815514350]);
    let expected = [-6.81e-8, 2.02e-7, -6.75e-8, -6.64e-8];
    Tol { rel: 1e-2, abs: 0.0 }.assert_all_close("E1 TNRR- f64 grad", &o.grad, &expected);
}

#[test]
fn e1_saturated_negative_nl() {
    let c = cfg(TntVariant::Nl { threshold: Some(-10.3) }, 1.0);
    let (l, g, _) = run32(&c, 4, &Z_E1, &ZR_E1, &[1], &[-1.0]);
    assert!(l[0] <= 0.0 && l[0] > -1e-6, "NL- = log p_y ≈ −6.2e-9, got {}", l[0]);
    assert!(g.iter().all(|v| v.abs() <= 1e-6));
    let o = run64(&c, 4, &Z_E1, &ZR_E1, &[1], &[-1.0]);
    Tol { rel: 1e-3, abs: 0.0 }.assert_all_close("E1 NL- f64", &o.loss, &[-6.18346e-9]);
}

// --------------------------------------------------------------------------------------------
// E2: reference saturated on the negative token (naive renormalisation gives NaN).

#[test]
fn e2_saturated_reference_tnff() {
    let z = [0.0; 4];
    let g = [-0.083333333, 0.25, -0.083333333, -0.083333333];
    let c = cfg(TntVariant::Tnff, 1.0);
    let (l, g32, _) = run32(&c, 4, &z, &[0.0, 120.0, 0.0, 0.0], &[1], &[-1.0]);
    F32_RUN.assert_all_close("E2 TNFF- f32", &to_f64(&l), &[1.386294361]);
    F32_RUN.assert_all_close("E2 TNFF- f32 grad", &to_f64(&g32), &g);
    let o = run64(&c, 4, &z, &[0.0, 800.0, 0.0, 0.0], &[1], &[-1.0]);
    F64_9.assert_all_close("E2 TNFF- f64", &o.loss, &[4f64.ln()]);
    F64_9.assert_all_close("E2 TNFF- f64 grad", &o.grad, &g);
    // The target itself is [1/3, 0, 1/3, 1/3]: the gradient is p − q with p uniform.
}

#[test]
fn e2_saturated_reference_tnrr() {
    let z = [0.0; 4];
    let g = [-0.794806329, 2.384418988, -0.794806329, -0.794806329];
    let c = cfg(TntVariant::Tnrr, 1.0);
    let (l, g32, _) = run32(&c, 4, &z, &[0.0, 120.0, 0.0, 0.0], &[1], &[-1.0]);
    F32_RUN.assert_all_close("E2 TNRR- f32", &to_f64(&l), &[2.891544245]);
    F32_RUN.assert_all_close("E2 TNRR- f32 grad", &to_f64(&g32), &g);
    let o = run64(&c, 4, &z, &[0.0, 800.0, 0.0, 0.0], &[1], &[-1.0]);
    F64_9.assert_all_close("E2 TNRR- f64", &o.loss, &[2.891544245]);
    F64_9.assert_all_close("E2 TNRR- f64 grad", &o.grad, &g);
}

// --------------------------------------------------------------------------------------------
// E3: all weights 0 (and an empty batch).

#[test]
fn e3_all_weights_zero() {
    let variants = [
        TntVariant::Tnff,
        TntVariant::Tnrr,
        TntVariant::Tnrf,
        TntVariant::Tnfll,
        TntVariant::Tnrll,
        TntVariant::Nl { threshold: Some(-10.3) },
        TntVariant::UlAnnotated,
    ];
    let z: Vec<f64> = Z_A.iter().chain(&Z_E1).copied().collect();
    let zr: Vec<f64> = ZR_A.iter().chain(&ZR_E1).copied().collect();
    for v in variants {
        let (l, g, stats) = run32(&cfg(v, 2.0), 4, &z, &zr, &[1, 1], &[0.0, 0.0]);
        assert!(l.iter().chain(&g).all(|x| x.to_bits() == 0), "{v:?}: {l:?} {g:?}");
        assert_eq!((stats.sum, stats.count), (0.0, 0));
        assert_eq!(stats.mean(), 0.0);
        assert_eq!(Reduction::Mean.reduce_scalar(stats.sum_count(), 2), 0.0);
        // B·T = 0 is allowed too.
        let (l, g, stats) = run32(&cfg(v, 2.0), 4, &[], &[], &[], &[]);
        assert!(l.is_empty() && g.is_empty());
        assert_eq!(stats.sum_count(), SumCount::ZERO);
    }
}

// --------------------------------------------------------------------------------------------
// E4: NL threshold.

#[test]
fn e4_nl_threshold() {
    let z = [12.0, 0.0, 0.0, 0.0];
    let zr = [0.0; 4];
    let nl = |t, a| cfg(TntVariant::Nl { threshold: t }, a);
    let g_pos = [0.999981568, -0.999993856, 0.000006144, 0.000006144];
    check_position("E4 w=+1", &nl(Some(-10.3), 1.0), &z, &zr, 1, 1.0, 12.000018432, &g_pos, F64_9);
    check_position("E4 floored", &nl(Some(-10.3), 1.0), &z, &zr, 1, -1.0, -10.3, &[0.0; 4], F64_9);
    let g_neg: Vec<f64> = g_pos.iter().map(|x| -x).collect();
    check_position("E4 no floor", &nl(None, 1.0), &z, &zr, 1, -1.0, -12.000018432, &g_neg, F64_9);
    check_position("E4 alpha=2", &nl(Some(-10.3), 2.0), &z, &zr, 1, -1.0, -20.6, &[0.0; 4], F64_9);
    let g10 = [-0.999863819, 0.999954606, -0.000045394, -0.000045394];
    let z10 = [10.0, 0.0, 0.0, 0.0];
    check_position(
        "E4 z=10",
        &nl(Some(-10.3), 1.0),
        &z10,
        &zr,
        1,
        -1.0,
        -10.000136191,
        &g10,
        F64_9,
    );
}

// --------------------------------------------------------------------------------------------
// E5: a −inf column leaves every §12.2 value unchanged (whatever z° holds there).

#[test]
fn e5_masked_vocabulary_column() {
    let ninf = f64::NEG_INFINITY;
    let z = [2.0, 1.0, ninf, 0.5, -1.0];
    let insert = |g: &[f64]| vec![g[0], g[1], 0.0, g[2], g[3]];
    let cases: Vec<(TntVariant, f64, KlValue, f64, Vec<f64>)> = vec![
        (TntVariant::Tnff, -1.0, KlValue::CrossEntropy, 1.092313506, insert(&G_TNFF_NEG)),
        (TntVariant::Tnff, -1.0, KlValue::Divergence, 0.290062043, insert(&G_TNFF_NEG)),
        (TntVariant::Tnrr, -1.0, KlValue::CrossEntropy, 2.588033316, insert(&G_TNRR_NEG)),
        (TntVariant::Tnrf, -1.0, KlValue::CrossEntropy, 2.588033316, insert(&G_TNRR_NEG)),
        (TntVariant::Tnrll, -1.0, KlValue::CrossEntropy, 2.588033316, insert(&G_TNRR_NEG)),
        (TntVariant::UlAnnotated, -1.0, KlValue::CrossEntropy, 0.253870601, insert(&G_UL_NEG)),
        (
            TntVariant::Nl { threshold: Some(-10.3) },
            -1.0,
            KlValue::CrossEntropy,
            -1.495181898,
            insert(&G_NLL.map(|x| -x)),
        ),
        (
            TntVariant::Tnff,
            1.0,
            KlValue::CrossEntropy,
            1.229384973,
            insert(&[0.150185668, -0.116031003, -0.002341866, -0.031812798]),
        ),
        (
            TntVariant::Tnrr,
            1.0,
            KlValue::CrossEntropy,
            0.054840761,
            insert(&[0.139009702, -0.105806832, -0.009780105, -0.023422765]),
        ),
        (
            TntVariant::Tnrf,
            1.0,
            KlValue::CrossEntropy,
            1.229387536,
            insert(&[0.150186505, -0.116030642, -0.002342313, -0.031813550]),
        ),
        (TntVariant::Tnfll, 1.0, KlValue::CrossEntropy, 1.495181898, insert(&G_NLL)),
        (
            TntVariant::Tnrll,
            1.0,
            KlValue::CrossEntropy,
            1.495183398,
            insert(&[0.609459038, -0.775789182, 0.135987916, 0.030342229]),
        ),
    ];
    for zr2 in [ninf, 7.0, -3.0] {
        let zr = [1.5, 1.2, zr2, 0.3, -0.5];
        for (v, w, value, expected, g) in &cases {
            let c = cfg(*v, 1.0).with_forward_value(*value);
            let name = format!("E5 {v:?} w={w} z°₂={zr2}");
            check_position(&name, &c, &z, &zr, 1, *w, *expected, g, F64_9);
            let (_, g32, stats) = run32(&c, 5, &z, &zr, &[1], &[*w]);
            assert_eq!(g32[2].to_bits(), 0, "{name}: masked column must have an exact 0 gradient");
            assert_eq!(stats.masked_vocab_rows, 1);
        }
    }
}

// --------------------------------------------------------------------------------------------
// Token-losses §12.3: batch with masks (token values and gradients; reductions are the losses').

const Z_B: [f64; 24] = [
    1.0, 0.0, -1.0, 0.5, 0.2, 1.4, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, //
    2.0, -1.0, 0.3, 0.1, -0.5, 0.5, 1.5, 0.0, 0.7, 0.7, -2.0, 1.0,
];
const ZR_B: [f64; 24] = [
    0.8, 0.1, -0.9, 0.4, 0.0, 1.0, 0.0, 0.0, 0.3, -0.3, 0.1, 0.0, //
    1.5, -0.5, 0.0, 0.0, -0.2, 0.9, 1.0, 0.1, 0.5, 0.5, -1.0, 1.5,
];
const Y_B: [i64; 6] = [0, 1, 3, 0, 2, 3];
const W_B: [f64; 6] = [1.0, -1.0, 0.0, -1.0, 1.0, 1.0];

fn batch_variants() -> Vec<(TntVariant, [f64; 6])> {
    vec![
        (TntVariant::Tnff, [1.256066, 3.963458, 0.0, 4.805592, 1.356341, 1.185670]),
        (TntVariant::Tnrr, [0.007369, 14.622355, 0.0, 18.834680, 0.082287, 0.068744]),
        (TntVariant::Tnrf, [1.256067, 14.622355, 0.0, 18.834680, 1.356342, 1.185673]),
        (TntVariant::Tnfll, [0.746567, 3.963458, 0.0, 4.805592, 0.546006, 0.928782]),
        (TntVariant::Tnrll, [0.746571, 14.622355, 0.0, 18.834680, 0.546011, 0.928785]),
        (TntVariant::UlAnnotated, [0.746567, 1.724913, 0.0, 2.571584, 0.546006, 0.928782]),
        (
            TntVariant::Nl { threshold: Some(-10.3) },
            [0.746567, -1.096792, 0.0, -0.647120, 0.546006, 0.928782],
        ),
    ]
}

#[test]
fn batch_12_3_token_losses() {
    for (v, expected) in batch_variants() {
        let c = cfg(v, 2.0);
        let (l, g, stats) = run32(&c, 4, &Z_B, &ZR_B, &Y_B, &W_B);
        F32_RUN.assert_all_close(&format!("{v:?} f32"), &to_f64(&l), &expected);
        assert_eq!(stats.count, 5);
        assert!(g[8..12].iter().all(|x| x.to_bits() == 0), "inactive (0,2) gradient");
        let o = run64(&c, 4, &Z_B, &ZR_B, &Y_B, &W_B);
        F64_6.assert_all_close(&format!("{v:?} f64"), &o.loss, &expected);
        // Per-sequence sums (the upstream scores are their negatives).
        let sum: f64 = expected.iter().sum();
        assert!((stats.sum - sum).abs() < 1e-5, "{v:?}: Σ {} vs {sum}", stats.sum);
    }
}

#[test]
fn batch_12_3_gradients() {
    let rows_g = |g: &[f64]| -> Vec<f64> {
        // Expected table rows (0,0), (0,1), (1,0), (1,1), (1,2) → full [6, 4] with (0,2) = 0.
        let mut out = g[..8].to_vec();
        out.extend([0.0; 4]);
        out.extend(&g[8..]);
        out
    };
    let cases: [(TntVariant, [f64; 20]); 3] = [
        (
            TntVariant::Tnff,
            [
                0.048384, -0.036978, -0.013604, 0.002197, -0.318561, 1.155752, -0.455530,
                -0.381662, 1.447137, -0.393344, -0.502935, -0.550857, -0.036891, -0.133239,
                0.196498, -0.026369, 0.090278, 0.090278, -0.025488, -0.155068,
            ],
        ),
        (
            TntVariant::Tnrr,
            [
                0.047544, -0.034821, -0.012811, 0.000088, -2.771257, 6.883592, -1.786421,
                -2.325914, 5.896525, -0.812917, -2.771339, -2.312269, -0.036685, -0.121028,
                0.192345, -0.034633, 0.087831, 0.087831, -0.017699, -0.157963,
            ],
        ),
        (
            TntVariant::UlAnnotated,
            [
                -0.526009, 0.174371, 0.064148, 0.287490, -0.476547, 1.155752, -0.289041, -0.390164,
                1.447137, -0.188590, -0.691992, -0.566555, 0.078394, 0.213097, -0.420741, 0.129250,
                0.292649, 0.292649, 0.019668, -0.604965,
            ],
        ),
    ];
    for (v, g) in cases {
        let c = cfg(v, 2.0);
        let expected = rows_g(&g);
        let (_, g32, _) = run32(&c, 4, &Z_B, &ZR_B, &Y_B, &W_B);
        F32_RUN.assert_all_close(&format!("{v:?} f32 grad"), &to_f64(&g32), &expected);
        let o = run64(&c, 4, &Z_B, &ZR_B, &Y_B, &W_B);
        F64_6.assert_all_close(&format!("{v:?} f64 grad"), &o.grad, &expected);
    }
    // The notes below the table: TNRF / TNRLL / NL rows that differ from the table above.
    let row = |g: &[f32], r: usize| to_f64(&g[4 * r..4 * r + 4]);
    let (_, g, _) = run32(&cfg(TntVariant::Tnrf, 2.0), 4, &Z_B, &ZR_B, &Y_B, &W_B);
    F32_RUN.assert_all_close(
        "TNRF (0,0)",
        &row(&g, 0),
        &[0.048385, -0.036979, -0.013604, 0.002198],
    );
    F32_RUN.assert_all_close(
        "TNRF (1,1)",
        &row(&g, 4),
        &[-0.036892, -0.133238, 0.196499, -0.026369],
    );
    F32_RUN.assert_all_close(
        "TNRF (1,2)",
        &row(&g, 5),
        &[0.090277, 0.090277, -0.025488, -0.155066],
    );
    let (_, g, _) = run32(&cfg(TntVariant::Tnrll, 2.0), 4, &Z_B, &ZR_B, &Y_B, &W_B);
    F32_RUN.assert_all_close(
        "TNRLL (0,0)",
        &row(&g, 0),
        &[-0.526006, 0.174370, 0.064147, 0.287489],
    );
    F32_RUN.assert_all_close(
        "TNRLL (1,1)",
        &row(&g, 4),
        &[0.078393, 0.213096, -0.420738, 0.129249],
    );
    F32_RUN.assert_all_close(
        "TNRLL (1,2)",
        &row(&g, 5),
        &[0.292648, 0.292648, 0.019667, -0.604962],
    );
    let (_, g, _) =
        run32(&cfg(TntVariant::Nl { threshold: Some(-10.3) }, 2.0), 4, &Z_B, &ZR_B, &Y_B, &W_B);
    F32_RUN.assert_all_close("NL (0,1)", &row(&g, 1), &[-0.348106, 0.844248, -0.211137, -0.285005]);
    F32_RUN.assert_all_close("NL (1,0)", &row(&g, 3), &[0.552863, -0.072049, -0.264368, -0.216446]);
}

/// T-MASK: NaN, +inf and −inf at the inactive position (0,2), with an out-of-range label there,
/// change nothing, and its gradient is exactly 0.
#[test]
fn batch_12_3_t_mask() {
    let mut z = Z_B;
    let mut zr = ZR_B;
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::NAN];
    z[8..12].copy_from_slice(&bad);
    zr[8..12].copy_from_slice(&bad);
    let mut y = Y_B;
    y[2] = 999;
    for (v, _) in batch_variants() {
        let c = cfg(v, 2.0);
        let (l0, g0, s0) = run32(&c, 4, &Z_B, &ZR_B, &Y_B, &W_B);
        let (l1, g1, s1) = run32(&c, 4, &z, &zr, &y, &W_B);
        assert_eq!(bits(&l0), bits(&l1), "{v:?}");
        assert_eq!(bits(&g0), bits(&g1), "{v:?}");
        assert_eq!(s0, s1);
        assert!(g1[8..12].iter().all(|x| x.to_bits() == 0));
    }
}

// --------------------------------------------------------------------------------------------
// Token-losses §12.1: upstream parity scores (score = −Σ_t token loss per sequence).

#[test]
fn parity_12_1_upstream_scores() {
    let z: Vec<f64> = (0..24).map(f64::from).collect();
    let labels = [1, 2, 1, 0, 0, 1, 0, 2];
    let w_a = [1.0, 1.0, -1.0, 0.0, 1.0, -1.0, 1.0, -1.0];
    let w_b = [1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let w_c = [0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 1.0, -1.0];
    let cases: [(TntVariant, &[f64; 8], [f64; 2], [f64; 2]); 7] = [
        (TntVariant::UlAnnotated, &w_a, [-2.0958899, -6.1902342], [-1.9555509, -5.5027230]),
        (
            TntVariant::Nl { threshold: Some(-10.3) },
            &w_a,
            [-0.4076060, -3.0000000],
            [-1.1114089, -3.9076060],
        ),
        (TntVariant::Tnfll, &w_b, [-2.4612237, 0.0], [-2.1382178, 0.0]),
        (TntVariant::Tnff, &w_c, [0.0, -3.9873504], [0.0, -2.8260708]),
        (TntVariant::Tnrr, &w_a, [-2.8245809, -11.3777289], [-1.4122905, -5.6888644]),
        (TntVariant::Tnrll, &w_b, [-4.6397959, 0.0], [-3.2275054, 0.0]),
        (TntVariant::Tnrf, &w_c, [0.0, -13.0425235], [0.0, -7.3536591]),
    ];
    for (v, w, score_1, score_half) in cases {
        for (alpha, expected) in [(1.0, score_1), (0.5, score_half)] {
            let c = cfg(v, alpha);
            let (l, _, _) = run32(&c, 3, &z, &z, &labels, w);
            let score = [
                -l[..4].iter().map(|&x| f64::from(x)).sum::<f64>(),
                -l[4..].iter().map(|&x| f64::from(x)).sum::<f64>(),
            ];
            F32_RUN.assert_all_close(&format!("{v:?} α={alpha} f32"), &score, &expected);
            let o = run64(&c, 3, &z, &z, &labels, w);
            let score = [-o.loss[..4].iter().sum::<f64>(), -o.loss[4..].iter().sum::<f64>()];
            Tol { rel: 0.0, abs: 1e-6 }.assert_all_close(
                &format!("{v:?} α={alpha} f64"),
                &score,
                &expected,
            );
        }
    }
}

// --------------------------------------------------------------------------------------------
// Token-losses §12.5 / §12.6: Welleck token-level UL positions (candidates given as CSR).

fn welleck(
    z: &[f64],
    labels: &[i64],
    offsets: &[usize],
    ids: &[i64],
) -> (Vec<f32>, Vec<f32>, RefOutput) {
    let zf = to_f32(z);
    let cands = Candidates::Csr { offsets, ids };
    let c = UnlikelihoodConfig::default().with_alpha(1.0);
    let (mut g, mut l) = (vec![0.0; zf.len()], vec![0.0; labels.len()]);
    unlikelihood(LogitsIo::grad(&zf, &mut g), 4, Some(labels), cands, None, &c, &mut l).unwrap();
    let o = unlikelihood_ref(z, 4, Some(labels), cands, None, &c).unwrap();
    (l, g, o)
}

const WZ: [[f64; 4]; 4] =
    [[0.1, 0.2, 1.5, -0.3], [0.4, 1.1, 0.9, 0.0], [-0.2, 0.8, 1.3, 0.5], [0.3, 0.7, 0.6, 1.2]];

#[test]
fn welleck_12_5_sequence() {
    let z: Vec<f64> = WZ.concat();
    let labels = [2, 1, 2, 3];
    // C_0 = {}, C_1 = {2}, C_2 = {1}, C_3 = {1, 2}.
    let (l, g, o) = welleck(&z, &labels, &[0, 0, 1, 2, 4], &[2, 1, 1, 2]);
    let loss = [0.521426, 1.343732, 1.133169, 1.452000];
    let grad = [
        0.146398, 0.161795, -0.406327, 0.098134, 0.103599, -0.791377, 0.618333, 0.069445, //
        0.062401, 0.532280, -0.720340, 0.125659, 0.066208, 0.408956, 0.361991, -0.837155,
    ];
    F32_RUN.assert_all_close("12.5 loss f32", &to_f64(&l), &loss);
    F32_RUN.assert_all_close("12.5 grad f32", &to_f64(&g), &grad);
    F64_6.assert_all_close("12.5 loss f64", &o.loss, &loss);
    F64_6.assert_all_close("12.5 grad f64", &o.grad, &grad);
    assert!((o.sum - 4.450327).abs() < 1e-6);
}

#[test]
fn welleck_12_5_dominant_candidate() {
    let z = [0.0, 20.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0];
    let (l, g, o) = welleck(&z, &[1, 0], &[0, 0, 1], &[1]);
    let grad = [-1.333333329, 1.999999988, -0.333333329, -0.333333329];
    F32_RUN.assert_all_close("W-E1 loss f32", &to_f64(&l[1..]), &[38.901387724]);
    F32_RUN.assert_all_close("W-E1 grad f32", &to_f64(&g[4..]), &grad);
    F64_9.assert_all_close("W-E1 loss f64", &o.loss[1..], &[38.901387724]);
    F64_9.assert_all_close("W-E1 grad f64", &o.grad[4..], &grad);
    assert!(l[0] >= 0.0 && l[0] < 1e-6, "position 0 has loss 6.2e-9");
}

#[test]
fn welleck_12_6_second_row() {
    // Row 1 of §12.6: logits [z_3, z_1, z_2], labels [3, 3, 1]; candidates {}, {}, {3}.
    let z: Vec<f64> = [WZ[3], WZ[1], WZ[2]].concat();
    let (l, g, o) = welleck(&z, &[3, 3, 1], &[0, 0, 0, 1], &[3]);
    let loss = [0.940754, 2.073875, 1.543334];
    let grad = [
        0.158698, 0.236749, 0.214220, -0.609667, 0.187519, 0.377617, 0.309167, -0.874302, //
        0.073863, -0.799219, 0.331032, 0.394323,
    ];
    F32_RUN.assert_all_close("12.6 loss f32", &to_f64(&l), &loss);
    F32_RUN.assert_all_close("12.6 grad f32", &to_f64(&g), &grad);
    F64_6.assert_all_close("12.6 loss f64", &o.loss, &loss);
    F64_6.assert_all_close("12.6 grad f64", &o.grad, &grad);
}

// --------------------------------------------------------------------------------------------
// Token-losses §12.7: sequence-level UL positions (−log(1 − p) on the continuation token).

#[test]
fn sequence_ul_12_7_masked_positions() {
    let tokens = [0usize, 1, 2, 3, 0, 1, 2, 3, 1];
    let probs = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.4];
    let mask = [0, 0, 0, 0, 1, 1, 1, 1, 0];
    let mut z = Vec::new();
    let (mut offsets, mut ids) = (vec![0usize], Vec::new());
    for ((&t, &p), &m) in tokens.iter().zip(&probs).zip(&mask) {
        z.extend((0..4).map(|v| if v == t { f64::ln(p) } else { f64::ln((1.0 - p) / 3.0) }));
        if m == 1 {
            ids.push(t as i64);
        }
        offsets.push(ids.len());
    }
    let zf = to_f32(&z);
    let c = UnlikelihoodConfig::default();
    let cands = Candidates::Csr { offsets: &offsets, ids: &ids };
    let (mut g, mut l) = (vec![0.0; zf.len()], vec![0.0; 9]);
    let stats =
        unlikelihood(LogitsIo::grad(&zf, &mut g), 4, None, cands, None, &c, &mut l).unwrap();
    assert_eq!(stats.count, 4);
    assert!((stats.sum - 13.410045).abs() < 1e-4, "Σ = {}", stats.sum);
    F32_RUN.assert_all_close("t=4 grad", &to_f64(&g[16..20]), &[0.9, -0.3, -0.3, -0.3]);
    let o = unlikelihood_ref(&z, 4, None, cands, None, &c).unwrap();
    assert!((o.sum - 13.410045).abs() < 1e-6);
}
