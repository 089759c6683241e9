//! AVX2 + FMA row primitives.
//!
//! Every function here is compiled with `avx2,fma` enabled (`#[target_feature]`). They are safe
//! to call from other functions of this module; callers outside it go through `super`, which
//! calls them only after `is_x86_feature_detected!` confirmed both features.
//!
//! Loops run over chunks of 16 elements (two vectors, two independent dependency chains) and sum
//! in two levels: vector accumulators per block of [`BLOCK`] elements, then across blocks, which
//! keeps f32 row sums accurate at `V = 256k`. The tail (`len % 16`) runs through the scalar
//! forms in [`super::scalar`] with `mul_add`, which match the vector lanes bit for bit.

use std::arch::x86_64::*;

use super::Scan;
use super::scalar::{
    self, EXP_C1, EXP_C2, EXP_C3, EXP_C4, EXP_C5, EXP_HI, EXP_LO, LN_P, LN2_HI, LN2_LO, LOG2E,
    MAGIC, SQRT_HALF,
};

/// Chunks of 16 per summation block (1024 elements).
const BLOCK16: usize = 64;

// ---------------------------------------------------------------------------------------------
// Loads, stores and horizontal reductions.

#[inline]
#[target_feature(enable = "avx2,fma")]
fn ld2(c: &[f32; 16]) -> (__m256, __m256) {
    // SAFETY: `c` is 16 initialised f32, so both 8-lane unaligned loads stay inside it.
    unsafe { (_mm256_loadu_ps(c.as_ptr()), _mm256_loadu_ps(c.as_ptr().add(8))) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn st2(c: &mut [f32; 16], a: __m256, b: __m256) {
    // SAFETY: `c` is 16 writable f32, so both 8-lane unaligned stores stay inside it.
    unsafe {
        _mm256_storeu_ps(c.as_mut_ptr(), a);
        _mm256_storeu_ps(c.as_mut_ptr().add(8), b);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn ld(c: &[f32; 8]) -> __m256 {
    // SAFETY: `c` is 8 initialised f32; the load is unaligned.
    unsafe { _mm256_loadu_ps(c.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn st(c: &mut [f32; 8], v: __m256) {
    // SAFETY: `c` is 8 writable f32; the store is unaligned.
    unsafe { _mm256_storeu_ps(c.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn splat(x: f32) -> __m256 {
    _mm256_set1_ps(x)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmin(v: __m256) -> f32 {
    let s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_min_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn not_neg_inf(v: __m256) -> __m256 {
    _mm256_cmp_ps::<_CMP_NEQ_OQ>(v, splat(f32::NEG_INFINITY))
}

// ---------------------------------------------------------------------------------------------
// exp and ln.

/// `exp(x)` for `x ≤ 88.3`, flushed to exactly 0 below [`EXP_LO`] (and for `−inf`, NaN).
/// Returns the value and the "kept" mask (`x ≥ EXP_LO`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> (__m256, __m256) {
    let t = _mm256_fmadd_ps(x, splat(LOG2E), splat(MAGIC));
    let n = _mm256_sub_ps(t, splat(MAGIC));
    let r = _mm256_fnmadd_ps(n, splat(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, splat(LN2_LO), r);
    let mut p = _mm256_fmadd_ps(splat(EXP_C5), r, splat(EXP_C4));
    p = _mm256_fmadd_ps(p, r, splat(EXP_C3));
    p = _mm256_fmadd_ps(p, r, splat(EXP_C2));
    p = _mm256_fmadd_ps(p, r, splat(EXP_C1));
    p = _mm256_fmadd_ps(p, r, splat(1.0));
    let scale = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
    let y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, splat(EXP_LO));
    (_mm256_and_ps(y, keep), keep)
}

/// Full-range `exp`: as [`exp8`], plus `+inf` above [`EXP_HI`] and NaN propagation.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8_full(x: __m256) -> __m256 {
    let (y, _) = exp8(x);
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(x, splat(EXP_HI));
    let y = _mm256_blendv_ps(y, splat(f32::INFINITY), big);
    _mm256_or_ps(y, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

/// Natural logarithm (Cephes polynomial); same specials as [`scalar::ln`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn ln8(x0: __m256) -> __m256 {
    let one = splat(1.0);
    let sub = _mm256_cmp_ps::<_CMP_LT_OQ>(x0, splat(f32::MIN_POSITIVE));
    let x = _mm256_blendv_ps(x0, _mm256_mul_ps(x0, splat(8_388_608.0)), sub);
    let bits = _mm256_castps_si256(x);
    let mut e =
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(126)));
    let m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x3f00_0000),
    ));
    let small = _mm256_cmp_ps::<_CMP_LT_OQ>(m, splat(SQRT_HALF));
    e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
    let m = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(m, small));
    e = _mm256_sub_ps(e, _mm256_and_ps(splat(23.0), sub));
    let z = _mm256_mul_ps(m, m);
    let mut y = splat(LN_P[0]);
    y = _mm256_fmadd_ps(y, m, splat(LN_P[1]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[2]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[3]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[4]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[5]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[6]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[7]));
    y = _mm256_fmadd_ps(y, m, splat(LN_P[8]));
    y = _mm256_mul_ps(y, _mm256_mul_ps(m, z));
    y = _mm256_fmadd_ps(e, splat(LN2_LO), y);
    y = _mm256_fnmadd_ps(splat(0.5), z, y);
    let r = _mm256_add_ps(m, y);
    let r = _mm256_fmadd_ps(e, splat(LN2_HI), r);
    // Specials: 0 → −inf, +inf → +inf, negative or NaN → NaN.
    let r = _mm256_blendv_ps(
        r,
        splat(f32::NEG_INFINITY),
        _mm256_cmp_ps::<_CMP_EQ_OQ>(x0, _mm256_setzero_ps()),
    );
    let r = _mm256_blendv_ps(
        r,
        splat(f32::INFINITY),
        _mm256_cmp_ps::<_CMP_EQ_OQ>(x0, splat(f32::INFINITY)),
    );
    _mm256_or_ps(r, _mm256_cmp_ps::<_CMP_NGE_UQ>(x0, _mm256_setzero_ps()))
}

// ---------------------------------------------------------------------------------------------
// Row primitives (see `super` for their contracts).

/// [`super::first_index_of`], the portable body compiled (auto-vectorised) for this level.
#[target_feature(enable = "avx2,fma")]
pub(super) fn first_index_of(z: &[f32], m: f32, mask: Option<&[f32]>) -> usize {
    super::first_index_of_body(z, m, mask)
}

/// [`super::weighted_diff_sum`], the portable body compiled (auto-vectorised) for this level.
#[target_feature(enable = "avx2,fma")]
pub(super) fn weighted_diff_sum(e: &[f32], a: &[f32], b: &[f32]) -> f64 {
    super::weighted_diff_sum_body(e, a, b)
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn scan(z: &[f32]) -> Scan {
    let (c, tail) = z.as_chunks::<16>();
    let ninf = splat(f32::NEG_INFINITY);
    let pinf = splat(f32::INFINITY);
    let (mut mx0, mut mx1, mut mn0, mut mn1) = (ninf, ninf, pinf, pinf);
    let mut bad = _mm256_setzero_ps();
    for ch in c {
        let (a, b) = ld2(ch);
        mx0 = _mm256_max_ps(mx0, a);
        mx1 = _mm256_max_ps(mx1, b);
        mn0 = _mm256_min_ps(mn0, a);
        mn1 = _mm256_min_ps(mn1, b);
        let nan =
            _mm256_or_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a), _mm256_cmp_ps::<_CMP_UNORD_Q>(b, b));
        bad = _mm256_or_ps(bad, nan);
    }
    let mut s = Scan {
        max: hmax(_mm256_max_ps(mx0, mx1)),
        min: hmin(_mm256_min_ps(mn0, mn1)),
        nan: _mm256_movemask_ps(bad) != 0,
    };
    for &v in tail {
        s.push(v);
    }
    s
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn scan_masked(zr: &[f32], z: &[f32]) -> Scan {
    let (c, tail) = zr.as_chunks::<16>();
    let (cz, tz) = z.as_chunks::<16>();
    let cz = &cz[..c.len()];
    let ninf = splat(f32::NEG_INFINITY);
    let pinf = splat(f32::INFINITY);
    let (mut mx, mut mn, mut bad) = (ninf, pinf, _mm256_setzero_ps());
    for (ch, chz) in c.iter().zip(cz) {
        let (a, b) = ld2(ch);
        let (za, zb) = ld2(chz);
        let (ka, kb) = (not_neg_inf(za), not_neg_inf(zb));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, a, ka));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, b, kb));
        mn = _mm256_min_ps(mn, _mm256_blendv_ps(pinf, a, ka));
        mn = _mm256_min_ps(mn, _mm256_blendv_ps(pinf, b, kb));
        let nan =
            _mm256_or_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a), _mm256_cmp_ps::<_CMP_UNORD_Q>(b, b));
        bad = _mm256_or_ps(bad, nan);
    }
    let mut s = Scan { max: hmax(mx), min: hmin(mn), nan: _mm256_movemask_ps(bad) != 0 };
    for (&v, &zv) in tail.iter().zip(tz) {
        s.push_masked(v, zv);
    }
    s
}

/// `dst = exp((src − shift)·k)` (if `STORE`), masked to 0 where `mask` is `−inf` (if `MASK`);
/// returns the sum.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_sum<const STORE: bool, const MASK: bool>(
    src: &[f32],
    mask: &[f32],
    shift: f32,
    k: f32,
    dst: &mut [f32],
    prefetch: usize,
) -> f32 {
    let (c, tail) = src.as_chunks::<16>();
    let n = c.len();
    let cm = if MASK { &mask.as_chunks::<16>().0[..n] } else { &[][..] };
    let cd = if STORE { &mut dst.as_chunks_mut::<16>().0[..n] } else { &mut [][..] };
    let mk = shift * k;
    let (vmk, vk) = (splat(mk), splat(k));
    let mut total = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK16).min(n);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for j in i..end {
            if prefetch != 0 {
                // A hint for the next row: it never faults, the address need not be valid.
                _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(j * 64) as *const i8);
            }
            let (a, b) = ld2(&c[j]);
            let (mut ea, _) = exp8(_mm256_fmsub_ps(a, vk, vmk));
            let (mut eb, _) = exp8(_mm256_fmsub_ps(b, vk, vmk));
            if MASK {
                let (ma, mb) = ld2(&cm[j]);
                ea = _mm256_and_ps(ea, not_neg_inf(ma));
                eb = _mm256_and_ps(eb, not_neg_inf(mb));
            }
            s0 = _mm256_add_ps(s0, ea);
            s1 = _mm256_add_ps(s1, eb);
            if STORE {
                st2(&mut cd[j], ea, eb);
            }
        }
        total = _mm256_add_ps(total, _mm256_add_ps(s0, s1));
        i = end;
    }
    let mut s = hsum(total);
    let off = n * 16;
    for (t, &v) in tail.iter().enumerate() {
        let mut e = scalar::exp::<true>(v.mul_add(k, -mk));
        if MASK && mask[off + t] == f32::NEG_INFINITY {
            e = 0.0;
        }
        s += e;
        if STORE {
            dst[off + t] = e;
        }
    }
    s
}

/// One 8-lane step of the fused pass B: returns `(e, e°, e°·d)` (see [`fwd_b`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fwd_step<const MASK: bool, const KL: bool, const GUARD: bool>(
    z: __m256,
    zr: __m256,
    vk: __m256,
    vmk: __m256,
    vmrk: __m256,
) -> (__m256, __m256, __m256) {
    let x = _mm256_fmsub_ps(z, vk, vmk);
    let xr = _mm256_fmsub_ps(zr, vk, vmrk);
    let (e, _) = exp8(x);
    let (mut er, mut keep) = exp8(xr);
    if MASK {
        let f = not_neg_inf(z);
        er = _mm256_and_ps(er, f);
        keep = _mm256_and_ps(keep, f);
    }
    let d = if KL { _mm256_sub_ps(xr, x) } else { x };
    let d = if GUARD || MASK { _mm256_and_ps(d, keep) } else { d };
    (e, er, _mm256_mul_ps(er, d))
}

/// The fused pass B of the forward KL row (see `super::fwd_b`). `GUARD` masks the cross term
/// where `e°` was flushed (needed when `z` or `z°` may hold `−inf`; `MASK` implies it).
///
/// The shifted arguments are formed with one FMA, `x = z·k − m·k` (exactly `z − m` when
/// `k = 1`), and the loop keeps one accumulator per sum to leave the registers to the four
/// exponentials in flight.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) fn fwd_b<const STORE: bool, const MASK: bool, const KL: bool, const GUARD: bool>(
    z: &[f32],
    m: f32,
    zr: &[f32],
    mr: f32,
    k: f32,
    e_out: &mut [f32],
    er_out: &mut [f32],
    prefetch: [usize; 2],
) -> (f32, f32, f32) {
    let (c, tail) = z.as_chunks::<8>();
    let n = c.len();
    let cr = &zr.as_chunks::<8>().0[..n];
    let ce = if STORE { &mut e_out.as_chunks_mut::<8>().0[..n] } else { &mut [][..] };
    let cer = if STORE { &mut er_out.as_chunks_mut::<8>().0[..n] } else { &mut [][..] };
    let (mk, mrk) = (m * k, mr * k);
    let (vk, vmk, vmrk) = (splat(k), splat(mk), splat(mrk));
    let zero = _mm256_setzero_ps();
    let (mut ts, mut tsr, mut tacc) = (zero, zero, zero);
    let mut i = 0;
    while i < n {
        let end = (i + 2 * BLOCK16).min(n);
        let (mut s, mut sr, mut acc) = (zero, zero, zero);
        for j in i..end {
            if prefetch[0] != 0 && j % 2 == 0 {
                // Pull the next row's logits towards the caches while this row computes.
                for &base in &prefetch {
                    // A hint: it never faults, so the address need not be valid.
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(j * 32) as *const i8);
                }
            }
            let (e, er, p) = fwd_step::<MASK, KL, GUARD>(ld(&c[j]), ld(&cr[j]), vk, vmk, vmrk);
            s = _mm256_add_ps(s, e);
            sr = _mm256_add_ps(sr, er);
            acc = _mm256_add_ps(acc, p);
            if STORE {
                st(&mut ce[j], e);
                st(&mut cer[j], er);
            }
        }
        ts = _mm256_add_ps(ts, s);
        tsr = _mm256_add_ps(tsr, sr);
        tacc = _mm256_add_ps(tacc, acc);
        i = end;
    }
    let (mut s, mut sr, mut acc) = (hsum(ts), hsum(tsr), hsum(tacc));
    let off = n * 8;
    for (t, &zv) in tail.iter().enumerate() {
        let rv = zr[off + t];
        let x = zv.mul_add(k, -mk);
        let xr = rv.mul_add(k, -mrk);
        let e = scalar::exp::<true>(x);
        let keep = xr >= EXP_LO && !(MASK && zv == f32::NEG_INFINITY);
        let er = if keep { scalar::exp::<true>(xr) } else { 0.0 };
        if keep {
            acc += er * if KL { xr - x } else { x };
        }
        s += e;
        sr += er;
        if STORE {
            e_out[off + t] = e;
            er_out[off + t] = er;
        }
    }
    (s, sr, acc)
}

/// Pass B against a precomputed log-target: `e = exp((z − m)·k)`, `q = exp(lt)` (see
/// `super::fwd_b_logq`).
#[target_feature(enable = "avx2,fma")]
pub(super) fn fwd_b_logq<const STORE: bool, const KL: bool>(
    z: &[f32],
    m: f32,
    k: f32,
    lt: &[f32],
    e_out: &mut [f32],
    q_out: &mut [f32],
) -> (f32, f32, f32) {
    let (c, tail) = z.as_chunks::<16>();
    let n = c.len();
    let cl = &lt.as_chunks::<16>().0[..n];
    let ce = if STORE { &mut e_out.as_chunks_mut::<16>().0[..n] } else { &mut [][..] };
    let cq = if STORE { &mut q_out.as_chunks_mut::<16>().0[..n] } else { &mut [][..] };
    let (vm, vk, zero) = (splat(m), splat(k), _mm256_setzero_ps());
    let (mut ts, mut tq, mut tacc) = (zero, zero, zero);
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK16).min(n);
        let (mut s0, mut q0, mut a0) = (zero, zero, zero);
        for j in i..end {
            let (za, zb) = ld2(&c[j]);
            let (la, lb) = ld2(&cl[j]);
            let xa = _mm256_mul_ps(_mm256_sub_ps(za, vm), vk);
            let xb = _mm256_mul_ps(_mm256_sub_ps(zb, vm), vk);
            let (ea, _) = exp8(xa);
            let (eb, _) = exp8(xb);
            let qa = exp8_full(la);
            let qb = exp8_full(lb);
            let (ka, kb) =
                (_mm256_cmp_ps::<_CMP_GT_OQ>(qa, zero), _mm256_cmp_ps::<_CMP_GT_OQ>(qb, zero));
            let (da, db) =
                if KL { (_mm256_sub_ps(la, xa), _mm256_sub_ps(lb, xb)) } else { (xa, xb) };
            a0 = _mm256_fmadd_ps(qa, _mm256_and_ps(da, ka), a0);
            a0 = _mm256_fmadd_ps(qb, _mm256_and_ps(db, kb), a0);
            s0 = _mm256_add_ps(s0, _mm256_add_ps(ea, eb));
            q0 = _mm256_add_ps(q0, _mm256_add_ps(qa, qb));
            if STORE {
                st2(&mut ce[j], ea, eb);
                st2(&mut cq[j], qa, qb);
            }
        }
        ts = _mm256_add_ps(ts, s0);
        tq = _mm256_add_ps(tq, q0);
        tacc = _mm256_add_ps(tacc, a0);
        i = end;
    }
    let (mut s, mut sq, mut acc) = (hsum(ts), hsum(tq), hsum(tacc));
    let off = n * 16;
    for (t, &zv) in tail.iter().enumerate() {
        let l = lt[off + t];
        let x = (zv - m) * k;
        let e = scalar::exp::<true>(x);
        let q = scalar::exp::<true>(l);
        if q > 0.0 {
            acc = q.mul_add(if KL { l - x } else { x }, acc);
        }
        s += e;
        sq += q;
        if STORE {
            e_out[off + t] = e;
            q_out[off + t] = q;
        }
    }
    (s, sq, acc)
}

/// `dst = a·x + b·y` with non-temporal (streaming) stores: the destination is not read into the
/// cache first, which saves a fourth DRAM transfer per element when it is far larger than the
/// caches. Ends with `sfence`, so the stores are visible to whoever reads `dst` next.
#[target_feature(enable = "avx2,fma")]
pub(super) fn axpby_stream(a: f32, x: &[f32], b: f32, y: &[f32], dst: &mut [f32]) {
    let addr = dst.as_ptr() as usize;
    let head = ((32 - addr % 32) % 32 / 4).min(dst.len());
    let (h, rest) = dst.split_at_mut(head);
    for (i, g) in h.iter_mut().enumerate() {
        *g = a.mul_add(x[i], b * y[i]);
    }
    let (body, tail) = rest.as_chunks_mut::<8>();
    let n = body.len();
    let cx = &x[head..].as_chunks::<8>().0[..n];
    let cy = &y[head..].as_chunks::<8>().0[..n];
    let (va, vb) = (splat(a), splat(b));
    for j in 0..n {
        // SAFETY: `cx[j]`, `cy[j]` are 8 initialised f32 (unaligned loads).
        let (xv, yv) =
            unsafe { (_mm256_loadu_ps(cx[j].as_ptr()), _mm256_loadu_ps(cy[j].as_ptr())) };
        let g = _mm256_fmadd_ps(va, xv, _mm256_mul_ps(vb, yv));
        // SAFETY: `body[j]` is 8 writable f32 starting `head` elements after `dst`, which
        // `head` aligned to 32 bytes (chunks are 32 bytes long), as `_mm256_stream_ps` requires.
        unsafe { _mm256_stream_ps(body[j].as_mut_ptr(), g) };
    }
    let off = head + n * 8;
    for (t, g) in tail.iter_mut().enumerate() {
        *g = a.mul_add(x[off + t], b * y[off + t]);
    }
    _mm_sfence();
}

/// `dst = a·x + b·y + c`, zeroed where `mask` is `−inf` (if `MASK`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) fn axpbyc<const MASK: bool>(
    a: f32,
    x: &[f32],
    b: f32,
    y: &[f32],
    c: f32,
    mask: &[f32],
    dst: &mut [f32],
) {
    let (cd, tail) = dst.as_chunks_mut::<16>();
    let n = cd.len();
    let cx = &x.as_chunks::<16>().0[..n];
    let cy = &y.as_chunks::<16>().0[..n];
    let cm = if MASK { &mask.as_chunks::<16>().0[..n] } else { &[][..] };
    let (va, vb, vc) = (splat(a), splat(b), splat(c));
    for j in 0..n {
        let (xa, xb) = ld2(&cx[j]);
        let (ya, yb) = ld2(&cy[j]);
        let mut ga = _mm256_fmadd_ps(va, xa, _mm256_fmadd_ps(vb, ya, vc));
        let mut gb = _mm256_fmadd_ps(va, xb, _mm256_fmadd_ps(vb, yb, vc));
        if MASK {
            let (ma, mb) = ld2(&cm[j]);
            ga = _mm256_and_ps(ga, not_neg_inf(ma));
            gb = _mm256_and_ps(gb, not_neg_inf(mb));
        }
        st2(&mut cd[j], ga, gb);
    }
    let off = n * 16;
    for (t, g) in tail.iter_mut().enumerate() {
        let i = off + t;
        *g = if MASK && mask[i] == f32::NEG_INFINITY {
            0.0
        } else {
            a.mul_add(x[i], b.mul_add(y[i], c))
        };
    }
}

/// `dst = a·x + c`, zeroed where `mask` is `−inf` (if `MASK`).
#[target_feature(enable = "avx2,fma")]
pub(super) fn axc<const MASK: bool>(a: f32, x: &[f32], c: f32, mask: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<16>();
    let n = cd.len();
    let cx = &x.as_chunks::<16>().0[..n];
    let cm = if MASK { &mask.as_chunks::<16>().0[..n] } else { &[][..] };
    let (va, vc) = (splat(a), splat(c));
    for j in 0..n {
        let (xa, xb) = ld2(&cx[j]);
        let mut ga = _mm256_fmadd_ps(va, xa, vc);
        let mut gb = _mm256_fmadd_ps(va, xb, vc);
        if MASK {
            let (ma, mb) = ld2(&cm[j]);
            ga = _mm256_and_ps(ga, not_neg_inf(ma));
            gb = _mm256_and_ps(gb, not_neg_inf(mb));
        }
        st2(&mut cd[j], ga, gb);
    }
    let off = n * 16;
    for (t, g) in tail.iter_mut().enumerate() {
        let i = off + t;
        *g = if MASK && mask[i] == f32::NEG_INFINITY { 0.0 } else { a.mul_add(x[i], c) };
    }
}

/// `buf = ln(a·buf + b) − c`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn ln_affine(buf: &mut [f32], a: f32, b: f32, c: f32) {
    let (cb, tail) = buf.as_chunks_mut::<16>();
    let (va, vb, vc) = (splat(a), splat(b), splat(c));
    for ch in cb.iter_mut() {
        let (xa, xb) = ld2(ch);
        let ya = _mm256_sub_ps(ln8(_mm256_fmadd_ps(va, xa, vb)), vc);
        let yb = _mm256_sub_ps(ln8(_mm256_fmadd_ps(va, xb, vb)), vc);
        st2(ch, ya, yb);
    }
    for v in tail {
        *v = scalar::ln::<true>(a.mul_add(*v, b)) - c;
    }
}

/// Reverse-KL pass C: `t ← (z − m)·k − lns − t` (or, `DIRECT`, `t ← (z − t)·k − lns`) and
/// returns `Σ_{e>0} e·inv_s·t`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) fn rev_acc<const DIRECT: bool>(
    z: &[f32],
    m: f32,
    k: f32,
    lns: f32,
    e: &[f32],
    inv_s: f32,
    t: &mut [f32],
) -> f32 {
    let (ct, tail) = t.as_chunks_mut::<16>();
    let n = ct.len();
    let cz = &z.as_chunks::<16>().0[..n];
    let ce = &e.as_chunks::<16>().0[..n];
    let (vm, vk, vl, vi, zero) =
        (splat(m), splat(k), splat(lns), splat(inv_s), _mm256_setzero_ps());
    let mut total = zero;
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK16).min(n);
        let (mut a0, mut a1) = (zero, zero);
        for j in i..end {
            let (za, zb) = ld2(&cz[j]);
            let (ea, eb) = ld2(&ce[j]);
            let (da, db) = ld2(&ct[j]);
            let (ta, tb) = if DIRECT {
                (
                    _mm256_fmsub_ps(_mm256_sub_ps(za, da), vk, vl),
                    _mm256_fmsub_ps(_mm256_sub_ps(zb, db), vk, vl),
                )
            } else {
                (
                    _mm256_sub_ps(_mm256_fmsub_ps(_mm256_sub_ps(za, vm), vk, vl), da),
                    _mm256_sub_ps(_mm256_fmsub_ps(_mm256_sub_ps(zb, vm), vk, vl), db),
                )
            };
            let ka = _mm256_cmp_ps::<_CMP_GT_OQ>(ea, zero);
            let kb = _mm256_cmp_ps::<_CMP_GT_OQ>(eb, zero);
            a0 = _mm256_fmadd_ps(_mm256_mul_ps(ea, vi), _mm256_and_ps(ta, ka), a0);
            a1 = _mm256_fmadd_ps(_mm256_mul_ps(eb, vi), _mm256_and_ps(tb, kb), a1);
            st2(&mut ct[j], ta, tb);
        }
        total = _mm256_add_ps(total, _mm256_add_ps(a0, a1));
        i = end;
    }
    let mut l = hsum(total);
    let off = n * 16;
    for (j, tv) in tail.iter_mut().enumerate() {
        let i = off + j;
        let tt =
            if DIRECT { (z[i] - *tv).mul_add(k, -lns) } else { (z[i] - m).mul_add(k, -lns) - *tv };
        if e[i] > 0.0 {
            l = (e[i] * inv_s).mul_add(tt, l);
        }
        *tv = tt;
    }
    l
}

/// Reverse-KL pass D: `dst = a·(e·inv_s)·(t − l)`, 0 where `e = 0`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn rev_grad(e: &[f32], inv_s: f32, t: &[f32], l: f32, a: f32, dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<16>();
    let n = cd.len();
    let ce = &e.as_chunks::<16>().0[..n];
    let ct = &t.as_chunks::<16>().0[..n];
    let (vi, vl, va, zero) = (splat(inv_s), splat(l), splat(a), _mm256_setzero_ps());
    for j in 0..n {
        let (ea, eb) = ld2(&ce[j]);
        let (ta, tb) = ld2(&ct[j]);
        let ga = _mm256_mul_ps(_mm256_mul_ps(va, _mm256_mul_ps(ea, vi)), _mm256_sub_ps(ta, vl));
        let gb = _mm256_mul_ps(_mm256_mul_ps(va, _mm256_mul_ps(eb, vi)), _mm256_sub_ps(tb, vl));
        let ga = _mm256_and_ps(ga, _mm256_cmp_ps::<_CMP_GT_OQ>(ea, zero));
        let gb = _mm256_and_ps(gb, _mm256_cmp_ps::<_CMP_GT_OQ>(eb, zero));
        st2(&mut cd[j], ga, gb);
    }
    let off = n * 16;
    for (j, g) in tail.iter_mut().enumerate() {
        let i = off + j;
        *g = if e[i] > 0.0 { a * (e[i] * inv_s) * (t[i] - l) } else { 0.0 };
    }
}

/// `(#{z > −inf}, Σ_{z > −inf} (z − m)·k)`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn sum_shifted(z: &[f32], m: f32, k: f32) -> (usize, f32) {
    let (c, tail) = z.as_chunks::<16>();
    let n = c.len();
    let (vm, vk, one, zero) = (splat(m), splat(k), splat(1.0), _mm256_setzero_ps());
    let (mut total, mut count) = (zero, zero);
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK16).min(n);
        let (mut s0, mut s1) = (zero, zero);
        for ch in &c[i..end] {
            let (a, b) = ld2(ch);
            let (fa, fb) = (not_neg_inf(a), not_neg_inf(b));
            s0 = _mm256_add_ps(s0, _mm256_and_ps(_mm256_mul_ps(_mm256_sub_ps(a, vm), vk), fa));
            s1 = _mm256_add_ps(s1, _mm256_and_ps(_mm256_mul_ps(_mm256_sub_ps(b, vm), vk), fb));
            count =
                _mm256_add_ps(count, _mm256_add_ps(_mm256_and_ps(one, fa), _mm256_and_ps(one, fb)));
        }
        total = _mm256_add_ps(total, _mm256_add_ps(s0, s1));
        i = end;
    }
    let mut s = hsum(total);
    let mut cnt = hsum(count) as usize;
    for &v in tail {
        if v != f32::NEG_INFINITY {
            s += (v - m) * k;
            cnt += 1;
        }
    }
    (cnt, s)
}

/// Full-range `dst = exp(src)`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_slice(src: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<16>();
    let n = cd.len();
    let cs = &src.as_chunks::<16>().0[..n];
    for j in 0..n {
        let (a, b) = ld2(&cs[j]);
        st2(&mut cd[j], exp8_full(a), exp8_full(b));
    }
    let off = n * 16;
    for (t, d) in tail.iter_mut().enumerate() {
        *d = scalar::exp::<true>(src[off + t]);
    }
}

/// `dst = ln(src)`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn ln_slice(src: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<16>();
    let n = cd.len();
    let cs = &src.as_chunks::<16>().0[..n];
    for j in 0..n {
        let (a, b) = ld2(&cs[j]);
        st2(&mut cd[j], ln8(a), ln8(b));
    }
    let off = n * 16;
    for (t, d) in tail.iter_mut().enumerate() {
        *d = scalar::ln::<true>(src[off + t]);
    }
}
