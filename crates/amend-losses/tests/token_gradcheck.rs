//! Gradient checks: f64 central finite differences against the composite path for every token
//! loss, and agreement of the composite (autograd) and closed-form (injected) paths under random
//! per-token upstream weights (spec §1.8, §12).

mod token_support;

use amend_losses::token::*;
use amend_losses::{LossOutput, Reduction, Result};
use amend_testing::Tol;
use tch::{Kind, Tensor};
use token_support::*;

const B: i64 = 2;
const T: i64 = 3;
const V: i64 = 5;

type LossFn = Box<dyn Fn(&Tensor, Reduction, TokenBackend) -> Result<LossOutput>>;

/// Every token loss (with a representative configuration) on fixed side inputs.
fn losses(seed: i64) -> Vec<(String, LossFn)> {
    tch::manual_seed(seed);
    let opts = (Kind::Double, CPU);
    let zo = Tensor::randn([B, T, V], opts) * 2.0;
    let labels = Tensor::randint(V, [B, T], (Kind::Int64, CPU));
    let w = TokenWeights::new(&ids(&[1, -1, 0, -1, 1, -1], &[B, T])).unwrap();
    let w = std::rc::Rc::new(w);
    let mask = ids(&[1, 1, 0, 1, 1, 1], &[B, T]).ne(0);
    let exclude = ids(&[1, -1, 2, 0, -1, 3], &[B, T]);
    let cands = ids(&[2, 0, -1, 1, 3, 3, 0, 4, -1, 2, 1, 0, 3, -1, 4, 1, 0, 2], &[B, T, 3]);
    let mut out: Vec<(String, LossFn)> = Vec::new();
    for variant in TntVariant::ALL {
        let (zo, labels, w) = (zo.shallow_clone(), labels.shallow_clone(), w.clone());
        out.push((
            format!("{variant}"),
            Box::new(move |z, r, b| {
                tnt_loss(
                    z,
                    &zo,
                    &labels,
                    &w,
                    &TntConfig::new(variant)
                        .with_alpha(1.5)
                        .with_smoothing_eps(1e-3)
                        .with_reduction(r)
                        .with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, w) = (labels.shallow_clone(), w.clone());
        out.push((
            "NL".into(),
            Box::new(move |z, r, b| {
                nl_loss(
                    z,
                    &labels,
                    &w,
                    &NlConfig::default()
                        .with_alpha(2.0)
                        .with_threshold(None)
                        .with_reduction(r)
                        .with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, w) = (labels.shallow_clone(), w.clone());
        out.push((
            "UL".into(),
            Box::new(move |z, r, b| {
                ul_annotated_loss(
                    z,
                    &labels,
                    &w,
                    &UlAnnotatedConfig::default().with_alpha(2.0).with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, mask) = (labels.shallow_clone(), mask.shallow_clone());
        out.push((
            "NLL".into(),
            Box::new(move |z, r, b| {
                nll_loss(
                    z,
                    &labels,
                    Some(&mask),
                    &NllConfig::default().with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, mask) = (labels.shallow_clone(), mask.shallow_clone());
        out.push((
            "Welleck".into(),
            Box::new(move |z, r, b| {
                welleck_ul_loss(
                    z,
                    &labels,
                    Some(&mask),
                    Candidates::PreviousContext,
                    &WelleckUlConfig::default().with_alpha(1.5).with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, cands) = (labels.shallow_clone(), cands.shallow_clone());
        out.push((
            "Welleck explicit".into(),
            Box::new(move |z, r, b| {
                welleck_ul_loss(
                    z,
                    &labels,
                    None,
                    Candidates::Explicit(&cands),
                    &WelleckUlConfig::default().with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    {
        let (labels, mask) = (labels.shallow_clone(), mask.shallow_clone());
        out.push((
            "SequenceUL".into(),
            Box::new(move |z, r, b| {
                sequence_ul_loss(
                    z,
                    &labels,
                    None,
                    SeqUlMask::Explicit(&mask),
                    &SequenceUlConfig::default().with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    for (name, cfg, ex) in [
        ("RefKL forward", RefKlConfig::default(), false),
        (
            "RefKL forward CE exclude ε",
            RefKlConfig::default().with_value(KlValue::CrossEntropy).with_smoothing_eps(1e-2),
            true,
        ),
        ("RefKL reverse", RefKlConfig::default().with_direction(KlDirection::Reverse), false),
        (
            "RefKL reverse exclude τ=2",
            RefKlConfig::default()
                .with_direction(KlDirection::Reverse)
                .with_smoothing_eps(1e-3)
                .with_temperature(2.0),
            true,
        ),
    ] {
        let (zo, mask, exclude) =
            (zo.shallow_clone(), mask.shallow_clone(), exclude.shallow_clone());
        out.push((
            name.into(),
            Box::new(move |z, r, b| {
                reference_kl_loss(
                    z,
                    &zo,
                    ex.then_some(&exclude),
                    Some(&mask),
                    &cfg.clone().with_reduction(r).with_backend(b),
                )
            }),
        ));
    }
    out
}

/// `Σ r ⊙ ℓ` under `Reduction::None`, with fixed per-token weights `r`.
fn weighted(f: &LossFn, z: &Tensor, r: &Tensor, backend: TokenBackend) -> Result<Tensor> {
    let out = f(z, Reduction::None, backend)?;
    Ok((out.loss * r).sum(Kind::Double))
}

#[test]
fn every_token_loss_passes_f64_finite_differences() -> Result<()> {
    for seed in [1, 2] {
        tch::manual_seed(100 + seed);
        let z0 = Tensor::randn([B, T, V], (Kind::Double, CPU)) * 1.5;
        let r = Tensor::rand([B, T], (Kind::Double, CPU)) + 0.5;
        for (name, f) in losses(seed) {
            let (_, g) = loss_and_grad(&z0, |z| {
                let out = f(z, Reduction::None, TokenBackend::Composite)?;
                Ok(LossOutput { loss: (&out.loss * &r).sum(Kind::Double), ..out })
            })?;
            let h = 1e-5;
            let flat = z0.reshape([-1]);
            let mut fd = Vec::with_capacity(g.len());
            for i in 0..flat.numel() as i64 {
                let bump = |d: f64| -> Result<f64> {
                    let zz = flat.copy();
                    let _ = zz.get(i).fill_(flat.double_value(&[i]) + d);
                    Ok(scalar(&weighted(&f, &zz.reshape([B, T, V]), &r, TokenBackend::Composite)?))
                };
                fd.push((bump(h)? - bump(-h)?) / (2.0 * h));
            }
            Tol { rel: 0.0, abs: 1e-7 }.assert_all_close(
                &format!("{name} seed {seed} FD"),
                &g,
                &fd,
            );
        }
    }
    Ok(())
}

fn random_logits(seed: i64, extreme: bool) -> Tensor {
    tch::manual_seed(seed);
    let z = Tensor::randn([B, T, V], (Kind::Double, CPU)) * if extreme { 12.0 } else { 2.0 };
    if extreme {
        // A −inf column in one row, and a saturated row.
        let _ = z.get(0).get(0).get(3).fill_(f64::NEG_INFINITY);
        let _ = z.get(1).get(2).get(1).fill_(40.0);
    }
    z
}

#[test]
fn composite_and_closed_form_agree_in_f64_under_random_upstream_weights() -> Result<()> {
    let tol = Tol { rel: 1e-10, abs: 1e-12 };
    for seed in 0..6 {
        let z = random_logits(200 + seed, seed % 2 == 1);
        let r = Tensor::randn([B, T], (Kind::Double, CPU));
        for (name, f) in losses(seed) {
            let what = format!("{name} seed {seed}");
            let (a, ga) = loss_and_grad(&z, |z| {
                let out = f(z, Reduction::None, TokenBackend::Composite)?;
                Ok(LossOutput { loss: (&out.loss * &r).sum(Kind::Double), ..out })
            })?;
            let (b, gb) = loss_and_grad(&z, |z| {
                let out = f(z, Reduction::None, TokenBackend::ClosedForm)?;
                Ok(LossOutput { loss: (&out.loss * &r).sum(Kind::Double), ..out })
            })?;
            tol.assert_all_close(
                &format!("{what} values"),
                &vals(&a.per_example),
                &vals(&b.per_example),
            );
            tol.assert_all_close(&format!("{what} gradients"), &ga, &gb);
            for reduction in
                [Reduction::Sum, Reduction::Mean, Reduction::PerSequence, Reduction::BatchMean]
            {
                let (a, ga) = loss_and_grad(&z, |z| f(z, reduction, TokenBackend::Composite))?;
                let (b, gb) = loss_and_grad(&z, |z| f(z, reduction, TokenBackend::ClosedForm))?;
                tol.assert_all_close(
                    &format!("{what} {reduction:?}"),
                    &vals(&a.loss),
                    &vals(&b.loss),
                );
                tol.assert_all_close(&format!("{what} {reduction:?} grad"), &ga, &gb);
            }
        }
    }
    Ok(())
}

#[test]
fn composite_and_closed_form_agree_in_f32_and_bf16() -> Result<()> {
    for seed in 0..3 {
        let z64 = random_logits(300 + seed, false);
        for (name, f) in losses(seed) {
            let (_, g64) = loss_and_grad(&z64, |z| f(z, Reduction::Sum, TokenBackend::Composite))?;
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let z = z64.to_kind(kind);
                let (a, ga) = loss_and_grad(&z, |z| f(z, Reduction::Sum, TokenBackend::Composite))?;
                let (b, gb) =
                    loss_and_grad(&z, |z| f(z, Reduction::Sum, TokenBackend::ClosedForm))?;
                // Both paths compute in f32; the gradient comes back in the logits' dtype.
                assert_eq!(a.loss.kind(), Kind::Float, "{name}: loss dtype");
                let tol = if kind == Kind::Float {
                    Tol { rel: 1e-5, abs: 1e-6 }
                } else {
                    Tol { rel: 1e-2, abs: 1e-2 }
                };
                tol.assert_all_close(
                    &format!("{name} {kind:?} values"),
                    &[scalar(&a.loss)],
                    &[scalar(&b.loss)],
                );
                tol.assert_all_close(&format!("{name} {kind:?} grads"), &ga, &gb);
                if kind == Kind::Float {
                    Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close(
                        &format!("{name} f32 vs f64 grads"),
                        &ga,
                        &g64,
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn value_only_calls_build_no_graph() -> Result<()> {
    let z = random_logits(7, false);
    for (name, f) in losses(3) {
        for backend in [TokenBackend::Composite, TokenBackend::ClosedForm] {
            let out = f(&z, Reduction::Sum, backend)?;
            assert!(
                !out.loss.requires_grad(),
                "{name} {backend:?}: a value-only call tracked gradients"
            );
            let with_grad = f(&z.copy().set_requires_grad(true), Reduction::Sum, backend)?;
            assert!((scalar(&out.loss) - scalar(&with_grad.loss)).abs() < 1e-12, "{name}");
        }
    }
    Ok(())
}
