//! Every test vector of `specs/sequence-losses.md` as a named test, in f64 (|Δ| ≤ 1e-9 on values,
//! 1e-7 on autograd gradients) and in f32 (|Δ| ≤ 1e-5·max(1, |x|)).

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{Reduction, Result};
use sequence_support::*;
use tch::{Kind, Tensor};

// ---------------------------------------------------------------- §1.3 primitive

fn primitive_inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
    let logits =
        Tensor::from_slice(&[0.0, 0.0, 0.0, 1.0, 2.0, -0.5, 0.0, 3.0, -1.0, 0.3, 0.1, 0.2])
            .to_kind(kind)
            .view([1, 4, 3])
            .set_requires_grad(true);
    (logits, ti(&[0, 2, 1, 2]).view([1, 4]), ti(&[0, 0, 1, 1]).view([1, 4]))
}

#[test]
fn seq_logps_spec_vector_1_3() -> Result<()> {
    for kind in KINDS {
        let (logits, ids, mask) = primitive_inputs(kind);
        let lp = seq_logps(
            &logits,
            &ids,
            &mask,
            &SeqLogpsConfig::default().with_return_per_token(true),
        )?;
        assert_eq!(lp.sum.kind(), kind);
        // lp at the scored positions; the masked position 0 is exactly 0.
        let pt = vals(lp.per_token.as_ref().unwrap());
        assert_eq!(pt[0], 0.0);
        assert_vals(kind, "lp", &pt[1..], &[-0.3715390319, -4.0658839038]);
        assert_eq!(vals(&lp.mask.as_ref().unwrap().to_kind(Kind::Double)), vec![0.0, 1.0, 1.0]);
        assert_vals(kind, "S", &vals(&lp.sum), &[-4.4374229356]);
        assert_eq!(i64::try_from(&lp.len)?, 2);
        assert_vals(kind, "A", &vals(&lp.f_mean()?), &[-2.2187114678]);
        lp.sum.sum(kind).backward();
        let g = vals(&logits.grad());
        assert_eq!(&g[0..3], &[0.0, 0.0, 0.0], "row 0 is masked: exactly zero");
        assert_grads(
            kind,
            "dS/dlogits row 1",
            &g[3..6],
            &[-0.2537161816, 0.3103279139, -0.0566117322],
        );
        assert_grads(
            kind,
            "dS/dlogits row 2",
            &g[6..9],
            &[-0.0466126226, -0.9362395519, 0.9828521745],
        );
        assert_eq!(&g[9..12], &[0.0, 0.0, 0.0], "row 3 has no next token: exactly zero");
    }
    Ok(())
}

#[test]
fn seq_logps_spec_vector_1_3_unmasked_first_position_value() -> Result<()> {
    // lp[0] = −1.0986122887 (uniform row, target 2) when position 1 is scored.
    let (logits, ids, _) = primitive_inputs(Kind::Double);
    let mask = ti(&[0, 1, 1, 1]).view([1, 4]);
    let lp =
        seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default().with_return_per_token(true))?;
    assert_vals(
        Kind::Double,
        "lp",
        &vals(lp.per_token.as_ref().unwrap()),
        &[-1.0986122887, -0.3715390319, -4.0658839038],
    );
    Ok(())
}

// ---------------------------------------------------------------- §3.5 contrastive perplexity

/// φ leaves [φ_P1, φ_P2, φ_N1, φ_N2] of the §3.5 anchor, as [1, 2] blocks.
fn cp_anchor(kind: Kind) -> (Tensor, Tensor, Tensor) {
    let phi = leaf(&[2.0, 1.5, 3.0, 4.0 / 3.0], kind);
    let pos = phi.narrow(0, 0, 2).view([1, 2]);
    let neg = phi.narrow(0, 2, 2).view([1, 2]);
    (phi, pos, neg)
}

fn cp_case(cfg: &CpConfig, loss: f64, grad: Option<[f64; 4]>) -> Result<()> {
    for kind in KINDS {
        let (phi, pos, neg) = cp_anchor(kind);
        let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), cfg)?;
        assert_vals(kind, "loss", &[val(&out.loss)], &[loss]);
        if let Some(g) = grad {
            out.loss.backward();
            assert_grads(kind, "dL/dphi", &vals(&phi.grad()), &g);
        }
    }
    Ok(())
}

#[test]
fn cp_token_nll_to_phi_and_prototype_3_5() -> Result<()> {
    for kind in KINDS {
        let nll = t(
            &[2.0, 1.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 2.0, 3.0, 1.0, 1.0, 2.0, 0.0],
            kind,
        )
        .view([4, 4])
        .set_requires_grad(true);
        let mask = ti(&[1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]).view([4, 4]);
        let (phi, valid) = cp_phi(&nll, &mask, CpStatistic::LogPpl, EmptyPolicy::Error)?;
        assert_vals(kind, "phi", &vals(&phi), &[2.0, 1.5, 3.0, 1.3333333333]);
        assert_eq!(vals(&valid.to_kind(Kind::Double)), vec![1.0; 4]);
        // ∂φ_x/∂nll[x,t] = m[x,t]/n_x
        phi.sum(kind).backward();
        let expected: Vec<f64> =
            [3.0, 3.0, 3.0, 0.0, 2.0, 2.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 0.0]
                .iter()
                .map(|&n| if n == 0.0 { 0.0 } else { 1.0 / n })
                .collect();
        assert_grads(kind, "dphi/dnll", &vals(&nll.grad()), &expected);
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&phi.narrow(0, 0, 2).view([1, 2]), &phi.narrow(0, 2, 2).view([1, 2])),
            &CpConfig::default(),
        )?;
        assert_vals(kind, "prototype", &[metric(&out, "cp/prototype")], &[1.75]);
    }
    Ok(())
}

#[test]
fn cp_paper_tau1_alpha1_3_5() -> Result<()> {
    cp_case(
        &CpConfig::default(),
        0.4744814532,
        Some([0.1144486950, -0.2633436882, -0.1144486951, 0.2633436882]),
    )
}

#[test]
fn cp_paper_tau_half_3_5() -> Result<()> {
    cp_case(
        &CpConfig::default().with_tau(0.5),
        0.3548265445,
        Some([0.0949099678, -0.5024998800, -0.0949099678, 0.5024998799]),
    )
}

#[test]
fn cp_paper_alpha_1_1_3_5() -> Result<()> {
    cp_case(
        &CpConfig::default().with_alpha(Some(1.1)),
        0.5115645355,
        Some([0.1213105447, -0.2791326386, -0.1213105447, 0.2791326387]),
    )
}

#[test]
fn cp_paper_detached_prototype_3_5() -> Result<()> {
    cp_case(
        &CpConfig::default().with_detach_prototype(true),
        0.4744814532,
        Some([0.1888961917, -0.1888961917, -0.1144486951, 0.2633436882]),
    )
}

#[test]
fn cp_paper_tau1_equals_transcribed_formula_3_5() -> Result<()> {
    // The transcription −log J with s = e^{−d}/τ is τ-independent (0.4744814532 at τ = 0.5):
    // the library's τ = 1 reproduces it.
    let d_p = [0.25f64, 0.25];
    let d_n = [1.25f64, 0.4166666666666667];
    let tau = 0.5;
    let s = |d: f64| (-d).exp() / tau;
    let j = d_p.iter().map(|&d| s(d)).sum::<f64>()
        / (d_p.iter().map(|&d| s(d)).sum::<f64>() + d_n.iter().map(|&d| s(d)).sum::<f64>());
    assert!((-j.ln() - 0.4744814532).abs() < 1e-9);
    cp_case(&CpConfig::default(), -j.ln(), None)
}

#[test]
fn cp_paper_ppl_statistic_3_5() -> Result<()> {
    for kind in KINDS {
        let nll = t(
            &[2.0, 1.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 2.0, 3.0, 1.0, 1.0, 2.0, 0.0],
            kind,
        )
        .view([4, 4]);
        let mask = ti(&[1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]).view([4, 4]);
        let (phi, _) = cp_phi(&nll, &mask, CpStatistic::Ppl, EmptyPolicy::Error)?;
        assert_vals(
            kind,
            "ppl",
            &vals(&phi),
            &[7.389056099, 4.4816890703, 20.0855369232, 3.7936678946],
        );
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&phi.narrow(0, 0, 2).view([1, 2]), &phi.narrow(0, 2, 2).view([1, 2])),
            &CpConfig::default(),
        )?;
        assert_vals(kind, "loss", &[val(&out.loss)], &[0.2241720800]);
    }
    Ok(())
}

fn cp_ref() -> CpConfig {
    CpConfig::default().with_form(CpForm::Reference)
}

#[test]
fn cp_reference_one_row_alpha100_3_5() -> Result<()> {
    cp_case(
        &cp_ref(),
        66.9363240006,
        Some([0.1684369693, -0.3507635569, -0.0779064067, 0.2602329943]),
    )
}

#[test]
fn cp_reference_alpha0_3_5() -> Result<()> {
    cp_case(
        &cp_ref().with_alpha(Some(0.0)),
        0.8348956457,
        Some([0.0721468870, -0.1502431366, -0.0333697804, 0.1114660302]),
    )
}

#[test]
fn cp_reference_tau_half_3_5() -> Result<()> {
    cp_case(
        &cp_ref().with_tau(0.5),
        66.7661371476,
        Some([0.2826062371, -0.7557948152, -0.1229330167, 0.5961215948]),
    )
}

#[test]
fn cp_reference_label_smoothing_3_5() -> Result<()> {
    // Cross-checked against torch.nn.functional.cross_entropy(label_smoothing=0.1) with
    // probability targets in scripts/gen_sequence_loss_fixtures.py (fixture `cp_reference`).
    cp_case(
        &cp_ref().with_alpha(Some(0.0)).with_label_smoothing(0.1),
        0.7982496645,
        Some([0.0636026021, -0.1346879073, -0.0293137514, 0.1003990568]),
    )
}

#[test]
fn cp_reference_random_negative_3_5() -> Result<()> {
    for kind in KINDS {
        let (_, pos, neg) = cp_anchor(kind);
        let rnd = t(&[4.0], kind).view([1, 1]);
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&pos, &neg).with_random(&rnd, None),
            &cp_ref(),
        )?;
        assert_vals(kind, "loss", &[val(&out.loss)], &[50.2022430004]);
    }
    Ok(())
}

#[test]
fn cp_two_anchors_reference_shared_prototype_3_5() -> Result<()> {
    for kind in KINDS {
        let pos = t(&[2.0, 1.5, 3.0, 2.0], kind).view([2, 2]);
        let neg = t(&[3.0, 4.0 / 3.0, 2.5, 5.0], kind).view([2, 2]);
        let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), &cp_ref())?;
        let l = val(&out.loss);
        assert_vals(kind, "loss", &[l], &[66.9612247809]);
        assert!((l - 67.0446545900).abs() > 1e-3, "per-anchor prototypes must not be used");
        assert_vals(kind, "prototype", &[metric(&out, "cp/prototype")], &[2.125]);
    }
    Ok(())
}

#[test]
fn cp_two_anchors_paper_3_5() -> Result<()> {
    for kind in KINDS {
        let pos = t(&[2.0, 1.5, 3.0, 2.0], kind).view([2, 2]);
        let neg = t(&[3.0, 4.0 / 3.0, 2.5, 5.0], kind).view([2, 2]);
        let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), &CpConfig::default())?;
        assert_vals(kind, "per anchor", &vals(&out.per_example), &[0.4744814532, 0.6376494161]);
        assert_vals(kind, "mean", &[val(&out.loss)], &[0.5560654346]);
        assert_eq!(out.parts[0].count, 2.0);
    }
    Ok(())
}

#[test]
fn cp_paper_edge_equal_phi_is_ln2_3_5() -> Result<()> {
    for kind in KINDS {
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&t(&[2.0], kind).view([1, 1]), &t(&[2.0], kind).view([1, 1])),
            &CpConfig::default(),
        )?;
        assert_vals(kind, "loss", &[val(&out.loss)], &[std::f64::consts::LN_2]);
    }
    Ok(())
}

#[test]
fn cp_paper_edge_no_negatives_is_zero_3_5() -> Result<()> {
    for kind in KINDS {
        let pos = leaf(&[2.0], kind);
        let neg = Tensor::zeros([1, 0], (kind, tch::Device::Cpu));
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&pos.view([1, 1]), &neg),
            &CpConfig::default(),
        )?;
        assert_eq!(val(&out.loss), 0.0);
        assert_eq!(out.parts[0].count, 1.0, "the anchor still counts");
        out.loss.backward();
        assert_eq!(vals(&pos.grad()), vec![0.0]);
    }
    Ok(())
}

#[test]
fn cp_paper_edge_single_positive_3_5() -> Result<()> {
    for kind in KINDS {
        let phi = leaf(&[2.0, 3.5, 1.0], kind);
        let out = contrastive_perplexity_loss(
            &CpGroups::new(&phi.narrow(0, 0, 1).view([1, 1]), &phi.narrow(0, 1, 2).view([1, 2])),
            &CpConfig::default(),
        )?;
        assert_vals(kind, "loss", &[val(&out.loss)], &[0.4643687841]);
        out.loss.backward();
        assert_grads(
            kind,
            "dL/dphi",
            &vals(&phi.grad()),
            &[-0.0909795144, -0.1402443831, 0.2312238976],
        );
    }
    Ok(())
}

#[test]
fn cp_phi_quirk_vectors_3_5() -> Result<()> {
    for kind in KINDS {
        let nll = t(&[2.0, 1.0, 3.0, 0.5, 0.5], kind).view([1, 5]);
        let mask = ti(&[1, 1, 1, 0, 0]).view([1, 5]);
        let (paper, _) = cp_phi(&nll, &mask, CpStatistic::LogPpl, EmptyPolicy::Error)?;
        assert_vals(kind, "paper phi", &vals(&paper), &[2.0]);
        assert_vals(kind, "reference phi", &vals(&cp_phi_reference(&nll)?), &[1.4]);
        let nan = t(&[f64::NAN, 1.0, 3.0], kind).view([1, 3]).set_requires_grad(true);
        let phi = cp_phi_reference(&nan)?;
        assert_vals(kind, "reference phi with NaN", &vals(&phi), &[3.0]);
        phi.sum(kind).backward();
        assert_grads(
            kind,
            "pads get 1/(T−1), replaced entries 0",
            &vals(&nan.grad()),
            &[0.0, 1.0 / 3.0, 1.0 / 3.0],
        );
    }
    Ok(())
}

#[test]
fn cp_metric_vector_anchor1_8() -> Result<()> {
    for kind in KINDS {
        let (_, pos, neg) = cp_anchor(kind);
        let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), &CpConfig::default())?;
        let m = |n| metric(&out, n);
        assert_vals(
            kind,
            "metrics",
            &[
                m("rewards/chosen"),
                m("rewards/rejected"),
                m("rewards/margins"),
                m("rewards/accuracies"),
                m("logps/chosen"),
                m("logps/rejected"),
                m("cp/phi_gap"),
            ],
            &[-0.25, -0.8333333333, 0.5833333333, 1.0, -1.75, -2.1666666667, 0.4166666667],
        );
    }
    Ok(())
}

#[test]
fn cp_no_positives_is_an_error_3_4() {
    let pos = t(&[2.0, 1.0], Kind::Double).view([1, 2]);
    let neg = t(&[3.0], Kind::Double).view([1, 1]);
    let mask_pos = ti(&[0, 0]).view([1, 2]);
    let mask_neg = ti(&[1]).view([1, 1]);
    let err = contrastive_perplexity_loss(
        &CpGroups::new(&pos, &neg).with_masks(&mask_pos, &mask_neg),
        &CpConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, amend_losses::Error::NoPositives { group: 0, .. }), "{err}");
}

// ---------------------------------------------------------------- §4 RRHF

/// The four §4 candidates (S, n, r).
const RRHF_S: [f64; 4] = [-3.5, -0.6, -0.8, -2.0];
const RRHF_N: [i64; 4] = [3, 2, 4, 2];
const RRHF_R: [f64; 4] = [0.5, 2.0, 1.0, 2.0];

fn rrhf_set(kind: Kind) -> Result<(CandidateSet, Tensor)> {
    let s = leaf(&RRHF_S, kind);
    let c = CandidateSet::new(
        &s.view([1, 4]),
        &ti(&RRHF_N).view([1, 4]),
        &t(&RRHF_R, kind).view([1, 4]),
    )?;
    Ok((c, s))
}

/// ∂L/∂p from ∂L/∂S: multiply by n^λ.
fn grad_p(s: &Tensor, n: &[i64], lambda: f64) -> Vec<f64> {
    vals(&s.grad()).iter().zip(n).map(|(g, &n)| g * (n as f64).powf(lambda)).collect()
}

#[test]
fn rrhf_rank_loss_lambda1_4() -> Result<()> {
    for kind in KINDS {
        let (c, s) = rrhf_set(kind)?;
        let out = rrhf_loss(&c, &RrhfConfig::default().with_sft_weight(0.0))?;
        assert_vals(kind, "L_rank", &[val(&out.loss)], &[0.9]);
        out.loss.backward();
        assert_grads(kind, "dL_rank/dp", &grad_p(&s, &RRHF_N, 1.0), &[0.0, -1.0, 2.0, -1.0]);
        assert_vals(kind, "pair accuracy", &[metric(&out, "rewards/accuracies")], &[0.6]);
        assert_vals(kind, "rank metric", &[metric(&out, "rrhf/rank_loss")], &[0.9]);
        assert_vals(kind, "pairs", &[metric(&out, "rrhf/num_pairs")], &[5.0]);
    }
    Ok(())
}

#[test]
fn rrhf_rank_loss_lambda0_4() -> Result<()> {
    for kind in KINDS {
        let (c, s) = rrhf_set(kind)?;
        let out =
            rrhf_loss(&c, &RrhfConfig::default().with_sft_weight(0.0).with_length_penalty(0.0))?;
        assert_vals(kind, "L_rank", &[val(&out.loss)], &[1.2]);
        out.loss.backward();
        assert_grads(kind, "dL_rank/dp", &grad_p(&s, &RRHF_N, 0.0), &[0.0, 0.0, 1.0, -1.0]);
    }
    Ok(())
}

#[test]
fn rrhf_scores_and_best_candidate_4() -> Result<()> {
    for kind in KINDS {
        let (c, s) = rrhf_set(kind)?;
        // i* = 1 (first of the tied maxima): with rank weight 0, only S_1 gets gradient.
        let out = rrhf_loss(&c, &RrhfConfig::default().with_rank_weight(0.0))?;
        out.loss.backward();
        assert_grads(kind, "dL_sft/dS", &vals(&s.grad()), &[0.0, -0.5, 0.0, 0.0]);
        let (c, _) = rrhf_set(kind)?;
        let out = rrhf_loss(&c, &RrhfConfig::default())?;
        assert_vals(kind, "rewards/chosen = p_1", &[metric(&out, "rewards/chosen")], &[-0.3]);
        assert_vals(
            kind,
            "rewards/rejected = p_0",
            &[metric(&out, "rewards/rejected")],
            &[-1.1666666667],
        );
    }
    Ok(())
}

#[test]
fn rrhf_sft_norms_4() -> Result<()> {
    for kind in KINDS {
        for (norm, expected) in [
            (SftNorm::TokenMean, 0.3),
            (SftNorm::Sum, 0.6),
            (SftNorm::PaddedRowMean { t_pad: 8 }, 0.075),
        ] {
            let (c, _) = rrhf_set(kind)?;
            let out =
                rrhf_loss(&c, &RrhfConfig::default().with_rank_weight(0.0).with_sft_norm(norm))?;
            assert_vals(kind, &format!("L_sft {norm:?}"), &[val(&out.loss)], &[expected]);
        }
    }
    Ok(())
}

#[test]
fn rrhf_total_loss_4() -> Result<()> {
    for kind in KINDS {
        let (c, _) = rrhf_set(kind)?;
        assert_vals(
            kind,
            "TokenMean",
            &[val(&rrhf_loss(&c, &RrhfConfig::default())?.loss)],
            &[1.2],
        );
        let (c, _) = rrhf_set(kind)?;
        let out = rrhf_loss(&c, &RrhfConfig::default().with_sft_norm(SftNorm::Sum))?;
        assert_vals(kind, "Sum", &[val(&out.loss)], &[1.5]);
    }
    Ok(())
}

#[test]
fn rrhf_metric_vector_8() -> Result<()> {
    for kind in KINDS {
        let (c, _) = rrhf_set(kind)?;
        let out = rrhf_loss(&c, &RrhfConfig::default())?;
        let m = |n| metric(&out, n);
        assert_vals(
            kind,
            "metrics",
            &[
                m("rewards/chosen"),
                m("rewards/rejected"),
                m("rewards/margins"),
                m("rewards/accuracies"),
                m("logps/chosen"),
                m("logps/rejected"),
            ],
            &[-0.3, -1.1666666667, 0.8666666667, 0.6, -0.6, -3.5],
        );
    }
    Ok(())
}

#[test]
fn rrhf_edge_single_candidate_is_sft_4() -> Result<()> {
    let s = t(&[-0.6], Kind::Double).view([1, 1]);
    let c = CandidateSet::new(&s, &ti(&[2]).view([1, 1]), &t(&[1.0], Kind::Double).view([1, 1]))?;
    let out = rrhf_loss(&c, &RrhfConfig::default())?;
    assert_vals(Kind::Double, "K = 1", &[val(&out.loss)], &[0.3]);
    assert_eq!(metric(&out, "rrhf/rank_loss"), 0.0);
    Ok(())
}

#[test]
fn rrhf_edge_all_rewards_tied_4() -> Result<()> {
    let s = leaf(&RRHF_S, Kind::Double);
    let c = CandidateSet::new(
        &s.view([1, 4]),
        &ti(&RRHF_N).view([1, 4]),
        &t(&[1.0; 4], Kind::Double).view([1, 4]),
    )?;
    let out = rrhf_loss(&c, &RrhfConfig::default())?;
    // L_rank = 0, SFT on candidate 0: 3.5/3.
    assert_vals(Kind::Double, "tied", &[val(&out.loss)], &[3.5 / 3.0]);
    out.loss.backward();
    assert_grads(Kind::Double, "grad", &vals(&s.grad()), &[-1.0 / 3.0, 0.0, 0.0, 0.0]);
    Ok(())
}

#[test]
fn rrhf_edge_equal_scores_contribute_nothing_4() -> Result<()> {
    let s = leaf(&[-1.0, -1.0], Kind::Double);
    let c = CandidateSet::new(
        &s.view([1, 2]),
        &ti(&[1, 1]).view([1, 2]),
        &t(&[0.0, 1.0], Kind::Double).view([1, 2]),
    )?;
    let out = rrhf_loss(&c, &RrhfConfig::default().with_sft_weight(0.0))?;
    assert_eq!(val(&out.loss), 0.0);
    out.loss.backward();
    assert_eq!(vals(&s.grad()), vec![0.0, 0.0]);
    Ok(())
}

#[test]
fn rrhf_non_finite_reward_is_an_error_4() {
    let c = CandidateSet::new(
        &t(&RRHF_S, Kind::Double).view([1, 4]),
        &ti(&RRHF_N).view([1, 4]),
        &t(&[0.5, f64::NAN, 1.0, 2.0], Kind::Double).view([1, 4]),
    )
    .unwrap();
    let err = rrhf_loss(&c, &RrhfConfig::default()).unwrap_err();
    assert!(
        matches!(&err, amend_losses::Error::NonFiniteReward { index, .. } if index == &vec![0, 1]),
        "{err}"
    );
}

#[test]
fn rrhf_empty_candidate_4_and_1_2() -> Result<()> {
    let s = leaf(&[-3.5, 0.0, -0.8], Kind::Double);
    let make = |s: &Tensor| {
        CandidateSet::new(
            &s.view([1, 3]),
            &ti(&[3, 0, 4]).view([1, 3]),
            &t(&[0.5, 2.0, 1.0], Kind::Double).view([1, 3]),
        )
    };
    let err = rrhf_loss(&make(&s)?, &RrhfConfig::default()).unwrap_err();
    assert!(matches!(err, amend_losses::Error::EmptySequence { index: 1, .. }), "{err}");
    // Mask drops the empty candidate: L = RRHF over candidates 0 and 2.
    let out = rrhf_loss(&make(&s)?, &RrhfConfig::default().with_empty_policy(EmptyPolicy::Mask))?;
    // p = [−7/6, −0.2]; r: 0.5 < 1.0 and p_0 < p_2: no violation; SFT on candidate 2: 0.2.
    assert_vals(Kind::Double, "masked", &[val(&out.loss)], &[0.2]);
    out.loss.backward();
    assert_eq!(vals(&s.grad())[1], 0.0);
    Ok(())
}

// ---------------------------------------------------------------- §5 NEAT

fn neat_set(kind: Kind, r_neg: [f64; 2]) -> Result<(CandidateSet, Tensor)> {
    let s = leaf(&[-3.5, -0.6, -0.8, -2.0, -0.5, -2.1], kind);
    let r = [0.5, 2.0, 1.0, 2.0, r_neg[0], r_neg[1]];
    let c = CandidateSet::new(
        &s.view([1, 6]),
        &ti(&[3, 2, 4, 2, 2, 3]).view([1, 6]),
        &t(&r, kind).view([1, 6]),
    )?
    .with_origins(&[
        Origin::Dataset,
        Origin::Dataset,
        Origin::Policy,
        Origin::Policy,
        Origin::NegPrompt,
        Origin::NegPrompt,
    ])?;
    Ok((c, s))
}

const NEAT_N: [i64; 6] = [3, 2, 4, 2, 2, 3];

#[test]
fn neat_reward_model_scoring_5() -> Result<()> {
    for kind in KINDS {
        let cfg = NeatConfig::default().with_neg_scoring(NegScoring::RewardModel);
        let (c, s) = neat_set(kind, [-1.0, 0.0])?;
        let out = neat_loss(&c, &cfg.clone().with_sft_weight(0.0))?;
        assert_vals(kind, "L_rank", &[val(&out.loss)], &[3.8333333333]);
        out.loss.backward();
        assert_grads(
            kind,
            "dL_rank/dp",
            &grad_p(&s, &NEAT_N, 1.0),
            &[-2.0, -2.0, 2.0, -3.0, 4.0, 1.0],
        );
        assert_vals(kind, "pair acc", &[metric(&out, "rewards/accuracies")], &[6.0 / 14.0]);
        assert_vals(kind, "neg pair acc", &[metric(&out, "neat/neg_pair_accuracy")], &[3.0 / 9.0]);
        let (c, _) = neat_set(kind, [-1.0, 0.0])?;
        assert_vals(kind, "L", &[val(&neat_loss(&c, &cfg)?.loss)], &[4.1333333333]);
    }
    Ok(())
}

#[test]
fn neat_forced_lowest_scoring_5() -> Result<()> {
    for kind in KINDS {
        // The given NegPrompt rewards are ignored (NaN here).
        let (c, s) = neat_set(kind, [f64::NAN, 7.0])?;
        let out = neat_loss(&c, &NeatConfig::default().with_sft_weight(0.0))?;
        assert_vals(kind, "L_rank", &[val(&out.loss)], &[3.3833333333]);
        out.loss.backward();
        assert_grads(
            kind,
            "dL_rank/dp",
            &grad_p(&s, &NEAT_N, 1.0),
            &[-2.0, -2.0, 2.0, -3.0, 3.0, 2.0],
        );
        assert_vals(kind, "pair acc", &[metric(&out, "rewards/accuracies")], &[6.0 / 13.0]);
        assert_vals(kind, "neg pair acc", &[metric(&out, "neat/neg_pair_accuracy")], &[3.0 / 8.0]);
        assert_vals(kind, "neg logps", &[metric(&out, "neat/neg_logps")], &[(-0.25 - 0.7) / 2.0]);
        let (c, _) = neat_set(kind, [0.0, 0.0])?;
        assert_vals(
            kind,
            "L",
            &[val(&neat_loss(&c, &NeatConfig::default())?.loss)],
            &[3.6833333333],
        );
        let (c, _) = neat_set(kind, [0.0, 0.0])?;
        let out = neat_loss(&c, &NeatConfig::default().with_sft_norm(SftNorm::Sum))?;
        assert_vals(kind, "L with Sum SFT", &[val(&out.loss)], &[3.3833333333 + 0.6]);
    }
    Ok(())
}

#[test]
fn neat_forced_lowest_delta_does_not_change_the_loss_5() -> Result<()> {
    let (c, _) = neat_set(Kind::Double, [0.0, 0.0])?;
    let a = val(&neat_loss(&c, &NeatConfig::default())?.loss);
    let (c, _) = neat_set(Kind::Double, [0.0, 0.0])?;
    let b = val(&neat_loss(
        &c,
        &NeatConfig::default().with_neg_scoring(NegScoring::ForcedLowest { delta: 37.0 }),
    )?
    .loss);
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn neat_without_negatives_is_rrhf_5() -> Result<()> {
    for kind in KINDS {
        let (c, _) = rrhf_set(kind)?;
        let out = neat_loss(&c, &NeatConfig::default())?;
        assert_vals(kind, "L", &[val(&out.loss)], &[1.2]);
        assert_vals(kind, "pair acc", &[metric(&out, "rewards/accuracies")], &[0.6]);
        let (c, _) = rrhf_set(kind)?;
        let out = neat_loss(&c, &NeatConfig::default().with_sft_weight(0.0))?;
        assert_vals(kind, "L_rank", &[val(&out.loss)], &[0.9]);
    }
    Ok(())
}

#[test]
fn neat_only_negative_prompt_candidates_5() -> Result<()> {
    let s = leaf(&[-0.5, -2.1], Kind::Double);
    let c = CandidateSet::new(
        &s.view([1, 2]),
        &ti(&[2, 3]).view([1, 2]),
        &t(&[0.0, 0.0], Kind::Double).view([1, 2]),
    )?
    .with_origins(&[Origin::NegPrompt, Origin::NegPrompt])?;
    let out = neat_loss(&c, &NeatConfig::default())?;
    assert_eq!(val(&out.loss), 0.0);
    assert_eq!(out.parts[0].count, 1.0, "the group still counts");
    assert_eq!(out.metrics.get("neat/groups_without_sft_target").unwrap().sum, 1.0);
    Ok(())
}

// ---------------------------------------------------------------- §6.5 preference baselines

const PAIR_SC: [f64; 2] = [-10.0, -8.0];
const PAIR_SR: [f64; 2] = [-12.0, -7.0];
const PAIR_RC: [f64; 2] = [-11.0, -8.5];
const PAIR_RR: [f64; 2] = [-11.5, -7.2];
const PAIR_NC: [i64; 2] = [5, 4];
const PAIR_NR: [i64; 2] = [6, 4];

/// (per-pair losses, ∂L/∂S_c, ∂L/∂S_r, output).
type PairRun = (Vec<f64>, Vec<f64>, Vec<f64>, amend_losses::LossOutput);

/// Runs a pairwise loss on the two §6.5 pairs with `Reduction::Sum` (per-pair gradients);
/// returns (per-pair losses, ∂L/∂S_c, ∂L/∂S_r, output).
fn pairs_run(
    kind: Kind,
    f: impl Fn(&SeqLogps, &SeqLogps, &Tensor, &Tensor) -> Result<amend_losses::LossOutput>,
) -> Result<PairRun> {
    let (c, sc) = seqs(&PAIR_SC, &PAIR_NC, kind)?;
    let (r, sr) = seqs(&PAIR_SR, &PAIR_NR, kind)?;
    let out = f(&c, &r, &t(&PAIR_RC, kind), &t(&PAIR_RR, kind))?;
    out.per_example.sum(kind).backward();
    Ok((vals(&out.per_example), vals(&sc.grad()), vals(&sr.grad()), out))
}

fn dpo_case(cfg: DpoConfig, loss: [f64; 2], grad: Option<[f64; 2]>) -> Result<()> {
    for kind in KINDS {
        let (l, gc, gr, _) = pairs_run(kind, |c, r, rc, rr| dpo_loss(c, r, rc, rr, &cfg))?;
        assert_vals(kind, "per pair", &l, &loss);
        if let Some(g) = grad {
            assert_grads(kind, "dL/dh", &gc, &g);
            assert_grads(kind, "dL/dS_r = −dL/dh", &gr, &[-g[0], -g[1]]);
        }
    }
    Ok(())
}

#[test]
fn dpo_sigmoid_6_5() -> Result<()> {
    dpo_case(
        DpoConfig::default(),
        [0.6209570478, 0.6782596763],
        Some([-0.0462570155, -0.0492500562]),
    )?;
    for kind in KINDS {
        let (_, _, _, out) =
            pairs_run(kind, |c, r, rc, rr| dpo_loss(c, r, rc, rr, &DpoConfig::default()))?;
        assert_vals(kind, "batch mean", &[val(&out.loss)], &[0.6496083621]);
    }
    Ok(())
}

#[test]
fn cdpo_label_smoothing_6_5() -> Result<()> {
    dpo_case(
        DpoConfig::default().with_label_smoothing(0.1),
        [0.6359570478, 0.6812596763],
        Some([-0.0362570155, -0.0392500562]),
    )
}

#[test]
fn robust_dpo_6_5() -> Result<()> {
    dpo_case(
        DpoConfig::default().with_loss_type(DpoLossType::Robust).with_label_smoothing(0.1),
        [0.6022070478, 0.6745096763],
        Some([-0.0587570155, -0.0617500562]),
    )
}

#[test]
fn ipo_length_normalised_6_5() -> Result<()> {
    for kind in KINDS {
        let cfg = DpoConfig::default().with_loss_type(DpoLossType::Ipo);
        let (l, gc, _, _) = pairs_run(kind, |c, r, rc, rr| dpo_loss(c, r, rc, rr, &cfg))?;
        assert_vals(kind, "per pair", &l, &[22.2469444444, 24.255625]);
        // ∂L/∂h̄ = [−9.4333333333, −9.85]; ∂h̄/∂S_c = 1/n_c.
        assert_grads(kind, "dL/dhbar", &[gc[0] * 5.0, gc[1] * 4.0], &[-9.4333333333, -9.85]);
    }
    Ok(())
}

#[test]
fn ipo_unnormalised_6_5() -> Result<()> {
    dpo_case(
        DpoConfig::default().with_loss_type(DpoLossType::Ipo).with_ipo_length_normalize(false),
        [12.25, 22.09],
        None,
    )
}

#[test]
fn hinge_6_5() -> Result<()> {
    dpo_case(
        DpoConfig::default().with_loss_type(DpoLossType::Hinge),
        [0.85, 0.97],
        Some([-0.1, -0.1]),
    )
}

#[test]
fn hinge_subgradient_zero_at_the_hinge_6_1() -> Result<()> {
    // βh = 1 exactly: h = 10 with β = 0.1.
    let (c, sc) = seqs(&[-1.0], &[1], Kind::Double)?;
    let (r, _) = seqs(&[-11.0], &[1], Kind::Double)?;
    let z = t(&[0.0], Kind::Double);
    let out = dpo_loss(&c, &r, &z, &z, &DpoConfig::default().with_loss_type(DpoLossType::Hinge))?;
    assert_eq!(val(&out.loss), 0.0);
    out.loss.backward();
    assert_eq!(vals(&sc.grad()), vec![0.0]);
    Ok(())
}

#[test]
fn dpo_identical_chosen_and_rejected_is_ln2_6_1() -> Result<()> {
    let (c, sc) = seqs(&[-5.0], &[3], Kind::Double)?;
    let (r, sr) = seqs(&[-5.0], &[3], Kind::Double)?;
    let z = t(&[-6.0], Kind::Double);
    let out = dpo_loss(&c, &r, &z, &z, &DpoConfig::default())?;
    assert_vals(Kind::Double, "ln 2", &[val(&out.loss)], &[std::f64::consts::LN_2]);
    out.loss.backward();
    assert_grads(Kind::Double, "−β/2", &vals(&sc.grad()), &[-0.05]);
    assert_grads(Kind::Double, "+β/2", &vals(&sr.grad()), &[0.05]);
    Ok(())
}

#[test]
fn dpo_metric_vector_6_5() -> Result<()> {
    for kind in KINDS {
        let (_, _, _, out) =
            pairs_run(kind, |c, r, rc, rr| dpo_loss(c, r, rc, rr, &DpoConfig::default()))?;
        let m = |n| metric(&out, n);
        assert_vals(
            kind,
            "metrics",
            &[
                m("rewards/chosen"),
                m("rewards/rejected"),
                m("rewards/margins"),
                m("rewards/accuracies"),
                m("logps/chosen"),
                m("logps/rejected"),
            ],
            &[0.075, -0.015, 0.09, 1.0, -9.0, -9.5],
        );
        let rc = out.metrics.get("rewards/chosen").unwrap();
        assert_vals(kind, "rewards/chosen sum", &[rc.sum], &[0.15]);
        assert_eq!(rc.count, 2.0);
    }
    Ok(())
}

fn simpo_case(cfg: SimPoConfig, loss: [f64; 2], grad: [f64; 2]) -> Result<()> {
    for kind in KINDS {
        let (l, gc, gr, _) = pairs_run(kind, |c, r, _, _| simpo_loss(c, r, &cfg))?;
        assert_vals(kind, "per pair", &l, &loss);
        // ∂L/∂(A_c − A_r) = ∂L/∂S_c · n_c = −∂L/∂S_r · n_r
        assert_grads(kind, "dL/dscore", &[gc[0] * 5.0, gc[1] * 4.0], &grad);
        assert_grads(kind, "dL/dscore (rejected)", &[-gr[0] * 6.0, -gr[1] * 4.0], &grad);
    }
    Ok(())
}

#[test]
fn simpo_library_default_6_5() -> Result<()> {
    simpo_case(SimPoConfig::default(), [0.9740769842, 1.3132616875], [-1.2449186624, -1.4621171573])
}

#[test]
fn simpo_gamma1_6_5() -> Result<()> {
    simpo_case(
        SimPoConfig::default().with_gamma(1.0),
        [1.3132616875, 1.7014132780],
        [-1.4621171573, -1.6351489524],
    )
}

#[test]
fn simpo_beta2_5_gamma1_375_6_5() -> Result<()> {
    simpo_case(
        SimPoConfig::default().with_beta(2.5).with_gamma(gamma_from_ratio(2.5, 0.55)),
        [1.6004126516, 2.1269280110],
        [-1.9954669443, -2.2019926949],
    )
}

#[test]
fn simpo_trl_defaults_preference_term_6_5() -> Result<()> {
    simpo_case(
        SimPoConfig::default().with_beta(0.1).with_gamma(0.5),
        [0.9740769842, 0.9897117547],
        [-0.0622459331, -0.0628316188],
    )
}

#[test]
fn simpo_nll_part_6_2() -> Result<()> {
    let (c, _) = seqs(&PAIR_SC, &PAIR_NC, Kind::Double)?;
    let (r, _) = seqs(&PAIR_SR, &PAIR_NR, Kind::Double)?;
    let out = simpo_loss(&c, &r, &SimPoConfig::default().with_nll_weight(1.0))?;
    assert_eq!(out.parts.len(), 2);
    assert_eq!(out.parts[1].count, 9.0);
    let nll = 18.0 / 9.0;
    assert_vals(
        Kind::Double,
        "loss",
        &[val(&out.loss)],
        &[(0.9740769842 + 1.3132616875) / 2.0 + nll],
    );
    assert_vals(Kind::Double, "nll_loss", &[metric(&out, "nll_loss")], &[nll]);
    Ok(())
}

#[test]
fn orpo_odds_ratio_6_5() -> Result<()> {
    for kind in KINDS {
        let cfg = OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly);
        let (l, gc, gr, out) = pairs_run(kind, |c, r, _, _| orpo_loss(c, r, None, &cfg))?;
        assert_vals(kind, "L_OR", &l, &[0.0693147181, 0.0851757483]);
        assert_vals(
            kind,
            "log_odds_chosen",
            &[metric(&out, "log_odds_chosen")],
            &[(0.0 - 0.2954734088) / 2.0],
        );
        assert_vals(
            kind,
            "log_odds_ratio",
            &[metric(&out, "log_odds_ratio")],
            &[(-std::f64::consts::LN_2 - 0.8517574831) / 2.0],
        );
        // ∂L_OR/∂(A_c, A_r) through the per-pair losses only (the NLL part is separate).
        assert_grads(
            kind,
            "dL_OR/dA_c",
            &[gc[0] * 5.0, gc[1] * 4.0],
            &[-0.0578258821, -0.0663072717],
        );
        assert_grads(
            kind,
            "dL_OR/dA_r",
            &[gr[0] * 6.0, gr[1] * 4.0],
            &[0.0578258821, 0.0693920965],
        );
        assert_vals(kind, "rewards/chosen", &[metric(&out, "rewards/chosen")], &[-0.2]);
        assert_vals(
            kind,
            "rewards/rejected",
            &[metric(&out, "rewards/rejected")],
            &[(-0.2 - 0.175) / 2.0],
        );
    }
    Ok(())
}

#[test]
fn orpo_dlogodds_6_5() -> Result<()> {
    // ∂L_OR/∂log_odds = −λσ(−log_odds): −0.05 at 0, −0.0573335583 at −0.2954734088.
    let lam = 0.1;
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!((-lam * sig(0.0) + 0.05).abs() < 1e-12);
    assert!((-lam * sig(0.2954734088) + 0.0573335583).abs() < 1e-9);
    // and through the library: log_odds = (A_c − A_r) − … has ∂/∂A_c = 1/(1 − e^{A_c}).
    let (l, gc, _, _) = pairs_run(Kind::Double, |c, r, _, _| {
        orpo_loss(c, r, None, &OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly))
    })?;
    assert!(l[0] > 0.0);
    let expected = -0.05 / (1.0 - (-2.0f64).exp());
    assert_grads(Kind::Double, "chain rule", &[gc[0] * 5.0], &[expected]);
    Ok(())
}

#[test]
fn orpo_nll_part_prompt_and_response_6_3() -> Result<()> {
    let (c, _) = seqs(&PAIR_SC, &PAIR_NC, Kind::Double)?;
    let (r, _) = seqs(&PAIR_SR, &PAIR_NR, Kind::Double)?;
    let (nll, snll) = seqs(&[-14.0, -9.0], &[9, 6], Kind::Double)?;
    let out = orpo_loss(&c, &r, Some(&nll), &OrpoConfig::default())?;
    assert_eq!(out.parts[1].count, 15.0);
    assert_vals(
        Kind::Double,
        "loss",
        &[val(&out.loss)],
        &[(0.0693147181 + 0.0851757483) / 2.0 + 23.0 / 15.0],
    );
    out.loss.backward();
    assert_grads(Kind::Double, "dNLL/dS", &vals(&snll.grad()), &[-1.0 / 15.0, -1.0 / 15.0]);
    assert!(orpo_loss(&c, &r, None, &OrpoConfig::default()).is_err());
    Ok(())
}

#[test]
fn orpo_clamp_at_probability_one_6_3() -> Result<()> {
    let (c, sc) = seqs(&[0.0], &[3], Kind::Double)?;
    let (r, _) = seqs(&[-3.0], &[3], Kind::Double)?;
    let out =
        orpo_loss(&c, &r, None, &OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly))?;
    assert!(val(&out.loss).is_finite());
    out.loss.backward();
    assert!(vals(&sc.grad())[0].is_finite());
    assert_eq!(out.metrics.get("orpo/clamped").unwrap().sum, 1.0);
    Ok(())
}

#[test]
fn kto_given_reference_point_6_5() -> Result<()> {
    for kind in KINDS {
        let (p, s) = seqs(&[1.0, 0.3, -0.5, 0.6], &[1, 1, 1, 1], kind)?;
        let reference = t(&[0.0; 4], kind);
        let des = Tensor::from_slice(&[true, true, false, false]);
        let out =
            kto_loss(&p, &reference, &des, KtoReferencePoint::Given(0.2), &KtoConfig::default())?;
        assert_vals(
            kind,
            "per example",
            &vals(&out.per_example),
            &[0.4800106598, 0.4975000208, 0.4825071423, 0.5099986669],
        );
        assert_vals(kind, "sum", &[val(&out.parts[0].sum)], &[1.9700164899]);
        assert_eq!(out.parts[0].count, 4.0);
        assert_vals(kind, "mean", &[val(&out.loss)], &[0.4925041225]);
        out.per_example.sum(kind).backward();
        assert_grads(
            kind,
            "dL/drho",
            &vals(&s.grad()),
            &[-0.0249600426, -0.0249993750, 0.0249694000, 0.0249900027],
        );
        assert_vals(kind, "rewards/chosen", &[metric(&out, "rewards/chosen")], &[0.065]);
        assert_vals(kind, "rewards/rejected", &[metric(&out, "rewards/rejected")], &[0.005]);
        assert_vals(kind, "rewards/margins", &[metric(&out, "rewards/margins")], &[0.06]);
        assert_vals(kind, "kl", &[metric(&out, "kl")], &[0.2]);
    }
    Ok(())
}

#[test]
fn kto_reference_point_estimate_6_4() -> Result<()> {
    for kind in KINDS {
        let pk = t(&[-20.0, -15.0, -18.0], kind);
        let rk = t(&[-20.5, -14.0, -18.9], kind);
        let stats = kto_reference_point_stats(&pk, &rk)?;
        assert_vals(kind, "z", &[kto_reference_point(stats)], &[0.1333333333]);
        let (p, _) = seqs(&[-9.0, -10.0, -8.0], &[3, 3, 3], kind)?;
        let out = kto_loss(
            &p,
            &t(&[-10.0, -9.5, -8.0], kind),
            &Tensor::from_slice(&[true, false, true]),
            KtoReferencePoint::Estimate { policy_kl: &pk, reference_kl: &rk },
            &KtoConfig::default(),
        )?;
        assert_vals(kind, "kl metric", &[metric(&out, "kl")], &[0.1333333333]);
    }
    // z is clamped at 0.
    let neg = kto_reference_point(kto_reference_point_stats(
        &t(&[-2.0, -2.0], Kind::Double),
        &t(&[-1.0, -1.0], Kind::Double),
    )?);
    assert_eq!(neg, 0.0);
    Ok(())
}

#[test]
fn kto_apo_zero_unpaired_6_5() -> Result<()> {
    for kind in KINDS {
        let (p, _) = seqs(&[1.0, 0.3, -0.5, 0.6], &[1, 1, 1, 1], kind)?;
        let out = kto_loss(
            &p,
            &t(&[0.0; 4], kind),
            &Tensor::from_slice(&[true, true, false, false]),
            KtoReferencePoint::Given(0.2),
            &KtoConfig::default().with_loss_type(KtoLossType::ApoZeroUnpaired),
        )?;
        assert_vals(
            kind,
            "per example",
            &vals(&out.per_example),
            &[0.4750208125, 0.4925005624, 0.4875026035, 0.5149955016],
        );
    }
    Ok(())
}

#[test]
fn kto_estimate_needs_two_examples_2_3() {
    let (p, _) = seqs(&[-1.0], &[1], Kind::Double).unwrap();
    let one = t(&[0.0], Kind::Double);
    let err = kto_loss(
        &p,
        &one,
        &Tensor::from_slice(&[true]),
        KtoReferencePoint::Estimate { policy_kl: &one, reference_kl: &one },
        &KtoConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, amend_losses::Error::InvalidInput { .. }), "{err}");
}

// ---------------------------------------------------------------- §7 unlearning

const F_S: [f64; 3] = [-12.0, -7.0, -3.5];
const F_R: [f64; 3] = [-11.5, -7.2, -4.0];
const F_N: [i64; 3] = [6, 4, 3];

fn npo_case(beta: f64, per: [f64; 3], mean: f64, grad: [f64; 3]) -> Result<()> {
    for kind in KINDS {
        let (f, s) = seqs(&F_S, &F_N, kind)?;
        let out = npo_loss(&f, &t(&F_R, kind), None, &NpoConfig::default().with_beta(beta))?;
        assert_vals(kind, "per example", &vals(&out.per_example), &per);
        assert_vals(kind, "mean", &[val(&out.loss)], &[mean]);
        out.per_example.sum(kind).backward();
        assert_grads(kind, "dL/dS", &vals(&s.grad()), &grad);
        assert_vals(
            kind,
            "npo/weight",
            &[metric(&out, "npo/weight")],
            &[grad.iter().sum::<f64>() / 3.0],
        );
    }
    Ok(())
}

#[test]
fn npo_beta_0_1_7() -> Result<()> {
    npo_case(
        0.1,
        [13.3691929603, 14.0639435945, 14.3691929603],
        13.9341098384,
        [0.9750052070, 1.0099996667, 1.0249947930],
    )
}

#[test]
fn npo_beta_1_7() -> Result<()> {
    npo_case(
        1.0,
        [0.9481539684, 1.5962777388, 1.9481539684],
        1.4975285585,
        [0.7550813376, 1.0996679946, 1.2449186624],
    )
}

fn simnpo_case(beta: f64, delta: f64, per: [f64; 3], mean: f64, grad: [f64; 3]) -> Result<()> {
    for kind in KINDS {
        let (f, s) = seqs(&F_S, &F_N, kind)?;
        let cfg = SimNpoConfig::default().with_beta(beta).with_delta(delta).with_forget_weight(1.0);
        let out = simnpo_loss(&f, None, &cfg)?;
        assert_vals_rel(kind, "per example", &vals(&out.per_example), &per);
        assert_vals_rel(kind, "mean", &[val(&out.loss)], &[mean]);
        out.per_example.sum(kind).backward();
        let ga: Vec<f64> = vals(&s.grad()).iter().zip(F_N).map(|(g, n)| g * n as f64).collect();
        assert_vals_rel(kind, "dL/dA", &ga, &grad);
    }
    Ok(())
}

#[test]
fn simnpo_beta_4_5_delta0_7() -> Result<()> {
    simnpo_case(
        4.5,
        0.0,
        [5.4845417655e-05, 1.6891410096e-04, 2.3261325119e-03],
        8.4996401017e-04,
        [2.4678915197e-04, 7.5996902950e-04, 1.0440251387e-02],
    )
}

#[test]
fn simnpo_beta_4_5_delta1_7() -> Result<()> {
    simnpo_case(
        4.5,
        1.0,
        [4.9101088216e-03, 1.4953644437e-02, 1.7194266938e-01],
        6.3935474214e-02,
        [2.1973885261e-02, 6.6171956777e-02, 6.4164260165e-01],
    )
}

#[test]
fn simnpo_beta1_delta0_7() -> Result<()> {
    simnpo_case(
        1.0,
        0.0,
        [0.2538560221, 0.3204483009, 0.5421954544],
        0.3721665925,
        [0.2384058440, 0.2960943961, 0.4749160567],
    )
}

#[test]
fn simnpo_default_forget_weight_scales_the_loss_7() -> Result<()> {
    let (f, _) = seqs(&F_S, &F_N, Kind::Double)?;
    let out = simnpo_loss(&f, None, &SimNpoConfig::default())?;
    assert_vals_rel(Kind::Double, "0.125 · mean", &[val(&out.loss)], &[0.125 * 8.4996401017e-04]);
    Ok(())
}

#[test]
fn gradient_ascent_norms_7() -> Result<()> {
    for kind in KINDS {
        // Forget tokens [−1, −2, −0.5] and [−0.2, −0.4], scored through the primitive.
        let per_token =
            t(&[-1.0, -2.0, -0.5, -0.2, -0.4, 0.0], kind).view([2, 3]).set_requires_grad(true);
        let s = per_token.sum_dim_intlist([1i64].as_slice(), false, kind);
        let forget = SeqLogps::from_sums(&s, &ti(&[3, 2]))?;
        let out = gradient_ascent_loss(&forget, None, &GradientAscentConfig::default())?;
        assert_vals(kind, "Token", &[val(&out.loss)], &[-0.82]);
        assert_vals(kind, "sum", &[val(&out.parts[0].sum)], &[-4.1]);
        assert_eq!(out.parts[0].count, 5.0);
        out.loss.backward();
        assert_grads(kind, "dL/dlp", &vals(&per_token.grad())[..5], &[0.2; 5]);
        let forget = SeqLogps::from_sums(&t(&[-3.5, -0.6], kind), &ti(&[3, 2]))?;
        let seq = gradient_ascent_loss(
            &forget,
            None,
            &GradientAscentConfig::default().with_norm(GaNorm::Sequence),
        )?;
        assert_vals(kind, "Sequence", &[val(&seq.loss)], &[-0.7333333333]);
        let ss = gradient_ascent_loss(
            &forget,
            None,
            &GradientAscentConfig::default().with_norm(GaNorm::SequenceSum),
        )?;
        assert_vals(kind, "SequenceSum", &[val(&ss.loss)], &[-2.05]);
    }
    Ok(())
}

#[test]
fn npo_with_retain_part_7() -> Result<()> {
    let (f, _) = seqs(&F_S, &F_N, Kind::Double)?;
    let (retain, rs) = seqs(&[-4.0, -2.0], &[4, 2], Kind::Double)?;
    let out = npo_loss(
        &f,
        &t(&F_R, Kind::Double),
        Some(&retain),
        &NpoConfig::default().with_retain_weight(0.5),
    )?;
    assert_eq!(out.parts.len(), 2);
    assert_eq!(out.parts[1].count, 6.0);
    assert_vals(Kind::Double, "loss", &[val(&out.loss)], &[13.9341098384 + 0.5 * 1.0]);
    assert_vals(Kind::Double, "retain_loss", &[metric(&out, "retain_loss")], &[1.0]);
    out.loss.backward();
    assert_grads(Kind::Double, "retain grad", &vals(&rs.grad()), &[-0.5 / 6.0, -0.5 / 6.0]);
    Ok(())
}

#[test]
fn reductions_sum_and_none_2_1() -> Result<()> {
    let (c, _) = seqs(&PAIR_SC, &PAIR_NC, Kind::Double)?;
    let (r, _) = seqs(&PAIR_SR, &PAIR_NR, Kind::Double)?;
    let (rc, rr) = (t(&PAIR_RC, Kind::Double), t(&PAIR_RR, Kind::Double));
    let sum = dpo_loss(&c, &r, &rc, &rr, &DpoConfig::default().with_reduction(Reduction::Sum))?;
    assert_vals(Kind::Double, "Sum", &[val(&sum.loss)], &[0.6209570478 + 0.6782596763]);
    let none = dpo_loss(&c, &r, &rc, &rr, &DpoConfig::default().with_reduction(Reduction::None))?;
    assert_vals(Kind::Double, "None", &vals(&none.loss), &[0.6209570478, 0.6782596763]);
    let bm =
        dpo_loss(&c, &r, &rc, &rr, &DpoConfig::default().with_reduction(Reduction::BatchMean))?;
    assert_vals(Kind::Double, "BatchMean", &[val(&bm.loss)], &[0.6496083621]);
    Ok(())
}
