//! Model throughput: forward and train-step tokens/s of amend's GPT-2 against the same model in
//! PyTorch eager (transformers), measured in the same run.
//!
//! ```text
//! cargo bench --bench models                       # tiny model (the recipe's default shape)
//! AMEND_BENCH=medium cargo bench --bench models    # + GPT-2 small (124 M parameters)
//! ```
//!
//! For each shape the bench builds a seeded random GPT-2, saves it to a temporary directory,
//! checks that transformers computes the same logits from it, then alternates timing rounds of
//! amend and of `scripts/bench_models_torch.py` (run with `AMEND_TORCH_PYTHON`, which
//! `.cargo/config.toml` sets) with the same thread count, batch and sequence length. Each round
//! times ~`AMEND_BENCH_SECONDS` (default 5) seconds per mode after 2 warm-up iterations and
//! reports the median iteration; the table shows the best round of each side (robust to other
//! processes on the machine). Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `AMEND_BENCH` | `small` | `medium` / `large` add GPT-2 small |
//! | `AMEND_BENCH_THREADS` | 2 | intra-op threads of both sides |
//! | `AMEND_BENCH_ROUNDS` | 2 | alternating rounds per side |
//! | `AMEND_BENCH_SECONDS` | 5 | seconds per mode and round |
//!
//! Results are printed as a markdown table and written to `target/bench-models.json`.
//!
//! Forward = logits of every position under no-grad (eval mode). Train step = zero grads,
//! forward, next-token cross-entropy, backward, clip the gradient norm to 1, AdamW step. TNT step
//! = the same step with TNFF (α = 1, token mean) instead of cross-entropy: every 8th position's
//! next token is annotated unwanted (weight −1), the others +1, the last position unused (0);
//! the reference logits are computed once, outside the timed steps. amend calls `tnt_loss` on the
//! kernel backend with metrics off; PyTorch writes TNFF as the torch composite a Python user
//! would (`scripts/loss_cli_example.py`'s `tnff_torch`: two softmaxes, a scatter, a weighted
//! sum), on the same ids, labels and weights (passed in a safetensors file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use amend::losses::token::{TntConfig, TntVariant, TokenBackend, TokenWeights, tnt_loss};
use amend::models::train::{AdamWConfig, ScheduleKind, TrainConfig, Trainer, causal_lm_loss_sum};
use amend::models::{CausalLm, Gpt2, Gpt2Config, SaveOptions};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

struct Shape {
    name: &'static str,
    cfg: Gpt2Config,
    batch: i64,
    seq: i64,
}

fn shapes() -> Vec<Shape> {
    let level = std::env::var("AMEND_BENCH").unwrap_or_default();
    let no_dropout =
        |c: Gpt2Config| Gpt2Config { resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0, ..c };
    let mut v = vec![Shape {
        name: "tiny (4L, 128d, V 1024)",
        cfg: no_dropout(Gpt2Config {
            vocab_size: 1024,
            n_positions: 128,
            n_embd: 128,
            n_layer: 4,
            n_head: 4,
            ..Gpt2Config::default()
        }),
        batch: 16,
        seq: 128,
    }];
    if level == "medium" || level == "large" {
        v.push(Shape {
            name: "gpt2-small (12L, 768d, V 50257)",
            cfg: no_dropout(Gpt2Config::default()),
            batch: 4,
            seq: 128,
        });
    }
    v
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}

/// Median seconds per call of `f` after 2 warm-up calls, over ~`seconds` (at least 3 calls).
fn timed(seconds: f64, mut f: impl FnMut()) -> (usize, f64) {
    f();
    f();
    let start = Instant::now();
    let mut times = vec![];
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64());
    }
    (times.len(), median(times))
}

/// The TNT step's annotations: next-token labels `[B, T]` (the last column unused), weights
/// (−1 at every 8th position, 0 at the last, +1 elsewhere).
fn tnt_batch(ids: &Tensor) -> (Tensor, Tensor) {
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let labels = Tensor::cat(&[ids.narrow(1, 1, t - 1), ids.narrow(1, 0, 1)], 1);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).expand([b, t], false);
    let ones = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
    let weights = ones
        .where_self(&pos.remainder(8).ne(7), &Tensor::from(-1i64))
        .where_self(&pos.ne(t - 1), &Tensor::from(0i64));
    (labels, weights)
}

struct TntInputs {
    labels: Tensor,
    weights: Tensor,
    ref_logits: Tensor,
}

fn rust_round(
    model: &mut Gpt2,
    ids: &Tensor,
    tnt: &TntInputs,
    seconds: f64,
) -> Vec<(String, f64, usize)> {
    let tokens = ids.numel() as f64;
    let (n_f, fwd) = timed(seconds, || {
        let _g = tch::no_grad_guard();
        let logits = model.forward(ids, None).expect("forward");
        assert_eq!(logits.size()[2] as usize, model.gpt2_config().vocab_size);
    });
    let cfg = TrainConfig {
        steps: usize::MAX,
        lr: 1e-4,
        schedule: ScheduleKind::Constant,
        optimizer: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
        max_grad_norm: Some(1.0),
        log_every: 0,
        progress: false,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, cfg).expect("trainer");
    let (n_t, train) = timed(seconds, || {
        trainer
            .step(model, |m, step| {
                let logits = m.forward(ids, None)?;
                let (sum, count) = causal_lm_loss_sum(&logits, ids, None)?;
                step.backward(&sum.f_div_scalar(count)?)?;
                Ok(())
            })
            .expect("train step");
    });
    let weights = TokenWeights::new(&tnt.weights).expect("weights");
    let tnt_cfg = TntConfig::new(TntVariant::Ff)
        .with_alpha(1.0)
        .with_reduction(amend::losses::Reduction::Mean)
        .with_backend(TokenBackend::Kernel)
        .with_metrics(false);
    let (n_n, tnt_step) = timed(seconds, || {
        trainer
            .step(model, |m, step| {
                let logits = m.forward(ids, None)?;
                let out = tnt_loss(&logits, &tnt.ref_logits, &tnt.labels, &weights, &tnt_cfg)
                    .expect("tnt_loss");
                step.backward(&out.loss)?;
                Ok(())
            })
            .expect("tnt step");
    });
    vec![
        ("forward".into(), tokens / fwd, n_f),
        ("train".into(), tokens / train, n_t),
        ("tnt".into(), tokens / tnt_step, n_n),
    ]
}

#[allow(clippy::too_many_arguments)]
fn python_round(
    python: &str,
    script: &Path,
    dir: &Path,
    s: &Shape,
    threads: i32,
    seconds: f64,
    check: Option<&Path>,
    batch: &Path,
) -> Vec<Value> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--batch-file", batch.to_str().expect("utf-8 path")])
        .args(["--model", dir.to_str().expect("utf-8 path")])
        .args(["--batch", &s.batch.to_string(), "--seq", &s.seq.to_string()])
        .args(["--threads", &threads.to_string(), "--seconds", &seconds.to_string()]);
    if let Some(c) = check {
        cmd.args(["--check", c.to_str().expect("utf-8 path")]);
    }
    let out = cmd.output().expect("cannot start the PyTorch bench script");
    assert!(
        out.status.success(),
        "PyTorch bench failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn main() {
    let threads: i32 = env_num("AMEND_BENCH_THREADS", 2);
    let rounds: usize = env_num("AMEND_BENCH_ROUNDS", 2);
    let seconds: f64 = env_num("AMEND_BENCH_SECONDS", 5.0);
    tch::set_num_threads(threads);
    let python = std::env::var("AMEND_TORCH_PYTHON").ok();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_models_torch.py");
    let work = std::env::temp_dir().join(format!("amend-bench-models-{}", std::process::id()));
    let mut rows = vec![];
    println!(
        "threads {threads}, {rounds} rounds of ~{seconds} s per mode, libtorch {}",
        amend::runtime::RuntimeInfo::detect().libtorch_version.unwrap_or_default()
    );
    for s in shapes() {
        let mut model =
            Gpt2::new_random(s.cfg.clone(), 0, Kind::Float, Device::Cpu).expect("model");
        let dir = model
            .save_pretrained(
                &work.join("model"),
                &SaveOptions { overwrite: true, ..Default::default() },
            )
            .expect("save");
        let ids =
            Tensor::randint(s.cfg.vocab_size as i64, [s.batch, s.seq], (Kind::Int64, Device::Cpu));
        // Parity check input: the same weights must give the same logits in transformers.
        let check_ids = ids.narrow(0, 0, 1).narrow(1, 0, 16);
        let check = work.join("check.safetensors");
        let logits = model.forward_no_grad(&check_ids, None).expect("forward");
        Tensor::write_safetensors(&[("ids", &check_ids), ("logits", &logits)], &check)
            .expect("write check");
        let (labels, weights) = tnt_batch(&ids);
        let batch = work.join("batch.safetensors");
        Tensor::write_safetensors(
            &[("ids", &ids), ("labels", &labels), ("weights", &weights)],
            &batch,
        )
        .expect("write batch");
        let ref_logits = model.forward_no_grad(&ids, None).expect("reference logits");
        let tnt = TntInputs { labels, weights, ref_logits };
        let (mut best_r, mut best_p) = (vec![0.0f64; 3], vec![0.0f64; 3]);
        let mut check_diff = None;
        for round in 0..rounds {
            for (i, (_, tps, _)) in
                rust_round(&mut model, &ids, &tnt, seconds).into_iter().enumerate()
            {
                best_r[i] = best_r[i].max(tps);
            }
            if let Some(py) = &python {
                let res = python_round(
                    py,
                    &script,
                    &dir,
                    &s,
                    threads,
                    seconds,
                    (round == 0).then_some(check.as_path()),
                    &batch,
                );
                for v in res {
                    if let Some(d) = v["check"].as_f64() {
                        check_diff = Some(d);
                    }
                    let i = match v["mode"].as_str() {
                        Some("forward") => 0,
                        Some("train") => 1,
                        Some("tnt") => 2,
                        _ => continue,
                    };
                    best_p[i] = best_p[i].max(v["tokens_per_s"].as_f64().unwrap_or(0.0));
                }
            }
        }
        if let Some(d) = check_diff {
            assert!(d < 1e-3, "{}: transformers logits differ by {d}", s.name);
        }
        for (i, mode) in ["forward", "train step", "tnt step"].iter().enumerate() {
            rows.push(json!({
                "shape": s.name, "batch": s.batch, "seq": s.seq, "mode": mode, "threads": threads,
                "amend_tokens_per_s": best_r[i],
                "torch_tokens_per_s": if python.is_some() { Some(best_p[i]) } else { None },
                "ratio": if best_p[i] > 0.0 { Some(best_r[i] / best_p[i]) } else { None },
                "check_max_abs_logit_diff": check_diff,
            }));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "\n| model | batch × seq | mode | amend tok/s | PyTorch eager tok/s | amend / PyTorch |"
    );
    println!("|---|---|---|---:|---:|---:|");
    for r in &rows {
        let f = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.0}"));
        println!(
            "| {} | {} × {} | {} | {} | {} | {} |",
            r["shape"].as_str().unwrap_or(""),
            r["batch"],
            r["seq"],
            r["mode"].as_str().unwrap_or(""),
            f(&r["amend_tokens_per_s"]),
            f(&r["torch_tokens_per_s"]),
            r["ratio"].as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}")),
        );
    }
    if python.is_none() {
        println!("\n(AMEND_TORCH_PYTHON is not set: PyTorch side skipped)");
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-models.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap_or_default());
}
