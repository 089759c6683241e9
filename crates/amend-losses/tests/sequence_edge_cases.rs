//! Edge cases of the sequence-level losses (spec §1.2, §3.4, §4, §5, §6, §7): empty sequences
//! under each `EmptyPolicy`, empty batches, masked NaN, invalid configurations and inputs, and
//! the serde names of every config (TRL and open-unlearning aliases included).

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{Error, LossOutput, Reduction, Result};
use sequence_support::*;
use tch::{Device, Kind, Tensor};

const D: Kind = Kind::Double;

fn finite_and_zero_at(out: &LossOutput, grad: &Tensor, zero_at: &[usize]) {
    let g = vals(grad);
    assert!(g.iter().all(|x| x.is_finite()), "gradient must be finite: {g:?}");
    assert!(val(&out.loss).is_finite());
    for &i in zero_at {
        assert_eq!(g[i], 0.0, "gradient at dropped unit {i}");
    }
}

// ------------------------------------------------------------------ §1.2 empty sequences

#[test]
fn length_normalised_pair_losses_follow_the_empty_policy() -> Result<()> {
    // Pair 1 has an empty rejected response.
    let sc = [-10.0, -8.0, -6.0];
    let nc = [5, 4, 3];
    let sr = [-12.0, 0.0, -5.0];
    let nr = [6, 0, 2];
    let rc = t(&[-11.0, -8.5, -6.5], D);
    let rr = t(&[-11.5, -1.0, -5.0], D);
    type F = Box<dyn Fn(&SeqLogps, &SeqLogps, EmptyPolicy) -> Result<LossOutput>>;
    let losses: Vec<(&str, F)> = vec![
        (
            "ipo",
            Box::new(move |c: &SeqLogps, r: &SeqLogps, p| {
                let cfg =
                    DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_empty_policy(p);
                dpo_loss(c, r, &rc, &rr, &cfg)
            }),
        ),
        (
            "simpo",
            Box::new(|c: &SeqLogps, r: &SeqLogps, p| {
                simpo_loss(c, r, &SimPoConfig::default().with_empty_policy(p).with_nll_weight(1.0))
            }),
        ),
        (
            "orpo",
            Box::new(|c: &SeqLogps, r: &SeqLogps, p| {
                orpo_loss(
                    c,
                    r,
                    None,
                    &OrpoConfig::default()
                        .with_nll_scope(NllScope::ResponseOnly)
                        .with_empty_policy(p),
                )
            }),
        ),
    ];
    for (name, f) in losses {
        let (c, _) = seqs(&sc, &nc, D)?;
        let (r, _) = seqs(&sr, &nr, D)?;
        match f(&c, &r, EmptyPolicy::Error) {
            Err(Error::EmptySequence { index: 1, .. }) => {}
            other => panic!("{name}: expected EmptySequence at 1, got {other:?}"),
        }
        let (c, gc) = seqs(&sc, &nc, D)?;
        let (r, gr) = seqs(&sr, &nr, D)?;
        let out = f(&c, &r, EmptyPolicy::Mask)?;
        assert_eq!(out.parts[0].count, 2.0, "{name}: the pair is dropped from the count");
        assert_eq!(vals(&out.per_example)[1], 0.0, "{name}: and contributes exactly 0");
        out.loss.backward();
        finite_and_zero_at(&out, &gc.grad(), &[1]);
        finite_and_zero_at(&out, &gr.grad(), &[1]);
        // Same as the loss over the two remaining pairs.
        let (c2, _) = seqs(&[sc[0], sc[2]], &[nc[0], nc[2]], D)?;
        let (r2, _) = seqs(&[sr[0], sr[2]], &[nr[0], nr[2]], D)?;
        let ref_out = if name == "ipo" {
            let cfg = DpoConfig::default().with_loss_type(DpoLossType::Ipo);
            dpo_loss(&c2, &r2, &t(&[-11.0, -6.5], D), &t(&[-11.5, -5.0], D), &cfg)?
        } else {
            f(&c2, &r2, EmptyPolicy::Error)?
        };
        assert!((val(&out.loss) - val(&ref_out.loss)).abs() < 1e-12, "{name}");
    }
    Ok(())
}

#[test]
fn sigmoid_dpo_accepts_empty_responses() -> Result<()> {
    // S = 0 for an empty response is well defined for the summed-log-prob losses.
    let (c, _) = seqs(&[0.0], &[0], D)?;
    let (r, _) = seqs(&[-3.0], &[2], D)?;
    let z = t(&[0.0], D);
    let out = dpo_loss(&c, &r, &z, &z, &DpoConfig::default())?;
    // h = (0 − 0) − (−3 − 0) = 3: L = softplus(−0.3).
    assert!((val(&out.loss) - (-0.3f64).exp().ln_1p()).abs() < 1e-12);
    Ok(())
}

#[test]
fn unlearning_losses_follow_the_empty_policy() -> Result<()> {
    let s = [-4.0, 0.0, -3.0];
    let n = [2, 0, 3];
    let (f, _) = seqs(&s, &n, D)?;
    assert!(matches!(
        simnpo_loss(&f, None, &SimNpoConfig::default()),
        Err(Error::EmptySequence { index: 1, .. })
    ));
    let cfg = GradientAscentConfig::default().with_norm(GaNorm::Sequence);
    assert!(matches!(
        gradient_ascent_loss(&f, None, &cfg),
        Err(Error::EmptySequence { index: 1, .. })
    ));
    let (f, g) = seqs(&s, &n, D)?;
    let out = simnpo_loss(&f, None, &SimNpoConfig::default().with_empty_policy(EmptyPolicy::Mask))?;
    assert_eq!(out.parts[0].count, 2.0);
    out.loss.backward();
    finite_and_zero_at(&out, &g.grad(), &[1]);
    // Token-normalised gradient ascent needs no policy: the empty sequence adds 0 tokens.
    let (f, _) = seqs(&s, &n, D)?;
    let out = gradient_ascent_loss(&f, None, &GradientAscentConfig::default())?;
    assert_eq!(out.parts[0].count, 5.0);
    assert!((val(&out.loss) + 7.0 / 5.0).abs() < 1e-12);
    Ok(())
}

#[test]
fn empty_batches_give_zero_loss_and_zero_count() -> Result<()> {
    let empty = |_: ()| seqs(&[], &[], D);
    let z = t(&[], D);
    let (c, gc) = empty(())?;
    let (r, _) = empty(())?;
    for out in [
        dpo_loss(&c, &r, &z, &z, &DpoConfig::default())?,
        simpo_loss(&c, &r, &SimPoConfig::default().with_nll_weight(1.0))?,
        orpo_loss(&c, &r, None, &OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly))?,
        npo_loss(&c, &z, None, &NpoConfig::default())?,
        simnpo_loss(&c, None, &SimNpoConfig::default())?,
        gradient_ascent_loss(&c, None, &GradientAscentConfig::default())?,
        kto_loss(
            &c,
            &z,
            &Tensor::from_slice::<bool>(&[]),
            KtoReferencePoint::Given(0.0),
            &KtoConfig::default(),
        )?,
    ] {
        assert_eq!(val(&out.loss), 0.0);
        assert!(out.parts.iter().all(|p| p.count == 0.0));
        out.loss.backward();
    }
    assert_eq!(gc.grad().size(), vec![0]);
    let g0 = Tensor::zeros([0, 3], (D, Device::Cpu));
    let out =
        rrhf_loss(&CandidateSet::new(&g0, &g0.to_kind(Kind::Int64), &g0)?, &RrhfConfig::default())?;
    assert_eq!(val(&out.loss), 0.0);
    assert_eq!(out.parts[0].count, 0.0);
    let out = contrastive_perplexity_loss(&CpGroups::new(&g0, &g0), &CpConfig::default())?;
    assert_eq!(val(&out.loss), 0.0);
    Ok(())
}

// ------------------------------------------------------------------ §3.4 CP

#[test]
fn cp_masked_nan_entries_do_not_leak() -> Result<()> {
    let pos = leaf(&[2.0, f64::NAN, 1.5], D);
    let neg = leaf(&[3.0, f64::INFINITY], D);
    let mp = ti(&[1, 0, 1]).view([1, 3]);
    let mn = ti(&[1, 0]).view([1, 2]);
    let out = contrastive_perplexity_loss(
        &CpGroups::new(&pos.view([1, 3]), &neg.view([1, 2])).with_masks(&mp, &mn),
        &CpConfig::default(),
    )?;
    // Same as the anchor with P = [2.0, 1.5], N = [3.0].
    let clean = contrastive_perplexity_loss(
        &CpGroups::new(&t(&[2.0, 1.5], D).view([1, 2]), &t(&[3.0], D).view([1, 1])),
        &CpConfig::default(),
    )?;
    assert_eq!(val(&out.loss), val(&clean.loss));
    out.loss.backward();
    assert_eq!(vals(&pos.grad())[1], 0.0);
    assert_eq!(vals(&neg.grad())[1], 0.0);
    assert!(vals(&pos.grad()).iter().all(|x| x.is_finite()));
    Ok(())
}

#[test]
fn cp_non_finite_present_phi_errors_in_debug_builds() {
    let pos = t(&[2.0, f64::NAN], D).view([1, 2]);
    let neg = t(&[3.0], D).view([1, 1]);
    let res = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), &CpConfig::default());
    if cfg!(debug_assertions) {
        assert!(matches!(res, Err(Error::NonFinite { .. })), "{res:?}");
    } else {
        assert!(val(&res.unwrap().loss).is_nan(), "release builds propagate");
    }
}

#[test]
fn cp_reference_rejects_ragged_masks_and_invalid_configs() {
    let pos = t(&[2.0, 1.5], D).view([1, 2]);
    let neg = t(&[3.0, 1.0], D).view([1, 2]);
    let mp = ti(&[1, 0]).view([1, 2]);
    let mn = ti(&[1, 1]).view([1, 2]);
    let cfg = CpConfig::default().with_form(CpForm::Reference);
    assert!(matches!(
        contrastive_perplexity_loss(&CpGroups::new(&pos, &neg).with_masks(&mp, &mn), &cfg),
        Err(Error::InvalidInput { name: "mask_pos", .. })
    ));
    // All-true masks are fine.
    let ones = ti(&[1, 1]).view([1, 2]);
    assert!(
        contrastive_perplexity_loss(&CpGroups::new(&pos, &neg).with_masks(&ones, &mn), &cfg)
            .is_ok()
    );
    let g = CpGroups::new(&pos, &neg);
    for bad in [
        CpConfig::default().with_tau(0.0),
        CpConfig::default().with_beta(-1.0),
        CpConfig::default().with_alpha(Some(0.0)),
        CpConfig::default().with_label_smoothing(0.1),
        cfg.clone().with_label_smoothing(1.0),
        cfg.clone().with_detach_prototype(true),
        cfg.clone().with_alpha(Some(f64::NAN)),
    ] {
        assert!(
            matches!(contrastive_perplexity_loss(&g, &bad), Err(Error::InvalidConfig { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        contrastive_perplexity_loss(
            &CpGroups::new(&pos, &t(&[3.0], D).view([1, 1, 1])),
            &CpConfig::default()
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        contrastive_perplexity_loss(
            &CpGroups::new(&pos, &t(&[3.0, 1.0], D).view([2, 1])),
            &CpConfig::default()
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn cp_phi_empty_text_policy() -> Result<()> {
    let nll = t(&[1.0, 2.0, 0.0, 0.0], D).view([2, 2]);
    let mask = ti(&[1, 1, 0, 0]).view([2, 2]);
    assert!(matches!(
        cp_phi(&nll, &mask, CpStatistic::LogPpl, EmptyPolicy::Error),
        Err(Error::EmptySequence { index: 1, .. })
    ));
    let (phi, valid) = cp_phi(&nll, &mask, CpStatistic::LogPpl, EmptyPolicy::Mask)?;
    assert_eq!(vals(&phi), vec![1.5, 0.0]);
    assert_eq!(vals(&valid.to_kind(D)), vec![1.0, 0.0]);
    // From SeqLogps: φ = −A.
    let lp = SeqLogps::from_sums(&t(&[-3.0, -4.0], D), &ti(&[2, 4]))?;
    let (phi, _) = cp_phi_from_logps(&lp, CpStatistic::LogPpl, EmptyPolicy::Error)?;
    assert_eq!(vals(&phi), vec![1.5, 1.0]);
    Ok(())
}

// ------------------------------------------------------------------ §4, §5 ranking

#[test]
fn ranking_input_errors() -> Result<()> {
    let s = t(&[-1.0, -2.0, -3.0, -4.0], D).view([2, 2]);
    let n = ti(&[1, 2, 3, 4]).view([2, 2]);
    let r = t(&[0.0, 1.0, 2.0, 3.0], D).view([2, 2]);
    let c = CandidateSet::new(&s, &n, &r)?.with_mask(&ti(&[1, 1, 0, 0]).view([2, 2]))?;
    assert!(matches!(
        rrhf_loss(&c, &RrhfConfig::default()),
        Err(Error::EmptyCandidateSet { group: 1, .. })
    ));
    assert!(matches!(CandidateSet::new(&s, &n.view([4]), &r), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(CandidateSet::new(&s, &n.to_kind(D), &r), Err(Error::DtypeMismatch { .. })));
    assert!(matches!(
        CandidateSet::new(&s, &n, &r)?.with_origin(&ti(&[0, 1, 3, 2]).view([2, 2])),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        CandidateSet::new(&s, &n, &r)?.with_origins(&[Origin::Dataset]),
        Err(Error::ShapeMismatch { .. })
    ));
    // A NaN reward of a NegPrompt candidate is an error under RewardModel only.
    let rn = t(&[0.0, f64::NAN, 2.0, 3.0], D).view([2, 2]);
    let c = CandidateSet::new(&s, &n, &rn)?.with_origins(&[
        Origin::Dataset,
        Origin::NegPrompt,
        Origin::Policy,
        Origin::Dataset,
    ])?;
    assert!(neat_loss(&c, &NeatConfig::default()).is_ok());
    assert!(matches!(
        neat_loss(&c, &NeatConfig::default().with_neg_scoring(NegScoring::RewardModel)),
        Err(Error::NonFiniteReward { .. })
    ));
    // A NaN reward in a padding slot is never read.
    let c = CandidateSet::new(&s, &n, &rn)?.with_mask(&ti(&[1, 0, 1, 1]).view([2, 2]))?;
    assert!(rrhf_loss(&c, &RrhfConfig::default()).is_ok());
    // CandidateSet::from_logps checks B = G·K.
    let lp = SeqLogps::from_sums(&t(&[-1.0, -2.0, -3.0], D), &ti(&[1, 1, 1]))?;
    assert!(matches!(CandidateSet::from_logps(&lp, &r), Err(Error::ShapeMismatch { .. })));
    Ok(())
}

#[test]
fn ranking_group_emptied_by_the_mask_policy_is_dropped() -> Result<()> {
    let s = leaf(&[-1.0, 0.0, -3.0, -4.0], D);
    let n = ti(&[1, 0, 3, 4]).view([2, 2]);
    let r = t(&[0.0, 1.0, 2.0, 3.0], D).view([2, 2]);
    let mask = ti(&[0, 1, 1, 1]).view([2, 2]);
    let c = CandidateSet::new(&s.view([2, 2]), &n, &r)?.with_mask(&mask)?;
    let out = rrhf_loss(&c, &RrhfConfig::default().with_empty_policy(EmptyPolicy::Mask))?;
    assert_eq!(out.parts[0].count, 1.0);
    assert_eq!(vals(&out.per_example)[0], 0.0);
    out.loss.backward();
    finite_and_zero_at(&out, &s.grad(), &[0, 1]);
    Ok(())
}

#[test]
fn neat_sft_may_target_negative_prompt_candidates_when_allowed() -> Result<()> {
    let s = leaf(&[-2.0, -0.5], D);
    let c = CandidateSet::new(
        &s.view([1, 2]),
        &ti(&[2, 1]).view([1, 2]),
        &t(&[0.0, 5.0], D).view([1, 2]),
    )?
    .with_origins(&[Origin::Dataset, Origin::NegPrompt])?;
    let cfg = NeatConfig::default().with_neg_scoring(NegScoring::RewardModel).with_rank_weight(0.0);
    assert!((val(&neat_loss(&c, &cfg)?.loss) - 1.0).abs() < 1e-12, "default: best non-NegPrompt");
    let out = neat_loss(&c, &cfg.with_sft_allow_negative_prompt(true))?;
    assert!((val(&out.loss) - 0.5).abs() < 1e-12);
    Ok(())
}

// ------------------------------------------------------------------ §6, §7 inputs and configs

#[test]
fn pair_input_errors() -> Result<()> {
    let (c, _) = seqs(&[-1.0, -2.0], &[1, 2], D)?;
    let (r, _) = seqs(&[-1.5], &[1], D)?;
    let z2 = t(&[0.0, 0.0], D);
    assert!(matches!(
        dpo_loss(&c, &r, &z2, &z2, &DpoConfig::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    let (r, _) = seqs(&[-1.5, -2.5], &[1, 2], D)?;
    assert!(matches!(
        dpo_loss(&c, &r, &t(&[0.0], D), &z2, &DpoConfig::default()),
        Err(Error::ShapeMismatch { name: "ref_chosen", .. })
    ));
    assert!(matches!(
        dpo_loss(&c, &r, &t(&[f64::NAN, 0.0], D), &z2, &DpoConfig::default()),
        Err(Error::NonFinite { name: "ref_chosen", .. })
    ));
    assert!(matches!(
        dpo_loss(&c, &r, &ti(&[0, 0]), &z2, &DpoConfig::default()),
        Err(Error::DtypeMismatch { .. })
    ));
    let nll = SeqLogps::from_sums(&t(&[-3.0, -4.0], D), &ti(&[3, 4]))?;
    let cfg = OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly);
    assert!(matches!(orpo_loss(&c, &r, Some(&nll), &cfg), Err(Error::InvalidInput { .. })));
    assert!(matches!(
        kto_loss(
            &c,
            &z2,
            &Tensor::from_slice(&[true, false]),
            KtoReferencePoint::Given(-0.1),
            &KtoConfig::default()
        ),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        kto_loss(&c, &z2, &t(&[0.5, 1.0], D), KtoReferencePoint::Given(0.1), &KtoConfig::default()),
        Err(Error::InvalidInput { name: "desirable", .. })
    ));
    // KTO with only desirable examples is fine.
    let out = kto_loss(
        &c,
        &z2,
        &Tensor::from_slice(&[true, true]),
        KtoReferencePoint::Given(0.0),
        &KtoConfig::default(),
    )?;
    assert!(out.metrics.get("rewards/rejected").unwrap().count == 0.0);
    assert!(out.metrics.get("rewards/margins").is_none());
    Ok(())
}

#[test]
fn invalid_configs_are_typed_errors() {
    let bad: Vec<Result<()>> = vec![
        DpoConfig::default().with_beta(0.0).validate(),
        DpoConfig::default().with_beta(f64::INFINITY).validate(),
        DpoConfig::default().with_label_smoothing(1.0).validate(),
        DpoConfig::default()
            .with_loss_type(DpoLossType::Robust)
            .with_label_smoothing(0.5)
            .validate(),
        DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_label_smoothing(0.1).validate(),
        DpoConfig::default()
            .with_loss_type(DpoLossType::Hinge)
            .with_label_smoothing(0.1)
            .validate(),
        SimPoConfig::default().with_beta(-2.0).validate(),
        SimPoConfig::default().with_gamma(f64::NAN).validate(),
        SimPoConfig::default().with_label_smoothing(-0.1).validate(),
        SimPoConfig::default().with_nll_weight(-1.0).validate(),
        OrpoConfig::default().with_beta(0.0).validate(),
        KtoConfig::default().with_beta(0.0).validate(),
        KtoConfig::default().with_desirable_weight(-1.0).validate(),
        NpoConfig::default().with_beta(0.0).validate(),
        SimNpoConfig::default().with_delta(f64::INFINITY).validate(),
        GradientAscentConfig::default().with_forget_weight(-1.0).validate(),
        RrhfConfig::default().with_length_penalty(-1.0).validate(),
        RrhfConfig::default().with_sft_norm(SftNorm::PaddedRowMean { t_pad: 0 }).validate(),
        NeatConfig::default().with_neg_scoring(NegScoring::ForcedLowest { delta: 0.0 }).validate(),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "case {i}: {r:?}");
    }
    assert!(
        DpoConfig::default()
            .with_loss_type(DpoLossType::Robust)
            .with_label_smoothing(0.49)
            .validate()
            .is_ok()
    );
}

#[test]
fn reductions_on_masked_units() -> Result<()> {
    let (c, _) = seqs(&[-10.0, -8.0, -6.0], &[5, 4, 3], D)?;
    let (r, _) = seqs(&[-12.0, 0.0, -5.0], &[6, 0, 2], D)?;
    let base = SimPoConfig::default().with_empty_policy(EmptyPolicy::Mask);
    let mean = simpo_loss(&c, &r, &base)?;
    let sum = simpo_loss(&c, &r, &base.clone().with_reduction(Reduction::Sum))?;
    let none = simpo_loss(&c, &r, &base.clone().with_reduction(Reduction::None))?;
    let bm = simpo_loss(&c, &r, &base.clone().with_reduction(Reduction::BatchMean))?;
    let per = vals(&none.loss);
    assert_eq!(per.len(), 3);
    assert_eq!(per[1], 0.0);
    assert!((val(&sum.loss) - per.iter().sum::<f64>()).abs() < 1e-12);
    assert!(
        (val(&mean.loss) - per.iter().sum::<f64>() / 2.0).abs() < 1e-12,
        "mean over valid pairs"
    );
    assert!(
        (val(&bm.loss) - per.iter().sum::<f64>() / 3.0).abs() < 1e-12,
        "batch mean over all units"
    );
    assert!((val(&sum.loss) - val(&mean.loss) * mean.count()).abs() < 1e-12, "sum = mean × count");
    Ok(())
}

// ------------------------------------------------------------------ serde

#[test]
fn configs_deserialise_from_empty_json_to_their_defaults() {
    fn check<T: serde::de::DeserializeOwned + Default + PartialEq + std::fmt::Debug>() {
        let parsed: T = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, T::default());
    }
    check::<DpoConfig>();
    check::<SimPoConfig>();
    check::<OrpoConfig>();
    check::<KtoConfig>();
    check::<NpoConfig>();
    check::<SimNpoConfig>();
    check::<GradientAscentConfig>();
    check::<CpConfig>();
    check::<RrhfConfig>();
    check::<NeatConfig>();
    check::<SeqLogpsConfig>();
    check::<FusedLinearConfig>();
}

#[test]
fn configs_accept_trl_and_upstream_names() {
    let d: DpoConfig =
        serde_json::from_str(r#"{"beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1}"#)
            .unwrap();
    assert_eq!((d.beta, d.label_smoothing), (0.2, 0.1));
    assert_eq!(d.loss_type, DpoLossType::Robust);
    let s: SimPoConfig =
        serde_json::from_str(r#"{"beta": 0.1, "simpo_gamma": 0.5, "cpo_alpha": 1.0}"#).unwrap();
    assert_eq!((s.gamma, s.nll_weight), (0.5, 1.0));
    let r: RrhfConfig = serde_json::from_str(
        r#"{"rrhf_weight": 100.0, "sft_norm": {"padded_row_mean": {"t_pad": 8}}}"#,
    )
    .unwrap();
    assert_eq!((r.rank_weight, r.sft_norm), (100.0, SftNorm::PaddedRowMean { t_pad: 8 }));
    let n: SimNpoConfig =
        serde_json::from_str(r#"{"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0}"#)
            .unwrap();
    assert_eq!((n.forget_weight, n.retain_weight), (0.125, 1.0));
    let k: KtoConfig =
        serde_json::from_str(r#"{"loss_type": "apo_zero_unpaired", "desirable_weight": 1.33}"#)
            .unwrap();
    assert_eq!(k.loss_type, KtoLossType::ApoZeroUnpaired);
    let neat: NeatConfig = serde_json::from_str(r#"{"neg_scoring": "reward_model"}"#).unwrap();
    assert_eq!(neat.neg_scoring, NegScoring::RewardModel);
    let cp: CpConfig =
        serde_json::from_str(r#"{"form": "reference", "reduction": "sum"}"#).unwrap();
    assert_eq!((cp.form, cp.alpha(), cp.reduction), (CpForm::Reference, 100.0, Reduction::Sum));
    // Typos are errors, not silently ignored.
    assert!(serde_json::from_str::<DpoConfig>(r#"{"betta": 0.2}"#).is_err());
    // Round trip.
    let json = serde_json::to_string(&NeatConfig::default()).unwrap();
    assert_eq!(serde_json::from_str::<NeatConfig>(&json).unwrap(), NeatConfig::default());
}
