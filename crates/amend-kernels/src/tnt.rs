//! The per-row dispatcher: a whole TNT variant (or the NL / UL baselines of the same code base)
//! in one call, each row's term chosen by the sign of its token weight (token-losses §4, §5).

use serde::{Deserialize, Serialize};

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, Scratch};
use crate::row::{Base, CeSpec, KlSpec, UlSpec, ce_row, kl_row, ul_row};
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
        };
        out.map(Some)
    };
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::none(), &f)
}
