//! The sequence-level losses against fixtures computed independently in PyTorch (float64) by
//! `scripts/gen_sequence_loss_fixtures.py`: random shapes, masks, ties and extreme values.
//! Configs are deserialised from the fixture's JSON (TRL names included), so this also tests the
//! serde names. Every case runs in f64 (tight) and f32 (loose) where the inputs allow.

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{LossOutput, Result};
use sequence_support::*;
use serde_json::Value;
use tch::{Kind, Tensor};

fn fixtures() -> Value {
    amend_testing::load_json_fixture(env!("CARGO_MANIFEST_DIR"), "sequence_losses.json")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| if x.is_null() { f64::NEG_INFINITY } else { x.as_f64().expect("number") })
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("integer")).collect()
}

fn bools(v: &Value) -> Tensor {
    let b: Vec<bool> =
        v.as_array().expect("array").iter().map(|x| x.as_bool().expect("bool")).collect();
    Tensor::from_slice(&b)
}

fn config<T: serde::de::DeserializeOwned>(case: &Value) -> T {
    serde_json::from_value(case["config"].clone())
        .unwrap_or_else(|e| panic!("{}: config {}: {e}", case["name"], case["config"]))
}

/// Tolerances for fixture comparisons: f64 relative 1e-9 (absolute floor 1e-10), f32 relative
/// 1e-4 (absolute floor 1e-5): inputs reach magnitudes of 1e3, so f32 rounding of the inputs
/// alone is ~1e-4 relative on differences.
#[track_caller]
fn close(kind: Kind, what: &str, got: &[f64], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let (rel, abs) = if kind == Kind::Double { (1e-9, 1e-10) } else { (1e-4, 1e-5) };
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= abs + rel * e.abs().max(g.abs()),
            "{what}[{i}] ({kind:?}): got {g:e}, expected {e:e}"
        );
    }
}

fn check_out(kind: Kind, case: &Value, out: &LossOutput) {
    let name = case["name"].as_str().unwrap();
    close(kind, &format!("{name} loss"), &[val(&out.loss)], &[case["loss"].as_f64().unwrap()]);
    close(
        kind,
        &format!("{name} per_example"),
        &vals(&out.per_example),
        &f64s(&case["per_example"]),
    );
    // loss == Σ weight · sum / count
    let recomposed: f64 = out
        .parts
        .iter()
        .map(|p| if p.count == 0.0 { 0.0 } else { p.weight * val(&p.sum) / p.count })
        .sum();
    close(kind, &format!("{name} Σ w·sum/count"), &[recomposed], &[val(&out.loss)]);
    if let Some(m) = case.get("metrics").and_then(Value::as_object) {
        for (k, v) in m {
            let got = out.metrics.mean(k).unwrap_or_else(|| panic!("{name}: metric {k} missing"));
            close(kind, &format!("{name} metric {k}"), &[got], &[v.as_f64().unwrap()]);
        }
    }
}

#[test]
fn seq_logps_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["seq_logps"].as_array().unwrap() {
        let shape = i64s(&case["shape"]);
        let (b, t, v) = (shape[0], shape[1], shape[2]);
        let logits =
            Tensor::from_slice(&f64s(&case["logits"])).view([b, t, v]).set_requires_grad(true);
        let ids = ti(&i64s(&case["input_ids"])).view([b, t]);
        let mask = ti(&i64s(&case["completion_mask"])).view([b, t]);
        let lp = seq_logps(
            &logits,
            &ids,
            &mask,
            &SeqLogpsConfig::default().with_return_per_token(true),
        )?;
        let name = case["name"].as_str().unwrap();
        close(Kind::Double, &format!("{name} S"), &vals(&lp.sum), &f64s(&case["sum"]));
        assert_eq!(vals(&lp.len), f64s(&case["len"]), "{name} n");
        close(
            Kind::Double,
            &format!("{name} lp"),
            &vals(lp.per_token.as_ref().unwrap()),
            &f64s(&case["per_token"]),
        );
        (&lp.sum * Tensor::from_slice(&f64s(&case["weights"]))).sum(Kind::Double).backward();
        close(
            Kind::Double,
            &format!("{name} dlogits"),
            &vals(&logits.grad()),
            &f64s(&case["grad_logits"]),
        );
        // f32 on the same values.
        let x32 = logits.detach().to_kind(Kind::Float);
        let lp32 = seq_logps(&x32, &ids, &mask, &SeqLogpsConfig::default())?;
        let s64 = f64s(&case["sum"]);
        for (i, (g, e)) in vals(&lp32.sum).iter().zip(&s64).enumerate() {
            // |S| up to ~1e4 on the extreme row: f32 input rounding dominates.
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0) * 10.0,
                "{name} f32 S[{i}]: {g} vs {e}"
            );
        }
    }
    Ok(())
}

fn pair_inputs(case: &Value, kind: Kind) -> Result<(SeqLogps, Tensor, SeqLogps, Tensor)> {
    let (c, sc) = seqs(&f64s(&case["chosen_sum"]), &i64s(&case["chosen_len"]), kind)?;
    let (r, sr) = seqs(&f64s(&case["rejected_sum"]), &i64s(&case["rejected_len"]), kind)?;
    Ok((c, sc, r, sr))
}

#[test]
fn dpo_family_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["dpo"].as_array().unwrap() {
        let cfg: DpoConfig = config(case);
        for kind in KINDS {
            let (c, sc, r, sr) = pair_inputs(case, kind)?;
            let out = dpo_loss(
                &c,
                &r,
                &t(&f64s(&case["ref_chosen"]), kind),
                &t(&f64s(&case["ref_rejected"]), kind),
                &cfg,
            )?;
            if kind == Kind::Float && case["name"].as_str().unwrap().ends_with("extreme") {
                // f32 cannot represent h = 900-ish differences to 1e-4 of tiny values; values only.
                continue;
            }
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad chosen", &vals(&sc.grad()), &f64s(&case["grad_chosen"]));
            close(kind, "grad rejected", &vals(&sr.grad()), &f64s(&case["grad_rejected"]));
        }
    }
    Ok(())
}

#[test]
fn simpo_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["simpo"].as_array().unwrap() {
        let cfg: SimPoConfig = config(case);
        for kind in KINDS {
            let (c, sc, r, sr) = pair_inputs(case, kind)?;
            let out = simpo_loss(&c, &r, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad chosen", &vals(&sc.grad()), &f64s(&case["grad_chosen"]));
            close(kind, "grad rejected", &vals(&sr.grad()), &f64s(&case["grad_rejected"]));
        }
    }
    Ok(())
}

#[test]
fn orpo_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["orpo"].as_array().unwrap() {
        let cfg: OrpoConfig = config(case);
        // f64 only: the clamped case has A ≈ −1e-8, below f32's resolution near 0 relative to S.
        let kind = Kind::Double;
        let (c, sc, r, sr) = pair_inputs(case, kind)?;
        let (nll, sn) = seqs(&f64s(&case["nll_sum"]), &i64s(&case["nll_len"]), kind)?;
        let out = orpo_loss(&c, &r, Some(&nll), &cfg)?;
        check_out(kind, case, &out);
        out.loss.backward();
        close(kind, "grad chosen", &vals(&sc.grad()), &f64s(&case["grad_chosen"]));
        close(kind, "grad rejected", &vals(&sr.grad()), &f64s(&case["grad_rejected"]));
        close(kind, "grad nll", &vals(&sn.grad()), &f64s(&case["grad_nll"]));
    }
    Ok(())
}

#[test]
fn kto_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["kto"].as_array().unwrap() {
        let cfg: KtoConfig = config(case);
        for kind in KINDS {
            let n = f64s(&case["policy_sum"]).len();
            let (p, s) = seqs(&f64s(&case["policy_sum"]), &vec![1; n], kind)?;
            let des = bools(&case["desirable"]);
            let (pk, rk);
            let point = if case["z"].is_null() {
                pk = t(&f64s(&case["policy_kl"]), kind);
                rk = t(&f64s(&case["reference_kl"]), kind);
                KtoReferencePoint::Estimate { policy_kl: &pk, reference_kl: &rk }
            } else {
                KtoReferencePoint::Given(case["z"].as_f64().unwrap())
            };
            let out = kto_loss(&p, &t(&f64s(&case["reference"]), kind), &des, point, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad", &vals(&s.grad()), &f64s(&case["grad"]));
        }
    }
    Ok(())
}

#[test]
fn npo_simnpo_gradient_ascent_match_torch_fixture() -> Result<()> {
    let fx = fixtures();
    for kind in KINDS {
        for case in fx["npo"].as_array().unwrap() {
            let cfg: NpoConfig = config(case);
            let (f, sf) = seqs(&f64s(&case["forget_sum"]), &i64s(&case["forget_len"]), kind)?;
            let (r, sr) = seqs(&f64s(&case["retain_sum"]), &i64s(&case["retain_len"]), kind)?;
            let out = npo_loss(&f, &t(&f64s(&case["forget_ref"]), kind), Some(&r), &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad forget", &vals(&sf.grad()), &f64s(&case["grad_forget"]));
            close(kind, "grad retain", &vals(&sr.grad()), &f64s(&case["grad_retain"]));
        }
        for case in fx["simnpo"].as_array().unwrap() {
            let cfg: SimNpoConfig = config(case);
            let (f, sf) = seqs(&f64s(&case["forget_sum"]), &i64s(&case["forget_len"]), kind)?;
            let (r, sr) = seqs(&f64s(&case["retain_sum"]), &i64s(&case["retain_len"]), kind)?;
            let out = simnpo_loss(&f, Some(&r), &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad forget", &vals(&sf.grad()), &f64s(&case["grad_forget"]));
            close(kind, "grad retain", &vals(&sr.grad()), &f64s(&case["grad_retain"]));
        }
        for case in fx["gradient_ascent"].as_array().unwrap() {
            let cfg: GradientAscentConfig = config(case);
            let (f, sf) = seqs(&f64s(&case["forget_sum"]), &i64s(&case["forget_len"]), kind)?;
            let out = gradient_ascent_loss(&f, None, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad forget", &vals(&sf.grad()), &f64s(&case["grad_forget"]));
        }
    }
    Ok(())
}

#[test]
fn contrastive_perplexity_matches_torch_fixture() -> Result<()> {
    for case in fixtures()["cp"].as_array().unwrap() {
        let cfg: CpConfig = config(case);
        let shape = i64s(&case["shape"]);
        let (g, p, n, r) = (shape[0], shape[1], shape[2], shape[3]);
        for kind in KINDS {
            let pos = t(&f64s(&case["phi_pos"]), kind).view([g, p]).set_requires_grad(true);
            let neg = if n == 0 {
                Tensor::zeros([g, 0], (kind, tch::Device::Cpu)).set_requires_grad(true)
            } else {
                t(&f64s(&case["phi_neg"]), kind).view([g, n]).set_requires_grad(true)
            };
            let rnd = (r > 0)
                .then(|| t(&f64s(&case["phi_rnd"]), kind).view([g, r]).set_requires_grad(true));
            let (mp, mn, mr);
            let mut groups = CpGroups::new(&pos, &neg);
            if !case["mask_pos"].is_null() {
                mp = bools(&case["mask_pos"]).view([g, p]);
                mn = bools(&case["mask_neg"]).view([g, n]);
                groups = groups.with_masks(&mp, &mn);
            }
            if let Some(rnd) = &rnd {
                mr = (!case["mask_rnd"].is_null()).then(|| bools(&case["mask_rnd"]).view([g, r]));
                groups = groups.with_random(rnd, mr.as_ref());
            }
            let out = contrastive_perplexity_loss(&groups, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad pos", &vals(&pos.grad()), &f64s(&case["grad_pos"]));
            if n > 0 {
                close(kind, "grad neg", &vals(&neg.grad()), &f64s(&case["grad_neg"]));
            }
            if let Some(rnd) = &rnd {
                close(kind, "grad rnd", &vals(&rnd.grad()), &f64s(&case["grad_rnd"]));
            }
        }
    }
    Ok(())
}

#[test]
fn cp_reference_label_smoothing_spec_vector_confirmed_by_torch() {
    // Spec §3.5 asks for one cross-check of the ε = 0.1 vector against torch: the fixture holds
    // torch's cross_entropy(label_smoothing = 0.1) result for that row.
    let fx = fixtures();
    let s = &fx["cp_reference_label_smoothing_spec_vector"];
    assert!((s["loss"].as_f64().unwrap() - 0.7982496645).abs() < 1e-9);
    let spec = [0.0636026021, -0.1346879073, -0.0293137514, 0.1003990568];
    for (g, e) in f64s(&s["grad"]).iter().zip(spec) {
        assert!((g - e).abs() < 1e-9, "{g} vs {e}");
    }
}

fn candidates(case: &Value, kind: Kind) -> Result<(CandidateSet, Tensor)> {
    let shape = i64s(&case["shape"]);
    let (g, k) = (shape[0], shape[1]);
    let s = t(&f64s(&case["sum"]), kind).view([g, k]).set_requires_grad(true);
    let mut c = CandidateSet::new(
        &s,
        &ti(&i64s(&case["len"])).view([g, k]),
        &t(&f64s(&case["rewards"]), kind).view([g, k]),
    )?
    .with_mask(&bools(&case["mask"]).view([g, k]))?;
    if !case["origin"].is_null() {
        c = c.with_origin(&ti(&i64s(&case["origin"])).view([g, k]))?;
    }
    Ok((c, s))
}

#[test]
fn rrhf_and_neat_match_torch_fixture() -> Result<()> {
    let fx = fixtures();
    for kind in KINDS {
        for case in fx["rrhf"].as_array().unwrap() {
            let cfg: RrhfConfig = config(case);
            let (c, s) = candidates(case, kind)?;
            let out = rrhf_loss(&c, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad", &vals(&s.grad()), &f64s(&case["grad"]));
        }
        for case in fx["neat"].as_array().unwrap() {
            let cfg: NeatConfig = config(case);
            let (c, s) = candidates(case, kind)?;
            let out = neat_loss(&c, &cfg)?;
            check_out(kind, case, &out);
            out.loss.backward();
            close(kind, "grad", &vals(&s.grad()), &f64s(&case["grad"]));
        }
    }
    Ok(())
}
