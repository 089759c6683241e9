//! The row algorithms: one row of logits in, its loss (and gradient) out, in a fixed number of
//! sweeps over the row with the SIMD primitives of [`crate::simd`].
//!
//! Every algorithm first scans the row (pass A: maximum, `−inf` and NaN detection; a rejected
//! row errors before anything is written), then caches exponentials in per-thread scratch rows
//! (pass B), and writes the gradient last, reading only scratch. So the in-place mode, where the
//! gradient overwrites the logits, needs no special case: all reads of `z` happen before the
//! first write.

use crate::batch::{RefExp, RowBuf, RowOut, Scratch};
use crate::simd::{self, Scan};
use crate::{KernelError, Result};

const NEG_INF: f32 = f32::NEG_INFINITY;

fn non_finite(
    op: &'static str,
    name: &'static str,
    row: usize,
    reason: &'static str,
) -> KernelError {
    KernelError::NonFiniteRow { op, name, row, reason }
}

/// Pass A over the logits: rejects NaN, `+inf`, and rows without a finite entry.
fn scan_logits(op: &'static str, row: usize, z: &[f32]) -> Result<Scan> {
    let s = simd::scan(z, None, None);
    if s.bad() {
        Err(non_finite(op, "logits", row, "contains NaN or +inf"))
    } else if s.max == NEG_INF {
        Err(non_finite(op, "logits", row, "has no finite entry (every logit is -inf)"))
    } else {
        Ok(s)
    }
}

/// What a KL row's target is built from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Base<'a> {
    /// `softmax(z°·k)` over the row vocabulary, with `exclude` removed (TNT mask-and-renormalise).
    Ref { zr: &'a [f32], exclude: Option<usize> },
    /// `e_y`.
    OneHot(usize),
    /// Precomputed `log q` (not rescaled by the temperature).
    LogProbs(&'a [f32]),
}

/// One KL row: direction, target, smoothing `ε` (`t = (u + ε)/(1 + V'ε)`), the reported value
/// (forward only: cross-entropy or divergence), `k = 1/T`, and the row scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KlSpec<'a> {
    pub reverse: bool,
    pub base: Base<'a>,
    pub eps: f32,
    pub divergence: bool,
    pub k: f32,
    pub scale: f32,
}

/// Validates the target side of a KL row and returns the reference maximum and minimum
/// (`m°`; the minimum tells whether `z°` holds `−inf`).
fn scan_target(
    op: &'static str,
    row: usize,
    base: Base<'_>,
    mask: Option<&[f32]>,
) -> Result<(f32, f32)> {
    match base {
        Base::Ref { zr, exclude } => {
            let s = simd::scan(zr, exclude, mask);
            if s.bad() {
                Err(non_finite(op, "ref_logits", row, "contains NaN or +inf"))
            } else if s.max == NEG_INF {
                Err(non_finite(
                    op,
                    "ref_logits",
                    row,
                    "has no finite entry on the row vocabulary outside the excluded token",
                ))
            } else {
                Ok((s.max, s.min))
            }
        }
        Base::LogProbs(lt) => {
            let s = simd::scan(lt, None, None);
            if s.bad() {
                Err(non_finite(op, "log_target", row, "contains NaN or +inf"))
            } else if s.max == NEG_INF {
                Err(non_finite(op, "log_target", row, "has no mass (every entry is -inf)"))
            } else {
                Ok((0.0, s.min))
            }
        }
        Base::OneHot(_) => Ok((0.0, 0.0)),
    }
}

/// `H(t) = −Σ_{v∈supp} t_v ln t_v` for `t_v = (q_v·inv + ε)/(1 + V'ε)`, in f64 (slow path: only
/// the divergence value of a smoothed forward target needs it).
fn smoothed_entropy(q: &[f32], inv: f32, eps: f32, vp: f32, mask: Option<&[f32]>) -> f32 {
    let d = 1.0 + f64::from(vp) * f64::from(eps);
    let mut h = 0.0f64;
    for (i, &qv) in q.iter().enumerate() {
        if mask.is_some_and(|m| m[i] == NEG_INF) {
            continue;
        }
        let t = (f64::from(qv) * f64::from(inv) + f64::from(eps)) / d;
        if t > 0.0 {
            h -= t * t.ln();
        }
    }
    h as f32
}

/// A forward or reverse KL row.
pub(crate) fn kl_row(
    op: &'static str,
    row: usize,
    buf: RowBuf<'_>,
    scratch: &mut Scratch,
    spec: KlSpec<'_>,
) -> Result<RowOut> {
    if spec.reverse {
        reverse_row(op, row, buf, scratch, spec)
    } else {
        forward_row(op, row, buf, scratch, spec)
    }
}

fn forward_row(
    op: &'static str,
    row: usize,
    mut buf: RowBuf<'_>,
    scratch: &mut Scratch,
    spec: KlSpec<'_>,
) -> Result<RowOut> {
    let KlSpec { base, eps, divergence, k, scale, .. } = spec;
    let z = buf.z();
    let sc = scan_logits(op, row, z)?;
    let m = sc.max;
    let neg_inf = sc.min == NEG_INF;
    let mask = neg_inf.then_some(z);
    let (ref_max, ref_min) = scan_target(op, row, base, mask)?;
    if buf.check_only() {
        return Ok(RowOut::default());
    }
    let grad = buf.wants_grad();
    let stream = scratch.stream && matches!(buf, RowBuf::Grad(..));
    let prefetch = scratch.prefetch;
    let (s1, s2, s3) = scratch.rows();
    let smooth = eps > 0.0;
    let (vp, sx) = if smooth { simd::sum_shifted(z, m, k) } else { (z.len(), 0.0) };
    let vpf = vp as f32;
    let d = 1.0 + vpf * eps;
    // Where a smoothed gradient must be zeroed (columns with z = −inf), copied out of `z` so
    // that the mask survives an in-place gradient write.
    let grad_mask = grad && neg_inf && smooth;
    if grad_mask {
        s3.copy_from_slice(z);
    }

    let mut ref_exp = None;
    let (value, lns, coef_e, coef_t, uniform) = match base {
        Base::Ref { zr, exclude } => {
            let store = grad || (smooth && divergence);
            let kl_acc = !smooth && divergence;
            let outs = store.then_some((&mut *s1, &mut *s2));
            let guard = neg_inf || ref_min == NEG_INF;
            let params = simd::FwdParams {
                m,
                mr: ref_max,
                k,
                skip: exclude,
                masked: neg_inf,
                kl: kl_acc,
                guard,
                prefetch: if prefetch.contains(&0) { [0, 0] } else { prefetch },
            };
            let (s, sr, acc) = simd::fwd_b(z, zr, &params, outs);
            if store && k == 1.0 {
                ref_exp = Some(RefExp { shift: ref_max, sum: sr, exclude });
            }
            let (lns, lnsr) = (s.ln(), sr.ln());
            let value = if !smooth {
                if divergence { acc / sr + lns - lnsr } else { lns - acc / sr }
            } else {
                let ce = (lns - acc / sr + eps * (vpf * lns - sx)) / d;
                if divergence { ce - smoothed_entropy(s2, 1.0 / sr, eps, vpf, mask) } else { ce }
            };
            (value, lns, scale * k / s, -scale * k / (sr * d), -scale * k * eps / d)
        }
        Base::LogProbs(lt) => {
            let store = grad || (smooth && divergence);
            let kl_acc = !smooth && divergence;
            let outs = store.then_some((&mut *s1, &mut *s2));
            let (s, q, acc) = simd::fwd_b_logq(z, m, k, lt, kl_acc, outs);
            let lns = s.ln();
            let value = if !smooth {
                if divergence { acc + q * lns } else { q * lns - acc }
            } else {
                let ce = (q * lns - acc + eps * (vpf * lns - sx)) / d;
                if divergence { ce - smoothed_entropy(s2, 1.0, eps, vpf, mask) } else { ce }
            };
            let total = (q + vpf * eps) / d;
            (value, lns, scale * k * total / s, -scale * k / d, -scale * k * eps / d)
        }
        Base::OneHot(y) => {
            let s = simd::exp_sum_pf(z, m, k, grad.then_some(&mut *s1), prefetch[0]);
            let lns = s.ln();
            let nll = lns - (z[y] - m) * k;
            let ce = if smooth { (nll + eps * (vpf * lns - sx)) / d } else { nll };
            let value = if smooth && divergence {
                // H(t) of t_y = (1 + ε)/(1 + V'ε) and V' − 1 entries ε/(1 + V'ε).
                let (e, vp, dd) = (f64::from(eps), f64::from(vpf), f64::from(d));
                let (ty, u) = ((1.0 + e) / dd, e / dd);
                let h = -(ty * ty.ln() + (vp - 1.0) * u * u.ln());
                ce - h as f32
            } else {
                ce
            };
            (value, lns, scale * k / s, 0.0, -scale * k * eps / d)
        }
    };
    let lse = m * k + lns;
    if let Some(g) = buf.grad() {
        let gm = grad_mask.then_some(&*s3);
        match base {
            Base::OneHot(y) => {
                if stream && gm.is_none() && uniform == 0.0 {
                    simd::axpby_stream(coef_e, s1, 0.0, s1, g);
                } else {
                    simd::axc(coef_e, s1, uniform, gm, g);
                }
                g[y] -= scale * k / d;
            }
            Base::Ref { .. } if stream && gm.is_none() && uniform == 0.0 => {
                simd::axpby_stream(coef_e, s1, coef_t, s2, g)
            }
            Base::Ref { .. } | Base::LogProbs(_) => {
                simd::axpbyc(coef_e, s1, coef_t, s2, uniform, gm, g)
            }
        }
    }
    scratch.ref_exp = ref_exp;
    Ok(RowOut { loss: scale * value, lse, logp: 0.0, masked_vocab: neg_inf })
}

fn reverse_row(
    op: &'static str,
    row: usize,
    mut buf: RowBuf<'_>,
    scratch: &mut Scratch,
    spec: KlSpec<'_>,
) -> Result<RowOut> {
    let KlSpec { base, eps, k, scale, .. } = spec;
    let z = buf.z();
    let sc = scan_logits(op, row, z)?;
    let m = sc.max;
    let neg_inf = sc.min == NEG_INF;
    let mask = neg_inf.then_some(z);
    let (ref_max, _) = scan_target(op, row, base, mask)?;
    if buf.check_only() {
        return Ok(RowOut::default());
    }
    let prefetch = scratch.prefetch;
    let (s1, s2, _) = scratch.rows();
    let s = simd::exp_sum_pf(z, m, k, Some(&mut *s1), prefetch[0]);
    let lns = s.ln();
    let vp = if neg_inf && eps > 0.0 { simd::sum_shifted(z, m, k).0 } else { z.len() };
    let c = (vp as f64 * f64::from(eps)).ln_1p() as f32;
    // s2 ← log d (or, for an unsmoothed reference, z° itself: see `simd::rev_acc`).
    let mut direct = None;
    match base {
        Base::Ref { zr, exclude } => {
            if eps > 0.0 {
                let sr = if mask.is_none() && exclude.is_none() {
                    simd::exp_sum_pf(zr, ref_max, k, Some(&mut *s2), prefetch[1])
                } else {
                    simd::exp_sum(zr, mask, ref_max, k, Some(&mut *s2), exclude)
                };
                simd::ln_affine(s2, 1.0 / sr, eps, c);
            } else {
                // `exclude` is rejected with ε = 0 (the divergence would be +inf).
                let sr = simd::exp_sum(zr, mask, ref_max, k, None, exclude);
                s2.copy_from_slice(zr);
                direct = Some((m - ref_max) * k + lns - sr.ln());
            }
        }
        Base::OneHot(y) => {
            let e = f64::from(eps);
            s2.fill((e.ln() - f64::from(c)) as f32);
            s2[y] = (e.ln_1p() - f64::from(c)) as f32;
        }
        Base::LogProbs(lt) => {
            if eps > 0.0 {
                // The lengths are equal by construction (both are one row).
                let _ = simd::exp_f32(lt, s2);
                simd::ln_affine(s2, 1.0, eps, c);
            } else {
                s2.copy_from_slice(lt);
            }
        }
    }
    let inv_s = 1.0 / s;
    let l = match direct {
        Some(c) => simd::rev_acc(true, z, m, k, c, s1, inv_s, s2),
        None => simd::rev_acc(false, z, m, k, lns, s1, inv_s, s2),
    };
    if let Some(g) = buf.grad() {
        simd::rev_grad(s1, inv_s, s2, l, scale * k, g);
    }
    Ok(RowOut { loss: scale * l, lse: m * k + lns, logp: 0.0, masked_vocab: neg_inf })
}

/// A selected-token row: cross-entropy (with label smoothing, z-loss, softcap, temperature).
///
/// `floor`: when `log p_y < floor` the row reports `−scale·floor` with a zero gradient (the NL
/// threshold of t5patches, used with a negative scale).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeSpec {
    pub label: usize,
    pub smoothing: f32,
    pub z_loss: f32,
    pub softcap: Option<f32>,
    pub k: f32,
    pub scale: f32,
    pub floor: Option<f32>,
}

pub(crate) fn ce_row(
    op: &'static str,
    row: usize,
    mut buf: RowBuf<'_>,
    scratch: &mut Scratch,
    spec: CeSpec,
) -> Result<RowOut> {
    let CeSpec { label: y, smoothing, z_loss, softcap, k, scale, floor } = spec;
    let z = buf.z();
    let sc = scan_logits(op, row, z)?;
    if buf.check_only() {
        return Ok(RowOut::default());
    }
    let grad = buf.wants_grad();
    let stream = scratch.stream && matches!(buf, RowBuf::Grad(..));
    let prefetch = scratch.prefetch[0];
    let (s1, s2, s3) = scratch.rows();
    let (m, neg_inf) = match softcap {
        Some(c) => {
            for (d, &x) in s3.iter_mut().zip(z) {
                *d = c * (x / c).tanh();
            }
            (c * (sc.max / c).tanh(), false)
        }
        None => (sc.max, sc.min == NEG_INF),
    };
    let smooth = smoothing > 0.0;
    let grad_mask = grad && neg_inf && smooth;
    if grad_mask {
        s2.copy_from_slice(z);
    }
    let zz: &[f32] = if softcap.is_some() { s3 } else { z };
    let s = simd::exp_sum_pf(zz, m, k, grad.then_some(&mut *s1), prefetch);
    let lns = s.ln();
    let lse = m * k + lns;
    let logp = (zz[y] - m) * k - lns;
    let (vp, sx) = if smooth { simd::sum_shifted(zz, m, k) } else { (zz.len(), 0.0) };
    let floored = floor.is_some_and(|f| logp < f);
    let value = if let Some(f) = floor.filter(|_| floored) {
        -f
    } else {
        let nll = -logp;
        let ce =
            if smooth { (1.0 - smoothing) * nll + smoothing * (lns - sx / vp as f32) } else { nll };
        ce + z_loss * lse * lse
    };
    if let Some(g) = buf.grad() {
        if floored {
            g.fill(0.0);
        } else {
            let coef = scale * k * (1.0 + 2.0 * z_loss * lse) / s;
            let uniform = -scale * k * smoothing / vp as f32;
            if stream && uniform == 0.0 {
                simd::axpby_stream(coef, s1, 0.0, s1, g);
            } else {
                simd::axc(coef, s1, uniform, grad_mask.then_some(&*s2), g);
            }
            g[y] -= scale * k * (1.0 - smoothing);
            if let Some(c) = softcap {
                for (gv, &t) in g.iter_mut().zip(s3.iter()) {
                    let u = t / c;
                    *gv *= 1.0 - u * u;
                }
            }
        }
    }
    Ok(RowOut { loss: scale * value, lse, logp, masked_vocab: neg_inf })
}

/// An unlikelihood row: `scale·[n·(−log p_x) − α Σ_{c∈C} log(1 − p_c)]`, `n = 1` when an NLL
/// label is given. `cands` must be sorted, deduplicated and in range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UlSpec<'a> {
    pub nll: Option<usize>,
    pub cands: &'a [usize],
    pub alpha: f32,
    pub scale: f32,
}

pub(crate) fn ul_row(
    op: &'static str,
    row: usize,
    mut buf: RowBuf<'_>,
    scratch: &mut Scratch,
    spec: UlSpec<'_>,
) -> Result<RowOut> {
    let UlSpec { nll, cands, alpha, scale } = spec;
    let z = buf.z();
    let sc = scan_logits(op, row, z)?;
    if buf.check_only() {
        return Ok(RowOut::default());
    }
    let m = sc.max;
    let (s1, s2, _, ratios) = scratch.parts();
    // The argmax `d` (first maximal index): only it can have p > 1/2.
    let d = z.iter().position(|&v| v == m).unwrap_or(0);
    let s = simd::exp_sum(z, None, m, 1.0, Some(&mut *s1), None);
    let lns = s.ln();
    let d_in = cands.binary_search(&d).is_ok();
    // LSE without d, with its own maximum, so it stays exact when every other entry underflows
    // against z_d (the saturated case E1 and beyond): LSE_{≠d} = md + ln(rest).
    let (md, rest) = if d_in {
        let sd = simd::scan(z, Some(d), None);
        if sd.max == NEG_INF {
            (NEG_INF, 0.0)
        } else {
            (sd.max, simd::exp_sum(z, None, sd.max, 1.0, Some(&mut *s2), Some(d)))
        }
    } else {
        (0.0, 0.0)
    };
    let n = if nll.is_some() { 1.0 } else { 0.0 };
    let mut loss = nll.map_or(0.0, |x| lns - (z[x] - m));
    // r_c = p_c/(1 − p_c) = exp(l_c − λ_c) for c ≠ d, kept for the gradient (all reads of z
    // happen before the gradient is written, which may be in place).
    ratios.clear();
    let mut s_prime = 0.0f32;
    for &c in cands {
        let lc = (z[c] - m) - lns;
        let lam = if c != d || lc <= -std::f32::consts::LN_2 {
            (-lc.exp()).ln_1p()
        } else {
            (md - m) + rest.ln() - lns
        };
        loss -= alpha * lam;
        let r = if c != d { (lc - lam).exp() } else { 0.0 };
        s_prime += r;
        ratios.push(r);
    }
    if let Some(g) = buf.grad() {
        let pd = 1.0 / s;
        let coef_e = scale * (n - alpha * s_prime) / s;
        let q_coef = if d_in && rest > 0.0 { scale * alpha * pd / rest } else { 0.0 };
        if d_in {
            simd::axpbyc(coef_e, s1, -q_coef, s2, 0.0, None, g);
        } else {
            simd::axc(coef_e, s1, 0.0, None, g);
        }
        if let Some(x) = nll {
            g[x] -= scale * n;
        }
        for (&c, &r) in cands.iter().zip(ratios.iter()) {
            g[c] += scale * alpha * if c == d { pd } else { r };
        }
    }
    Ok(RowOut { loss: scale * loss, lse: m + lns, logp: 0.0, masked_vocab: sc.min == NEG_INF })
}
