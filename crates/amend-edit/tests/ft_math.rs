//! Fine-tuning objectives without a model: spec B.6 test vectors, torch fixtures
//! (`scripts/gen_edit_fixtures.py`), position masks, finite-difference gradients and the bf16
//! master-weight update.

use amend_edit::Error;
use amend_edit::ft::{
    BatchOptions, EditOptimizer, EditRow, MaskMode, Objective, OptimizerConfig, OptimizerKind,
    RowKind, TargetReduction, build_batch, conditional_nll, prompt_last_nll,
};
use amend_models::tokenizer::PaddingSide;
use amend_testing::{F32, F64, Tol, load_json_fixture};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// f64 values against fixtures stored with 10 significant digits.
const FIXTURE: Tol = Tol { rel: 1e-9, abs: 1e-12 };

/// Logits at positions 0, 1, 2 of spec B.6 (vocabulary 4), plus an unused 4th row.
fn b6_logits() -> Tensor {
    Tensor::from_slice(&[2.0f64, 1., 0., -1., 0.5, 0., 1.5, 0., 0., 0., 0.5, 1., 0., 0., 0., 0.])
        .view([1, 4, 4])
}

fn ids(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).view([1, v.len() as i64])
}

fn mask(v: &[bool]) -> Tensor {
    Tensor::from_slice(v).view([1, v.len() as i64])
}

fn val(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn b6_conditional_full_and_prompt_last() {
    let z = b6_logits();
    let x = ids(&[0, 1, 2, 3]);
    // Per-position NLL (predicting ids 1, 2, 3) = [1.44019, 0.595611, 0.851129].
    let cond =
        conditional_nll(&z, &x, &mask(&[false, false, true, true]), TargetReduction::TokenMean)
            .unwrap();
    F32.assert_all_close("L_cond", &[val(&cond)], &[0.72337]);
    let full =
        conditional_nll(&z, &x, &mask(&[false, true, true, true]), TargetReduction::TokenMean)
            .unwrap();
    F32.assert_all_close("full likelihood", &[val(&full)], &[0.96231]);
    let last = z.narrow(1, 1, 1).squeeze_dim(1);
    let pl =
        prompt_last_nll(&last, &ids(&[2, 3]), &mask(&[true, true]), TargetReduction::ExampleMean)
            .unwrap();
    F32.assert_all_close("prompt_last", &[val(&pl)], &[1.345611]);
    // argmax per position = [0, 2, 3]: EasyEdit rewrite_acc = 1.0 for targets [2, 3].
    let am: Vec<i64> = Vec::try_from(z.narrow(1, 0, 3).argmax(-1, false).flatten(0, -1)).unwrap();
    assert_eq!(am, vec![0, 2, 3]);
    assert_eq!(
        amend_edit::metrics::token_accuracy(&[2, 3], &[am[1] as u32, am[2] as u32]).unwrap(),
        1.0
    );
}

#[test]
fn b6_value_mask_vs_position_mask() {
    let z = b6_logits();
    let x = ids(&[0, 2, 2, 3]);
    // Position mask: prompt [0, 2], target [2, 3] → positions 2, 3.
    let pos =
        conditional_nll(&z, &x, &mask(&[false, false, true, true]), TargetReduction::TokenMean)
            .unwrap();
    F32.assert_all_close("position mask", &[val(&pos)], &[0.72337]);
    // The batch builder derives exactly that mask from the rows; the value mask keeps the
    // prompt's token 2 too.
    let row =
        EditRow { prompt_ids: vec![0, 2], target_ids: vec![2, 3], kind: RowKind::Edit, request: 0 };
    let opts = |m| BatchOptions {
        objective: Objective::Conditional,
        mask: m,
        pad: 0,
        eos: None,
        side: PaddingSide::Right,
        max_length: None,
    };
    let b = build_batch(&[&row], &opts(MaskMode::Position), Device::Cpu).unwrap();
    assert!(b.target_mask.equal(&mask(&[false, false, true, true])));
    let v = build_batch(&[&row], &opts(MaskMode::ValueMaskCompat), Device::Cpu).unwrap();
    assert!(v.target_mask.equal(&mask(&[false, true, true, true])));
    let value = conditional_nll(&z, &x, &v.target_mask, TargetReduction::TokenMean).unwrap();
    F32.assert_all_close("value mask", &[val(&value)], &[1.295643]);
}

#[test]
fn b6_reductions() {
    // Example A target NLLs [0.4], example B [1, 2, 3]: pick logits whose NLLs are exactly these.
    // A row of logits [0, -inf…] would be extreme; instead use two classes with z = [0, -c]:
    // NLL of class 0 = log(1 + e^{-c}) → solve c for each wanted NLL.
    let want = [[0.4, 0.5, 0.5], [1.0, 2.0, 3.0]];
    let mut z = vec![0.0f64; 2 * 4 * 2];
    for (b, row) in want.iter().enumerate() {
        for (j, &nll) in row.iter().enumerate() {
            // log(1 + e^{-c}) = nll  →  c = −ln(e^{nll} − 1)
            let c = -(f64::exp(nll) - 1.0).ln();
            z[(b * 4 + j) * 2 + 1] = -c;
        }
    }
    let logits = Tensor::from_slice(&z).view([2, 4, 2]);
    let x = Tensor::from_slice(&[1i64, 0, 0, 0, 1, 0, 0, 0]).view([2, 4]);
    let m = Tensor::from_slice(&[false, true, false, false, false, true, true, true]).view([2, 4]);
    let tm = conditional_nll(&logits, &x, &m, TargetReduction::TokenMean).unwrap();
    let em = conditional_nll(&logits, &x, &m, TargetReduction::ExampleMean).unwrap();
    F64.assert_all_close("TokenMean", &[val(&tm)], &[1.6]);
    F64.assert_all_close("ExampleMean", &[val(&em)], &[1.2]);
}

#[test]
fn b6_bf16_update_needs_f32_master() {
    // Stepping in bf16: 0.5 − 2.2e-5 rounds back to 0.5, 50 times.
    let mut w = Tensor::from_slice(&[0.5f32]).to_kind(Kind::BFloat16);
    for _ in 0..50 {
        w = (&w - 2.2e-5).to_kind(Kind::BFloat16);
    }
    assert_eq!(w.to_kind(Kind::Float).double_value(&[0]), 0.5);
    // The edit optimizer keeps an f32 master: SGD with lr 2.2e-5 and gradient 1 is a step of
    // exactly −2.2e-5 (f32) per step.
    let p = Tensor::from_slice(&[0.5f32]).to_kind(Kind::BFloat16).set_requires_grad(true);
    let cfg = OptimizerConfig { kind: OptimizerKind::Sgd, ..OptimizerConfig::default() };
    let mut opt = EditOptimizer::new(vec![("w".into(), p.shallow_clone())], cfg, None).unwrap();
    for _ in 0..50 {
        opt.zero_grad().unwrap();
        (&p * 1.0).sum(Kind::Float).backward();
        opt.step(2.2e-5).unwrap();
    }
    // f32 master 0.4989003, stored as bf16 0.498046875.
    assert_eq!(p.to_kind(Kind::Float).double_value(&[0]), 0.498046875);
    assert_eq!(p.kind(), Kind::BFloat16);
}

#[test]
fn norm_box_clamps_around_the_start() {
    let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
    let mut opt = EditOptimizer::new(
        vec![("w".into(), p.shallow_clone())],
        OptimizerConfig::default(),
        Some(0.01),
    )
    .unwrap();
    for _ in 0..20 {
        opt.zero_grad().unwrap();
        (&p * Tensor::from_slice(&[1.0f32, -1.0])).sum(Kind::Float).backward();
        opt.step(0.1).unwrap();
    }
    let v: Vec<f32> = Vec::try_from(p.detach()).unwrap();
    Tol { rel: 0.0, abs: 1e-6 }.assert_all_close(
        "box",
        &[v[0] as f64, v[1] as f64],
        &[0.99, -1.99],
    );
}

/// The optimizer equals amend-models' AdamW (itself tested step for step against
/// `torch.optim.AdamW`) on f32 parameters.
#[test]
fn adamw_matches_amend_models() {
    use amend_models::config::Gpt2Config;
    use amend_models::train::{AdamW, AdamWConfig, DecayFilter};
    use amend_models::{CausalLm, Gpt2};
    let cfg = Gpt2Config {
        vocab_size: 20,
        n_positions: 8,
        n_embd: 8,
        n_layer: 1,
        n_head: 2,
        ..Gpt2Config::default()
    };
    let a = Gpt2::new_random(cfg.clone(), 3, Kind::Float, Device::Cpu).unwrap();
    let b = Gpt2::new_random(cfg, 3, Kind::Float, Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1i64, 5, 7, 2]).view([1, 4]);
    let mut ours = EditOptimizer::new(
        a.params().named(),
        OptimizerConfig { weight_decay: 0.01, ..OptimizerConfig::default() },
        None,
    )
    .unwrap();
    let mut theirs = AdamW::new(
        b.params(),
        AdamWConfig {
            weight_decay: 0.01,
            decay_filter: DecayFilter::All,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        ours.zero_grad().unwrap();
        theirs.zero_grad().unwrap();
        a.forward(&x, None).unwrap().square().mean(Kind::Float).backward();
        b.forward(&x, None).unwrap().square().mean(Kind::Float).backward();
        ours.step(1e-2).unwrap();
        theirs.step(1e-2).unwrap();
    }
    for (n, t) in a.params().named() {
        let u = b.params().tensor(&n).unwrap();
        let d = (&t - u).abs().max().double_value(&[]);
        assert!(d < 1e-7, "{n}: {d}");
    }
}

#[test]
fn fixture_losses_and_masks() {
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "ft_losses.json");
    for case in fx["cases"].as_array().unwrap() {
        let side = if case["side"] == "left" { PaddingSide::Left } else { PaddingSide::Right };
        let eos = case["eos"].as_u64().map(|e| e as u32);
        let rows: Vec<EditRow> = case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, r)| EditRow {
                prompt_ids: serde_json::from_value(r[0].clone()).unwrap(),
                target_ids: serde_json::from_value(r[1].clone()).unwrap(),
                kind: RowKind::Edit,
                request: i,
            })
            .collect();
        let refs: Vec<&EditRow> = rows.iter().collect();
        let opts =
            |objective, m| BatchOptions { objective, mask: m, pad: 0, eos, side, max_length: None };
        let tensor2 = |v: &Value, kind: Kind| -> Tensor {
            let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone())
                .or_else(|_| {
                    serde_json::from_value::<Vec<Vec<bool>>>(v.clone()).map(|r| {
                        r.into_iter().map(|x| x.into_iter().map(i64::from).collect()).collect()
                    })
                })
                .unwrap();
            let n = rows.len() as i64;
            Tensor::from_slice(&rows.into_iter().flatten().collect::<Vec<_>>())
                .view([n, -1])
                .to_kind(kind)
        };
        let what = format!("{side:?} eos {eos:?}");
        let b = build_batch(&refs, &opts(Objective::Conditional, MaskMode::Position), Device::Cpu)
            .unwrap();
        assert!(b.input_ids.equal(&tensor2(&case["input_ids"], Kind::Int64)), "{what}: ids");
        assert!(
            b.attention_mask.equal(&tensor2(&case["attention_mask"], Kind::Int64)),
            "{what}: mask"
        );
        assert!(
            b.target_mask.equal(&tensor2(&case["target_mask"], Kind::Bool)),
            "{what}: target mask"
        );
        let v = build_batch(
            &refs,
            &opts(Objective::Conditional, MaskMode::ValueMaskCompat),
            Device::Cpu,
        )
        .unwrap();
        assert!(
            v.target_mask.equal(&tensor2(&case["value_mask"], Kind::Bool)),
            "{what}: value mask"
        );
        let f =
            build_batch(&refs, &opts(Objective::Full, MaskMode::Position), Device::Cpu).unwrap();
        assert!(f.target_mask.equal(&tensor2(&case["full_mask"], Kind::Bool)), "{what}: full mask");
        let shape: Vec<i64> = serde_json::from_value(case["shape"].clone()).unwrap();
        let logits: Vec<f64> = serde_json::from_value(case["logits"].clone()).unwrap();
        let z = Tensor::from_slice(&logits).view(shape.as_slice());
        for (m, red, key) in [
            (&b.target_mask, TargetReduction::TokenMean, "token_mean"),
            (&b.target_mask, TargetReduction::ExampleMean, "example_mean"),
            (&v.target_mask, TargetReduction::TokenMean, "value_token_mean"),
            (&f.target_mask, TargetReduction::TokenMean, "full_token_mean"),
        ] {
            let got = conditional_nll(&z, &b.input_ids, m, red).unwrap();
            FIXTURE.assert_all_close(
                &format!("{what}: {key}"),
                &[val(&got)],
                &[case[key].as_f64().unwrap()],
            );
            let got32 = conditional_nll(&z.to_kind(Kind::Float), &b.input_ids, m, red).unwrap();
            F32.assert_all_close(
                &format!("{what}: {key} f32"),
                &[val(&got32)],
                &[case[key].as_f64().unwrap()],
            );
        }
        // prompt_last: the batch gives the last prompt positions; the loss picks those logits.
        let p = build_batch(&refs, &opts(Objective::PromptLast, MaskMode::Position), Device::Cpu)
            .unwrap();
        let last: Vec<i64> = serde_json::from_value(case["last_prompt"].clone()).unwrap();
        assert_eq!(Vec::<i64>::try_from(&p.last_prompt).unwrap(), last, "{what}: last prompt");
        let ps: Vec<i64> = serde_json::from_value(case["prompt_shape"].clone()).unwrap();
        let pz: Vec<f64> = serde_json::from_value(case["prompt_logits"].clone()).unwrap();
        let pz = Tensor::from_slice(&pz).view(ps.as_slice());
        let lastz = pz
            .gather(1, &p.last_prompt.view([-1, 1, 1]).expand([ps[0], 1, ps[2]], false), false)
            .squeeze_dim(1);
        for (red, key) in [
            (TargetReduction::ExampleMean, "prompt_last_example_mean"),
            (TargetReduction::TokenMean, "prompt_last_token_mean"),
        ] {
            let got = prompt_last_nll(&lastz, &p.targets, &p.targets_mask, red).unwrap();
            FIXTURE.assert_all_close(
                &format!("{what}: {key}"),
                &[val(&got)],
                &[case[key].as_f64().unwrap()],
            );
        }
    }
}

/// Autograd gradients of both reductions against f64 central finite differences.
#[test]
fn gradients_match_finite_differences() {
    let z0 = Tensor::from_slice(&[
        0.3f64, -1.2, 0.8, 0.1, 2.0, -0.5, 0.0, 1.1, -0.7, 0.4, 0.9, -0.3, 0.2, 0.6, -1.0, 0.5,
        1.5, -0.2, 0.7, 0.0, -0.9, 0.3, 0.8, -0.4,
    ])
    .view([2, 4, 3]);
    let x = Tensor::from_slice(&[0i64, 1, 2, 0, 2, 2, 1, 0]).view([2, 4]);
    let m = Tensor::from_slice(&[false, false, true, true, false, true, true, true]).view([2, 4]);
    for red in [TargetReduction::TokenMean, TargetReduction::ExampleMean] {
        let z = z0.copy().set_requires_grad(true);
        conditional_nll(&z, &x, &m, red).unwrap().backward();
        let g: Vec<f64> = Vec::try_from(z.grad().flatten(0, -1)).unwrap();
        let base: Vec<f64> = Vec::try_from(z0.flatten(0, -1)).unwrap();
        for i in 0..base.len() {
            let f = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                val(&conditional_nll(&Tensor::from_slice(&v).view([2, 4, 3]), &x, &m, red).unwrap())
            };
            let fd = (f(1e-6) - f(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6, "{red:?} grad[{i}]: autograd {} fd {fd}", g[i]);
        }
    }
}

#[test]
fn bad_inputs() {
    let z = b6_logits();
    let x = ids(&[0, 1, 2, 3]);
    // Position 0 cannot be a target.
    let e = conditional_nll(&z, &x, &mask(&[true, false, true, true]), TargetReduction::TokenMean)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = conditional_nll(&z, &x, &mask(&[false, true]), TargetReduction::TokenMean).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // No targets: 0 with a zero gradient.
    let zz = z.copy().set_requires_grad(true);
    let l = conditional_nll(&zz, &x, &mask(&[false; 4]), TargetReduction::ExampleMean).unwrap();
    assert_eq!(val(&l), 0.0);
    l.backward();
    assert_eq!(zz.grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
    // Rows: empty target, target longer than max_length.
    let row = EditRow { prompt_ids: vec![1], target_ids: vec![], kind: RowKind::Edit, request: 3 };
    let o = BatchOptions {
        objective: Objective::Conditional,
        mask: MaskMode::Position,
        pad: 0,
        eos: None,
        side: PaddingSide::Left,
        max_length: None,
    };
    assert!(matches!(
        build_batch(&[&row], &o, Device::Cpu),
        Err(Error::InvalidEdit { index: 3, .. })
    ));
    let long = EditRow {
        prompt_ids: vec![1, 2, 3],
        target_ids: vec![4, 5, 6],
        kind: RowKind::Edit,
        request: 1,
    };
    let o2 = BatchOptions { max_length: Some(3), ..o };
    assert!(matches!(
        build_batch(&[&long], &o2, Device::Cpu),
        Err(Error::InvalidEdit { index: 1, .. })
    ));
    // max_length drops prompt tokens from the left.
    let o3 = BatchOptions { max_length: Some(5), ..o };
    let b = build_batch(&[&long], &o3, Device::Cpu).unwrap();
    assert_eq!(Vec::<i64>::try_from(b.input_ids.flatten(0, -1)).unwrap(), vec![2, 3, 4, 5, 6]);
    assert!(build_batch(&[], &o, Device::Cpu).is_err());
}

#[test]
fn subject_placeholder_needs_a_subject() {
    use amend_edit::EditRequest;
    // Without a subject, `{}` would be trained and scored literally.
    let r = EditRequest::new("{} lives in", "Paris");
    let e = r.validate(4).unwrap_err();
    assert!(matches!(&e, Error::InvalidEdit { index: 4, field, .. } if field == "prompt"), "{e}");
    assert!(e.to_string().contains("no `subject`"), "{e}");
    let r = EditRequest::new("Ana Koss lives in", "Paris").with_rephrase(["Where does {} live?"]);
    let e = r.validate(0).unwrap_err();
    assert!(matches!(&e, Error::InvalidEdit { field, .. } if field == "rephrase[0]"), "{e}");
    let e = EditRequest::new("{} lives in", "Paris").with_subject(" ").validate(0).unwrap_err();
    assert!(matches!(&e, Error::InvalidEdit { field, .. } if field == "subject"), "{e}");
    // With a subject, or without a placeholder, the request is fine.
    EditRequest::new("{} lives in", "Paris").with_subject("Ana Koss").validate(0).unwrap();
    EditRequest::new("Ana Koss lives in", "Paris").validate(0).unwrap();
}
