//! `amend-kernels` on its own, without libtorch: fused KL and TNT losses with their gradients on
//! plain `f32` slices and on `ndarray` arrays, checked against the crate's f64 oracles.
//!
//! ```text
//! cargo run -p amend-kernels --example fused_kernels
//! ```

use std::error::Error;

use amend_kernels::reference::{tnt_ref, token_kl_ref};
use amend_kernels::{
    KlDirection, KlTarget, LogitsIo, Reduction, TntKernelConfig, TntVariant, TokenKlConfig, tnt,
    token_kl,
};
use ndarray::Array2;

/// Two sequences of three positions, flattened to six rows of `[rows, vocab]` logits.
const ROWS: usize = 6;
const VOCAB: usize = 50;

fn main() -> Result<(), Box<dyn Error>> {
    // Deterministic logits with a realistic spread (a few logits well above the rest).
    let mut rng = SplitMix64(42);
    let z: Vec<f32> = (0..ROWS * VOCAB).map(|_| 3.0 * rng.normal()).collect();
    let z_ref: Vec<f32> = z.iter().map(|&v| v + 0.5 * rng.normal()).collect();
    // Labels: the model's own greedy tokens, as in TNT's setting (annotated generations).
    let labels: Vec<i64> = z.chunks(VOCAB).map(|row| argmax(row) as i64).collect();

    // 1. Distillation: forward KL(p° ‖ p) to the reference's softmax, value and gradient in one
    //    sweep. Nothing of size [rows, vocab] is allocated besides the gradient buffer.
    let target = KlTarget::Reference { ref_logits: &z_ref, exclude: None };
    let cfg = TokenKlConfig::default(); // forward, divergence (0 when p = p°)
    let (mut grad, mut loss) = (vec![0.0f32; ROWS * VOCAB], vec![0.0f32; ROWS]);
    let stats = token_kl(LogitsIo::grad(&z, &mut grad), VOCAB, target, None, &cfg, &mut loss)?;
    println!("forward KL(p°‖p) per row : {}", fmt_row(&loss));
    println!(
        "  sum {:.6} over {} rows, mean {:.6}",
        stats.sum,
        stats.count,
        Reduction::Mean.reduce_scalar(stats.sum_count(), 2)
    );
    // The gradient is p − p°: every row sums to zero.
    let max_row_sum = grad.chunks(VOCAB).map(|g| g.iter().sum::<f32>().abs()).fold(0.0, f32::max);
    println!("  max |Σ_v ∂ℓ/∂z_v| = {max_row_sum:.1e}");
    // Against the f64 oracle (simple, slow, obviously right).
    let to64 = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    let (z64, zr64) = (to64(&z), to64(&z_ref));
    let oracle = token_kl_ref(
        &z64,
        VOCAB,
        KlTarget::Reference { ref_logits: &zr64, exclude: None },
        None,
        &cfg,
    )?;
    check_oracle(&loss, &grad, &oracle)?;

    // 2. The same reverse KL(p ‖ p°) on 1 and 2 threads: rows are split over scoped threads and
    //    summed in row order in f64, so the results are bitwise identical.
    let rev = |threads: usize| -> Result<(Vec<f32>, f64), Box<dyn Error>> {
        let cfg =
            TokenKlConfig::default().with_direction(KlDirection::Reverse).with_threads(threads);
        let mut loss = vec![0.0f32; ROWS];
        let target = KlTarget::Reference { ref_logits: &z_ref, exclude: None };
        let stats = token_kl(LogitsIo::value(&z), VOCAB, target, None, &cfg, &mut loss)?;
        Ok((loss, stats.sum))
    };
    let ((l1, s1), (l2, s2)) = (rev(1)?, rev(2)?);
    println!("reverse KL(p‖p°) per row : {}", fmt_row(&l1));
    let same = l1 == l2 && s1.to_bits() == s2.to_bits();
    println!("  1 vs 2 threads bitwise identical: {same}");
    if !same {
        return Err("results depend on the thread count".into());
    }

    // 3. A whole TNT variant in one call: each row's term is picked by its weight
    //    (−1 = unwanted token, +1 = keep close to the reference, 0 = padding, never read).
    let weights = [1.0f32, 1.0, -1.0, 1.0, -1.0, 0.0];
    let tnt_cfg = TntKernelConfig::new(TntVariant::Tnrr).with_alpha(1.0);
    let (mut grad, mut loss) = (vec![0.0f32; ROWS * VOCAB], vec![0.0f32; ROWS]);
    let stats = tnt(
        LogitsIo::grad(&z, &mut grad),
        VOCAB,
        Some(&z_ref),
        &labels,
        &weights,
        &tnt_cfg,
        &mut loss,
    )?;
    println!("TNRR per row (w = {weights:?}): {}", fmt_row(&loss));
    println!(
        "  (sum, count) = ({:.6}, {}); Mean = {:.6}",
        stats.sum,
        stats.count,
        Reduction::Mean.reduce_scalar(stats.sum_count(), 2)
    );
    let w64 = to64(&weights);
    let oracle = tnt_ref(&z64, VOCAB, Some(&zr64), &labels, &w64, &tnt_cfg)?;
    check_oracle(&loss, &grad, &oracle)?;

    // 4. ndarray: a standard-layout Array2 is a row-major slice, so the kernels take it as is.
    //    Gradient descent on the logits themselves drives the unwanted tokens' probability down.
    let mut logits = Array2::from_shape_vec((ROWS, VOCAB), z.clone())?;
    let mut grad = Array2::<f32>::zeros((ROWS, VOCAB));
    let mut loss = vec![0.0f32; ROWS];
    let negatives: Vec<usize> = (0..ROWS).filter(|&r| weights[r] < 0.0).collect();
    for step in 0..=30 {
        let (Some(zs), Some(gs)) = (logits.as_slice(), grad.as_slice_mut()) else {
            return Err("arrays are not in standard (row-major, contiguous) layout".into());
        };
        let stats = tnt(
            LogitsIo::grad(zs, gs),
            VOCAB,
            Some(&z_ref),
            &labels,
            &weights,
            &tnt_cfg,
            &mut loss,
        )?;
        if step % 10 == 0 {
            let neg_mass: f32 = negatives
                .iter()
                .map(|&r| softmax_at(logits.row(r).as_slice().unwrap_or(&[]), labels[r] as usize))
                .sum::<f32>()
                / negatives.len() as f32;
            println!(
                "ndarray step {step:2}: TNRR mean {:.5}, mean p(unwanted) {neg_mass:.5}",
                stats.mean()
            );
        }
        logits.scaled_add(-1.0, &grad); // z ← z − η·∂ℓ/∂z with η = 1
    }

    // 5. In place (Liger's trick): the logits buffer is overwritten by its gradient, so a
    //    training step needs no second [rows, vocab] buffer.
    let mut buf = z.clone();
    let mut loss_ip = vec![0.0f32; ROWS];
    tnt(
        LogitsIo::in_place(&mut buf),
        VOCAB,
        Some(&z_ref),
        &labels,
        &weights,
        &tnt_cfg,
        &mut loss_ip,
    )?;
    let (mut grad, mut loss) = (vec![0.0f32; ROWS * VOCAB], vec![0.0f32; ROWS]);
    tnt(
        LogitsIo::grad(&z, &mut grad),
        VOCAB,
        Some(&z_ref),
        &labels,
        &weights,
        &tnt_cfg,
        &mut loss,
    )?;
    let same = buf == grad && loss_ip == loss;
    println!("in-place gradient equals the buffered one: {same}");
    if !same {
        return Err("the in-place gradient differs from the buffered one".into());
    }

    // 6. Bad input is a typed error, never a panic: here a label outside the vocabulary.
    let mut bad = labels.clone();
    bad[0] = VOCAB as i64;
    let err = tnt(LogitsIo::value(&z), VOCAB, Some(&z_ref), &bad, &weights, &tnt_cfg, &mut loss)
        .err()
        .ok_or("an out-of-range label was accepted")?;
    println!("out-of-range label: {err}");
    Ok(())
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

/// `softmax(z)_y`, stable.
fn softmax_at(z: &[f32], y: usize) -> f32 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = z.iter().map(|&v| (v - m).exp()).sum();
    z.get(y).map_or(0.0, |&v| (v - m).exp() / s)
}

/// Prints the largest deviation from the f64 oracle and fails beyond the f32 tolerance.
fn check_oracle(
    loss: &[f32],
    grad: &[f32],
    oracle: &amend_kernels::reference::RefOutput,
) -> Result<(), Box<dyn Error>> {
    let (dl, dg) = (max_abs_diff(loss, &oracle.loss), max_abs_diff(grad, &oracle.grad));
    println!("  vs f64 oracle: max |Δloss| = {dl:.1e}, max |Δgrad| = {dg:.1e}");
    if dl > 1e-4 || dg > 1e-5 {
        return Err(format!("kernel and oracle disagree: {dl:e}, {dg:e}").into());
    }
    Ok(())
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max)
}

fn fmt_row(xs: &[f32]) -> String {
    xs.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(" ")
}

/// A tiny deterministic generator (SplitMix64) so the example needs no `rand` dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        ((x >> 40) as f32 + 0.5) / (1u64 << 24) as f32 // in (0, 1)
    }

    /// Standard normal by Box–Muller.
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}
