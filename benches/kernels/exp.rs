//! `exp_f32`: the vectorised exp against scalar `f32::exp` (what Rust calls: glibc `expf`), on
//! inputs in [−20, 0] (the range of `z − max z`).

use amend_kernels::simd::{SimdLevel, exp_f32_on};
use criterion::{BenchmarkId, Criterion, Throughput};

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("exp_f32");
    for n in [1usize << 12, 1 << 22] {
        let x: Vec<f32> = (0..n).map(|i| -20.0 * (i as f32 / n as f32)).collect();
        let mut y = vec![0.0f32; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("scalar", n), |b| {
            b.iter(|| {
                for (d, &s) in y.iter_mut().zip(&x) {
                    *d = s.exp();
                }
            })
        });
        if SimdLevel::Avx512.is_available() {
            g.bench_function(BenchmarkId::new("avx512", n), |b| {
                b.iter(|| exp_f32_on(SimdLevel::Avx512, &x, &mut y).unwrap())
            });
        }
        if SimdLevel::Avx2Fma.is_available() {
            g.bench_function(BenchmarkId::new("avx2", n), |b| {
                b.iter(|| exp_f32_on(SimdLevel::Avx2Fma, &x, &mut y).unwrap())
            });
        }
        g.bench_function(BenchmarkId::new("portable", n), |b| {
            b.iter(|| exp_f32_on(SimdLevel::Portable, &x, &mut y).unwrap())
        });
    }
    g.finish();
}
