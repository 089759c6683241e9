//! Contrastive perplexity (CP): pull the perplexity of non-toxic paraphrases towards a prototype
//! and push the perplexity of toxic paraphrases of the same anchor away.
//!
//! Paper: Klein & Nabi, "Contrastive Perplexity for Controlled Generation",
//! [arXiv 2401.08491](https://arxiv.org/abs/2401.08491) (ACL 2025). Reference code:
//! `SAP-samples/acl2025-contrastive-perplexity train_mistral.py` (`compute_loss`), reproduced
//! exactly by [`CpForm::Reference`]. The paper's equations are known to this project only
//! through third-party notes; [`CpForm::Paper`] is the transcribed objective with τ as a real
//! temperature (τ = 1 reproduces the transcription).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::common::{
    add_mean, bool_mask, cfg, check_device, check_finite, check_float, check_rank, check_shape,
    compute_kind, count_f64, finish, first_true, nonempty, part, select, sum_f64, with_setters,
};
use super::seq_logps::{EmptyPolicy, SeqLogps};
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// Which CP objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CpForm {
    /// The per-anchor contrastive objective (default): prototype per anchor, `−lse(z_P) +
    /// lse(z_{P∪N∪R})` with `z = −|φ − c|/τ + ln w`.
    #[default]
    Paper,
    /// The released code's arithmetic, quirks included: prototype shared over the micro-batch,
    /// exp-of-exp logits, additive α, multi-hot cross-entropy, divisor `p + 1 + r`.
    Reference,
}

/// The sequence statistic φ of CP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CpStatistic {
    /// Mean token NLL, the log-perplexity (default; what the code uses).
    #[default]
    LogPpl,
    /// Perplexity `exp(mean NLL)`. For comparison only: raw PPL gaps are tens of nats, so
    /// `e^{−d}` underflows and the gradients vanish.
    Ppl,
}

/// Configuration of [`contrastive_perplexity_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpConfig {
    /// The objective. Default [`CpForm::Paper`].
    pub form: CpForm,
    /// Temperature τ > 0. Default 1.0 (both forms).
    pub tau: f64,
    /// Weight of the hard negatives. `None` (default) means 1.0 for [`CpForm::Paper`] (a
    /// multiplicative weight, must be > 0) and 100.0 for [`CpForm::Reference`] (an additive
    /// logit, any finite value; the code's README example).
    pub alpha: Option<f64>,
    /// Overall scale β > 0. Default 1.0.
    pub beta: f64,
    /// Label smoothing ε ∈ [0, 1) of the reference form's multi-hot cross-entropy (PyTorch's
    /// rule for probability targets). Must be 0 for the paper form. Default 0.
    pub label_smoothing: f64,
    /// Paper form only: treat the prototype `c_g` as a constant. Default `false` (as the code).
    pub detach_prototype: bool,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`] (over anchors or rows).
    pub reduction: Reduction,
}

impl Default for CpConfig {
    fn default() -> Self {
        Self {
            form: CpForm::Paper,
            tau: 1.0,
            alpha: None,
            beta: 1.0,
            label_smoothing: 0.0,
            detach_prototype: false,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(CpConfig {
    with_form => form: CpForm,
    with_tau => tau: f64,
    with_alpha => alpha: Option<f64>,
    with_beta => beta: f64,
    with_label_smoothing => label_smoothing: f64,
    with_detach_prototype => detach_prototype: bool,
    with_reduction => reduction: Reduction,
});

/// The negative weight α of [`CpConfig`] when `alpha` is `None`, per form.
pub fn cp_default_alpha(form: CpForm) -> f64 {
    match form {
        CpForm::Paper => 1.0,
        CpForm::Reference => 100.0,
    }
}

/// The value the reference code substitutes for a non-finite token NLL before averaging.
pub const CP_REFERENCE_NONFINITE_NLL: f64 = 5.0;

impl CpConfig {
    /// The effective α.
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or_else(|| cp_default_alpha(self.form))
    }

    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "contrastive_perplexity_loss";
        cfg::positive(OP, "tau", self.tau)?;
        cfg::positive(OP, "beta", self.beta)?;
        match self.form {
            CpForm::Paper => {
                cfg::positive(OP, "alpha", self.alpha())?;
                if self.label_smoothing != 0.0 {
                    return Err(Error::InvalidConfig {
                        op: OP,
                        name: "label_smoothing",
                        reason: format!(
                            "is only used by the reference form; must be 0, got {}",
                            self.label_smoothing
                        ),
                    });
                }
            }
            CpForm::Reference => {
                cfg::finite(OP, "alpha", self.alpha())?;
                cfg::half_open(OP, "label_smoothing", self.label_smoothing, 0.0, 1.0)?;
                if self.detach_prototype {
                    return Err(Error::InvalidConfig {
                        op: OP,
                        name: "detach_prototype",
                        reason: "the reference form reproduces the code, whose prototype is not \
                                 detached"
                            .into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The statistics φ of one contrastive-perplexity batch, grouped by anchor.
///
/// Paper form: `[G, ·]` tensors with optional masks for ragged groups (masked entries are
/// ignored entirely, even NaN). Reference form: `[B, p]`, `[B, n]`, `[B, r]` in the code's layout
/// order, without masks (its groups are fixed-size).
#[derive(Debug, Clone, Copy)]
pub struct CpGroups<'a> {
    /// φ of the positives (non-toxic paraphrases), `[G, P]`.
    pub phi_pos: &'a Tensor,
    /// Which positives exist, `[G, P]` bool or 0/1; `None` = all.
    pub mask_pos: Option<&'a Tensor>,
    /// φ of the hard negatives (toxic paraphrases of the same anchor), `[G, N]` (N may be 0).
    pub phi_neg: &'a Tensor,
    /// Which negatives exist; `None` = all.
    pub mask_neg: Option<&'a Tensor>,
    /// φ of random negatives (toxic paraphrases of other anchors), `[G, R]`, optional.
    pub phi_rnd: Option<&'a Tensor>,
    /// Which random negatives exist; `None` = all.
    pub mask_rnd: Option<&'a Tensor>,
}

impl<'a> CpGroups<'a> {
    /// Positives and hard negatives, all present.
    pub fn new(phi_pos: &'a Tensor, phi_neg: &'a Tensor) -> Self {
        Self { phi_pos, mask_pos: None, phi_neg, mask_neg: None, phi_rnd: None, mask_rnd: None }
    }

    /// Sets the masks of positives and hard negatives.
    #[must_use]
    pub fn with_masks(mut self, mask_pos: &'a Tensor, mask_neg: &'a Tensor) -> Self {
        self.mask_pos = Some(mask_pos);
        self.mask_neg = Some(mask_neg);
        self
    }

    /// Adds random negatives (and their optional mask).
    #[must_use]
    pub fn with_random(mut self, phi_rnd: &'a Tensor, mask_rnd: Option<&'a Tensor>) -> Self {
        self.phi_rnd = Some(phi_rnd);
        self.mask_rnd = mask_rnd;
        self
    }
}

/// The paper form's statistic: `φ = Σ_t m·nll / Σ_t m` per text (log-PPL), or its exponential.
///
/// ```text
/// φ_x = Σ_t m[x,t]·nll[x,t] / Σ_t m[x,t]        (CpStatistic::LogPpl)
/// φ_x = exp(…)                                  (CpStatistic::Ppl)
/// ```
///
/// Returns `(φ [X], valid [X])`; `valid` is false for texts without a real token under
/// [`EmptyPolicy::Mask`] (their φ is 0). Masked positions are never read. A non-finite NLL at a
/// real position propagates into φ in release builds and is an [`Error::NonFinite`] in debug
/// builds. `nll` is usually `−per_token` of a [`SeqLogps`]; [`cp_phi_from_logps`] does that.
///
/// # Shapes
///
/// `nll`: `[X, L]` float; `mask`: `[X, L]` bool or 0/1.
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::EmptySequence`], [`Error::NonFinite`] (debug builds).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{cp_phi, CpStatistic, EmptyPolicy};
/// use tch::Tensor;
///
/// let nll = Tensor::from_slice(&[2.0f64, 1.0, 3.0, 0.5, 0.5]).view([1, 5]);
/// let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0]).view([1, 5]);
/// let (phi, _) = cp_phi(&nll, &mask, CpStatistic::LogPpl, EmptyPolicy::Error)?;
/// assert_eq!(Vec::<f64>::try_from(&phi)?, vec![2.0]); // padding ignored
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn cp_phi(
    nll: &Tensor,
    mask: &Tensor,
    statistic: CpStatistic,
    empty_policy: EmptyPolicy,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "cp_phi";
    check_rank(OP, "nll", nll, 2, "[X, L]")?;
    check_float(OP, "nll", nll)?;
    check_shape(OP, "mask", mask, &nll.size(), || format!("{:?} matching `nll`", nll.size()))?;
    check_device(OP, "mask", mask, nll.device())?;
    let m = bool_mask(OP, "mask", mask)?;
    if cfg!(debug_assertions) {
        check_finite(OP, "nll", nll, Some(&m))?;
    }
    let kind = compute_kind(nll.kind());
    let x = nll.f_to_kind(kind)?.f_where_scalarother(&m, 0.0)?;
    let sum = x.f_sum_dim_intlist([1i64].as_slice(), false, kind)?;
    let len = m.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?;
    let valid = nonempty(OP, &len, None, empty_policy)?;
    let phi = super::common::safe_mean(&sum, &len, &valid)?;
    let phi = match statistic {
        CpStatistic::LogPpl => phi,
        CpStatistic::Ppl => select(&phi.f_exp()?, &valid)?,
    };
    Ok((phi, valid))
}

/// φ from [`SeqLogps`] scored over every real token of each text: `−A` (log-PPL) or `e^{−A}`.
///
/// # Errors
///
/// [`Error::EmptySequence`] under [`EmptyPolicy::Error`].
pub fn cp_phi_from_logps(
    logps: &SeqLogps,
    statistic: CpStatistic,
    empty_policy: EmptyPolicy,
) -> Result<(Tensor, Tensor)> {
    let valid = nonempty("cp_phi_from_logps", &logps.len, None, empty_policy)?;
    let kind = compute_kind(logps.sum.kind());
    let a = super::common::safe_mean(&logps.sum.f_to_kind(kind)?, &logps.len, &valid)?;
    let phi = match statistic {
        CpStatistic::LogPpl => a.f_neg()?,
        CpStatistic::Ppl => select(&a.f_neg()?.f_exp()?, &valid)?,
    };
    Ok((phi, valid))
}

/// The reference code's statistic: the mean token NLL over **every** shifted position of the
/// padded micro-batch (padding included), with non-finite NLL replaced by 5.0.
///
/// ```text
/// φ_x = (1/(T−1)) Σ_{t=0}^{T−2} nll'[x,t],   nll' = nll if finite else 5.0
/// ```
///
/// Pads (EOS in the code) therefore count, φ depends on the padded length, and every position
/// receives gradient `1/(T−1)` (0 at replaced entries).
///
/// # Shapes
///
/// `nll`: `[X, T−1]` float, with `T − 1 ≥ 1`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] (rank or zero length), [`Error::DtypeMismatch`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::cp_phi_reference;
/// use tch::Tensor;
///
/// let nll = Tensor::from_slice(&[2.0f64, 1.0, 3.0, 0.5, 0.5, f64::NAN, 1.0, 3.0, 5.0, 5.0]).view([2, 5]);
/// assert_eq!(Vec::<f64>::try_from(&cp_phi_reference(&nll)?)?, vec![1.4, 3.8]);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn cp_phi_reference(nll: &Tensor) -> Result<Tensor> {
    const OP: &str = "cp_phi_reference";
    check_rank(OP, "nll", nll, 2, "[X, T−1]")?;
    check_float(OP, "nll", nll)?;
    if nll.size()[1] == 0 {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "nll",
            expected: "[X, T−1] with T − 1 ≥ 1".into(),
            got: nll.size(),
        });
    }
    let kind = compute_kind(nll.kind());
    let x = nll.f_to_kind(kind)?;
    let fin = x.f_isfinite()?;
    let x = x.f_where_scalarother(&fin, CP_REFERENCE_NONFINITE_NLL)?;
    Ok(x.f_mean_dim([1i64].as_slice(), false, kind)?)
}

/// Splits the reference code's row layout `[P_1..P_p, N_1..N_n, R_1..R_r]` (`phi [B, C]`,
/// `C = p + n + r`, for example `cp_phi_reference(nll).view([B, C])`) into the `(P, N, R)` blocks
/// of a [`CpGroups`] (views, on the same graph).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] unless `phi` is `[B, p + n + r]`.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{contrastive_perplexity_loss, cp_split_layout, CpConfig, CpForm, CpGroups};
/// use tch::Tensor;
///
/// let phi = Tensor::from_slice(&[2.0f64, 1.5, 3.0, 4.0 / 3.0]).view([1, 4]);
/// let (pos, neg, rnd) = cp_split_layout(&phi, 2, 2, 0)?;
/// let cfg = CpConfig::default().with_form(CpForm::Reference);
/// let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg).with_random(&rnd, None), &cfg)?;
/// assert!((f64::try_from(&out.loss)? - 66.9363240006).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn cp_split_layout(phi: &Tensor, p: i64, n: i64, r: i64) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "cp_split_layout";
    check_rank(OP, "phi", phi, 2, "[B, p + n + r]")?;
    let b = phi.size()[0];
    if p < 0 || n < 0 || r < 0 {
        return Err(Error::InvalidInput {
            op: OP,
            name: "layout",
            reason: format!("p, n, r must be >= 0, got {p}, {n}, {r}"),
        });
    }
    check_shape(OP, "phi", phi, &[b, p + n + r], || {
        format!("[B, p + n + r] = [{b}, {}]", p + n + r)
    })?;
    Ok((phi.f_narrow(1, 0, p)?, phi.f_narrow(1, p, n)?, phi.f_narrow(1, p + n, r)?))
}

/// One block (P, N or R) of a CP batch, validated, with masked entries zeroed.
struct Block {
    phi: Tensor,
    mask: Tensor,
}

fn block(
    op: &'static str,
    (name, mask_name): (&'static str, &'static str),
    phi: &Tensor,
    mask: Option<&Tensor>,
    g: i64,
    kind: Kind,
    device: tch::Device,
) -> Result<Block> {
    check_rank(op, name, phi, 2, "[G, K]")?;
    check_float(op, name, phi)?;
    if phi.size()[0] != g {
        return Err(Error::ShapeMismatch {
            op,
            name,
            expected: format!("[G, K] with G = {g} anchors"),
            got: phi.size(),
        });
    }
    check_device(op, name, phi, device)?;
    let mask = match mask {
        Some(m) => {
            check_shape(op, mask_name, m, &phi.size(), || {
                format!("{:?} matching `{name}`", phi.size())
            })?;
            check_device(op, mask_name, m, device)?;
            bool_mask(op, mask_name, m)?
        }
        None => Tensor::f_ones(phi.size(), (Kind::Bool, device))?,
    };
    let phi = phi.f_to_kind(kind)?.f_where_scalarother(&mask, 0.0)?;
    Ok(Block { phi, mask })
}

/// Contrastive perplexity.
///
/// Paper form ([`CpForm::Paper`], default), per anchor `g`:
///
/// ```text
/// c_g = mean_{x∈P_g} φ_x                          (detached if detach_prototype)
/// d_x = |φ_x − c_g|,   z_x = −d_x/τ + ln w_x      w = α on N, 1 on P and R
/// L_g = −lse(z_{P_g}) + lse(z_{P_g ∪ N_g ∪ R_g})  (= 0 exactly for an anchor without negatives)
/// per_example[g] = β·L_g;   loss = mean_g (part "anchors", count G)
/// ```
///
/// Reference form ([`CpForm::Reference`]), rows `i` laid out `[P_1..P_p, N_1..N_n, R_1..R_r]`:
///
/// ```text
/// c     = mean of φ over all B·p positives of the micro-batch (shared, not detached)
/// z_x   = exp(−|φ_x − c|)/τ + α·[x ∈ N]
/// y'    = (1 − ε)·[1]*p ++ [0]*(n+r) + ε/C,   C = p + n + r
/// ℓ_i   = −Σ_j y'_j · log_softmax(z_i)_j
/// per_example[i] = β·ℓ_i/(p + 1 + r);   loss = mean_i (part "rows", count B)
/// ```
///
/// Metrics: `rewards/chosen`, `rewards/rejected` (−mean d over P / N), `rewards/margins` (per
/// anchor with negatives), `rewards/accuracies` (fraction of (p, n) pairs with `d_p < d_n`),
/// `logps/chosen`, `logps/rejected` (−mean φ over P / N), `cp/phi_pos`, `cp/phi_neg`,
/// `cp/phi_rnd`, `cp/phi_gap` (mean φ_N − mean φ_P per anchor), `cp/prototype`.
///
/// φ comes from [`cp_phi`] / [`cp_phi_from_logps`] (paper) or [`cp_phi_reference`] (reference).
///
/// # Shapes
///
/// See [`CpGroups`]. `per_example`: `[G]` (paper) or `[B]` (reference).
///
/// # Errors
///
/// [`Error::InvalidConfig`] (see [`CpConfig::validate`]), [`Error::NoPositives`] (an anchor with
/// no positive), [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::InvalidInput`] (masks with the reference form), [`Error::NonFinite`] (debug builds,
/// paper form: a non-finite φ at a present entry).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{contrastive_perplexity_loss, CpConfig, CpGroups};
/// use tch::Tensor;
///
/// let pos = Tensor::from_slice(&[2.0f64, 1.5]).view([1, 2]);
/// let neg = Tensor::from_slice(&[3.0f64, 4.0 / 3.0]).view([1, 2]);
/// let out = contrastive_perplexity_loss(&CpGroups::new(&pos, &neg), &CpConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 0.4744814532).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn contrastive_perplexity_loss(groups: &CpGroups<'_>, cfg: &CpConfig) -> Result<LossOutput> {
    const OP: &str = "contrastive_perplexity_loss";
    cfg.validate()?;
    check_rank(OP, "phi_pos", groups.phi_pos, 2, "[G, P]")?;
    check_float(OP, "phi_pos", groups.phi_pos)?;
    let g = groups.phi_pos.size()[0];
    let kind = compute_kind(groups.phi_pos.kind());
    let device = groups.phi_pos.device();
    let pos = block(OP, ("phi_pos", "mask_pos"), groups.phi_pos, groups.mask_pos, g, kind, device)?;
    let neg = block(OP, ("phi_neg", "mask_neg"), groups.phi_neg, groups.mask_neg, g, kind, device)?;
    let rnd = match groups.phi_rnd {
        Some(r) => Some(block(OP, ("phi_rnd", "mask_rnd"), r, groups.mask_rnd, g, kind, device)?),
        None => {
            if groups.mask_rnd.is_some() {
                return Err(Error::InvalidInput {
                    op: OP,
                    name: "mask_rnd",
                    reason: "given without phi_rnd".into(),
                });
            }
            None
        }
    };
    let n_pos = pos.mask.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?;
    if let Some((index, _)) = first_true(&n_pos.f_eq(0)?)? {
        return Err(Error::NoPositives { op: OP, group: index[0] });
    }
    match cfg.form {
        CpForm::Paper => paper(OP, &pos, &neg, rnd.as_ref(), &n_pos, cfg, kind),
        CpForm::Reference => {
            for (name, b, given) in [
                ("mask_pos", &pos, groups.mask_pos.is_some()),
                ("mask_neg", &neg, groups.mask_neg.is_some()),
                ("mask_rnd", rnd.as_ref().unwrap_or(&neg), groups.mask_rnd.is_some()),
            ] {
                if given && first_true(&b.mask.f_logical_not()?)?.is_some() {
                    return Err(Error::InvalidInput {
                        op: OP,
                        name,
                        reason: "the reference form has fixed-size groups; every entry must be \
                                 present"
                            .into(),
                    });
                }
            }
            reference(&pos, &neg, rnd.as_ref(), cfg, kind)
        }
    }
}

fn paper(
    op: &'static str,
    pos: &Block,
    neg: &Block,
    rnd: Option<&Block>,
    n_pos: &Tensor,
    cfg: &CpConfig,
    kind: Kind,
) -> Result<LossOutput> {
    if cfg!(debug_assertions) {
        check_finite(op, "phi_pos", &pos.phi, Some(&pos.mask))?;
        check_finite(op, "phi_neg", &neg.phi, Some(&neg.mask))?;
        if let Some(r) = rnd {
            check_finite(op, "phi_rnd", &r.phi, Some(&r.mask))?;
        }
    }
    let mut c = pos
        .phi
        .f_sum_dim_intlist([1i64].as_slice(), true, kind)?
        .f_div(&n_pos.f_unsqueeze(1)?.f_to_kind(kind)?)?;
    if cfg.detach_prototype {
        c = c.f_detach()?;
    }
    let tau = cfg.tau;
    let logits = |b: &Block, log_w: f64| -> Result<(Tensor, Tensor)> {
        let d = b.phi.f_sub(&c)?.f_abs()?;
        let z = d
            .f_div_scalar(-tau)?
            .f_add_scalar(log_w)?
            .f_where_scalarother(&b.mask, f64::NEG_INFINITY)?;
        Ok((d, z))
    };
    let (d_pos, z_pos) = logits(pos, 0.0)?;
    let (d_neg, z_neg) = logits(neg, cfg.alpha().ln())?;
    let mut all = vec![z_pos.shallow_clone(), z_neg];
    let mut others = neg.mask.f_any_dim(1, false)?;
    if let Some(r) = rnd {
        all.push(logits(r, 0.0)?.1);
        others = others.f_logical_or(&r.mask.f_any_dim(1, false)?)?;
    }
    let lse_all = Tensor::f_cat(&all, 1)?.f_logsumexp([1i64].as_slice(), false)?;
    let lse_pos = z_pos.f_logsumexp([1i64].as_slice(), false)?;
    let per_anchor = select(&lse_all.f_sub(&lse_pos)?, &others)?.f_mul_scalar(cfg.beta)?;
    let g = per_anchor.size()[0];
    let anchors = Tensor::f_ones([g], (Kind::Bool, per_anchor.device()))?;

    let mut metrics = Metrics::new();
    cp_metrics(&mut metrics, pos, neg, rnd, &d_pos, &d_neg)?;
    add_mean(&mut metrics, "cp/prototype", &c.f_squeeze_dim(1)?, &anchors)?;
    let parts = vec![part("anchors", &per_anchor, &anchors, 1.0)?];
    finish(per_anchor, parts, metrics, cfg.reduction)
}

fn reference(
    pos: &Block,
    neg: &Block,
    rnd: Option<&Block>,
    cfg: &CpConfig,
    kind: Kind,
) -> Result<LossOutput> {
    let (b, p) = (pos.phi.size()[0], pos.phi.size()[1]);
    let n = neg.phi.size()[1];
    let r = rnd.map_or(0, |r| r.phi.size()[1]);
    let device = pos.phi.device();
    let c = pos.phi.f_mean(kind)?; // shared over the micro-batch
    let sim = |blk: &Block| -> Result<(Tensor, Tensor)> {
        let d = blk.phi.f_sub(&c)?.f_abs()?;
        Ok((d.shallow_clone(), d.f_neg()?.f_exp()?.f_div_scalar(cfg.tau)?))
    };
    let (d_pos, z_pos) = sim(pos)?;
    let (d_neg, z_neg) = sim(neg)?;
    let mut all = vec![z_pos, z_neg.f_add_scalar(cfg.alpha())?];
    if let Some(blk) = rnd {
        all.push(sim(blk)?.1);
    }
    let z = Tensor::f_cat(&all, 1)?; // [B, C]
    let classes = p + n + r;
    let eps = cfg.label_smoothing;
    let target: Vec<f64> = (0..classes)
        .map(|j| (1.0 - eps) * if j < p { 1.0 } else { 0.0 } + eps / classes as f64)
        .collect();
    let y = Tensor::f_from_slice(&target)?.f_to_kind(kind)?.f_to_device(device)?.f_unsqueeze(0)?;
    let ce = z
        .f_log_softmax(1, kind)?
        .f_mul(&y)?
        .f_sum_dim_intlist([1i64].as_slice(), false, kind)?
        .f_neg()?;
    let per_row = ce.f_mul_scalar(cfg.beta / (p + 1 + r) as f64)?;
    let rows = Tensor::f_ones([b], (Kind::Bool, device))?;

    let mut metrics = Metrics::new();
    cp_metrics(&mut metrics, pos, neg, rnd, &d_pos, &d_neg)?;
    metrics.add("cp/prototype", sum_f64(&c)?, 1.0);
    let parts = vec![part("rows", &per_row, &rows, 1.0)?];
    finish(per_row, parts, metrics, cfg.reduction)
}

fn cp_metrics(
    metrics: &mut Metrics,
    pos: &Block,
    neg: &Block,
    rnd: Option<&Block>,
    d_pos: &Tensor,
    d_neg: &Tensor,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    add_mean(metrics, "rewards/chosen", &d_pos.f_neg()?, &pos.mask)?;
    add_mean(metrics, "rewards/rejected", &d_neg.f_neg()?, &neg.mask)?;
    add_mean(metrics, "logps/chosen", &pos.phi.f_neg()?, &pos.mask)?;
    add_mean(metrics, "logps/rejected", &neg.phi.f_neg()?, &neg.mask)?;
    add_mean(metrics, "cp/phi_pos", &pos.phi, &pos.mask)?;
    add_mean(metrics, "cp/phi_neg", &neg.phi, &neg.mask)?;
    if let Some(r) = rnd {
        add_mean(metrics, "cp/phi_rnd", &r.phi, &r.mask)?;
    }
    // Per anchor with at least one negative: margins and the φ gap.
    let kind = pos.phi.kind();
    let mean_of = |x: &Tensor, m: &Tensor| -> Result<Tensor> {
        let cnt = m.f_sum_dim_intlist([1i64].as_slice(), false, kind)?.f_clamp_min(1.0)?;
        Ok(select(x, m)?.f_sum_dim_intlist([1i64].as_slice(), false, kind)?.f_div(&cnt)?)
    };
    let has_neg = neg.mask.f_any_dim(1, false)?;
    let margin = mean_of(d_neg, &neg.mask)?.f_sub(&mean_of(d_pos, &pos.mask)?)?;
    add_mean(metrics, "rewards/margins", &margin, &has_neg)?;
    let gap = mean_of(&neg.phi, &neg.mask)?.f_sub(&mean_of(&pos.phi, &pos.mask)?)?;
    add_mean(metrics, "cp/phi_gap", &gap, &has_neg)?;
    // (p, n) pairs of each anchor ordered correctly: d_p < d_n.
    let pair_mask = pos.mask.f_unsqueeze(2)?.f_logical_and(&neg.mask.f_unsqueeze(1)?)?;
    let correct =
        d_pos.f_unsqueeze(2)?.f_lt_tensor(&d_neg.f_unsqueeze(1)?)?.f_logical_and(&pair_mask)?;
    metrics.add("rewards/accuracies", count_f64(&correct)?, count_f64(&pair_mask)?);
    Ok(())
}
