//! The unlearning set beyond GA/NPO/SimNPO: CE-U, UNDIAL, WGA, SatImp (token level, on the
//! fused kernels for CPU f32) and RMU (hidden states). Closed forms, f64 finite-difference
//! gradients, the identities that tie them to the existing losses, every backend against the
//! composite, and bad input. The peers' formulas are checked in `peer_fixtures.rs`.

use amend_losses::sequence::{EmptyPolicy, RmuConfig, rmu_control_vector, rmu_loss};
use amend_losses::token::{
    CeuConfig, KlValue, NllConfig, RefKlConfig, SatImpConfig, TokenBackend, UndialConfig,
    WgaConfig, ceu_loss, nll_loss, reference_kl_loss, satimp_loss, undial_loss, wga_loss,
};
use amend_losses::{Error, LossOutput, Reduction, Result};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

const D: Kind = Kind::Double;

fn val(t: &Tensor) -> f64 {
    t.to_kind(D).double_value(&[])
}

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(D).reshape([-1])).unwrap()
}

fn batch(seed: i64, kind: Kind) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let z = (Tensor::randn([2, 4, 6], (D, Device::Cpu)) * 2.0).to_kind(kind);
    let zr = (z.to_kind(D) + Tensor::randn([2, 4, 6], (D, Device::Cpu))).to_kind(kind);
    let y = Tensor::randint(6, [2, 4], (Kind::Int64, Device::Cpu));
    let y = y.where_scalarother(
        &Tensor::from_slice(&[false, true, true, true, true, true, false, true]).view([2, 4]),
        -100,
    );
    (z, zr, y)
}

/// Every token unlearning loss under one name, for the loops below.
fn all_losses(
    z: &Tensor,
    zr: &Tensor,
    y: &Tensor,
    backend: TokenBackend,
) -> Vec<(&'static str, LossOutput)> {
    vec![
        ("ceu", ceu_loss(z, y, None, &CeuConfig::default().with_backend(backend)).unwrap()),
        (
            "ceu n=0",
            ceu_loss(
                z,
                y,
                None,
                &CeuConfig::default().with_ignore_first_n_answer_tokens(0).with_backend(backend),
            )
            .unwrap(),
        ),
        (
            "undial",
            undial_loss(
                z,
                zr,
                y,
                None,
                &UndialConfig::default().with_beta(2.5).with_backend(backend),
            )
            .unwrap(),
        ),
        (
            "wga",
            wga_loss(z, y, None, &WgaConfig::default().with_beta(0.7).with_backend(backend))
                .unwrap(),
        ),
        (
            "satimp",
            satimp_loss(z, y, None, &SatImpConfig::default().with_beta2(2.0).with_backend(backend))
                .unwrap(),
        ),
    ]
}

#[test]
fn closed_forms_on_one_position() {
    // z = (ln 1, ln 2, ln 3): p = (1/6, 2/6, 3/6), label 2.
    let z = Tensor::from_slice(&[0.0f64, 2f64.ln(), 3f64.ln()]).view([1, 1, 3]);
    let y = Tensor::from_slice(&[2i64]).view([1, 1]);
    let p = [1.0 / 6.0, 2.0 / 6.0, 0.5f64];
    // CE-U: q = (1/3, 2/3, 0), CE = −(1/3 log p0 + 2/3 log p1).
    let ceu =
        ceu_loss(&z, &y, None, &CeuConfig::default().with_ignore_first_n_answer_tokens(0)).unwrap();
    let want = -(p[0].ln() / 3.0 + 2.0 * p[1].ln() / 3.0);
    assert!((val(&ceu.loss) - want).abs() < 1e-12, "{} vs {want}", val(&ceu.loss));
    // The first answer token is dropped by default: nothing is active here.
    let dropped = ceu_loss(&z, &y, None, &CeuConfig::default()).unwrap();
    assert_eq!((val(&dropped.loss), dropped.count()), (0.0, 0.0));
    // UNDIAL with the model as its own reference and β = ln 3: q ∝ (1, 2, 1) → (1/4, 1/2, 1/4).
    let u = undial_loss(&z, &z, &y, None, &UndialConfig::default().with_beta(3f64.ln())).unwrap();
    let want = -(0.25 * p[0].ln() + 0.5 * p[1].ln() + 0.25 * p[2].ln());
    assert!((val(&u.loss) - want).abs() < 1e-12);
    // WGA: p^β log p; SatImp: p^β1 (1 − p)^β2 log p.
    let w = wga_loss(&z, &y, None, &WgaConfig::default().with_beta(3.0)).unwrap();
    assert!((val(&w.loss) - 0.125 * 0.5f64.ln()).abs() < 1e-12);
    let s = satimp_loss(&z, &y, None, &SatImpConfig::default().with_beta1(1.0).with_beta2(2.0))
        .unwrap();
    assert!((val(&s.loss) - 0.5 * 0.25 * 0.5f64.ln()).abs() < 1e-12);
    assert!((w.metrics.mean("wga/weight").unwrap() - 0.125).abs() < 1e-12);
    assert!((w.metrics.mean("forget/logp").unwrap() - 0.5f64.ln()).abs() < 1e-12);
}

#[test]
fn identities_with_the_existing_losses() {
    let (z, zr, y) = batch(7, D);
    // WGA at β = 0 and SatImp at β1 = β2 = 0 are gradient ascent: −NLL.
    let nll = val(&nll_loss(&z, &y, None, &NllConfig::default()).unwrap().loss);
    let ga = val(&wga_loss(&z, &y, None, &WgaConfig::default().with_beta(0.0)).unwrap().loss);
    let sat0 =
        val(&satimp_loss(&z, &y, None, &SatImpConfig::default().with_beta1(0.0).with_beta2(0.0))
            .unwrap()
            .loss);
    assert!((ga + nll).abs() < 1e-12 && (sat0 + nll).abs() < 1e-12);
    // SatImp at β2 = 0 is WGA with β = β1.
    let a =
        val(&satimp_loss(&z, &y, None, &SatImpConfig::default().with_beta1(1.5).with_beta2(0.0))
            .unwrap()
            .loss);
    let b = val(&wga_loss(&z, &y, None, &WgaConfig::default().with_beta(1.5)).unwrap().loss);
    assert!((a - b).abs() < 1e-12);
    // UNDIAL at β = 0 is the cross-entropy to the reference (reference_kl_loss, CE value).
    let mask = y.ne(-100);
    let ce = reference_kl_loss(
        &z,
        &zr,
        None,
        Some(&mask),
        &RefKlConfig::default().with_value(KlValue::CrossEntropy),
    )
    .unwrap();
    let u0 = undial_loss(&z, &zr, &y, None, &UndialConfig::default().with_beta(0.0)).unwrap();
    assert!((val(&u0.loss) - val(&ce.loss)).abs() < 1e-12);
    // UNDIAL with a huge β approaches CE-U against the reference (TNFF's target).
    let big = undial_loss(&z, &zr, &y, None, &UndialConfig::default().with_beta(200.0)).unwrap();
    let ex = y.where_scalarother(&mask, -1);
    let tnff = reference_kl_loss(
        &z,
        &zr,
        Some(&ex),
        Some(&mask),
        &RefKlConfig::default().with_value(KlValue::CrossEntropy),
    )
    .unwrap();
    assert!((val(&big.loss) - val(&tnff.loss)).abs() < 1e-9);
}

#[test]
fn gradcheck_in_f64() -> Result<()> {
    let (z0, zr, y) = batch(11, D);
    let x0 = vals(&z0);
    // UNDIAL's target is the constant reference: a plain finite-difference check.
    let f = |x: &Tensor| {
        undial_loss(&x.view([2, 4, 6]), &zr, &y, None, &UndialConfig::default().with_beta(2.5))
            .unwrap()
            .loss
    };
    let x = Tensor::from_slice(&x0).set_requires_grad(true);
    f(&x).backward();
    let g = vals(&x.grad());
    let h = 1e-6;
    for j in 0..x0.len() {
        let (mut p, mut m) = (x0.clone(), x0.clone());
        p[j] += h;
        m[j] -= h;
        let fd = (val(&f(&Tensor::from_slice(&p))) - val(&f(&Tensor::from_slice(&m)))) / (2.0 * h);
        assert!((g[j] - fd).abs() <= 1e-6 * fd.abs().max(1.0), "undial[{j}]: {} vs {fd}", g[j]);
    }
    // CE-U, WGA and SatImp hold part of the function constant (the detached target, the
    // weights), so a finite difference of the whole function is not their gradient: check the
    // closed forms instead, in f64.
    let active = y.ne(-100).unsqueeze(-1);
    // CE-U: ∂ℓ/∂z = (p − q)/count with q the masked, renormalised detached p.
    let z = z0.copy().set_requires_grad(true);
    let out = ceu_loss(&z, &y, None, &CeuConfig::default().with_ignore_first_n_answer_tokens(0))?;
    out.loss.backward();
    let p = z0.softmax(-1, D);
    let hot = y.clamp_min(0).one_hot(6).to_kind(Kind::Bool);
    let q = z0.masked_fill(&hot, f64::NEG_INFINITY).softmax(-1, D);
    let want = (p - q).where_scalarother(&active, 0.0) / out.count();
    let diff = (z.grad() - want).abs().max().double_value(&[]);
    assert!(diff < 1e-12, "ceu grad off by {diff}");
    // WGA / SatImp: ∂ℓ/∂z = w (e_y − p)/count with constant w.
    for (name, beta1, beta2) in [("wga", 0.7, 0.0), ("satimp", 5.0, 2.0)] {
        let z = z0.copy().set_requires_grad(true);
        let out = if name == "wga" {
            wga_loss(&z, &y, None, &WgaConfig::default().with_beta(beta1))?
        } else {
            satimp_loss(&z, &y, None, &SatImpConfig::default().with_beta2(beta2))?
        };
        out.loss.backward();
        let p = z0.softmax(-1, D);
        let py = p.gather(-1, &y.clamp_min(0).unsqueeze(-1), false);
        let w = py.pow_tensor_scalar(beta1) * (py.neg() + 1.0).pow_tensor_scalar(beta2);
        let onehot = y.clamp_min(0).one_hot(6).to_kind(D);
        let want = (w * (onehot - p)).where_scalarother(&active, 0.0) / out.count();
        let diff = (z.grad() - want).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "{name} grad off by {diff}");
    }
    Ok(())
}

#[test]
fn every_backend_agrees_with_the_composite() {
    for seed in 0..4 {
        let (z, zr, y) = batch(seed, Kind::Float);
        let composite: Vec<_> = {
            let zc = z.copy().set_requires_grad(true);
            all_losses(&zc, &zr, &y, TokenBackend::Composite)
                .into_iter()
                .map(|(n, o)| {
                    let g = Tensor::run_backward(&[&o.loss], &[&zc], false, false).remove(0);
                    (n, val(&o.loss), g)
                })
                .collect()
        };
        for backend in [TokenBackend::Kernel, TokenBackend::ClosedForm, TokenBackend::Auto] {
            let zk = z.copy().set_requires_grad(true);
            for ((n, o), (_, want, gw)) in
                all_losses(&zk, &zr, &y, backend).into_iter().zip(&composite)
            {
                let g = Tensor::run_backward(&[&o.loss], &[&zk], false, false).remove(0);
                assert!(
                    (val(&o.loss) - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{n} {backend:?}"
                );
                let d = (g - gw).abs().max().double_value(&[]);
                assert!(d < 1e-6, "{n} {backend:?}: grad off by {d}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Weights are in [0, 1], the losses are ≤ 0 for the ascent ones and ≥ 0 for the
    /// distillation ones, and a split batch recombines exactly through (sum, count).
    #[test]
    fn bounds_and_exact_recombination(seed in 0i64..10_000) {
        let (z, zr, y) = batch(seed, D);
        for (name, out) in all_losses(&z, &zr, &y, TokenBackend::Auto) {
            let v = val(&out.loss);
            if name == "wga" || name == "satimp" {
                prop_assert!(v <= 0.0, "{name}: {v}");
                let w = out.metrics.mean(if name == "wga" { "wga/weight" } else { "satimp/weight" }).unwrap();
                prop_assert!((0.0..=1.0).contains(&w));
            } else {
                prop_assert!(v >= 0.0, "{name}: {v}");
            }
            // Rows 0 and 1 as two micro-batches.
            let halves: Vec<(f64, f64)> = (0..2)
                .map(|r| {
                    let o = all_losses(&z.narrow(0, r, 1), &zr.narrow(0, r, 1), &y.narrow(0, r, 1), TokenBackend::Auto)
                        .into_iter()
                        .find(|(n, _)| *n == name)
                        .unwrap()
                        .1;
                    (val(&o.parts[0].sum), o.parts[0].count)
                })
                .collect();
            let (s, c) = halves.iter().fold((0.0, 0.0), |a, h| (a.0 + h.0, a.1 + h.1));
            let whole = if c == 0.0 { 0.0 } else { s / c };
            prop_assert!((whole - v).abs() <= 1e-12 * v.abs().max(1.0), "{name}: {whole} vs {v}");
        }
    }
}

#[test]
fn rmu_value_gradient_and_control_vector() -> Result<()> {
    tch::manual_seed(5);
    let u = rmu_control_vector(8, 6.5, D, Device::Cpu)?;
    assert!((val(&u.norm()) - 6.5).abs() < 1e-12);
    assert!(vals(&u).iter().all(|&x| x >= 0.0), "U[0,1) direction, as the reference draws it");
    let h = Tensor::randn([2, 3, 8], (D, Device::Cpu)).set_requires_grad(true);
    let m = Tensor::from_slice(&[true, true, false, true, false, false]).view([2, 3]);
    let hr = Tensor::randn([1, 2, 8], (D, Device::Cpu)).set_requires_grad(true);
    let hr_ref = Tensor::randn([1, 2, 8], (D, Device::Cpu));
    let mr = Tensor::from_slice(&[true, true]).view([1, 2]);
    let cfg = RmuConfig::default().with_forget_weight(0.5).with_retain_weight(2.0);
    let out = rmu_loss(&h, &m, &u, Some((&hr, &hr_ref, &mr)), &cfg)?;
    let hd = h.detach();
    let mse = |a: Tensor, b: &Tensor| (a - b).square().mean_dim([-1i64].as_slice(), false, D);
    let f = mse(hd.shallow_clone(), &u.view([1, 1, 8]));
    let f0 = (f.get(0).get(0) + f.get(0).get(1)) / 2.0;
    let f1 = f.get(1).get(0);
    let r = mse(hr.detach(), &hr_ref).get(0).sum(D) / 2.0;
    let want = 0.5 * val(&((f0 + f1) / 2.0)) + 2.0 * val(&r);
    assert!((val(&out.loss) - want).abs() < 1e-12);
    out.loss.backward();
    // ∂/∂h at an unmasked position is 0; at a masked one 0.5 · (1/2 seqs) · (1/n_b) · 2(h − u)/D.
    assert_eq!(vals(&h.grad().get(0).get(2)).iter().map(|x| x.abs()).sum::<f64>(), 0.0);
    let g = h.grad().get(1).get(0);
    let expect = (hd.get(1).get(0) - &u) * (0.5 * 0.5 * 2.0 / 8.0);
    assert!(val(&(g - expect).abs().max()) < 1e-12);
    // Empty sequences follow the policy.
    let m0 = Tensor::from_slice(&[true, false, false, false, false, false]).view([2, 3]);
    assert!(matches!(
        rmu_loss(&h, &m0, &u, None, &RmuConfig::default()),
        Err(Error::EmptySequence { index: 1, .. })
    ));
    let masked =
        rmu_loss(&h, &m0, &u, None, &RmuConfig::default().with_empty_policy(EmptyPolicy::Mask))?;
    assert_eq!(masked.parts[0].count, 1.0);
    Ok(())
}

#[test]
fn bad_input_is_a_typed_error() {
    let (z, zr, y) = batch(1, Kind::Float);
    assert!(matches!(
        WgaConfig::default().with_beta(-1.0).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        SatImpConfig::default().with_beta2(f64::NAN).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        UndialConfig::default().with_beta(f64::INFINITY).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        undial_loss(&z, &zr, &y, None, &UndialConfig::default().with_beta(1e39)),
        Err(Error::InvalidConfig { name: "beta", .. })
    ));
    // Position (0, 2) is active for every loss; the random labels depend on the CPU's kernels.
    let big = y.copy();
    let _ = big.get(0).get(2).fill_(99);
    for r in [
        ceu_loss(&z, &big, None, &CeuConfig::default().with_ignore_first_n_answer_tokens(0))
            .map(|_| ()),
        undial_loss(&z, &zr, &big, None, &UndialConfig::default()).map(|_| ()),
        wga_loss(&z, &big, None, &WgaConfig::default()).map(|_| ()),
        satimp_loss(&z, &big, None, &SatImpConfig::default()).map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::LabelOutOfRange { .. })), "{r:?}");
    }
    let short = z.narrow(1, 0, 3);
    assert!(matches!(
        ceu_loss(&short, &y, None, &CeuConfig::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        undial_loss(&z, &short, &y, None, &UndialConfig::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    let nan = z.copy();
    // Position (0, 2): active for every loss (CE-U drops (0, 1), the row's first answer token).
    let _ = nan.get(0).get(2).get(2).fill_(f64::NAN);
    assert!(matches!(
        wga_loss(&nan, &y, None, &WgaConfig::default()),
        Err(Error::NonFiniteLogits { .. })
    ));
    assert!(matches!(
        ceu_loss(&nan, &y, None, &CeuConfig::default()),
        Err(Error::NonFiniteLogits { .. })
    ));
    // A fully masked batch is an exact zero with a zero gradient.
    let none = y.full_like(-100);
    let zg = z.copy().set_requires_grad(true);
    for (_, out) in all_losses(&zg, &zr, &none, TokenBackend::Auto) {
        assert_eq!((val(&out.loss), out.count()), (0.0, 0.0));
    }
    let h = Tensor::zeros([1, 2, 4], (Kind::Float, Device::Cpu));
    let m = Tensor::ones([1, 2], (Kind::Bool, Device::Cpu));
    assert!(matches!(
        rmu_loss(
            &h,
            &m,
            &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            None,
            &RmuConfig::default()
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(rmu_control_vector(0, 1.0, Kind::Float, Device::Cpu).is_err());
    let _ = Reduction::Mean;
}
