//! Vectorised `exp`/`ln` and the row primitives the kernels are built from.
//!
//! This is the only module of the crate with `unsafe` code: the AVX2+FMA functions in `avx2`
//! are `#[target_feature]` functions, and calling them requires that the CPU has both features.
//! [`level`] checks that once with `is_x86_feature_detected!`; every call site below carries a
//! `// SAFETY:` comment pointing at that check. The unaligned loads and stores inside `avx2` act
//! on fixed-size array chunks of slices, so they cannot leave their buffers.
//!
//! # The exp
//!
//! ```text
//! exp(x) = 2ⁿ · P(r),   n = round(x·log₂e),   r = x − n·ln2   (Cody–Waite, ln2 split in two)
//! P      = degree-5 minimax polynomial on [−ln2/2, ln2/2], constant term exactly 1
//! 2ⁿ     : added to the exponent bits of P(r) (an integer shift and add, no multiply)
//! ```
//!
//! * Accuracy: at most **4 ulp** (measured ≤ 2.1 ulp) against f64 `exp` on `[−87.3, 0]`,
//!   checked by a property test on both the AVX2 and the portable path.
//! * `exp(0) = 1` exactly, `exp(−inf) = 0`, NaN propagates, `x > 88.72` gives `+inf`.
//! * Inputs below `−87.3` flush to exactly `0` by selection (their results would be subnormal).
//!   They are not clamped to a finite value: `exp(−87.3) ≈ 1.2e-38` is not 0, so a clamped
//!   `−inf` logit would pass a `q_v > 0` test and poison `q·(log q − log p)` with `−inf·0`.
//!
//! # Dispatch
//!
//! [`level`] picks [`SimdLevel::Avx2Fma`] when the CPU has AVX2 and FMA, and
//! [`SimdLevel::Portable`] otherwise. Setting the environment variable
//! `AMEND_KERNELS_SIMD=portable` before the first kernel call forces the portable path (used to
//! test it on AVX2 machines). The choice is made once per process.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
pub(crate) mod scalar;

use std::sync::OnceLock;

use crate::{KernelError, Result};

/// The instruction set the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SimdLevel {
    /// 8-lane AVX2 with fused multiply-add (x86-64).
    Avx2Fma,
    /// Plain Rust loops over the same polynomials, f64 row sums.
    Portable,
}

impl SimdLevel {
    /// A short name (`"avx2+fma"`, `"portable"`) for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Portable => "portable",
        }
    }
}

/// The instruction set selected for this process (detected once, see the module docs).
///
/// ```
/// let level = amend_kernels::simd::level();
/// println!("kernels run on {}", level.name());
/// ```
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> SimdLevel {
    if std::env::var("AMEND_KERNELS_SIMD").is_ok_and(|v| v.eq_ignore_ascii_case("portable")) {
        return SimdLevel::Portable;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return SimdLevel::Avx2Fma;
    }
    SimdLevel::Portable
}

#[inline]
fn avx2() -> bool {
    cfg!(target_arch = "x86_64") && level() == SimdLevel::Avx2Fma
}

/// Runs `$avx` (an expression calling `avx2::*`) when AVX2+FMA was detected, `$port` otherwise.
macro_rules! dispatch {
    ($avx:expr, $port:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: `avx2()` is true only when `level()` detected AVX2 and FMA on this CPU
            // (`detect`), which is the requirement of every `#[target_feature]` fn in `avx2`.
            return unsafe { $avx };
        }
        $port
    }};
}

/// `dst[i] = exp(src[i])` with the kernels' vectorised exp (see the module docs for accuracy
/// and special values).
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] if `dst` is not as long as `src`.
///
/// ```
/// let x = [0.0f32, -1.0, f32::NEG_INFINITY, -100.0];
/// let mut y = [0.0f32; 4];
/// amend_kernels::simd::exp_f32(&x, &mut y)?;
/// assert_eq!(y[0], 1.0);
/// assert!((y[1] - (-1.0f32).exp()).abs() < 1e-7);
/// assert_eq!(&y[2..], &[0.0, 0.0]); // −inf and inputs below −87.3 give exactly 0
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
pub fn exp_f32(src: &[f32], dst: &mut [f32]) -> Result<()> {
    exp_f32_on(level(), src, dst)
}

/// [`exp_f32`] on a given instruction set (for benchmarks and tests). Asking for
/// [`SimdLevel::Avx2Fma`] on a CPU without it runs the portable path.
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] if `dst` is not as long as `src`.
pub fn exp_f32_on(level: SimdLevel, src: &[f32], dst: &mut [f32]) -> Result<()> {
    check_len("exp_f32", "dst", src.len(), dst.len())?;
    if level == SimdLevel::Avx2Fma && self::level() == SimdLevel::Avx2Fma {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `self::level()` returned `Avx2Fma`, so AVX2 and FMA were detected.
            unsafe { avx2::exp_slice(src, dst) };
            return Ok(());
        }
    }
    portable::exp_slice(src, dst);
    Ok(())
}

/// `dst[i] = ln(src[i])` with the kernels' vectorised logarithm (Cephes polynomial, at most
/// 2 ulp on positive normal inputs; `ln 0 = −inf`, negative or NaN input gives NaN).
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] if `dst` is not as long as `src`.
pub fn ln_f32(src: &[f32], dst: &mut [f32]) -> Result<()> {
    ln_f32_on(level(), src, dst)
}

/// [`ln_f32`] on a given instruction set (see [`exp_f32_on`]).
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] if `dst` is not as long as `src`.
pub fn ln_f32_on(level: SimdLevel, src: &[f32], dst: &mut [f32]) -> Result<()> {
    check_len("ln_f32", "dst", src.len(), dst.len())?;
    if level == SimdLevel::Avx2Fma && self::level() == SimdLevel::Avx2Fma {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `self::level()` returned `Avx2Fma`, so AVX2 and FMA were detected.
            unsafe { avx2::ln_slice(src, dst) };
            return Ok(());
        }
    }
    portable::ln_slice(src, dst);
    Ok(())
}

fn check_len(op: &'static str, name: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { op, name, expected, got })
    }
}

/// Scalar `exp` matching the selected level's vector lanes (used for single elements).
#[inline]
pub(crate) fn exp1(x: f32) -> f32 {
    if avx2() { scalar::exp::<true>(x) } else { scalar::exp::<false>(x) }
}

// ---------------------------------------------------------------------------------------------
// Row primitives. Contracts are on the wrappers; lengths are checked by the callers (row code
// slices every buffer to the row length) and re-checked here in debug builds.

/// Result of a pass-A scan: maximum and minimum over the counted entries, and whether any
/// entry (counted or not) is NaN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scan {
    pub max: f32,
    pub min: f32,
    pub nan: bool,
}

impl Scan {
    pub const EMPTY: Scan = Scan { max: f32::NEG_INFINITY, min: f32::INFINITY, nan: false };

    #[inline(always)]
    pub fn push(&mut self, v: f32) {
        if v.is_nan() {
            self.nan = true;
        } else {
            self.max = self.max.max(v);
            self.min = self.min.min(v);
        }
    }

    #[inline(always)]
    pub fn push_masked(&mut self, v: f32, mask: f32) {
        if v.is_nan() {
            self.nan = true;
        } else if mask != f32::NEG_INFINITY {
            self.max = self.max.max(v);
            self.min = self.min.min(v);
        }
    }

    fn merge(self, o: Scan) -> Scan {
        Scan { max: self.max.max(o.max), min: self.min.min(o.min), nan: self.nan || o.nan }
    }

    /// Any NaN or `+inf` among the entries.
    pub fn bad(&self) -> bool {
        self.nan || self.max == f32::INFINITY
    }
}

fn scan_one(z: &[f32], mask: Option<&[f32]>) -> Scan {
    match mask {
        None => dispatch!(avx2::scan(z), portable::scan(z)),
        Some(m) => {
            debug_assert_eq!(m.len(), z.len());
            dispatch!(avx2::scan_masked(z, m), portable::scan_masked(z, m))
        }
    }
}

/// Max/min over `z` excluding index `skip` and (with `mask`) entries where `mask` is `−inf`;
/// NaN and `+inf` are reported for every entry (also `skip` and masked ones), so `bad()` flags
/// them.
pub(crate) fn scan(z: &[f32], skip: Option<usize>, mask: Option<&[f32]>) -> Scan {
    match skip {
        None => scan_one(z, mask),
        Some(y) => {
            let a = scan_one(&z[..y], mask.map(|m| &m[..y]));
            let b = scan_one(&z[y + 1..], mask.map(|m| &m[y + 1..]));
            let mut s = a.merge(b);
            if z[y].is_nan() {
                s.nan = true;
            }
            if z[y] == f32::INFINITY {
                // Keep `bad()` true without letting the skipped entry become the maximum.
                s.nan = true;
            }
            s
        }
    }
}

fn exp_sum_one(
    src: &[f32],
    mask: Option<&[f32]>,
    shift: f32,
    k: f32,
    dst: Option<&mut [f32]>,
    prefetch: usize,
) -> f32 {
    debug_assert!(mask.is_none_or(|m| m.len() == src.len()));
    debug_assert!(dst.as_ref().is_none_or(|d| d.len() == src.len()));
    dispatch!(
        match (dst, mask) {
            (Some(d), Some(m)) => avx2::exp_sum::<true, true>(src, m, shift, k, d, prefetch),
            (Some(d), None) => avx2::exp_sum::<true, false>(src, &[], shift, k, d, prefetch),
            (None, Some(m)) => avx2::exp_sum::<false, true>(src, m, shift, k, &mut [], prefetch),
            (None, None) => avx2::exp_sum::<false, false>(src, &[], shift, k, &mut [], prefetch),
        },
        portable::exp_sum(src, mask, shift, k, dst)
    )
}

/// [`exp_sum`] over a whole row (no skip, no mask) that also prefetches the next row, whose
/// address is `prefetch` (0 = none), while it computes.
pub(crate) fn exp_sum_pf(
    src: &[f32],
    shift: f32,
    k: f32,
    dst: Option<&mut [f32]>,
    prefetch: usize,
) -> f32 {
    exp_sum_one(src, None, shift, k, dst, prefetch)
}

/// `dst = exp((src − shift)·k)` (when given) and returns `Σ`, with entry `skip` excluded from the
/// sum and written as 0, and entries where `mask` is `−inf` treated likewise.
pub(crate) fn exp_sum(
    src: &[f32],
    mask: Option<&[f32]>,
    shift: f32,
    k: f32,
    dst: Option<&mut [f32]>,
    skip: Option<usize>,
) -> f32 {
    match skip {
        None => exp_sum_one(src, mask, shift, k, dst, 0),
        Some(y) => match dst {
            Some(d) => {
                let (d1, rest) = d.split_at_mut(y);
                let (dy, d2) = rest.split_at_mut(1);
                dy[0] = 0.0;
                let a = exp_sum_one(&src[..y], mask.map(|m| &m[..y]), shift, k, Some(d1), 0);
                let b =
                    exp_sum_one(&src[y + 1..], mask.map(|m| &m[y + 1..]), shift, k, Some(d2), 0);
                a + b
            }
            None => {
                let a = exp_sum_one(&src[..y], mask.map(|m| &m[..y]), shift, k, None, 0);
                let b = exp_sum_one(&src[y + 1..], mask.map(|m| &m[y + 1..]), shift, k, None, 0);
                a + b
            }
        },
    }
}

#[cfg(target_arch = "x86_64")]
type FwdB =
    unsafe fn(&[f32], f32, &[f32], f32, f32, &mut [f32], &mut [f32], [usize; 2]) -> (f32, f32, f32);

/// The monomorphised AVX2 pass B for the given flags (store, mask, kl, guard).
#[cfg(target_arch = "x86_64")]
fn fwd_b_avx2(store: bool, masked: bool, kl: bool, guard: bool) -> FwdB {
    macro_rules! pick {
        ($($s:literal $m:literal $k:literal $g:literal),* $(,)?) => {
            match (store, masked, kl, guard) {
                $(($s, $m, $k, $g) => avx2::fwd_b::<$s, $m, $k, $g> as FwdB,)*
            }
        };
    }
    pick!(
        true true true true, true true true false, true true false true, true true false false,
        true false true true, true false true false, true false false true, true false false false,
        false true true true, false true true false, false true false true, false true false false,
        false false true true, false false true false, false false false true, false false false false,
    )
}

/// Parameters of [`fwd_b`] besides the data: maxima `m`, `m°`, `k = 1/T`, the excluded token,
/// the flags, and the addresses of the next row's logits and reference logits to prefetch
/// (0 = none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FwdParams {
    pub m: f32,
    pub mr: f32,
    pub k: f32,
    pub skip: Option<usize>,
    pub masked: bool,
    pub kl: bool,
    pub guard: bool,
    pub prefetch: [usize; 2],
}

fn fwd_b_one(
    z: &[f32],
    zr: &[f32],
    p: &FwdParams,
    offset: usize,
    outs: Option<(&mut [f32], &mut [f32])>,
) -> (f32, f32, f32) {
    debug_assert_eq!(z.len(), zr.len());
    debug_assert!(outs.as_ref().is_none_or(|(a, b)| a.len() == z.len() && b.len() == z.len()));
    let guard = p.guard || p.masked;
    let pf =
        if p.prefetch[0] == 0 { [0, 0] } else { p.prefetch.map(|a| a.wrapping_add(4 * offset)) };
    dispatch!(
        {
            let f = fwd_b_avx2(outs.is_some(), p.masked, p.kl, guard);
            match outs {
                Some((e, er)) => f(z, p.m, zr, p.mr, p.k, e, er, pf),
                None => f(z, p.m, zr, p.mr, p.k, &mut [], &mut [], pf),
            }
        },
        portable::fwd_b(z, p.m, zr, p.mr, p.k, p.masked, p.kl, outs)
    )
}

/// Pass B of the forward KL row (spec §2.3), one sweep:
///
/// ```text
/// x = (z − m)·k,  x° = (z° − m°)·k,  e = exp(x),  e° = exp(x°)   (e° = 0 at `skip` and, with
///                                                                 `masked`, where z = −inf)
/// returns (Σ e, Σ e°, acc),  acc = Σ_{e° kept} e°·(x° − x)  (kl)   or   Σ e°·x  (cross-entropy)
/// ```
///
/// and stores `e`, `e°` into `outs` when given. `guard` is required when `z` or `z°` may hold
/// `−inf` (it keeps `0·inf` out of `acc`); `masked` implies it.
pub(crate) fn fwd_b(
    z: &[f32],
    zr: &[f32],
    p: &FwdParams,
    outs: Option<(&mut [f32], &mut [f32])>,
) -> (f32, f32, f32) {
    let Some(y) = p.skip else {
        return fwd_b_one(z, zr, p, 0, outs);
    };
    let ey = exp1((z[y] - p.m) * p.k);
    let (a, b) = match outs {
        Some((e, er)) => {
            let (e1, rest) = e.split_at_mut(y);
            let (ey_slot, e2) = rest.split_at_mut(1);
            let (er1, rest) = er.split_at_mut(y);
            let (ery_slot, er2) = rest.split_at_mut(1);
            ey_slot[0] = ey;
            ery_slot[0] = 0.0;
            let a = fwd_b_one(&z[..y], &zr[..y], p, 0, Some((e1, er1)));
            let b = fwd_b_one(&z[y + 1..], &zr[y + 1..], p, y + 1, Some((e2, er2)));
            (a, b)
        }
        None => (
            fwd_b_one(&z[..y], &zr[..y], p, 0, None),
            fwd_b_one(&z[y + 1..], &zr[y + 1..], p, y + 1, None),
        ),
    };
    (a.0 + ey + b.0, a.1 + b.1, a.2 + b.2)
}

/// Pass B against a precomputed log-target `lt`: `e = exp((z − m)·k)`, `q = exp(lt)`;
/// returns `(Σ e, Σ q, acc)` with `acc = Σ_{q>0} q·(lt − x)` (kl) or `Σ_{q>0} q·x`.
pub(crate) fn fwd_b_logq(
    z: &[f32],
    m: f32,
    k: f32,
    lt: &[f32],
    kl: bool,
    outs: Option<(&mut [f32], &mut [f32])>,
) -> (f32, f32, f32) {
    debug_assert_eq!(z.len(), lt.len());
    dispatch!(
        match (outs, kl) {
            (Some((e, q)), true) => avx2::fwd_b_logq::<true, true>(z, m, k, lt, e, q),
            (Some((e, q)), false) => avx2::fwd_b_logq::<true, false>(z, m, k, lt, e, q),
            (None, true) => avx2::fwd_b_logq::<false, true>(z, m, k, lt, &mut [], &mut []),
            (None, false) => avx2::fwd_b_logq::<false, false>(z, m, k, lt, &mut [], &mut []),
        },
        portable::fwd_b_logq(z, m, k, lt, kl, outs)
    )
}

/// `dst = a·x + b·y` with streaming stores where available (for destinations much larger than
/// the caches; see `avx2::axpby_stream`).
pub(crate) fn axpby_stream(a: f32, x: &[f32], b: f32, y: &[f32], dst: &mut [f32]) {
    debug_assert!(x.len() == dst.len() && y.len() == dst.len());
    dispatch!(avx2::axpby_stream(a, x, b, y, dst), portable::axpbyc(a, x, b, y, 0.0, None, dst))
}

/// `dst = a·x + b·y + c`, 0 where `mask` is `−inf`.
pub(crate) fn axpbyc(
    a: f32,
    x: &[f32],
    b: f32,
    y: &[f32],
    c: f32,
    mask: Option<&[f32]>,
    dst: &mut [f32],
) {
    debug_assert!(x.len() == dst.len() && y.len() == dst.len());
    dispatch!(
        match mask {
            Some(m) => avx2::axpbyc::<true>(a, x, b, y, c, m, dst),
            None => avx2::axpbyc::<false>(a, x, b, y, c, &[], dst),
        },
        portable::axpbyc(a, x, b, y, c, mask, dst)
    )
}

/// `dst = a·x + c`, 0 where `mask` is `−inf`.
pub(crate) fn axc(a: f32, x: &[f32], c: f32, mask: Option<&[f32]>, dst: &mut [f32]) {
    debug_assert_eq!(x.len(), dst.len());
    dispatch!(
        match mask {
            Some(m) => avx2::axc::<true>(a, x, c, m, dst),
            None => avx2::axc::<false>(a, x, c, &[], dst),
        },
        portable::axc(a, x, c, mask, dst)
    )
}

/// `buf = ln(a·buf + b) − c`.
pub(crate) fn ln_affine(buf: &mut [f32], a: f32, b: f32, c: f32) {
    dispatch!(avx2::ln_affine(buf, a, b, c), portable::ln_affine(buf, a, b, c))
}

/// Reverse-KL pass C: `t ← (z − m)·k − lns − t` (`t` holds `log d` on entry and `log p − log d`
/// on exit) and returns `Σ_{e>0} (e·inv_s)·t`. With `direct`, `t` holds the reference logits
/// `z°` on entry and `t ← (z − z°)·k − lns`, where the caller folds the row constants
/// `(m° − m)·k + ln s° − ln s` into `lns`: the difference of the logits is taken first, which
/// keeps `log p − log d` accurate when both are large.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rev_acc(
    direct: bool,
    z: &[f32],
    m: f32,
    k: f32,
    lns: f32,
    e: &[f32],
    inv_s: f32,
    t: &mut [f32],
) -> f32 {
    debug_assert!(z.len() == t.len() && e.len() == t.len());
    dispatch!(
        if direct {
            avx2::rev_acc::<true>(z, m, k, lns, e, inv_s, t)
        } else {
            avx2::rev_acc::<false>(z, m, k, lns, e, inv_s, t)
        },
        portable::rev_acc(direct, z, m, k, lns, e, inv_s, t)
    )
}

/// Reverse-KL pass D: `dst = a·(e·inv_s)·(t − l)`, 0 where `e = 0`.
pub(crate) fn rev_grad(e: &[f32], inv_s: f32, t: &[f32], l: f32, a: f32, dst: &mut [f32]) {
    debug_assert!(e.len() == dst.len() && t.len() == dst.len());
    dispatch!(avx2::rev_grad(e, inv_s, t, l, a, dst), portable::rev_grad(e, inv_s, t, l, a, dst))
}

/// `(#{z > −inf}, Σ_{z > −inf} (z − m)·k)`.
pub(crate) fn sum_shifted(z: &[f32], m: f32, k: f32) -> (usize, f32) {
    dispatch!(avx2::sum_shifted(z, m, k), portable::sum_shifted(z, m, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 100.0 - 10.0
            })
            .collect()
    }

    /// Streaming stores write exactly what the cached path writes, for every alignment of the
    /// destination and lengths around the vector width.
    #[test]
    fn axpby_stream_matches_axpbyc_at_any_alignment() {
        for len in [0usize, 1, 7, 8, 9, 31, 64, 1000] {
            let (x, y) = (data(len, 3), data(len, 5));
            for offset in 0..8 {
                let mut a = vec![f32::NAN; len + offset];
                let mut b = vec![f32::NAN; len + offset];
                axpby_stream(0.75, &x, -1.25, &y, &mut a[offset..]);
                axpbyc(0.75, &x, -1.25, &y, 0.0, None, &mut b[offset..]);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a[offset..]), bits(&b[offset..]), "len {len} offset {offset}");
            }
        }
    }

    /// The prefetching variants compute exactly what the plain ones compute.
    #[test]
    fn prefetch_hints_change_no_result() {
        let z = data(5000, 7);
        let zr = data(5000, 9);
        let (mut e1, mut e2) = (vec![0.0; 5000], vec![0.0; 5000]);
        let a = exp_sum_pf(&z, 10.0, 1.0, Some(&mut e1), zr.as_ptr() as usize);
        let b = exp_sum(&z, None, 10.0, 1.0, Some(&mut e2), None);
        assert_eq!(a.to_bits(), b.to_bits());
        assert_eq!(e1, e2);
        let mut p = FwdParams {
            m: 10.0,
            mr: 10.0,
            k: 1.0,
            skip: Some(17),
            masked: false,
            kl: true,
            guard: false,
            prefetch: [0, 0],
        };
        let plain = fwd_b(&z, &zr, &p, None);
        p.prefetch = [z.as_ptr() as usize, zr.as_ptr() as usize];
        let hinted = fwd_b(&z, &zr, &p, None);
        assert_eq!(plain, hinted);
    }
}
