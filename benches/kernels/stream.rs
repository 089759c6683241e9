//! `stream`: the machine's memory roof at one thread, STREAM-style, on the P-a buffer size
//! (2048 × 50257 f32 = 412 MB, far beyond any cache): `read` sums the buffer (one 4-byte load per
//! element), `copy` copies it into a second buffer (a load and a store per element; the bytes
//! counted are the 8 bytes moved, as STREAM counts them). Both buffers are first-touched before
//! timing. The fused kernel's fraction of the roof is its bytes moved per element over these.

use criterion::{BenchmarkId, Criterion, Throughput};

pub fn bench(c: &mut Criterion) {
    let n = 2048usize * 50257;
    let src: Vec<f32> = (0..n).map(|i| (i % 1024) as f32 * 1e-3).collect();
    let mut dst = vec![1.0f32; n];
    let mut g = c.benchmark_group("stream");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function(BenchmarkId::new("read", n), |b| {
        b.iter(|| {
            // 8 independent accumulators so the adds do not serialise on one register.
            let mut acc = [0.0f32; 8];
            for chunk in src.chunks_exact(8) {
                for (a, &x) in acc.iter_mut().zip(chunk) {
                    *a += x;
                }
            }
            std::hint::black_box(acc.iter().sum::<f32>())
        })
    });
    g.throughput(Throughput::Bytes((n * 8) as u64));
    g.bench_function(BenchmarkId::new("copy", n), |b| {
        b.iter(|| {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
        })
    });
    g.finish();
}
