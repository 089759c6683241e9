//! Portable row primitives: plain Rust loops over the scalar polynomial `exp`/`ln` (separate
//! multiply and add, no FMA), with row sums accumulated in f64. Used where neither AVX-512F nor
//! AVX2+FMA is available, or when `AMEND_KERNELS_SIMD=portable` is set. Same contracts as the
//! vector versions.

use super::Scan;
use super::scalar::{self, EXP_LO};

const NEG_INF: f32 = f32::NEG_INFINITY;

#[inline(always)]
fn exp(x: f32) -> f32 {
    scalar::exp::<false>(x)
}

pub(super) fn scan(z: &[f32]) -> Scan {
    let mut s = Scan::EMPTY;
    for &v in z {
        s.push(v);
    }
    s
}

pub(super) fn scan_masked(zr: &[f32], z: &[f32]) -> Scan {
    let mut s = Scan::EMPTY;
    for (&v, &zv) in zr.iter().zip(z) {
        s.push_masked(v, zv);
    }
    s
}

pub(super) fn exp_sum(
    src: &[f32],
    mask: Option<&[f32]>,
    shift: f32,
    k: f32,
    mut dst: Option<&mut [f32]>,
) -> f32 {
    let mut s = 0.0f64;
    let mk = shift * k;
    for (i, &v) in src.iter().enumerate() {
        let masked = mask.is_some_and(|m| m[i] == NEG_INF);
        let e = if masked { 0.0 } else { exp(v * k - mk) };
        s += f64::from(e);
        if let Some(d) = dst.as_deref_mut() {
            d[i] = e;
        }
    }
    s as f32
}

#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_b(
    z: &[f32],
    m: f32,
    zr: &[f32],
    mr: f32,
    k: f32,
    masked: bool,
    kl: bool,
    mut outs: Option<(&mut [f32], &mut [f32])>,
) -> (f32, f32, f32) {
    let (mut s, mut sr, mut acc) = (0.0f64, 0.0f64, 0.0f64);
    let (mk, mrk) = (m * k, mr * k);
    for (i, (&zv, &rv)) in z.iter().zip(zr).enumerate() {
        let x = zv * k - mk;
        let xr = rv * k - mrk;
        let e = exp(x);
        let keep = xr >= EXP_LO && !(masked && zv == NEG_INF);
        let er = if keep { exp(xr) } else { 0.0 };
        if keep {
            acc += f64::from(er) * f64::from(if kl { xr - x } else { x });
        }
        s += f64::from(e);
        sr += f64::from(er);
        if let Some((eo, ero)) = outs.as_mut() {
            eo[i] = e;
            ero[i] = er;
        }
    }
    (s as f32, sr as f32, acc as f32)
}

pub(super) fn fwd_b_logq(
    z: &[f32],
    m: f32,
    k: f32,
    lt: &[f32],
    kl: bool,
    mut outs: Option<(&mut [f32], &mut [f32])>,
) -> (f32, f32, f32) {
    let (mut s, mut sq, mut acc) = (0.0f64, 0.0f64, 0.0f64);
    for (i, (&zv, &l)) in z.iter().zip(lt).enumerate() {
        let x = (zv - m) * k;
        let e = exp(x);
        let q = exp(l);
        if q > 0.0 {
            acc += f64::from(q) * f64::from(if kl { l - x } else { x });
        }
        s += f64::from(e);
        sq += f64::from(q);
        if let Some((eo, qo)) = outs.as_mut() {
            eo[i] = e;
            qo[i] = q;
        }
    }
    (s as f32, sq as f32, acc as f32)
}

pub(super) fn axpbyc(
    a: f32,
    x: &[f32],
    b: f32,
    y: &[f32],
    c: f32,
    mask: Option<&[f32]>,
    dst: &mut [f32],
) {
    for (i, g) in dst.iter_mut().enumerate() {
        *g = if mask.is_some_and(|m| m[i] == NEG_INF) { 0.0 } else { a * x[i] + (b * y[i] + c) };
    }
}

pub(super) fn axc(a: f32, x: &[f32], c: f32, mask: Option<&[f32]>, dst: &mut [f32]) {
    for (i, g) in dst.iter_mut().enumerate() {
        *g = if mask.is_some_and(|m| m[i] == NEG_INF) { 0.0 } else { a * x[i] + c };
    }
}

pub(super) fn ln_affine(buf: &mut [f32], a: f32, b: f32, c: f32) {
    for v in buf {
        *v = scalar::ln::<false>(a * *v + b) - c;
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rev_acc(
    direct: bool,
    z: &[f32],
    m: f32,
    k: f32,
    lns: f32,
    e: &[f32],
    inv_s: f32,
    t: &mut [f32],
) -> f32 {
    let mut l = 0.0f64;
    for (i, tv) in t.iter_mut().enumerate() {
        let tt = if direct { (z[i] - *tv) * k - lns } else { ((z[i] - m) * k - lns) - *tv };
        if e[i] > 0.0 {
            l += f64::from(e[i] * inv_s) * f64::from(tt);
        }
        *tv = tt;
    }
    l as f32
}

pub(super) fn rev_grad(e: &[f32], inv_s: f32, t: &[f32], l: f32, a: f32, dst: &mut [f32]) {
    for (i, g) in dst.iter_mut().enumerate() {
        *g = if e[i] > 0.0 { a * (e[i] * inv_s) * (t[i] - l) } else { 0.0 };
    }
}

pub(super) fn sum_shifted(z: &[f32], m: f32, k: f32) -> (usize, f32) {
    let (mut n, mut s) = (0usize, 0.0f64);
    for &v in z {
        if v != NEG_INF {
            n += 1;
            s += f64::from((v - m) * k);
        }
    }
    (n, s as f32)
}

pub(super) fn exp_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = exp(v);
    }
}

pub(super) fn ln_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = scalar::ln::<false>(v);
    }
}
