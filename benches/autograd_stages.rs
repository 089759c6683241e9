//! Where the time of a kernel-backed token loss goes on its way through tch autograd: one TNRR
//! step on `[N, V]` f32 logits split into its stages, each timed on its own (median of a few
//! repetitions, wall clock, one thread unless `AMEND_BENCH_THREADS` says otherwise).
//!
//! * `kernel (reused buffer)`: the fused kernel writing value and gradient into buffers that are
//!   already allocated and touched (what the kernel costs by itself);
//! * `kernel (fresh buffer)`: the same through `bridge::fused_rows`, which allocates the `[N, V]`
//!   gradient on each call (first touch of every page);
//! * `inject_rows forward` / `backward`: the per-row surrogate `values + (s − s.detach())` with
//!   `s[r] = ⟨g[r], z[r]⟩` (a `bmm`) and its `backward()` after a `sum()`;
//! * `inject_sum forward` / `backward`: the scalar surrogate (one `dot`) and its `backward()`;
//! * `fresh [N, V] write`: `z * 2` into a new tensor, the cost of any new `[N, V]` result;
//! * `tnt_loss + backward` with and without `TntConfig::metrics`, and the composite path.
//!
//! ```text
//! cargo bench --bench autograd_stages                              # 256×50257
//! AMEND_BENCH=large cargo bench --bench autograd_stages            # 2048×50257 (P-a shape)
//! ```
//!
//! Under `cargo bench -- --test` (CI's smoke run) every stage runs once on a small shape.
//! Results and their reading: `docs/performance.md`.

use std::time::Instant;

use amend_kernels::{LogitsIo, TntKernelConfig, TntVariant as KernelVariant, tnt};
use amend_losses::bridge::{CpuSlice, Sanitize, fused_rows, inject_rows, inject_sum};
use amend_losses::token::{TntConfig, TntVariant, TokenBackend, TokenWeights, tnt_loss};
use tch::{Device, Kind, Tensor};

fn median_ms(reps: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut t: Vec<f64> = (0..reps).map(|_| f()).collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn elapsed_ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let (n, v) = match std::env::var("AMEND_BENCH").as_deref() {
        _ if smoke => (16i64, 1000i64),
        Ok("large") => (2048, 50257),
        _ => (256, 50257),
    };
    let threads: i32 =
        std::env::var("AMEND_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps = if smoke { 1 } else { 5 };
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let z0 = Tensor::randn([n, v], opts) * 2.0;
    let zo = Tensor::randn([n, v], opts) * 2.0;
    let y = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let w = Tensor::ones([n], opts).neg();
    let kcfg = TntKernelConfig::new(KernelVariant::Tnrr).with_threads(threads as usize);
    let zos = CpuSlice::<f32>::new(&zo, "bench", "ref_logits").expect("contiguous");
    let ys = CpuSlice::<i64>::new(&y, "bench", "labels").expect("contiguous");
    let ws = CpuSlice::<f32>::new(&w, "bench", "weights").expect("contiguous");
    let kernel = |io: LogitsIo<'_>, vocab: usize, loss: &mut [f32]| {
        tnt(io, vocab, Some(zos.as_slice()), ys.as_slice(), ws.as_slice(), &kcfg, loss)
    };
    println!("autograd_stages: TNRR, {n}x{v} f32, {threads} thread(s), median of {reps}");
    let mut rows: Vec<(&str, f64)> = Vec::new();

    let zs = CpuSlice::<f32>::new(&z0, "bench", "logits").expect("contiguous");
    let mut g = vec![0f32; (n * v) as usize];
    let mut loss = vec![0f32; n as usize];
    kernel(LogitsIo::grad(zs.as_slice(), &mut g), v as usize, &mut loss).expect("kernel");
    rows.push((
        "kernel (reused buffer)",
        median_ms(reps, || {
            let t = Instant::now();
            kernel(LogitsIo::grad(zs.as_slice(), &mut g), v as usize, &mut loss).expect("kernel");
            elapsed_ms(t)
        }),
    ));
    drop(g);
    let z = z0.copy().set_requires_grad(true);
    rows.push((
        "kernel (fresh buffer, fused_rows)",
        median_ms(reps, || {
            let t = Instant::now();
            let f = fused_rows(&z, "bench", true, kernel).expect("kernel");
            let ms = elapsed_ms(t);
            drop(f);
            ms
        }),
    ));
    let f = fused_rows(&z, "bench", true, kernel).expect("kernel");
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let z = z0.copy().set_requires_grad(true);
        let t = Instant::now();
        let tok = inject_rows(&z, &f.values, f.grad.as_ref(), Sanitize::None).expect("inject");
        fwd.push(elapsed_ms(t));
        let s = tok.sum(Kind::Float);
        let t = Instant::now();
        s.backward();
        bwd.push(elapsed_ms(t));
    }
    rows.push(("inject_rows forward (bmm)", median_ms(reps, || fwd.pop().unwrap_or(0.0))));
    rows.push(("inject_rows backward", median_ms(reps, || bwd.pop().unwrap_or(0.0))));
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let z = z0.copy().set_requires_grad(true);
        let total = f.values.sum(Kind::Float);
        let t = Instant::now();
        let s = inject_sum(&z, &total, f.grad.as_ref(), Sanitize::None).expect("inject");
        fwd.push(elapsed_ms(t));
        let t = Instant::now();
        s.backward();
        bwd.push(elapsed_ms(t));
    }
    rows.push(("inject_sum forward (dot)", median_ms(reps, || fwd.pop().unwrap_or(0.0))));
    rows.push(("inject_sum backward", median_ms(reps, || bwd.pop().unwrap_or(0.0))));
    drop(f);
    rows.push((
        "fresh [N, V] write (z * 2)",
        median_ms(reps, || {
            let t = Instant::now();
            let c = z0.f_mul_scalar(2.0).expect("mul");
            let ms = elapsed_ms(t);
            drop(c);
            ms
        }),
    ));
    let z3 = z0.view([1, n, v]);
    let (zo3, y3) = (zo.view([1, n, v]), y.view([1, n]));
    let weights = TokenWeights::new(&Tensor::ones([1, n], (Kind::Int64, Device::Cpu)).neg())
        .expect("weights");
    for (name, backend, metrics) in [
        ("tnt_loss + backward, kernel, metrics", TokenBackend::Kernel, true),
        ("tnt_loss + backward, kernel, no metrics", TokenBackend::Kernel, false),
        ("tnt_loss + backward, composite, metrics", TokenBackend::Composite, true),
    ] {
        let cfg = TntConfig::new(TntVariant::Rr).with_backend(backend).with_metrics(metrics);
        rows.push((
            name,
            median_ms(reps, || {
                let z = z3.copy().set_requires_grad(true);
                let t = Instant::now();
                let out = tnt_loss(&z, &zo3, &y3, &weights, &cfg).expect("tnt_loss");
                out.loss.backward();
                elapsed_ms(t)
            }),
        ));
    }
    for (name, ms) in rows {
        println!("  {name:<42} {ms:>10.1} ms");
    }
}
