//! Per-row machinery: the rows a loss evaluates, the stable primitives (log-probabilities,
//! targets, cross-entropy, reverse KL, `log(1 − p)`), both gradient paths and gradient injection.
//!
//! A token-level loss is a [`RowLoss`]: given the selected (active) rows `z [n, V]` and their
//! per-row data, it computes the token losses either with tch autograd over stable composite ops
//! ([`RowLoss::composite`], the reference path) or in closed form together with
//! `G = ∂ℓ/∂z` ([`RowLoss::closed_form`]). [`eval_rows`] picks the path and, for the closed form,
//! injects `G` into autograd with [`inject`]. [`row_loss_and_grad`] returns `(ℓ, G)` for the
//! fused-linear path, which injects at the hidden states and the head instead.
//!
//! This is the seam where a fused CPU kernel plugs in: it computes the same `(ℓ, G)` as
//! [`RowLoss::closed_form`] for f32 rows.

use std::cell::OnceCell;

use tch::{Kind, Tensor};

use super::common::TokenBackend;
use crate::Result;

/// `ln 2`: below `log p = −ln 2` (`p ≤ 1/2`) `log1p(−p)` is accurate; above it the masked
/// log-sum-exp is.
pub(crate) const LN2: f64 = std::f64::consts::LN_2;

/// Sparse candidate list per row for unlikelihood terms: `ids [n, K]` (0 where invalid) and
/// `valid [n, K]` (deduplicated; every valid id is in range and differs from the row's label).
pub(crate) struct CandidateList {
    pub ids: Tensor,
    pub valid: Tensor,
}

/// The selected rows of a token-level problem and their per-row data.
pub(crate) struct Rows {
    /// Current logits `[n, V]` in the compute dtype (may carry the graph).
    pub z: Tensor,
    /// Reference logits `[n, V]` in the compute dtype, detached.
    pub zo: Option<Tensor>,
    /// Labels `[n]` (i64, in range).
    pub labels: Tensor,
    /// Negative rows (`w = −1`) `[n]` bool, for the weighted losses.
    pub neg: Option<Tensor>,
    /// Unlikelihood candidates.
    pub cand: Option<CandidateList>,
    /// Every entry of `z` is known to be finite (no `−inf` vocabulary mask), so support masks
    /// can be skipped.
    pub all_finite: bool,
    /// `log_softmax(z)`, computed once and shared by the loss and its metrics.
    lp: OnceCell<LogProbs>,
    /// Reference parts (see [`Rows::ref_parts`]), computed once.
    ref_parts: OnceCell<RefParts>,
}

/// The reference logits restricted to the support of `z`, with their log-sum-exp and the
/// log-sum-exp without the row's label (all detached).
pub(crate) struct RefParts {
    /// `z°` with `−inf` outside the support of `z` `[n, V]`.
    pub zo_r: Tensor,
    /// `LSE(z°_r)` `[n]`.
    pub lse: Tensor,
    /// `LSE_{v≠y}(z°_r)` `[n]` (the masked log-sum-exp; never `log(1 − p°_y)`).
    pub lse_not_y: Tensor,
    /// One-hot of the labels `[n, V]` bool.
    pub hot: Tensor,
}

impl Rows {
    /// Rows without weights or candidates.
    pub(crate) fn new(z: Tensor, zo: Option<Tensor>, labels: Tensor) -> Rows {
        Rows {
            z,
            zo,
            labels,
            neg: None,
            cand: None,
            all_finite: false,
            lp: OnceCell::new(),
            ref_parts: OnceCell::new(),
        }
    }

    /// The reference parts of these rows (computed on first use).
    pub(crate) fn ref_parts(&self) -> Result<&RefParts> {
        if let Some(parts) = self.ref_parts.get() {
            return Ok(parts);
        }
        let lp = self.log_probs()?;
        let hot = onehot(&self.labels, self.vocab())?;
        let zo_r =
            self.zo()?.f_detach()?.f_masked_fill(&lp.fin()?.f_logical_not()?, f64::NEG_INFINITY)?;
        let lse = zo_r.f_logsumexp(-1, false)?;
        let lse_not_y = zo_r.f_masked_fill(&hot, f64::NEG_INFINITY)?.f_logsumexp(-1, false)?;
        Ok(self.ref_parts.get_or_init(|| RefParts { zo_r, lse, lse_not_y, hot }))
    }

    /// `log_softmax(z)` and the support of `z` (computed on first use).
    pub(crate) fn log_probs(&self) -> Result<&LogProbs> {
        if let Some(lp) = self.lp.get() {
            return Ok(lp);
        }
        let lp = LogProbs::new(&self.z, self.all_finite)?;
        Ok(self.lp.get_or_init(|| lp))
    }

    /// The same rows with `z` replaced.
    pub(crate) fn with_z(&self, z: Tensor) -> Rows {
        Rows {
            lp: OnceCell::new(),
            ref_parts: OnceCell::new(),
            all_finite: self.all_finite,
            z,
            zo: self.zo.as_ref().map(Tensor::shallow_clone),
            labels: self.labels.shallow_clone(),
            neg: self.neg.as_ref().map(Tensor::shallow_clone),
            cand: self.cand.as_ref().map(|c| CandidateList {
                ids: c.ids.shallow_clone(),
                valid: c.valid.shallow_clone(),
            }),
        }
    }

    pub(crate) fn vocab(&self) -> i64 {
        self.z.size().last().copied().unwrap_or(0)
    }

    /// The reference logits (callers only ask when they were given).
    pub(crate) fn zo(&self) -> Result<&Tensor> {
        self.zo.as_ref().ok_or_else(|| crate::Error::InvalidInput {
            op: "token loss",
            name: "ref_logits",
            reason: "internal: reference logits missing".to_string(),
        })
    }

    /// The negative-row mask (callers only ask when weights were given).
    pub(crate) fn neg(&self) -> Result<&Tensor> {
        self.neg.as_ref().ok_or_else(|| crate::Error::InvalidInput {
            op: "token loss",
            name: "weights",
            reason: "internal: weights missing".to_string(),
        })
    }

    /// The candidate list (callers only ask when they built one).
    pub(crate) fn cand(&self) -> Result<&CandidateList> {
        self.cand.as_ref().ok_or_else(|| crate::Error::InvalidInput {
            op: "token loss",
            name: "candidates",
            reason: "internal: candidates missing".to_string(),
        })
    }
}

/// A loss evaluated row by row.
pub(crate) trait RowLoss {
    /// Token losses `[n]` through tch autograd over stable ops (differentiable in `rows.z`).
    fn composite(&self, rows: &Rows) -> Result<Tensor>;

    /// Token losses `[n]` and, when `want_grad`, `G = ∂ℓ/∂z` `[n, V]`, in closed form, on
    /// detached rows.
    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)>;
}

/// Token losses `[n]` of `loss` on `rows`, carrying the gradient to `rows.z` by the chosen path.
/// Nothing is differentiated when `rows.z` does not require grad. `metrics` is called (under
/// `no_grad`) with the rows the loss was evaluated on, so it can reuse their log-probabilities,
/// and the detached token losses.
pub(crate) fn eval_rows(
    loss: &dyn RowLoss,
    rows: &Rows,
    backend: TokenBackend,
    metrics: &mut dyn FnMut(&Rows, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let needs_grad = rows.z.requires_grad();
    if backend.closed_form() {
        let detached = rows.with_z(rows.z.f_detach()?);
        let (value, grad) = tch::no_grad(|| loss.closed_form(&detached, needs_grad))?;
        tch::no_grad(|| metrics(&detached, &value))?;
        match grad {
            Some(grad) if needs_grad => inject(&rows.z, &value, &grad, rows.all_finite),
            _ => Ok(value),
        }
    } else {
        let value =
            if needs_grad { loss.composite(rows)? } else { tch::no_grad(|| loss.composite(rows))? };
        let detached = value.f_detach()?;
        tch::no_grad(|| metrics(rows, &detached))?;
        Ok(value)
    }
}

/// Token losses `[n]` (detached) and `G = ∂(Σ_r scale_r ℓ_r)/∂z` `[n, V]` for `rows` (whose `z`
/// is detached), by the closed form or by differentiating the composite path.
pub(crate) fn row_loss_and_grad(
    loss: &dyn RowLoss,
    rows: &Rows,
    scale: &Tensor,
    backend: TokenBackend,
) -> Result<(Tensor, Tensor)> {
    if backend == TokenBackend::Composite {
        let leaf = rows.z.f_detach()?.f_set_requires_grad(true)?;
        let value = loss.composite(&rows.with_z(leaf.shallow_clone()))?;
        let total = value.f_mul(scale)?.f_sum(value.f_kind()?)?;
        let grad = Tensor::f_run_backward(&[&total], &[&leaf], false, false)?;
        let grad = grad.into_iter().next().ok_or_else(|| crate::Error::InvalidInput {
            op: "row_loss_and_grad",
            name: "logits",
            reason: "internal: autograd returned no gradient".to_string(),
        })?;
        Ok((value.f_detach()?, grad))
    } else {
        let (value, grad) = tch::no_grad(|| loss.closed_form(rows, true))?;
        let grad = match grad {
            Some(g) => g,
            None => Tensor::f_zeros_like(&rows.z)?,
        };
        Ok((value, grad.f_mul(&scale.f_unsqueeze(1)?)?))
    }
}

/// Injects a precomputed gradient: returns `value + (s − s.detach())` with
/// `s_r = ⟨G_r, ẑ_r⟩`, `ẑ = where(isfinite(z), z, 0)` (`ẑ = z` when `z` is known to be finite).
/// The value is `value` exactly (`s − s` is exactly 0) and `∂out_r/∂z_r = G_r`, under any
/// upstream gradient.
pub(crate) fn inject(
    z: &Tensor,
    value: &Tensor,
    grad: &Tensor,
    all_finite: bool,
) -> Result<Tensor> {
    let zs =
        if all_finite { z.shallow_clone() } else { z.f_where_scalarother(&z.f_isfinite()?, 0.0)? };
    let s = grad.f_unsqueeze(1)?.f_bmm(&zs.f_unsqueeze(2)?)?.f_reshape([-1])?;
    Ok(value.f_add(&s.f_sub(&s.f_detach()?)?)?)
}

/// Log-probabilities of a row set and its support.
pub(crate) struct LogProbs {
    /// `l = log_softmax(z)` `[n, V]` (`−inf` outside the support).
    pub l: Tensor,
    z: Tensor,
    all_finite: bool,
    fin: OnceCell<Tensor>,
    l_s: OnceCell<Tensor>,
}

impl LogProbs {
    /// `log_softmax(z)`; `all_finite` says that `z` is known to have no `−inf` entry.
    pub(crate) fn new(z: &Tensor, all_finite: bool) -> Result<Self> {
        let l = z.f_log_softmax(-1, None::<Kind>)?;
        Ok(LogProbs { l, z: z.f_detach()?, all_finite, fin: OnceCell::new(), l_s: OnceCell::new() })
    }

    /// Whether every logit is finite (then the support is the whole row).
    pub(crate) fn all_finite(&self) -> bool {
        self.all_finite
    }

    /// Support `z_v ≠ −inf` `[n, V]` bool (detached; NaN counts as supported so it propagates).
    pub(crate) fn fin(&self) -> Result<&Tensor> {
        if let Some(fin) = self.fin.get() {
            return Ok(fin);
        }
        let fin = self.z.f_ne(f64::NEG_INFINITY)?;
        Ok(self.fin.get_or_init(|| fin))
    }

    /// `l` with entries outside the support replaced by 0 (safe under autograd).
    pub(crate) fn l_s(&self) -> Result<&Tensor> {
        if let Some(l_s) = self.l_s.get() {
            return Ok(l_s);
        }
        let l_s = if self.all_finite {
            self.l.shallow_clone()
        } else {
            self.l.f_where_scalarother(self.fin()?, 0.0)?
        };
        Ok(self.l_s.get_or_init(|| l_s))
    }

    /// `x` (detached) with `−inf` outside the support.
    pub(crate) fn restrict(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_detach()?;
        if self.all_finite {
            return Ok(x);
        }
        Ok(x.f_masked_fill(&self.fin()?.f_logical_not()?, f64::NEG_INFINITY)?)
    }

    /// `x` with entries outside the support replaced by 0.
    pub(crate) fn zero_outside(&self, x: &Tensor) -> Result<Tensor> {
        if self.all_finite {
            return Ok(x.shallow_clone());
        }
        Ok(x.f_where_scalarother(self.fin()?, 0.0)?)
    }

    /// `p = exp(l)` (exactly 0 outside the support).
    pub(crate) fn p(&self) -> Result<Tensor> {
        Ok(self.l.f_exp()?)
    }

    /// `l_y` `[n]`.
    pub(crate) fn at(&self, labels: &Tensor) -> Result<Tensor> {
        Ok(self.l.f_gather(1, &labels.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?)
    }

    /// Number of supported tokens per row, `V'` `[n, 1]` in `kind`.
    pub(crate) fn vprime(&self, kind: Kind) -> Result<Tensor> {
        if self.all_finite {
            let size = self.z.size();
            let (n, v) = (size[0], size.get(1).copied().unwrap_or(0));
            return Ok(Tensor::f_full([n, 1], v, (kind, self.z.device()))?);
        }
        Ok(self.fin()?.f_sum_dim_intlist(-1, true, kind)?)
    }
}

/// `p − e_y` for labels `[n]` (one pass; no one-hot tensor).
pub(crate) fn minus_onehot(p: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let idx = labels.f_unsqueeze(1)?;
    let minus_one = Tensor::f_full([idx.size()[0], 1], -1.0, (p.f_kind()?, p.device()))?;
    Ok(p.f_scatter_add(1, &idx, &minus_one)?)
}

/// One-hot `[n, V]` bool of `labels [n]`.
pub(crate) fn onehot(labels: &Tensor, vocab: i64) -> Result<Tensor> {
    let n = labels.size().first().copied().unwrap_or(0);
    let zeros = Tensor::f_zeros([n, vocab], (Kind::Bool, labels.device()))?;
    Ok(zeros.f_scatter_value(1, &labels.f_unsqueeze(1)?, 1)?)
}

/// Reference target log-probabilities over the support of the current row, optionally with one
/// token removed: `log q_v = z°_v − LSE_{u ∈ supp, u ∉ excl}(z°)` on the kept tokens, `−inf`
/// elsewhere (detached).
pub(crate) fn ref_log_target(
    zo: &Tensor,
    lp: &LogProbs,
    exclude: Option<&Tensor>,
) -> Result<Tensor> {
    let mut zm = lp.restrict(zo)?;
    if let Some(ex) = exclude {
        zm = zm.f_masked_fill(ex, f64::NEG_INFINITY)?;
    }
    Ok(zm.f_sub(&zm.f_logsumexp(-1, true)?)?)
}

/// `log e_y` over the support: 0 at the label, `−inf` elsewhere.
pub(crate) fn label_log_target(hot: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_zeros_like(like)?.f_masked_fill(&hot.f_logical_not()?, f64::NEG_INFINITY)?)
}

/// Smoothing in log space: `log S_ε(u)_v = logaddexp(log u_v, log ε) − log1p(V'ε)` on the
/// support; outside it the smoothing adds nothing (`log u_v − log1p(V'ε)`, normally `−inf`; a
/// label outside the support keeps its mass, so its loss is `+inf`).
pub(crate) fn smooth(logu: &Tensor, lp: &LogProbs, eps: f64) -> Result<Tensor> {
    let kind = logu.f_kind()?;
    let log_eps = Tensor::f_full_like(logu, eps.ln())?;
    let norm = lp.vprime(kind)?.f_mul_scalar(eps)?.f_log1p()?;
    let mixed = logu.f_logaddexp(&log_eps)?;
    let mixed = if lp.all_finite() { mixed } else { mixed.f_where_self(lp.fin()?, logu)? };
    Ok(mixed.f_sub(&norm)?)
}

/// `KL(t ‖ p) = Σ_{t>0} t (log t − log p)` per row for a target restricted to the support of
/// `p`: a cheaper evaluation for metrics (detached only), which maps `log t = −inf` to a huge
/// negative finite value instead of selecting (`exp` of it is exactly 0).
pub(crate) fn kl_metric(lp: &LogProbs, logt: &Tensor) -> Result<Tensor> {
    let logt = logt.f_clamp_min(-1e30)?;
    let diff = logt.f_sub(lp.l_s()?)?;
    Ok(logt.f_exp()?.f_mul(&diff)?.f_sum_dim_intlist(-1, false, None::<Kind>)?)
}

/// `logt` with `−inf` replaced by 0 (for `t · log t` terms, whose weight is then 0).
fn finite_or_zero(logt: &Tensor) -> Result<Tensor> {
    Ok(logt.f_masked_fill(&logt.f_isneginf()?, 0.0)?)
}

/// Forward term against a constant target `t` (given as `log t`): the cross-entropy
/// `−Σ_{t>0} t_v l_v`, or with `divergence` the KL `Σ_{t>0} t_v (log t_v − l_v)`. `[n]`.
/// Terms with `t_v = 0` are skipped by selection; target mass on a token outside the support
/// (`l_v = −inf`) gives `+inf`.
pub(crate) fn ce_value(lp: &LogProbs, logt: &Tensor, divergence: bool) -> Result<Tensor> {
    let t = logt.f_exp()?;
    let kind = lp.l.f_kind()?;
    // Terms with t_v = 0 are skipped by selection (l_v may be −inf there); with a finite row
    // every l_v is finite and 0 · l_v = 0 needs no selection.
    let l_t = if lp.all_finite() {
        lp.l.shallow_clone()
    } else {
        lp.l.f_where_scalarother(&logt.f_isneginf()?.f_logical_not()?, 0.0)?
    };
    if divergence {
        let diff = finite_or_zero(logt)?.f_sub(&l_t)?;
        Ok(t.f_mul(&diff)?.f_sum_dim_intlist(-1, false, kind)?)
    } else {
        Ok(t.f_mul(&l_t)?.f_sum_dim_intlist(-1, false, kind)?.f_neg()?)
    }
}

/// Gradient of [`ce_value`]: `p − t`.
pub(crate) fn ce_grad(p: &Tensor, logt: &Tensor) -> Result<Tensor> {
    Ok(p.f_sub(&logt.f_exp()?)?)
}

/// Reverse KL `Σ_{p>0} p_v (l_v − log d_v)` to a constant target `d` (given as `log d`). `[n]`.
/// A target with `d_v = 0` where `p_v > 0` gives `+inf`.
pub(crate) fn rkl_value(lp: &LogProbs, logd: &Tensor) -> Result<Tensor> {
    let kind = lp.l.f_kind()?;
    let logd_s = lp.zero_outside(logd)?;
    let diff = lp.l_s()?.f_sub(&logd_s)?;
    Ok(lp.p()?.f_mul(&diff)?.f_sum_dim_intlist(-1, false, kind)?)
}

/// Gradient of [`rkl_value`] given its value `value [n]`: `p ⊙ (l − log d − L)` (0 off the support).
pub(crate) fn rkl_grad(lp: &LogProbs, p: &Tensor, logd: &Tensor, value: &Tensor) -> Result<Tensor> {
    let logd_s = lp.zero_outside(logd)?;
    let inner = lp.l_s()?.f_sub(&logd_s)?.f_sub(&value.f_unsqueeze(1)?)?;
    Ok(p.f_mul(&inner)?)
}

/// `log(1 − p_c)` for candidate ids, evaluated exactly, plus what the closed-form gradient needs.
pub(crate) struct Log1mP {
    /// `λ_c = log(1 − p_c)` `[n, K]`, 0 at invalid slots.
    pub lam: Tensor,
    /// Slots whose candidate is the row's argmax `d` `[n, K]` bool (valid slots only).
    pub is_d: Tensor,
    /// Row argmax `d` `[n]`.
    pub d: Tensor,
    /// `λ_d = LSE_{v≠d}(l) = log(1 − p_d)` `[n]` (`−inf` when `d` is the only supported token).
    pub lam_d: Tensor,
}

/// `λ_c = log(1 − p_c)` for the candidates of each row, stable and differentiable in `lp.l`.
///
/// Off the argmax `d`, `p_c ≤ 1/2` and `log1p(−exp(l_c))` is accurate. For `d` with
/// `l_d > −ln 2` the exact masked log-sum-exp `LSE_{v≠d}(l)` is used instead (no cancellation,
/// no clamp). Inputs of the unused branch are replaced by safe constants so that no `0 · inf`
/// appears under autograd.
pub(crate) fn log1m_p(lp: &LogProbs, z: &Tensor, cand: &CandidateList) -> Result<Log1mP> {
    let vocab = z.size().last().copied().unwrap_or(0);
    let d = z.f_detach()?.f_argmax(-1, false)?;
    let hot_d = onehot(&d, vocab)?;
    let lm = lp.l.f_masked_fill(&hot_d, f64::NEG_INFINITY)?;
    let lam_d = if lp.all_finite() {
        // V ≥ 2 finite tokens: every row has a token besides d.
        lm.f_logsumexp(-1, false)?
    } else {
        // A row whose only supported token is d has λ_d = −inf; its masked row is replaced by
        // zeros so the log-sum-exp backward stays finite.
        let has_other = lp.fin()?.f_logical_and(&hot_d.f_logical_not()?)?.f_any_dim(-1, true)?;
        lm.f_where_scalarother(&has_other, 0.0)?
            .f_logsumexp(-1, false)?
            .f_where_scalarother(&has_other.f_squeeze_dim(1)?, f64::NEG_INFINITY)?
    };
    let l_c = lp.l.f_gather(1, &cand.ids, false)?;
    let is_d = cand.ids.f_eq_tensor(&d.f_unsqueeze(1)?)?.f_logical_and(&cand.valid)?;
    let use_b = is_d.f_logical_and(&l_c.f_detach()?.f_gt(-LN2)?)?;
    let use_a = cand.valid.f_logical_and(&use_b.f_logical_not()?)?;
    let l_a = l_c.f_where_scalarother(&use_a, -1.0)?;
    let lam_a = l_a.f_exp()?.f_neg()?.f_log1p()?;
    let lam_b = lam_d.f_unsqueeze(1)?.f_expand_as(&lam_a)?;
    let lam = lam_b.f_where_self(&use_b, &lam_a)?.f_where_scalarother(&cand.valid, 0.0)?;
    Ok(Log1mP { lam, is_d, d, lam_d })
}

/// Closed-form gradient of `−Σ_{c∈C} λ_c` for each row (detached inputs):
/// `−p·S' + Σ_{c∈C'} r_c e_c + [d∈C]·p_d (e_d − q^{(d)})`, with `C' = C∖{d}`,
/// `r_c = exp(l_c − λ_c) = p_c/(1 − p_c)`, `S' = Σ_{C'} r_c` and `q^{(d)}_j = exp(l_j − λ_d)`
/// (`q^{(d)}_d = 0`).
pub(crate) fn neg_log1m_grad(
    lp: &LogProbs,
    p: &Tensor,
    cand: &CandidateList,
    lm: &Log1mP,
) -> Result<Tensor> {
    let vocab = p.size().last().copied().unwrap_or(0);
    let l_c = lp.l.f_gather(1, &cand.ids, false)?;
    let in_cprime = cand.valid.f_logical_and(&lm.is_d.f_logical_not()?)?;
    let r = l_c.f_sub(&lm.lam)?.f_exp()?.f_where_scalarother(&in_cprime, 0.0)?;
    let s = r.f_sum_dim_intlist(-1, true, r.f_kind()?)?;
    let mut grad = p.f_mul(&s)?.f_neg()?.f_scatter_add(1, &cand.ids, &r)?;
    // The argmax term, where the argmax is a candidate.
    let has_d = lm.is_d.f_any_dim(-1, true)?;
    let hot_d = onehot(&lm.d, vocab)?;
    let q_d = lp.l.f_sub(&lm.lam_d.f_unsqueeze(1)?)?.f_exp()?.f_masked_fill(&hot_d, 0.0)?;
    let p_d = p.f_gather(1, &lm.d.f_unsqueeze(1)?, false)?;
    let term = hot_d.f_to_kind(p.f_kind()?)?.f_sub(&q_d)?.f_mul(&p_d)?;
    grad = grad.f_add(&term.f_where_scalarother(&has_d, 0.0)?)?;
    Ok(grad)
}

/// Row-wise sum `[n]` of `x [n, K]` in its own dtype.
pub(crate) fn row_sum(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_sum_dim_intlist(-1, false, x.f_kind()?)?)
}

/// Per-row constant `[n]` equal to `a` where `mask` holds and `b` elsewhere, in `kind`.
pub(crate) fn select_scalar(mask: &Tensor, a: f64, b: f64, kind: Kind) -> Result<Tensor> {
    let ones = Tensor::f_ones(mask.size(), (kind, mask.device()))?;
    Ok(ones.f_mul_scalar(a)?.f_where_self(mask, &ones.f_mul_scalar(b)?)?)
}
