//! Training utilities against PyTorch / transformers (fixture from
//! `scripts/gen_train_fixtures.py`), and the trainer's accumulation, checkpoint, logging and
//! failure behaviour on a tiny model.

mod common;

use amend_models::train::{
    AdamW, AdamWConfig, DecayFilter, LrSchedule, ParamGroup, ScheduleKind, TrainConfig, Trainer,
    causal_lm_loss_sum, clip_grad_norm,
};
use amend_models::{CausalLm, Error, Gpt2, Gpt2Config, LoadOptions, load};
use amend_testing::{F64, Tol};
use common::values;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixture() -> Value {
    common::setup();
    amend_testing::load_json_fixture(env!("CARGO_MANIFEST_DIR"), "train.json")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    Tensor::from_slice(&f64s(v)).view(shape)
}

#[test]
fn adamw_matches_torch_over_five_steps() {
    let f = &fixture()["adamw"];
    let w = tensor(&f["w0"], &[3, 2]).set_requires_grad(true);
    let b = tensor(&f["b0"], &[2]).set_requires_grad(true);
    let groups = vec![
        ParamGroup {
            name: "decay".into(),
            weight_decay: 0.1,
            params: vec![("w".into(), w.shallow_clone())],
        },
        ParamGroup {
            name: "no_decay".into(),
            weight_decay: 0.0,
            params: vec![("b".into(), b.shallow_clone())],
        },
    ];
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, ..AdamWConfig::default() };
    let mut opt = AdamW::with_groups(groups, cfg).unwrap();
    for (i, s) in f["steps"].as_array().unwrap().iter().enumerate() {
        opt.zero_grad().unwrap();
        let loss = (&w * tensor(&s["grad_w"], &[3, 2])).sum(Kind::Double)
            + (&b * tensor(&s["grad_b"], &[2])).sum(Kind::Double);
        loss.backward();
        opt.step(s["lr"].as_f64().unwrap()).unwrap();
        F64.assert_all_close(&format!("w after step {i}"), &values(&w), &f64s(&s["w"]));
        F64.assert_all_close(&format!("b after step {i}"), &values(&b), &f64s(&s["b"]));
    }
    assert_eq!(opt.steps_taken(), 5);
}

#[test]
fn schedules_match_transformers() {
    let f = &fixture()["schedules"];
    for (name, kind) in [
        ("constant", ScheduleKind::Constant),
        ("linear", ScheduleKind::Linear),
        ("cosine", ScheduleKind::Cosine),
    ] {
        let s =
            LrSchedule { kind, peak_lr: 1.0, warmup_steps: 3, total_steps: 10, min_lr_ratio: 0.0 };
        let got: Vec<f64> = (0..=10).map(|i| s.lr_at(i)).collect();
        F64.assert_all_close(name, &got, &f64s(&f[name]));
    }
    let s = LrSchedule {
        kind: ScheduleKind::Cosine,
        peak_lr: 2.0,
        warmup_steps: 0,
        total_steps: 10,
        min_lr_ratio: 0.1,
    };
    assert!((s.lr_at(10) - 0.2).abs() < 1e-12);
    assert!((s.lr_at(0) - 2.0).abs() < 1e-12);
}

#[test]
fn clip_grad_norm_matches_torch() {
    let f = &fixture()["clip"];
    for max in [1.0, 100.0] {
        let r = &f[format!("max_{}", max as i64)];
        let a = Tensor::zeros([4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([2, 3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let loss = (&a * tensor(&f["a"], &[4])).sum(Kind::Double)
            + (&b * tensor(&f["b"], &[2, 3])).sum(Kind::Double);
        loss.backward();
        let total = clip_grad_norm([&a, &b], max).unwrap();
        F64.assert_all_close("total", &[total], &[r["total"].as_f64().unwrap()]);
        F64.assert_all_close("a", &values(&a.grad()), &f64s(&r["a"]));
        F64.assert_all_close("b", &values(&b.grad()), &f64s(&r["b"]));
    }
}

#[test]
fn decay_filter_splits_biases_and_norms() {
    let f = DecayFilter::ExcludeBiasAndNorm;
    assert!(f.decays("transformer.h.0.mlp.c_fc.weight", &[4, 8]));
    assert!(f.decays("transformer.wte.weight", &[10, 4]));
    assert!(!f.decays("transformer.h.0.mlp.c_fc.bias", &[8]));
    assert!(!f.decays("transformer.h.0.ln_1.weight", &[4]));
    assert!(!f.decays("model.layers.0.input_layernorm.weight", &[4]));
    assert!(!f.decays("model.norm.weight", &[4]));
    assert!(DecayFilter::All.decays("model.norm.weight", &[4]));
}

fn tiny(seed: u64) -> Gpt2 {
    common::setup();
    let cfg = Gpt2Config {
        vocab_size: 32,
        n_positions: 16,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Default::default()
    };
    Gpt2::new_random(cfg, seed, Kind::Float, Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[
        1i64, 2, 3, 4, 5, 6, 7, 8, 2, 4, 6, 8, 10, 12, 0, 0, 3, 3, 3, 3, 9, 9, 0, 0, 5, 4, 3, 2, 1,
        0, 0, 0,
    ])
    .view([4, 8]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    (ids, mask)
}

fn quiet(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-2,
        progress: false,
        schedule: ScheduleKind::Constant,
        ..TrainConfig::default()
    }
}

fn params_equal(a: &dyn CausalLm, b: &dyn CausalLm, tol: Tol) {
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b.named_parameters()) {
        tol.assert_all_close(n, &values(x), &values(&y));
    }
}

#[test]
fn trainer_lowers_the_loss_of_a_memorised_batch() {
    let mut model = tiny(1);
    let (ids, mask) = batch();
    let mut trainer = Trainer::new(&model, quiet(30)).unwrap();
    let mut first = None;
    let summary = trainer
        .fit(&mut model, |m, step| {
            let (sum, count) =
                causal_lm_loss_sum(&m.forward(&ids, Some(&mask))?, &ids, Some(&mask))?;
            let v = step.backward(&(sum / count))?;
            first.get_or_insert(v);
            step.add_tokens(count as usize);
            Ok(())
        })
        .unwrap();
    assert_eq!(summary.steps, 30);
    assert!(
        summary.final_loss < 0.5 * first.unwrap(),
        "{} vs {}",
        summary.final_loss,
        first.unwrap()
    );
    assert!(!model.is_training(), "fit restores eval mode");
}

#[test]
fn gradient_accumulation_with_global_counts_equals_one_big_batch() {
    let (ids, mask) = batch();
    let mut a = tiny(2);
    let mut b = a.try_clone().unwrap();
    let mut ta = Trainer::new(&a, quiet(1)).unwrap();
    ta.step(&mut a, |m, step| {
        let (sum, count) = causal_lm_loss_sum(&m.forward(&ids, Some(&mask))?, &ids, Some(&mask))?;
        step.backward(&(sum / count)).map(|_| ())
    })
    .unwrap();
    let mut tb = Trainer::new(&b, TrainConfig { grad_accum_steps: 2, ..quiet(1) }).unwrap();
    tb.step(&mut b, |m, step| {
        // Counts of the whole step first (they depend only on the mask), then one backward per
        // micro-batch normalised by the global count.
        let total = mask.narrow(1, 1, 7).sum(Kind::Int64).int64_value(&[]) as f64;
        for half in 0..step.accum_steps() as i64 {
            let (i, k) = (ids.narrow(0, 2 * half, 2), mask.narrow(0, 2 * half, 2));
            let (sum, _) = causal_lm_loss_sum(&m.forward(&i, Some(&k))?, &i, Some(&k))?;
            step.backward(&(sum / total))?;
        }
        Ok(())
    })
    .unwrap();
    params_equal(&a, &b, Tol { rel: 1e-5, abs: 1e-6 });
}

#[test]
fn checkpoint_and_resume_continue_the_same_run() {
    let (ids, mask) = batch();
    let loss = |m: &Gpt2, step: &mut amend_models::train::Step| -> amend_models::Result<()> {
        let (sum, count) = causal_lm_loss_sum(&m.forward(&ids, Some(&mask))?, &ids, Some(&mask))?;
        step.backward(&(sum / count)).map(|_| ())
    };
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("logs/metrics.jsonl");
    let cfg = TrainConfig {
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        checkpoint_every: Some(2),
        checkpoint_dir: Some(tmp.path().join("ckpt")),
        metrics_path: Some(metrics.clone()),
        ..quiet(4)
    };
    let mut straight = tiny(3);
    let mut t = Trainer::new(&straight, cfg.clone()).unwrap();
    let summary = t.fit(&mut straight, loss).unwrap();
    assert_eq!(summary.checkpoints.len(), 2);
    let lines: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["step"], 4);
    for key in ["loss", "lr", "grad_norm", "elapsed_s"] {
        assert!(lines[0][key].is_number(), "{key}");
    }
    assert_eq!(lines[0]["lr"], 0.0, "warm-up starts at 0");

    // Resume from checkpoint-2 and finish: the same parameters as the uninterrupted run.
    let ckpt = tmp.path().join("ckpt/checkpoint-2");
    assert!(ckpt.join(amend_models::train::OPTIMIZER_FILE).exists());
    let mut resumed = match load(&ckpt, &LoadOptions::default()).unwrap() {
        amend_models::Model::Gpt2(g) => g,
        other => panic!("{other:?}"),
    };
    let mut t2 =
        Trainer::new(&resumed, TrainConfig { checkpoint_every: None, metrics_path: None, ..cfg })
            .unwrap();
    t2.resume(&ckpt).unwrap();
    assert_eq!(t2.steps_taken(), 2);
    let s2 = t2.fit(&mut resumed, loss).unwrap();
    assert_eq!(s2.steps, 2);
    params_equal(&straight, &resumed, Tol { rel: 1e-6, abs: 1e-7 });
}

#[test]
fn frozen_parameters_do_not_move() {
    let (ids, mask) = batch();
    let mut model = tiny(4);
    let n =
        model.set_trainable(&|p| p.layer() == Some(1) && p.name().contains("mlp.c_proj")).unwrap();
    assert_eq!(n, 2);
    let before = model.params().snapshot().unwrap();
    let mut t = Trainer::new(&model, quiet(2)).unwrap();
    t.fit(&mut model, |m, step| {
        let (sum, count) = causal_lm_loss_sum(&m.forward(&ids, Some(&mask))?, &ids, Some(&mask))?;
        step.backward(&(sum / count)).map(|_| ())
    })
    .unwrap();
    for (name, old) in before {
        let now = model.params().tensor(&name).unwrap();
        let moved = !now.equal(&old);
        assert_eq!(moved, name.starts_with("transformer.h.1.mlp.c_proj"), "{name}");
    }
}

#[test]
fn non_finite_loss_stops_without_touching_parameters() {
    let mut model = tiny(5);
    let before = model.params().snapshot().unwrap();
    let mut t = Trainer::new(&model, quiet(3)).unwrap();
    let (ids, _) = batch();
    let r = t.fit(&mut model, |m, step| {
        let logits = m.forward(&ids, None)?;
        step.backward(&(logits.sum(Kind::Float) * f64::NAN)).map(|_| ())
    });
    assert!(matches!(r, Err(Error::NonFinite { step: 1, what: "loss", .. })), "{r:?}");
    for (name, old) in before {
        assert!(model.params().tensor(&name).unwrap().equal(&old), "{name}");
    }
    let r = t.step(&mut model, |_, _| Ok(()));
    assert!(matches!(r, Err(Error::InvalidInput { .. })));
}

#[test]
fn bf16_parameters_train_through_f32_master_weights() {
    common::setup();
    // Updates far below bf16's resolution accumulate in the master copy, as they do in f32.
    let w32 = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w16 = Tensor::ones([4], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
    let cfg = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
    let group = |t: &Tensor| {
        vec![ParamGroup {
            name: "all".into(),
            weight_decay: 0.0,
            params: vec![("w".into(), t.shallow_clone())],
        }]
    };
    let mut o32 = AdamW::with_groups(group(&w32), cfg.clone()).unwrap();
    let mut o16 = AdamW::with_groups(group(&w16), cfg).unwrap();
    for _ in 0..200 {
        for (w, o) in [(&w32, &mut o32), (&w16, &mut o16)] {
            o.zero_grad().unwrap();
            w.sum(Kind::Float).backward();
            o.step(1e-4).unwrap();
        }
    }
    let (a, b) = (values(&w32), values(&w16));
    assert!(a[0] < 0.985, "{}", a[0]); // moved by 200 · 1e-4
    assert!(b[0] < 0.99, "bf16 weights must move too: {}", b[0]); // plain bf16 steps would stay at 1
    amend_testing::BF16.assert_all_close("bf16 vs f32 training", &b, &a);
    let state = o16.state_tensors().unwrap();
    assert!(state.iter().any(|(n, t)| n == "master.w" && t.kind() == Kind::Float));
}

#[test]
fn causal_lm_loss_sum_is_the_masked_next_token_nll() {
    common::setup();
    let logits = Tensor::randn([2, 5, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3]).view([2, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 5]);
    let (sum, count) = causal_lm_loss_sum(&logits, &ids, Some(&mask)).unwrap();
    let lp =
        amend_models::scoring::next_token_logprobs(&logits.to_kind(Kind::Double), &ids).unwrap();
    let keep = mask.narrow(1, 1, 4).to_kind(Kind::Double);
    let want = -(lp * &keep).sum(Kind::Double).double_value(&[]);
    assert_eq!(count, 6.0);
    amend_testing::F32.assert_all_close("sum", &[sum.double_value(&[])], &[want]);
    // A fully masked batch: loss 0 and gradient 0.
    let zero = Tensor::zeros([2, 5], (Kind::Int64, Device::Cpu));
    let (sum, count) = causal_lm_loss_sum(&logits, &ids, Some(&zero)).unwrap();
    assert_eq!((sum.double_value(&[]), count), (0.0, 0.0));
    sum.backward();
    assert_eq!(logits.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    // Shapes are checked.
    assert!(matches!(
        causal_lm_loss_sum(&logits, &ids.narrow(1, 0, 4), None),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        causal_lm_loss_sum(&logits, &ids, Some(&mask.narrow(1, 0, 4))),
        Err(Error::ShapeMismatch { .. })
    ));
}
