//! Property tests of the fused kernels (tract-style problem structs).
//!
//! Inputs: `V` from 2 to 64, 1–5 rows, integer-valued logits in [−10, 10], optionally extreme
//! entries (±1e4) and `−inf` entries, labels anywhere (first and last column included), and
//! inactive rows filled with NaN/±inf and out-of-range labels. Properties: agreement with the f64
//! oracle, gradient = f64 finite differences, gradient rows summing to 0, KL ≥ 0 and
//! KL(p, p) = 0, invariance to a per-row constant, exact zeros at inactive rows, finite outputs
//! for finite inputs, and bitwise equality across thread counts and buffer modes.
//!
//! `ProptestConfig::with_cases(32)` by default; set `PROPTEST_CASES` for more.

mod common;

use amend_kernels::reference::{
    RefOutput, selected_logp_ref, tnt_ref, token_kl_ref, unlikelihood_ref,
};
use amend_kernels::{
    BatchStats, Candidates, KlDirection, KlTarget, KlValue, LogitsIo, SelectedLogpConfig,
    SelectedLogpOut, TntKernelConfig, TntVariant, TokenKlConfig, UnlikelihoodConfig, selected_logp,
    tnt, token_kl, unlikelihood,
};
use amend_testing::{F32, Tol};
use common::to_f64;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    ProptestConfig::with_cases(cases)
}

// --------------------------------------------------------------------------------------------
// Problems.

/// A batch of rows: logits, reference logits, labels, per-row activity.
#[derive(Debug, Clone)]
struct Batch {
    vocab: usize,
    z: Vec<f32>,
    zr: Vec<f32>,
    labels: Vec<i64>,
    active: Vec<bool>,
}

impl Batch {
    fn rows(&self) -> usize {
        self.labels.len()
    }
}

/// The kernel call under test.
#[derive(Debug, Clone)]
enum Kernel {
    Tnt(TntKernelConfig),
    Kl { cfg: TokenKlConfig, kind: u8, exclude: bool },
    Ce(SelectedLogpConfig),
    Ul { alpha: f64, nll: bool, cands: Vec<Vec<i64>> },
}

#[derive(Debug, Clone)]
struct Problem {
    batch: Batch,
    kernel: Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Integer logits in [−10, 10].
    Plain,
    /// Plus ±1e4 and −inf entries.
    Extreme,
    /// Plus ±1e4 entries, all finite.
    Large,
}

fn logit(mode: Mode) -> BoxedStrategy<f32> {
    let int = (-10i32..=10).prop_map(|v| v as f32);
    match mode {
        Mode::Plain => int.boxed(),
        Mode::Extreme => prop_oneof![
            10 => int,
            1 => Just(1e4f32),
            1 => Just(-1e4f32),
            2 => Just(f32::NEG_INFINITY),
        ]
        .boxed(),
        Mode::Large => prop_oneof![6 => int, 1 => Just(1e4f32), 1 => Just(-1e4f32)].boxed(),
    }
}

fn garbage() -> impl Strategy<Value = f32> {
    prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), Just(3.0f32)]
}

fn batch(mode: Mode) -> impl Strategy<Value = Batch> {
    (2usize..=64, 1usize..=5).prop_flat_map(move |(vocab, rows)| {
        let n = vocab * rows;
        (
            prop::collection::vec(logit(mode), n),
            prop::collection::vec(logit(Mode::Plain), n),
            prop::collection::vec(prop_oneof![Just(0usize), Just(vocab - 1), 0..vocab], rows),
            prop::collection::vec(prop::bool::weighted(0.8), rows),
            prop::collection::vec(garbage(), n),
        )
            .prop_map(move |(mut z, zr, labels, active, junk)| {
                let mut out_labels = Vec::with_capacity(rows);
                for r in 0..rows {
                    let row = &mut z[r * vocab..(r + 1) * vocab];
                    let y = labels[r];
                    if active[r] {
                        // The label column and one other column stay finite, so that every
                        // target (with or without the label) has mass on the row vocabulary.
                        if !row[y].is_finite() {
                            row[y] = 1.0;
                        }
                        let other = (y + 1) % vocab;
                        if !row[other].is_finite() {
                            row[other] = -2.0;
                        }
                        out_labels.push(y as i64);
                    } else {
                        row.copy_from_slice(&junk[r * vocab..(r + 1) * vocab]);
                        out_labels.push(999);
                    }
                }
                Batch { vocab, z, zr, labels: out_labels, active }
            })
    })
}

fn variant() -> impl Strategy<Value = TntVariant> {
    prop_oneof![
        Just(TntVariant::Tnff),
        Just(TntVariant::Tnrr),
        Just(TntVariant::Tnrf),
        Just(TntVariant::Tnfll),
        Just(TntVariant::Tnrll),
        Just(TntVariant::Nl { threshold: Some(-3.0) }),
        Just(TntVariant::Nl { threshold: None }),
        Just(TntVariant::UlAnnotated),
    ]
}

fn kernel(b: &Batch) -> BoxedStrategy<Kernel> {
    let rows = b.rows();
    let vocab = b.vocab as i64;
    let tntk = (
        variant(),
        prop_oneof![Just(0.5), Just(1.0), Just(2.0)],
        prop_oneof![Just(1e-6), Just(1e-3)],
    )
        .prop_map(|(v, a, e)| {
            Kernel::Tnt(TntKernelConfig::new(v).with_alpha(a).with_smoothing_eps(e))
        });
    let kl = (
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        any::<bool>(),
        prop_oneof![Just(0.0), Just(1e-3)],
        prop_oneof![Just(1.0), Just(0.5), Just(2.0)],
    )
        .prop_map(|(rev, div, kind, exclude, eps, t)| {
            // Reverse KL needs ε > 0 with a one-hot or token-excluding target.
            let eps = if rev && (kind == 1 || (kind == 0 && exclude)) { 1e-3 } else { eps };
            let cfg = TokenKlConfig::default()
                .with_direction(if rev { KlDirection::Reverse } else { KlDirection::Forward })
                .with_value(if div { KlValue::Divergence } else { KlValue::CrossEntropy })
                .with_smoothing_eps(eps)
                .with_temperature(t);
            Kernel::Kl { cfg, kind, exclude }
        });
    let ce = (
        prop_oneof![Just(0.0), Just(0.1)],
        prop_oneof![Just(0.0), Just(1e-3)],
        prop_oneof![Just(None), Just(Some(4.0))],
        prop_oneof![Just(1.0), Just(2.0)],
    )
        .prop_map(|(ls, zl, cap, t)| {
            Kernel::Ce(
                SelectedLogpConfig::default()
                    .with_label_smoothing(ls)
                    .with_lse_square_scale(zl)
                    .with_softcap(cap)
                    .with_temperature(t),
            )
        });
    let ul = (
        prop_oneof![Just(0.5), Just(1.0)],
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(-1i64..vocab, 0..4), rows),
    )
        .prop_map(|(alpha, nll, cands)| Kernel::Ul { alpha, nll, cands });
    prop_oneof![3 => tntk, 3 => kl, 2 => ce, 2 => ul].boxed()
}

fn problem(mode: Mode) -> impl Strategy<Value = Problem> {
    batch(mode).prop_flat_map(|b| {
        let k = kernel(&b);
        (Just(b), k).prop_map(|(batch, kernel)| Problem { batch, kernel })
    })
}

// --------------------------------------------------------------------------------------------
// Running a problem.

fn weights(b: &Batch) -> Vec<f32> {
    // Alternate negative and positive active rows.
    b.active
        .iter()
        .enumerate()
        .map(|(r, &a)| {
            if !a {
                0.0
            } else if r % 2 == 0 {
                -1.0
            } else {
                1.0
            }
        })
        .collect()
}

fn row_scale(b: &Batch) -> Vec<f32> {
    b.active
        .iter()
        .enumerate()
        .map(|(r, &a)| {
            if !a {
                0.0
            } else if r % 3 == 1 {
                0.5
            } else {
                1.0
            }
        })
        .collect()
}

fn csr(cands: &[Vec<i64>]) -> (Vec<usize>, Vec<i64>) {
    let mut offsets = vec![0];
    let mut ids = Vec::new();
    for c in cands {
        ids.extend(c);
        offsets.push(ids.len());
    }
    (offsets, ids)
}

/// Log-probabilities of `zr` over the row vocabulary of `z` (the precomputed target of kind 2;
/// `−inf` where `z` is `−inf`, so that the target has no mass outside the row vocabulary), in f32.
fn log_target(b: &Batch) -> Vec<f32> {
    let mut out = b.zr.clone();
    for (row, z) in out.chunks_mut(b.vocab).zip(b.z.chunks(b.vocab)) {
        for (v, &zv) in row.iter_mut().zip(z) {
            if zv == f32::NEG_INFINITY {
                *v = f32::NEG_INFINITY;
            }
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = row.iter().map(|&v| f64::from(v - m).exp()).sum();
        for v in row.iter_mut() {
            *v = (f64::from(*v - m) - s.ln()) as f32;
        }
    }
    out
}

/// Runs the kernel on `z` with the given buffers; returns the stats.
fn run_kernel(
    p: &Problem,
    z: &[f32],
    io: LogitsIo<'_>,
    loss: &mut [f32],
    threads: usize,
) -> BatchStats {
    let b = &p.batch;
    let _ = z;
    let exclude: Vec<i64> =
        b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -1 }).collect();
    let lt = log_target(b);
    let scale = row_scale(b);
    match &p.kernel {
        Kernel::Tnt(c) => {
            let w = weights(b);
            tnt(io, b.vocab, Some(&b.zr), &b.labels, &w, &c.with_threads(threads), loss).unwrap()
        }
        Kernel::Kl { cfg, kind, exclude: ex } => {
            let labels: Vec<i64> =
                b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -100 }).collect();
            let target = match kind {
                0 => KlTarget::Reference { ref_logits: &b.zr, exclude: ex.then_some(&exclude[..]) },
                1 => KlTarget::OneHot { labels: &labels },
                _ => KlTarget::LogProbs { log_target: &lt },
            };
            token_kl(io, b.vocab, target, Some(&scale), &cfg.with_threads(threads), loss).unwrap()
        }
        Kernel::Ce(c) => {
            let labels: Vec<i64> =
                b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -100 }).collect();
            selected_logp(
                io,
                b.vocab,
                &labels,
                Some(&scale),
                &c.with_threads(threads),
                SelectedLogpOut::new(loss),
            )
            .unwrap()
        }
        Kernel::Ul { alpha, nll, cands } => {
            let (offsets, ids) = csr(cands);
            let labels = nll.then_some(&b.labels[..]);
            let c = UnlikelihoodConfig::default().with_alpha(*alpha).with_threads(threads);
            unlikelihood(
                io,
                b.vocab,
                labels,
                Candidates::Csr { offsets: &offsets, ids: &ids },
                Some(&scale),
                &c,
                loss,
            )
            .unwrap()
        }
    }
}

/// Fused kernel, gradient mode: (loss, grad, stats).
fn fused(p: &Problem, threads: usize) -> (Vec<f32>, Vec<f32>, BatchStats) {
    let z = p.batch.z.clone();
    let mut g = vec![f32::NAN; z.len()];
    let mut l = vec![f32::NAN; p.batch.rows()];
    let s = run_kernel(p, &z, LogitsIo::grad(&z, &mut g), &mut l, threads);
    (l, g, s)
}

/// The f64 oracle on the same (f32) inputs, optionally with perturbed logits.
fn oracle(p: &Problem, z: &[f64]) -> RefOutput {
    let b = &p.batch;
    let zr = to_f64(&b.zr);
    let scale = to_f64(&row_scale(b));
    let exclude: Vec<i64> =
        b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -1 }).collect();
    match &p.kernel {
        Kernel::Tnt(c) => {
            tnt_ref(z, b.vocab, Some(&zr), &b.labels, &to_f64(&weights(b)), c).unwrap()
        }
        Kernel::Kl { cfg, kind, exclude: ex } => {
            let labels: Vec<i64> =
                b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -100 }).collect();
            let lt = to_f64(&log_target(b));
            let target = match kind {
                0 => {
                    KlTarget::Reference { ref_logits: &zr[..], exclude: ex.then_some(&exclude[..]) }
                }
                1 => KlTarget::OneHot { labels: &labels },
                _ => KlTarget::LogProbs { log_target: &lt[..] },
            };
            token_kl_ref(z, b.vocab, target, Some(&scale), cfg).unwrap()
        }
        Kernel::Ce(c) => {
            let labels: Vec<i64> =
                b.labels.iter().zip(&b.active).map(|(&l, &a)| if a { l } else { -100 }).collect();
            selected_logp_ref(z, b.vocab, &labels, Some(&scale), c).unwrap()
        }
        Kernel::Ul { alpha, nll, cands } => {
            let (offsets, ids) = csr(cands);
            let labels = nll.then_some(&b.labels[..]);
            let c = UnlikelihoodConfig::default().with_alpha(*alpha);
            unlikelihood_ref(
                z,
                b.vocab,
                labels,
                Candidates::Csr { offsets: &offsets, ids: &ids },
                Some(&scale),
                &c,
            )
            .unwrap()
        }
    }
}

/// The largest gradient multiplier of the problem (α, 1/T, z-loss): gradient tolerances scale
/// with it.
fn grad_scale(p: &Problem) -> f64 {
    match &p.kernel {
        Kernel::Tnt(c) => c.alpha.max(1.0),
        Kernel::Kl { cfg, .. } => (1.0 / cfg.temperature).max(1.0),
        Kernel::Ce(c) => (1.0 / c.temperature).max(1.0) * (1.0 + 2.0 * c.lse_square_scale * 30.0),
        Kernel::Ul { alpha, .. } => 1.0 + 2.0 * alpha * 4.0,
    }
}

/// Reverse-KL gradients `p ⊙ (log p − log t − KL)` take the difference of quantities as large
/// as the log-ratio range, so their f32 error is about `2⁻²³·p·max|log p − log t|`: the
/// tolerance grows with the logit range `R` (a bound on that log-ratio).
fn reverse_factor(p: &Problem) -> f64 {
    let reverse = match &p.kernel {
        Kernel::Tnt(c) => {
            matches!(c.variant, TntVariant::Tnrr | TntVariant::Tnrf | TntVariant::Tnrll)
        }
        Kernel::Kl { cfg, .. } => cfg.direction == KlDirection::Reverse,
        _ => false,
    };
    if !reverse {
        return 1.0;
    }
    let k = match &p.kernel {
        Kernel::Kl { cfg, .. } => 1.0 / cfg.temperature,
        _ => 1.0,
    };
    let range = |xs: &[f32]| {
        let f = xs.iter().filter(|v| v.is_finite());
        let (lo, hi) =
            f.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        f64::from(hi - lo).max(0.0)
    };
    let z: Vec<f32> = p
        .batch
        .z
        .chunks(p.batch.vocab)
        .zip(&p.batch.active)
        .filter(|(_, a)| **a)
        .flat_map(|(r, _)| r.to_vec())
        .collect();
    let r = (range(&z) + range(&p.batch.zr)) * k + 14.0; // + |log ε| for smoothed targets
    (r / 10.0).max(1.0)
}

/// Whether every row's target is normalised (and no softcap chain factor applies), so that each
/// gradient row sums to 0.
fn grad_sums_to_zero(p: &Problem) -> bool {
    match &p.kernel {
        Kernel::Ce(c) => c.lse_square_scale == 0.0 && c.softcap.is_none(),
        Kernel::Kl { kind, .. } => *kind != 2,
        _ => true,
    }
}

fn finite_rows(p: &Problem) -> bool {
    p.batch
        .z
        .chunks(p.batch.vocab)
        .zip(&p.batch.active)
        .all(|(r, &a)| !a || r.iter().all(|v| v.is_finite()))
}

// --------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config())]

    /// Fused = oracle within the f32 tolerances, on plain and extreme inputs; outputs are finite.
    #[test]
    fn fused_matches_oracle(p in prop_oneof![problem(Mode::Plain), problem(Mode::Extreme)]) {
        let (l, g, stats) = fused(&p, 1);
        let o = oracle(&p, &to_f64(&p.batch.z));
        let gs = grad_scale(&p);
        let big = p.batch.z.iter().any(|v| v.abs() >= 1e4 && v.is_finite());
        // With ±1e4 logits, loss terms of size 1e4 cancel in f32; scale the absolute part.
        let ltol = if big { Tol { rel: 1e-5, abs: 2e-3 } } else { F32 };
        let gtol = Tol { rel: 0.0, abs: 1e-6 * gs * reverse_factor(&p) * if big { 4.0 } else { 1.0 } };
        for (r, &a) in p.batch.active.iter().enumerate() {
            let v = p.batch.vocab;
            prop_assert!(ltol.close(f64::from(l[r]), o.loss[r]), "row {r}: loss {} vs {}", l[r], o.loss[r]);
            for j in 0..v {
                let (x, e) = (f64::from(g[r * v + j]), o.grad[r * v + j]);
                prop_assert!(gtol.close(x, e), "row {r} col {j}: grad {x} vs {e}");
                if !a {
                    prop_assert_eq!(g[r * v + j].to_bits(), 0);
                }
            }
            if !a {
                prop_assert_eq!(l[r].to_bits(), 0);
            }
            prop_assert!(l[r].is_finite(), "row {r}: loss {}", l[r]);
        }
        prop_assert!(g.iter().all(|v| v.is_finite()));
        prop_assert_eq!(stats.count, o.count);
        prop_assert!(ltol.close(stats.sum, o.sum) || (stats.sum - o.sum).abs() < 1e-5 * p.batch.rows() as f64);
    }

    /// The gradient equals central finite differences (h = 1e-5) of the f64 oracle's loss, for
    /// the oracle itself (≤ 1e-7) and for the fused f32 kernel.
    #[test]
    fn gradient_matches_finite_differences(p in problem(Mode::Plain)) {
        let (_, g, _) = fused(&p, 1);
        let z0 = to_f64(&p.batch.z);
        let o = oracle(&p, &z0);
        let v = p.batch.vocab;
        let h = 1e-5;
        let gs = grad_scale(&p) * reverse_factor(&p);
        for r in (0..p.batch.rows()).filter(|&r| p.batch.active[r]) {
            for j in 0..v {
                let i = r * v + j;
                if !z0[i].is_finite() {
                    continue;
                }
                let (mut zp, mut zm) = (z0.clone(), z0.clone());
                zp[i] += h;
                zm[i] -= h;
                let fd = (oracle(&p, &zp).loss[r] - oracle(&p, &zm).loss[r]) / (2.0 * h);
                // The NL floor is a kink: skip entries whose step crosses it.
                if let Kernel::Tnt(TntKernelConfig { variant: TntVariant::Nl { .. }, .. }) = p.kernel
                    && (oracle(&p, &zp).grad[i] == 0.0) != (oracle(&p, &zm).grad[i] == 0.0)
                {
                    continue;
                }
                prop_assert!((o.grad[i] - fd).abs() <= 1e-7 * grad_scale(&p), "oracle row {r} col {j}: {} vs fd {fd}", o.grad[i]);
                prop_assert!((f64::from(g[i]) - fd).abs() <= 1.5e-6 * gs, "fused row {r} col {j}: {} vs fd {fd}", g[i]);
            }
        }
    }

    /// Gradient rows sum to 0 for normalised targets.
    #[test]
    fn gradient_rows_sum_to_zero(p in prop_oneof![problem(Mode::Plain), problem(Mode::Extreme)]) {
        prop_assume!(grad_sums_to_zero(&p));
        let (_, g, _) = fused(&p, 1);
        let v = p.batch.vocab;
        for r in 0..p.batch.rows() {
            let s: f64 = g[r * v..(r + 1) * v].iter().map(|&x| f64::from(x)).sum();
            prop_assert!(s.abs() <= 4e-6 * grad_scale(&p) * (v as f64).sqrt(), "row {r}: Σ g = {s}");
        }
    }

    /// Adding a constant to a row (of the logits and, separately, of the reference) changes
    /// nothing beyond rounding.
    #[test]
    fn invariant_to_row_constant(p in problem(Mode::Plain), c in prop_oneof![Just(-7.0f32), Just(3.0f32), Just(64.0f32)]) {
        // Softcapping and the z-loss are not shift invariant.
        prop_assume!(!matches!(&p.kernel, Kernel::Ce(c) if c.softcap.is_some() || c.lse_square_scale > 0.0));
        let (l0, g0, _) = fused(&p, 1);
        let mut q = p.clone();
        for v in q.batch.z.iter_mut() {
            *v += c;
        }
        for v in q.batch.zr.iter_mut() {
            *v -= c;
        }
        let (l1, g1, _) = fused(&q, 1);
        let gs = grad_scale(&p);
        for (a, b) in l0.iter().zip(&l1) {
            prop_assert!(Tol { rel: 1e-5, abs: 1e-5 }.close(f64::from(*a), f64::from(*b)), "{a} vs {b}");
        }
        for (a, b) in g0.iter().zip(&g1) {
            prop_assert!((a - b).abs() as f64 <= 2e-6 * gs, "{a} vs {b}");
        }
    }

    /// Inactive rows are exactly zero and never read: replacing their contents (garbage,
    /// out-of-range labels) by zeros changes no bit of any output.
    #[test]
    fn inactive_rows_are_exact_zeros_and_unread(p in problem(Mode::Extreme)) {
        let (l0, g0, s0) = fused(&p, 1);
        let mut q = p.clone();
        for r in (0..q.batch.rows()).filter(|&r| !q.batch.active[r]) {
            let v = q.batch.vocab;
            q.batch.z[r * v..(r + 1) * v].fill(0.0);
            q.batch.labels[r] = 0;
        }
        let (l1, g1, s1) = fused(&q, 1);
        prop_assert_eq!(bits(&l0), bits(&l1));
        prop_assert_eq!(bits(&g0), bits(&g1));
        prop_assert_eq!(s0, s1);
    }

    /// 1, 2 and 3 threads, gradient / in-place / value-only modes: bitwise identical.
    #[test]
    fn threads_and_modes_are_bitwise_identical(p in problem(Mode::Extreme)) {
        let (l1, g1, s1) = fused(&p, 1);
        for t in [2, 3] {
            let (l, g, s) = fused(&p, t);
            prop_assert_eq!(bits(&l), bits(&l1));
            prop_assert_eq!(bits(&g), bits(&g1));
            prop_assert_eq!(s.sum.to_bits(), s1.sum.to_bits());
            prop_assert_eq!(s.count, s1.count);
        }
        let mut zi = p.batch.z.clone();
        let mut li = vec![0.0; p.batch.rows()];
        let z = p.batch.z.clone();
        run_kernel(&p, &z, LogitsIo::in_place(&mut zi), &mut li, 2);
        prop_assert_eq!(bits(&li), bits(&l1));
        prop_assert_eq!(bits(&zi), bits(&g1));
        let mut lv = vec![0.0; p.batch.rows()];
        run_kernel(&p, &z, LogitsIo::value(&z), &mut lv, 1);
        prop_assert_eq!(bits(&lv), bits(&l1));
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// KL ≥ 0, and KL(p, p) = 0 with a zero gradient, for every target that can equal `p`.
#[test]
fn kl_is_nonnegative_and_zero_at_the_target() {
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&batch(Mode::Extreme), |b| {
            let scale = row_scale(&b);
            for dir in [KlDirection::Forward, KlDirection::Reverse] {
                let cfg = TokenKlConfig::default().with_direction(dir);
                // Target = the logits themselves: value 0, gradient 0.
                let z = b.z.clone();
                let (mut g, mut l) = (vec![0.0; z.len()], vec![0.0; b.rows()]);
                let t = KlTarget::Reference { ref_logits: &z, exclude: None };
                let zclean: Vec<f32> = z
                    .chunks(b.vocab)
                    .zip(&b.active)
                    .flat_map(|(r, &a)| if a { r.to_vec() } else { vec![0.0; r.len()] })
                    .collect();
                let t_clean = KlTarget::Reference { ref_logits: &zclean, exclude: None };
                let _ = t;
                token_kl(LogitsIo::grad(&z, &mut g), b.vocab, t_clean, Some(&scale), &cfg, &mut l)
                    .unwrap();
                prop_assert!(l.iter().all(|v| v.abs() <= 1e-5), "{dir:?} KL(p,p) = {l:?}");
                prop_assert!(g.iter().all(|v| v.abs() <= 1e-6), "{dir:?} grad at p = t: {g:?}");
                // Any other reference: KL ≥ 0 (up to rounding).
                let t = KlTarget::Reference { ref_logits: &b.zr, exclude: None };
                token_kl(LogitsIo::value(&z), b.vocab, t, Some(&scale), &cfg, &mut l).unwrap();
                prop_assert!(l.iter().all(|v| *v >= -1e-5), "{dir:?} KL = {l:?}");
            }
            Ok(())
        })
        .unwrap();
}

/// Finite inputs give finite outputs for every kernel, including extreme logits.
#[test]
fn finite_inputs_give_finite_outputs() {
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&problem(Mode::Large), |p| {
            prop_assert!(finite_rows(&p));
            let (l, g, _) = fused(&p, 1);
            prop_assert!(l.iter().chain(&g).all(|v| v.is_finite()));
            Ok(())
        })
        .unwrap();
}

/// Rows at realistic vocabulary sizes (several summation blocks, ragged tails) agree with the
/// oracle: the f32 row sums stay accurate at V = 50257 and 128256.
#[test]
fn large_vocabularies_match_oracle() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for vocab in [1023usize, 4099, 50257, 128_256] {
        let rows = 2;
        let z: Vec<f32> = (0..rows * vocab).map(|_| ((next() - 0.5) * 16.0) as f32).collect();
        let zr: Vec<f32> = (0..rows * vocab).map(|_| ((next() - 0.5) * 16.0) as f32).collect();
        let labels = [0i64, vocab as i64 - 1];
        let (z64, zr64) = (to_f64(&z), to_f64(&zr));
        for v in [
            TntVariant::Tnff,
            TntVariant::Tnrr,
            TntVariant::Tnrf,
            TntVariant::Tnrll,
            TntVariant::UlAnnotated,
        ] {
            let c = TntKernelConfig::new(v).with_alpha(1.0);
            for w in [[-1.0f32, 1.0], [1.0, -1.0]] {
                let (mut g, mut l) = (vec![0.0; z.len()], vec![0.0; rows]);
                tnt(LogitsIo::grad(&z, &mut g), vocab, Some(&zr), &labels, &w, &c, &mut l).unwrap();
                let o = tnt_ref(&z64, vocab, Some(&zr64), &labels, &to_f64(&w), &c).unwrap();
                F32.assert_all_close(&format!("{v:?} V={vocab} loss"), &to_f64(&l), &o.loss);
                Tol { rel: 0.0, abs: 1e-6 }.assert_all_close(
                    &format!("{v:?} V={vocab} grad"),
                    &to_f64(&g),
                    &o.grad,
                );
            }
        }
        let c = SelectedLogpConfig::default().with_label_smoothing(0.1);
        let (mut g, mut l) = (vec![0.0; z.len()], vec![0.0; rows]);
        selected_logp(
            LogitsIo::grad(&z, &mut g),
            vocab,
            &labels,
            None,
            &c,
            SelectedLogpOut::new(&mut l),
        )
        .unwrap();
        let o = selected_logp_ref(&z64, vocab, &labels, None, &c).unwrap();
        F32.assert_all_close(&format!("CE V={vocab} loss"), &to_f64(&l), &o.loss);
        Tol { rel: 0.0, abs: 1e-6 }.assert_all_close(
            &format!("CE V={vocab} grad"),
            &to_f64(&g),
            &o.grad,
        );
    }
}

/// Gradients larger than 64 MiB are written with streaming stores; they equal, bit for bit, the
/// in-place results (which use ordinary stores), for the forward KL and the cross-entropy.
#[test]
fn streamed_gradients_match_cached_ones() {
    let (rows, vocab) = (340usize, 50257usize);
    let n = rows * vocab;
    let z: Vec<f32> = (0..n)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 200.0 - 5.0)
        .collect();
    let zr: Vec<f32> =
        (0..n).map(|i| ((i.wrapping_mul(40_503) >> 3) % 1999) as f32 / 250.0 - 4.0).collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| (r * 7919) % vocab as i64).collect();
    let (mut g, mut l1, mut l2) = (vec![0.0f32; n], vec![0.0f32; rows], vec![0.0f32; rows]);
    let mut zi = z.clone();
    let cfg = TokenKlConfig::default();
    let t = KlTarget::Reference { ref_logits: &zr, exclude: Some(&labels) };
    token_kl(LogitsIo::grad(&z, &mut g), vocab, t, None, &cfg, &mut l1).unwrap();
    token_kl(LogitsIo::in_place(&mut zi), vocab, t, None, &cfg, &mut l2).unwrap();
    assert_eq!(bits(&l1), bits(&l2));
    assert!(g == zi, "token_kl: streamed and cached gradients differ");
    let mut zi = z.clone();
    let c = SelectedLogpConfig::default();
    selected_logp(
        LogitsIo::grad(&z, &mut g),
        vocab,
        &labels,
        None,
        &c,
        SelectedLogpOut::new(&mut l1),
    )
    .unwrap();
    selected_logp(
        LogitsIo::in_place(&mut zi),
        vocab,
        &labels,
        None,
        &c,
        SelectedLogpOut::new(&mut l2),
    )
    .unwrap();
    assert_eq!(bits(&l1), bits(&l2));
    assert!(g == zi, "selected_logp: streamed and cached gradients differ");
}
