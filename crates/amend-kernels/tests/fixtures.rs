//! Kernels, naive siblings and f64 oracles against float64 PyTorch autograd of the composite
//! ops (`tests/fixtures/kernel_cases.json`, written by `scripts/gen_kernel_fixtures.py`).

mod common;

use amend_kernels::naive::{selected_logp_naive, token_kl_naive};
use amend_kernels::reference::{selected_logp_ref, tnt_ref, token_kl_ref, unlikelihood_ref};
use amend_kernels::{
    Candidates, KlDirection, KlTarget, KlValue, LogitsIo, SelectedLogpConfig, SelectedLogpOut,
    TntKernelConfig, TntVariant, TokenKlConfig, UnlikelihoodConfig, selected_logp, tnt, token_kl,
    unlikelihood,
};
use amend_testing::Tol;
use amend_testing::{F32, load_json_fixture};
use common::{GRAD, ORACLE, close32, ints, nums, to_f32};

/// The naive siblings sum in sequential f32 and recompute exponentials; their gradients are held
/// to a slightly looser bound than the fused kernels' `GRAD`.
const NAIVE_GRAD: Tol = Tol { rel: 1e-5, abs: 2e-6 };
use serde_json::Value;

fn cases(op: &str) -> Vec<Value> {
    let all: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "kernel_cases.json");
    let cases: Vec<Value> =
        all["cases"].as_array().unwrap().iter().filter(|c| c["op"] == op).cloned().collect();
    assert!(!cases.is_empty(), "no fixture cases for {op}");
    cases
}

fn f64_opt(v: &Value) -> Option<f64> {
    v.as_f64()
}

#[test]
fn selected_logp_matches_torch_fixture() {
    for c in cases("selected_logp") {
        let name = c["name"].as_str().unwrap();
        let vocab = c["vocab"].as_u64().unwrap() as usize;
        let z = nums(&c["logits"]);
        let labels = ints(&c["labels"]);
        let scale = nums(&c["row_scale"]);
        let cfg = SelectedLogpConfig::default()
            .with_label_smoothing(c["label_smoothing"].as_f64().unwrap())
            .with_lse_square_scale(c["lse_square_scale"].as_f64().unwrap())
            .with_softcap(f64_opt(&c["softcap"]))
            .with_temperature(c["temperature"].as_f64().unwrap());
        let (loss_e, grad_e) = (nums(&c["loss"]), nums(&c["grad"]));
        let (lse_e, logp_e) = (nums(&c["lse"]), nums(&c["logp"]));

        let o = selected_logp_ref(&z, vocab, &labels, Some(&scale), &cfg).unwrap();
        ORACLE.assert_all_close(&format!("{name} oracle loss"), &o.loss, &loss_e);
        ORACLE.assert_all_close(&format!("{name} oracle grad"), &o.grad, &grad_e);
        ORACLE.assert_all_close(&format!("{name} oracle lse"), &o.lse, &lse_e);
        ORACLE.assert_all_close(&format!("{name} oracle logp"), &o.logp, &logp_e);

        let (zf, sf) = (to_f32(&z), to_f32(&scale));
        let rows = labels.len();
        for naive in [false, true] {
            let (mut g, mut l, mut lse, mut lp) =
                (vec![0.0; zf.len()], vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            let out = SelectedLogpOut::new(&mut l).with_lse(&mut lse).with_logp(&mut lp);
            let io = LogitsIo::grad(&zf, &mut g);
            if naive {
                selected_logp_naive(io, vocab, &labels, Some(&sf), &cfg, out).unwrap();
            } else {
                selected_logp(io, vocab, &labels, Some(&sf), &cfg, out).unwrap();
            }
            let tag = if naive { "naive" } else { "fused" };
            close32(F32, &format!("{name} {tag} loss"), &l, &loss_e);
            let gtol = if naive { NAIVE_GRAD } else { GRAD };
            close32(gtol, &format!("{name} {tag} grad"), &g, &grad_e);
            close32(F32, &format!("{name} {tag} lse"), &lse, &lse_e);
            close32(F32, &format!("{name} {tag} logp"), &lp, &logp_e);
        }
    }
}

#[test]
fn token_kl_matches_torch_fixture() {
    for c in cases("token_kl") {
        let name = c["name"].as_str().unwrap();
        let vocab = c["vocab"].as_u64().unwrap() as usize;
        let z = nums(&c["logits"]);
        let scale = nums(&c["row_scale"]);
        let cfg = TokenKlConfig::default()
            .with_direction(if c["direction"] == "reverse" {
                KlDirection::Reverse
            } else {
                KlDirection::Forward
            })
            .with_value(if c["value"] == "divergence" {
                KlValue::Divergence
            } else {
                KlValue::CrossEntropy
            })
            .with_smoothing_eps(c["smoothing_eps"].as_f64().unwrap())
            .with_temperature(c["temperature"].as_f64().unwrap());
        let (loss_e, grad_e) = (nums(&c["loss"]), nums(&c["grad"]));
        let zr = c.get("ref_logits").map(nums);
        let exclude = c.get("exclude").filter(|e| !e.is_null()).map(ints);
        let labels = c.get("labels").map(ints);
        let lt = c.get("log_target").map(nums);
        let (zr32, lt32) = (zr.as_deref().map(to_f32), lt.as_deref().map(to_f32));
        let target64 = match c["target"].as_str().unwrap() {
            "reference" => KlTarget::Reference {
                ref_logits: zr.as_deref().unwrap(),
                exclude: exclude.as_deref(),
            },
            "one_hot" => KlTarget::OneHot { labels: labels.as_deref().unwrap() },
            _ => KlTarget::LogProbs { log_target: lt.as_deref().unwrap() },
        };
        let target32 = match c["target"].as_str().unwrap() {
            "reference" => KlTarget::Reference {
                ref_logits: zr32.as_deref().unwrap(),
                exclude: exclude.as_deref(),
            },
            "one_hot" => KlTarget::OneHot { labels: labels.as_deref().unwrap() },
            _ => KlTarget::LogProbs { log_target: lt32.as_deref().unwrap() },
        };
        let o = token_kl_ref(&z, vocab, target64, Some(&scale), &cfg).unwrap();
        ORACLE.assert_all_close(&format!("{name} oracle loss"), &o.loss, &loss_e);
        ORACLE.assert_all_close(&format!("{name} oracle grad"), &o.grad, &grad_e);

        let (zf, sf) = (to_f32(&z), to_f32(&scale));
        for naive in [false, true] {
            let (mut g, mut l) = (vec![0.0; zf.len()], vec![0.0; scale.len()]);
            let io = LogitsIo::grad(&zf, &mut g);
            if naive {
                token_kl_naive(io, vocab, target32, Some(&sf), &cfg, &mut l).unwrap();
            } else {
                token_kl(io, vocab, target32, Some(&sf), &cfg, &mut l).unwrap();
            }
            let tag = if naive { "naive" } else { "fused" };
            close32(F32, &format!("{name} {tag} loss"), &l, &loss_e);
            let gtol = if naive { NAIVE_GRAD } else { GRAD };
            close32(gtol, &format!("{name} {tag} grad"), &g, &grad_e);
        }
    }
}

#[test]
fn unlikelihood_matches_torch_fixture() {
    for c in cases("unlikelihood") {
        let name = c["name"].as_str().unwrap();
        let vocab = c["vocab"].as_u64().unwrap() as usize;
        let z = nums(&c["logits"]);
        let labels = c.get("labels").filter(|l| !l.is_null()).map(ints);
        let offsets: Vec<usize> = ints(&c["offsets"]).into_iter().map(|o| o as usize).collect();
        let ids = ints(&c["ids"]);
        let cands = Candidates::Csr { offsets: &offsets, ids: &ids };
        let cfg = UnlikelihoodConfig::default().with_alpha(c["alpha"].as_f64().unwrap());
        let (loss_e, grad_e) = (nums(&c["loss"]), nums(&c["grad"]));
        let o = unlikelihood_ref(&z, vocab, labels.as_deref(), cands, None, &cfg).unwrap();
        ORACLE.assert_all_close(&format!("{name} oracle loss"), &o.loss, &loss_e);
        ORACLE.assert_all_close(&format!("{name} oracle grad"), &o.grad, &grad_e);
        let zf = to_f32(&z);
        let (mut g, mut l) = (vec![0.0; zf.len()], vec![0.0; loss_e.len()]);
        unlikelihood(
            LogitsIo::grad(&zf, &mut g),
            vocab,
            labels.as_deref(),
            cands,
            None,
            &cfg,
            &mut l,
        )
        .unwrap();
        close32(F32, &format!("{name} loss"), &l, &loss_e);
        close32(GRAD, &format!("{name} grad"), &g, &grad_e);
    }
}

#[test]
fn tnt_matches_torch_fixture() {
    for c in cases("tnt") {
        let name = c["name"].as_str().unwrap();
        let vocab = c["vocab"].as_u64().unwrap() as usize;
        let (z, zr) = (nums(&c["logits"]), nums(&c["ref_logits"]));
        let labels = ints(&c["labels"]);
        let w = nums(&c["weights"]);
        let variant = match c["variant"].as_str().unwrap() {
            "tnff" => TntVariant::Tnff,
            "tnrr" => TntVariant::Tnrr,
            "tnrf" => TntVariant::Tnrf,
            "tnfll" => TntVariant::Tnfll,
            "tnrll" => TntVariant::Tnrll,
            "nl" => TntVariant::Nl { threshold: Some(c["threshold"].as_f64().unwrap()) },
            _ => TntVariant::UlAnnotated,
        };
        let cfg = TntKernelConfig::new(variant)
            .with_alpha(c["alpha"].as_f64().unwrap())
            .with_smoothing_eps(c["smoothing_eps"].as_f64().unwrap());
        let (loss_e, grad_e) = (nums(&c["loss"]), nums(&c["grad"]));
        let o = tnt_ref(&z, vocab, Some(&zr), &labels, &w, &cfg).unwrap();
        ORACLE.assert_all_close(&format!("{name} oracle loss"), &o.loss, &loss_e);
        ORACLE.assert_all_close(&format!("{name} oracle grad"), &o.grad, &grad_e);
        let (zf, zrf, wf) = (to_f32(&z), to_f32(&zr), to_f32(&w));
        let (mut g, mut l) = (vec![0.0; zf.len()], vec![0.0; labels.len()]);
        tnt(LogitsIo::grad(&zf, &mut g), vocab, Some(&zrf), &labels, &wf, &cfg, &mut l).unwrap();
        close32(F32, &format!("{name} loss"), &l, &loss_e);
        close32(GRAD, &format!("{name} grad"), &g, &grad_e);
    }
}
