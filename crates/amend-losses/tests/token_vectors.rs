//! Every test vector of `specs/token-losses.md` §12 as a named test, in f64 and f32, through every
//! gradient path (composite autograd, closed form with injection, and, for f32, the fused kernels
//! of `amend-kernels` with injection).

mod token_support;

use amend_losses::token::*;
use amend_losses::{Error, Reduction, Result};
use amend_testing::{F32, Tol};
use tch::{Kind, Tensor};
use token_support::*;

const PATHS: [TokenBackend; 3] =
    [TokenBackend::Composite, TokenBackend::ClosedForm, TokenBackend::Kernel];
const KINDS: [Kind; 2] = [Kind::Double, Kind::Float];

/// Tolerance for a value printed with `decimals` decimals (spec §12): f64 `1e-8` for 9
/// decimals and `1e-6` for 6–7; f32 relative `1e-5` plus `1e-6` absolute, plus the printed
/// rounding.
fn tol(kind: Kind, decimals: i32) -> Tol {
    let rounding = 0.5 * 10f64.powi(-decimals);
    match kind {
        Kind::Double => Tol { rel: 0.0, abs: if decimals >= 9 { 1e-8 } else { 1e-6 } },
        _ => Tol { rel: F32.rel, abs: F32.abs + rounding },
    }
}

/// Whether `backend` applies to `kind` (the fused kernels run on f32 only).
fn runs(kind: Kind, backend: TokenBackend) -> bool {
    kind == Kind::Float || backend != TokenBackend::Kernel
}

fn for_all(mut f: impl FnMut(Kind, TokenBackend) -> Result<()>) -> Result<()> {
    for kind in KINDS {
        for backend in PATHS.into_iter().filter(|&b| runs(kind, b)) {
            f(kind, backend)?;
        }
    }
    Ok(())
}

/// Which weighted loss a table row is about.
#[derive(Debug, Clone, Copy)]
enum Weighted {
    Tnt(TntVariant),
    Ul,
    Nl,
}

#[allow(clippy::too_many_arguments)]
fn weighted_loss(
    which: Weighted,
    z: &Tensor,
    zo: &Tensor,
    y: &Tensor,
    w: &TokenWeights,
    alpha: f64,
    reduction: Reduction,
    backend: TokenBackend,
) -> Result<amend_losses::LossOutput> {
    match which {
        Weighted::Tnt(v) => tnt_loss(
            z,
            zo,
            y,
            w,
            &TntConfig::new(v).with_alpha(alpha).with_reduction(reduction).with_backend(backend),
        ),
        Weighted::Ul => ul_annotated_loss(
            z,
            y,
            w,
            &UlAnnotatedConfig::default()
                .with_alpha(alpha)
                .with_reduction(reduction)
                .with_backend(backend),
        ),
        Weighted::Nl => nl_loss(
            z,
            y,
            w,
            &NlConfig::default().with_alpha(alpha).with_reduction(reduction).with_backend(backend),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// §12.1 upstream parity (google/t5patches models_test.py)

const PARITY_LABELS: [i64; 8] = [1, 2, 1, 0, 0, 1, 0, 2];
const W_BOTH: [i64; 8] = [1, 1, -1, 0, 1, -1, 1, -1];
const W_FIRST: [i64; 8] = [1, 1, -1, 0, 0, 0, 0, 0];
const W_SECOND: [i64; 8] = [0, 0, 0, 0, 1, -1, 1, -1];

/// (loss, weights, upstream α=1, upstream α=0.5, f64 α=1, f64 α=0.5)
type ParityRow = (Weighted, [i64; 8], [f64; 2], [f64; 2], [f64; 2], [f64; 2]);

const PARITY: [ParityRow; 7] = [
    (
        Weighted::Ul,
        W_BOTH,
        [-2.09588997, -6.190234],
        [-1.9555511, -5.502723],
        [-2.0958899, -6.1902342],
        [-1.9555509, -5.5027230],
    ),
    (
        Weighted::Nl,
        W_BOTH,
        [-0.40760607, -3.0],
        [-1.1114091, -3.9076061],
        [-0.4076060, -3.0000000],
        [-1.1114089, -3.9076060],
    ),
    (
        Weighted::Tnt(TntVariant::Fll),
        W_FIRST,
        [-2.461224, 0.0],
        [-2.1382182, 0.0],
        [-2.4612237, 0.0],
        [-2.1382178, 0.0],
    ),
    (
        Weighted::Tnt(TntVariant::Ff),
        W_SECOND,
        [0.0, -3.9873507],
        [0.0, -2.826071],
        [0.0, -3.9873504],
        [0.0, -2.8260708],
    ),
    (
        Weighted::Tnt(TntVariant::Rr),
        W_BOTH,
        [-2.8245807, -11.3777275],
        [-1.4122901, -5.6888638],
        [-2.8245809, -11.3777289],
        [-1.4122905, -5.6888644],
    ),
    (
        Weighted::Tnt(TntVariant::Rll),
        W_FIRST,
        [-4.639796, 0.0],
        [-3.2275052, 0.0],
        [-4.6397959, 0.0],
        [-3.2275054, 0.0],
    ),
    (
        Weighted::Tnt(TntVariant::Rf),
        W_SECOND,
        [0.0, -13.042522],
        [0.0, -7.3536587],
        [0.0, -13.0425235],
        [0.0, -7.3536591],
    ),
];

fn parity_scores(
    which: Weighted,
    w: &[i64; 8],
    alpha: f64,
    kind: Kind,
    backend: TokenBackend,
) -> Result<Vec<f64>> {
    let z = Tensor::arange(24, (kind, CPU)).reshape([2, 4, 3]);
    let y = ids(&PARITY_LABELS, &[2, 4]);
    let w = TokenWeights::new(&ids(w, &[2, 4]))?;
    let out = weighted_loss(which, &z, &z, &y, &w, alpha, Reduction::PerSequence, backend)?;
    Ok(vals(&out.loss).into_iter().map(|x| -x).collect())
}

#[test]
fn parity_t5patches_f32_matches_upstream() -> Result<()> {
    for (which, w, up1, up05, _, _) in PARITY {
        for backend in PATHS {
            for (alpha, expected) in [(1.0, up1), (0.5, up05)] {
                let got = parity_scores(which, &w, alpha, Kind::Float, backend)?;
                // Relative 1e-5 (absolute 1e-6 where the expected value is 0).
                Tol { rel: 1e-5, abs: 1e-6 }.assert_all_close(
                    &format!("{which:?} α={alpha} {backend:?} f32"),
                    &got,
                    &expected,
                );
            }
        }
    }
    Ok(())
}

#[test]
fn parity_t5patches_f64_matches_spec_formulas() -> Result<()> {
    for (which, w, _, _, f1, f05) in PARITY {
        for backend in PATHS.into_iter().filter(|&b| runs(Kind::Double, b)) {
            for (alpha, expected) in [(1.0, f1), (0.5, f05)] {
                let got = parity_scores(which, &w, alpha, Kind::Double, backend)?;
                tol(Kind::Double, 7).assert_all_close(
                    &format!("{which:?} α={alpha} {backend:?} f64"),
                    &got,
                    &expected,
                );
            }
        }
    }
    Ok(())
}

#[test]
fn parity_tnff_hand_check_second_sequence() -> Result<()> {
    // §12.1 hand check: H(p) twice, CE 0.646012 and 1.676547; sum 3.987350.
    let z = Tensor::arange(24, (Kind::Double, CPU)).reshape([2, 4, 3]);
    let y = ids(&PARITY_LABELS, &[2, 4]);
    let w = TokenWeights::new(&ids(&W_SECOND, &[2, 4]))?;
    let out = tnt_loss(&z, &z, &y, &w, &TntConfig::new(TntVariant::Ff).with_alpha(1.0))?;
    let tok = vals(&out.per_example);
    tol(Kind::Double, 6).assert_all_close(
        "tokens b=1",
        &tok[4..],
        &[0.832396, 0.646012, 0.832396, 1.676547],
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// §12.2 single position, Example A

const ZA: [f64; 4] = [2.0, 1.0, 0.5, -1.0];
const ZOA: [f64; 4] = [1.5, 1.2, 0.3, -0.5];

/// (loss, weight, value, gradient), 9 decimals.
const EXAMPLE_A: [(Weighted, i64, f64, [f64; 4]); 16] = [
    (
        Weighted::Tnt(TntVariant::Ff),
        -1,
        1.092313506,
        [-0.086662112, 0.224207818, -0.073679046, -0.063866660],
    ),
    (
        Weighted::Tnt(TntVariant::Fll),
        -1,
        1.092313506,
        [-0.086662112, 0.224207818, -0.073679046, -0.063866660],
    ),
    (
        Weighted::Tnt(TntVariant::Rr),
        -1,
        2.588033316,
        [-1.658330108, 2.182057600, -0.410820591, -0.112906902],
    ),
    (
        Weighted::Tnt(TntVariant::Rf),
        -1,
        2.588033316,
        [-1.658330108, 2.182057600, -0.410820591, -0.112906902],
    ),
    (
        Weighted::Tnt(TntVariant::Rll),
        -1,
        2.588033316,
        [-1.658330108, 2.182057600, -0.410820591, -0.112906902],
    ),
    (Weighted::Ul, -1, 0.253870601, [-0.176136997, 0.224207818, -0.039301476, -0.008769345]),
    (Weighted::Nl, -1, -1.495181898, [-0.609460038, 0.775792182, -0.135988916, -0.030343229]),
    (
        Weighted::Tnt(TntVariant::Ff),
        1,
        1.229384973,
        [0.150185668, -0.116031003, -0.002341866, -0.031812798],
    ),
    (
        Weighted::Tnt(TntVariant::Rr),
        1,
        0.054840761,
        [0.139009702, -0.105806832, -0.009780105, -0.023422765],
    ),
    (
        Weighted::Tnt(TntVariant::Rf),
        1,
        1.229387536,
        [0.150186505, -0.116030642, -0.002342313, -0.031813550],
    ),
    (
        Weighted::Tnt(TntVariant::Fll),
        1,
        1.495181898,
        [0.609460038, -0.775792182, 0.135988916, 0.030343229],
    ),
    (Weighted::Ul, 1, 1.495181898, [0.609460038, -0.775792182, 0.135988916, 0.030343229]),
    (Weighted::Nl, 1, 1.495181898, [0.609460038, -0.775792182, 0.135988916, 0.030343229]),
    (
        Weighted::Tnt(TntVariant::Rll),
        1,
        1.495183398,
        [0.609459038, -0.775789182, 0.135987916, 0.030342229],
    ),
    // Sanity: an inactive position is 0 for every loss (checked again in E3).
    (Weighted::Tnt(TntVariant::Ff), 0, 0.0, [0.0; 4]),
    (Weighted::Ul, 0, 0.0, [0.0; 4]),
];

fn example_a(
    which: Weighted,
    w: i64,
    kind: Kind,
    backend: TokenBackend,
    z: &[f64],
    zo: &[f64],
    y: i64,
) -> Result<(f64, Vec<f64>)> {
    let v = z.len() as i64;
    let zt = tensor(z, &[1, 1, v], kind);
    let zot = tensor(zo, &[1, 1, v], kind);
    let yt = ids(&[y], &[1, 1]);
    let wt = TokenWeights::new(&ids(&[w], &[1, 1]))?;
    let (out, g) = loss_and_grad(&zt, |z| {
        weighted_loss(which, z, &zot, &yt, &wt, 1.0, Reduction::Sum, backend)
    })?;
    Ok((scalar(&out.loss), g))
}

#[test]
fn example_a_values_and_gradients() -> Result<()> {
    for_all(|kind, backend| {
        for (which, w, value, grad) in EXAMPLE_A {
            let (v, g) = example_a(which, w, kind, backend, &ZA, &ZOA, 1)?;
            let what = format!("{which:?} w={w} {kind:?} {backend:?}");
            tol(kind, 9).assert_all_close(&what, &[v], &[value]);
            tol(kind, 9).assert_all_close(&format!("{what} grad"), &g, &grad);
        }
        Ok(())
    })
}

#[test]
fn example_a_tnrf_positive_is_ce_to_smoothed_reference() -> Result<()> {
    // TNRF⁺ = CE(z; S_ε(p°)) = H(S_ε(p°)) + KL: close to TNFF⁺ (1.229384973) but not equal.
    let (v, _) = example_a(
        Weighted::Tnt(TntVariant::Rf),
        1,
        Kind::Double,
        TokenBackend::Composite,
        &ZA,
        &ZOA,
        1,
    )?;
    assert!((v - 1.229387536).abs() < 1e-8 && (v - 1.229384973).abs() > 1e-6);
    Ok(())
}

fn ref_kl(
    kind: Kind,
    backend: TokenBackend,
    exclude: Option<i64>,
    cfg: RefKlConfig,
) -> Result<(f64, Vec<f64>)> {
    let z = tensor(&ZA, &[1, 1, 4], kind);
    let zo = tensor(&ZOA, &[1, 1, 4], kind);
    let ex = exclude.map(|e| ids(&[e], &[1, 1]));
    let cfg = cfg.with_backend(backend);
    let (out, g) = loss_and_grad(&z, |z| reference_kl_loss(z, &zo, ex.as_ref(), None, &cfg))?;
    Ok((scalar(&out.loss), g))
}

#[test]
fn example_a_reference_kl_reproduces_tnt_terms() -> Result<()> {
    for_all(|kind, backend| {
        let t = tol(kind, 9);
        let fwd = RefKlConfig::default();
        let (v, g) = ref_kl(kind, backend, None, fwd.clone())?;
        t.assert_all_close("forward KL(p°‖p)", &[v], &[0.058896843]);
        t.assert_all_close(
            "forward grad",
            &g,
            &[0.150185668, -0.116031003, -0.002341866, -0.031812798],
        );
        let (v, _) = ref_kl(kind, backend, None, fwd.clone().with_value(KlValue::CrossEntropy))?;
        t.assert_all_close("forward CE = TNFF⁺", &[v], &[1.229384973]);
        let (v, g) = ref_kl(kind, backend, Some(1), fwd.clone())?;
        t.assert_all_close("forward exclude, KL form", &[v], &[0.290062043]);
        t.assert_all_close(
            "forward exclude grad",
            &g,
            &[-0.086662112, 0.224207818, -0.073679046, -0.063866660],
        );
        let (v, _) = ref_kl(kind, backend, Some(1), fwd.clone().with_value(KlValue::CrossEntropy))?;
        t.assert_all_close("forward exclude, CE form", &[v], &[1.092313506]);
        let rev = RefKlConfig::default().with_direction(KlDirection::Reverse);
        let (v, g) = ref_kl(kind, backend, None, rev.clone())?;
        t.assert_all_close("reverse KL(p‖p°)", &[v], &[0.054840218]);
        t.assert_all_close(
            "reverse grad",
            &g,
            &[0.139008922, -0.105806948, -0.009779592, -0.023422382],
        );
        let (v, g) = ref_kl(kind, backend, Some(1), rev.with_smoothing_eps(1e-6))?;
        t.assert_all_close("reverse exclude ε=1e-6 = TNRR⁻", &[v], &[2.588033316]);
        t.assert_all_close(
            "reverse exclude grad",
            &g,
            &[-1.658330108, 2.182057600, -0.410820591, -0.112906902],
        );
        Ok(())
    })
}

#[test]
fn example_a_nll_matches_positive_terms() -> Result<()> {
    for_all(|kind, backend| {
        let z = tensor(&ZA, &[1, 1, 4], kind);
        let y = ids(&[1], &[1, 1]);
        let cfg = NllConfig::default().with_backend(backend);
        let (out, g) = loss_and_grad(&z, |z| nll_loss(z, &y, None, &cfg))?;
        tol(kind, 9).assert_all_close("nll", &[scalar(&out.loss)], &[1.495181898]);
        tol(kind, 9).assert_all_close(
            "nll grad",
            &g,
            &[0.609460038, -0.775792182, 0.135988916, 0.030343229],
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// §12.3 batch with masks and reductions (B=2, T=3, V=4, α=2)

const BZ: [f64; 24] = [
    1.0, 0.0, -1.0, 0.5, 0.2, 1.4, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, //
    2.0, -1.0, 0.3, 0.1, -0.5, 0.5, 1.5, 0.0, 0.7, 0.7, -2.0, 1.0,
];
const BZO: [f64; 24] = [
    0.8, 0.1, -0.9, 0.4, 0.0, 1.0, 0.0, 0.0, 0.3, -0.3, 0.1, 0.0, //
    1.5, -0.5, 0.0, 0.0, -0.2, 0.9, 1.0, 0.1, 0.5, 0.5, -1.0, 1.5,
];
const BY: [i64; 6] = [0, 1, 3, 0, 2, 3];
const BW: [i64; 6] = [1, -1, 0, -1, 1, 1];

/// (loss, token losses, score, Sum, Mean)
type BatchRow = (Weighted, [f64; 6], [f64; 2], f64, f64);

const BATCH: [BatchRow; 7] = [
    (
        Weighted::Tnt(TntVariant::Ff),
        [1.256066, 3.963458, 0.0, 4.805592, 1.356341, 1.185670],
        [-5.219524, -7.347603],
        12.567127,
        2.513425,
    ),
    (
        Weighted::Tnt(TntVariant::Rr),
        [0.007369, 14.622355, 0.0, 18.834680, 0.082287, 0.068744],
        [-14.629724, -18.985712],
        33.615436,
        6.723087,
    ),
    (
        Weighted::Tnt(TntVariant::Rf),
        [1.256067, 14.622355, 0.0, 18.834680, 1.356342, 1.185673],
        [-15.878423, -21.376695],
        37.255118,
        7.451024,
    ),
    (
        Weighted::Tnt(TntVariant::Fll),
        [0.746567, 3.963458, 0.0, 4.805592, 0.546006, 0.928782],
        [-4.710025, -6.280380],
        10.990406,
        2.198081,
    ),
    (
        Weighted::Tnt(TntVariant::Rll),
        [0.746571, 14.622355, 0.0, 18.834680, 0.546011, 0.928785],
        [-15.368926, -20.309477],
        35.678403,
        7.135681,
    ),
    (
        Weighted::Ul,
        [0.746567, 1.724913, 0.0, 2.571584, 0.546006, 0.928782],
        [-2.471480, -4.046372],
        6.517853,
        1.303571,
    ),
    (
        Weighted::Nl,
        [0.746567, -1.096792, 0.0, -0.647120, 0.546006, 0.928782],
        [0.350224, -0.827668],
        0.477444,
        0.095489,
    ),
];

// Gradient rows of `Sum` at positions (0,0), (0,1), (1,0), (1,1), (1,2); (0,2) is 0.
const G_TNFF: [[f64; 4]; 5] = [
    [0.048384, -0.036978, -0.013604, 0.002197],
    [-0.318561, 1.155752, -0.455530, -0.381662],
    [1.447137, -0.393344, -0.502935, -0.550857],
    [-0.036891, -0.133239, 0.196498, -0.026369],
    [0.090278, 0.090278, -0.025488, -0.155068],
];
const G_TNRR: [[f64; 4]; 5] = [
    [0.047544, -0.034821, -0.012811, 0.000088],
    [-2.771257, 6.883592, -1.786421, -2.325914],
    [5.896525, -0.812917, -2.771339, -2.312269],
    [-0.036685, -0.121028, 0.192345, -0.034633],
    [0.087831, 0.087831, -0.017699, -0.157963],
];
const G_UL: [[f64; 4]; 5] = [
    [-0.526009, 0.174371, 0.064148, 0.287490],
    [-0.476547, 1.155752, -0.289041, -0.390164],
    [1.447137, -0.188590, -0.691992, -0.566555],
    [0.078394, 0.213097, -0.420741, 0.129250],
    [0.292649, 0.292649, 0.019668, -0.604965],
];
const G_TNRF_POS: [[f64; 4]; 3] = [
    [0.048385, -0.036979, -0.013604, 0.002198],
    [-0.036892, -0.133238, 0.196499, -0.026369],
    [0.090277, 0.090277, -0.025488, -0.155066],
];
const G_TNRLL_POS: [[f64; 4]; 3] = [
    [-0.526006, 0.174370, 0.064147, 0.287489],
    [0.078393, 0.213096, -0.420738, 0.129249],
    [0.292648, 0.292648, 0.019667, -0.604962],
];
const G_NL_NEG: [[f64; 4]; 2] =
    [[-0.348106, 0.844248, -0.211137, -0.285005], [0.552863, -0.072049, -0.264368, -0.216446]];

/// Expected `Sum` gradient `[6 × 4]` of `which` on the §12.3 batch.
fn batch_grad(which: Weighted) -> Vec<f64> {
    // positions in order (0,0), (0,1), (0,2), (1,0), (1,1), (1,2)
    let rows: [[f64; 4]; 6] = match which {
        Weighted::Tnt(TntVariant::Ff) => spread(G_TNFF),
        Weighted::Tnt(TntVariant::Rr) => spread(G_TNRR),
        Weighted::Ul => spread(G_UL),
        Weighted::Tnt(TntVariant::Rf) => {
            let r = G_TNRR;
            [G_TNRF_POS[0], r[1], [0.0; 4], r[2], G_TNRF_POS[1], G_TNRF_POS[2]]
        }
        Weighted::Tnt(TntVariant::Fll) => {
            [G_UL[0], G_TNFF[1], [0.0; 4], G_TNFF[2], G_UL[3], G_UL[4]]
        }
        Weighted::Tnt(TntVariant::Rll) => {
            let r = G_TNRR;
            [G_TNRLL_POS[0], r[1], [0.0; 4], r[2], G_TNRLL_POS[1], G_TNRLL_POS[2]]
        }
        Weighted::Nl => [G_UL[0], G_NL_NEG[0], [0.0; 4], G_NL_NEG[1], G_UL[3], G_UL[4]],
        Weighted::Tnt(_) => unreachable!("all variants covered"),
    };
    rows.concat()
}

fn spread(g: [[f64; 4]; 5]) -> [[f64; 4]; 6] {
    [g[0], g[1], [0.0; 4], g[2], g[3], g[4]]
}

fn batch_inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
    (tensor(&BZ, &[2, 3, 4], kind), tensor(&BZO, &[2, 3, 4], kind), ids(&BY, &[2, 3]))
}

#[test]
fn batch_token_losses_scores_and_reductions() -> Result<()> {
    for_all(|kind, backend| {
        let (z, zo, y) = batch_inputs(kind);
        let w = TokenWeights::new(&ids(&BW, &[2, 3]))?;
        let t = tol(kind, 6);
        for (which, tokens, score, sum, mean) in BATCH {
            let what = format!("{which:?} {kind:?} {backend:?}");
            let none = weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::None, backend)?;
            t.assert_all_close(&format!("{what} tokens"), &vals(&none.loss), &tokens);
            t.assert_all_close(&format!("{what} per_example"), &vals(&none.per_example), &tokens);
            let per_seq =
                weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::PerSequence, backend)?;
            let neg: Vec<f64> = vals(&per_seq.loss).into_iter().map(|x| -x).collect();
            t.assert_all_close(&format!("{what} score"), &neg, &score);
            let s = weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::Sum, backend)?;
            t.assert_all_close(&format!("{what} Sum"), &[scalar(&s.loss)], &[sum]);
            t.assert_all_close(&format!("{what} part sum"), &[scalar(&s.parts[0].sum)], &[sum]);
            assert_eq!(s.count(), 5.0, "{what} count");
            let m = weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::Mean, backend)?;
            t.assert_all_close(&format!("{what} Mean"), &[scalar(&m.loss)], &[mean]);
            let bm = weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::BatchMean, backend)?;
            t.assert_all_close(&format!("{what} BatchMean"), &[scalar(&bm.loss)], &[sum / 2.0]);
        }
        // PerSequence counts [2, 3] depend only on the weights.
        let per_seq_counts = vals(&w.active_mask()?.sum_dim_intlist(1, false, Kind::Int64));
        assert_eq!(per_seq_counts, [2.0, 3.0]);
        Ok(())
    })
}

#[test]
fn batch_sum_gradients() -> Result<()> {
    for_all(|kind, backend| {
        let (z, zo, y) = batch_inputs(kind);
        let w = TokenWeights::new(&ids(&BW, &[2, 3]))?;
        for (which, ..) in BATCH {
            let (_, g) = loss_and_grad(&z, |z| {
                weighted_loss(which, z, &zo, &y, &w, 2.0, Reduction::Sum, backend)
            })?;
            tol(kind, 6).assert_all_close(
                &format!("{which:?} {kind:?} {backend:?} grad"),
                &g,
                &batch_grad(which),
            );
            // Mean divides the gradient by the count (5).
            let (_, gm) = loss_and_grad(&z, |z| {
                weighted_loss(which, z, &zo, &y, &w, 2.0, Reduction::Mean, backend)
            })?;
            let expected: Vec<f64> = batch_grad(which).iter().map(|x| x / 5.0).collect();
            tol(kind, 6).assert_all_close(&format!("{which:?} Mean grad"), &gm, &expected);
        }
        Ok(())
    })
}

#[test]
fn batch_nll_with_mask_of_active_weights() -> Result<()> {
    for_all(|kind, backend| {
        let (z, _, y) = batch_inputs(kind);
        let mask = ids(&BW, &[2, 3]).ne(0);
        let cfg = NllConfig::default().with_backend(backend);
        let none = nll_loss(&z, &y, Some(&mask), &cfg.clone().with_reduction(Reduction::None))?;
        let t = tol(kind, 6);
        t.assert_all_close(
            "nll tokens",
            &vals(&none.loss),
            &[0.746567, 0.548396, 0.0, 0.323560, 0.546006, 0.928782],
        );
        let s = nll_loss(&z, &y, Some(&mask), &cfg.clone().with_reduction(Reduction::Sum))?;
        t.assert_all_close("nll Sum", &[scalar(&s.loss)], &[3.093311]);
        let (m, g) = loss_and_grad(&z, |z| nll_loss(z, &y, Some(&mask), &cfg))?;
        t.assert_all_close("nll Mean", &[scalar(&m.loss)], &[0.618662]);
        let mut expected = batch_grad(Weighted::Ul);
        expected[4..8].copy_from_slice(&[0.174053, -0.422124, 0.105568, 0.142502]);
        expected[12..16].copy_from_slice(&[-0.276432, 0.036024, 0.132184, 0.108223]);
        let expected: Vec<f64> = expected.iter().map(|x| x / 5.0).collect();
        t.assert_all_close("nll Mean grad", &g, &expected);
        Ok(())
    })
}

#[test]
fn t_mask_garbage_at_inactive_position_changes_nothing() -> Result<()> {
    let garbage = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::NAN];
    for_all(|kind, backend| {
        let mut bz = BZ;
        let mut bzo = BZO;
        bz[8..12].copy_from_slice(&garbage);
        bzo[8..12].copy_from_slice(&garbage);
        let mut by = BY;
        by[2] = 999;
        let z = tensor(&bz, &[2, 3, 4], kind);
        let zo = tensor(&bzo, &[2, 3, 4], kind);
        let y = ids(&by, &[2, 3]);
        let w = TokenWeights::new(&ids(&BW, &[2, 3]))?;
        for (which, tokens, _, sum, _) in BATCH {
            let what = format!("T-MASK {which:?} {kind:?} {backend:?}");
            let none = weighted_loss(which, &z, &zo, &y, &w, 2.0, Reduction::None, backend)?;
            tol(kind, 6).assert_all_close(&what, &vals(&none.loss), &tokens);
            let (s, g) = loss_and_grad(&z, |z| {
                weighted_loss(which, z, &zo, &y, &w, 2.0, Reduction::Sum, backend)
            })?;
            tol(kind, 6).assert_all_close(&what, &[scalar(&s.loss)], &[sum]);
            assert!(
                g[8..12].iter().all(|&x| x == 0.0),
                "{what}: gradient at (0,2) is {:?}",
                &g[8..12]
            );
            tol(kind, 6).assert_all_close(&format!("{what} grad"), &g, &batch_grad(which));
            for (name, m) in s.metrics.iter() {
                assert!(m.sum.is_finite(), "{what}: metric {name} = {m:?}");
            }
        }
        // NLL with the same mask, and the reference KL.
        let mask = ids(&BW, &[2, 3]).ne(0);
        let (s, g) = loss_and_grad(&z, |z| {
            nll_loss(z, &y, Some(&mask), &NllConfig::default().with_backend(backend))
        })?;
        tol(kind, 6).assert_all_close("T-MASK nll", &[scalar(&s.loss)], &[0.618662]);
        assert!(g[8..12].iter().all(|&x| x == 0.0));
        let (s, g) = loss_and_grad(&z, |z| {
            reference_kl_loss(
                z,
                &zo,
                None,
                Some(&mask),
                &RefKlConfig::default().with_backend(backend),
            )
        })?;
        assert!(scalar(&s.loss).is_finite());
        assert!(g.iter().all(|x| x.is_finite()) && g[8..12].iter().all(|&x| x == 0.0));
        Ok(())
    })
}

#[test]
fn t_sumcount_micro_batches_reproduce_the_global_mean() -> Result<()> {
    for_all(|kind, backend| {
        let (z, zo, y) = batch_inputs(kind);
        let cfg = TntConfig::new(TntVariant::Ff).with_alpha(2.0).with_backend(backend);
        let w = TokenWeights::new(&ids(&BW, &[2, 3]))?;
        let full = tnt_loss(&z, &zo, &y, &w, &cfg)?;
        let t = tol(kind, 6);
        t.assert_all_close(
            "(sum, count)",
            &[scalar(&full.parts[0].sum), full.count()],
            &[12.567127, 5.0],
        );
        let leaf = z.copy().set_requires_grad(true);
        let mut counts = Vec::new();
        let mut parts = Vec::new();
        for b in 0..2 {
            let zb = leaf.narrow(0, b, 1);
            let wb = TokenWeights::new(&ids(&BW, &[2, 3]).narrow(0, b, 1))?;
            // The count is known before the forward pass.
            counts.push(count_active_weighted(&wb));
            parts.push(tnt_loss(&zb, &zo.narrow(0, b, 1), &y.narrow(0, b, 1), &wb, &cfg)?);
        }
        assert_eq!(counts, [2.0, 3.0]);
        t.assert_all_close(
            "micro-batch sums",
            &[scalar(&parts[0].parts[0].sum), scalar(&parts[1].parts[0].sum)],
            &[5.219524, 7.347603],
        );
        let total: f64 = counts.iter().sum();
        let mut mean = 0.0;
        for p in &parts {
            let l = p.normalized_by(&[total])?;
            mean += scalar(&l);
            l.backward();
        }
        t.assert_all_close("accumulated mean", &[mean], &[2.513425]);
        let expected: Vec<f64> =
            batch_grad(Weighted::Tnt(TntVariant::Ff)).iter().map(|x| x / 5.0).collect();
        t.assert_all_close("accumulated gradient", &vals(&leaf.grad()), &expected);
        Ok(())
    })
}

#[test]
fn t_weight_rejects_invalid_values_with_value_and_index() -> Result<()> {
    for (bad, value) in [(5.0, 5.0), (-0.5, -0.5), (2.0, 2.0), (f64::NAN, f64::NAN)] {
        let w = Tensor::from_slice(&[1.0, 0.0, -1.0, bad, 1.0, bad]).reshape([2, 3]);
        match TokenWeights::new(&w) {
            Err(Error::InvalidTokenWeight { value: v, index, count }) => {
                assert!(v == value || (v.is_nan() && value.is_nan()), "value {v}");
                assert_eq!(index, [1, 0]);
                assert_eq!(count, 2);
            }
            other => panic!("expected InvalidTokenWeight for {bad}, got {other:?}"),
        }
    }
    let err = TokenWeights::new(&ids(&[1, 5, 0, 0], &[2, 2])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token weights must be -1, 0 or +1; found 5 at [0, 1] (1 invalid entries)"
    );
    // Integer, float and bool weight tensors are all accepted.
    for w in [
        ids(&BW, &[2, 3]),
        ids(&BW, &[2, 3]).to_kind(Kind::Int8),
        ids(&BW, &[2, 3]).to_kind(Kind::Float),
        ids(&BW, &[2, 3]).to_kind(Kind::Double),
    ] {
        let w = TokenWeights::new(&w)?;
        assert_eq!((w.num_negative(), w.num_positive()), (2, 3));
    }
    let w = TokenWeights::new(&Tensor::from_slice(&[true, false]).reshape([1, 2]))?;
    assert_eq!((w.num_negative(), w.num_positive()), (0, 1));
    // Unsigned bytes: 255 is not −1.
    assert!(TokenWeights::new(&ids(&[255, 1], &[1, 2]).to_kind(Kind::Uint8)).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// §12.4 edge cases

#[test]
fn e1_saturated_negative_token() -> Result<()> {
    let z = [0.0, 20.0, 0.0, 0.0];
    let zo = [0.5, 1.0, 0.2, -0.3];
    for_all(|kind, backend| {
        let what = format!("E1 {kind:?} {backend:?}");
        let t = tol(kind, 9);
        let (v, g) = example_a(Weighted::Tnt(TntVariant::Ff), -1, kind, backend, &z, &zo, 1)?;
        t.assert_all_close(&format!("{what} TNFF⁻"), &[v], &[20.000000006]);
        t.assert_all_close(
            &format!("{what} TNFF⁻ grad"),
            &g,
            &[-0.456590316, 0.999999994, -0.338250425, -0.205159253],
        );
        let (v, g) = example_a(Weighted::Tnt(TntVariant::Rr), -1, kind, backend, &z, &zo, 1)?;
        t.assert_all_close(&format!("{what} TNRR⁻"), &[v], &[13.815514350]);
        if kind == Kind::Double {
            Tol { rel: 1e-3, abs: 0.0 }.assert_all_close(
                &format!("{what} TNRR⁻ vanishing grad"),
                &g,
                &[-6.81e-8, 2.02e-7, -6.75e-8, -6.64e-8],
            );
        } else {
            assert!(g.iter().all(|x| x.abs() <= 1e-6), "{what} TNRR⁻ grad {g:?}");
        }
        let (v, g) = example_a(Weighted::Ul, -1, kind, backend, &z, &zo, 1)?;
        t.assert_all_close(&format!("{what} UL⁻"), &[v], &[18.901387718]);
        t.assert_all_close(
            &format!("{what} UL⁻ grad"),
            &g,
            &[-0.333333331, 0.999999994, -0.333333331, -0.333333331],
        );
        let (v, g) = example_a(Weighted::Nl, -1, kind, backend, &z, &zo, 1)?;
        // log p_y = −log(1 + 3e⁻²⁰) = −6.1835e-9 (0 in f32, within the f32 tolerance).
        let nl_tol = if kind == Kind::Double { Tol { rel: 0.0, abs: 1e-12 } } else { t };
        nl_tol.assert_all_close(&format!("{what} NL⁻"), &[v], &[-3.0 * (-20f64).exp()]);
        assert!(g.iter().all(|x| x.abs() < 1e-7), "{what} NL⁻ grad {g:?}");
        Ok(())
    })
}

#[test]
fn e2_saturated_reference_on_negative_token() -> Result<()> {
    let z = [0.0; 4];
    for_all(|kind, backend| {
        // f32 underflows exp(−120); f64 needs 800 for the same underflow.
        let big = if kind == Kind::Double { 800.0 } else { 120.0 };
        let zo = [0.0, big, 0.0, 0.0];
        let what = format!("E2 {kind:?} {backend:?}");
        let t = tol(kind, 9);
        for v in [TntVariant::Ff, TntVariant::Fll] {
            let (val, g) = example_a(Weighted::Tnt(v), -1, kind, backend, &z, &zo, 1)?;
            t.assert_all_close(&format!("{what} {v}⁻"), &[val], &[4f64.ln()]);
            t.assert_all_close(
                &format!("{what} {v}⁻ grad"),
                &g,
                &[-0.083333333, 0.25, -0.083333333, -0.083333333],
            );
        }
        let (val, g) = example_a(Weighted::Tnt(TntVariant::Rr), -1, kind, backend, &z, &zo, 1)?;
        t.assert_all_close(&format!("{what} TNRR⁻"), &[val], &[2.891544245]);
        t.assert_all_close(
            &format!("{what} TNRR⁻ grad"),
            &g,
            &[-0.794806329, 2.384418988, -0.794806329, -0.794806329],
        );
        Ok(())
    })
}

#[test]
fn e3_all_weights_zero_or_empty_batch_gives_zero_loss_grad_and_count() -> Result<()> {
    for_all(|kind, backend| {
        for (b, t) in [(2, 3), (0, 3), (2, 0)] {
            let n = (b * t) as usize;
            let z = tensor(&vec![0.5; n * 4], &[b, t, 4], kind);
            let zo = tensor(&vec![0.1; n * 4], &[b, t, 4], kind);
            let y = ids(&vec![1; n], &[b, t]);
            let w = TokenWeights::new(&ids(&vec![0; n], &[b, t]))?;
            for reduction in [
                Reduction::None,
                Reduction::PerSequence,
                Reduction::Sum,
                Reduction::Mean,
                Reduction::BatchMean,
            ] {
                for which in [
                    Weighted::Tnt(TntVariant::Ff),
                    Weighted::Tnt(TntVariant::Rr),
                    Weighted::Tnt(TntVariant::Rf),
                    Weighted::Tnt(TntVariant::Fll),
                    Weighted::Tnt(TntVariant::Rll),
                    Weighted::Ul,
                    Weighted::Nl,
                ] {
                    let (out, g) = loss_and_grad(&z, |z| {
                        weighted_loss(which, z, &zo, &y, &w, 1.0, reduction, backend)
                    })?;
                    let what = format!("E3 [{b},{t}] {which:?} {reduction:?} {kind:?} {backend:?}");
                    assert!(vals(&out.loss).iter().all(|&x| x == 0.0), "{what}: loss");
                    assert!(g.iter().all(|&x| x == 0.0), "{what}: grad");
                    assert_eq!(out.count(), 0.0, "{what}: count");
                }
            }
            // The other families on fully masked input.
            let mask = ids(&vec![0; n], &[b, t]).ne(0);
            let (out, g) = loss_and_grad(&z, |z| {
                nll_loss(z, &y, Some(&mask), &NllConfig::default().with_backend(backend))
            })?;
            assert!(scalar(&out.loss) == 0.0 && g.iter().all(|&x| x == 0.0) && out.count() == 0.0);
            let (out, g) = loss_and_grad(&z, |z| {
                welleck_ul_loss(
                    z,
                    &y,
                    Some(&mask),
                    Candidates::PreviousContext,
                    &WelleckUlConfig::default().with_backend(backend),
                )
            })?;
            assert!(scalar(&out.loss) == 0.0 && g.iter().all(|&x| x == 0.0) && out.count() == 0.0);
            let (out, g) = loss_and_grad(&z, |z| {
                reference_kl_loss(
                    z,
                    &zo,
                    None,
                    Some(&mask),
                    &RefKlConfig::default().with_backend(backend),
                )
            })?;
            assert!(scalar(&out.loss) == 0.0 && g.iter().all(|&x| x == 0.0) && out.count() == 0.0);
            let (out, g) = loss_and_grad(&z, |z| {
                sequence_ul_loss(
                    z,
                    &y,
                    Some(&mask),
                    SeqUlMask::RepeatNgram,
                    &SequenceUlConfig::default().with_backend(backend),
                )
            })?;
            assert!(scalar(&out.loss) == 0.0 && g.iter().all(|&x| x == 0.0) && out.count() == 0.0);
        }
        Ok(())
    })
}

#[test]
fn e4_nl_threshold_cases() -> Result<()> {
    for_all(|kind, backend| {
        let t = tol(kind, 9);
        let run =
            |z: &[f64], w: i64, alpha: f64, threshold: Option<f64>| -> Result<(f64, Vec<f64>)> {
                let zt = tensor(z, &[1, 1, 4], kind);
                let y = ids(&[1], &[1, 1]);
                let w = TokenWeights::new(&ids(&[w], &[1, 1]))?;
                let cfg = NlConfig::default()
                    .with_alpha(alpha)
                    .with_threshold(threshold)
                    .with_backend(backend);
                let (out, g) = loss_and_grad(&zt, |z| nl_loss(z, &y, &w, &cfg))?;
                Ok((scalar(&out.loss), g))
            };
        let z12 = [12.0, 0.0, 0.0, 0.0];
        let (v, g) = run(&z12, 1, 1.0, Some(-10.3))?;
        t.assert_all_close("E4 w=+1 uncapped", &[v], &[12.000018432]);
        t.assert_all_close(
            "E4 w=+1 grad",
            &g,
            &[0.999981568, -0.999993856, 0.000006144, 0.000006144],
        );
        let (v, g) = run(&z12, -1, 1.0, Some(-10.3))?;
        t.assert_all_close("E4 w=-1 floored", &[v], &[-10.3]);
        assert!(g.iter().all(|&x| x == 0.0), "floored gradient {g:?}");
        let (v, g) = run(&z12, -1, 1.0, None)?;
        t.assert_all_close("E4 w=-1 no floor", &[v], &[-12.000018432]);
        t.assert_all_close(
            "E4 w=-1 no floor grad",
            &g,
            &[-0.999981568, 0.999993856, -0.000006144, -0.000006144],
        );
        let (v, g) = run(&z12, -1, 2.0, Some(-10.3))?;
        t.assert_all_close("E4 α=2", &[v], &[-20.6]);
        assert!(g.iter().all(|&x| x == 0.0));
        let (v, g) = run(&[10.0, 0.0, 0.0, 0.0], -1, 1.0, Some(-10.3))?;
        t.assert_all_close("E4 above floor", &[v], &[-10.000136191]);
        t.assert_all_close(
            "E4 above floor grad",
            &g,
            &[-0.999863819, 0.999954606, -0.000045394, -0.000045394],
        );
        Ok(())
    })
}

#[test]
fn e5_minus_infinity_column_leaves_every_loss_unchanged() -> Result<()> {
    let z5 = [2.0, 1.0, f64::NEG_INFINITY, 0.5, -1.0];
    for_all(|kind, backend| {
        for zo2 in [f64::NEG_INFINITY, 3.0, -7.0] {
            let zo5 = [1.5, 1.2, zo2, 0.3, -0.5];
            for (which, w, value, grad) in EXAMPLE_A {
                let (v, g) = example_a(which, w, kind, backend, &z5, &zo5, 1)?;
                let what = format!("E5 z°₂={zo2} {which:?} w={w} {kind:?} {backend:?}");
                tol(kind, 9).assert_all_close(&what, &[v], &[value]);
                let expected = [grad[0], grad[1], 0.0, grad[2], grad[3]];
                tol(kind, 9).assert_all_close(&format!("{what} grad"), &g, &expected);
                assert_eq!(g[2], 0.0, "{what}: gradient of the −inf column");
            }
        }
        Ok(())
    })
}

#[test]
fn e5_label_outside_the_support_gives_infinite_positive_loss() -> Result<()> {
    let z = [2.0, f64::NEG_INFINITY, 0.5, -1.0];
    for (which, w) in [
        (Weighted::Tnt(TntVariant::Fll), 1),
        (Weighted::Tnt(TntVariant::Rll), 1),
        (Weighted::Nl, 1),
    ] {
        let (v, _) = example_a(which, w, Kind::Double, TokenBackend::Composite, &z, &ZOA, 1)?;
        assert_eq!(v, f64::INFINITY, "{which:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// §12.5, §12.6 Welleck token-level unlikelihood

const WZ: [f64; 16] =
    [0.1, 0.2, 1.5, -0.3, 0.4, 1.1, 0.9, 0.0, -0.2, 0.8, 1.3, 0.5, 0.3, 0.7, 0.6, 1.2];
const WX: [i64; 4] = [2, 1, 2, 3];

#[test]
fn welleck_single_sequence() -> Result<()> {
    for_all(|kind, backend| {
        let z = tensor(&WZ, &[1, 4, 4], kind);
        let x = ids(&WX, &[1, 4]);
        let cfg = WelleckUlConfig::default().with_backend(backend);
        let t = tol(kind, 6);
        let none = welleck_ul_loss(
            &z,
            &x,
            None,
            Candidates::PreviousContext,
            &cfg.clone().with_reduction(Reduction::None),
        )?;
        t.assert_all_close(
            "token losses",
            &vals(&none.loss),
            &[0.521426, 1.343732, 1.133169, 1.452000],
        );
        t.assert_all_close("ul/nll", &[none.metrics.get("ul/nll").unwrap().sum], &[3.259787]);
        t.assert_all_close(
            "ul/candidate_penalty",
            &[none.metrics.get("ul/candidate_penalty").unwrap().sum],
            &[1.190540],
        );
        assert_eq!(none.metrics.get("ul/num_candidates").unwrap().sum, 4.0);
        let (s, g) = loss_and_grad(&z, |z| {
            welleck_ul_loss(
                z,
                &x,
                None,
                Candidates::PreviousContext,
                &cfg.clone().with_reduction(Reduction::Sum),
            )
        })?;
        t.assert_all_close("Sum", &[scalar(&s.loss)], &[4.450327]);
        t.assert_all_close(
            "Sum grad",
            &g,
            &[
                0.146398, 0.161795, -0.406327, 0.098134, //
                0.103599, -0.791377, 0.618333, 0.069445, //
                0.062401, 0.532280, -0.720340, 0.125659, //
                0.066208, 0.408956, 0.361991, -0.837155,
            ],
        );
        let m = welleck_ul_loss(&z, &x, None, Candidates::PreviousContext, &cfg)?;
        t.assert_all_close("Mean (fairseq)", &[scalar(&m.loss)], &[1.112582]);
        assert_eq!(m.count(), 4.0);
        // Explicit candidates equal to the previous-context sets give the same loss.
        let c = ids(&[-1, -1, 2, -1, 1, -1, 1, 2], &[1, 4, 2]);
        let e = welleck_ul_loss(&z, &x, None, Candidates::Explicit(&c), &cfg)?;
        t.assert_all_close("explicit", &[scalar(&e.loss)], &[1.112582]);
        Ok(())
    })
}

#[test]
fn welleck_w_e1_dominant_candidate() -> Result<()> {
    for_all(|kind, backend| {
        let z = tensor(&[0.0, 20.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0], &[1, 2, 4], kind);
        let x = ids(&[1, 0], &[1, 2]);
        let cfg = WelleckUlConfig::default().with_backend(backend).with_reduction(Reduction::None);
        let (out, g) =
            loss_and_grad(&z, |z| welleck_ul_loss(z, &x, None, Candidates::PreviousContext, &cfg))?;
        let tok = vals(&out.loss);
        tol(kind, 9).assert_all_close("W-E1 position 1", &tok[1..], &[38.901387724]);
        Tol { rel: 0.0, abs: 1e-8 }.assert_all_close("W-E1 position 0", &tok[..1], &[6.18e-9]);
        tol(kind, 9).assert_all_close(
            "W-E1 grad",
            &g[4..],
            &[-1.333333329, 1.999999988, -0.333333329, -0.333333329],
        );
        assert!(g.iter().all(|x| x.is_finite()));
        Ok(())
    })
}

#[test]
fn welleck_batch_no_leak_no_pad() -> Result<()> {
    for_all(|kind, backend| {
        let mut z = WZ.to_vec();
        z.extend_from_slice(&WZ[12..16]); // z_3
        z.extend_from_slice(&WZ[4..8]); // z_1
        z.extend_from_slice(&WZ[8..12]); // z_2
        z.extend_from_slice(&[f64::NAN; 4]);
        let z = tensor(&z, &[2, 4, 4], kind);
        let x = ids(&[2, 1, 2, 3, 3, 3, 1, 0], &[2, 4]);
        let cfg = WelleckUlConfig::default().with_pad_id(Some(0)).with_backend(backend);
        let t = tol(kind, 6);
        let none = welleck_ul_loss(
            &z,
            &x,
            None,
            Candidates::PreviousContext,
            &cfg.clone().with_reduction(Reduction::None),
        )?;
        t.assert_all_close("row 1", &vals(&none.loss)[4..], &[0.940754, 2.073875, 1.543334, 0.0]);
        let ps = welleck_ul_loss(
            &z,
            &x,
            None,
            Candidates::PreviousContext,
            &cfg.clone().with_reduction(Reduction::PerSequence),
        )?;
        t.assert_all_close("PerSequence", &vals(&ps.loss), &[4.450327, 4.557963]);
        let (s, g) = loss_and_grad(&z, |z| {
            welleck_ul_loss(
                z,
                &x,
                None,
                Candidates::PreviousContext,
                &cfg.clone().with_reduction(Reduction::Sum),
            )
        })?;
        t.assert_all_close("Sum", &[scalar(&s.loss)], &[9.008290]);
        assert_eq!(s.count(), 7.0);
        t.assert_all_close(
            "row 1 grad",
            &g[16..],
            &[
                0.158698, 0.236749, 0.214220, -0.609667, //
                0.187519, 0.377617, 0.309167, -0.874302, //
                0.073863, -0.799219, 0.331032, 0.394323, //
                0.0, 0.0, 0.0, 0.0,
            ],
        );
        assert!(g[28..].iter().all(|&x| x == 0.0), "pad position (NaN logits) has gradient 0");
        let m = welleck_ul_loss(&z, &x, None, Candidates::PreviousContext, &cfg)?;
        t.assert_all_close("Mean", &[scalar(&m.loss)], &[1.286899]);
        let half = welleck_ul_loss(
            &z,
            &x,
            None,
            Candidates::PreviousContext,
            &cfg.clone().with_alpha(0.5).with_reduction(Reduction::Sum),
        )?;
        t.assert_all_close("α=0.5 Sum", &[scalar(&half.loss)], &[8.303220]);
        let per_seq_counts = vals(&x.ne(0).sum_dim_intlist(1, false, Kind::Int64));
        assert_eq!(per_seq_counts, [4.0, 3.0]);
        assert_eq!(count_active_welleck(&x, None, &cfg)?, 7.0);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// §12.7 sequence-level unlikelihood

fn mask_of(tokens: &[i64], valid: Option<&[bool]>, n: usize) -> Result<Vec<bool>> {
    let y = ids(tokens, &[1, tokens.len() as i64]);
    let v = valid.map(|v| Tensor::from_slice(v).reshape([1, v.len() as i64]));
    Ok(Vec::<bool>::try_from(repeat_ngram_mask(&y, v.as_ref(), n)?.reshape([-1]))?)
}

fn bools(x: &[u8]) -> Vec<bool> {
    x.iter().map(|&b| b == 1).collect()
}

#[test]
fn sequence_ul_repeat_masks() -> Result<()> {
    assert_eq!(
        mask_of(&[0, 1, 2, 3, 0, 1, 2, 3, 1], None, 4)?,
        bools(&[0, 0, 0, 0, 1, 1, 1, 1, 0])
    );
    // Off-by-one fixes relative to upstream.
    assert_eq!(mask_of(&[0, 1, 2, 3, 0, 1, 2, 3], None, 4)?, bools(&[0, 0, 0, 0, 1, 1, 1, 1]));
    assert_eq!(mask_of(&[5, 5, 5], None, 2)?, bools(&[0, 1, 1]));
    assert_eq!(mask_of(&[7, 8, 7, 9, 7], None, 1)?, bools(&[0, 0, 1, 0, 1]));
    assert_eq!(mask_of(&[1, 2, 3], None, 4)?, bools(&[0, 0, 0]));
    // Validity.
    assert_eq!(mask_of(&[4, 4, 4, 4], Some(&[true, true, true, false]), 2)?, bools(&[0, 1, 1, 0]));
    let y = ids(&[4, 4, 4, 4], &[1, 4]);
    let valid = Tensor::from_slice(&[true, true, true, false]).reshape([1, 4]);
    assert_eq!(count_active_sequence_ul(&y, Some(&valid))?, 3.0);
    Ok(())
}

#[test]
fn sequence_ul_loss_value_and_gradient() -> Result<()> {
    let yhat = [0i64, 1, 2, 3, 0, 1, 2, 3, 1];
    let probs: [f64; 9] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.4];
    let mut logits = Vec::new();
    for (t, &p) in probs.iter().enumerate() {
        for v in 0..4 {
            logits.push(if v == yhat[t] as usize { p.ln() } else { ((1.0 - p) / 3.0).ln() });
        }
    }
    for_all(|kind, backend| {
        let z = tensor(&logits, &[1, 9, 4], kind);
        let y = ids(&yhat, &[1, 9]);
        let cfg = SequenceUlConfig::default().with_backend(backend);
        let t = tol(kind, 6);
        let (s, g) = loss_and_grad(&z, |z| {
            sequence_ul_loss(
                z,
                &y,
                None,
                SeqUlMask::RepeatNgram,
                &cfg.clone().with_reduction(Reduction::Sum),
            )
        })?;
        t.assert_all_close("Sum", &[scalar(&s.loss)], &[13.410045]);
        assert_eq!(s.count(), 9.0);
        let mut expected = vec![0.0; 36];
        for (step, &p) in probs.iter().enumerate().take(8).skip(4) {
            for v in 0..4 {
                expected[step * 4 + v] = if v == yhat[step] as usize { p } else { -p / 3.0 };
            }
        }
        t.assert_all_close("Sum grad", &g, &expected);
        t.assert_all_close("row t=4", &g[16..20], &[0.9, -0.3, -0.3, -0.3]);
        let (m, gm) =
            loss_and_grad(&z, |z| sequence_ul_loss(z, &y, None, SeqUlMask::RepeatNgram, &cfg))?;
        t.assert_all_close("Mean", &[scalar(&m.loss)], &[1.490005]);
        let expected: Vec<f64> = expected.iter().map(|x| x / 9.0).collect();
        t.assert_all_close("Mean grad", &gm, &expected);
        t.assert_all_close(
            "repeat fraction",
            &[m.metrics.mean("seq_ul/repeat_fraction").unwrap()],
            &[4.0 / 9.0],
        );
        // The same mask given explicitly.
        let mask = Tensor::from_slice(&[0i64, 0, 0, 0, 1, 1, 1, 1, 0]).reshape([1, 9]);
        let e = sequence_ul_loss(&z, &y, None, SeqUlMask::Explicit(&mask), &cfg)?;
        t.assert_all_close("explicit mask", &[scalar(&e.loss)], &[1.490005]);
        Ok(())
    })
}
