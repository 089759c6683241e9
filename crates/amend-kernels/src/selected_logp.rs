//! Selected-token log-probability, log-sum-exp and cross-entropy in one sweep (kernels spec
//! §2.1): the primitive behind NLL/cross-entropy, per-sequence log-probs (DPO family, SimPO,
//! ORPO, KTO, NPO) and the NL baseline.

use serde::{Deserialize, Serialize};

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, Scratch, label_at};
use crate::row::{CeSpec, ce_row};
use crate::{KernelError, Result};

const OP: &str = "selected_logp";

/// Options of [`selected_logp`]. Field names follow PyTorch / Liger (`ignore_index`,
/// `label_smoothing`, `lse_square_scale`, `softcap`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelectedLogpConfig {
    /// Rows whose label equals this value are inactive (loss 0, gradient row 0). Default `-100`.
    pub ignore_index: Option<i64>,
    /// Label smoothing `ε ∈ [0, 1]` (PyTorch convention, over the row vocabulary `V'`).
    /// Default 0.
    pub label_smoothing: f64,
    /// z-loss weight `s ≥ 0`: adds `s·lse²`. Default 0.
    pub lse_square_scale: f64,
    /// Logit soft-capping `c > 0`: `z ← c·tanh(z/c)` before everything (Gemma 2). Default off.
    pub softcap: Option<f64>,
    /// Temperature `T > 0`: the logits are divided by `T`. Default 1.
    pub temperature: f64,
    /// Number of threads the rows are split over (scoped threads, no global pool). Default 1.
    pub threads: usize,
}

impl Default for SelectedLogpConfig {
    fn default() -> Self {
        SelectedLogpConfig {
            ignore_index: Some(-100),
            label_smoothing: 0.0,
            lse_square_scale: 0.0,
            softcap: None,
            temperature: 1.0,
            threads: 1,
        }
    }
}

impl SelectedLogpConfig {
    /// Sets [`SelectedLogpConfig::ignore_index`].
    pub fn with_ignore_index(mut self, v: Option<i64>) -> Self {
        self.ignore_index = v;
        self
    }
    /// Sets [`SelectedLogpConfig::label_smoothing`].
    pub fn with_label_smoothing(mut self, v: f64) -> Self {
        self.label_smoothing = v;
        self
    }
    /// Sets [`SelectedLogpConfig::lse_square_scale`].
    pub fn with_lse_square_scale(mut self, v: f64) -> Self {
        self.lse_square_scale = v;
        self
    }
    /// Sets [`SelectedLogpConfig::softcap`].
    pub fn with_softcap(mut self, v: Option<f64>) -> Self {
        self.softcap = v;
        self
    }
    /// Sets [`SelectedLogpConfig::temperature`].
    pub fn with_temperature(mut self, v: f64) -> Self {
        self.temperature = v;
        self
    }
    /// Sets [`SelectedLogpConfig::threads`].
    pub fn with_threads(mut self, v: usize) -> Self {
        self.threads = v;
        self
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(KernelError::InvalidArg {
                op,
                name: "label_smoothing",
                reason: format!("{} is outside [0, 1]", self.label_smoothing),
            });
        }
        batch::check_finite_param(op, "lse_square_scale", self.lse_square_scale, 0.0, true)?;
        if let Some(c) = self.softcap {
            batch::check_finite_param(op, "softcap", c, 0.0, false)?;
        }
        batch::check_finite_param(op, "temperature", self.temperature, 0.0, false)?;
        batch::check_threads(op, self.threads)
    }
}

/// Output buffers of [`selected_logp`]: the per-row loss, and optionally `LSE` and `log p_y`.
#[derive(Debug)]
pub struct SelectedLogpOut<'a> {
    /// Per-row loss, `[rows]`; its length defines the number of rows.
    pub loss: &'a mut [f32],
    /// Per-row `LSE(z̃)` of the transformed logits, `[rows]` (0 at inactive rows).
    pub lse: Option<&'a mut [f32]>,
    /// Per-row `log p_y = z̃_y − LSE(z̃)` (no smoothing, no z-loss; 0 at inactive rows).
    pub logp: Option<&'a mut [f32]>,
}

impl<'a> SelectedLogpOut<'a> {
    /// Only the loss.
    pub fn new(loss: &'a mut [f32]) -> Self {
        SelectedLogpOut { loss, lse: None, logp: None }
    }
    /// Also write the per-row log-sum-exp.
    pub fn with_lse(mut self, lse: &'a mut [f32]) -> Self {
        self.lse = Some(lse);
        self
    }
    /// Also write the per-row selected log-probability.
    pub fn with_logp(mut self, logp: &'a mut [f32]) -> Self {
        self.logp = Some(logp);
        self
    }
}

/// Selected-token cross-entropy with its gradient, log-sum-exp and `log p_y`, fused per row.
///
/// Per active row `r` with label `y` and scale `a = row_scale[r]` (1 if absent):
///
/// ```text
/// z̃      = softcap(z)/T,  softcap(z) = c·tanh(z/c)  (identity when off)
/// lse     = LSE(z̃),  log p_y = z̃_y − lse
/// CE      = −(1−ε)·log p_y − (ε/V')·Σ_{v∈supp} log p_v       (ε = label_smoothing)
/// loss[r] = a·(CE + s·lse²)                                  (s = lse_square_scale)
/// grad[r] = a·(1/T)·(p·(1 + 2s·lse) − (1−ε)·e_y − (ε/V')·1_supp) ⊙ (1 − tanh²(z/c))
/// ```
///
/// `supp` are the columns with `z > −inf` (`V' = |supp|`): masked columns get no smoothing mass
/// and a zero gradient. A negative scale gives the log-likelihood itself: `a = −1` writes
/// `loss = log p_y` and `grad = e_y − p` (what DPO-style sequence log-probs need).
///
/// Rows whose label is `ignore_index` or whose scale is 0 are inactive: loss 0, gradient row 0
/// (their logits and label are never read). The value-only path (`LogitsIo::Value`) costs one
/// exp per element and writes no gradient.
///
/// # Shapes
///
/// `io`: `[rows, vocab]` with `rows = out.loss.len()`; `labels`: `[rows]` (i64, as tch gives
/// them); `row_scale`: `[rows]`; `out.lse`, `out.logp`: `[rows]`.
///
/// # Errors
///
/// Checked before anything is written: [`KernelError::VocabTooSmall`] (`vocab < 2`),
/// [`KernelError::LengthMismatch`], [`KernelError::LabelOutOfRange`] (an active label outside
/// `[0, vocab)`), [`KernelError::InvalidArg`] (configuration, non-finite row scale,
/// `threads = 0`). Found while sweeping: [`KernelError::NonFiniteRow`] (an active row with NaN,
/// `+inf` or no finite logit); all outputs are then reset to 0 (in place: the logits are checked
/// first and left untouched).
///
/// # Example
///
/// ```
/// use amend_kernels::{LogitsIo, SelectedLogpConfig, SelectedLogpOut, selected_logp};
///
/// let logits = [2.0f32, 1.0, 0.5, -1.0, /* row 1 is ignored: */ 0.0, 0.0, 0.0, 0.0];
/// let labels = [1i64, -100];
/// let (mut grad, mut loss, mut logp) = ([0.0f32; 8], [0.0f32; 2], [0.0f32; 2]);
/// let stats = selected_logp(
///     LogitsIo::grad(&logits, &mut grad),
///     4,
///     &labels,
///     None,
///     &SelectedLogpConfig::default(),
///     SelectedLogpOut::new(&mut loss).with_logp(&mut logp),
/// )?;
/// assert!((loss[0] - 1.495_181_9).abs() < 1e-5); // −log p_1 (token-losses §12.2, NLL)
/// assert_eq!(logp[0], -loss[0]);
/// assert!((grad[1] - (-0.775_792_2)).abs() < 1e-6); // p_1 − 1
/// assert_eq!((stats.count, loss[1], &grad[4..]), (1, 0.0, &[0.0f32; 4][..]));
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
pub fn selected_logp(
    io: LogitsIo<'_>,
    vocab: usize,
    labels: &[i64],
    row_scale: Option<&[f32]>,
    cfg: &SelectedLogpConfig,
    out: SelectedLogpOut<'_>,
) -> Result<BatchStats> {
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
    let spec = |y: usize, scale: f32| CeSpec {
        label: y,
        smoothing: cfg.label_smoothing as f32,
        z_loss: cfg.lse_square_scale as f32,
        softcap: cfg.softcap.map(|c| c as f32),
        k: (1.0 / cfg.temperature) as f32,
        scale,
        floor: None,
    };
    let f = |r: usize, buf: RowBuf<'_>, scratch: &mut Scratch| {
        let scale = row_scale.map_or(1.0, |s| s[r]);
        if scale == 0.0 {
            return Ok(None);
        }
        match label_at(OP, r, labels[r], vocab, cfg.ignore_index)? {
            None => Ok(None),
            Some(y) => ce_row(OP, r, buf, scratch, spec(y, scale)).map(Some),
        }
    };
    let SelectedLogpOut { loss, lse, logp } = out;
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::values(lse, logp), &f)
}
