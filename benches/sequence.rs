//! Sequence-level losses: one DPO training step from hidden states through the chunked
//! fused-linear `SeqLogps` path against the full-logits path with autograd.
//!
//! Wall time (criterion, siblings `libtorch` = `h·Wᵀ` → `seq_logps` → DPO → `backward()`, and
//! `fused_linear` = `seq_logps_fused_linear` → DPO → `f_attach` → `backward()`):
//!
//! ```text
//! cargo bench --bench sequence                          # small shape
//! AMEND_BENCH=medium cargo bench --bench sequence       # B·T = 512,  H = 768, V = 50257
//! AMEND_BENCH=large cargo bench --bench sequence        # B·T = 2048, H = 768, V = 50257
//! ```
//!
//! Peak memory of one step, each case in a fresh child process (`VmHWM − VmRSS before`):
//!
//! ```text
//! AMEND_SEQ_PEAK=1 AMEND_BENCH=large cargo bench --bench sequence
//! ```

use std::hint::black_box;
use std::time::Duration;

use amend_losses::sequence::{
    DpoConfig, FusedLinearConfig, SeqLogpsConfig, dpo_loss, seq_logps, seq_logps_fused_linear,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use tch::{Device, Kind, Tensor};

/// (B, T, H, V) for the tier in `AMEND_BENCH`.
fn shape() -> (i64, i64, i64, i64) {
    match std::env::var("AMEND_BENCH").as_deref() {
        Ok("large") => (8, 256, 768, 50257),
        Ok("medium") => (4, 128, 768, 50257),
        _ => (4, 64, 64, 4096),
    }
}

struct Inputs {
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    mask: Tensor,
}

fn inputs((b, t, h, v): (i64, i64, i64, i64)) -> Inputs {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    // The first quarter of each row is prompt (unscored), as in preference data.
    let mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 0, t / 4).fill_(0);
    Inputs {
        hidden: Tensor::randn([b, t, h], opts).set_requires_grad(true),
        weight: (Tensor::randn([v, h], opts) * 0.02).set_requires_grad(true),
        ids: Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu)),
        mask,
    }
}

fn zero_grads(x: &Inputs) {
    for p in [&x.hidden, &x.weight] {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn dpo_of(lp: &amend_losses::sequence::SeqLogps) -> Tensor {
    let b = lp.batch_size();
    let (c, r) = lp.f_split_at(b / 2).expect("split");
    let zeros = Tensor::zeros([b / 2], (Kind::Float, Device::Cpu));
    dpo_loss(&c, &r, &zeros, &zeros, &DpoConfig::default()).expect("dpo").loss
}

/// One step through full logits and autograd; returns the loss.
fn step_libtorch(x: &Inputs) -> f64 {
    let logits = x.hidden.matmul(&x.weight.tr());
    let lp = seq_logps(&logits, &x.ids, &x.mask, &SeqLogpsConfig::default()).expect("seq_logps");
    let loss = dpo_of(&lp);
    loss.backward();
    f64::try_from(&loss).expect("scalar")
}

/// One step through the chunked fused-linear path; returns the loss.
fn step_fused(x: &Inputs) -> f64 {
    let fl = seq_logps_fused_linear(
        &x.hidden,
        &x.weight,
        None,
        &x.ids,
        &x.mask,
        &FusedLinearConfig::default(),
    )
    .expect("fused");
    let loss = fl.f_attach(&dpo_of(fl.logps())).expect("attach");
    loss.backward();
    f64::try_from(&loss).expect("scalar")
}

/// Checks once that both paths agree (loss and a sample of gradient entries).
fn check_agreement(x: &Inputs) {
    zero_grads(x);
    let a = step_libtorch(x);
    let (gh, gw) = (x.hidden.grad().copy(), x.weight.grad().copy());
    zero_grads(x);
    let b = step_fused(x);
    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss: libtorch {a} vs fused {b}");
    for (name, full, fused) in [("h", gh, x.hidden.grad()), ("W", gw, x.weight.grad())] {
        let d = f64::try_from(
            (full.reshape([-1]).narrow(0, 0, 4096.min(full.numel() as i64))
                - fused.reshape([-1]).narrow(0, 0, 4096.min(full.numel() as i64)))
            .abs()
            .max(),
        )
        .expect("max");
        assert!(d <= 1e-5, "{name} gradients differ by {d}");
    }
}

fn bench_steps(c: &mut Criterion) {
    let s = shape();
    let x = inputs(s);
    check_agreement(&x);
    let (b, t, h, v) = s;
    let id = format!("{}x{}x{}", b * t, h, v);
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        let mut group = c.benchmark_group(format!("seq_logps_flce/f32/step/{threads}t"));
        group.throughput(Throughput::Elements((b * t * v) as u64));
        if s.3 > 10_000 {
            group.sample_size(10).measurement_time(Duration::from_secs(60));
        }
        group.bench_function(BenchmarkId::new("libtorch", &id), |bch| {
            bch.iter(|| {
                zero_grads(&x);
                black_box(step_libtorch(&x))
            })
        });
        group.bench_function(BenchmarkId::new("fused_linear", &id), |bch| {
            bch.iter(|| {
                zero_grads(&x);
                black_box(step_fused(&x))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_steps);

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field} not found"))
}

/// Child: run one step of `case` and print the peak step memory as JSON.
fn peak_child(case: &str) {
    tch::set_num_threads(1);
    let warm = inputs((2, 8, 16, 64));
    let _ = if case == "fused_linear" { step_fused(&warm) } else { step_libtorch(&warm) };
    let x = inputs(shape());
    let before = status_kib("VmRSS:");
    let loss = if case == "fused_linear" { step_fused(&x) } else { step_libtorch(&x) };
    let peak = status_kib("VmHWM:");
    let (b, t, h, v) = shape();
    println!(
        "{{\"case\":\"{case}\",\"shape\":\"{}x{h}x{v}\",\"peak_step_kib\":{},\"loss\":{loss}}}",
        b * t,
        peak.saturating_sub(before)
    );
}

/// Parent: one fresh child per case, then the ratio.
fn peak_parent() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut kib = Vec::new();
    for case in ["libtorch", "fused_linear"] {
        let out = std::process::Command::new(&exe)
            .env("AMEND_SEQ_PEAK_CASE", case)
            .output()
            .expect("child process");
        let line = String::from_utf8_lossy(&out.stdout);
        let line = line.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
            panic!("child {case} failed: {}", String::from_utf8_lossy(&out.stderr))
        });
        println!("{line}");
        let v: u64 = line
            .split("\"peak_step_kib\":")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .expect("peak_step_kib");
        kib.push(v);
    }
    println!("{{\"fused_linear/libtorch\":{:.3}}}", kib[1] as f64 / kib[0].max(1) as f64);
}

fn main() {
    if let Ok(case) = std::env::var("AMEND_SEQ_PEAK_CASE") {
        peak_child(&case);
    } else if std::env::var("AMEND_SEQ_PEAK").is_ok() {
        peak_parent();
    } else {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
