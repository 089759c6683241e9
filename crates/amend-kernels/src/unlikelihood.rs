//! Token-level unlikelihood on a sparse candidate set per row, with exact `log(1 − p)`
//! (kernels spec §2.1, token-losses §5.2, §6).

use serde::{Deserialize, Serialize};

use crate::batch::{self, Aux, BatchStats, LogitsIo, RowBuf, Scratch, label_at};
use crate::row::{UlSpec, ul_row};
use crate::{KernelError, Result};

const OP: &str = "unlikelihood";

/// Candidate token ids per row, without a `[rows, vocab]` multi-hot.
///
/// Negative ids are empty slots and are skipped; duplicates within a row count once; ids must
/// be `< vocab`.
#[derive(Debug, Clone, Copy)]
pub enum Candidates<'a> {
    /// Compressed sparse rows: row `r` holds `ids[offsets[r]..offsets[r + 1]]`
    /// (`offsets.len() = rows + 1`, non-decreasing, last `≤ ids.len()`).
    Csr {
        /// Row offsets, `[rows + 1]`.
        offsets: &'a [usize],
        /// Candidate ids.
        ids: &'a [i64],
    },
    /// A padded `[rows, width]` matrix (the layout of a `[B, T, K]` tensor): row `r` holds
    /// `ids[r·width..(r + 1)·width]`, negative entries are padding.
    Padded {
        /// Candidate ids, `[rows, width]`.
        ids: &'a [i64],
        /// Slots per row.
        width: usize,
    },
}

impl<'a> Candidates<'a> {
    /// No candidates on any row (`ids` empty, `width` 0): the kernel is then plain NLL.
    pub const NONE: Candidates<'static> = Candidates::Padded { ids: &[], width: 0 };

    fn row(&self, r: usize) -> &'a [i64] {
        match *self {
            Candidates::Csr { offsets, ids } => &ids[offsets[r]..offsets[r + 1]],
            Candidates::Padded { ids, width } => &ids[r * width..(r + 1) * width],
        }
    }

    fn validate(&self, rows: usize, vocab: usize, active: impl Fn(usize) -> bool) -> Result<()> {
        match *self {
            Candidates::Csr { offsets, ids } => {
                batch::check_len(OP, "candidates.offsets", rows + 1, offsets.len())?;
                let sorted = offsets.windows(2).all(|w| w[0] <= w[1]);
                if !sorted || offsets[rows] > ids.len() {
                    return Err(KernelError::InvalidArg {
                        op: OP,
                        name: "candidates.offsets",
                        reason: format!(
                            "offsets must be non-decreasing and end at most at {} (the number of \
                             ids)",
                            ids.len()
                        ),
                    });
                }
            }
            Candidates::Padded { ids, width } => {
                let n = batch::elements(OP, rows, width)?;
                batch::check_len(OP, "candidates.ids", n, ids.len())?;
            }
        }
        for r in (0..rows).filter(|&r| active(r)) {
            if let Some(&id) = self.row(r).iter().find(|&&id| id >= 0 && id as u64 >= vocab as u64)
            {
                return Err(KernelError::CandidateOutOfRange { op: OP, row: r, id, vocab });
            }
        }
        Ok(())
    }
}

/// Options of [`unlikelihood`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnlikelihoodConfig {
    /// Weight `α ≥ 0` of the unlikelihood term. Default 1 (Welleck et al.'s README value).
    pub alpha: f64,
    /// Rows whose NLL label equals this value get no NLL term. Default `-100`.
    pub ignore_index: Option<i64>,
    /// Number of threads the rows are split over. Default 1.
    pub threads: usize,
}

impl Default for UnlikelihoodConfig {
    fn default() -> Self {
        UnlikelihoodConfig { alpha: 1.0, ignore_index: Some(-100), threads: 1 }
    }
}

impl UnlikelihoodConfig {
    /// Sets [`UnlikelihoodConfig::alpha`].
    pub fn with_alpha(mut self, v: f64) -> Self {
        self.alpha = v;
        self
    }
    /// Sets [`UnlikelihoodConfig::ignore_index`].
    pub fn with_ignore_index(mut self, v: Option<i64>) -> Self {
        self.ignore_index = v;
        self
    }
    /// Sets [`UnlikelihoodConfig::threads`].
    pub fn with_threads(mut self, v: usize) -> Self {
        self.threads = v;
        self
    }
}

/// Unlikelihood loss (plus an optional NLL term) on sparse per-row candidate sets, with its
/// gradient, in one row sweep.
///
/// Per row `r` with scale `a` (1 if `row_scale` is absent), NLL label `x` (if `labels` is given
/// and `labels[r] ≠ ignore_index`) and candidate set `C` (deduplicated):
///
/// ```text
/// loss[r] = a·( −log p_x − α Σ_{c∈C} log(1 − p_c) )            (−log p_x only with a label)
/// log(1 − p_c) = log1p(−p_c)                 if log p_c ≤ −ln 2
///              = LSE_{v≠c}(z) − LSE(z)       otherwise (only the argmax d can have p_d > 1/2)
/// grad[r]  = a·( p − e_x + α·( −S'·p + Σ_{c∈C, c≠d} r_c e_c + [d∈C]·p_d (e_d − q⁽ᵈ⁾) ) )
///            r_c = p_c/(1 − p_c) = exp(log p_c − log(1 − p_c)),  S' = Σ_{c∈C, c≠d} r_c,
///            q⁽ᵈ⁾_v = exp(z_v − LSE_{v≠d}(z)) for v ≠ d, 0 at d
/// ```
///
/// No clamp and no epsilon: the value is exact where `p_c → 1` (E1: `z = [0, 20, 0, 0]`,
/// `C = {1}` gives 18.901387718, not fairseq's clamped 11.51 or t5patches' 15.94) and the
/// gradient stays bounded (`‖·‖₁ ≤ 2α` per candidate) instead of cancelling. `LSE_{v≠d}` uses
/// its own maximum, so it stays exact when the other logits underflow against `z_d`.
///
/// * Annotated-token UL (t5patches `ULModel`, negative positions): `C = {y}`, no label.
/// * Welleck et al.'s token-level UL: `x` = the target, `C` = previous-context tokens of the
///   same sequence minus `x`, built by the caller (for example as CSR).
///
/// A row is active when its scale is nonzero and it has an NLL label or at least one
/// candidate; other rows give loss 0 and a zero gradient row.
///
/// # Shapes
///
/// `io`: `[rows, vocab]`, `rows = loss.len()`; `labels`, `row_scale`: `[rows]`; candidates as
/// described on [`Candidates`].
///
/// # Errors
///
/// Checked before anything is written: [`KernelError::VocabTooSmall`],
/// [`KernelError::LengthMismatch`], [`KernelError::LabelOutOfRange`],
/// [`KernelError::CandidateOutOfRange`], [`KernelError::InvalidArg`] (bad offsets, `α` negative
/// or non-finite, `threads = 0`). Found while sweeping: [`KernelError::NonFiniteRow`]; outputs
/// are then reset to 0.
///
/// Paper: Welleck et al., "Neural Text Generation with Unlikelihood Training",
/// <https://arxiv.org/abs/1908.04319>.
///
/// # Example
///
/// Token-losses §12.4, E1: the current model is saturated on the annotated token.
///
/// ```
/// use amend_kernels::{Candidates, LogitsIo, UnlikelihoodConfig, unlikelihood};
///
/// let z = [0.0f32, 20.0, 0.0, 0.0];
/// let (mut grad, mut loss) = ([0.0f32; 4], [0.0f32; 1]);
/// let cands = Candidates::Csr { offsets: &[0, 1], ids: &[1] };
/// unlikelihood(LogitsIo::grad(&z, &mut grad), 4, None, cands, None,
///              &UnlikelihoodConfig::default(), &mut loss)?;
/// assert!((loss[0] - 18.901_388).abs() < 1e-4);
/// let expected = [-0.333_333_33, 0.999_999_994, -0.333_333_33, -0.333_333_33];
/// for (g, e) in grad.iter().zip(expected) {
///     assert!((g - e).abs() < 1e-6);
/// }
/// # Ok::<(), amend_kernels::KernelError>(())
/// ```
pub fn unlikelihood(
    io: LogitsIo<'_>,
    vocab: usize,
    labels: Option<&[i64]>,
    candidates: Candidates<'_>,
    row_scale: Option<&[f32]>,
    cfg: &UnlikelihoodConfig,
    loss: &mut [f32],
) -> Result<BatchStats> {
    batch::check_vocab(OP, vocab)?;
    batch::check_finite_param(OP, "alpha", cfg.alpha, 0.0, true)?;
    batch::check_threads(OP, cfg.threads)?;
    let rows = loss.len();
    batch::check_row_scale(OP, rows, row_scale)?;
    let scaled = |r: usize| row_scale.is_none_or(|s| s[r] != 0.0);
    if let Some(l) = labels {
        batch::check_len(OP, "labels", rows, l.len())?;
        for (r, &y) in l.iter().enumerate() {
            if scaled(r) {
                label_at(OP, r, y, vocab, cfg.ignore_index)?;
            }
        }
    }
    candidates.validate(rows, vocab, scaled)?;
    let f = |r: usize, buf: RowBuf<'_>, scratch: &mut Scratch| {
        let scale = row_scale.map_or(1.0, |s| s[r]);
        if scale == 0.0 {
            return Ok(None);
        }
        let nll = match labels {
            Some(l) => label_at(OP, r, l[r], vocab, cfg.ignore_index)?,
            None => None,
        };
        let mut cands = std::mem::take(&mut scratch.cands);
        cands.clear();
        cands.extend(candidates.row(r).iter().filter_map(|&c| usize::try_from(c).ok()));
        cands.sort_unstable();
        cands.dedup();
        let out = if nll.is_none() && cands.is_empty() {
            Ok(None)
        } else {
            let spec = UlSpec { nll, cands: &cands, alpha: cfg.alpha as f32, scale };
            ul_row(OP, r, buf, scratch, spec).map(Some)
        };
        scratch.cands = cands;
        out
    };
    batch::run(OP, io, vocab, cfg.threads, loss, Aux::none(), &f)
}
