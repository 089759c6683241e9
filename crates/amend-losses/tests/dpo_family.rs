//! The TRL-level DPO family and CPO: closed-form values, finite-difference gradients (f64),
//! properties that tie the loss types together, and the errors of bad configs and inputs.
//! The peers' own code is checked in `peer_fixtures.rs`.

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{Error, LossOutput, Reduction, Result};
use proptest::prelude::*;
use sequence_support::*;
use tch::{Device, Kind, Tensor};

const D: Kind = Kind::Double;
const LN2: f64 = std::f64::consts::LN_2;

fn softplus(x: f64) -> f64 {
    if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn from_sums(s: &[f64], n: &[i64]) -> SeqLogps {
    SeqLogps::from_sums(&t(s, D), &ti(n)).unwrap()
}

/// One pair: S_c, S_r, R_c, R_r, n_c, n_r → the loss under `cfg`.
fn one(cfg: &DpoConfig, s: [f64; 4], n: [i64; 2]) -> f64 {
    let out = dpo_loss(
        &from_sums(&[s[0]], &[n[0]]),
        &from_sums(&[s[1]], &[n[1]]),
        &t(&[s[2]], D),
        &t(&[s[3]], D),
        cfg,
    )
    .unwrap();
    val(&out.loss)
}

fn dpo(t_: DpoLossType) -> DpoConfig {
    let eps = match t_ {
        DpoLossType::ExoPair => 1e-3,
        DpoLossType::Robust | DpoLossType::Cdpo => 0.1,
        _ => 0.0,
    };
    DpoConfig::default().with_loss_type(t_).with_label_smoothing(eps)
}

#[test]
fn closed_form_values_of_every_loss_type() {
    // ρ_c = −10 − (−11) = 1, ρ_r = −12 − (−11.5) = −0.5, Δ = 1.5, n = (5, 3), β = 0.5.
    let s = [-10.0, -12.0, -11.0, -11.5];
    let n = [5, 3];
    let (b, rc, rr, d) = (0.5, 1.0, -0.5, 1.5);
    let cases: Vec<(DpoLossType, f64, f64)> = vec![
        (DpoLossType::Sigmoid, 0.0, softplus(-b * d)),
        (DpoLossType::Sigmoid, 0.2, 0.8 * softplus(-b * d) + 0.2 * softplus(b * d)),
        (DpoLossType::Cdpo, 0.2, 0.8 * softplus(-b * d) + 0.2 * softplus(b * d)),
        (DpoLossType::TrlSigmoid, 0.2, softplus(-b * d)),
        (DpoLossType::Robust, 0.2, (0.8 * softplus(-b * d) - 0.2 * softplus(b * d)) / 0.6),
        (DpoLossType::Ipo, 0.0, (rc / 5.0 - rr / 3.0 - 1.0 / (2.0 * b)).powi(2)),
        (DpoLossType::Hinge, 0.0, (1.0 - b * d).max(0.0)),
        (DpoLossType::ExoPair, 0.01, {
            let (qw, ql) = (sigmoid(b * d), sigmoid(-b * d));
            qw * (qw.ln() - 0.99f64.ln()) + ql * (ql.ln() - 0.01f64.ln())
        }),
        (
            DpoLossType::NcaPair,
            0.0,
            softplus(-b * rc) + 0.5 * softplus(b * rc) + 0.5 * softplus(b * rr),
        ),
        (DpoLossType::BcoPair, 0.0, softplus(-b * rc) + softplus(b * rr)),
        (DpoLossType::SppoHard, 0.0, (rc - 1.0).powi(2) + (rr + 1.0).powi(2)),
        // One pair: sorting is the identity, AOT = cDPO on (S_c − S_r) − (R_c − R_r) = Δ.
        (DpoLossType::Aot, 0.1, 0.9 * softplus(-b * d) + 0.1 * softplus(b * d)),
        (DpoLossType::AotUnpaired, 0.1, 0.9 * softplus(-b * d) + 0.1 * softplus(b * d)),
        (DpoLossType::ApoZero, 0.0, 1.0 - sigmoid(b * rc) + sigmoid(b * rr)),
        (DpoLossType::ApoDown, 0.0, sigmoid(b * rc) + 1.0 - sigmoid(b * (rc - rr))),
        (DpoLossType::Discopop, 0.0, {
            let (l, m) = (b * d, sigmoid(b * d / 0.05));
            softplus(-l) * (1.0 - m) + (-l).exp() * m
        }),
        (DpoLossType::Sft, 0.0, 10.0 / 5.0),
        (DpoLossType::SigmoidNorm, 0.0, softplus(-b * (rc / 5.0 - rr / 3.0))),
    ];
    for (lt, eps, want) in cases {
        let cfg = DpoConfig::default().with_beta(b).with_loss_type(lt).with_label_smoothing(eps);
        let got = one(&cfg, s, n);
        assert!((got - want).abs() < 1e-12, "{lt:?} ε={eps}: {got} vs {want}");
    }
}

#[test]
fn f_divergence_scores() {
    let s = [-10.0, -12.0, -11.0, -11.5];
    let (rc, rr) = (1.0f64, -0.5f64);
    let b = 0.5;
    let base = DpoConfig::default().with_beta(b);
    let check = |fd: FDivergence, coef: f64, sc: f64, sr: f64| {
        let cfg = base.clone().with_f_divergence_type(fd).with_f_alpha_divergence_coef(coef);
        let got = one(&cfg, s, [5, 3]);
        let want = softplus(-b * (sc - sr));
        assert!((got - want).abs() < 1e-12, "{fd:?}: {got} vs {want}");
    };
    check(FDivergence::ReverseKl, 0.5, rc, rr);
    check(FDivergence::ForwardKl, 0.5, 1.0 - (-rc).exp(), 1.0 - (-rr).exp());
    check(FDivergence::JsDivergence, 0.5, LN2 - softplus(-rc), LN2 - softplus(-rr));
    let a = 0.3;
    check(
        FDivergence::AlphaDivergence,
        a,
        (((a - 1.0) * rc).exp() - 1.0) / (a - 1.0),
        (((a - 1.0) * rr).exp() - 1.0) / (a - 1.0),
    );
    check(FDivergence::AlphaDivergence, 1.0, rc, rr); // the limit is the reverse KL
}

#[test]
fn gradcheck_every_loss_type_and_option() -> Result<()> {
    let n_c = ti(&[3, 5, 2, 4]);
    let n_r = ti(&[4, 2, 6, 1]);
    let r_c = t(&[-7.0, -9.5, -3.0, -4.0], D);
    let r_r = t(&[-8.0, -4.0, -10.0, -2.0], D);
    let w = t(&[0.3, 1.0, 0.7, 2.0], D);
    // Distinct sort keys keep AOT's permutation fixed under the ±h perturbation.
    let x0 = [-6.5, -8.3, -2.3, -4.6, -7.0, -5.0, -11.4, -1.2];
    let mut cfgs: Vec<DpoConfig> =
        DpoLossType::ALL.iter().map(|&t| dpo(t).with_beta(0.4)).collect();
    for fd in [FDivergence::ForwardKl, FDivergence::JsDivergence, FDivergence::AlphaDivergence] {
        for lt in
            [DpoLossType::Sigmoid, DpoLossType::Ipo, DpoLossType::ExoPair, DpoLossType::Discopop]
        {
            cfgs.push(dpo(lt).with_f_divergence_type(fd));
        }
    }
    cfgs.push(DpoConfig::default().with_mixture(&[
        (DpoLossType::Sigmoid, 1.0),
        (DpoLossType::BcoPair, 0.3),
        (DpoLossType::Sft, 0.5),
    ]));
    for cfg in &cfgs {
        for weighted in [false, true] {
            if weighted
                && cfg
                    .loss_type
                    .as_slice()
                    .iter()
                    .any(|t| matches!(t, DpoLossType::Aot | DpoLossType::AotUnpaired))
            {
                continue;
            }
            fd_check(&format!("{cfg:?} weighted={weighted}"), &x0, |x| {
                let c = SeqLogps::from_sums(&x.narrow(0, 0, 4), &n_c)?;
                let r = SeqLogps::from_sums(&x.narrow(0, 4, 4), &n_r)?;
                let out = if weighted {
                    dpo_loss_weighted(&c, &r, &r_c, &r_r, &w, cfg)?
                } else {
                    dpo_loss(&c, &r, &r_c, &r_r, cfg)?
                };
                Ok(out.loss)
            })?;
        }
    }
    for cfg in [
        CpoConfig::default(),
        CpoConfig::default().with_label_smoothing(0.2).with_cpo_alpha(0.5),
        CpoConfig::default().with_loss_type(CpoLossType::Hinge).with_beta(0.05),
        CpoConfig::default().with_loss_type(CpoLossType::Ipo),
        CpoConfig::default().with_loss_type(CpoLossType::Simpo).with_beta(2.0),
        CpoConfig::default().with_loss_type(CpoLossType::Simpo).with_alpha(0.25),
        CpoConfig::default().with_alpha(-0.1),
    ] {
        fd_check(&format!("{cfg:?}"), &x0, |x| {
            let c = SeqLogps::from_sums(&x.narrow(0, 0, 4), &n_c)?;
            let r = SeqLogps::from_sums(&x.narrow(0, 4, 4), &n_r)?;
            Ok(cpo_loss(&c, &r, &cfg)?.loss)
        })?;
    }
    Ok(())
}

#[test]
fn gradcheck_ld_logps_and_wpo_path_through_logits() -> Result<()> {
    let (b, tt, v) = (4, 6, 5);
    tch::manual_seed(3);
    let x0 = vals(&(Tensor::rand([b * tt * v], (D, Device::Cpu)) * 6.0 - 3.0));
    let ids = Tensor::randint(v, [b, tt], (Kind::Int64, Device::Cpu));
    let mask = Tensor::from_slice(&[
        0i64, 1, 1, 1, 1, 0, //
        0, 0, 1, 0, 0, 0, //
        0, 1, 1, 0, 0, 0, //
        0, 0, 1, 1, 1, 1,
    ])
    .view([b, tt]);
    let reference = Tensor::rand([b * tt * v], (D, Device::Cpu)).view([b, tt, v]);
    let cfg = SeqLogpsConfig { return_per_token: true, ..Default::default() };
    let dcfg =
        DpoConfig::default().with_mixture(&[(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)]);
    // WPO's weights are constants (TRL computes them under no_grad): hold them at x0.
    let w = wpo_weights(&t(&x0, D).view([b, tt, v]), &ids, &mask)?;
    let pw = w.narrow(0, 0, 2) * w.narrow(0, 2, 2);
    for alpha in [0.0, 0.4, 1.0] {
        fd_check(&format!("ld {alpha} + wpo"), &x0, |x| {
            let z = x.view([b, tt, v]);
            let (c, r) = seq_logps(&z, &ids, &mask, &cfg)?.f_split_at(2)?;
            let (c, r) = ld_logps(&c, &r, alpha)?;
            let refs = tch::no_grad(|| seq_logps(&reference, &ids, &mask, &cfg))?;
            let (rc, rr) = refs.f_split_at(2)?;
            let (rc, rr) = ld_logps(&rc, &rr, alpha)?;
            Ok(dpo_loss_weighted(&c, &r, &rc.sum, &rr.sum, &pw, &dcfg)?.loss)
        })?;
    }
    Ok(())
}

#[test]
fn ld_logps_weights_the_tail_beyond_the_shared_length() -> Result<()> {
    // chosen: 3 scored tokens at shifted positions 1, 2, 4; rejected: 1 token → ℓ = 1.
    let pt_c = t(&[0.0, -1.0, -2.0, 0.0, -4.0], D).view([1, 5]);
    let m_c = Tensor::from_slice(&[false, true, true, false, true]).view([1, 5]);
    let pt_r = t(&[-3.0, 0.0, 0.0], D).view([1, 3]);
    let m_r = Tensor::from_slice(&[true, false, false]).view([1, 3]);
    let mk = |pt: &Tensor, m: &Tensor| SeqLogps {
        sum: pt.sum_dim_intlist([1i64].as_slice(), false, D),
        len: m.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64),
        per_token: Some(pt.shallow_clone()),
        mask: Some(m.shallow_clone()),
        stats: None,
    };
    let (c, r) = ld_logps(&mk(&pt_c, &m_c), &mk(&pt_r, &m_r), 0.25)?;
    assert_eq!(val(&c.sum), -1.0 + 0.25 * (-2.0 - 4.0));
    assert_eq!(val(&r.sum), -3.0);
    assert_eq!(vals(&c.len), vec![3.0]);
    // The sft term reads the unweighted per-token log-probs.
    let sft = DpoConfig::default().with_loss_type(DpoLossType::Sft);
    let out = dpo_loss(&c, &r, &t(&[0.0], D), &t(&[0.0], D), &sft)?;
    assert_eq!(val(&out.loss), 7.0 / 3.0);
    Ok(())
}

#[test]
fn aot_sorts_over_the_batch() -> Result<()> {
    // S_c − S_r = [3, −1], R_c − R_r = [0, 2]: sorted [−1, 3] − [0, 2] = [−1, 1].
    let c = from_sums(&[-1.0, -5.0], &[1, 1]);
    let r = from_sums(&[-4.0, -4.0], &[1, 1]);
    let (rc, rr) = (t(&[-2.0, -1.0], D), t(&[-2.0, -3.0], D));
    let cfg = DpoConfig::default().with_beta(1.0).with_loss_type(DpoLossType::Aot);
    let out = dpo_loss(&c, &r, &rc, &rr, &cfg.with_reduction(Reduction::None))?;
    let got = vals(&out.per_example);
    assert!((got[0] - softplus(1.0)).abs() < 1e-12 && (got[1] - softplus(-1.0)).abs() < 1e-12);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A mixture is the weighted sum of its terms, per pair and reduced, and its parts are the
    /// terms' parts.
    #[test]
    fn mixture_is_the_weighted_sum_of_its_terms(
        sums in prop::collection::vec(-30.0f64..-0.5, 8),
        w in prop::collection::vec(0.0f64..2.0, 3),
        beta in 0.05f64..2.0,
        picks in prop::collection::vec(0usize..13, 3),
    ) {
        let pool = [
            DpoLossType::Sigmoid, DpoLossType::Hinge, DpoLossType::Ipo, DpoLossType::NcaPair,
            DpoLossType::BcoPair, DpoLossType::SppoHard, DpoLossType::ApoZero, DpoLossType::ApoDown,
            DpoLossType::Discopop, DpoLossType::Sft, DpoLossType::SigmoidNorm, DpoLossType::TrlSigmoid,
            DpoLossType::AotUnpaired,
        ];
        let c = from_sums(&sums[0..2], &[3, 4]);
        let r = from_sums(&sums[2..4], &[2, 5]);
        let (rc, rr) = (t(&sums[4..6], D), t(&sums[6..8], D));
        let terms: Vec<(DpoLossType, f64)> = picks.iter().zip(&w).map(|(&i, &w)| (pool[i], w)).collect();
        let mix = DpoConfig::default().with_beta(beta).with_mixture(&terms);
        let out = dpo_loss(&c, &r, &rc, &rr, &mix).unwrap();
        let mut want = 0.0;
        let mut want_pe = [0.0; 2];
        for &(lt, wk) in &terms {
            let single = dpo_loss(&c, &r, &rc, &rr, &DpoConfig::default().with_beta(beta).with_loss_type(lt)).unwrap();
            want += wk * val(&single.loss);
            let pe = vals(&single.per_example);
            want_pe[0] += wk * pe[0];
            want_pe[1] += wk * pe[1];
        }
        prop_assert!((val(&out.loss) - want).abs() <= 1e-10 * want.abs().max(1.0));
        let pe = vals(&out.per_example);
        prop_assert!((pe[0] - want_pe[0]).abs() <= 1e-10 * want_pe[0].abs().max(1.0));
        prop_assert!((pe[1] - want_pe[1]).abs() <= 1e-10 * want_pe[1].abs().max(1.0));
        prop_assert_eq!(out.parts.len(), 3);
    }

    /// Unit weights change nothing; weights scale each pair's loss.
    #[test]
    fn pair_weights_scale_each_pair(
        sums in prop::collection::vec(-30.0f64..-0.5, 6),
        w in prop::collection::vec(0.0f64..3.0, 3),
        pick in 0usize..17,
    ) {
        let lt = DpoLossType::ALL[pick];
        prop_assume!(!matches!(lt, DpoLossType::Aot | DpoLossType::AotUnpaired));
        let cfg = dpo(lt).with_reduction(Reduction::None);
        let c = from_sums(&sums[0..3], &[3, 4, 1]);
        let r = from_sums(&sums[3..6], &[2, 5, 6]);
        let (rc, rr) = (t(&[-3.0, -9.0, -1.0], D), t(&[-5.0, -2.0, -8.0], D));
        let plain = vals(&dpo_loss(&c, &r, &rc, &rr, &cfg).unwrap().per_example);
        let ones = vals(&dpo_loss_weighted(&c, &r, &rc, &rr, &t(&[1.0; 3], D), &cfg).unwrap().per_example);
        let weighted = vals(&dpo_loss_weighted(&c, &r, &rc, &rr, &t(&w, D), &cfg).unwrap().per_example);
        for i in 0..3 {
            prop_assert_eq!(plain[i], ones[i]);
            prop_assert!((weighted[i] - w[i] * plain[i]).abs() <= 1e-12 * plain[i].abs().max(1.0));
        }
    }

    /// At α = 1 length desensitisation is the identity.
    #[test]
    fn ld_alpha_one_is_standard_dpo(seed in 0i64..500) {
        tch::manual_seed(seed);
        let z = Tensor::randn([4, 6, 5], (D, Device::Cpu));
        let ids = Tensor::randint(5, [4, 6], (Kind::Int64, Device::Cpu));
        let mask = Tensor::rand([4, 6], (D, Device::Cpu)).gt(0.4);
        let cfg = SeqLogpsConfig { return_per_token: true, ..Default::default() };
        let (c, r) = seq_logps(&z, &ids, &mask, &cfg).unwrap().f_split_at(2).unwrap();
        let (lc, lr) = ld_logps(&c, &r, 1.0).unwrap();
        prop_assert!(vals(&lc.sum).iter().zip(vals(&c.sum)).all(|(a, b)| (a - b).abs() < 1e-12));
        prop_assert!(vals(&lr.sum).iter().zip(vals(&r.sum)).all(|(a, b)| (a - b).abs() < 1e-12));
    }
}

fn fd_check(what: &str, x0: &[f64], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let x = leaf(x0, D);
    f(&x)?.backward();
    let analytic = vals(&x.grad());
    let h = 1e-6;
    for i in 0..x0.len() {
        let mut p = x0.to_vec();
        let mut m = x0.to_vec();
        p[i] += h;
        m[i] -= h;
        let fd = (val(&f(&t(&p, D))?) - val(&f(&t(&m, D))?)) / (2.0 * h);
        let tol = 1e-6 * fd.abs().max(1.0);
        assert!(
            (analytic[i] - fd).abs() <= tol,
            "{what}: d/dx[{i}] autograd {} vs fd {fd}",
            analytic[i]
        );
    }
    Ok(())
}

#[test]
fn bad_configs_and_inputs_are_typed_errors() {
    let invalid = |cfg: DpoConfig| {
        let r = cfg.validate();
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{cfg:?}: {r:?}");
        r.unwrap_err().to_string()
    };
    invalid(DpoConfig::default().with_loss_type(Vec::new()));
    let msg = invalid(
        DpoConfig::default()
            .with_loss_type([DpoLossType::Sigmoid, DpoLossType::Sft])
            .with_mixture(&[(DpoLossType::Sft, 1.0)])
            .with_loss_type([DpoLossType::Sigmoid, DpoLossType::Ipo]),
    );
    assert!(msg.contains("1 weights for 2 loss types"), "{msg}");
    let msg = invalid(dpo(DpoLossType::ExoPair).with_label_smoothing(0.0));
    assert!(msg.contains("exo_pair"), "{msg}");
    let msg = invalid(dpo(DpoLossType::NcaPair).with_f_divergence_type(FDivergence::ForwardKl));
    assert!(msg.contains("nca_pair"), "{msg}");
    let msg =
        invalid(DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_label_smoothing(0.1));
    assert!(msg.contains("must be 0 for ipo"), "{msg}");
    invalid(DpoConfig::default().with_mixture(&[(DpoLossType::Sigmoid, -1.0)]));
    invalid(DpoConfig::default().with_discopop_tau(0.0));
    invalid(DpoConfig::default().with_f_alpha_divergence_coef(f64::NAN));
    invalid(dpo(DpoLossType::Robust).with_label_smoothing(0.5));
    assert!(
        dpo(DpoLossType::Robust)
            .with_mixture(&[(DpoLossType::Robust, 1.0), (DpoLossType::Ipo, 1.0)])
            .validate()
            .is_ok()
    );
    for bad in [
        CpoConfig::default().with_beta(0.0),
        CpoConfig::default().with_cpo_alpha(-1.0),
        CpoConfig::default().with_loss_type(CpoLossType::Hinge).with_label_smoothing(0.1),
        CpoConfig::default().with_alpha(f64::INFINITY),
    ] {
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig { .. })), "{bad:?}");
    }

    let c = from_sums(&[-1.0, -2.0], &[1, 2]);
    let r = from_sums(&[-3.0, -2.0], &[1, 2]);
    let (rc, rr) = (t(&[-1.0, -1.0], D), t(&[-1.0, -1.0], D));
    let aot = DpoConfig::default().with_loss_type(DpoLossType::Aot);
    let e = dpo_loss_weighted(&c, &r, &rc, &rr, &t(&[1.0, 1.0], D), &aot).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "loss_type", .. }), "{e}");
    let e = dpo_loss_weighted(&c, &r, &rc, &rr, &t(&[1.0, -1.0], D), &DpoConfig::default())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { name: "pair_weights", .. }), "{e}");
    let e = dpo_loss_weighted(&c, &r, &rc, &rr, &t(&[1.0], D), &DpoConfig::default()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = dpo_loss_weighted(&c, &r, &rc, &rr, &t(&[1.0, f64::NAN], D), &DpoConfig::default())
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(matches!(ld_logps(&c, &r, 1.5), Err(Error::InvalidConfig { .. })));
    assert!(
        matches!(ld_logps(&c, &r, 0.5), Err(Error::InvalidInput { .. })),
        "from_sums has no per-token log-probs"
    );
    // Empty responses under sigmoid_norm follow the empty policy.
    let e0 = from_sums(&[0.0, -2.0], &[0, 2]);
    let norm = DpoConfig::default().with_loss_type(DpoLossType::SigmoidNorm);
    assert!(matches!(
        dpo_loss(&e0, &r, &rc, &rr, &norm),
        Err(Error::EmptySequence { index: 0, .. })
    ));
    let masked = dpo_loss(&e0, &r, &rc, &rr, &norm.with_empty_policy(EmptyPolicy::Mask)).unwrap();
    assert_eq!(masked.count(), 1.0);
    // wpo_weights: ids out of range.
    let z = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[0i64, 9, 1]).view([1, 3]);
    let m = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
    assert!(wpo_weights(&z, &ids, &m).is_err());
}

#[test]
fn loss_type_deserialises_from_a_name_or_a_list() {
    let one: DpoConfig =
        serde_json::from_str(r#"{"loss_type": "exo_pair", "label_smoothing": 0.001}"#).unwrap();
    assert_eq!(one.loss_type, DpoLossType::ExoPair);
    let many: DpoConfig =
        serde_json::from_str(r#"{"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}"#)
            .unwrap();
    assert_eq!(many.terms(), vec![(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)]);
    let e =
        serde_json::from_str::<DpoConfig>(r#"{"loss_type": ["sigmoid", "kto_pair"]}"#).unwrap_err();
    assert!(e.to_string().contains("unknown variant `kto_pair`"), "{e}");
    assert!(e.to_string().contains("sigmoid_norm"), "the message lists the names: {e}");
    // Round trip: a single type serialises as a string, a mixture as a list.
    assert_eq!(serde_json::to_value(&one).unwrap()["loss_type"], "exo_pair");
    assert_eq!(
        serde_json::to_value(&many).unwrap()["loss_type"],
        serde_json::json!(["sigmoid", "sft"])
    );
    let f: DpoConfig = serde_json::from_str(r#"{"f_divergence_type": "js_divergence"}"#).unwrap();
    assert_eq!(f.f_divergence_type, FDivergence::JsDivergence);
    for lt in DpoLossType::ALL {
        let v = serde_json::to_value(lt).unwrap();
        assert_eq!(v, lt.name(), "name() is the serde name");
    }
    let c: CpoConfig = serde_json::from_str(
        r#"{"loss_type": "simpo", "simpo_gamma": 0.7, "cpo_alpha": 0.0, "alpha": 0.2}"#,
    )
    .unwrap();
    assert_eq!(
        (c.loss_type, c.simpo_gamma, c.cpo_alpha, c.alpha),
        (CpoLossType::Simpo, 0.7, 0.0, 0.2)
    );
}

#[test]
fn cpo_matches_its_closed_form() -> Result<()> {
    let c = from_sums(&[-10.0, -6.0], &[5, 2]);
    let r = from_sums(&[-12.0, -4.0], &[6, 4]);
    let nll = (10.0 + 6.0) / 7.0;
    let b = 0.5;
    let cases = [
        (CpoConfig::default().with_beta(b), 0.5 * (softplus(-b * 2.0) + softplus(b * 2.0)) + nll),
        (
            CpoConfig::default().with_beta(b).with_loss_type(CpoLossType::Ipo).with_cpo_alpha(0.0),
            0.5 * ((-2.0 + 2.0 - 1.0f64).powi(2) + (-3.0 + 1.0 - 1.0f64).powi(2)),
        ),
        (
            CpoConfig::default()
                .with_beta(b)
                .with_loss_type(CpoLossType::Simpo)
                .with_simpo_gamma(0.25),
            0.5 * (softplus(-(b * 0.0 - 0.25)) + softplus(-(b * -2.0 - 0.25))) + nll,
        ),
        (
            CpoConfig::default()
                .with_beta(b)
                .with_loss_type(CpoLossType::Hinge)
                .with_cpo_alpha(2.0),
            0.5 * ((1.0 - b * 2.0f64).max(0.0) + (1.0 + b * 2.0f64).max(0.0)) + 2.0 * nll,
        ),
    ];
    for (cfg, want) in cases {
        let got = val(&cpo_loss(&c, &r, &cfg)?.loss);
        assert!((got - want).abs() < 1e-12, "{cfg:?}: {got} vs {want}");
    }
    // AlphaPO: r = (1 − p^(−α))/α with p = e^x.
    let a = 0.2f64;
    let rw = |x: f64| (1.0 - (-a * x).exp()) / a;
    let cfg = CpoConfig::default().with_beta(b).with_alpha(a).with_cpo_alpha(0.0);
    let want =
        0.5 * (softplus(-b * (rw(-10.0) - rw(-12.0))) + softplus(-b * (rw(-6.0) - rw(-4.0))));
    let out = cpo_loss(&c, &r, &cfg)?;
    assert!((val(&out.loss) - want).abs() < 1e-12);
    assert!((metric(&out, "rewards/chosen") - b * 0.5 * (rw(-10.0) + rw(-6.0))).abs() < 1e-12);
    let _: &LossOutput = &out;
    Ok(())
}
