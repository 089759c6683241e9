//! AVX-512F row primitives: the algorithms of [`super::avx2`] on 16-lane vectors.
//!
//! Every function here is compiled with `avx512f` enabled (`#[target_feature]`; rustc's
//! `avx512f` implies `avx2` and `fma`). They are safe to call from other functions of this
//! module; callers outside it go through `super`, which calls them only after
//! `is_x86_feature_detected!` confirmed AVX-512F, AVX2 and FMA. Only AVX-512F instructions are
//! used: lane selection goes through mask registers (`__mmask16`) instead of the float bitwise
//! operations, which would need AVX-512DQ.
//!
//! The polynomials, the range reduction and the order of the floating-point operations of every
//! lane are those of the AVX2 functions, so each element (`exp`, `ln`, the affine updates) is
//! bitwise the AVX2 result; only the order of the row sums differs. Loops run over chunks of 32
//! elements (two vectors, two dependency chains; the fused pass B one vector of 16) and sum in
//! two levels, vector accumulators per block of 1024 elements, then across blocks, as the AVX2
//! path does (with twice the lanes, so each lane sums half as many elements). The tail
//! (`len % 32`, or `len % 16`) runs through the same vector code with masked loads and stores
//! (`_mm512_maskz_loadu_ps`, `_mm512_mask_storeu_ps`) and the inactive lanes are zeroed before
//! they reach a sum.

use std::arch::x86_64::*;

use super::Scan;
use super::scalar::{
    EXP_C1, EXP_C2, EXP_C3, EXP_C4, EXP_C5, EXP_HI, EXP_LO, LN_P, LN2_HI, LN2_LO, LOG2E, MAGIC,
    SQRT_HALF,
};

/// Chunks of 32 per summation block (1024 elements).
const BLOCK32: usize = 32;
/// Chunks of 16 per summation block of the fused pass B (1024 elements).
const BLOCK16: usize = 64;

// ---------------------------------------------------------------------------------------------
// Loads, stores and lane masks.

#[inline]
#[target_feature(enable = "avx512f")]
fn ld(c: &[f32; 16]) -> __m512 {
    // SAFETY: `c` is 16 initialised f32; the load is unaligned.
    unsafe { _mm512_loadu_ps(c.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st(c: &mut [f32; 16], v: __m512) {
    // SAFETY: `c` is 16 writable f32; the store is unaligned.
    unsafe { _mm512_storeu_ps(c.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn ld2(c: &[f32; 32]) -> (__m512, __m512) {
    // SAFETY: `c` is 32 initialised f32, so both 16-lane unaligned loads stay inside it.
    unsafe { (_mm512_loadu_ps(c.as_ptr()), _mm512_loadu_ps(c.as_ptr().add(16))) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn st2(c: &mut [f32; 32], a: __m512, b: __m512) {
    // SAFETY: `c` is 32 writable f32, so both 16-lane unaligned stores stay inside it.
    unsafe {
        _mm512_storeu_ps(c.as_mut_ptr(), a);
        _mm512_storeu_ps(c.as_mut_ptr().add(16), b);
    }
}

/// The mask of the first `min(len, 16)` lanes.
#[inline]
fn lanes(len: usize) -> __mmask16 {
    ((1u32 << len.min(16)) - 1) as __mmask16
}

/// Loads the first `min(s.len(), 16)` elements of `s`; the other lanes are 0.
#[inline]
#[target_feature(enable = "avx512f")]
fn ld_part(s: &[f32]) -> __m512 {
    // SAFETY: the mask enables only the first `min(s.len(), 16)` lanes, which lie inside `s`;
    // masked-off lanes are not accessed (AVX-512 masked loads suppress their faults).
    unsafe { _mm512_maskz_loadu_ps(lanes(s.len()), s.as_ptr()) }
}

/// Stores the first `min(s.len(), 16)` lanes of `v` into `s`.
#[inline]
#[target_feature(enable = "avx512f")]
fn st_part(s: &mut [f32], v: __m512) {
    // SAFETY: the mask enables only the first `min(s.len(), 16)` lanes, which lie inside `s`;
    // masked-off lanes are not written.
    unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), lanes(s.len()), v) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn splat(x: f32) -> __m512 {
    _mm512_set1_ps(x)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn zero() -> __m512 {
    _mm512_setzero_ps()
}

/// Lanes that are not `−inf` (and not NaN), as `_CMP_NEQ_OQ` in the AVX2 path.
#[inline]
#[target_feature(enable = "avx512f")]
fn not_neg_inf(v: __m512) -> __mmask16 {
    _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(v, splat(f32::NEG_INFINITY))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn is_nan(v: __m512) -> __mmask16 {
    _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
}

// ---------------------------------------------------------------------------------------------
// exp and ln.

/// `exp(x)` for `x ≤ 88.3`, flushed to exactly 0 below [`EXP_LO`] (and for `−inf`, NaN).
/// Returns the value and the "kept" mask (`x ≥ EXP_LO`).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> (__m512, __mmask16) {
    let t = _mm512_fmadd_ps(x, splat(LOG2E), splat(MAGIC));
    let n = _mm512_sub_ps(t, splat(MAGIC));
    let r = _mm512_fnmadd_ps(n, splat(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, splat(LN2_LO), r);
    let mut p = _mm512_fmadd_ps(splat(EXP_C5), r, splat(EXP_C4));
    p = _mm512_fmadd_ps(p, r, splat(EXP_C3));
    p = _mm512_fmadd_ps(p, r, splat(EXP_C2));
    p = _mm512_fmadd_ps(p, r, splat(EXP_C1));
    p = _mm512_fmadd_ps(p, r, splat(1.0));
    let scale = _mm512_slli_epi32::<23>(_mm512_castps_si512(t));
    let y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), scale));
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, splat(EXP_LO));
    (_mm512_maskz_mov_ps(keep, y), keep)
}

/// Full-range `exp`: as [`exp16`], plus `+inf` above [`EXP_HI`] and NaN propagation (a NaN
/// input is returned as it is, as [`super::scalar::exp`] does).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16_full(x: __m512) -> __m512 {
    let (y, _) = exp16(x);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, splat(EXP_HI));
    let y = _mm512_mask_mov_ps(y, big, splat(f32::INFINITY));
    _mm512_mask_mov_ps(y, is_nan(x), x)
}

/// Natural logarithm (Cephes polynomial); same specials as [`super::scalar::ln`].
#[inline]
#[target_feature(enable = "avx512f")]
fn ln16(x0: __m512) -> __m512 {
    let one = splat(1.0);
    let sub = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x0, splat(f32::MIN_POSITIVE));
    let x = _mm512_mask_mul_ps(x0, sub, x0, splat(8_388_608.0));
    let bits = _mm512_castps_si512(x);
    let mut e =
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(126)));
    let m = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff)),
        _mm512_set1_epi32(0x3f00_0000),
    ));
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(m, splat(SQRT_HALF));
    e = _mm512_mask_sub_ps(e, small, e, one);
    let m1 = _mm512_sub_ps(m, one);
    let m = _mm512_mask_add_ps(m1, small, m1, m);
    e = _mm512_mask_sub_ps(e, sub, e, splat(23.0));
    let z = _mm512_mul_ps(m, m);
    let mut y = splat(LN_P[0]);
    y = _mm512_fmadd_ps(y, m, splat(LN_P[1]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[2]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[3]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[4]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[5]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[6]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[7]));
    y = _mm512_fmadd_ps(y, m, splat(LN_P[8]));
    y = _mm512_mul_ps(y, _mm512_mul_ps(m, z));
    y = _mm512_fmadd_ps(e, splat(LN2_LO), y);
    y = _mm512_fnmadd_ps(splat(0.5), z, y);
    let r = _mm512_add_ps(m, y);
    let r = _mm512_fmadd_ps(e, splat(LN2_HI), r);
    // Specials: 0 → −inf, +inf → +inf, negative or NaN → NaN.
    let r = _mm512_mask_mov_ps(
        r,
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x0, zero()),
        splat(f32::NEG_INFINITY),
    );
    let r = _mm512_mask_mov_ps(
        r,
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x0, splat(f32::INFINITY)),
        splat(f32::INFINITY),
    );
    _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(x0, zero()), splat(f32::NAN))
}

// ---------------------------------------------------------------------------------------------
// Row primitives (see `super` for their contracts).

/// [`super::first_index_of`], the portable body compiled (auto-vectorised) for this level.
#[target_feature(enable = "avx512f")]
pub(super) fn first_index_of(z: &[f32], m: f32, mask: Option<&[f32]>) -> usize {
    super::first_index_of_body(z, m, mask)
}

/// [`super::weighted_diff_sum`], the portable body compiled (auto-vectorised) for this level.
#[target_feature(enable = "avx512f")]
pub(super) fn weighted_diff_sum(e: &[f32], a: &[f32], b: &[f32]) -> f64 {
    super::weighted_diff_sum_body(e, a, b)
}

#[target_feature(enable = "avx512f")]
pub(super) fn scan(z: &[f32]) -> Scan {
    let (c, tail) = z.as_chunks::<32>();
    let ninf = splat(f32::NEG_INFINITY);
    let pinf = splat(f32::INFINITY);
    let (mut mx0, mut mx1, mut mn0, mut mn1) = (ninf, ninf, pinf, pinf);
    let mut nan: __mmask16 = 0;
    for ch in c {
        let (a, b) = ld2(ch);
        mx0 = _mm512_max_ps(mx0, a);
        mx1 = _mm512_max_ps(mx1, b);
        mn0 = _mm512_min_ps(mn0, a);
        mn1 = _mm512_min_ps(mn1, b);
        nan |= is_nan(a) | is_nan(b);
    }
    for part in tail.chunks(16) {
        let kt = lanes(part.len());
        let a = ld_part(part);
        mx0 = _mm512_mask_max_ps(mx0, kt, mx0, a);
        mn0 = _mm512_mask_min_ps(mn0, kt, mn0, a);
        nan |= kt & is_nan(a);
    }
    Scan {
        max: _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)),
        min: _mm512_reduce_min_ps(_mm512_min_ps(mn0, mn1)),
        nan: nan != 0,
    }
}

#[target_feature(enable = "avx512f")]
pub(super) fn scan_masked(zr: &[f32], z: &[f32]) -> Scan {
    let (c, tail) = zr.as_chunks::<32>();
    let (cz, tz) = z.as_chunks::<32>();
    let cz = &cz[..c.len()];
    let ninf = splat(f32::NEG_INFINITY);
    let pinf = splat(f32::INFINITY);
    let (mut mx0, mut mx1, mut mn0, mut mn1) = (ninf, ninf, pinf, pinf);
    let mut nan: __mmask16 = 0;
    for (ch, chz) in c.iter().zip(cz) {
        let (a, b) = ld2(ch);
        let (za, zb) = ld2(chz);
        let (ka, kb) = (not_neg_inf(za), not_neg_inf(zb));
        mx0 = _mm512_mask_max_ps(mx0, ka, mx0, a);
        mx1 = _mm512_mask_max_ps(mx1, kb, mx1, b);
        mn0 = _mm512_mask_min_ps(mn0, ka, mn0, a);
        mn1 = _mm512_mask_min_ps(mn1, kb, mn1, b);
        nan |= is_nan(a) | is_nan(b);
    }
    for (part, pz) in tail.chunks(16).zip(tz.chunks(16)) {
        let kt = lanes(part.len());
        let a = ld_part(part);
        let ka = kt & not_neg_inf(ld_part(pz));
        mx0 = _mm512_mask_max_ps(mx0, ka, mx0, a);
        mn0 = _mm512_mask_min_ps(mn0, ka, mn0, a);
        nan |= kt & is_nan(a);
    }
    Scan {
        max: _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)),
        min: _mm512_reduce_min_ps(_mm512_min_ps(mn0, mn1)),
        nan: nan != 0,
    }
}

/// `dst = exp((src − shift)·k)` (if `STORE`), masked to 0 where `mask` is `−inf` (if `MASK`);
/// returns the sum.
#[target_feature(enable = "avx512f")]
pub(super) fn exp_sum<const STORE: bool, const MASK: bool>(
    src: &[f32],
    mask: &[f32],
    shift: f32,
    k: f32,
    dst: &mut [f32],
    prefetch: usize,
) -> f32 {
    let (c, tail) = src.as_chunks::<32>();
    let n = c.len();
    let off = n * 32;
    let (cm, tm) = if MASK {
        let (cm, tm) = mask.as_chunks::<32>();
        (&cm[..n], tm)
    } else {
        (&[][..], &[][..])
    };
    let (cd, td) = if STORE {
        let (cd, td) = dst.as_chunks_mut::<32>();
        (&mut cd[..n], td)
    } else {
        (&mut [][..], &mut [][..])
    };
    let mk = shift * k;
    let (vmk, vk) = (splat(mk), splat(k));
    let mut total = zero();
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK32).min(n);
        let (mut s0, mut s1) = (zero(), zero());
        for j in i..end {
            if prefetch != 0 {
                // Hints for the next row (two cache lines per chunk of 32): they never fault,
                // the addresses need not be valid.
                let base = prefetch.wrapping_add(j * 128);
                _mm_prefetch::<_MM_HINT_T0>(base as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(64) as *const i8);
            }
            let (a, b) = ld2(&c[j]);
            let (mut ea, _) = exp16(_mm512_fmsub_ps(a, vk, vmk));
            let (mut eb, _) = exp16(_mm512_fmsub_ps(b, vk, vmk));
            if MASK {
                let (ma, mb) = ld2(&cm[j]);
                ea = _mm512_maskz_mov_ps(not_neg_inf(ma), ea);
                eb = _mm512_maskz_mov_ps(not_neg_inf(mb), eb);
            }
            s0 = _mm512_add_ps(s0, ea);
            s1 = _mm512_add_ps(s1, eb);
            if STORE {
                st2(&mut cd[j], ea, eb);
            }
        }
        total = _mm512_add_ps(total, _mm512_add_ps(s0, s1));
        i = end;
    }
    for (p, part) in tail.chunks(16).enumerate() {
        let mut keep = lanes(part.len());
        if MASK {
            keep &= not_neg_inf(ld_part(&tm[p * 16..]));
        }
        let (e, _) = exp16(_mm512_fmsub_ps(ld_part(part), vk, vmk));
        let e = _mm512_maskz_mov_ps(keep, e);
        total = _mm512_add_ps(total, e);
        if STORE {
            st_part(&mut td[p * 16..], e);
        }
    }
    debug_assert_eq!(off + tail.len(), src.len());
    _mm512_reduce_add_ps(total)
}

/// One 16-lane step of the fused pass B: returns `(e, e°, e°·d)` (see [`fwd_b`]).
#[inline]
#[target_feature(enable = "avx512f")]
fn fwd_step<const MASK: bool, const KL: bool, const GUARD: bool>(
    z: __m512,
    zr: __m512,
    vk: __m512,
    vmk: __m512,
    vmrk: __m512,
) -> (__m512, __m512, __m512) {
    let x = _mm512_fmsub_ps(z, vk, vmk);
    let xr = _mm512_fmsub_ps(zr, vk, vmrk);
    let (e, _) = exp16(x);
    let (mut er, mut keep) = exp16(xr);
    if MASK {
        let f = not_neg_inf(z);
        er = _mm512_maskz_mov_ps(f, er);
        keep &= f;
    }
    let d = if KL { _mm512_sub_ps(xr, x) } else { x };
    let d = if GUARD || MASK { _mm512_maskz_mov_ps(keep, d) } else { d };
    (e, er, _mm512_mul_ps(er, d))
}

/// The fused pass B of the forward KL row (see `super::fwd_b`). `GUARD` masks the cross term
/// where `e°` was flushed (needed when `z` or `z°` may hold `−inf`; `MASK` implies it).
///
/// As in the AVX2 path: `x = z·k − m·k` with one FMA, one vector per step and one accumulator
/// per sum.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
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
    let (c, tail) = z.as_chunks::<16>();
    let n = c.len();
    let off = n * 16;
    let (cr, tr) = zr.as_chunks::<16>();
    let (cr, tr) = (&cr[..n], tr);
    let (ce, te) = if STORE {
        let (ce, te) = e_out.as_chunks_mut::<16>();
        (&mut ce[..n], te)
    } else {
        (&mut [][..], &mut [][..])
    };
    let (cer, ter) = if STORE {
        let (cer, ter) = er_out.as_chunks_mut::<16>();
        (&mut cer[..n], ter)
    } else {
        (&mut [][..], &mut [][..])
    };
    let (mk, mrk) = (m * k, mr * k);
    let (vk, vmk, vmrk) = (splat(k), splat(mk), splat(mrk));
    let (mut ts, mut tsr, mut tacc) = (zero(), zero(), zero());
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK16).min(n);
        let (mut s, mut sr, mut acc) = (zero(), zero(), zero());
        for j in i..end {
            if prefetch[0] != 0 {
                // Pull the next row's logits towards the caches while this row computes.
                for &base in &prefetch {
                    // A hint: it never faults, so the address need not be valid.
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(j * 64) as *const i8);
                }
            }
            let (e, er, p) = fwd_step::<MASK, KL, GUARD>(ld(&c[j]), ld(&cr[j]), vk, vmk, vmrk);
            s = _mm512_add_ps(s, e);
            sr = _mm512_add_ps(sr, er);
            acc = _mm512_add_ps(acc, p);
            if STORE {
                st(&mut ce[j], e);
                st(&mut cer[j], er);
            }
        }
        ts = _mm512_add_ps(ts, s);
        tsr = _mm512_add_ps(tsr, sr);
        tacc = _mm512_add_ps(tacc, acc);
        i = end;
    }
    if !tail.is_empty() {
        let kt = lanes(tail.len());
        let (e, er, p) = fwd_step::<MASK, KL, GUARD>(ld_part(tail), ld_part(tr), vk, vmk, vmrk);
        let (e, er, p) =
            (_mm512_maskz_mov_ps(kt, e), _mm512_maskz_mov_ps(kt, er), _mm512_maskz_mov_ps(kt, p));
        ts = _mm512_add_ps(ts, e);
        tsr = _mm512_add_ps(tsr, er);
        tacc = _mm512_add_ps(tacc, p);
        if STORE {
            st_part(te, e);
            st_part(ter, er);
        }
    }
    debug_assert_eq!(off + tail.len(), z.len());
    (_mm512_reduce_add_ps(ts), _mm512_reduce_add_ps(tsr), _mm512_reduce_add_ps(tacc))
}

/// Pass B against a precomputed log-target: `e = exp((z − m)·k)`, `q = exp(lt)` (see
/// `super::fwd_b_logq`).
#[target_feature(enable = "avx512f")]
pub(super) fn fwd_b_logq<const STORE: bool, const KL: bool>(
    z: &[f32],
    m: f32,
    k: f32,
    lt: &[f32],
    e_out: &mut [f32],
    q_out: &mut [f32],
) -> (f32, f32, f32) {
    let (c, tail) = z.as_chunks::<32>();
    let n = c.len();
    let (cl, tl) = lt.as_chunks::<32>();
    let cl = &cl[..n];
    let (ce, te) = if STORE {
        let (ce, te) = e_out.as_chunks_mut::<32>();
        (&mut ce[..n], te)
    } else {
        (&mut [][..], &mut [][..])
    };
    let (cq, tq) = if STORE {
        let (cq, tq) = q_out.as_chunks_mut::<32>();
        (&mut cq[..n], tq)
    } else {
        (&mut [][..], &mut [][..])
    };
    let (vm, vk) = (splat(m), splat(k));
    // One lane step: (e, q, q·d) with d masked to 0 where q is not > 0.
    let step = |zv: __m512, l: __m512| {
        let x = _mm512_mul_ps(_mm512_sub_ps(zv, vm), vk);
        let (e, _) = exp16(x);
        let q = exp16_full(l);
        let kq = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(q, zero());
        let d = if KL { _mm512_sub_ps(l, x) } else { x };
        (e, q, _mm512_maskz_mov_ps(kq, d))
    };
    let (mut ts, mut tqs, mut tacc) = (zero(), zero(), zero());
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK32).min(n);
        let (mut s0, mut q0, mut a0) = (zero(), zero(), zero());
        for j in i..end {
            let (za, zb) = ld2(&c[j]);
            let (la, lb) = ld2(&cl[j]);
            let (ea, qa, da) = step(za, la);
            let (eb, qb, db) = step(zb, lb);
            a0 = _mm512_fmadd_ps(qa, da, a0);
            a0 = _mm512_fmadd_ps(qb, db, a0);
            s0 = _mm512_add_ps(s0, _mm512_add_ps(ea, eb));
            q0 = _mm512_add_ps(q0, _mm512_add_ps(qa, qb));
            if STORE {
                st2(&mut ce[j], ea, eb);
                st2(&mut cq[j], qa, qb);
            }
        }
        ts = _mm512_add_ps(ts, s0);
        tqs = _mm512_add_ps(tqs, q0);
        tacc = _mm512_add_ps(tacc, a0);
        i = end;
    }
    for (p, part) in tail.chunks(16).enumerate() {
        let kt = lanes(part.len());
        let (e, q, d) = step(ld_part(part), ld_part(&tl[p * 16..]));
        let (e, q, d) =
            (_mm512_maskz_mov_ps(kt, e), _mm512_maskz_mov_ps(kt, q), _mm512_maskz_mov_ps(kt, d));
        tacc = _mm512_fmadd_ps(q, d, tacc);
        ts = _mm512_add_ps(ts, e);
        tqs = _mm512_add_ps(tqs, q);
        if STORE {
            st_part(&mut te[p * 16..], e);
            st_part(&mut tq[p * 16..], q);
        }
    }
    (_mm512_reduce_add_ps(ts), _mm512_reduce_add_ps(tqs), _mm512_reduce_add_ps(tacc))
}

/// `dst = a·x + b·y` with non-temporal (streaming) stores: the destination is not read into the
/// cache first, which saves a fourth DRAM transfer per element when it is far larger than the
/// caches. The unaligned head and the tail use masked (cached) stores. Ends with `sfence`, so
/// the stores are visible to whoever reads `dst` next.
#[target_feature(enable = "avx512f")]
pub(super) fn axpby_stream(a: f32, x: &[f32], b: f32, y: &[f32], dst: &mut [f32]) {
    let (va, vb) = (splat(a), splat(b));
    let g = |xv: __m512, yv: __m512| _mm512_fmadd_ps(va, xv, _mm512_mul_ps(vb, yv));
    let addr = dst.as_ptr() as usize;
    let head = ((64 - addr % 64) % 64 / 4).min(dst.len());
    let (h, rest) = dst.split_at_mut(head);
    st_part(h, g(ld_part(&x[..head]), ld_part(&y[..head])));
    let (body, tail) = rest.as_chunks_mut::<16>();
    let n = body.len();
    let cx = &x[head..].as_chunks::<16>().0[..n];
    let cy = &y[head..].as_chunks::<16>().0[..n];
    for j in 0..n {
        let v = g(ld(&cx[j]), ld(&cy[j]));
        // SAFETY: `body[j]` is 16 writable f32 starting `head` elements after `dst`, which
        // `head` aligned to 64 bytes (chunks are 64 bytes long), as `_mm512_stream_ps` requires.
        unsafe { _mm512_stream_ps(body[j].as_mut_ptr(), v) };
    }
    let off = head + n * 16;
    st_part(tail, g(ld_part(&x[off..]), ld_part(&y[off..])));
    _mm_sfence();
}

/// `dst = a·x + b·y + c`, zeroed where `mask` is `−inf` (if `MASK`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) fn axpbyc<const MASK: bool>(
    a: f32,
    x: &[f32],
    b: f32,
    y: &[f32],
    c: f32,
    mask: &[f32],
    dst: &mut [f32],
) {
    let (cd, tail) = dst.as_chunks_mut::<32>();
    let n = cd.len();
    let off = n * 32;
    let cx = &x.as_chunks::<32>().0[..n];
    let cy = &y.as_chunks::<32>().0[..n];
    let cm = if MASK { &mask.as_chunks::<32>().0[..n] } else { &[][..] };
    let (va, vb, vc) = (splat(a), splat(b), splat(c));
    let g = |xv: __m512, yv: __m512| _mm512_fmadd_ps(va, xv, _mm512_fmadd_ps(vb, yv, vc));
    for j in 0..n {
        let (xa, xb) = ld2(&cx[j]);
        let (ya, yb) = ld2(&cy[j]);
        let (mut ga, mut gb) = (g(xa, ya), g(xb, yb));
        if MASK {
            let (ma, mb) = ld2(&cm[j]);
            ga = _mm512_maskz_mov_ps(not_neg_inf(ma), ga);
            gb = _mm512_maskz_mov_ps(not_neg_inf(mb), gb);
        }
        st2(&mut cd[j], ga, gb);
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let i = off + p * 16;
        let mut v = g(ld_part(&x[i..]), ld_part(&y[i..]));
        if MASK {
            v = _mm512_maskz_mov_ps(not_neg_inf(ld_part(&mask[i..])), v);
        }
        st_part(part, v);
    }
}

/// `dst = a·x + c`, zeroed where `mask` is `−inf` (if `MASK`).
#[target_feature(enable = "avx512f")]
pub(super) fn axc<const MASK: bool>(a: f32, x: &[f32], c: f32, mask: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<32>();
    let n = cd.len();
    let off = n * 32;
    let cx = &x.as_chunks::<32>().0[..n];
    let cm = if MASK { &mask.as_chunks::<32>().0[..n] } else { &[][..] };
    let (va, vc) = (splat(a), splat(c));
    for j in 0..n {
        let (xa, xb) = ld2(&cx[j]);
        let mut ga = _mm512_fmadd_ps(va, xa, vc);
        let mut gb = _mm512_fmadd_ps(va, xb, vc);
        if MASK {
            let (ma, mb) = ld2(&cm[j]);
            ga = _mm512_maskz_mov_ps(not_neg_inf(ma), ga);
            gb = _mm512_maskz_mov_ps(not_neg_inf(mb), gb);
        }
        st2(&mut cd[j], ga, gb);
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let i = off + p * 16;
        let mut v = _mm512_fmadd_ps(va, ld_part(&x[i..]), vc);
        if MASK {
            v = _mm512_maskz_mov_ps(not_neg_inf(ld_part(&mask[i..])), v);
        }
        st_part(part, v);
    }
}

/// `buf = ln(a·buf + b) − c`.
#[target_feature(enable = "avx512f")]
pub(super) fn ln_affine(buf: &mut [f32], a: f32, b: f32, c: f32) {
    let (cb, tail) = buf.as_chunks_mut::<32>();
    let (va, vb, vc) = (splat(a), splat(b), splat(c));
    let f = |v: __m512| _mm512_sub_ps(ln16(_mm512_fmadd_ps(va, v, vb)), vc);
    for ch in cb.iter_mut() {
        let (xa, xb) = ld2(ch);
        st2(ch, f(xa), f(xb));
    }
    for part in tail.chunks_mut(16) {
        let v = f(ld_part(part));
        st_part(part, v);
    }
}

/// Reverse-KL pass C: `t ← (z − m)·k − lns − t` (or, `DIRECT`, `t ← (z − t)·k − lns`) and
/// returns `Σ_{e>0} e·inv_s·t`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) fn rev_acc<const DIRECT: bool>(
    z: &[f32],
    m: f32,
    k: f32,
    lns: f32,
    e: &[f32],
    inv_s: f32,
    t: &mut [f32],
) -> f32 {
    let (ct, tail) = t.as_chunks_mut::<32>();
    let n = ct.len();
    let off = n * 32;
    let cz = &z.as_chunks::<32>().0[..n];
    let ce = &e.as_chunks::<32>().0[..n];
    let (vm, vk, vl, vi) = (splat(m), splat(k), splat(lns), splat(inv_s));
    let new_t = |zv: __m512, d: __m512| {
        if DIRECT {
            _mm512_fmsub_ps(_mm512_sub_ps(zv, d), vk, vl)
        } else {
            _mm512_sub_ps(_mm512_fmsub_ps(_mm512_sub_ps(zv, vm), vk, vl), d)
        }
    };
    // acc + (e·inv_s)·t over the lanes of `keep` where e > 0.
    let add = |acc: __m512, ev: __m512, tv: __m512, keep: __mmask16| {
        let ke = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(keep, ev, zero());
        _mm512_fmadd_ps(_mm512_mul_ps(ev, vi), _mm512_maskz_mov_ps(ke, tv), acc)
    };
    let mut total = zero();
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK32).min(n);
        let (mut a0, mut a1) = (zero(), zero());
        for j in i..end {
            let (za, zb) = ld2(&cz[j]);
            let (ea, eb) = ld2(&ce[j]);
            let (da, db) = ld2(&ct[j]);
            let (ta, tb) = (new_t(za, da), new_t(zb, db));
            a0 = add(a0, ea, ta, !0);
            a1 = add(a1, eb, tb, !0);
            st2(&mut ct[j], ta, tb);
        }
        total = _mm512_add_ps(total, _mm512_add_ps(a0, a1));
        i = end;
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let i = off + p * 16;
        let kt = lanes(part.len());
        let tv = new_t(ld_part(&z[i..]), ld_part(part));
        total = add(total, ld_part(&e[i..]), tv, kt);
        st_part(part, tv);
    }
    _mm512_reduce_add_ps(total)
}

/// Reverse-KL pass D: `dst = a·(e·inv_s)·(t − l)`, 0 where `e = 0`.
#[target_feature(enable = "avx512f")]
pub(super) fn rev_grad(e: &[f32], inv_s: f32, t: &[f32], l: f32, a: f32, dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<32>();
    let n = cd.len();
    let off = n * 32;
    let ce = &e.as_chunks::<32>().0[..n];
    let ct = &t.as_chunks::<32>().0[..n];
    let (vi, vl, va) = (splat(inv_s), splat(l), splat(a));
    let g = |ev: __m512, tv: __m512| {
        let v = _mm512_mul_ps(_mm512_mul_ps(va, _mm512_mul_ps(ev, vi)), _mm512_sub_ps(tv, vl));
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(ev, zero()), v)
    };
    for j in 0..n {
        let (ea, eb) = ld2(&ce[j]);
        let (ta, tb) = ld2(&ct[j]);
        st2(&mut cd[j], g(ea, ta), g(eb, tb));
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let i = off + p * 16;
        let v = g(ld_part(&e[i..]), ld_part(&t[i..]));
        st_part(part, v);
    }
}

/// `(#{z > −inf}, Σ_{z > −inf} (z − m)·k)`.
#[target_feature(enable = "avx512f")]
pub(super) fn sum_shifted(z: &[f32], m: f32, k: f32) -> (usize, f32) {
    let (c, tail) = z.as_chunks::<32>();
    let n = c.len();
    let (vm, vk) = (splat(m), splat(k));
    let x = |v: __m512, keep: __mmask16| {
        _mm512_maskz_mov_ps(keep, _mm512_mul_ps(_mm512_sub_ps(v, vm), vk))
    };
    let mut total = zero();
    let mut count = 0usize;
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK32).min(n);
        let (mut s0, mut s1) = (zero(), zero());
        for ch in &c[i..end] {
            let (a, b) = ld2(ch);
            let (fa, fb) = (not_neg_inf(a), not_neg_inf(b));
            s0 = _mm512_add_ps(s0, x(a, fa));
            s1 = _mm512_add_ps(s1, x(b, fb));
            count += (fa.count_ones() + fb.count_ones()) as usize;
        }
        total = _mm512_add_ps(total, _mm512_add_ps(s0, s1));
        i = end;
    }
    for part in tail.chunks(16) {
        let v = ld_part(part);
        let f = lanes(part.len()) & not_neg_inf(v);
        total = _mm512_add_ps(total, x(v, f));
        count += f.count_ones() as usize;
    }
    (count, _mm512_reduce_add_ps(total))
}

/// Full-range `dst = exp(src)`.
#[target_feature(enable = "avx512f")]
pub(super) fn exp_slice(src: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<32>();
    let n = cd.len();
    let off = n * 32;
    let cs = &src.as_chunks::<32>().0[..n];
    for j in 0..n {
        let (a, b) = ld2(&cs[j]);
        st2(&mut cd[j], exp16_full(a), exp16_full(b));
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let v = exp16_full(ld_part(&src[off + p * 16..]));
        st_part(part, v);
    }
}

/// `dst = ln(src)`.
#[target_feature(enable = "avx512f")]
pub(super) fn ln_slice(src: &[f32], dst: &mut [f32]) {
    let (cd, tail) = dst.as_chunks_mut::<32>();
    let n = cd.len();
    let off = n * 32;
    let cs = &src.as_chunks::<32>().0[..n];
    for j in 0..n {
        let (a, b) = ld2(&cs[j]);
        st2(&mut cd[j], ln16(a), ln16(b));
    }
    for (p, part) in tail.chunks_mut(16).enumerate() {
        let v = ln16(ld_part(&src[off + p * 16..]));
        st_part(part, v);
    }
}
