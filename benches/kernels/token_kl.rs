//! `token_kl/f32/{full,forward}/{1t,2t}`: KL(q ‖ softmax(z)) with q the TNT mask-and-renormalise
//! target built from reference logits (P-a, kernels spec §1.2), all rows active.
//!
//! Siblings: `naive` (multi-pass, scalar `f32::exp`, 4 exp/elem), `fused` (the SIMD kernel,
//! target built inside the timed call), `libtorch` (the eager composite
//! `kl_div(log_softmax(z), q, Sum, log_target = false)` + `backward()`, with `q` prepared once
//! outside the timed closure) and, in `full`, `injected` (kernel + gradient injection +
//! `backward()` on tch). Output buffers of the kernels are allocated once, outside the loop.

use amend_kernels::naive::token_kl_naive;
use amend_kernels::{KlTarget, KlValue, LogitsIo, TokenKlConfig, token_kl};
use amend_losses::bridge::{CpuSlice, Sanitize, fused_rows, inject_rows};
use criterion::{BenchmarkId, Criterion};
use tch::{Kind, Reduction, Tensor};

use super::common::{Inputs, check_agree, configure, id, shapes, thread_counts};

fn cfg(threads: usize) -> TokenKlConfig {
    TokenKlConfig::default().with_value(KlValue::Divergence).with_threads(threads)
}

/// The masked, renormalised target as probabilities (the composite's `q`).
fn target_probs(inp: &Inputs) -> Tensor {
    let mask = inp.labels.one_hot(inp.v as i64).to_kind(Kind::Bool);
    inp.zr.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float)
}

fn composite(z: &Tensor, q: &Tensor) -> Tensor {
    z.log_softmax(-1, Kind::Float).kl_div(q, Reduction::Sum, false)
}

pub fn full(c: &mut Criterion) {
    for t in thread_counts() {
        tch::set_num_threads(t as i32);
        let mut g = c.benchmark_group(format!("token_kl/f32/full/{t}t"));
        for (n, v) in shapes() {
            configure(&mut g, n, v, 12);
            let inp = Inputs::new(n, v, 1);
            let (z, zr, y) = (inp.z(), inp.zr(), inp.labels());
            let target =
                || KlTarget::Reference { ref_logits: zr.as_slice(), exclude: Some(y.as_slice()) };
            let mut grad = vec![0.0f32; n * v];
            let mut grad2 = vec![0.0f32; n * v];
            let mut loss = vec![0.0f32; n];
            let q = target_probs(&inp);

            // Agreement before timing: fused, naive and the composite.
            let s_fused = token_kl(
                LogitsIo::grad(z.as_slice(), &mut grad),
                v,
                target(),
                None,
                &cfg(t),
                &mut loss,
            )
            .expect("valid inputs");
            let s_naive = token_kl_naive(
                LogitsIo::grad(z.as_slice(), &mut grad2),
                v,
                target(),
                None,
                &cfg(t),
                &mut loss,
            )
            .expect("valid inputs");
            check_agree(
                "fused vs naive",
                (s_fused.sum, s_naive.sum),
                1e-5,
                Some((&grad, &grad2)),
                v,
            );
            let zc = inp.z.detach().set_requires_grad(true);
            let l = composite(&zc, &q);
            l.backward();
            let gc = zc.grad();
            let gc = CpuSlice::<f32>::strict(&gc, "bench", "grad").expect("dense f32 gradient");
            check_agree(
                "fused vs libtorch",
                (s_fused.sum, f64::try_from(&l).unwrap()),
                1e-4,
                Some((&grad, gc.as_slice())),
                v,
            );
            drop((gc, zc, l));

            g.bench_function(BenchmarkId::new("fused", id(n, v)), |b| {
                b.iter(|| {
                    token_kl(
                        LogitsIo::grad(z.as_slice(), &mut grad),
                        v,
                        target(),
                        None,
                        &cfg(t),
                        &mut loss,
                    )
                    .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("naive", id(n, v)), |b| {
                b.iter(|| {
                    token_kl_naive(
                        LogitsIo::grad(z.as_slice(), &mut grad),
                        v,
                        target(),
                        None,
                        &cfg(t),
                        &mut loss,
                    )
                    .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("libtorch", id(n, v)), |b| {
                b.iter(|| {
                    let zc = inp.z.detach().set_requires_grad(true);
                    composite(&zc, &q).backward();
                    zc.grad()
                })
            });
            g.bench_function(BenchmarkId::new("injected", id(n, v)), |b| {
                b.iter(|| {
                    let zi = inp.z.detach().set_requires_grad(true);
                    let fused = fused_rows(&zi, "bench", true, |io, vocab, loss| {
                        token_kl(io, vocab, target(), None, &cfg(t), loss)
                    })
                    .unwrap();
                    let out = inject_rows(&zi, &fused.values, fused.grad.as_ref(), Sanitize::None)
                        .unwrap();
                    out.sum(Kind::Float).backward();
                    zi.grad()
                })
            });
        }
        g.finish();
    }
}

pub fn forward(c: &mut Criterion) {
    for t in thread_counts() {
        tch::set_num_threads(t as i32);
        let mut g = c.benchmark_group(format!("token_kl/f32/forward/{t}t"));
        for (n, v) in shapes() {
            configure(&mut g, n, v, 8);
            let inp = Inputs::new(n, v, 2);
            let (z, zr, y) = (inp.z(), inp.zr(), inp.labels());
            let target =
                || KlTarget::Reference { ref_logits: zr.as_slice(), exclude: Some(y.as_slice()) };
            let mut loss = vec![0.0f32; n];
            let q = target_probs(&inp);
            let s_fused =
                token_kl(LogitsIo::value(z.as_slice()), v, target(), None, &cfg(t), &mut loss)
                    .unwrap();
            let s_naive = token_kl_naive(
                LogitsIo::value(z.as_slice()),
                v,
                target(),
                None,
                &cfg(t),
                &mut loss,
            )
            .unwrap();
            check_agree("fused vs naive", (s_fused.sum, s_naive.sum), 1e-5, None, v);
            let l = tch::no_grad(|| composite(&inp.z, &q));
            check_agree(
                "fused vs libtorch",
                (s_fused.sum, f64::try_from(&l).unwrap()),
                1e-4,
                None,
                v,
            );

            g.bench_function(BenchmarkId::new("fused", id(n, v)), |b| {
                b.iter(|| {
                    token_kl(LogitsIo::value(z.as_slice()), v, target(), None, &cfg(t), &mut loss)
                        .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("naive", id(n, v)), |b| {
                b.iter(|| {
                    token_kl_naive(
                        LogitsIo::value(z.as_slice()),
                        v,
                        target(),
                        None,
                        &cfg(t),
                        &mut loss,
                    )
                    .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("libtorch", id(n, v)), |b| {
                b.iter(|| tch::no_grad(|| composite(&inp.z, &q)))
            });
        }
        g.finish();
    }
}
