//! f64 reference oracles (`*_ref`): simple, slow, obviously right.
//!
//! Each oracle takes the same arguments as its kernel, with `f64` data, materialises
//! log-probabilities and targets per row in plain loops, and returns every per-row output in a
//! [`RefOutput`]. They share no numeric code with the kernels (no SIMD, no cached exponentials,
//! no closed-form shortcuts): the unlikelihood oracle, for example, evaluates `log(1 − p_c)` as
//! `LSE_{v≠c} − LSE` directly and its gradient as `p_c·(e_c − q⁽ᶜ⁾)` for every candidate. Tests
//! check the kernels against them and the oracles themselves against f64 finite differences and
//! the spec's test vectors.
//!
//! Structural problems (lengths, labels, configuration) give the same errors as the kernels; row
//! contents are not validated (NaN propagates).

use crate::batch::{self, label_at};
use crate::token_kl::{check_eps, check_target};
use crate::{
    Candidates, KernelError, KlDirection, KlTarget, KlValue, Result, SelectedLogpConfig,
    TntKernelConfig, TntVariant, TokenKlConfig, UnlikelihoodConfig,
};

const NEG_INF: f64 = f64::NEG_INFINITY;

/// Everything an oracle computes. Inactive rows hold zeros.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RefOutput {
    /// Per-row loss, `[rows]` (row scale included).
    pub loss: Vec<f64>,
    /// `∂loss[r]/∂logits[r]`, `[rows, vocab]`.
    pub grad: Vec<f64>,
    /// Per-row `LSE` of the (transformed) logits, `[rows]`.
    pub lse: Vec<f64>,
    /// Per-row `log p_y` ([`selected_logp_ref`] only), `[rows]`.
    pub logp: Vec<f64>,
    /// `Σ loss`.
    pub sum: f64,
    /// Number of active rows.
    pub count: usize,
}

impl RefOutput {
    fn new(rows: usize, vocab: usize) -> Self {
        RefOutput {
            loss: vec![0.0; rows],
            grad: vec![0.0; rows * vocab],
            lse: vec![0.0; rows],
            logp: vec![0.0; rows],
            sum: 0.0,
            count: 0,
        }
    }

    fn set(&mut self, r: usize, vocab: usize, row: RowRef) {
        self.loss[r] = row.loss;
        self.grad[r * vocab..(r + 1) * vocab].copy_from_slice(&row.grad);
        self.lse[r] = row.lse;
        self.logp[r] = row.logp;
        self.count += 1;
    }

    fn finish(mut self) -> Self {
        self.sum = self.loss.iter().sum();
        self
    }
}

/// One row's oracle result.
struct RowRef {
    loss: f64,
    grad: Vec<f64>,
    lse: f64,
    logp: f64,
}

/// `log Σ exp` over the finite entries (`−inf` if none).
fn lse(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().filter(|x| *x != NEG_INF).fold(NEG_INF, f64::max);
    if m == NEG_INF {
        return NEG_INF;
    }
    m + xs.filter(|x| *x != NEG_INF).map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn rows_of(op: &'static str, len: usize, vocab: usize) -> Result<usize> {
    batch::check_vocab(op, vocab)?;
    if !len.is_multiple_of(vocab) {
        return Err(KernelError::LengthMismatch {
            op,
            name: "logits",
            expected: len.div_ceil(vocab) * vocab,
            got: len,
        });
    }
    Ok(len / vocab)
}

fn check_scale(op: &'static str, rows: usize, s: Option<&[f64]>) -> Result<()> {
    if let Some(s) = s {
        batch::check_len(op, "row_scale", rows, s.len())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// selected_logp

/// Oracle of [`crate::selected_logp`]: per row `z̃ = softcap(z)/T`, `l = log_softmax(z̃)`,
/// `loss = a·(−(1−ε)·l_y − (ε/V')·Σ_supp l_v + s·lse²)` and its gradient.
///
/// # Errors
///
/// As [`crate::selected_logp`] for structural problems.
pub fn selected_logp_ref(
    logits: &[f64],
    vocab: usize,
    labels: &[i64],
    row_scale: Option<&[f64]>,
    cfg: &SelectedLogpConfig,
) -> Result<RefOutput> {
    const OP: &str = "selected_logp_ref";
    let rows = rows_of(OP, logits.len(), vocab)?;
    cfg.validate(OP)?;
    batch::check_len(OP, "labels", rows, labels.len())?;
    check_scale(OP, rows, row_scale)?;
    let mut out = RefOutput::new(rows, vocab);
    for r in 0..rows {
        let a = row_scale.map_or(1.0, |s| s[r]);
        if a == 0.0 {
            continue;
        }
        let Some(y) = label_at(OP, r, labels[r], vocab, cfg.ignore_index)? else { continue };
        let z = &logits[r * vocab..(r + 1) * vocab];
        out.set(r, vocab, ce_row_ref(z, y, cfg, a, None));
    }
    Ok(out.finish())
}

fn ce_row_ref(z: &[f64], y: usize, cfg: &SelectedLogpConfig, a: f64, floor: Option<f64>) -> RowRef {
    let k = 1.0 / cfg.temperature;
    let (zt, dcap): (Vec<f64>, Vec<f64>) = match cfg.softcap {
        Some(c) => z.iter().map(|&x| ((x / c).tanh() * c, 1.0 - (x / c).tanh().powi(2))).unzip(),
        None => (z.to_vec(), vec![1.0; z.len()]),
    };
    let zs: Vec<f64> = zt.iter().map(|&x| x * k).collect();
    let lse_v = lse(zs.iter().copied());
    let l: Vec<f64> = zs.iter().map(|&x| x - lse_v).collect();
    let p: Vec<f64> = l.iter().map(|&v| v.exp()).collect();
    let supp: Vec<bool> = zs.iter().map(|&x| x != NEG_INF).collect();
    let vp = supp.iter().filter(|&&s| s).count() as f64;
    let eps = cfg.label_smoothing;
    let zl = cfg.lse_square_scale;
    if let Some(f) = floor.filter(|&f| l[y] < f) {
        return RowRef { loss: -a * f, grad: vec![0.0; z.len()], lse: lse_v, logp: l[y] };
    }
    let mean_l: f64 = l.iter().zip(&supp).filter(|(_, s)| **s).map(|(v, _)| *v).sum::<f64>() / vp;
    let ce = if eps > 0.0 { -(1.0 - eps) * l[y] - eps * mean_l } else { -l[y] };
    let loss = a * (ce + zl * lse_v * lse_v);
    let grad = (0..z.len())
        .map(|v| {
            let onehot = if v == y { 1.0 - eps } else { 0.0 };
            let uni = if supp[v] && eps > 0.0 { eps / vp } else { 0.0 };
            a * k * (p[v] * (1.0 + 2.0 * zl * lse_v) - onehot - uni) * dcap[v]
        })
        .collect();
    RowRef { loss, grad, lse: lse_v, logp: l[y] }
}

// ---------------------------------------------------------------------------------------------
// token_kl

/// The target of one KL row as log-probabilities (`−inf` = no mass), before smoothing.
enum RowTarget<'a> {
    Ref { zr: &'a [f64], exclude: Option<usize> },
    OneHot(usize),
    LogProbs(&'a [f64]),
}

struct KlRowCfg {
    reverse: bool,
    divergence: bool,
    eps: f64,
    k: f64,
}

fn kl_row_ref(z: &[f64], target: RowTarget<'_>, c: &KlRowCfg, a: f64) -> RowRef {
    let v_len = z.len();
    let zs: Vec<f64> = z.iter().map(|&x| x * c.k).collect();
    let supp: Vec<bool> = z.iter().map(|&x| x != NEG_INF).collect();
    let vp = supp.iter().filter(|&&s| s).count() as f64;
    let lse_v = lse(zs.iter().copied());
    let l: Vec<f64> = zs.iter().map(|&x| x - lse_v).collect();
    let p: Vec<f64> = l.iter().map(|&v| v.exp()).collect();
    // Target probabilities t (smoothed if ε > 0) and their logs.
    let base: Vec<f64> = match target {
        RowTarget::Ref { zr, exclude } => {
            let keep = |v: usize| supp[v] && Some(v) != exclude;
            let c_ref = lse((0..v_len).filter(|&v| keep(v)).map(|v| zr[v] * c.k));
            (0..v_len).map(|v| if keep(v) { (zr[v] * c.k - c_ref).exp() } else { 0.0 }).collect()
        }
        RowTarget::OneHot(y) => (0..v_len).map(|v| if v == y { 1.0 } else { 0.0 }).collect(),
        RowTarget::LogProbs(lt) => lt.iter().map(|&x| x.exp()).collect(),
    };
    let d = 1.0 + vp * c.eps;
    let t: Vec<f64> =
        (0..v_len)
            .map(|v| {
                if c.eps > 0.0 {
                    if supp[v] { (base[v] + c.eps) / d } else { 0.0 }
                } else {
                    base[v]
                }
            })
            .collect();
    if c.reverse {
        let logt: Vec<f64> = t.iter().map(|&x| x.ln()).collect();
        let kl: f64 = (0..v_len).filter(|&v| p[v] > 0.0).map(|v| p[v] * (l[v] - logt[v])).sum();
        let grad = (0..v_len)
            .map(|v| if p[v] > 0.0 { a * c.k * p[v] * (l[v] - logt[v] - kl) } else { 0.0 })
            .collect();
        return RowRef { loss: a * kl, grad, lse: lse_v, logp: 0.0 };
    }
    let ce: f64 = (0..v_len).filter(|&v| t[v] > 0.0).map(|v| -t[v] * l[v]).sum();
    let h: f64 = t.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum();
    let total: f64 = t.iter().sum();
    let value = if c.divergence { ce - h } else { ce };
    let grad = (0..v_len).map(|v| a * c.k * (p[v] * total - t[v])).collect();
    RowRef { loss: a * value, grad, lse: lse_v, logp: 0.0 }
}

/// Oracle of [`crate::token_kl`]: builds `log p`, the target `t` (smoothed when `ε > 0`) and
/// evaluates the forward cross-entropy / divergence or the reverse KL and their gradients
/// literally.
///
/// # Errors
///
/// As [`crate::token_kl`] for structural problems.
pub fn token_kl_ref(
    logits: &[f64],
    vocab: usize,
    target: KlTarget<'_, f64>,
    row_scale: Option<&[f64]>,
    cfg: &TokenKlConfig,
) -> Result<RefOutput> {
    const OP: &str = "token_kl_ref";
    let rows = rows_of(OP, logits.len(), vocab)?;
    check_scale(OP, rows, row_scale)?;
    let needs_eps = cfg.direction == KlDirection::Reverse
        && matches!(target, KlTarget::OneHot { .. } | KlTarget::Reference { exclude: Some(_), .. });
    check_eps(OP, cfg.smoothing_eps, needs_eps)?;
    batch::check_finite_param(OP, "temperature", cfg.temperature, 0.0, false)?;
    let active = |r: usize| row_scale.is_none_or(|s| s[r] != 0.0);
    check_target(OP, &target, rows, vocab, active, cfg.ignore_index)?;
    let c = KlRowCfg {
        reverse: cfg.direction == KlDirection::Reverse,
        divergence: cfg.value == KlValue::Divergence,
        eps: cfg.smoothing_eps,
        k: 1.0 / cfg.temperature,
    };
    let mut out = RefOutput::new(rows, vocab);
    for r in 0..rows {
        let a = row_scale.map_or(1.0, |s| s[r]);
        if a == 0.0 {
            continue;
        }
        let span = r * vocab..(r + 1) * vocab;
        let t = match target {
            KlTarget::Reference { ref_logits, exclude } => RowTarget::Ref {
                zr: &ref_logits[span.clone()],
                exclude: exclude.and_then(|e| usize::try_from(e[r]).ok()),
            },
            KlTarget::OneHot { labels } => {
                match label_at(OP, r, labels[r], vocab, cfg.ignore_index)? {
                    Some(y) => RowTarget::OneHot(y),
                    None => continue,
                }
            }
            KlTarget::LogProbs { log_target } => RowTarget::LogProbs(&log_target[span.clone()]),
        };
        out.set(r, vocab, kl_row_ref(&logits[span], t, &c, a));
    }
    Ok(out.finish())
}

// ---------------------------------------------------------------------------------------------
// unlikelihood

fn ul_row_ref(z: &[f64], nll: Option<usize>, cands: &[usize], alpha: f64, a: f64) -> RowRef {
    let v_len = z.len();
    let lse_v = lse(z.iter().copied());
    let p: Vec<f64> = z.iter().map(|&x| (x - lse_v).exp()).collect();
    let mut loss = 0.0;
    let mut grad = vec![0.0; v_len];
    if let Some(x) = nll {
        loss += lse_v - z[x];
        for v in 0..v_len {
            grad[v] += p[v] - if v == x { 1.0 } else { 0.0 };
        }
    }
    for &c in cands {
        let lse_rest = lse((0..v_len).filter(|&v| v != c).map(|v| z[v]));
        loss -= alpha * (lse_rest - lse_v);
        for v in 0..v_len {
            let q = if v == c { 0.0 } else { (z[v] - lse_rest).exp() };
            grad[v] += alpha * p[c] * (if v == c { 1.0 } else { 0.0 } - q);
        }
    }
    RowRef {
        loss: a * loss,
        grad: grad.into_iter().map(|g| a * g).collect(),
        lse: lse_v,
        logp: 0.0,
    }
}

/// Oracle of [`crate::unlikelihood`]: `log(1 − p_c) = LSE_{v≠c}(z) − LSE(z)` summed directly,
/// gradient `p_c·(e_c − q⁽ᶜ⁾)` per candidate.
///
/// # Errors
///
/// As [`crate::unlikelihood`] for structural problems.
pub fn unlikelihood_ref(
    logits: &[f64],
    vocab: usize,
    labels: Option<&[i64]>,
    candidates: Candidates<'_>,
    row_scale: Option<&[f64]>,
    cfg: &UnlikelihoodConfig,
) -> Result<RefOutput> {
    const OP: &str = "unlikelihood_ref";
    let rows = rows_of(OP, logits.len(), vocab)?;
    check_scale(OP, rows, row_scale)?;
    if let Some(l) = labels {
        batch::check_len(OP, "labels", rows, l.len())?;
    }
    let mut out = RefOutput::new(rows, vocab);
    for r in 0..rows {
        let a = row_scale.map_or(1.0, |s| s[r]);
        if a == 0.0 {
            continue;
        }
        let nll = match labels {
            Some(l) => label_at(OP, r, l[r], vocab, cfg.ignore_index)?,
            None => None,
        };
        let ids: &[i64] = match candidates {
            Candidates::Csr { offsets, ids } => &ids[offsets[r]..offsets[r + 1]],
            Candidates::Padded { ids, width } => &ids[r * width..(r + 1) * width],
        };
        let mut cands: Vec<usize> = Vec::new();
        for &id in ids {
            if id < 0 {
                continue;
            }
            if id as u64 >= vocab as u64 {
                return Err(KernelError::CandidateOutOfRange { op: OP, row: r, id, vocab });
            }
            if !cands.contains(&(id as usize)) {
                cands.push(id as usize);
            }
        }
        if nll.is_none() && cands.is_empty() {
            continue;
        }
        let z = &logits[r * vocab..(r + 1) * vocab];
        out.set(r, vocab, ul_row_ref(z, nll, &cands, cfg.alpha, a));
    }
    Ok(out.finish())
}

// ---------------------------------------------------------------------------------------------
// tnt

/// Oracle of [`crate::tnt`]: each row evaluated by the matching single-term oracle above.
///
/// # Errors
///
/// As [`crate::tnt`] for structural problems.
pub fn tnt_ref(
    logits: &[f64],
    vocab: usize,
    ref_logits: Option<&[f64]>,
    labels: &[i64],
    weights: &[f64],
    cfg: &TntKernelConfig,
) -> Result<RefOutput> {
    const OP: &str = "tnt_ref";
    let rows = rows_of(OP, logits.len(), vocab)?;
    cfg.validate(OP)?;
    batch::check_len(OP, "labels", rows, labels.len())?;
    batch::check_len(OP, "weights", rows, weights.len())?;
    let alpha = cfg.alpha;
    let eps = cfg.smoothing_eps;
    let div = cfg.forward_value == KlValue::Divergence;
    let mut out = RefOutput::new(rows, vocab);
    for r in 0..rows {
        let w = weights[r];
        if w == 0.0 {
            continue;
        }
        if w != 1.0 && w != -1.0 {
            return Err(KernelError::InvalidArg {
                op: OP,
                name: "weights",
                reason: format!("token weights must be -1, 0 or +1; found {w} at row {r}"),
            });
        }
        let y = label_at(OP, r, labels[r], vocab, None)?.unwrap_or(0);
        let span = r * vocab..(r + 1) * vocab;
        let z = &logits[span.clone()];
        let zr = match ref_logits {
            Some(zr) => &zr[span],
            None if matches!(cfg.variant, TntVariant::Nl { .. } | TntVariant::UlAnnotated) => {
                &[][..]
            }
            None => {
                return Err(KernelError::InvalidArg {
                    op: OP,
                    name: "ref_logits",
                    reason: "missing".into(),
                });
            }
        };
        let fwd = |t, e, a| {
            kl_row_ref(z, t, &KlRowCfg { reverse: false, divergence: div, eps: e, k: 1.0 }, a)
        };
        let rev =
            |t, a| kl_row_ref(z, t, &KlRowCfg { reverse: true, divergence: false, eps, k: 1.0 }, a);
        let masked = || RowTarget::Ref { zr, exclude: Some(y) };
        let full = || RowTarget::Ref { zr, exclude: None };
        let nll_cfg = SelectedLogpConfig::default();
        let row = match (cfg.variant, w < 0.0) {
            (TntVariant::Tnff | TntVariant::Tnfll, true) => fwd(masked(), 0.0, alpha),
            (TntVariant::Tnrr | TntVariant::Tnrf | TntVariant::Tnrll, true) => rev(masked(), alpha),
            (TntVariant::Tnff, false) => fwd(full(), 0.0, 1.0),
            (TntVariant::Tnrr, false) => rev(full(), 1.0),
            (TntVariant::Tnrf, false) => fwd(full(), eps, 1.0),
            (TntVariant::Tnrll, false) => fwd(RowTarget::OneHot(y), eps, 1.0),
            (TntVariant::Tnfll | TntVariant::Nl { .. } | TntVariant::UlAnnotated, false) => {
                ce_row_ref(z, y, &nll_cfg, 1.0, None)
            }
            (TntVariant::Nl { threshold }, true) => ce_row_ref(z, y, &nll_cfg, -alpha, threshold),
            (TntVariant::UlAnnotated, true) => ul_row_ref(z, None, &[y], alpha, 1.0),
        };
        out.set(r, vocab, row);
    }
    Ok(out.finish())
}
