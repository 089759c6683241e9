//! The batch driver shared by every kernel: input/output buffers ([`LogitsIo`]), validation
//! helpers, the split of rows over scoped threads, and the f64 batch reduction ([`BatchStats`]).

use crate::tnt::TntRowStats;
use crate::{KernelError, Result, SumCount};

/// The logits a kernel reads and where it writes their gradient.
///
/// All buffers are row-major `[rows, vocab]` `f32`.
///
/// | variant | reads | writes | extra memory |
/// |---|---|---|---|
/// | `Value` | logits | nothing (value-only path; no gradient work) | `O(threads · vocab)` |
/// | `Grad` | logits | the gradient into `grad` | `O(threads · vocab)` |
/// | `InPlace` | logits | the gradient over the logits (Liger's trick) | `O(threads · vocab)` |
///
/// Inactive rows get a gradient row of exact zeros in `Grad` and `InPlace` mode.
///
/// `InPlace` validates every row (one extra read-only sweep) before it writes anything, so a
/// rejected call leaves the logits untouched.
#[derive(Debug)]
pub enum LogitsIo<'a> {
    /// Compute values only; no gradient is computed or written.
    Value(&'a [f32]),
    /// Read `logits`, write `∂loss/∂logits` into `grad` (same length).
    Grad {
        /// Logits, `[rows, vocab]`.
        logits: &'a [f32],
        /// Gradient output, `[rows, vocab]`; fully overwritten.
        grad: &'a mut [f32],
    },
    /// Overwrite the logits with `∂loss/∂logits`.
    InPlace(&'a mut [f32]),
}

impl<'a> LogitsIo<'a> {
    /// Value-only input.
    pub fn value(logits: &'a [f32]) -> Self {
        LogitsIo::Value(logits)
    }

    /// Logits plus a separate gradient buffer.
    pub fn grad(logits: &'a [f32], grad: &'a mut [f32]) -> Self {
        LogitsIo::Grad { logits, grad }
    }

    /// Logits that are overwritten by their gradient.
    pub fn in_place(logits: &'a mut [f32]) -> Self {
        LogitsIo::InPlace(logits)
    }

    /// Whether this call writes a gradient.
    pub fn writes_grad(&self) -> bool {
        !matches!(self, LogitsIo::Value(_))
    }

    fn logits_len(&self) -> usize {
        match self {
            LogitsIo::Value(z) | LogitsIo::Grad { logits: z, .. } => z.len(),
            LogitsIo::InPlace(z) => z.len(),
        }
    }
}

/// What a kernel call returns besides its per-row outputs: the batch reduction in f64.
///
/// `sum` adds the per-row losses (as written to the `loss` buffer, row scale included) in row
/// order in f64, so it is the same for any thread count. `count` is the number of active rows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchStats {
    /// `Σ loss[r]` over all rows, in f64, in row order.
    pub sum: f64,
    /// Number of active rows (rows that were computed, not skipped).
    pub count: usize,
    /// Number of active rows whose logits contained `−inf` entries (a masked vocabulary).
    /// Callers that inject gradients into an autograd graph use it to decide whether the
    /// logits must be sanitised before a `⟨g, z⟩` product (`0 · −inf` is NaN).
    pub masked_vocab_rows: usize,
}

impl BatchStats {
    /// `(sum, count)` as the workspace's normalisation pair.
    pub fn sum_count(&self) -> SumCount {
        SumCount::new(self.sum, self.count as f64)
    }

    /// `sum / count`, and 0 when no row is active.
    pub fn mean(&self) -> f64 {
        self.sum_count().mean()
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers.

pub(crate) fn check_len(
    op: &'static str,
    name: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { op, name, expected, got })
    }
}

pub(crate) fn check_vocab(op: &'static str, vocab: usize) -> Result<()> {
    if vocab < 2 { Err(KernelError::VocabTooSmall { op, vocab }) } else { Ok(()) }
}

pub(crate) fn elements(op: &'static str, rows: usize, vocab: usize) -> Result<usize> {
    rows.checked_mul(vocab).ok_or_else(|| KernelError::InvalidArg {
        op,
        name: "rows",
        reason: format!("{rows} rows of {vocab} entries overflow usize"),
    })
}

pub(crate) fn check_threads(op: &'static str, threads: usize) -> Result<()> {
    if threads == 0 {
        Err(KernelError::InvalidArg {
            op,
            name: "threads",
            reason: "must be at least 1".to_string(),
        })
    } else {
        Ok(())
    }
}

pub(crate) fn check_row_scale(op: &'static str, rows: usize, scale: Option<&[f32]>) -> Result<()> {
    if let Some(s) = scale {
        check_len(op, "row_scale", rows, s.len())?;
        if let Some((r, v)) = s.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(KernelError::InvalidArg {
                op,
                name: "row_scale",
                reason: format!("row {r} has non-finite scale {v}"),
            });
        }
    }
    Ok(())
}

pub(crate) fn check_finite_param(
    op: &'static str,
    name: &'static str,
    v: f64,
    min: f64,
    min_inclusive: bool,
) -> Result<()> {
    let ok = v.is_finite() && if min_inclusive { v >= min } else { v > min };
    if ok {
        Ok(())
    } else {
        let rel = if min_inclusive { "≥" } else { ">" };
        Err(KernelError::InvalidArg {
            op,
            name,
            reason: format!("{v} is not finite and {rel} {min}"),
        })
    }
}

/// A label of an active row: `Ok(None)` if it equals `ignore`, `Ok(Some(y))` if in range.
pub(crate) fn label_at(
    op: &'static str,
    row: usize,
    label: i64,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<Option<usize>> {
    if Some(label) == ignore {
        return Ok(None);
    }
    match usize::try_from(label) {
        Ok(y) if y < vocab => Ok(Some(y)),
        _ => Err(KernelError::LabelOutOfRange { op, row, label, vocab }),
    }
}

// ---------------------------------------------------------------------------------------------
// Per-row plumbing.

/// One row's logits and gradient destination, as the row code sees them.
pub(crate) enum RowBuf<'a> {
    /// Validate only (the pre-pass of in-place calls): read, never write.
    Check(&'a [f32]),
    Value(&'a [f32]),
    Grad(&'a [f32], &'a mut [f32]),
    InPlace(&'a mut [f32]),
}

impl<'a> RowBuf<'a> {
    /// The logits row for as long as the buffer lives, when no write can go through it (`None`
    /// in place).
    pub fn shared_z(&self) -> Option<&'a [f32]> {
        match self {
            RowBuf::Check(z) | RowBuf::Value(z) | RowBuf::Grad(z, _) => Some(*z),
            RowBuf::InPlace(_) => None,
        }
    }

    pub fn z(&self) -> &[f32] {
        match self {
            RowBuf::Check(z) | RowBuf::Value(z) | RowBuf::Grad(z, _) => z,
            RowBuf::InPlace(z) => z,
        }
    }

    pub fn check_only(&self) -> bool {
        matches!(self, RowBuf::Check(_))
    }

    pub fn wants_grad(&self) -> bool {
        matches!(self, RowBuf::Grad(..) | RowBuf::InPlace(_))
    }

    /// The logits and the gradient row at once; in place, the logits are first copied into
    /// `copy` (one row of scratch) so that both can be used side by side.
    pub fn split<'s>(&'s mut self, copy: &'s mut [f32]) -> (&'s [f32], Option<&'s mut [f32]>) {
        match self {
            RowBuf::Grad(z, g) => (z, Some(g)),
            RowBuf::Check(z) | RowBuf::Value(z) => (z, None),
            RowBuf::InPlace(zg) => {
                copy.copy_from_slice(zg);
                (copy, Some(zg))
            }
        }
    }

    /// The gradient row (`None` in value-only and check mode). In place, this is the logits row,
    /// so every read of `z()` must happen before the first write through it.
    pub fn grad(&mut self) -> Option<&mut [f32]> {
        match self {
            RowBuf::Grad(_, g) => Some(g),
            RowBuf::InPlace(z) => Some(z),
            RowBuf::Check(_) | RowBuf::Value(_) => None,
        }
    }
}

/// Per-thread row scratch: three rows of `vocab` floats (allocated on first use), plus small
/// per-row vectors (candidate ids, per-candidate values).
pub(crate) struct Scratch {
    buf: Vec<f32>,
    vocab: usize,
    /// Candidate ids of the current row (filled by the kernel's row closure).
    pub cands: Vec<usize>,
    aux: Vec<f32>,
    /// Write large gradients with streaming stores (set by the driver for big outputs).
    pub stream: bool,
    /// Addresses of the next row's logits (set by the driver) and reference logits (set by the
    /// kernel), for software prefetching while the current row computes; 0 = none.
    pub prefetch: [usize; 2],
    /// The current row's TNT diagnostics (set by the row closure of `tnt_with_stats`, taken by
    /// the driver).
    pub stats: Option<TntRowStats>,
    /// What scratch row 2 holds after a forward KL row that stored its reference
    /// exponentials, for the diagnostics to reuse.
    pub ref_exp: Option<RefExp>,
}

/// Scratch row 2 holds `exp(z° − shift)` over the row vocabulary (0 at `exclude`), summing to
/// `sum`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RefExp {
    pub shift: f32,
    pub sum: f32,
    pub exclude: Option<usize>,
}

impl Scratch {
    pub fn new(vocab: usize) -> Self {
        Scratch {
            buf: Vec::new(),
            vocab,
            cands: Vec::new(),
            aux: Vec::new(),
            stream: false,
            prefetch: [0, 0],
            stats: None,
            ref_exp: None,
        }
    }

    pub fn rows(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let (a, b, c, _) = self.parts();
        (a, b, c)
    }

    pub fn parts(&mut self) -> (&mut [f32], &mut [f32], &mut [f32], &mut Vec<f32>) {
        if self.buf.is_empty() {
            self.buf = vec![0.0; 3 * self.vocab];
        }
        let (a, rest) = self.buf.split_at_mut(self.vocab);
        let (b, c) = rest.split_at_mut(self.vocab);
        (a, b, c, &mut self.aux)
    }
}

/// What a row computation produced.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RowOut {
    pub loss: f32,
    pub lse: f32,
    pub logp: f32,
    pub masked_vocab: bool,
}

/// Optional per-row outputs besides the loss.
pub(crate) struct Aux<'a> {
    pub lse: Option<&'a mut [f32]>,
    pub logp: Option<&'a mut [f32]>,
    /// TNT diagnostics per row ([`TntRowStats::INACTIVE`] at inactive rows).
    pub stats: Option<&'a mut [TntRowStats]>,
}

impl<'a> Aux<'a> {
    pub fn none() -> Aux<'static> {
        Aux { lse: None, logp: None, stats: None }
    }

    pub fn values(lse: Option<&'a mut [f32]>, logp: Option<&'a mut [f32]>) -> Aux<'a> {
        Aux { lse, logp, stats: None }
    }
}

/// The row function: `Ok(None)` for an inactive row (nothing computed). It must write the whole
/// gradient row of an active row when the buffer wants one, and must not write in check mode.
pub(crate) trait RowFn: Sync {
    fn row(&self, row: usize, buf: RowBuf<'_>, scratch: &mut Scratch) -> Result<Option<RowOut>>;
}

impl<F> RowFn for F
where
    F: Fn(usize, RowBuf<'_>, &mut Scratch) -> Result<Option<RowOut>> + Sync,
{
    fn row(&self, row: usize, buf: RowBuf<'_>, scratch: &mut Scratch) -> Result<Option<RowOut>> {
        self(row, buf, scratch)
    }
}

enum ChunkIo<'a> {
    Check(&'a [f32]),
    Value(&'a [f32]),
    Grad(&'a [f32], &'a mut [f32]),
    InPlace(&'a mut [f32]),
}

struct Chunk<'a> {
    start: usize,
    rows: usize,
    io: ChunkIo<'a>,
    loss: &'a mut [f32],
    lse: Option<&'a mut [f32]>,
    logp: Option<&'a mut [f32]>,
    stats: Option<&'a mut [TntRowStats]>,
}

#[derive(Default)]
struct ChunkStats {
    count: usize,
    masked: usize,
}

type ChunkResult = std::result::Result<ChunkStats, (usize, KernelError)>;

/// Gradient outputs above this size are written with streaming stores: they cannot stay in the
/// caches anyway, and skipping the read-for-ownership saves a quarter of the DRAM traffic.
const STREAM_BYTES: usize = 64 << 20;

fn run_chunk(c: Chunk<'_>, vocab: usize, f: &dyn RowFn) -> ChunkResult {
    let mut scratch = Scratch::new(vocab);
    if let ChunkIo::Grad(_, g) = &c.io {
        scratch.stream = g.len() * 4 >= STREAM_BYTES;
    }
    let mut stats = ChunkStats::default();
    let Chunk { start, rows, io, loss, mut lse, mut logp, stats: mut row_stats } = c;
    let check = matches!(io, ChunkIo::Check(_));
    let mut finish = |i: usize,
                      res: Result<Option<RowOut>>,
                      grad: Option<&mut [f32]>,
                      st: Option<TntRowStats>|
     -> std::result::Result<(), (usize, KernelError)> {
        let out = res.map_err(|e| (start + i, e))?;
        if check {
            return Ok(());
        }
        if let Some(s) = row_stats.as_deref_mut() {
            s[i] = if out.is_some() {
                st.unwrap_or(TntRowStats::INACTIVE)
            } else {
                TntRowStats::INACTIVE
            };
        }
        let o = match out {
            Some(o) => {
                stats.count += 1;
                stats.masked += usize::from(o.masked_vocab);
                o
            }
            None => {
                if let Some(g) = grad {
                    g.fill(0.0);
                }
                RowOut::default()
            }
        };
        loss[i] = o.loss;
        if let Some(l) = lse.as_deref_mut() {
            l[i] = o.lse;
        }
        if let Some(l) = logp.as_deref_mut() {
            l[i] = o.logp;
        }
        Ok(())
    };
    // Address of row `i + 1` of a chunk starting at `base` (0 past the end): prefetch hint only.
    let next = |base: usize, i: usize| if i + 1 < rows { base + (i + 1) * vocab * 4 } else { 0 };
    match io {
        ChunkIo::Check(z) => {
            for (i, zr) in z.chunks_exact(vocab).take(rows).enumerate() {
                finish(i, f.row(start + i, RowBuf::Check(zr), &mut scratch), None, None)?;
            }
        }
        ChunkIo::Value(z) => {
            let base = z.as_ptr() as usize;
            for (i, zr) in z.chunks_exact(vocab).take(rows).enumerate() {
                scratch.prefetch = [next(base, i), 0];
                let res = f.row(start + i, RowBuf::Value(zr), &mut scratch);
                finish(i, res, None, scratch.stats.take())?;
            }
        }
        ChunkIo::Grad(z, g) => {
            let base = z.as_ptr() as usize;
            for (i, (zr, gr)) in z.chunks_exact(vocab).zip(g.chunks_exact_mut(vocab)).enumerate() {
                scratch.prefetch = [next(base, i), 0];
                let res = f.row(start + i, RowBuf::Grad(zr, &mut *gr), &mut scratch);
                finish(i, res, Some(gr), scratch.stats.take())?;
            }
        }
        ChunkIo::InPlace(z) => {
            let base = z.as_ptr() as usize;
            for (i, zr) in z.chunks_exact_mut(vocab).enumerate() {
                scratch.prefetch = [next(base, i), 0];
                let res = f.row(start + i, RowBuf::InPlace(&mut *zr), &mut scratch);
                finish(i, res, Some(zr), scratch.stats.take())?;
            }
        }
    }
    Ok(stats)
}

/// Splits `s` (rows of `per_row` elements) at the row boundaries `bounds` (`bounds[0] = 0`,
/// last = rows).
fn split_mut<'a, T>(mut s: &'a mut [T], bounds: &[usize], per_row: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(bounds.len() - 1);
    for w in bounds.windows(2) {
        let (a, b) = std::mem::take(&mut s).split_at_mut((w[1] - w[0]) * per_row);
        out.push(a);
        s = b;
    }
    out
}

fn split_ref<'a>(s: &'a [f32], bounds: &[usize], per_row: usize) -> Vec<&'a [f32]> {
    bounds.windows(2).map(|w| &s[w[0] * per_row..w[1] * per_row]).collect()
}

fn split_opt<'a, T>(s: Option<&'a mut [T]>, bounds: &[usize]) -> Vec<Option<&'a mut [T]>> {
    match s {
        Some(s) => split_mut(s, bounds, 1).into_iter().map(Some).collect(),
        None => bounds.windows(2).map(|_| None).collect(),
    }
}

/// Runs `chunks` on scoped threads (the first on the calling thread) and returns the merged
/// stats, or the error of the lowest failing row.
fn run_chunks(
    chunks: Vec<Chunk<'_>>,
    vocab: usize,
    f: &dyn RowFn,
) -> std::result::Result<ChunkStats, (usize, KernelError)> {
    let results: Vec<ChunkResult> = std::thread::scope(|sc| {
        let mut it = chunks.into_iter();
        let first = it.next();
        let handles: Vec<_> = it.map(|c| sc.spawn(move || run_chunk(c, vocab, f))).collect();
        let mut results = Vec::with_capacity(handles.len() + 1);
        if let Some(c) = first {
            results.push(run_chunk(c, vocab, f));
        }
        for h in handles {
            match h.join() {
                Ok(r) => results.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    let mut total = ChunkStats::default();
    let mut first_err: Option<(usize, KernelError)> = None;
    for r in results {
        match r {
            Ok(s) => {
                total.count += s.count;
                total.masked += s.masked;
            }
            Err((row, e)) => {
                if first_err.as_ref().is_none_or(|(r0, _)| row < *r0) {
                    first_err = Some((row, e));
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Runs a row kernel over a batch: checks buffer lengths, splits the rows into `threads`
/// contiguous ranges on scoped threads, and reduces the per-row losses in f64 in row order.
///
/// On a data error (a row rejected by the row function) every output buffer is reset to zero
/// and the error of the lowest failing row is returned. In-place calls validate all rows first,
/// so they fail before anything is written.
pub(crate) fn run(
    op: &'static str,
    io: LogitsIo<'_>,
    vocab: usize,
    threads: usize,
    loss: &mut [f32],
    aux: Aux<'_>,
    f: &dyn RowFn,
) -> Result<BatchStats> {
    check_vocab(op, vocab)?;
    check_threads(op, threads)?;
    let rows = loss.len();
    let n = elements(op, rows, vocab)?;
    check_len(op, "logits", n, io.logits_len())?;
    if let LogitsIo::Grad { grad, .. } = &io {
        check_len(op, "grad", n, grad.len())?;
    }
    let Aux { mut lse, mut logp, mut stats } = aux;
    if let Some(l) = &lse {
        check_len(op, "lse", rows, l.len())?;
    }
    if let Some(l) = &stats {
        check_len(op, "stats", rows, l.len())?;
    }
    if let Some(l) = &logp {
        check_len(op, "logp", rows, l.len())?;
    }
    let t = threads.min(rows).max(1);
    let bounds: Vec<usize> = (0..=t).map(|i| rows * i / t).collect();

    let mut io = io;
    if let LogitsIo::InPlace(z) = &io {
        let z: &[f32] = z;
        let mut dummy = vec![0.0f32; rows];
        let chunks = split_ref(z, &bounds, vocab)
            .into_iter()
            .zip(split_mut(&mut dummy, &bounds, 1))
            .zip(bounds.windows(2))
            .map(|((z, l), w)| Chunk {
                start: w[0],
                rows: w[1] - w[0],
                io: ChunkIo::Check(z),
                loss: l,
                lse: None,
                logp: None,
                stats: None,
            })
            .collect();
        run_chunks(chunks, vocab, f).map_err(|(_, e)| e)?;
    }

    let result = {
        let ios: Vec<ChunkIo<'_>> = match &mut io {
            LogitsIo::Value(z) => {
                split_ref(z, &bounds, vocab).into_iter().map(ChunkIo::Value).collect()
            }
            LogitsIo::Grad { logits, grad } => split_ref(logits, &bounds, vocab)
                .into_iter()
                .zip(split_mut(grad, &bounds, vocab))
                .map(|(z, g)| ChunkIo::Grad(z, g))
                .collect(),
            LogitsIo::InPlace(z) => {
                split_mut(z, &bounds, vocab).into_iter().map(ChunkIo::InPlace).collect()
            }
        };
        let chunks: Vec<Chunk<'_>> = ios
            .into_iter()
            .zip(split_mut(loss, &bounds, 1))
            .zip(split_opt(lse.as_deref_mut(), &bounds))
            .zip(split_opt(logp.as_deref_mut(), &bounds))
            .zip(split_opt(stats.as_deref_mut(), &bounds))
            .zip(bounds.windows(2))
            .map(|(((((io, loss), lse), logp), stats), w)| Chunk {
                start: w[0],
                rows: w[1] - w[0],
                io,
                loss,
                lse,
                logp,
                stats,
            })
            .collect();
        run_chunks(chunks, vocab, f)
    };
    match result {
        Ok(s) => Ok(BatchStats {
            sum: loss.iter().map(|&v| f64::from(v)).sum(),
            count: s.count,
            masked_vocab_rows: s.masked,
        }),
        Err((_, e)) => {
            loss.fill(0.0);
            for l in [lse, logp].into_iter().flatten() {
                l.fill(0.0);
            }
            if let Some(s) = stats {
                s.fill(TntRowStats::INACTIVE);
            }
            match io {
                LogitsIo::Grad { grad, .. } => grad.fill(0.0),
                LogitsIo::Value(_) | LogitsIo::InPlace(_) => {}
            }
            Err(e)
        }
    }
}
