//! The fused-kernel backend (`TokenBackend::Kernel`, what `Auto` runs on CPU f32 logits) against
//! the composite path for every token loss: values, per-token gradients under random upstream
//! weights (`Reduction::None`), every reduction and the metrics, on random, extreme (±1e4,
//! saturated rows, `−inf` columns), padded (NaN / ±inf at inactive positions) and fully masked
//! batches; plus the non-finite policy, value-only calls and backend selection.
//!
//! The oracle is the composite path in f64 on the same (f32-representable) inputs; the kernel
//! (f32) must match it within the f32 tolerances of `amend-testing`, and so must the composite
//! path in f32 on the ordinary inputs. On extreme inputs no f32 evaluation reaches 1e-6 absolute
//! (rounding `z − LSE(z)` at |z| ≈ 1e4 alone costs ≈ 5e-4), so the absolute tolerance there
//! grows with the logit magnitude (documented at [`tol_for`]).

mod token_support;

use amend_losses::token::*;
use amend_losses::{Error, LossOutput, Metrics, Reduction, Result};
use amend_testing::{F32, F32_GRAD, Tol};
use proptest::prelude::*;
use tch::{Kind, Tensor};
use token_support::*;

const REDUCTIONS: [Reduction; 4] =
    [Reduction::Sum, Reduction::Mean, Reduction::PerSequence, Reduction::BatchMean];

/// Every token loss, with configurations that exercise their branches.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    Tnt(TntVariant),
    Nl,
    NlAlphaZero,
    Ul,
    Nll,
    ConditionalNll,
    WelleckPrevious,
    WelleckExplicit,
    SeqUlRepeat,
    SeqUlExplicit,
    RefKlForwardExclude,
    RefKlForwardCeTemperature,
    RefKlReverseExclude,
    RefKlReverse,
}

const ALL: [Which; 18] = [
    Which::Tnt(TntVariant::Ff),
    Which::Tnt(TntVariant::Rr),
    Which::Tnt(TntVariant::Rf),
    Which::Tnt(TntVariant::Fll),
    Which::Tnt(TntVariant::Rll),
    Which::Nl,
    Which::NlAlphaZero,
    Which::Ul,
    Which::Nll,
    Which::ConditionalNll,
    Which::WelleckPrevious,
    Which::WelleckExplicit,
    Which::SeqUlRepeat,
    Which::SeqUlExplicit,
    Which::RefKlForwardExclude,
    Which::RefKlForwardCeTemperature,
    Which::RefKlReverseExclude,
    Which::RefKlReverse,
];

/// The largest per-position scale of a loss (its `α`).
fn scale(which: Which) -> f64 {
    match which {
        Which::Tnt(_) | Which::Nl | Which::Ul | Which::WelleckPrevious | Which::WelleckExplicit => {
            1.5
        }
        _ => 1.0,
    }
}

/// A token-level batch. Weights −1/0/+1; a position with weight 0 is inactive for every loss
/// (label −100 for NLL and Welleck, false masks, no candidates).
#[derive(Debug, Clone)]
struct Problem {
    b: i64,
    t: i64,
    v: i64,
    z: Vec<f32>,
    zo: Vec<f32>,
    labels: Vec<i64>,
    weights: Vec<i64>,
    exclude: Vec<i64>,
    cands: Vec<i64>,
    /// Largest finite |logit| (sets the tolerance).
    magnitude: f64,
}

const K: i64 = 2;

fn problem(extreme: bool) -> impl Strategy<Value = Problem> {
    (1i64..=3, 1i64..=5, 2i64..=8, 0u8..8).prop_flat_map(move |(b, t, v, flavour)| {
        let n = (b * t) as usize;
        let m = n * v as usize;
        let weights = if flavour == 0 {
            // A fully masked batch now and then.
            prop::collection::vec(Just(0i64), n).boxed()
        } else {
            prop::collection::vec(prop::sample::select(vec![-1i64, 0, 1, 1]), n).boxed()
        };
        (
            prop::collection::vec(-10i32..=10, m),
            prop::collection::vec(-10i32..=10, m),
            prop::collection::vec(0..v, n),
            weights,
            prop::collection::vec(-1..v, n),
            prop::collection::vec(-1..v, n * K as usize),
            prop::collection::vec(0..v, n),
            Just(flavour),
        )
            .prop_map(
                move |(z, zo, labels, weights, exclude, cands, neg_inf_col, flavour)| {
                    let unit = if extreme { 1000.0 } else { 1.0 };
                    let mut z: Vec<f32> = z.into_iter().map(|x| x as f32 * unit).collect();
                    let zo: Vec<f32> = zo.into_iter().map(|x| x as f32 * unit).collect();
                    let vu = v as usize;
                    if extreme {
                        for (r, row) in z.chunks_mut(vu).enumerate() {
                            // A −inf column in some rows (never the only finite entry) and a
                            // saturated row now and then.
                            // Never in the label's column: a label outside the row
                            // vocabulary has an infinite loss, whose gradient is not defined
                            // (the injected paths give 0 there, autograd −1).
                            let y = labels[r] as usize;
                            let c = if neg_inf_col[r] as usize == y {
                                (y + 1) % vu
                            } else {
                                neg_inf_col[r] as usize
                            };
                            // (With V = 2 a −inf column would leave a negative row without a
                            // target: outside the supported domain, spec §1.5.)
                            if r % 2 == 0 && vu >= 3 {
                                row[c] = f32::NEG_INFINITY;
                                row[y] = 0.0;
                            }
                            if r % 3 == 1 && flavour % 2 == 1 {
                                row.iter_mut().for_each(|x| *x = 0.0);
                                row[c] = 40.0;
                            }
                        }
                    }
                    let magnitude = z
                        .iter()
                        .chain(&zo)
                        .filter(|x| x.is_finite())
                        .fold(1.0f64, |a, &x| a.max(f64::from(x.abs())));
                    Problem { b, t, v, z, zo, labels, weights, exclude, cands, magnitude }
                },
            )
    })
}

impl Problem {
    fn shape(&self) -> [i64; 2] {
        [self.b, self.t]
    }

    fn logits(&self, data: &[f32], kind: Kind) -> Tensor {
        Tensor::from_slice(data).reshape([self.b, self.t, self.v]).to_kind(kind)
    }

    fn z(&self, kind: Kind) -> Tensor {
        self.logits(&self.z, kind)
    }

    /// Garbage (NaN, ±inf, out-of-range ids) at every inactive position.
    fn poisoned(&self) -> Problem {
        let mut q = self.clone();
        let v = self.v as usize;
        for r in 0..(self.b * self.t) as usize {
            if q.weights[r] == 0 {
                let g = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30];
                q.z[r * v..(r + 1) * v].iter_mut().enumerate().for_each(|(i, x)| *x = g[i % 4]);
                q.zo[r * v..(r + 1) * v]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = g[(i + 1) % 4]);
                q.labels[r] = self.v + 7;
                q.exclude[r] = self.v + 9;
            }
        }
        q
    }

    fn run(
        &self,
        which: Which,
        z: &Tensor,
        kind: Kind,
        reduction: Reduction,
        backend: TokenBackend,
    ) -> Result<LossOutput> {
        let shape = self.shape();
        let zo = self.logits(&self.zo, kind);
        let y = ids(&self.labels, &shape);
        let w = TokenWeights::new(&ids(&self.weights, &shape))?;
        let active = ids(&self.weights, &shape).ne(0);
        let y_ignored = y.where_self(&active, &Tensor::from(-100i64));
        let neg = ids(&self.weights, &shape).lt(0);
        match which {
            Which::Tnt(v) => tnt_loss(
                z,
                &zo,
                &y,
                &w,
                &TntConfig::new(v)
                    .with_alpha(1.5)
                    .with_smoothing_eps(1e-3)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
            Which::Nl | Which::NlAlphaZero => {
                let alpha = if which == Which::Nl { 1.5 } else { 0.0 };
                let cfg = NlConfig::default()
                    .with_alpha(alpha)
                    .with_threshold(Some(-2.0))
                    .with_reduction(reduction)
                    .with_backend(backend);
                nl_loss(z, &y, &w, &cfg)
            }
            Which::Ul => ul_annotated_loss(
                z,
                &y,
                &w,
                &UlAnnotatedConfig::default()
                    .with_alpha(1.5)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
            Which::Nll => nll_loss(
                z,
                &y,
                Some(&active),
                &NllConfig::default().with_reduction(reduction).with_backend(backend),
            ),
            Which::ConditionalNll => conditional_nll_loss(
                z,
                &y_ignored,
                &neg,
                &NllConfig::default().with_reduction(reduction).with_backend(backend),
            ),
            Which::WelleckPrevious => welleck_ul_loss(
                z,
                &y_ignored,
                None,
                Candidates::PreviousContext,
                &WelleckUlConfig::default()
                    .with_alpha(1.5)
                    .with_pad_id(Some(0))
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
            Which::WelleckExplicit => {
                let c = ids(&self.cands, &[self.b, self.t, K]);
                let c = c.where_self(&active.unsqueeze(-1), &Tensor::from(-1i64));
                welleck_ul_loss(
                    z,
                    &y_ignored,
                    None,
                    Candidates::Explicit(&c),
                    &WelleckUlConfig::default()
                        .with_alpha(1.5)
                        .with_reduction(reduction)
                        .with_backend(backend),
                )
            }
            Which::SeqUlRepeat | Which::SeqUlExplicit => {
                let cfg = SequenceUlConfig::default()
                    .with_ngram_n(1)
                    .with_reduction(reduction)
                    .with_backend(backend);
                if which == Which::SeqUlRepeat {
                    sequence_ul_loss(z, &y, Some(&active), SeqUlMask::RepeatNgram, &cfg)
                } else {
                    sequence_ul_loss(z, &y, Some(&active), SeqUlMask::Explicit(&neg), &cfg)
                }
            }
            Which::RefKlForwardExclude => reference_kl_loss(
                z,
                &zo,
                Some(&ids(&self.exclude, &shape)),
                Some(&active),
                &RefKlConfig::default().with_reduction(reduction).with_backend(backend),
            ),
            Which::RefKlForwardCeTemperature => reference_kl_loss(
                z,
                &zo,
                None,
                Some(&active),
                &RefKlConfig::default()
                    .with_value(KlValue::CrossEntropy)
                    .with_temperature(2.0)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
            Which::RefKlReverseExclude => reference_kl_loss(
                z,
                &zo,
                Some(&ids(&self.exclude, &shape)),
                Some(&active),
                &RefKlConfig::default()
                    .with_direction(KlDirection::Reverse)
                    .with_smoothing_eps(1e-3)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
            Which::RefKlReverse => reference_kl_loss(
                z,
                &zo,
                None,
                Some(&active),
                &RefKlConfig::default()
                    .with_direction(KlDirection::Reverse)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
        }
    }

    /// `(Σ r ⊙ ℓ under Reduction::None, its gradient)` with per-token upstream weights `r`.
    fn weighted(
        &self,
        which: Which,
        kind: Kind,
        backend: TokenBackend,
        r: &Tensor,
    ) -> Result<(LossOutput, Vec<f64>)> {
        loss_and_grad(&self.z(kind), |z| {
            let out = self.run(which, z, kind, Reduction::None, backend)?;
            let loss = (&out.loss * r.to_kind(out.loss.kind())).sum(Kind::Double);
            Ok(LossOutput { loss, ..out })
        })
    }
}

/// Value and gradient tolerances of an f32 evaluation against the f64 oracle, for a loss whose
/// per-position scale is `s`, on inputs of magnitude `m`:
///
/// * `F32` and `F32_GRAD` times `s` for ordinary inputs (|z| ≤ 10);
/// * plus `4e-7 · m · s` (a few f32 rounding units of the logits) for extreme inputs, where
///   `z − LSE(z)` itself carries that error in every f32 implementation;
/// * plus, for reverse-KL gradients `p ⊙ (l − log d − L)`, `5e-7 · m · s`: the bracket subtracts
///   log-probabilities and a KL of size up to `2m`, so its f32 rounding is a few `ε·2m`
///   (measured up to 2.6e-6 at m = 10, on both f32 paths).
fn tol_for(which: Which, m: f64) -> (Tol, Tol) {
    let s = scale(which);
    let extra = if m > 10.0 { 4e-7 * m * s } else { 0.0 };
    let reverse = matches!(
        which,
        Which::Tnt(TntVariant::Rr | TntVariant::Rf | TntVariant::Rll)
            | Which::RefKlReverse
            | Which::RefKlReverseExclude
    );
    let rev = if reverse { 5e-7 * m * s } else { 0.0 };
    (
        Tol { rel: F32.rel, abs: F32.abs * s + extra },
        Tol { rel: F32_GRAD.rel, abs: F32_GRAD.abs * s + extra + rev },
    )
}

fn metrics_close(what: &str, a: &Metrics, b: &Metrics, m: f64) {
    let names: Vec<&str> = a.iter().map(|(n, _)| n).collect();
    let other: Vec<&str> = b.iter().map(|(n, _)| n).collect();
    assert_eq!(names, other, "{what}: metric names");
    let tol = Tol { rel: 1e-4, abs: 1e-5 + if m > 10.0 { 1e-6 * m } else { 0.0 } };
    for (name, sc) in a.iter() {
        let sb = b.get(name).expect("same names");
        assert_eq!(sc.count, sb.count, "{what}: {name} count");
        tol.assert_all_close(&format!("{what}: metric {name}"), &[sc.sum], &[sb.sum]);
    }
}

/// The kernel (f32) against the composite path in f64 and (ordinary inputs) in f32.
fn check_against_composite(p: &Problem, seed: u64) -> Result<()> {
    tch::manual_seed(seed as i64);
    let r = Tensor::randn(p.shape(), (Kind::Double, CPU));
    let extreme = p.magnitude > 10.0;
    // The weighted gradient is `r ⊙ ∂ℓ/∂z` row by row, so its rounding error scales with the
    // largest upstream weight (|r| reaches about 3 in a batch of standard normals).
    let r_max = r.abs().max().double_value(&[]).max(1.0);
    for (i, which) in ALL.into_iter().enumerate() {
        let what = format!("{which:?}");
        let (vt, gt) = tol_for(which, p.magnitude);
        let gtw = Tol { rel: gt.rel, abs: gt.abs * r_max };
        // Per-token upstream weights after Reduction::None.
        let (k, gk) = p.weighted(which, Kind::Float, TokenBackend::Kernel, &r)?;
        let (o, go) = p.weighted(which, Kind::Double, TokenBackend::Composite, &r)?;
        vt.assert_all_close(
            &format!("{what} tokens"),
            &vals(&k.per_example),
            &vals(&o.per_example),
        );
        gtw.assert_all_close(&format!("{what} weighted grad"), &gk, &go);
        assert_eq!(k.count(), o.count(), "{what} count");
        assert!(vals(&k.per_example).iter().all(|x| !x.is_nan()), "{what}: NaN token loss");
        metrics_close(&what, &k.metrics, &o.metrics, p.magnitude);
        if !extreme {
            let (c, gc) = p.weighted(which, Kind::Float, TokenBackend::Composite, &r)?;
            let what = format!("{what} vs f32 composite");
            vt.assert_all_close(&what, &vals(&k.per_example), &vals(&c.per_example));
            // Both f32 paths round: the kernel meets its tolerance against the f64 oracle
            // above; the composite's own f32 error is up to about twice as large (measured
            // 8.5e-6 on a reverse-KL gradient where the kernel was within 4e-6), so the two f32
            // paths are compared at three times the oracle tolerance plus F32's relative term.
            let loose = Tol { rel: F32.rel, abs: 3.0 * gtw.abs };
            loose.assert_all_close(&format!("{what} grad"), &gk, &gc);
            metrics_close(&what, &k.metrics, &c.metrics, p.magnitude);
        }
        // One reduction per loss and case, rotating with the seed: every (loss, reduction) pair
        // is checked about 8 times per run of 32 cases.
        {
            let reduction = REDUCTIONS[(seed as usize).wrapping_add(i) % REDUCTIONS.len()];
            let what = format!("{which:?} {reduction:?}");
            let (k, gk) = loss_and_grad(&p.z(Kind::Float), |z| {
                p.run(which, z, Kind::Float, reduction, TokenBackend::Kernel)
            })?;
            let (o, go) = loss_and_grad(&p.z(Kind::Double), |z| {
                p.run(which, z, Kind::Double, reduction, TokenBackend::Composite)
            })?;
            vt.assert_all_close(&what, &vals(&k.loss), &vals(&o.loss));
            vt.assert_all_close(
                &format!("{what} part"),
                &[scalar(&k.parts[0].sum)],
                &[scalar(&o.parts[0].sum)],
            );
            // Mean divides by the count; the gradient tolerance holds per unit.
            gt.assert_all_close(&format!("{what} grad"), &gk, &go);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn kernel_matches_composite_on_random_batches(p in problem(false), seed in any::<u64>()) {
        check_against_composite(&p, seed)?;
    }

    #[test]
    fn kernel_matches_composite_on_extreme_batches(p in problem(true), seed in any::<u64>()) {
        check_against_composite(&p, seed)?;
    }

    #[test]
    fn kernel_ignores_garbage_at_inactive_positions(p in problem(false)) {
        let q = p.poisoned();
        for which in ALL {
            let (a, ga) = loss_and_grad(&p.z(Kind::Float), |z| p.run(which, z, Kind::Float, Reduction::Sum, TokenBackend::Kernel))?;
            let (b, gb) = loss_and_grad(&q.z(Kind::Float), |z| q.run(which, z, Kind::Float, Reduction::Sum, TokenBackend::Kernel))?;
            let what = format!("{which:?}");
            // Bitwise: inactive rows are never read.
            prop_assert_eq!(vals(&a.per_example), vals(&b.per_example), "{}", what);
            prop_assert_eq!(&ga, &gb, "{} grad", what);
            prop_assert_eq!(a.metrics, b.metrics, "{} metrics", what);
        }
    }
}

fn example() -> Problem {
    // 2 × 3 positions, V = 4; weights: one inactive position per sequence.
    let z: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0).collect();
    let zo: Vec<f32> = (0..24).map(|i| ((i * 5) % 13) as f32 * 0.4 - 2.5).collect();
    Problem {
        b: 2,
        t: 3,
        v: 4,
        z,
        zo,
        labels: vec![1, 2, 0, 3, 1, 2],
        weights: vec![1, -1, 0, -1, 1, 0],
        exclude: vec![1, -1, 2, 0, -1, 3],
        cands: vec![2, 0, -1, 1, 3, 3, 0, 2, -1, 2, 1, 0],
        magnitude: 3.0,
    }
}

#[test]
fn kernel_and_composite_report_the_same_non_finite_error() -> Result<()> {
    let mut p = example();
    // NaN at an active position (1, 1) of the logits, and +inf in the reference at (0, 0).
    p.z[(3 + 1) * 4 + 2] = f32::NAN;
    // (1, 1) is active for every loss except the sequence UL ones, which penalise (1, 0).
    let mut s = example();
    s.z[3 * 4 + 1] = f32::NAN;
    for which in ALL.into_iter().filter(|&w| w != Which::SeqUlRepeat) {
        let p = if which == Which::SeqUlExplicit { &s } else { &p };
        let expected = if which == Which::SeqUlExplicit { vec![1, 0] } else { vec![1, 1] };
        let z = p.z(Kind::Float);
        let k = p.run(which, &z, Kind::Float, Reduction::Sum, TokenBackend::Kernel);
        let c = p.run(which, &z, Kind::Float, Reduction::Sum, TokenBackend::Composite);
        match (k, c) {
            (
                Err(Error::NonFiniteLogits { name: nk, index: ik, count: ck, .. }),
                Err(Error::NonFiniteLogits { name: nc, index: ic, count: cc, .. }),
            ) => {
                assert_eq!((nk, &ik, ck), (nc, &ic, cc), "{which:?}");
                assert_eq!(ik, expected, "{which:?}");
            }
            (k, c) => panic!("{which:?}: kernel {k:?}, composite {c:?}"),
        }
    }
    let mut q = example();
    q.zo[1] = f32::INFINITY;
    let z = q.z(Kind::Float);
    for which in [Which::Tnt(TntVariant::Ff), Which::RefKlForwardExclude] {
        let err = q.run(which, &z, Kind::Float, Reduction::Sum, TokenBackend::Kernel).unwrap_err();
        assert!(
            matches!(err, Error::NonFiniteLogits { name: "ref_logits", ref index, count: 1, .. } if *index == vec![0, 0]),
            "{which:?}: {err:?}"
        );
    }
    Ok(())
}

/// Runs `which` with `NonFinitePolicy::Propagate` and `Reduction::None`.
fn propagate_run(
    p: &Problem,
    which: Which,
    z: &Tensor,
    backend: TokenBackend,
) -> Result<LossOutput> {
    let shape = p.shape();
    let zo = p.logits(&p.zo, Kind::Float);
    let y = ids(&p.labels, &shape);
    let w = TokenWeights::new(&ids(&p.weights, &shape))?;
    let active = ids(&p.weights, &shape).ne(0);
    let prop = NonFinitePolicy::Propagate;
    let none = Reduction::None;
    match which {
        Which::Tnt(v) => tnt_loss(
            z,
            &zo,
            &y,
            &w,
            &TntConfig::new(v)
                .with_alpha(1.5)
                .with_reduction(none)
                .with_non_finite(prop)
                .with_backend(backend),
        ),
        Which::Nll => nll_loss(
            z,
            &y,
            Some(&active),
            &NllConfig::default().with_reduction(none).with_non_finite(prop).with_backend(backend),
        ),
        Which::RefKlReverse => reference_kl_loss(
            z,
            &zo,
            None,
            Some(&active),
            &RefKlConfig::default()
                .with_direction(KlDirection::Reverse)
                .with_reduction(none)
                .with_non_finite(prop)
                .with_backend(backend),
        ),
        other => panic!("not used: {other:?}"),
    }
}

#[test]
fn propagate_policy_falls_back_to_the_composite_path() -> Result<()> {
    let mut p = example();
    p.z[4 * 4 + 2] = f32::NAN; // active position (1, 1)
    for which in
        [Which::Tnt(TntVariant::Ff), Which::Tnt(TntVariant::Rr), Which::Nll, Which::RefKlReverse]
    {
        let (k, gk) = loss_and_grad(&p.z(Kind::Float), |z| {
            propagate_run(&p, which, z, TokenBackend::Kernel)
        })?;
        let (c, gc) = loss_and_grad(&p.z(Kind::Float), |z| {
            propagate_run(&p, which, z, TokenBackend::Composite)
        })?;
        let (tk, tc) = (vals(&k.per_example), vals(&c.per_example));
        // The same values bit for bit (the kernel path evaluated the batch on the composite
        // path): NaN at the broken position, finite elsewhere.
        assert!(tk[4].is_nan() && tc[4].is_nan(), "{which:?}: {tk:?}");
        for (i, (a, b)) in tk.iter().zip(&tc).enumerate().filter(|(i, _)| *i != 4) {
            assert_eq!(a, b, "{which:?} position {i}");
        }
        let same = gk.iter().zip(&gc).all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
        assert!(same, "{which:?}: gradients differ");
    }
    Ok(())
}

#[test]
fn unusable_reference_row_takes_the_composite_path() -> Result<()> {
    // A negative position whose reference has mass only on the annotated token: the kernel
    // rejects the row (no target left), the composite path defines the result (NaN, outside
    // the supported domain, spec §1.5), and `Auto` returns exactly that.
    let mut p = example();
    let r = 1; // (0, 1), w = −1, label 2
    for v in 0..4 {
        p.zo[r * 4 + v] = if v == 2 { 1.0 } else { f32::NEG_INFINITY };
    }
    let z = p.z(Kind::Float);
    let k =
        p.run(Which::Tnt(TntVariant::Ff), &z, Kind::Float, Reduction::None, TokenBackend::Auto)?;
    let c = p.run(
        Which::Tnt(TntVariant::Ff),
        &z,
        Kind::Float,
        Reduction::None,
        TokenBackend::Composite,
    )?;
    let (tk, tc) = (vals(&k.per_example), vals(&c.per_example));
    assert!(!tk[r].is_finite(), "{tk:?}");
    for i in 0..6 {
        assert!(tk[i] == tc[i] || (tk[i].is_nan() && tc[i].is_nan()), "position {i}");
    }
    Ok(())
}

#[test]
fn kernel_backend_requires_cpu_f32_and_auto_falls_back() -> Result<()> {
    let p = example();
    for kind in [Kind::Double, Kind::BFloat16, Kind::Half] {
        let z = p.z(kind);
        for which in ALL {
            let err = p.run(which, &z, kind, Reduction::Sum, TokenBackend::Kernel).unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { name: "backend", .. }),
                "{which:?} {kind:?}: {err:?}"
            );
            // Auto takes the composite path for these dtypes: the same as asking for it.
            let a = p.run(which, &z, kind, Reduction::Sum, TokenBackend::Auto)?;
            let c = p.run(which, &z, kind, Reduction::Sum, TokenBackend::Composite)?;
            assert_eq!(vals(&a.loss), vals(&c.loss), "{which:?} {kind:?}");
        }
    }
    // Auto on CPU f32 is the kernel, bit for bit.
    let z = p.z(Kind::Float);
    for which in ALL {
        let a = p.run(which, &z, Kind::Float, Reduction::None, TokenBackend::Auto)?;
        let k = p.run(which, &z, Kind::Float, Reduction::None, TokenBackend::Kernel)?;
        assert_eq!(vals(&a.loss), vals(&k.loss), "{which:?}");
    }
    Ok(())
}

#[test]
fn kernel_value_only_calls_build_no_graph() -> Result<()> {
    let p = example();
    for which in ALL {
        let z = p.z(Kind::Float);
        let out = p.run(which, &z, Kind::Float, Reduction::Sum, TokenBackend::Kernel)?;
        assert!(!out.loss.requires_grad(), "{which:?}: value-only call tracked gradients");
        let leaf = z.copy().set_requires_grad(true);
        let under = tch::no_grad(|| {
            p.run(which, &leaf, Kind::Float, Reduction::Sum, TokenBackend::Kernel)
        })?;
        assert!(!under.loss.requires_grad(), "{which:?}: no_grad call tracked gradients");
        let with = p.run(which, &leaf, Kind::Float, Reduction::Sum, TokenBackend::Kernel)?;
        assert!(with.loss.requires_grad(), "{which:?}");
        assert_eq!(scalar(&out.loss), scalar(&with.loss), "{which:?}");
        assert_eq!(scalar(&under.loss), scalar(&with.loss), "{which:?}");
    }
    Ok(())
}

#[test]
fn kernel_results_do_not_depend_on_the_thread_count() -> Result<()> {
    let mut p = example();
    // Enough rows for several threads.
    let reps = 40;
    let (z, zo) = (p.z.repeat(reps), p.zo.repeat(reps));
    let (l, w, e, c) = (
        p.labels.repeat(reps),
        p.weights.repeat(reps),
        p.exclude.repeat(reps),
        p.cands.repeat(reps),
    );
    p = Problem { b: 2 * reps as i64, z, zo, labels: l, weights: w, exclude: e, cands: c, ..p };
    let before = tch::get_num_threads();
    let mut runs = Vec::new();
    for threads in [1, 2, 3] {
        tch::set_num_threads(threads);
        let mut out = Vec::new();
        for which in ALL {
            let (o, g) = loss_and_grad(&p.z(Kind::Float), |z| {
                p.run(which, z, Kind::Float, Reduction::Sum, TokenBackend::Kernel)
            })?;
            out.push((vals(&o.per_example), g));
        }
        runs.push(out);
    }
    tch::set_num_threads(before);
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
    Ok(())
}

#[test]
fn tnt_metrics_can_be_skipped_without_changing_the_loss_or_its_gradient() -> Result<()> {
    tch::manual_seed(11);
    let z = Tensor::randn([2, 5, 17], (Kind::Float, tch::Device::Cpu)) * 3.0;
    let zo = Tensor::randn([2, 5, 17], (Kind::Float, tch::Device::Cpu)) * 3.0;
    let y = Tensor::randint(17, [2, 5], (Kind::Int64, tch::Device::Cpu));
    let w = TokenWeights::new(
        &Tensor::from_slice(&[1i64, -1, 0, 1, -1, -1, 1, 1, 0, -1]).view([2, 5]),
    )?;
    for backend in [TokenBackend::Kernel, TokenBackend::Composite] {
        for variant in [TntVariant::Ff, TntVariant::Rr, TntVariant::Rll] {
            let cfg = TntConfig::new(variant).with_alpha(2.0).with_backend(backend);
            let (a, ga) = loss_and_grad(&z, |z| tnt_loss(z, &zo, &y, &w, &cfg))?;
            let (b, gb) =
                loss_and_grad(&z, |z| tnt_loss(z, &zo, &y, &w, &cfg.clone().with_metrics(false)))?;
            let what = format!("{backend:?} {variant:?}");
            // Bitwise: the metrics never feed the loss.
            assert_eq!(vals(&a.loss), vals(&b.loss), "{what}");
            assert_eq!(ga, gb, "{what} grad");
            assert_eq!(a.count(), b.count(), "{what}");
            assert!(a.metrics.get("tnt/neg_kl").is_some(), "{what}");
            assert!(b.metrics.iter().next().is_none(), "{what}: metrics were computed");
        }
    }
    Ok(())
}
