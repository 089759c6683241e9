//! KL divergence between a per-row target and `softmax(logits)`, forward or reverse, with the
//! target built inside the kernel (kernels spec §2.2–2.3, token-losses §1, §3, §8, §11).

use serde::{Deserialize, Serialize};

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, Scratch, label_at};
use crate::row::{Base, KlSpec, kl_row};
use crate::{KernelError, Result};

const OP: &str = "token_kl";

/// Which way the divergence runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlDirection {
    /// `KL(t ‖ p)`, computed as the cross-entropy `CE(z; t) = −Σ t log p` (gradient `p·Σt − t`).
    #[default]
    Forward,
    /// `KL(p ‖ t) = Σ_{p>0} p (log p − log t)` (gradient `p ⊙ (log p − log t − KL)`).
    Reverse,
}

/// Which value a forward term reports (the gradient is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlValue {
    /// `CE(z; t) = −Σ_{t>0} t log p`: the target entropy is included (upstream TNT reports this).
    CrossEntropy,
    /// `KL(t ‖ p) = CE(z; t) − H(t)`: 0 when `p = t`.
    #[default]
    Divergence,
}

/// The per-row target of [`token_kl`].
///
/// `T` is the element type (`f32` for the kernels, `f64` for the oracles in
/// [`crate::reference`]).
#[derive(Debug, Clone, Copy)]
pub enum KlTarget<'a, T = f32> {
    /// `softmax(z°/T)` from reference logits, restricted to the row vocabulary of the logits
    /// (columns where `z = −inf` are removed and the target renormalised). With `exclude`, row
    /// `r` also removes token `exclude[r]` (when `≥ 0`): the TNT mask-and-renormalise target
    /// `q_v = exp(z°_v − LSE_{v≠y}(z°))`, computed with the masked log-sum-exp, so it stays exact
    /// when `p°_y` saturates (`z° = [0, 120, 0, 0]` gives `[1/3, 0, 1/3, 1/3]`, not NaN).
    Reference {
        /// Reference logits `z°`, `[rows, vocab]`; never differentiated.
        ref_logits: &'a [T],
        /// Per-row token to remove, `[rows]`; negative means none.
        exclude: Option<&'a [i64]>,
    },
    /// The one-hot `e_y` of `labels[r]` (rows whose label is the configured `ignore_index` are
    /// inactive). With smoothing `ε` this is label smoothing `(e_y + ε)/(1 + V'ε)`.
    OneHot {
        /// Labels, `[rows]`.
        labels: &'a [i64],
    },
    /// A precomputed target as log-probabilities `log q` (`−inf` = no mass), `[rows, vocab]`,
    /// for a frozen reference reused across steps. Taken as given: no temperature, no
    /// renormalisation; mass where `z = −inf` makes the loss `+inf`.
    LogProbs {
        /// `log q`, `[rows, vocab]`.
        log_target: &'a [T],
    },
}

/// Options of [`token_kl`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenKlConfig {
    /// Forward `KL(t‖p)` or reverse `KL(p‖t)`. Default forward.
    pub direction: KlDirection,
    /// Value reported by forward rows. Reverse rows always report the divergence. Default
    /// [`KlValue::Divergence`].
    pub value: KlValue,
    /// Smoothing `ε ≥ 0`: the target becomes `S_ε(t) = (t + ε)/(1 + V'ε)` over the row
    /// vocabulary. Required `> 0` for reverse KL to a one-hot or token-excluding target (whose
    /// reverse KL is `+inf` otherwise). Default 0.
    pub smoothing_eps: f64,
    /// Temperature `T > 0`: logits and reference logits are divided by `T`, and the gradient
    /// carries the `1/T` (a `T²` factor, as in distillation, is the caller's). Default 1.
    pub temperature: f64,
    /// Rows whose label equals this value are inactive ([`KlTarget::OneHot`] only). Default
    /// `-100`.
    pub ignore_index: Option<i64>,
    /// Number of threads the rows are split over. Default 1.
    pub threads: usize,
}

impl Default for TokenKlConfig {
    fn default() -> Self {
        TokenKlConfig {
            direction: KlDirection::Forward,
            value: KlValue::Divergence,
            smoothing_eps: 0.0,
            temperature: 1.0,
            ignore_index: Some(-100),
            threads: 1,
        }
    }
}

impl TokenKlConfig {
    /// Sets [`TokenKlConfig::direction`].
    pub fn with_direction(mut self, v: KlDirection) -> Self {
        self.direction = v;
        self
    }
    /// Sets [`TokenKlConfig::value`].
    pub fn with_value(mut self, v: KlValue) -> Self {
        self.value = v;
        self
    }
    /// Sets [`TokenKlConfig::smoothing_eps`].
    pub fn with_smoothing_eps(mut self, v: f64) -> Self {
        self.smoothing_eps = v;
        self
    }
    /// Sets [`TokenKlConfig::temperature`].
    pub fn with_temperature(mut self, v: f64) -> Self {
        self.temperature = v;
        self
    }
    /// Sets [`TokenKlConfig::ignore_index`].
    pub fn with_ignore_index(mut self, v: Option<i64>) -> Self {
        self.ignore_index = v;
        self
    }
    /// Sets [`TokenKlConfig::threads`].
    pub fn with_threads(mut self, v: usize) -> Self {
        self.threads = v;
        self
    }
}

/// Validates a smoothing epsilon: finite, `≥ 0`, and a normal f32 when positive (the logarithm
/// of the smoothed target is evaluated at values down to `ε`).
pub(crate) fn check_eps(op: &'static str, eps: f64, required: bool) -> Result<()> {
    let ok = eps.is_finite() && (eps == 0.0 || eps >= f64::from(f32::MIN_POSITIVE)) && eps >= 0.0;
    if !ok || (required && eps == 0.0) {
        let need = if required { "> 0" } else { "0 or ≥ 1.2e-38" };
        return Err(KernelError::InvalidArg {
            op,
            name: "smoothing_eps",
            reason: format!("{eps} is not finite and {need}"),
        });
    }
    Ok(())
}

/// Validates the target of a KL call (lengths, ids) for the rows that are active.
pub(crate) fn check_target<T>(
    op: &'static str,
    target: &KlTarget<'_, T>,
    rows: usize,
    vocab: usize,
    active: impl Fn(usize) -> bool,
    ignore: Option<i64>,
) -> Result<()> {
    match *target {
        KlTarget::Reference { ref_logits, exclude } => {
            batch::check_len(op, "ref_logits", rows * vocab, ref_logits.len())?;
            if let Some(ex) = exclude {
                batch::check_len(op, "exclude", rows, ex.len())?;
                for (r, &e) in ex.iter().enumerate() {
                    if active(r) && e >= 0 && e as u64 >= vocab as u64 {
                        return Err(KernelError::LabelOutOfRange { op, row: r, label: e, vocab });
                    }
                }
            }
        }
        KlTarget::OneHot { labels } => {
            batch::check_len(op, "labels", rows, labels.len())?;
            for (r, &l) in labels.iter().enumerate() {
                if active(r) {
                    label_at(op, r, l, vocab, ignore)?;
                }
            }
        }
        KlTarget::LogProbs { log_target } => {
            batch::check_len(op, "log_target", rows * vocab, log_target.len())?;
        }
    }
    Ok(())
}

/// Fused KL (forward or reverse) between a per-row target and `softmax(logits/T)`, with its
/// gradient.
///
/// Per active row `r` (scale `a = row_scale[r]`, 1 if absent; `t` the target of
/// [`KlTarget`], smoothed to `S_ε(t)` when `ε > 0`; `k = 1/T`):
///
/// ```text
/// forward, value CrossEntropy:  loss = a·CE(z; t) = −a·Σ_{t_v>0} t_v log p_v
/// forward, value Divergence:    loss = a·(CE(z; t) − H(t)) = a·KL(t ‖ p)
///                               grad = a·k·(p·Σt − t)
/// reverse:                      loss = a·KL(p ‖ t) = a·Σ_{p_v>0} p_v (log p_v − log t_v)
///                               grad = a·k·p ⊙ (log p − log t − KL)
/// ```
///
/// Terms with `t_v = 0` (forward) or `p_v = 0` (reverse) are skipped by selection, never
/// multiplied, so `−inf` entries never produce `0·inf = NaN`. Columns where `z = −inf` are
/// outside the row vocabulary (token-losses §1.5): they get zero gradient and no target mass
/// (reference targets renormalise over the remaining columns), and smoothing uses `V'`.
///
/// Forward rows with a reference target run the recipe of kernels spec §2.3: one scan for the
/// maxima (the reference maximum excludes the removed token), one sweep computing `e = exp(z−m)`
/// and `e° = exp(z°−m°)` into per-thread scratch with all row sums, and one sweep writing the
/// gradient: 2 exp per element, no `[rows, vocab]` temporaries. Reverse rows add one `ln` per
/// element when smoothed.
///
/// # Shapes
///
/// `io`: `[rows, vocab]` with `rows = loss.len()`; `ref_logits`, `log_target`: `[rows, vocab]`;
/// `labels`, `exclude`, `row_scale`, `loss`: `[rows]`.
///
/// # Errors
///
/// Checked before anything is written: [`KernelError::VocabTooSmall`],
/// [`KernelError::LengthMismatch`], [`KernelError::LabelOutOfRange`] (labels or excluded ids of
/// active rows), [`KernelError::InvalidArg`] (configuration; reverse KL with `ε = 0` to a
/// one-hot or token-excluding target). Found while sweeping: [`KernelError::NonFiniteRow`] (NaN
/// or `+inf` in an active row of the logits or the target inputs, a row without a finite logit,
/// or a reference with no finite entry left); all outputs are then reset to 0.
///
/// # Example
///
/// TNT's negative-token target (`p°` with the label removed), token-losses §12.2:
///
/// ```
/// use amend_kernels::{KlTarget, KlValue, LogitsIo, TokenKlConfig, token_kl};
///
/// let z = [2.0f32, 1.0, 0.5, -1.0];
/// let z_ref = [1.5f32, 1.2, 0.3, -0.5];
/// let (mut grad, mut loss) = ([0.0f32; 4], [0.0f32; 1]);
/// let target = KlTarget::Reference { ref_logits: &z_ref, exclude: Some(&[1]) };
/// let cfg = TokenKlConfig::default().with_value(KlValue::CrossEntropy);
/// token_kl(LogitsIo::grad(&z, &mut grad), 4, target, None, &cfg, &mut loss)?;
/// assert!((loss[0] - 1.092_313_5).abs() < 1e-5);
/// let expected = [-0.086_662_11, 0.224_207_82, -0.073_679_05, -0.063_866_66];
/// for (g, e) in grad.iter().zip(expected) {
///     assert!((g - e).abs() < 1e-6);
/// }
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
pub fn token_kl(
    io: LogitsIo<'_>,
    vocab: usize,
    target: KlTarget<'_>,
    row_scale: Option<&[f32]>,
    cfg: &TokenKlConfig,
    loss: &mut [f32],
) -> Result<BatchStats> {
    batch::check_vocab(OP, vocab)?;
    let rows = loss.len();
    batch::elements(OP, rows, vocab)?;
    validate(cfg, &target)?;
    batch::check_row_scale(OP, rows, row_scale)?;
    let active = |r: usize| row_scale.is_none_or(|s| s[r] != 0.0);
    check_target(OP, &target, rows, vocab, active, cfg.ignore_index)?;
    let k = (1.0 / cfg.temperature) as f32;
    let eps = cfg.smoothing_eps as f32;
    let reverse = cfg.direction == KlDirection::Reverse;
    let divergence = cfg.value == KlValue::Divergence;
    let f = |r: usize, buf: RowBuf<'_>, scratch: &mut Scratch| {
        let scale = row_scale.map_or(1.0, |s| s[r]);
        if scale == 0.0 {
            return Ok(None);
        }
        let span = r * vocab..(r + 1) * vocab;
        let base = match target {
            KlTarget::Reference { ref_logits, exclude } => {
                // Prefetch hint for the next row's reference logits (an address only).
                scratch.prefetch[1] = ref_logits.get(span.end..).map_or(0, |s| s.as_ptr() as usize);
                Base::Ref {
                    zr: &ref_logits[span],
                    exclude: exclude.and_then(|e| usize::try_from(e[r]).ok()),
                }
            }
            KlTarget::OneHot { labels } => {
                match label_at(OP, r, labels[r], vocab, cfg.ignore_index)? {
                    Some(y) => Base::OneHot(y),
                    None => return Ok(None),
                }
            }
            KlTarget::LogProbs { log_target } => Base::LogProbs(&log_target[span]),
        };
        let spec = KlSpec { reverse, base, eps, divergence, k, scale };
        kl_row(OP, r, buf, scratch, spec).map(Some)
    };
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::none(), &f)
}

fn validate(cfg: &TokenKlConfig, target: &KlTarget<'_>) -> Result<()> {
    batch::check_finite_param(OP, "temperature", cfg.temperature, 0.0, false)?;
    batch::check_threads(OP, cfg.threads)?;
    let needs_eps = cfg.direction == KlDirection::Reverse
        && matches!(target, KlTarget::OneHot { .. } | KlTarget::Reference { exclude: Some(_), .. });
    check_eps(OP, cfg.smoothing_eps, needs_eps)
}
