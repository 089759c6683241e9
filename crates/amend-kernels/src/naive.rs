//! Straightforward siblings of the fused kernels (`*_naive`): scalar `f32::exp`/`ln`, one pass
//! per quantity, row sums in f64, exponentials recomputed instead of cached (4 exp per element for a forward KL
//! to a reference target, against 2 in the fused kernel).
//!
//! They take the same arguments, use the same validation, threading and outputs as the fused
//! kernels and agree with them to f32 rounding. They exist as the `naive` baseline of the
//! benchmarks (what a careful first implementation looks like) and as a second implementation in
//! tests. Use the fused kernels otherwise.

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, RowOut, Scratch, label_at};
use crate::token_kl::{check_eps, check_target};
use crate::{
    KernelError, KlDirection, KlTarget, KlValue, Result, SelectedLogpConfig, SelectedLogpOut,
    TokenKlConfig,
};

const NEG_INF: f32 = f32::NEG_INFINITY;

fn check_row(op: &'static str, row: usize, name: &'static str, z: &[f32]) -> Result<f32> {
    let mut m = NEG_INF;
    for &v in z {
        if v.is_nan() || v == f32::INFINITY {
            return Err(KernelError::NonFiniteRow {
                op,
                name,
                row,
                reason: "contains NaN or +inf",
            });
        }
        m = m.max(v);
    }
    if m == NEG_INF && name == "logits" {
        return Err(KernelError::NonFiniteRow {
            op,
            name,
            row,
            reason: "has no finite entry (every logit is -inf)",
        });
    }
    Ok(m)
}

/// Multi-pass sibling of [`crate::selected_logp`] (same arguments and outputs).
///
/// # Errors
///
/// As [`crate::selected_logp`].
pub fn selected_logp_naive(
    io: LogitsIo<'_>,
    vocab: usize,
    labels: &[i64],
    row_scale: Option<&[f32]>,
    cfg: &SelectedLogpConfig,
    out: SelectedLogpOut<'_>,
) -> Result<BatchStats> {
    const OP: &str = "selected_logp_naive";
    batch::check_vocab(OP, vocab)?;
    cfg.validate(OP)?;
    let rows = out.loss.len();
    batch::check_len(OP, "labels", rows, labels.len())?;
    batch::check_row_scale(OP, rows, row_scale)?;
    for (r, &l) in labels.iter().enumerate() {
        if row_scale.is_none_or(|s| s[r] != 0.0) {
            label_at(OP, r, l, vocab, cfg.ignore_index)?;
        }
    }
    let k = (1.0 / cfg.temperature) as f32;
    let softcap = cfg.softcap.map(|c| c as f32);
    let cap = |x: f32| match softcap {
        Some(c) => c * (x / c).tanh(),
        None => x,
    };
    let f = |r: usize, mut buf: RowBuf<'_>, scratch: &mut Scratch| -> Result<Option<RowOut>> {
        let a = row_scale.map_or(1.0, |s| s[r]);
        if a == 0.0 {
            return Ok(None);
        }
        let Some(y) = label_at(OP, r, labels[r], vocab, cfg.ignore_index)? else {
            return Ok(None);
        };
        check_row(OP, r, "logits", buf.z())?;
        if buf.check_only() {
            return Ok(Some(RowOut::default()));
        }
        let (copy, _, _) = scratch.rows();
        let (z, grad) = buf.split(copy);
        // Pass 1: maximum. Pass 2: sum of exponentials (and smoothing statistics).
        let m = z.iter().map(|&x| cap(x) * k).fold(NEG_INF, f32::max);
        let (mut s, mut vp, mut sl) = (0.0f64, 0usize, 0.0f64);
        for &x in z {
            let x = cap(x) * k;
            s += f64::from((x - m).exp());
            if x != NEG_INF {
                vp += 1;
                sl += f64::from(x - m);
            }
        }
        let (s, sl) = (s as f32, sl as f32);
        let lns = s.ln();
        let lse = m + lns;
        let logp = cap(z[y]) * k - lse;
        let eps = cfg.label_smoothing as f32;
        let ce = if eps > 0.0 { -(1.0 - eps) * logp - eps * (sl / vp as f32 - lns) } else { -logp };
        let zl = cfg.lse_square_scale as f32;
        let loss = a * (ce + zl * lse * lse);
        // Pass 3: gradient, exponentials recomputed.
        if let Some(g) = grad {
            for (v, gv) in g.iter_mut().enumerate() {
                let x = cap(z[v]) * k;
                let p = (x - lse).exp();
                let onehot = if v == y { 1.0 - eps } else { 0.0 };
                let uni = if x != NEG_INF && eps > 0.0 { eps / vp as f32 } else { 0.0 };
                let d = softcap.map_or(1.0, |c| 1.0 - (z[v] / c).tanh().powi(2));
                *gv = a * k * (p * (1.0 + 2.0 * zl * lse) - onehot - uni) * d;
            }
        }
        Ok(Some(RowOut { loss, lse, logp, masked_vocab: false }))
    };
    let SelectedLogpOut { loss, lse, logp } = out;
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::values(lse, logp), &f)
}

/// Multi-pass sibling of [`crate::token_kl`] (same arguments and outputs).
///
/// # Errors
///
/// As [`crate::token_kl`].
pub fn token_kl_naive(
    io: LogitsIo<'_>,
    vocab: usize,
    target: KlTarget<'_>,
    row_scale: Option<&[f32]>,
    cfg: &TokenKlConfig,
    loss: &mut [f32],
) -> Result<BatchStats> {
    const OP: &str = "token_kl_naive";
    batch::check_vocab(OP, vocab)?;
    let rows = loss.len();
    batch::elements(OP, rows, vocab)?;
    batch::check_finite_param(OP, "temperature", cfg.temperature, 0.0, false)?;
    let reverse = cfg.direction == KlDirection::Reverse;
    let needs_eps = reverse
        && matches!(target, KlTarget::OneHot { .. } | KlTarget::Reference { exclude: Some(_), .. });
    check_eps(OP, cfg.smoothing_eps, needs_eps)?;
    batch::check_row_scale(OP, rows, row_scale)?;
    let active = |r: usize| row_scale.is_none_or(|s| s[r] != 0.0);
    check_target(OP, &target, rows, vocab, active, cfg.ignore_index)?;
    let k = (1.0 / cfg.temperature) as f32;
    let eps = cfg.smoothing_eps as f32;
    let divergence = cfg.value == KlValue::Divergence;
    let f = |r: usize, mut buf: RowBuf<'_>, scratch: &mut Scratch| -> Result<Option<RowOut>> {
        let a = row_scale.map_or(1.0, |s| s[r]);
        if a == 0.0 {
            return Ok(None);
        }
        let span = r * vocab..(r + 1) * vocab;
        // The target's base distribution u_v, as a function of the column.
        enum T<'a> {
            Ref(&'a [f32], Option<usize>),
            OneHot(usize),
            Log(&'a [f32]),
        }
        let t = match target {
            KlTarget::Reference { ref_logits, exclude } => {
                T::Ref(&ref_logits[span.clone()], exclude.and_then(|e| usize::try_from(e[r]).ok()))
            }
            KlTarget::OneHot { labels } => {
                match label_at(OP, r, labels[r], vocab, cfg.ignore_index)? {
                    Some(y) => T::OneHot(y),
                    None => return Ok(None),
                }
            }
            KlTarget::LogProbs { log_target } => T::Log(&log_target[span.clone()]),
        };
        let m = check_row(OP, r, "logits", buf.z())? * k;
        match &t {
            T::Ref(zr, _) => {
                check_row(OP, r, "ref_logits", zr)?;
            }
            T::Log(lt) => {
                check_row(OP, r, "log_target", lt)?;
            }
            T::OneHot(_) => {}
        }
        if buf.check_only() {
            return Ok(Some(RowOut::default()));
        }
        let (copy, _, _) = scratch.rows();
        let (z, grad) = buf.split(copy);
        let keep = |v: usize| match &t {
            T::Ref(_, ex) => z[v] != NEG_INF && Some(v) != *ex,
            _ => true,
        };
        // Pass 1: reference maximum. Pass 2: sums of exponentials.
        let mr = match &t {
            T::Ref(zr, _) => {
                (0..vocab).filter(|&v| keep(v)).map(|v| zr[v] * k).fold(NEG_INF, f32::max)
            }
            _ => 0.0,
        };
        let (mut s, mut sr, mut vp) = (0.0f64, 0.0f64, 0usize);
        for v in 0..vocab {
            s += f64::from((z[v] * k - m).exp());
            vp += usize::from(z[v] != NEG_INF);
            match &t {
                T::Ref(zr, _) if keep(v) => sr += f64::from((zr[v] * k - mr).exp()),
                T::Log(lt) => sr += f64::from(lt[v].exp()),
                _ => {}
            }
        }
        let (s, sr) = (s as f32, sr as f32);
        let (lns, lnsr) = (s.ln(), sr.ln());
        let d = 1.0 + vp as f32 * eps;
        let base_total = if matches!(t, T::Log(_)) { sr } else { 1.0 };
        // Pass 3 (and 4): exponentials recomputed per element.
        let tv = |v: usize| -> f32 {
            let u = match &t {
                T::Ref(zr, _) => {
                    if keep(v) {
                        (zr[v] * k - mr - lnsr).exp()
                    } else {
                        0.0
                    }
                }
                T::OneHot(y) => f32::from(u8::from(v == *y)),
                T::Log(lt) => lt[v].exp(),
            };
            if eps > 0.0 { if z[v] != NEG_INF { (u + eps) / d } else { 0.0 } } else { u }
        };
        let lp = |v: usize| z[v] * k - m - lns;
        let total = (base_total + vp as f32 * eps) / d;
        let value = if reverse {
            // Pass 3: the divergence; pass 4: the gradient (both recompute p and t).
            let mut kl = 0.0f64;
            for v in 0..vocab {
                let p = lp(v).exp();
                if p > 0.0 {
                    kl += f64::from(p * (lp(v) - tv(v).ln()));
                }
            }
            let kl = kl as f32;
            if let Some(g) = grad {
                for (v, gv) in g.iter_mut().enumerate() {
                    let p = lp(v).exp();
                    *gv = if p > 0.0 { a * k * p * (lp(v) - tv(v).ln() - kl) } else { 0.0 };
                }
            }
            kl
        } else {
            // Pass 3: value and gradient together (2 more exp per element).
            let (mut ce, mut h) = (0.0f64, 0.0f64);
            let mut g = grad;
            for v in 0..vocab {
                let t = tv(v);
                if t > 0.0 {
                    ce -= f64::from(t * lp(v));
                    h -= f64::from(t * t.ln());
                }
                if let Some(g) = g.as_deref_mut() {
                    g[v] = a * k * (lp(v).exp() * total - t);
                }
            }
            (if divergence { ce - h } else { ce }) as f32
        };
        let masked = z.contains(&NEG_INF);
        Ok(Some(RowOut { loss: a * value, lse: m + lns, logp: 0.0, masked_vocab: masked }))
    };
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::none(), &f)
}
