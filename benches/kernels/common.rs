//! Shapes, inputs, criterion configuration and the agreement checks shared by the kernel benches.

use std::time::Duration;

use amend_losses::bridge::CpuSlice;
use criterion::{BenchmarkGroup, Throughput, measurement::WallTime};
use tch::{Device, Kind, Tensor};

/// `N × V` shapes of the tier selected by `AMEND_BENCH` (`fast` by default, `medium`, `large`;
/// kernels spec §9.1).
pub fn shapes() -> Vec<(usize, usize)> {
    match tier().as_str() {
        "large" => vec![(2048, 50257), (4096, 32000), (1024, 128_256), (1024, 151_936)],
        "medium" => vec![(1024, 32000), (512, 128_256), (512, 151_936)],
        _ => vec![(128, 32000), (256, 50257), (64, 128_256), (64, 151_936)],
    }
}

pub fn tier() -> String {
    std::env::var("AMEND_BENCH").unwrap_or_else(|_| "fast".into())
}

/// Thread counts benchmarked (`AMEND_BENCH_THREADS=1` restricts to one).
pub fn thread_counts() -> Vec<usize> {
    match std::env::var("AMEND_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, 2],
    }
}

pub fn id(n: usize, v: usize) -> String {
    format!("{n}x{v}")
}

/// Criterion settings per tier: 10 samples; long measurement windows for the large tier, where
/// one libtorch iteration takes seconds.
pub fn configure(g: &mut BenchmarkGroup<'_, WallTime>, n: usize, v: usize, bytes_per_elem: u64) {
    let elems = (n * v) as u64;
    g.throughput(Throughput::ElementsAndBytes { elements: elems, bytes: bytes_per_elem * elems });
    g.sample_size(10);
    let (warm, meas) = match tier().as_str() {
        "large" => (5, 40),
        "medium" => (3, 15),
        _ => (2, 5),
    };
    g.warm_up_time(Duration::from_secs(warm));
    g.measurement_time(Duration::from_secs(meas));
}

/// TNT-style inputs: logits and reference logits `N(0, 2²)` as f32 tensors, labels uniform.
pub struct Inputs {
    pub v: usize,
    pub z: Tensor,
    pub zr: Tensor,
    pub labels: Tensor,
}

impl Inputs {
    pub fn new(n: usize, v: usize, seed: i64) -> Inputs {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let z = Tensor::randn([n as i64, v as i64], opts) * 2.0;
        let zr = Tensor::randn([n as i64, v as i64], opts) * 2.0;
        let labels = Tensor::randint(v as i64, [n as i64], (Kind::Int64, Device::Cpu));
        Inputs { v, z, zr, labels }
    }

    pub fn z(&self) -> CpuSlice<'_, f32> {
        CpuSlice::strict(&self.z, "bench", "logits").expect("contiguous CPU f32 by construction")
    }

    pub fn zr(&self) -> CpuSlice<'_, f32> {
        CpuSlice::strict(&self.zr, "bench", "ref_logits")
            .expect("contiguous CPU f32 by construction")
    }

    pub fn labels(&self) -> CpuSlice<'_, i64> {
        CpuSlice::strict(&self.labels, "bench", "labels")
            .expect("contiguous CPU i64 by construction")
    }
}

/// Asserts that two implementations agree before anything is timed (kernels spec §9.3): the loss
/// within `rel`, and the gradient rows `rows` within the f32 gradient tolerance (absolute 1e-6).
#[track_caller]
pub fn check_agree(
    what: &str,
    loss: (f64, f64),
    rel: f64,
    grads: Option<(&[f32], &[f32])>,
    v: usize,
) {
    let (a, b) = loss;
    assert!(
        (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-6,
        "{what}: losses disagree: {a} vs {b}"
    );
    if let Some((g1, g2)) = grads {
        let n = g1.len() / v;
        for r in [0, n / 2, n - 1] {
            for j in 0..v {
                let (x, y) = (g1[r * v + j], g2[r * v + j]);
                assert!((x - y).abs() <= 1e-6, "{what}: gradient row {r} col {j}: {x} vs {y}");
            }
        }
    }
}
