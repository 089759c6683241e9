//! Properties of the sequence-level losses (spec §9): f64 finite-difference gradient checks of
//! every loss, invariances (RRHF/NEAT under increasing reward transforms and candidate
//! permutations, CP under permutations of P and N, chosen/rejected swap ↦ h → −h), exact
//! micro-batch recombination through `LossOutput::normalized_by`, `loss = Σ w·sum/count`,
//! padding invariance of the primitive and bf16 inputs equal to the same values in f32.

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{LossOutput, Result};
use proptest::prelude::*;
use sequence_support::*;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;
const D: Kind = Kind::Double;

// ------------------------------------------------------------------ finite differences

/// Checks autograd against central differences (h = 1e-6) of `f` at `x0`.
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

fn random(seed: i64, n: i64, scale: f64, shift: f64) -> Vec<f64> {
    tch::manual_seed(seed);
    vals(&(Tensor::rand([n], (D, CPU)) * scale + shift))
}

#[test]
fn gradcheck_seq_logps_against_finite_differences() -> Result<()> {
    let (b, tt, v) = (2, 5, 4);
    let x0 = random(1, b * tt * v, 6.0, -3.0);
    tch::manual_seed(2);
    let ids = Tensor::randint(v, [b, tt], (Kind::Int64, CPU));
    let mask = ti(&[0, 1, 1, 0, 1, 1, 1, 1, 1, 0]).view([b, tt]);
    let w = t(&[0.7, -1.3], D);
    fd_check("seq_logps", &x0, |x| {
        let lp = seq_logps(&x.view([b, tt, v]), &ids, &mask, &SeqLogpsConfig::default())?;
        Ok((lp.sum * &w).sum(D))
    })
}

#[test]
fn gradcheck_fused_linear_against_finite_differences() -> Result<()> {
    let (b, tt, h, v) = (2, 4, 3, 5);
    let h0 = random(3, b * tt * h, 2.0, -1.0);
    let w0 = random(4, v * h, 2.0, -1.0);
    tch::manual_seed(5);
    let ids = Tensor::randint(v, [b, tt], (Kind::Int64, CPU));
    let mask = ti(&[0, 1, 1, 1, 1, 0, 1, 1]).view([b, tt]);
    let cfg = FusedLinearConfig::default().with_chunk_rows(2);
    let loss = |hid: &Tensor, w: &Tensor| -> Result<Tensor> {
        let fl = seq_logps_fused_linear(hid, w, None, &ids, &mask, &cfg)?;
        let s = &fl.logps().sum;
        let l = (s.get(0) * 0.3 - s.get(1)).sigmoid().log();
        fl.f_attach(&l)
    };
    let w = t(&w0, D).view([v, h]);
    fd_check("fused-linear dh", &h0, |x| loss(&x.view([b, tt, h]), &w))?;
    let hid = t(&h0, D).view([b, tt, h]);
    fd_check("fused-linear dW", &w0, |x| loss(&hid, &x.view([v, h])))
}

/// Finite-difference checks of every pairwise loss with respect to the chosen and rejected
/// sums (random points away from kinks).
#[test]
fn gradcheck_pairwise_losses() -> Result<()> {
    let n_c = ti(&[3, 5, 2]);
    let n_r = ti(&[4, 2, 6]);
    let r_c = t(&[-7.0, -9.5, -3.0], D);
    let r_r = t(&[-8.0, -4.0, -10.0], D);
    let nll = SeqLogps::from_sums(&t(&[-12.0, -15.0, -9.0], D), &ti(&[7, 9, 6]))?;
    let x0 = [-6.5, -8.0, -2.5, -7.0, -5.0, -11.0];
    let run = |name: &str, f: &dyn Fn(&SeqLogps, &SeqLogps) -> Result<LossOutput>| {
        fd_check(name, &x0, |x| {
            let c = SeqLogps::from_sums(&x.narrow(0, 0, 3), &n_c)?;
            let r = SeqLogps::from_sums(&x.narrow(0, 3, 3), &n_r)?;
            Ok(f(&c, &r)?.loss)
        })
    };
    for cfg in [
        DpoConfig::default(),
        DpoConfig::default().with_label_smoothing(0.2),
        DpoConfig::default().with_loss_type(DpoLossType::Robust).with_label_smoothing(0.1),
        DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_beta(0.5),
        DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_ipo_length_normalize(false),
        DpoConfig::default().with_loss_type(DpoLossType::Hinge).with_beta(0.05),
    ] {
        run(&format!("{cfg:?}"), &|c, r| dpo_loss(c, r, &r_c, &r_r, &cfg))?;
    }
    let simpo = SimPoConfig::default().with_label_smoothing(0.1).with_nll_weight(0.7);
    run("simpo", &|c, r| simpo_loss(c, r, &simpo))?;
    let orpo = OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly).with_beta(0.5);
    run("orpo response", &|c, r| orpo_loss(c, r, None, &orpo))?;
    run("orpo prompt+response", &|c, r| orpo_loss(c, r, Some(&nll), &OrpoConfig::default()))?;
    Ok(())
}

#[test]
fn gradcheck_kto_npo_simnpo_ga() -> Result<()> {
    let x0 = [-6.5, -8.0, -2.5, -7.0, -5.0];
    let n = ti(&[3, 5, 2, 4, 1]);
    let r = t(&[-7.0, -7.5, -3.0, -6.0, -5.5], D);
    let des = Tensor::from_slice(&[true, false, true, false, false]);
    let pk = t(&[-9.0, -8.0, -7.0, -6.0, -5.0], D);
    let rk = t(&[-9.5, -7.0, -7.5, -6.0, -4.0], D);
    let retain = SeqLogps::from_sums(&t(&[-3.0, -4.0], D), &ti(&[2, 3]))?;
    for cfg in [
        KtoConfig::default(),
        KtoConfig::default().with_beta(0.7).with_desirable_weight(1.3),
        KtoConfig::default().with_loss_type(KtoLossType::ApoZeroUnpaired),
    ] {
        fd_check("kto", &x0, |x| {
            let p = SeqLogps::from_sums(x, &n)?;
            let point = KtoReferencePoint::Estimate { policy_kl: &pk, reference_kl: &rk };
            Ok(kto_loss(&p, &r, &des, point, &cfg)?.loss)
        })?;
    }
    fd_check("npo", &x0, |x| {
        Ok(npo_loss(
            &SeqLogps::from_sums(x, &n)?,
            &r,
            Some(&retain),
            &NpoConfig::default().with_beta(0.4),
        )?
        .loss)
    })?;
    fd_check("simnpo", &x0, |x| {
        let cfg = SimNpoConfig::default().with_beta(1.5).with_delta(0.3);
        Ok(simnpo_loss(&SeqLogps::from_sums(x, &n)?, Some(&retain), &cfg)?.loss)
    })?;
    for norm in [GaNorm::Token, GaNorm::Sequence, GaNorm::SequenceSum] {
        fd_check("gradient ascent", &x0, |x| {
            let cfg = GradientAscentConfig::default().with_norm(norm);
            Ok(gradient_ascent_loss(&SeqLogps::from_sums(x, &n)?, Some(&retain), &cfg)?.loss)
        })?;
    }
    Ok(())
}

#[test]
fn gradcheck_contrastive_perplexity() -> Result<()> {
    // Two anchors: 3 positives (one masked), 2 negatives, 2 random negatives.
    let x0 = [2.0, 1.4, 9.9, 2.6, 1.1, 3.3, 0.6, 2.9, 1.8, 3.7, 2.2, 4.1, 0.9, 1.6];
    let mp = ti(&[1, 1, 0, 1, 1, 1]).view([2, 3]);
    let mn = ti(&[1, 1, 1, 1]).view([2, 2]);
    let split = |x: &Tensor| {
        (
            x.narrow(0, 0, 6).view([2, 3]),
            x.narrow(0, 6, 4).view([2, 2]),
            x.narrow(0, 10, 4).view([2, 2]),
        )
    };
    for cfg in [
        CpConfig::default(),
        CpConfig::default().with_tau(0.5).with_alpha(Some(1.3)).with_beta(2.0),
    ] {
        // (detach_prototype is not checkable by finite differences, which move c too; its
        // gradient is the §3.5 "prototype detached" vector.)
        fd_check("cp paper", &x0, |x| {
            let (p, n, r) = split(x);
            Ok(contrastive_perplexity_loss(
                &CpGroups::new(&p, &n).with_masks(&mp, &mn).with_random(&r, None),
                &cfg,
            )?
            .loss)
        })?;
    }
    for cfg in [
        CpConfig::default().with_form(CpForm::Reference),
        CpConfig::default()
            .with_form(CpForm::Reference)
            .with_label_smoothing(0.2)
            .with_alpha(Some(0.5)),
    ] {
        fd_check("cp reference", &x0, |x| {
            let (p, n, r) = split(x);
            Ok(contrastive_perplexity_loss(&CpGroups::new(&p, &n).with_random(&r, None), &cfg)?
                .loss)
        })?;
    }
    Ok(())
}

#[test]
fn gradcheck_rrhf_and_neat() -> Result<()> {
    // Scores chosen so that no pair sits exactly at a hinge kink.
    let x0 = [-3.1, -0.7, -2.3, -1.9, -0.4, -5.2, -1.1, -0.9];
    let n = ti(&[3, 2, 4, 2, 1, 5, 2, 2]).view([2, 4]);
    let r = t(&[0.5, 2.0, 1.0, 2.0, -1.0, 0.3, 0.3, 1.2], D).view([2, 4]);
    let origin = ti(&[0, 1, 2, 0, 2, 0, 1, 2]).view([2, 4]);
    for lambda in [1.0, 0.0, 0.6] {
        fd_check("rrhf", &x0, |x| {
            let c = CandidateSet::new(&x.view([2, 4]), &n, &r)?;
            Ok(rrhf_loss(&c, &RrhfConfig::default().with_length_penalty(lambda))?.loss)
        })?;
    }
    for scoring in [NegScoring::RewardModel, NegScoring::ForcedLowest { delta: 1.0 }] {
        fd_check("neat", &x0, |x| {
            let c = CandidateSet::new(&x.view([2, 4]), &n, &r)?.with_origin(&origin)?;
            Ok(neat_loss(&c, &NeatConfig::default().with_neg_scoring(scoring))?.loss)
        })?;
    }
    Ok(())
}

// ------------------------------------------------------------------ micro-batches

/// Full batch vs two micro-batches back-propagating `normalized_by(global counts)`.
fn check_microbatches(
    what: &str,
    x0: &[f64],
    split: usize,
    f: &dyn Fn(&Tensor, std::ops::Range<usize>) -> Result<LossOutput>,
) -> Result<()> {
    let n = x0.len();
    let full_x = leaf(x0, D);
    let full = f(&full_x, 0..n)?;
    full.loss.backward();
    let a_x = leaf(x0, D);
    let b_x = leaf(x0, D);
    let a = f(&a_x, 0..split)?;
    let b = f(&b_x, split..n)?;
    let counts: Vec<f64> = a.parts.iter().zip(&b.parts).map(|(p, q)| p.count + q.count).collect();
    let la = a.normalized_by(&counts)?;
    let lb = b.normalized_by(&counts)?;
    (&la + &lb).backward();
    let total = val(&la) + val(&lb);
    assert!(
        (total - val(&full.loss)).abs() <= 1e-10 * total.abs().max(1.0),
        "{what}: {total} vs {}",
        val(&full.loss)
    );
    let g: Vec<f64> = vals(&a_x.grad()).iter().zip(vals(&b_x.grad())).map(|(x, y)| x + y).collect();
    assert_grads(D, &format!("{what} gradient"), &g, &vals(&full_x.grad()));
    // loss == Σ w·sum/count on the full batch.
    let recomposed: f64 = full
        .parts
        .iter()
        .map(|p| if p.count == 0.0 { 0.0 } else { p.weight * val(&p.sum) / p.count })
        .sum();
    assert!((recomposed - val(&full.loss)).abs() < 1e-12, "{what}: Σ w·sum/count");
    Ok(())
}

#[test]
fn microbatches_reproduce_the_full_batch_loss_and_gradient() -> Result<()> {
    let s = [-6.5, -8.0, -2.5, -7.0, -5.0, -11.0, -4.0, -3.5];
    let n = [3i64, 5, 2, 4, 1, 6, 2, 3];
    let r = [-7.0, -7.5, -3.0, -6.0, -5.5, -10.0, -4.4, -3.0];
    // Pairs: chosen = first 4, rejected = last 4; micro-batches split pairs 0..1 | 1..4.
    let pairs =
        |x: &Tensor,
         rg: std::ops::Range<usize>,
         f: &dyn Fn(&SeqLogps, &SeqLogps, &Tensor, &Tensor) -> Result<LossOutput>| {
            let (lo, len) = (rg.start as i64, (rg.end - rg.start) as i64);
            let c = SeqLogps::from_sums(&x.narrow(0, lo, len), &ti(&n[rg.clone()]))?;
            let rj =
                SeqLogps::from_sums(&x.narrow(0, 4 + lo, len), &ti(&n[4 + rg.start..4 + rg.end]))?;
            f(&c, &rj, &t(&r[rg.clone()], D), &t(&r[4 + rg.start..4 + rg.end], D))
        };
    // Pairs: micro-batches 0..1 and 1..4 of the pairs.
    for (name, f) in [
        (
            "dpo",
            &(|c: &SeqLogps, rj: &SeqLogps, rc: &Tensor, rr: &Tensor| {
                dpo_loss(c, rj, rc, rr, &DpoConfig::default())
            }) as &dyn Fn(&SeqLogps, &SeqLogps, &Tensor, &Tensor) -> Result<LossOutput>,
        ),
        ("simpo+nll", &|c, rj, _, _| {
            simpo_loss(c, rj, &SimPoConfig::default().with_nll_weight(1.0))
        }),
        ("orpo", &|c, rj, _, _| {
            orpo_loss(c, rj, None, &OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly))
        }),
    ] {
        let full_x = leaf(&s, D);
        let full = pairs(&full_x, 0..4, f)?;
        full.loss.backward();
        let xa = leaf(&s, D);
        let a = pairs(&xa, 0..1, f)?;
        let b = pairs(&xa, 1..4, f)?;
        let counts: Vec<f64> =
            a.parts.iter().zip(&b.parts).map(|(p, q)| p.count + q.count).collect();
        let total = a.normalized_by(&counts)? + b.normalized_by(&counts)?;
        assert!((val(&total) - val(&full.loss)).abs() < 1e-10, "{name}");
        total.backward();
        assert_grads(D, name, &vals(&xa.grad()), &vals(&full_x.grad()));
    }
    // Sequence-unit losses: split 3 | 5.
    let retain = SeqLogps::from_sums(&t(&[-3.0, -4.0], D), &ti(&[2, 3]))?;
    let seq = |x: &Tensor, rg: std::ops::Range<usize>| -> Result<SeqLogps> {
        SeqLogps::from_sums(&x.narrow(0, rg.start as i64, (rg.end - rg.start) as i64), &ti(&n[rg]))
    };
    check_microbatches("npo", &s, 3, &|x, rg| {
        npo_loss(&seq(x, rg.clone())?, &t(&r[rg], D), None, &NpoConfig::default())
    })?;
    check_microbatches("simnpo", &s, 3, &|x, rg| {
        simnpo_loss(&seq(x, rg)?, None, &SimNpoConfig::default())
    })?;
    check_microbatches("gradient ascent (token)", &s, 3, &|x, rg| {
        gradient_ascent_loss(&seq(x, rg)?, None, &GradientAscentConfig::default())
    })?;
    let des = [true, false, false, true, true, false, true, false];
    check_microbatches("kto (given z)", &s, 3, &|x, rg| {
        kto_loss(
            &seq(x, rg.clone())?,
            &t(&r[rg.clone()], D),
            &Tensor::from_slice(&des[rg]),
            KtoReferencePoint::Given(0.3),
            &KtoConfig::default(),
        )
    })?;
    // NPO with a retain part on the first micro-batch only: two parts, exact counts.
    let full_x = leaf(&s, D);
    let full = npo_loss(&seq(&full_x, 0..8)?, &t(&r, D), Some(&retain), &NpoConfig::default())?;
    full.loss.backward();
    let xa = leaf(&s, D);
    let a = npo_loss(&seq(&xa, 0..3)?, &t(&r[0..3], D), Some(&retain), &NpoConfig::default())?;
    let b = npo_loss(&seq(&xa, 3..8)?, &t(&r[3..8], D), None, &NpoConfig::default())?;
    let total = a.normalized_by(&[8.0, 5.0])? + b.normalized_by(&[8.0])?;
    assert!((val(&total) - val(&full.loss)).abs() < 1e-10, "npo + retain");
    total.backward();
    assert_grads(D, "npo + retain", &vals(&xa.grad()), &vals(&full_x.grad()));
    // Groups: RRHF over 2 groups of 4, CP paper over 2 anchors.
    let len = ti(&n).view([2, 4]);
    let rew = t(&[0.5, 2.0, 1.0, 2.0, -1.0, 0.3, 0.3, 1.2], D).view([2, 4]);
    check_microbatches("rrhf", &s, 4, &|x, rg| {
        let g = rg.start as i64 / 4;
        let k = (rg.end - rg.start) as i64 / 4;
        let c = CandidateSet::new(
            &x.narrow(0, rg.start as i64, 4 * k).view([k, 4]),
            &len.narrow(0, g, k),
            &rew.narrow(0, g, k),
        )?;
        rrhf_loss(&c, &RrhfConfig::default())
    })?;
    let phi = [2.0, 1.4, 2.6, 1.1, 3.3, 0.6, 2.9, 1.8];
    check_microbatches("cp paper", &phi, 4, &|x, rg| {
        let g = (rg.end - rg.start) as i64 / 4;
        let xs = x.narrow(0, rg.start as i64, 4 * g).view([g, 4]);
        contrastive_perplexity_loss(
            &CpGroups::new(&xs.narrow(1, 0, 2), &xs.narrow(1, 2, 2)),
            &CpConfig::default(),
        )
    })?;
    Ok(())
}

// ------------------------------------------------------------------ bf16 inputs

#[test]
fn bf16_sums_equal_the_same_values_in_f32() -> Result<()> {
    let s = [-6.5, -8.0, -2.5, -7.0, -5.0, -11.0];
    let n = ti(&[3, 5, 2, 4, 1, 6]);
    let r = [-7.0, -7.5, -3.0, -6.0, -5.5, -10.0];
    let as_kind = |k: Kind| t(&s, Kind::BFloat16).to_kind(k);
    type Loss = Box<dyn Fn(&SeqLogps, &Tensor) -> Result<LossOutput>>;
    let losses: Vec<(&str, Loss)> = vec![
        (
            "dpo",
            Box::new(|x, r| {
                let (c, rj) = x.f_split_at(3)?;
                dpo_loss(&c, &rj, &r.narrow(0, 0, 3), &r.narrow(0, 3, 3), &DpoConfig::default())
            }),
        ),
        (
            "simpo",
            Box::new(|x, _| {
                let (c, rj) = x.f_split_at(3)?;
                simpo_loss(&c, &rj, &SimPoConfig::default())
            }),
        ),
        (
            "orpo",
            Box::new(|x, _| {
                let (c, rj) = x.f_split_at(3)?;
                orpo_loss(
                    &c,
                    &rj,
                    None,
                    &OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly),
                )
            }),
        ),
        ("npo", Box::new(|x, r| npo_loss(x, r, None, &NpoConfig::default()))),
        ("simnpo", Box::new(|x, _| simnpo_loss(x, None, &SimNpoConfig::default()))),
        (
            "kto",
            Box::new(|x, r| {
                let des = Tensor::from_slice(&[true, false, true, false, true, false]);
                kto_loss(x, r, &des, KtoReferencePoint::Given(0.1), &KtoConfig::default())
            }),
        ),
        (
            "rrhf",
            Box::new(|x, _| {
                let rew = Tensor::from_slice(&[0.1f32, 0.5, 0.2, 0.9, 0.4, 0.3]).view([2, 3]);
                rrhf_loss(&CandidateSet::from_logps(x, &rew)?, &RrhfConfig::default())
            }),
        ),
    ];
    for (name, f) in losses {
        let x16 = as_kind(Kind::BFloat16).set_requires_grad(true);
        let x32 = as_kind(Kind::Float).set_requires_grad(true);
        let r16 = t(&r, Kind::BFloat16);
        let r32 = r16.to_kind(Kind::Float);
        let a = f(&SeqLogps::from_sums(&x16, &n)?, &r16)?;
        let b = f(&SeqLogps::from_sums(&x32, &n)?, &r32)?;
        assert_eq!(a.loss.kind(), Kind::Float, "{name}: computed in f32");
        assert_eq!(vals(&a.per_example), vals(&b.per_example), "{name}: values");
        a.loss.backward();
        b.loss.backward();
        assert_eq!(
            vals(&x16.grad()),
            vals(&x32.grad().to_kind(Kind::BFloat16)),
            "{name}: gradients"
        );
    }
    // CP from bf16 φ.
    let phi = t(&[2.0, 1.5, 3.0, 4.0 / 3.0], Kind::BFloat16).view([1, 4]);
    let a = contrastive_perplexity_loss(
        &CpGroups::new(&phi.narrow(1, 0, 2), &phi.narrow(1, 2, 2)),
        &CpConfig::default(),
    )?;
    let p32 = phi.to_kind(Kind::Float);
    let b = contrastive_perplexity_loss(
        &CpGroups::new(&p32.narrow(1, 0, 2), &p32.narrow(1, 2, 2)),
        &CpConfig::default(),
    )?;
    assert_eq!(val(&a.loss), val(&b.loss));
    Ok(())
}

// ------------------------------------------------------------------ proptest

fn rrhf_value(s: &[f64], n: &[i64], r: &[f64], cfg: &RrhfConfig) -> Result<(f64, f64)> {
    let k = s.len() as i64;
    let c = CandidateSet::new(&t(s, D).view([1, k]), &ti(n).view([1, k]), &t(r, D).view([1, k]))?;
    let out = rrhf_loss(&c, cfg)?;
    Ok((val(&out.loss), out.metrics.mean("rrhf/rank_loss").unwrap()))
}

fn neat_value(s: &[f64], n: &[i64], r: &[f64], o: &[i64], cfg: &NeatConfig) -> Result<(f64, f64)> {
    let k = s.len() as i64;
    let c = CandidateSet::new(&t(s, D).view([1, k]), &ti(n).view([1, k]), &t(r, D).view([1, k]))?
        .with_origin(&ti(o).view([1, k]))?;
    let out = neat_loss(&c, cfg)?;
    Ok((val(&out.loss), out.metrics.mean("rrhf/rank_loss").unwrap()))
}

/// (S, n, rewards with ties, origin codes, a permutation).
type Candidates = (Vec<f64>, Vec<i64>, Vec<f64>, Vec<i64>, Vec<usize>);

fn candidates_strategy() -> impl Strategy<Value = Candidates> {
    (2usize..7).prop_flat_map(|k| {
        (
            prop::collection::vec(-20.0f64..-0.1, k),
            prop::collection::vec(1i64..9, k),
            prop::collection::vec(-3i64..4, k)
                .prop_map(|v| v.into_iter().map(|x| x as f64 * 0.5).collect()),
            prop::collection::vec(0i64..3, k),
            Just((0..k).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

fn permute<T: Copy>(v: &[T], perm: &[usize]) -> Vec<T> {
    perm.iter().map(|&i| v[i]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn rrhf_neat_invariant_to_increasing_reward_transforms((s, n, r, o, _) in candidates_strategy()) {
        let tf: Vec<f64> = r.iter().map(|x| (x * 3.0).exp() + x.powi(3) - 7.0).collect();
        let cfg = RrhfConfig::default();
        let (a, _) = rrhf_value(&s, &n, &r, &cfg).unwrap();
        let (b, _) = rrhf_value(&s, &n, &tf, &cfg).unwrap();
        prop_assert!((a - b).abs() < 1e-12);
        for scoring in [NegScoring::RewardModel, NegScoring::ForcedLowest { delta: 1.0 }] {
            let cfg = NeatConfig::default().with_neg_scoring(scoring);
            let (a, _) = neat_value(&s, &n, &r, &o, &cfg).unwrap();
            let (b, _) = neat_value(&s, &n, &tf, &o, &cfg).unwrap();
            prop_assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn rrhf_neat_invariant_to_candidate_permutation((s, n, r, o, perm) in candidates_strategy()) {
        let has_ties = (0..r.len()).any(|i| (0..i).any(|j| r[i] == r[j]));
        let cfg = RrhfConfig::default();
        let (a, ra) = rrhf_value(&s, &n, &r, &cfg).unwrap();
        let (b, rb) = rrhf_value(&permute(&s, &perm), &permute(&n, &perm), &permute(&r, &perm), &cfg).unwrap();
        prop_assert!((ra - rb).abs() < 1e-12, "ranking term is permutation invariant");
        if !has_ties {
            prop_assert!((a - b).abs() < 1e-12, "without ties, the whole loss is");
        }
        let cfg = NeatConfig::default();
        let (a, ra) = neat_value(&s, &n, &r, &o, &cfg).unwrap();
        let (b, rb) = neat_value(&permute(&s, &perm), &permute(&n, &perm), &permute(&r, &perm), &permute(&o, &perm), &cfg).unwrap();
        prop_assert!((ra - rb).abs() < 1e-12);
        if !has_ties {
            prop_assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn cp_paper_invariant_to_permuting_positives_or_negatives(
        pos in prop::collection::vec(0.2f64..5.0, 1..5),
        neg in prop::collection::vec(0.2f64..5.0, 0..5),
        seed in 0u64..1000,
    ) {
        let value = |p: &[f64], q: &[f64]| -> f64 {
            let pt = t(p, D).view([1, p.len() as i64]);
            let nt = if q.is_empty() { Tensor::zeros([1, 0], (D, CPU)) } else { t(q, D).view([1, q.len() as i64]) };
            val(&contrastive_perplexity_loss(&CpGroups::new(&pt, &nt), &CpConfig::default()).unwrap().loss)
        };
        let rot = |v: &[f64]| { let mut w = v.to_vec(); if !w.is_empty() { let k = seed as usize % w.len(); w.rotate_left(k); w.reverse(); } w };
        let base = value(&pos, &neg);
        prop_assert!((base - value(&rot(&pos), &neg)).abs() < 1e-12);
        prop_assert!((base - value(&pos, &rot(&neg))).abs() < 1e-12);
    }

    #[test]
    fn swapping_chosen_and_rejected_maps_h_to_minus_h(
        sc in prop::collection::vec(-30.0f64..-1.0, 1..5),
        seed in 0u64..1000,
    ) {
        let p = sc.len();
        let sr: Vec<f64> = sc.iter().enumerate().map(|(i, x)| x - 1.0 - ((i as u64 * 7 + seed) % 11) as f64).collect();
        let rc: Vec<f64> = sc.iter().map(|x| x + 0.7).collect();
        let rr: Vec<f64> = sr.iter().map(|x| x - 0.4).collect();
        let nc: Vec<i64> = (0..p).map(|i| 1 + ((i as u64 + seed) % 7) as i64).collect();
        let nr: Vec<i64> = (0..p).map(|i| 2 + ((i as u64 * 3 + seed) % 5) as i64).collect();
        let seq = |s: &[f64], n: &[i64]| SeqLogps::from_sums(&t(s, D), &ti(n)).unwrap();
        let h: Vec<f64> = (0..p).map(|i| (sc[i] - rc[i]) - (sr[i] - rr[i])).collect();
        for cfg in [
            DpoConfig::default(),
            DpoConfig::default().with_label_smoothing(0.3),
            DpoConfig::default().with_loss_type(DpoLossType::Robust).with_label_smoothing(0.2),
            DpoConfig::default().with_loss_type(DpoLossType::Hinge),
            DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_ipo_length_normalize(false),
        ] {
            let swapped = dpo_loss(&seq(&sr, &nr), &seq(&sc, &nc), &t(&rr, D), &t(&rc, D), &cfg).unwrap();
            // The same loss at −h, built by moving the chosen reference: R_c' = R_c + 2h.
            let rc_neg: Vec<f64> = (0..p).map(|i| rc[i] + 2.0 * h[i]).collect();
            let at_minus_h = dpo_loss(&seq(&sc, &nc), &seq(&sr, &nr), &t(&rc_neg, D), &t(&rr, D), &cfg).unwrap();
            let (a, b) = (vals(&swapped.per_example), vals(&at_minus_h.per_example));
            for i in 0..p {
                prop_assert!((a[i] - b[i]).abs() < 1e-9 * a[i].abs().max(1.0), "{cfg:?}");
            }
            let orig = dpo_loss(&seq(&sc, &nc), &seq(&sr, &nr), &t(&rc, D), &t(&rr, D), &cfg).unwrap();
            prop_assert!((swapped.metrics.mean("rewards/margins").unwrap() + orig.metrics.mean("rewards/margins").unwrap()).abs() < 1e-9);
        }
    }

    #[test]
    fn seq_logps_invariant_to_padding(
        pad_left in 0i64..3, pad_right in 0i64..3, seed in 0i64..1000,
    ) {
        tch::manual_seed(seed);
        let (b, tt, v) = (2, 5, 6);
        let logits = Tensor::randn([b, tt, v], (D, CPU));
        let ids = Tensor::randint(v, [b, tt], (Kind::Int64, CPU));
        let mask = Tensor::randint(2, [b, tt], (Kind::Int64, CPU));
        let base = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default()).unwrap();
        // Padding on the right: extra positions with arbitrary logits, unscored.
        let padded_logits = Tensor::cat(&[logits.shallow_clone(), Tensor::randn([b, pad_right, v], (D, CPU)) * 100.0], 1);
        let padded_ids = Tensor::cat(&[ids.shallow_clone(), Tensor::full([b, pad_right], -100, (Kind::Int64, CPU))], 1);
        let padded_mask = Tensor::cat(&[mask.shallow_clone(), Tensor::zeros([b, pad_right], (Kind::Int64, CPU))], 1);
        // Padding on the left: unscored positions before the sequence (their logits predict the
        // first real token, which is unscored too, so mask position pad_left must be 0 there).
        let l_logits = Tensor::cat(&[Tensor::randn([b, pad_left, v], (D, CPU)), padded_logits], 1);
        let l_ids = Tensor::cat(&[Tensor::zeros([b, pad_left], (Kind::Int64, CPU)), padded_ids], 1);
        let l_mask = Tensor::cat(&[Tensor::zeros([b, pad_left], (Kind::Int64, CPU)), padded_mask], 1);
        let padded = seq_logps(&l_logits, &l_ids, &l_mask, &SeqLogpsConfig::default()).unwrap();
        let same = |a: &Tensor, b: &Tensor| vals(a).iter().zip(vals(b)).all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs().max(1.0));
        if pad_left == 0 {
            prop_assert!(same(&base.sum, &padded.sum));
        } else {
            // With left padding, position 0's token becomes scorable; the base never scores it.
            let m0 = mask.narrow(1, 0, 1).zeros_like();
            let mask2 = Tensor::cat(&[m0, mask.narrow(1, 1, tt - 1)], 1);
            let base2 = seq_logps(&logits, &ids, &mask2, &SeqLogpsConfig::default()).unwrap();
            let l_mask2 = Tensor::cat(&[Tensor::zeros([b, pad_left], (Kind::Int64, CPU)), Tensor::cat(&[mask2, Tensor::zeros([b, pad_right], (Kind::Int64, CPU))], 1)], 1);
            let padded2 = seq_logps(&l_logits, &l_ids, &l_mask2, &SeqLogpsConfig::default()).unwrap();
            prop_assert!(same(&base2.sum, &padded2.sum));
        }
    }
}
