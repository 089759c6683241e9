//! Peak memory of one loss step (forward + gradient) per variant, each measured in a fresh child
//! process (kernels spec §9.4). tch exposes no CPU allocator statistics, so the child resets its
//! peak RSS (`/proc/self/clear_refs`), reads `VmRSS`, runs **one** step, and reports
//! `peak_step_kib = VmHWM − VmRSS_before` as one JSON line; the parent tabulates.
//!
//! Inputs (and, for the kernels, their caller-owned output buffers, as in a training loop that
//! reuses them) are allocated and touched before the measurement; a warm-up step on a tiny shape
//! loads libtorch's kernels and thread pools first.
//!
//! ```text
//! cargo bench --bench peak_mem                      # fast tier (256×50257; 512×256×50257)
//! AMEND_BENCH=large cargo bench --bench peak_mem    # P-a shape (2048×50257), P-b (2048×768×50257)
//! AMEND_PEAK_CASES=flce AMEND_BENCH=large cargo bench --bench peak_mem   # only the P-b cases
//! ```
//!
//! The P-b cases (`flce_ce`, `flce_tnt`) measure one fused-linear loss step from hidden states
//! `h [N, H]` and the head `W [V, H]` (both requiring grad) until their gradients exist:
//! `naive` (full logits + autograd, the logits in scope during `backward()` as a user writes it;
//! for TNT the reference logits and `tnt_loss` on the composite path), `naive_lean` (CE only:
//! the logits dropped before `backward()`), `naive_kernel` (TNT only: full logits through the
//! kernel backend) and `chunked` (`fused_linear_nll_loss` / `fused_linear_tnt_loss`), and print
//! each path's ratio to `naive` (P-b bounds `chunked / naive` by 0.25).

use std::process::Command;

use amend_kernels::naive::token_kl_naive;
use amend_kernels::{
    KlTarget, KlValue, LogitsIo, SelectedLogpConfig, SelectedLogpOut, TokenKlConfig, selected_logp,
    token_kl,
};
use amend_losses::bridge::{CpuSlice, Sanitize, fused_rows, inject_rows};
use tch::{Device, Kind, Reduction, Tensor};

#[path = "common/flce.rs"]
mod flce;
#[path = "common/proc_status.rs"]
mod proc_status;

use proc_status::{reset_peak, status_kib};

const ENV: &str = "AMEND_PEAK_CASE";

fn main() {
    match std::env::var(ENV) {
        Ok(case) => child(&case),
        Err(_) => parent(),
    }
}

fn shape() -> (usize, usize) {
    match std::env::var("AMEND_BENCH").as_deref() {
        Ok("large") => (2048, 50257),
        Ok("medium") => (1024, 32000),
        _ => (256, 50257),
    }
}

/// `N × H × V` of the P-b cases.
fn flce_shape() -> (usize, usize, usize) {
    match std::env::var("AMEND_BENCH").as_deref() {
        Ok("large") => (2048, 768, 50257),
        _ => (512, 256, 50257),
    }
}

/// Runs one child for `case` and returns its `peak_step_kib`.
fn measure(exe: &std::path::Path, case: &str) -> f64 {
    let out = Command::new(exe).env(ENV, case).output().expect("spawn the measuring child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("child {case} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    line.split("\"peak_step_kib\":")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .expect("child prints peak_step_kib")
}

fn selected(case: &str) -> bool {
    std::env::var("AMEND_PEAK_CASES").map_or(true, |f| case.contains(&f))
}

fn parent() {
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    if std::env::var("AMEND_PEAK_CASES").map_or(true, |f| !f.contains("flce")) {
        parent_kernels(&exe);
    }
    parent_flce(&exe);
}

/// The P-b table: one child per (loss, path, threads).
fn parent_flce(exe: &std::path::Path) {
    let (n, h, v) = flce_shape();
    let threads: Vec<usize> =
        match std::env::var("AMEND_BENCH_THREADS").ok().and_then(|t| t.parse().ok()) {
            Some(t) => vec![t],
            None => vec![1, 2],
        };
    println!();
    println!("| loss | path | N×H×V | threads | peak step memory (MiB) | / naive |");
    println!("|---|---|---|---|---|---|");
    for t in threads {
        for (loss, paths) in [
            ("flce_ce", &["naive", "naive_lean", "chunked"][..]),
            ("flce_tnt", &["naive", "naive_kernel", "chunked"][..]),
        ] {
            let mut naive = None;
            for path in paths {
                let case = format!("{loss}:{path}:{n}x{h}x{v}:{t}");
                if !selected(&case) {
                    continue;
                }
                let mib = measure(exe, &case) / 1024.0;
                let base = *naive.get_or_insert(mib);
                println!("| {loss} | {path} | {n}×{h}×{v} | {t} | {mib:.1} | {:.3} |", mib / base);
            }
        }
    }
}

fn parent_kernels(exe: &std::path::Path) {
    let (n, v) = shape();
    let threads: Vec<usize> =
        match std::env::var("AMEND_BENCH_THREADS").ok().and_then(|t| t.parse().ok()) {
            Some(t) => vec![t],
            None => vec![1, 2],
        };
    println!(
        "| kernel | variant | shape | threads | peak step memory (MiB) | × one [N,V] f32 tensor |"
    );
    println!("|---|---|---|---|---|---|");
    let nv_mib = (n * v * 4) as f64 / (1024.0 * 1024.0);
    for t in threads {
        for (kernel, variants) in [
            ("token_kl", &["naive", "fused", "libtorch", "injected"][..]),
            ("selected_logp", &["fused", "libtorch", "injected"][..]),
        ] {
            for variant in variants {
                let case = format!("{kernel}:{variant}:{n}x{v}:{t}");
                if !selected(&case) {
                    continue;
                }
                let mib = measure(exe, &case) / 1024.0;
                println!(
                    "| {kernel} | {variant} | {n}×{v} | {t} | {mib:.1} | {:.3} |",
                    mib / nv_mib
                );
            }
        }
    }
}

struct Case {
    kernel: String,
    variant: String,
    n: usize,
    v: usize,
    threads: usize,
}

fn parse(case: &str) -> Case {
    let p: Vec<&str> = case.split(':').collect();
    let (n, v) = p[2].split_once('x').expect("NxV");
    Case {
        kernel: p[0].into(),
        variant: p[1].into(),
        n: n.parse().unwrap(),
        v: v.parse().unwrap(),
        threads: p[3].parse().unwrap(),
    }
}

/// Inputs of one case, allocated and touched.
struct Inputs {
    n: usize,
    v: usize,
    z: Tensor,
    zr: Tensor,
    labels: Tensor,
    q: Option<Tensor>,
    grad: Vec<f32>,
    loss: Vec<f32>,
}

fn inputs(c: &Case, n: usize, v: usize) -> Inputs {
    tch::manual_seed(1);
    let opts = (Kind::Float, Device::Cpu);
    let z = Tensor::randn([n as i64, v as i64], opts);
    let zr = Tensor::randn([n as i64, v as i64], opts);
    let labels = Tensor::randint(v as i64, [n as i64], (Kind::Int64, Device::Cpu));
    // The composite's target is prepared outside the step (kernels spec §1.2).
    let q = (c.kernel == "token_kl" && c.variant == "libtorch").then(|| {
        let mask = labels.one_hot(v as i64).to_kind(Kind::Bool);
        zr.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float)
    });
    let kernel_out = c.variant == "fused" || c.variant == "naive";
    let grad = if kernel_out { vec![1.0f32; n * v] } else { Vec::new() };
    Inputs { n, v, z, zr, labels, q, grad, loss: vec![0.0; n] }
}

fn step(c: &Case, inp: &mut Inputs) {
    let t = c.threads;
    let v = inp.v;
    let z = CpuSlice::<f32>::strict(&inp.z, "peak", "z").unwrap();
    let zr = CpuSlice::<f32>::strict(&inp.zr, "peak", "zr").unwrap();
    let y = CpuSlice::<i64>::strict(&inp.labels, "peak", "labels").unwrap();
    let kl = TokenKlConfig::default().with_value(KlValue::Divergence).with_threads(t);
    let ce = SelectedLogpConfig::default().with_threads(t);
    let target = || KlTarget::Reference { ref_logits: zr.as_slice(), exclude: Some(y.as_slice()) };
    match (c.kernel.as_str(), c.variant.as_str()) {
        ("token_kl", "fused") => {
            token_kl(
                LogitsIo::grad(z.as_slice(), &mut inp.grad),
                v,
                target(),
                None,
                &kl,
                &mut inp.loss,
            )
            .unwrap();
        }
        ("token_kl", "naive") => {
            token_kl_naive(
                LogitsIo::grad(z.as_slice(), &mut inp.grad),
                v,
                target(),
                None,
                &kl,
                &mut inp.loss,
            )
            .unwrap();
        }
        ("token_kl", "libtorch") => {
            let zc = inp.z.detach().set_requires_grad(true);
            let q = inp.q.as_ref().expect("prepared");
            zc.log_softmax(-1, Kind::Float).kl_div(q, Reduction::Sum, false).backward();
            assert!(zc.grad().defined());
        }
        ("token_kl", "injected") => {
            let zi = inp.z.detach().set_requires_grad(true);
            let f = fused_rows(&zi, "peak", true, |io, vocab, loss| {
                token_kl(io, vocab, target(), None, &kl, loss)
            })
            .unwrap();
            inject_rows(&zi, &f.values, f.grad.as_ref(), Sanitize::None)
                .unwrap()
                .sum(Kind::Float)
                .backward();
            assert!(zi.grad().defined());
        }
        ("selected_logp", "fused") => {
            selected_logp(
                LogitsIo::grad(z.as_slice(), &mut inp.grad),
                v,
                y.as_slice(),
                None,
                &ce,
                SelectedLogpOut::new(&mut inp.loss),
            )
            .unwrap();
        }
        ("selected_logp", "libtorch") => {
            let zc = inp.z.detach().set_requires_grad(true);
            zc.cross_entropy_loss::<Tensor>(&inp.labels, None, Reduction::Sum, -100, 0.0)
                .backward();
            assert!(zc.grad().defined());
        }
        ("selected_logp", "injected") => {
            let zi = inp.z.detach().set_requires_grad(true);
            let f = fused_rows(&zi, "peak", true, |io, vocab, loss| {
                selected_logp(io, vocab, y.as_slice(), None, &ce, SelectedLogpOut::new(loss))
            })
            .unwrap();
            inject_rows(&zi, &f.values, f.grad.as_ref(), Sanitize::None)
                .unwrap()
                .sum(Kind::Float)
                .backward();
            assert!(zi.grad().defined());
        }
        (k, var) => panic!("unknown case {k}:{var}"),
    }
    let _ = inp.n;
}

/// Child of a P-b case: inputs and a warm-up on a tiny shape, then one measured step.
fn child_flce(case: &str) {
    let p: Vec<&str> = case.split(':').collect();
    let dims: Vec<i64> = p[2].split('x').map(|d| d.parse().expect("NxHxV")).collect();
    let threads: i32 = p[3].parse().expect("threads");
    tch::set_num_threads(threads);
    let step = |x: &flce::FlceInputs| match (p[0], p[1]) {
        ("flce_ce", path) => flce::flce_ce_step(x, path),
        ("flce_tnt", path) => flce::flce_tnt_step(x, path),
        (loss, _) => panic!("unknown case {loss}"),
    };
    let warm = flce::flce_inputs(64, 16, 1000);
    step(&warm);
    drop(warm);
    let x = flce::flce_inputs(dims[0], dims[1], dims[2]);
    let before = reset_peak();
    let loss = step(&x);
    let peak = status_kib("VmHWM:");
    assert!(x.h.grad().defined() && x.w.grad().defined(), "gradients exist after the step");
    println!(
        "{{\"case\":\"{case}\",\"rss_before_kib\":{before},\"peak_step_kib\":{},\"loss\":{loss}}}",
        peak.saturating_sub(before)
    );
}

fn child(case: &str) {
    if case.starts_with("flce_") {
        return child_flce(case);
    }
    let c = parse(case);
    tch::set_num_threads(c.threads as i32);
    // Warm-up on a tiny shape: loads kernels and thread pools.
    let mut warm = inputs(&c, 8, 1000);
    step(&c, &mut warm);
    drop(warm);
    let mut inp = inputs(&c, c.n, c.v);
    let before = reset_peak();
    step(&c, &mut inp);
    let peak = status_kib("VmHWM:");
    println!(
        "{{\"case\":\"{case}\",\"rss_before_kib\":{before},\"peak_step_kib\":{}}}",
        peak.saturating_sub(before)
    );
}
