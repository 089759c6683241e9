//! Token losses end to end through `amend-losses` (value + `backward()`), and the fused-linear
//! step of target P-b (kernels spec §1.2, §4, §9).
//!
//! Groups (siblings as `BenchmarkId::new(impl, shape)`):
//!
//! * `tnt_loss/f32/step/{1t,2t}`: TNFF on `[N, V]` logits, `tnt_loss` → `Sum` → `backward()`,
//!   siblings `composite` (`TokenBackend::Composite`, tch autograd), `kernel`
//!   (`TokenBackend::Kernel`, what `Auto` picks on CPU f32) and `kernel_no_metrics` (the same with
//!   `TntConfig::metrics = false`). Fast: 256×50257; `AMEND_BENCH=large`:
//!   2048×50257 (the P-a shape).
//! * `nll_loss/f32/step/{1t,2t}`: the same for `nll_loss` (cross-entropy), with a third sibling
//!   `libtorch` (`cross_entropy_loss` on the same logits).
//! * `flce_ce/f32/step/{1t,2t}` (P-b): cross-entropy from hidden states, `naive` = `h·Wᵀ` →
//!   libtorch `cross_entropy` (`Sum`) → `backward()` with the logits in scope (as a user writes
//!   it), `chunked` = `fused_linear_nll_loss` (`Sum`) → `backward()`, until the gradients of `h`
//!   and `W` exist.
//! * `flce_tnt/f32/step/{1t,2t}` (P-b): TNFF from hidden states, `naive` = `h·Wᵀ` and
//!   `h°·W°ᵀ` (no grad) → `tnt_loss` (composite autograd) → `backward()`, `naive_kernel` = the
//!   same full logits through the kernel backend, `chunked` = `fused_linear_tnt_loss` with
//!   `Reference::Head`.
//!
//! Fused-linear shapes `N×H×V`: fast 512×256×50257, `AMEND_BENCH=large` 2048×768×50257 (P-b).
//! `AMEND_BENCH_THREADS=1` restricts the thread counts. Every group checks once, before timing,
//! that its siblings agree (loss and a sample of gradients). Peak memory of the P-b step is
//! measured in child processes by `benches/peak_mem.rs`. Commands and results:
//! `docs/performance.md`.
//!
//! ```text
//! AMEND_BENCH=large AMEND_BENCH_THREADS=1 cargo bench --bench token_losses -- 'tnt_loss/f32/step/1t'
//! AMEND_BENCH=large cargo bench --bench token_losses -- 'flce_'
//! ```

use std::hint::black_box;
use std::time::Duration;

use amend_losses::Reduction;
use amend_losses::token::{
    NllConfig, TntConfig, TntVariant, TokenBackend, TokenWeights, nll_loss, tnt_loss,
};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use tch::{Device, Kind, Tensor};

#[path = "common/flce.rs"]
mod flce;
use flce::{FlceInputs, flce_ce_step, flce_inputs, flce_tnt_step, zero_grads};

fn tier() -> String {
    std::env::var("AMEND_BENCH").unwrap_or_else(|_| "fast".into())
}

fn large() -> bool {
    tier() == "large"
}

fn thread_counts() -> Vec<usize> {
    match std::env::var("AMEND_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, 2],
    }
}

/// Logit shapes `(N, V)` of the end-to-end groups.
fn logit_shape() -> (i64, i64) {
    if large() { (2048, 50257) } else { (256, 50257) }
}

/// Fused-linear shapes `(N, H, V)`.
fn flce_shape() -> (i64, i64, i64) {
    if large() { (2048, 768, 50257) } else { (512, 256, 50257) }
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>, elements: u64, slow: bool) {
    g.throughput(Throughput::Elements(elements));
    g.sample_size(10);
    let (warm, meas) = if slow { (3, 60) } else { (2, 10) };
    g.warm_up_time(Duration::from_secs(warm));
    g.measurement_time(Duration::from_secs(meas));
}

fn opts() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

fn scalar(t: &Tensor) -> f64 {
    f64::try_from(t.detach().to_kind(Kind::Double).sum(Kind::Double)).expect("scalar")
}

/// Max |a − b| over the first `n` entries (and a relative-to-magnitude tolerance check).
#[track_caller]
fn check_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let n = a.numel().min(1 << 16) as i64;
    let a = a.reshape([-1]).narrow(0, 0, n).to_kind(Kind::Double);
    let b = b.reshape([-1]).narrow(0, 0, n).to_kind(Kind::Double);
    let d = f64::try_from((&a - &b).abs().max()).expect("max");
    let m = f64::try_from(b.abs().max()).expect("max").max(1.0);
    assert!(d <= tol * m, "{what}: max |Δ| = {d} (scale {m})");
}

// ----------------------------------------------------------------------------------------
// Token losses on logits.

struct TokenInputs {
    z: Tensor,
    zo: Tensor,
    labels: Tensor,
    weights: TokenWeights,
}

fn token_inputs(n: i64, v: i64) -> TokenInputs {
    tch::manual_seed(7);
    // One sequence of N positions; about one position in eight is negative, one in sixteen
    // inactive.
    let z = Tensor::randn([1, n, v], opts()) * 2.0;
    let zo = Tensor::randn([1, n, v], opts()) * 2.0;
    let labels = Tensor::randint(v, [1, n], (Kind::Int64, Device::Cpu));
    let u = Tensor::rand([1, n], opts());
    let w = Tensor::ones([1, n], (Kind::Int64, Device::Cpu))
        .where_self(&u.ge(0.125), &Tensor::from(-1i64))
        .where_self(&u.ge(1.0 / 16.0), &Tensor::from(0i64));
    TokenInputs { z, zo, labels, weights: TokenWeights::new(&w).expect("valid weights") }
}

/// One TNFF step: a fresh leaf over the logits (no copy), the loss, `backward()`.
fn tnff_step(x: &TokenInputs, backend: TokenBackend, metrics: bool) -> (f64, Tensor) {
    let z = x.z.detach().set_requires_grad(true);
    let cfg = TntConfig::new(TntVariant::Ff)
        .with_alpha(1.0)
        .with_reduction(Reduction::Sum)
        .with_backend(backend)
        .with_metrics(metrics);
    let out = tnt_loss(&z, &x.zo, &x.labels, &x.weights, &cfg).expect("tnt_loss");
    out.loss.backward();
    (scalar(&out.loss), z.grad())
}

fn nll_step(x: &TokenInputs, backend: Option<TokenBackend>) -> (f64, Tensor) {
    let z = x.z.detach().set_requires_grad(true);
    let loss = match backend {
        Some(b) => {
            let cfg = NllConfig::default().with_reduction(Reduction::Sum).with_backend(b);
            nll_loss(&z, &x.labels, None, &cfg).expect("nll_loss").loss
        }
        None => {
            let v = z.size()[2];
            z.reshape([-1, v]).cross_entropy_loss::<Tensor>(
                &x.labels.reshape([-1]),
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            )
        }
    };
    loss.backward();
    (scalar(&loss), z.grad())
}

fn token_groups(c: &mut Criterion) {
    let (n, v) = logit_shape();
    let x = token_inputs(n, v);
    let id = format!("{n}x{v}");
    // Agreement before timing (kernels spec §9.3).
    let (a, ga) = tnff_step(&x, TokenBackend::Composite, true);
    let (b, gb) = tnff_step(&x, TokenBackend::Kernel, true);
    assert!((a - b).abs() <= 1e-5 * a.abs(), "TNFF loss: composite {a} vs kernel {b}");
    check_close("TNFF grad", &gb, &ga, 1e-5);
    let (quiet, gq) = tnff_step(&x, TokenBackend::Kernel, false);
    assert!(quiet == b, "TNFF loss without metrics: {quiet} vs {b}");
    check_close("TNFF grad without metrics", &gq, &gb, 0.0);
    drop((ga, gb, gq));
    let (a, ga) = nll_step(&x, Some(TokenBackend::Composite));
    let (b, gb) = nll_step(&x, Some(TokenBackend::Kernel));
    let (l, gl) = nll_step(&x, None);
    assert!((a - b).abs() <= 1e-5 * a.abs() && (l - b).abs() <= 1e-5 * l.abs(), "NLL losses");
    check_close("NLL grad (composite)", &gb, &ga, 1e-5);
    check_close("NLL grad (libtorch)", &gb, &gl, 1e-5);
    drop((ga, gb, gl));
    for threads in thread_counts() {
        tch::set_num_threads(threads as i32);
        let mut g = c.benchmark_group(format!("tnt_loss/f32/step/{threads}t"));
        configure(&mut g, (n * v) as u64, large());
        for (name, backend, metrics) in [
            ("composite", TokenBackend::Composite, true),
            ("kernel", TokenBackend::Kernel, true),
            ("kernel_no_metrics", TokenBackend::Kernel, false),
        ] {
            g.bench_function(BenchmarkId::new(name, &id), |bch| {
                bch.iter(|| black_box(tnff_step(&x, backend, metrics).0))
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("nll_loss/f32/step/{threads}t"));
        configure(&mut g, (n * v) as u64, large());
        for (name, backend) in [
            ("composite", Some(TokenBackend::Composite)),
            ("kernel", Some(TokenBackend::Kernel)),
            ("libtorch", None),
        ] {
            g.bench_function(BenchmarkId::new(name, &id), |bch| {
                bch.iter(|| black_box(nll_step(&x, backend).0))
            });
        }
        g.finish();
    }
}

// ----------------------------------------------------------------------------------------
// P-b: fused-linear steps from hidden states.

/// Runs `step` and returns its loss and the gradients of `h` and `W`.
fn with_grads(x: &FlceInputs, step: impl FnOnce(&FlceInputs) -> f64) -> (f64, Tensor, Tensor) {
    zero_grads(x);
    let l = step(x);
    (l, x.h.grad().copy(), x.w.grad().copy())
}

fn flce_groups(c: &mut Criterion) {
    let (n, hd, v) = flce_shape();
    let x = flce_inputs(n, hd, v);
    let id = format!("{n}x{hd}x{v}");
    // Agreement before timing.
    let (a, ha, wa) = with_grads(&x, |x| flce_ce_step(x, "naive"));
    let (b, hb, wb) = with_grads(&x, |x| flce_ce_step(x, "chunked"));
    assert!((a - b).abs() <= 1e-5 * a.abs(), "flce_ce: naive {a} vs chunked {b}");
    check_close("flce_ce dh", &hb, &ha, 1e-4);
    check_close("flce_ce dW", &wb, &wa, 1e-4);
    let (a, ha, wa) = with_grads(&x, |x| flce_tnt_step(x, "naive"));
    for which in ["naive_kernel", "chunked"] {
        let (b, hb, wb) = with_grads(&x, |x| flce_tnt_step(x, which));
        assert!((a - b).abs() <= 1e-5 * a.abs(), "flce_tnt: naive {a} vs {which} {b}");
        check_close(&format!("flce_tnt {which} dh"), &hb, &ha, 1e-4);
        check_close(&format!("flce_tnt {which} dW"), &wb, &wa, 1e-4);
    }
    drop((ha, wa));
    zero_grads(&x);
    // 6·N·H·V flops per step (forward, dh, dW GEMMs); reported per logit element.
    let elements = (n * v) as u64;
    for threads in thread_counts() {
        tch::set_num_threads(threads as i32);
        let mut g = c.benchmark_group(format!("flce_ce/f32/step/{threads}t"));
        configure(&mut g, elements, large());
        for name in ["naive", "chunked"] {
            g.bench_function(BenchmarkId::new(name, &id), |bch| {
                bch.iter(|| {
                    zero_grads(&x);
                    black_box(flce_ce_step(&x, name))
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("flce_tnt/f32/step/{threads}t"));
        configure(&mut g, elements, large());
        for name in ["naive", "naive_kernel", "chunked"] {
            g.bench_function(BenchmarkId::new(name, &id), |bch| {
                bch.iter(|| {
                    zero_grads(&x);
                    black_box(flce_tnt_step(&x, name))
                })
            });
        }
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // Build only the inputs of the groups a filter (`cargo bench --bench token_losses -- 'flce_'`)
    // can select.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_default();
    let flce = filter.contains("flce");
    let token = filter.contains("tnt_loss") || filter.contains("nll_loss");
    if !flce || token {
        token_groups(&mut c);
    }
    if flce || !token {
        flce_groups(&mut c);
    }
    c.final_summary();
}
