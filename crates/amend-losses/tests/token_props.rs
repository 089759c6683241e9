//! Property tests of the token losses (proptest, 32 cases by default; more with
//! `PROPTEST_CASES`).

mod token_support;

use amend_losses::token::*;
use amend_losses::{LossOutput, Reduction, Result};
use amend_testing::Tol;
use proptest::prelude::*;
use tch::{Kind, Tensor};
use token_support::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    Tnt(TntVariant),
    Nl,
    Ul,
    Nll,
    Welleck,
    SeqUl,
    RefKlForward,
    RefKlReverse,
}

const ALL: [Which; 12] = [
    Which::Tnt(TntVariant::Ff),
    Which::Tnt(TntVariant::Rr),
    Which::Tnt(TntVariant::Rf),
    Which::Tnt(TntVariant::Fll),
    Which::Tnt(TntVariant::Rll),
    Which::Nl,
    Which::Ul,
    Which::Nll,
    Which::Welleck,
    Which::SeqUl,
    Which::RefKlForward,
    Which::RefKlReverse,
];

/// A token-level problem: logits, reference logits, labels, weights (−1/0/1; 0 = inactive for
/// every loss) and an exclude id per position.
#[derive(Debug, Clone)]
struct Problem {
    b: i64,
    t: i64,
    v: i64,
    z: Vec<f64>,
    zo: Vec<f64>,
    labels: Vec<i64>,
    weights: Vec<i64>,
    exclude: Vec<i64>,
}

fn arbitrary_problem() -> impl Strategy<Value = Problem> {
    (1i64..=3, 1i64..=5, 2i64..=9).prop_flat_map(|(b, t, v)| {
        let n = (b * t) as usize;
        let m = n * v as usize;
        (
            prop::collection::vec(-10i32..=10, m),
            prop::collection::vec(-10i32..=10, m),
            prop::collection::vec(0..v, n),
            prop::collection::vec(prop::sample::select(vec![-1i64, 0, 1, 1]), n),
            prop::collection::vec(-1..v, n),
        )
            .prop_map(move |(z, zo, labels, weights, exclude)| Problem {
                b,
                t,
                v,
                z: z.into_iter().map(f64::from).collect(),
                zo: zo.into_iter().map(f64::from).collect(),
                labels,
                weights,
                exclude,
            })
    })
}

impl Problem {
    fn z(&self) -> Tensor {
        tensor(&self.z, &[self.b, self.t, self.v], Kind::Double)
    }

    /// Runs `which`; inactive positions (w = 0) carry label −100 for NLL / Welleck and a false
    /// mask for the masked losses.
    fn run(
        &self,
        which: Which,
        z: &Tensor,
        reduction: Reduction,
        backend: TokenBackend,
    ) -> Result<LossOutput> {
        let shape = [self.b, self.t];
        let zo = tensor(&self.zo, &[self.b, self.t, self.v], Kind::Double);
        let y = ids(&self.labels, &shape);
        let w = TokenWeights::new(&ids(&self.weights, &shape))?;
        let mask = ids(&self.weights, &shape).ne(0);
        let y_ignored = y.where_self(&mask, &Tensor::from(-100i64));
        match which {
            Which::Tnt(v) => tnt_loss(
                z,
                &zo,
                &y,
                &w,
                &TntConfig::new(v).with_alpha(1.5).with_reduction(reduction).with_backend(backend),
            ),
            Which::Nl => nl_loss(
                z,
                &y,
                &w,
                &NlConfig::default()
                    .with_alpha(1.5)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
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
                &y_ignored,
                None,
                &NllConfig::default().with_reduction(reduction).with_backend(backend),
            ),
            Which::Welleck => welleck_ul_loss(
                z,
                &y_ignored,
                None,
                Candidates::PreviousContext,
                &WelleckUlConfig::default().with_reduction(reduction).with_backend(backend),
            ),
            Which::SeqUl => {
                let m = Tensor::from_slice(&self.weights).reshape(shape).lt(0);
                sequence_ul_loss(
                    z,
                    &y,
                    Some(&mask),
                    SeqUlMask::Explicit(&m),
                    &SequenceUlConfig::default().with_reduction(reduction).with_backend(backend),
                )
            }
            Which::RefKlForward => {
                let ex = ids(&self.exclude, &shape);
                reference_kl_loss(
                    z,
                    &zo,
                    Some(&ex),
                    Some(&mask),
                    &RefKlConfig::default().with_reduction(reduction).with_backend(backend),
                )
            }
            Which::RefKlReverse => reference_kl_loss(
                z,
                &zo,
                None,
                Some(&mask),
                &RefKlConfig::default()
                    .with_direction(KlDirection::Reverse)
                    .with_reduction(reduction)
                    .with_backend(backend),
            ),
        }
    }

    /// Appends `extra_t` padded positions to every sequence and `extra_b` padded sequences,
    /// with garbage (NaN, ±inf, out-of-range labels) at the padding.
    fn padded(&self, extra_t: i64, extra_b: i64) -> Problem {
        let (t2, b2) = (self.t + extra_t, self.b + extra_b);
        let v = self.v as usize;
        let garbage = |i: usize| [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30][i % 4];
        let mut p = Problem {
            b: b2,
            t: t2,
            v: self.v,
            z: vec![],
            zo: vec![],
            labels: vec![],
            weights: vec![],
            exclude: vec![],
        };
        for b in 0..b2 {
            for t in 0..t2 {
                if b < self.b && t < self.t {
                    let r = (b * self.t + t) as usize;
                    p.z.extend_from_slice(&self.z[r * v..(r + 1) * v]);
                    p.zo.extend_from_slice(&self.zo[r * v..(r + 1) * v]);
                    p.labels.push(self.labels[r]);
                    p.weights.push(self.weights[r]);
                    p.exclude.push(self.exclude[r]);
                } else {
                    p.z.extend((0..v).map(garbage));
                    p.zo.extend((0..v).map(|i| garbage(i + 1)));
                    p.labels.push(self.v + 7);
                    p.weights.push(0);
                    p.exclude.push(self.v + 9);
                }
            }
        }
        p
    }

    /// Inserts a column at `c` that is −inf in `z` and `fill` in `z°`; labels and exclude ids
    /// are remapped.
    fn with_neg_inf_column(&self, c: i64, fill: f64) -> Problem {
        let v = self.v as usize;
        let c = c as usize;
        let insert = |x: &[f64], val: f64| -> Vec<f64> {
            x.chunks(v)
                .flat_map(|row| {
                    let mut r = row.to_vec();
                    r.insert(c, val);
                    r
                })
                .collect()
        };
        let shift = |y: i64| if y >= c as i64 { y + 1 } else { y };
        Problem {
            b: self.b,
            t: self.t,
            v: self.v + 1,
            z: insert(&self.z, f64::NEG_INFINITY),
            zo: insert(&self.zo, fill),
            labels: self.labels.iter().map(|&y| shift(y)).collect(),
            weights: self.weights.clone(),
            exclude: self.exclude.iter().map(|&y| if y < 0 { y } else { shift(y) }).collect(),
        }
    }
}

fn grad_of(
    p: &Problem,
    which: Which,
    reduction: Reduction,
    backend: TokenBackend,
) -> Result<(LossOutput, Vec<f64>)> {
    loss_and_grad(&p.z(), |z| p.run(which, z, reduction, backend))
}

const TIGHT: Tol = Tol { rel: 1e-10, abs: 1e-12 };

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn tnt_without_negatives_is_self_distillation(p in arbitrary_problem()) {
        let mut p = p;
        for w in &mut p.weights { *w = w.abs(); }
        let shape = [p.b, p.t];
        let z = p.z();
        let zo = tensor(&p.zo, &[p.b, p.t, p.v], Kind::Double);
        let y = ids(&p.labels, &shape);
        let w = TokenWeights::new(&ids(&p.weights, &shape))?;
        let mask = ids(&p.weights, &shape).ne(0);
        let tnff = tnt_loss(&z, &zo, &y, &w, &TntConfig::new(TntVariant::Ff).with_reduction(Reduction::None))?;
        let kd = reference_kl_loss(&z, &zo, None, Some(&mask), &RefKlConfig::default().with_value(KlValue::CrossEntropy).with_reduction(Reduction::None))?;
        TIGHT.assert_all_close("TNFF = forward CE to the reference", &vals(&tnff.loss), &vals(&kd.loss));
        let tnrr = tnt_loss(&z, &zo, &y, &w, &TntConfig::new(TntVariant::Rr).with_reduction(Reduction::None))?;
        let rkl = reference_kl_loss(&z, &zo, None, Some(&mask), &RefKlConfig::default().with_direction(KlDirection::Reverse).with_smoothing_eps(1e-6).with_reduction(Reduction::None))?;
        TIGHT.assert_all_close("TNRR = reverse KL to the smoothed reference", &vals(&tnrr.loss), &vals(&rkl.loss));
        // At the reference itself (step 0) the self-distillation gradient vanishes.
        let (_, g) = loss_and_grad(&zo, |z| tnt_loss(z, &zo, &y, &w, &TntConfig::new(TntVariant::Ff)))?;
        prop_assert!(g.iter().all(|x| x.abs() < 1e-12), "TNFF gradient at z = z°: {g:?}");
        let at_ref = tnt_loss(&zo, &zo, &y, &w, &TntConfig::new(TntVariant::Ff))?;
        prop_assert!(at_ref.metrics.mean("tnt/pos_kl").unwrap().abs() < 1e-12);
    }

    #[test]
    fn losses_are_invariant_to_padding(p in arbitrary_problem(), extra_t in 0i64..3, extra_b in 0i64..2) {
        let q = p.padded(extra_t, extra_b);
        for which in ALL {
            for backend in [TokenBackend::Composite, TokenBackend::ClosedForm] {
                for reduction in [Reduction::Sum, Reduction::Mean] {
                    let (a, ga) = grad_of(&p, which, reduction, backend)?;
                    let (b, gb) = grad_of(&q, which, reduction, backend)?;
                    let what = format!("{which:?} {backend:?} {reduction:?}");
                    TIGHT.assert_all_close(&what, &vals(&a.loss), &vals(&b.loss));
                    prop_assert_eq!(a.count(), b.count());
                    // Gradients at the original positions are equal, and exactly 0 at padding.
                    let v = p.v as usize;
                    for bb in 0..q.b as usize {
                        for tt in 0..q.t as usize {
                            let rq = (bb * q.t as usize + tt) * v;
                            let row = &gb[rq..rq + v];
                            if bb < p.b as usize && tt < p.t as usize {
                                let rp = (bb * p.t as usize + tt) * v;
                                TIGHT.assert_all_close(&what, row, &ga[rp..rp + v]);
                            } else {
                                prop_assert!(row.iter().all(|&x| x == 0.0), "{} padding gradient {:?}", what, row);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn neg_inf_column_leaves_losses_unchanged(p in arbitrary_problem(), c in 0i64..10, fill in -10.0f64..10.0) {
        let c = c.min(p.v);
        let q = p.with_neg_inf_column(c, fill);
        for which in ALL {
            for backend in [TokenBackend::Composite, TokenBackend::ClosedForm] {
                let (a, ga) = grad_of(&p, which, Reduction::None, backend)?;
                let (b, gb) = grad_of(&q, which, Reduction::None, backend)?;
                let what = format!("{which:?} {backend:?}");
                Tol { rel: 1e-9, abs: 1e-12 }.assert_all_close(&what, &vals(&a.loss), &vals(&b.loss));
                let expected: Vec<f64> = ga.chunks(p.v as usize).flat_map(|row| {
                    let mut r = row.to_vec();
                    r.insert(c as usize, 0.0);
                    r
                }).collect();
                Tol { rel: 1e-9, abs: 1e-12 }.assert_all_close(&format!("{what} grad"), &gb, &expected);
            }
        }
    }

    #[test]
    fn sum_equals_mean_times_count_and_sequences_add_up(p in arbitrary_problem()) {
        for which in ALL {
            let sum = p.run(which, &p.z(), Reduction::Sum, TokenBackend::Composite)?;
            let mean = p.run(which, &p.z(), Reduction::Mean, TokenBackend::Composite)?;
            let per_seq = p.run(which, &p.z(), Reduction::PerSequence, TokenBackend::Composite)?;
            let none = p.run(which, &p.z(), Reduction::None, TokenBackend::Composite)?;
            let s = scalar(&sum.loss);
            let expected = if mean.count() > 0.0 { s / mean.count() } else { 0.0 };
            TIGHT.assert_all_close(&format!("{which:?} mean"), &[scalar(&mean.loss)], &[expected]);
            TIGHT.assert_all_close(&format!("{which:?} per-sequence"), &[vals(&per_seq.loss).iter().sum::<f64>()], &[s]);
            TIGHT.assert_all_close(&format!("{which:?} none"), &[vals(&none.loss).iter().sum::<f64>()], &[s]);
            TIGHT.assert_all_close(&format!("{which:?} part"), &[scalar(&sum.parts[0].sum)], &[s]);
            prop_assert_eq!(sum.count(), p.weights.iter().filter(|&&w| w != 0).count() as f64);
        }
    }

    #[test]
    fn micro_batches_normalised_by_the_global_count_equal_one_mean(p in arbitrary_problem(), split in 1i64..3) {
        let split = split.min(p.b);
        for which in ALL {
            let (full, g_full) = grad_of(&p, which, Reduction::Mean, TokenBackend::ClosedForm)?;
            let leaf = p.z().set_requires_grad(true);
            let v = p.v as usize;
            let n_first = (split * p.t) as usize;
            let halves = [(0, split), (split, p.b - split)];
            let mut outs = Vec::new();
            for (start, len) in halves {
                if len == 0 { continue; }
                let r0 = start as usize * p.t as usize;
                let r1 = r0 + (len * p.t) as usize;
                let sub = Problem {
                    b: len, t: p.t, v: p.v,
                    z: p.z[r0 * v..r1 * v].to_vec(), zo: p.zo[r0 * v..r1 * v].to_vec(),
                    labels: p.labels[r0..r1].to_vec(), weights: p.weights[r0..r1].to_vec(), exclude: p.exclude[r0..r1].to_vec(),
                };
                outs.push(sub.run(which, &leaf.narrow(0, start, len), Reduction::Sum, TokenBackend::ClosedForm)?);
            }
            let total: f64 = outs.iter().map(LossOutput::count).sum();
            let mut value = 0.0;
            for o in &outs {
                let l = o.normalized_by(&[total])?;
                value += scalar(&l);
                l.backward();
            }
            let _ = n_first;
            TIGHT.assert_all_close(&format!("{which:?} accumulated value"), &[value], &[scalar(&full.loss)]);
            TIGHT.assert_all_close(&format!("{which:?} accumulated grad"), &vals(&leaf.grad()), &g_full);
        }
    }

    #[test]
    fn masked_positions_have_no_effect_even_with_nan(p in arbitrary_problem(), nan_rows in prop::collection::vec(any::<bool>(), 15)) {
        let mut q = p.clone();
        let v = p.v as usize;
        for (r, &nan) in nan_rows.iter().enumerate().take((p.b * p.t) as usize) {
            if nan && q.weights[r] == 0 {
                q.z[r * v..(r + 1) * v].iter_mut().for_each(|x| *x = f64::NAN);
                q.zo[r * v] = f64::INFINITY;
                q.labels[r] = -5;
                q.exclude[r] = 1_000;
            }
        }
        for which in ALL {
            for backend in [TokenBackend::Composite, TokenBackend::ClosedForm] {
                let (a, ga) = grad_of(&p, which, Reduction::Sum, backend)?;
                let (b, gb) = grad_of(&q, which, Reduction::Sum, backend)?;
                let what = format!("{which:?} {backend:?}");
                TIGHT.assert_all_close(&what, &vals(&a.loss), &vals(&b.loss));
                TIGHT.assert_all_close(&format!("{what} grad"), &gb, &ga);
            }
        }
    }

    #[test]
    fn losses_are_invariant_to_a_per_row_logit_shift(p in arbitrary_problem(), shift in -50.0f64..50.0) {
        let mut q = p.clone();
        let v = p.v as usize;
        for (r, row) in q.z.chunks_mut(v).enumerate() {
            row.iter_mut().for_each(|x| *x += shift * (1.0 + r as f64));
        }
        for which in ALL {
            let a = p.run(which, &p.z(), Reduction::None, TokenBackend::Composite)?;
            let b = q.run(which, &q.z(), Reduction::None, TokenBackend::Composite)?;
            Tol { rel: 1e-9, abs: 1e-9 }.assert_all_close(&format!("{which:?}"), &vals(&a.loss), &vals(&b.loss));
        }
    }

    #[test]
    fn kl_is_nonnegative_and_zero_at_the_reference(p in arbitrary_problem()) {
        for which in [Which::RefKlForward, Which::RefKlReverse] {
            let out = p.run(which, &p.z(), Reduction::None, TokenBackend::Composite)?;
            prop_assert!(vals(&out.loss).iter().all(|&x| x >= -1e-12), "{:?}", which);
        }
        let zo = tensor(&p.zo, &[p.b, p.t, p.v], Kind::Double);
        let out = p.run(Which::RefKlReverse, &zo, Reduction::None, TokenBackend::Composite)?;
        prop_assert!(vals(&out.loss).iter().all(|x| x.abs() < 1e-12));
    }
}
