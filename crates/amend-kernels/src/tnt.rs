//! The per-row dispatcher: a whole TNT variant (or the NL / UL baselines of the same code base)
//! in one call, each row's term chosen by the sign of its token weight (token-losses §4, §5).

use serde::{Deserialize, Serialize};

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, Scratch};
use crate::row::{Base, CeSpec, KlSpec, UlSpec, ce_row, kl_row, ul_row};
use crate::simd;
use crate::token_kl::{KlValue, check_eps};
use crate::{KernelError, Result};

const OP: &str = "tnt";

/// A token-level objective whose per-position term is selected by a weight `w ∈ {−1, 0, +1}`.
///
/// Targeted Negative Training (Zhang et al., <https://arxiv.org/abs/2406.13660>, reference code
/// `google/t5patches`), with `q = p°` with the label removed and renormalised (masked LSE),
/// `S_ε(u) = (u + ε)/(1 + V'ε)`:
///
/// | variant | `w = −1` (scaled by `α`) | `w = +1` |
/// |---|---|---|
/// | `Tnff` | `CE(z; q)` | `CE(z; p°)` |
/// | `Tnfll` | `CE(z; q)` | `−log p_y` |
/// | `Tnrr` | `KL(p ‖ S_ε(q))` | `KL(p ‖ S_ε(p°))` |
/// | `Tnrf` | `KL(p ‖ S_ε(q))` | `CE(z; S_ε(p°))` |
/// | `Tnrll` | `KL(p ‖ S_ε(q))` | `CE(z; S_ε(e_y))` |
/// | `Nl` | `α·log p_y`, floored at `α·θ` (zero gradient below) | `−log p_y` |
/// | `UlAnnotated` | `−α·log(1 − p_y)` (exact) | `−log p_y` |
///
/// Forward terms report the cross-entropy form by default (as upstream; see
/// [`TntKernelConfig::forward_value`]), reverse terms the true KL.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TntVariant {
    /// Forward KL on negatives and positives.
    Tnff,
    /// Reverse KL on negatives and positives.
    Tnrr,
    /// Reverse KL on negatives, forward on positives.
    Tnrf,
    /// Forward KL on negatives, label likelihood on positives.
    Tnfll,
    /// Reverse KL on negatives, label-smoothed likelihood on positives.
    Tnrll,
    /// Negative likelihood (t5patches `NLModel`): `threshold` `θ < 0` floors negatives
    /// (`None` disables the floor).
    Nl {
        /// The floor `θ` on `log p_y` of negative positions (token-losses default −10.3).
        threshold: Option<f64>,
    },
    /// Unlikelihood on the annotated token (t5patches `ULModel`).
    UlAnnotated,
}

impl TntVariant {
    fn needs_ref(self) -> bool {
        matches!(
            self,
            TntVariant::Tnff
                | TntVariant::Tnrr
                | TntVariant::Tnrf
                | TntVariant::Tnfll
                | TntVariant::Tnrll
        )
    }

    fn needs_eps(self) -> bool {
        matches!(self, TntVariant::Tnrr | TntVariant::Tnrf | TntVariant::Tnrll)
    }
}

/// Options of [`tnt`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TntKernelConfig {
    /// The objective.
    pub variant: TntVariant,
    /// Weight `α ≥ 0` of negative positions. Default `1e4` (upstream).
    pub alpha: f64,
    /// Smoothing `ε > 0` of the reverse-form targets (`Tnrr`, `Tnrf`, `Tnrll`). Default `1e-6`
    /// (upstream); the uniform mass `V'ε/(1 + V'ε)` grows with the vocabulary (token-losses §3).
    pub smoothing_eps: f64,
    /// Value reported by forward terms. Default [`KlValue::CrossEntropy`] (upstream).
    pub forward_value: KlValue,
    /// Number of threads the rows are split over. Default 1.
    pub threads: usize,
}

impl TntKernelConfig {
    /// The upstream defaults for `variant`: `α = 1e4`, `ε = 1e-6`, cross-entropy values.
    pub fn new(variant: TntVariant) -> Self {
        TntKernelConfig {
            variant,
            alpha: 1e4,
            smoothing_eps: 1e-6,
            forward_value: KlValue::CrossEntropy,
            threads: 1,
        }
    }
    /// Sets [`TntKernelConfig::alpha`].
    pub fn with_alpha(mut self, v: f64) -> Self {
        self.alpha = v;
        self
    }
    /// Sets [`TntKernelConfig::smoothing_eps`].
    pub fn with_smoothing_eps(mut self, v: f64) -> Self {
        self.smoothing_eps = v;
        self
    }
    /// Sets [`TntKernelConfig::forward_value`].
    pub fn with_forward_value(mut self, v: KlValue) -> Self {
        self.forward_value = v;
        self
    }
    /// Sets [`TntKernelConfig::threads`].
    pub fn with_threads(mut self, v: usize) -> Self {
        self.threads = v;
        self
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        batch::check_finite_param(op, "alpha", self.alpha, 0.0, true)?;
        batch::check_threads(op, self.threads)?;
        if self.variant.needs_eps() {
            check_eps(op, self.smoothing_eps, true)?;
        }
        if let TntVariant::Nl { threshold: Some(t) } = self.variant
            && !(t.is_finite() && t < 0.0)
        {
            return Err(KernelError::InvalidArg {
                op,
                name: "threshold",
                reason: format!("{t} must be finite and < 0"),
            });
        }
        Ok(())
    }
}

/// Evaluates a whole TNT variant (or NL / annotated UL) over a batch of positions in one call,
/// with the gradient; each row's term is chosen by the sign of its weight.
///
/// Per row `r` with weight `w = weights[r]`, label `y = labels[r]`:
///
/// ```text
/// w =  0: inactive: loss 0, gradient row 0 (logits, reference and label are not read)
/// w = −1: loss = α·ℓ⁻(z, z°, y),  grad = α·∂ℓ⁻/∂z
/// w = +1: loss = ℓ⁺(z, z°, y),    grad = ∂ℓ⁺/∂z
/// ```
///
/// with `ℓ±` from the table on [`TntVariant`]. Negative targets are built with the masked
/// log-sum-exp `LSE_{v≠y}(z°)` (E2 of token-losses §12.4 stays finite), the unlikelihood is
/// exact (E1), and columns where `z = −inf` are removed from the row (§1.5; smoothing uses `V'`).
///
/// # Shapes
///
/// `io`, `ref_logits`: `[rows, vocab]` with `rows = loss.len()`; `labels` (i64), `weights`,
/// `loss`: `[rows]`.
///
/// # Errors
///
/// Checked before anything is written: [`KernelError::VocabTooSmall`],
/// [`KernelError::LengthMismatch`], [`KernelError::LabelOutOfRange`] (labels of active rows),
/// [`KernelError::InvalidArg`] (a weight other than −1, 0, +1; `ref_logits` missing for a TNT
/// variant; `α` negative, `ε ≤ 0` for a reverse variant, NL threshold not negative). Found while
/// sweeping: [`KernelError::NonFiniteRow`]; outputs are then reset to 0.
///
/// # Example
///
/// TNFF on token-losses §12.2 (Example A), one negative and one positive position:
///
/// ```
/// use amend_kernels::{LogitsIo, TntKernelConfig, TntVariant, tnt};
///
/// let z = [2.0f32, 1.0, 0.5, -1.0, 2.0, 1.0, 0.5, -1.0];
/// let z_ref = [1.5f32, 1.2, 0.3, -0.5, 1.5, 1.2, 0.3, -0.5];
/// let (mut grad, mut loss) = ([0.0f32; 8], [0.0f32; 2]);
/// let cfg = TntKernelConfig::new(TntVariant::Tnff).with_alpha(1.0);
/// let stats = tnt(LogitsIo::grad(&z, &mut grad), 4, Some(&z_ref), &[1, 1], &[-1.0, 1.0],
///                 &cfg, &mut loss)?;
/// assert!((loss[0] - 1.092_313_5).abs() < 1e-5); // TNFF⁻, cross-entropy form
/// assert!((loss[1] - 1.229_385_0).abs() < 1e-5); // TNFF⁺ = CE(z; p°)
/// assert_eq!(stats.count, 2);
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
pub fn tnt(
    io: LogitsIo<'_>,
    vocab: usize,
    ref_logits: Option<&[f32]>,
    labels: &[i64],
    weights: &[f32],
    cfg: &TntKernelConfig,
    loss: &mut [f32],
) -> Result<BatchStats> {
    tnt_impl(io, vocab, ref_logits, labels, weights, cfg, loss, None)
}

/// Per-row diagnostics of a TNT call, from [`tnt_with_stats`]: what the TNT metrics of
/// `amend-losses` are made of (`tnt/neg_mass`, `tnt/ref_neg_mass`, `tnt/neg_top1`,
/// `tnt/neg_kl`, `tnt/pos_kl`, `tnt/pos_top1_agreement`).
///
/// Everything is over the row vocabulary (columns where `z = −inf` are removed from the
/// reference too). Inactive rows (`w = 0`) hold [`TntRowStats::INACTIVE`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TntRowStats {
    /// `log p_y`: the model's log-probability of the label.
    pub logp_y: f32,
    /// `log p°_y`: the reference's log-probability of the label (the full reference, also at
    /// negative rows).
    pub ref_logp_y: f32,
    /// `KL(t ‖ p)` to the ideal unsmoothed target: `t = q` (the reference with the label
    /// removed and renormalised) at negative rows, `t = p°` at positive rows, whatever the
    /// variant optimises.
    pub kl: f32,
    /// `argmax_v z_v` (the first maximum, as `torch.argmax`).
    pub argmax: i64,
    /// `argmax_v z°_v` (the first maximum).
    pub ref_argmax: i64,
}

impl TntRowStats {
    /// The value of an inactive row: zeros and argmaxes of −1 (no token).
    pub const INACTIVE: TntRowStats =
        TntRowStats { logp_y: 0.0, ref_logp_y: 0.0, kl: 0.0, argmax: -1, ref_argmax: -1 };
}

impl Default for TntRowStats {
    fn default() -> Self {
        TntRowStats::INACTIVE
    }
}

/// [`tnt`] that also writes each row's [`TntRowStats`] into `stats`, computed in the same sweep
/// while the row is in cache (no second pass over `[rows, vocab]` in memory): the diagnostics of
/// a training step at a fraction of the step's cost.
///
/// With a separate gradient buffer or value only, the statistics reuse the row's log-sum-exp;
/// in place they are computed before the gradient overwrites the logits.
///
/// # Shapes
///
/// As [`tnt`]; `stats`: `[rows]`.
///
/// # Errors
///
/// As [`tnt`], plus [`KernelError::InvalidArg`] when `ref_logits` is missing (the statistics
/// need the reference, also for NL and annotated UL) and [`KernelError::LengthMismatch`] for
/// `stats`. On an error `stats` is reset to [`TntRowStats::INACTIVE`].
///
/// # Example
///
/// ```
/// use amend_kernels::{LogitsIo, TntKernelConfig, TntRowStats, TntVariant, tnt_with_stats};
///
/// let z = [2.0f32, 1.0, 0.5, -1.0, 2.0, 1.0, 0.5, -1.0];
/// let z_ref = [1.5f32, 1.2, 0.3, -0.5, 1.5, 1.2, 0.3, -0.5];
/// let (mut grad, mut loss) = ([0.0f32; 8], [0.0f32; 2]);
/// let mut stats = [TntRowStats::INACTIVE; 2];
/// let cfg = TntKernelConfig::new(TntVariant::Tnff);
/// tnt_with_stats(LogitsIo::grad(&z, &mut grad), 4, &z_ref, &[0, 0], &[-1.0, 1.0], &cfg,
///                &mut loss, &mut stats)?;
/// assert_eq!(stats[0].argmax, 0); // the unwanted token 0 is the model's top-1
/// assert!((stats[0].logp_y - -0.495_181_9).abs() < 1e-5); // log p_y
/// assert!((stats[0].kl - 0.964_072_7).abs() < 1e-5); // KL(q ‖ p), q without token 0
/// assert!((stats[1].kl - 0.058_896_8).abs() < 1e-5); // KL(p° ‖ p) on the positive row
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn tnt_with_stats(
    io: LogitsIo<'_>,
    vocab: usize,
    ref_logits: &[f32],
    labels: &[i64],
    weights: &[f32],
    cfg: &TntKernelConfig,
    loss: &mut [f32],
    stats: &mut [TntRowStats],
) -> Result<BatchStats> {
    batch::check_len(OP, "stats", loss.len(), stats.len())?;
    tnt_impl(io, vocab, Some(ref_logits), labels, weights, cfg, loss, Some(stats))
}

/// The statistics of one active row (see [`TntRowStats`]); `lse` is the row's log-sum-exp when
/// the caller has it. Reads scratch row 2 when the forward row left the reference's
/// exponentials there ([`Scratch::ref_exp`]), else writes them into row 1; the row was validated
/// by the caller's pass.
fn row_stats(
    z: &[f32],
    zr: &[f32],
    y: usize,
    neg: bool,
    lse: Option<f32>,
    scratch: &mut Scratch,
) -> TntRowStats {
    let sc = simd::scan(z, None, None);
    let m = sc.max;
    let mask = (sc.min == f32::NEG_INFINITY).then_some(z);
    let lse = lse.unwrap_or_else(|| m + simd::exp_sum(z, mask, m, 1.0, None, None).ln());
    let argmax = simd::first_index_of(z, m, None);
    // The reference over the row vocabulary: its maximum, and the target's (without `y` at a
    // negative row).
    let exclude = neg.then_some(y);
    // A forward row of the same target left its exponentials in scratch row 2: reuse them.
    let reuse = scratch.ref_exp.take().filter(|r| r.exclude == exclude);
    let (s1, s2, _) = scratch.rows();
    let (full, e, mr, sr) = match reuse {
        Some(r) if !neg => (r.shift, &*s2, r.shift, r.sum),
        Some(r) => (simd::scan(zr, None, mask).max, &*s2, r.shift, r.sum),
        None => {
            let full = simd::scan(zr, None, mask).max;
            let mr = if neg && zr[y] >= full { simd::scan(zr, exclude, mask).max } else { full };
            let sr = simd::exp_sum(zr, mask, mr, 1.0, Some(&mut *s1), exclude);
            (full, &*s1, mr, sr)
        }
    };
    let ref_argmax = simd::first_index_of(zr, full, mask);
    let lnsr = sr.ln();
    // KL(t ‖ p) = Σ t (log t − log p) = Σ e°(z° − z)/s° + LSE(z) − (m° + ln s°).
    let dot = simd::weighted_diff_sum(e, zr, z);
    let kl = (dot / f64::from(sr)) as f32 + lse - (mr + lnsr);
    // `y` outside the row vocabulary has no reference mass; otherwise a negative row's target
    // sum lacks `y`, which the full reference LSE adds back.
    let ref_logp_y = if mask.is_some_and(|z| z[y] == f32::NEG_INFINITY) {
        f32::NEG_INFINITY
    } else if neg {
        zr[y] - log_add_exp(mr + lnsr, zr[y])
    } else {
        zr[y] - (mr + lnsr)
    };
    TntRowStats {
        logp_y: z[y] - lse,
        ref_logp_y,
        kl,
        argmax: argmax as i64,
        ref_argmax: ref_argmax as i64,
    }
}

fn log_add_exp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f32::NEG_INFINITY { hi } else { hi + (lo - hi).exp().ln_1p() }
}

#[allow(clippy::too_many_arguments)]
fn tnt_impl(
    io: LogitsIo<'_>,
    vocab: usize,
    ref_logits: Option<&[f32]>,
    labels: &[i64],
    weights: &[f32],
    cfg: &TntKernelConfig,
    loss: &mut [f32],
    stats: Option<&mut [TntRowStats]>,
) -> Result<BatchStats> {
    batch::check_vocab(OP, vocab)?;
    cfg.validate(OP)?;
    let rows = loss.len();
    let n = batch::elements(OP, rows, vocab)?;
    batch::check_len(OP, "labels", rows, labels.len())?;
    batch::check_len(OP, "weights", rows, weights.len())?;
    match (ref_logits, cfg.variant.needs_ref()) {
        (Some(zr), _) => batch::check_len(OP, "ref_logits", n, zr.len())?,
        (None, true) => {
            return Err(KernelError::InvalidArg {
                op: OP,
                name: "ref_logits",
                reason: format!("{:?} needs reference logits", cfg.variant),
            });
        }
        (None, false) => {}
    }
    for (r, (&w, &y)) in weights.iter().zip(labels).enumerate() {
        if w != 0.0 && w != 1.0 && w != -1.0 {
            return Err(KernelError::InvalidArg {
                op: OP,
                name: "weights",
                reason: format!("token weights must be -1, 0 or +1; found {w} at row {r}"),
            });
        }
        if w != 0.0 {
            batch::label_at(OP, r, y, vocab, None)?;
        }
    }
    let eps = cfg.smoothing_eps as f32;
    let alpha = cfg.alpha as f32;
    let fwd_div = cfg.forward_value == KlValue::Divergence;
    let want_stats = stats.is_some();
    let f = |r: usize, buf: RowBuf<'_>, scratch: &mut Scratch| {
        let w = weights[r];
        if w == 0.0 {
            return Ok(None);
        }
        let y = batch::label_at(OP, r, labels[r], vocab, None)?.unwrap_or(0);
        let neg = w < 0.0;
        let zr = ref_logits.map(|z| &z[r * vocab..(r + 1) * vocab]).unwrap_or(&[]);
        // Prefetch hint for the next row's reference logits (an address only).
        scratch.prefetch[1] =
            ref_logits.and_then(|z| z.get((r + 1) * vocab..)).map_or(0, |s| s.as_ptr() as usize);
        fn kl(reverse: bool, base: Base<'_>, eps: f32, scale: f32, fwd_div: bool) -> KlSpec<'_> {
            KlSpec { reverse, base, eps, divergence: !reverse && fwd_div, k: 1.0, scale }
        }
        let nll = CeSpec {
            label: y,
            smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            k: 1.0,
            scale: 1.0,
            floor: None,
        };
        let masked = Base::Ref { zr, exclude: Some(y) };
        let full = Base::Ref { zr, exclude: None };
        // Statistics: after the row (reusing its LSE) when the logits stay readable, before it
        // when the gradient overwrites them.
        let stats_on = want_stats && !buf.check_only();
        let after = buf.shared_z();
        scratch.ref_exp = None;
        let before = match (stats_on, after) {
            (true, None) => Some(row_stats(buf.z(), zr, y, neg, None, scratch)),
            _ => None,
        };
        let out = match (cfg.variant, neg) {
            (TntVariant::Tnff | TntVariant::Tnfll, true) => {
                kl_row(OP, r, buf, scratch, kl(false, masked, 0.0, alpha, fwd_div))
            }
            (TntVariant::Tnrr | TntVariant::Tnrf | TntVariant::Tnrll, true) => {
                kl_row(OP, r, buf, scratch, kl(true, masked, eps, alpha, fwd_div))
            }
            (TntVariant::Tnff, false) => {
                kl_row(OP, r, buf, scratch, kl(false, full, 0.0, 1.0, fwd_div))
            }
            (TntVariant::Tnrr, false) => {
                kl_row(OP, r, buf, scratch, kl(true, full, eps, 1.0, fwd_div))
            }
            (TntVariant::Tnrf, false) => {
                kl_row(OP, r, buf, scratch, kl(false, full, eps, 1.0, fwd_div))
            }
            (TntVariant::Tnrll, false) => {
                kl_row(OP, r, buf, scratch, kl(false, Base::OneHot(y), eps, 1.0, fwd_div))
            }
            (TntVariant::Tnfll | TntVariant::Nl { .. } | TntVariant::UlAnnotated, false) => {
                ce_row(OP, r, buf, scratch, nll)
            }
            (TntVariant::Nl { threshold }, true) => ce_row(
                OP,
                r,
                buf,
                scratch,
                CeSpec { scale: -alpha, floor: threshold.map(|t| t as f32), ..nll },
            ),
            (TntVariant::UlAnnotated, true) => {
                let spec = UlSpec { nll: None, cands: &[y], alpha, scale: 1.0 };
                ul_row(OP, r, buf, scratch, spec)
            }
        }?;
        if stats_on {
            scratch.stats = match (before, after) {
                (Some(st), _) => Some(st),
                (None, Some(z)) => Some(row_stats(z, zr, y, neg, Some(out.lse), scratch)),
                (None, None) => None,
            };
        }
        Ok(Some(out))
    };
    let aux = Aux { lse: None, logp: None, stats };
    batch::run(OP, io, vocab, cfg.threads, loss, aux, &f)
}
