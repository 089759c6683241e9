//! `selected_logp/f32/full/{1t,2t}`: cross-entropy on the selected token with its gradient.
//!
//! Siblings: `naive`, `fused`, `libtorch` (`cross_entropy(z, y, Sum)` + `backward()`), and
//! `injected` (kernel + per-row injection + `backward()`).

use amend_kernels::naive::selected_logp_naive;
use amend_kernels::{LogitsIo, SelectedLogpConfig, SelectedLogpOut, selected_logp};
use amend_losses::bridge::{CpuSlice, Sanitize, fused_rows, inject_rows};
use criterion::{BenchmarkId, Criterion};
use tch::{Kind, Reduction, Tensor};

use super::common::{Inputs, check_agree, configure, id, shapes, thread_counts};

fn composite(z: &Tensor, y: &Tensor) -> Tensor {
    z.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)
}

pub fn full(c: &mut Criterion) {
    for t in thread_counts() {
        tch::set_num_threads(t as i32);
        let cfg = SelectedLogpConfig::default().with_threads(t);
        let mut g = c.benchmark_group(format!("selected_logp/f32/full/{t}t"));
        for (n, v) in shapes() {
            configure(&mut g, n, v, 8);
            let inp = Inputs::new(n, v, 3);
            let (z, y) = (inp.z(), inp.labels());
            let mut grad = vec![0.0f32; n * v];
            let mut grad2 = vec![0.0f32; n * v];
            let mut loss = vec![0.0f32; n];
            let s_fused = selected_logp(
                LogitsIo::grad(z.as_slice(), &mut grad),
                v,
                y.as_slice(),
                None,
                &cfg,
                SelectedLogpOut::new(&mut loss),
            )
            .unwrap();
            let s_naive = selected_logp_naive(
                LogitsIo::grad(z.as_slice(), &mut grad2),
                v,
                y.as_slice(),
                None,
                &cfg,
                SelectedLogpOut::new(&mut loss),
            )
            .unwrap();
            check_agree(
                "fused vs naive",
                (s_fused.sum, s_naive.sum),
                1e-5,
                Some((&grad, &grad2)),
                v,
            );
            let zc = inp.z.detach().set_requires_grad(true);
            let l = composite(&zc, &inp.labels);
            l.backward();
            let gc = zc.grad();
            let gc = CpuSlice::<f32>::strict(&gc, "bench", "grad").unwrap();
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
                    selected_logp(
                        LogitsIo::grad(z.as_slice(), &mut grad),
                        v,
                        y.as_slice(),
                        None,
                        &cfg,
                        SelectedLogpOut::new(&mut loss),
                    )
                    .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("naive", id(n, v)), |b| {
                b.iter(|| {
                    selected_logp_naive(
                        LogitsIo::grad(z.as_slice(), &mut grad),
                        v,
                        y.as_slice(),
                        None,
                        &cfg,
                        SelectedLogpOut::new(&mut loss),
                    )
                    .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("libtorch", id(n, v)), |b| {
                b.iter(|| {
                    let zc = inp.z.detach().set_requires_grad(true);
                    composite(&zc, &inp.labels).backward();
                    zc.grad()
                })
            });
            g.bench_function(BenchmarkId::new("injected", id(n, v)), |b| {
                b.iter(|| {
                    let zi = inp.z.detach().set_requires_grad(true);
                    let fused = fused_rows(&zi, "bench", true, |io, vocab, loss| {
                        selected_logp(
                            io,
                            vocab,
                            y.as_slice(),
                            None,
                            &cfg,
                            SelectedLogpOut::new(loss),
                        )
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
