//! Validation, row selection, reductions and metrics shared by the token-level losses.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::rows::Rows;
use super::weights::TokenWeights;
use crate::{Error, LossOutput, LossPart, Metrics, Reduction, Result};

/// What a token-level loss does when the logits at an *active* position hold NaN or `+inf`, or
/// hold no finite entry at all.
///
/// `−inf` entries are always allowed: they remove a token from the row's vocabulary (see the
/// [module docs](crate::token)). Inactive positions are never inspected, whatever they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NonFinitePolicy {
    /// Return [`Error::NonFiniteLogits`] naming the first offending position (the default).
    /// Costs one pass over the active rows and one device sync.
    #[default]
    Error,
    /// Skip the check: NaN or `+inf` at an active position propagates into that token's loss
    /// (and its gradient). Use it to avoid the sync on accelerators once inputs are trusted.
    Propagate,
}

/// Which implementation computes the token losses and their gradients.
///
/// Every implementation gives the same values and the same gradients (the tch paths agree to
/// 1e-10 relative in f64; the fused kernel agrees with them to the f32 tolerances of the
/// workspace: loss relative 1e-5, gradient absolute 1e-6); they differ in memory and speed.
///
/// | backend | where it runs | what it keeps for `backward()` |
/// |---|---|---|
/// | `Auto` (default) | `Kernel` for CPU f32 logits, `Composite` otherwise (other devices, bf16, f16, f64); fused-linear losses: `Kernel` for CPU f32 hidden states, `ClosedForm` otherwise | as the chosen backend |
/// | `Kernel` | CPU f32 only (an error otherwise) | the kernel's gradient `[N, V]` |
/// | `Composite` | any device and float dtype | several `[n, V]` intermediates of autograd |
/// | `ClosedForm` | any device and float dtype | the gradient `[n, V]` |
///
/// **Non-finite logits.** The kernel rejects an active row with NaN, `+inf` or no finite
/// logit while it sweeps, so the kernel path needs no separate check (and no device sync).
/// When it does reject a row, the loss is evaluated on the composite path instead, which then
/// behaves exactly as it does on its own: with [`NonFinitePolicy::Error`] it returns the same
/// [`Error::NonFiniteLogits`] naming the first offending position, with
/// [`NonFinitePolicy::Propagate`] the NaN reaches that token's loss. So both policies give the
/// same result on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenBackend {
    /// The best implementation for the inputs: the fused kernel ([`TokenBackend::Kernel`]) for
    /// CPU f32 logits (or, for the fused-linear losses, CPU f32 hidden states), otherwise
    /// [`TokenBackend::Composite`] for losses on logits and [`TokenBackend::ClosedForm`] for the
    /// fused-linear losses (which need the gradient per chunk).
    #[default]
    Auto,
    /// tch autograd over stable composite ops (`log_softmax`, masked log-sum-exp, `where`). The
    /// reference implementation; keeps several `[n, V]` intermediates alive for the backward pass.
    Composite,
    /// Closed-form value and gradient computed in the forward call with tch ops, then injected
    /// into autograd through a surrogate (`ℓ.detach() + s − s.detach()` with `s = ⟨G, z⟩` per
    /// row). Keeps only the gradient `[n, V]` alive; first-order only (no double backward).
    ClosedForm,
    /// The fused row kernels of [`amend_kernels`] (value and gradient in one sweep per row,
    /// SIMD `exp`, no `[N, V]` temporaries), on the logits' own storage, with the kernel's
    /// gradient buffer handed to autograd by a custom autograd function (C++, against the same
    /// libtorch; under the loss's own reduction the buffer becomes the logits' gradient without
    /// a copy). Requires CPU f32 logits
    /// ([`Error::InvalidConfig`] otherwise); first-order only. Threads: as many as libtorch's
    /// intra-op pool (`tch::get_num_threads`), on scoped threads.
    Kernel,
}

impl TokenBackend {
    /// Whether the closed-form (gradient-in-forward) path is used.
    pub(crate) fn closed_form(self) -> bool {
        matches!(self, TokenBackend::ClosedForm)
    }
}

/// `[B, T, V]` sizes of a token-level problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: i64,
    pub t: i64,
    pub v: i64,
}

impl Dims {
    pub(crate) fn n(self) -> i64 {
        self.b * self.t
    }
}

/// The arithmetic dtype for logits of dtype `kind`, or a dtype error.
pub(crate) fn compute_kind(op: &'static str, name: &'static str, x: &Tensor) -> Result<Kind> {
    match x.f_kind()? {
        Kind::Half | Kind::BFloat16 | Kind::Float => Ok(Kind::Float),
        Kind::Double => Ok(Kind::Double),
        got => Err(Error::DtypeMismatch {
            op,
            name,
            expected: "a float dtype (f16, bf16, f32, f64)",
            got,
        }),
    }
}

/// Checks that `logits` is a float `[B, T, V]` tensor with `V ≥ 2`.
pub(crate) fn check_logits(op: &'static str, logits: &Tensor) -> Result<(Dims, Kind)> {
    let size = logits.size();
    let &[b, t, v] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op,
            name: "logits",
            expected: "[B, T, V]".to_string(),
            got: size,
        });
    };
    let kind = compute_kind(op, "logits", logits)?;
    if v < 2 {
        return Err(Error::VocabTooSmall { op, vocab: v });
    }
    Ok((Dims { b, t, v }, kind))
}

/// Checks that `x` lives on `device`.
pub(crate) fn check_device(
    op: &'static str,
    name: &'static str,
    x: &Tensor,
    device: Device,
) -> Result<()> {
    let got = x.device();
    if got != device {
        return Err(Error::DeviceMismatch { op, name, expected: device, got });
    }
    Ok(())
}

/// Checks that `x` has shape `expected` (described as `words` in the error) and lives on `device`.
pub(crate) fn check_shape(
    op: &'static str,
    name: &'static str,
    x: &Tensor,
    expected: &[i64],
    words: &str,
    device: Device,
) -> Result<()> {
    let got = x.size();
    if got != expected {
        return Err(Error::ShapeMismatch {
            op,
            name,
            expected: format!("{words} {expected:?}"),
            got,
        });
    }
    check_device(op, name, x, device)
}

/// Checks that `x` is `[B, T]` and on `device`.
pub(crate) fn check_bt(
    op: &'static str,
    name: &'static str,
    x: &Tensor,
    dims: Dims,
    device: Device,
) -> Result<()> {
    check_shape(op, name, x, &[dims.b, dims.t], "[B, T] =", device)
}

fn is_integer(kind: Kind) -> bool {
    matches!(kind, Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64)
}

/// Token ids as i64 (any integer dtype is accepted).
pub(crate) fn as_ids(op: &'static str, name: &'static str, x: &Tensor) -> Result<Tensor> {
    let kind = x.f_kind()?;
    if kind == Kind::Int64 {
        Ok(x.shallow_clone())
    } else if is_integer(kind) {
        Ok(x.f_to_kind(Kind::Int64)?)
    } else {
        Err(Error::DtypeMismatch {
            op,
            name,
            expected: "an integer dtype (i64 preferred)",
            got: kind,
        })
    }
}

/// A boolean mask (bool, or an integer dtype holding only 0 and 1; any other value, such as 2,
/// is an error rather than a silent "true").
pub(crate) fn as_mask(op: &'static str, name: &'static str, x: &Tensor) -> Result<Tensor> {
    let kind = x.f_kind()?;
    if kind == Kind::Bool {
        Ok(x.shallow_clone())
    } else if is_integer(kind) {
        let bad = x.f_ne(0)?.f_logical_and(&x.f_ne(1)?)?;
        let count = i64::try_from(bad.f_sum(Kind::Int64)?)?;
        if count > 0 {
            let first = bad.f_flatten(0, -1)?.f_nonzero()?.f_get(0)?.f_get(0)?;
            let flat = i64::try_from(&first)?;
            let value = i64::try_from(x.f_flatten(0, -1)?.f_get(flat)?)?;
            return Err(Error::InvalidInput {
                op,
                name,
                reason: format!(
                    "mask entries must be 0 or 1 (or bool); {count} entries are not, the first is {value} at {:?}",
                    unravel(flat, &x.size())
                ),
            });
        }
        Ok(x.f_ne(0)?)
    } else {
        Err(Error::DtypeMismatch {
            op,
            name,
            expected: "bool (or an integer 0/1 dtype)",
            got: kind,
        })
    }
}

/// Row-major multi-index of flat position `flat` in `shape`.
pub(crate) fn unravel(mut flat: i64, shape: &[i64]) -> Vec<i64> {
    let mut index = vec![0; shape.len()];
    for (i, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            index[i] = flat % s;
            flat /= s;
        }
    }
    index
}

/// Counts the active entries of `active` and checks that `ids` lies in `[0, vocab)` wherever
/// `active` holds; one device sync. `ids` and `active` have the same shape.
pub(crate) fn count_and_check_ids(
    op: &'static str,
    name: &'static str,
    ids: &Tensor,
    active: &Tensor,
    vocab: i64,
) -> Result<i64> {
    let bad = ids.f_lt(0)?.f_logical_or(&ids.f_ge(vocab)?)?.f_logical_and(active)?;
    let stats = Tensor::f_stack(&[active.f_sum(Kind::Int64)?, bad.f_sum(Kind::Int64)?], 0)?;
    let stats = Vec::<i64>::try_from(&stats)?;
    let (count, nbad) = (stats[0], stats[1]);
    if nbad > 0 {
        let flat_bad = bad.f_reshape([-1])?;
        let first = i64::try_from(&flat_bad.f_nonzero()?.f_get(0)?.f_get(0)?)?;
        let value = i64::try_from(&ids.f_reshape([-1])?.f_get(first)?)?;
        return Err(Error::LabelOutOfRange {
            op,
            name,
            value,
            index: unravel(first, &ids.size()),
            count: nbad,
            vocab,
        });
    }
    Ok(count)
}

/// The rows of a flattened `[N, ...]` problem that a loss evaluates: all of them, or the
/// positions of an active mask. Inactive rows are never read by any arithmetic.
pub(crate) struct RowSelection {
    /// Indices of the selected rows (`None` when every row is selected, so no copy is made).
    idx: Option<Tensor>,
    /// Total number of rows `N`.
    n_total: i64,
    /// Number of selected rows.
    n: i64,
}

impl RowSelection {
    /// Selects the rows where `active` (any shape, `count` true entries) holds.
    pub(crate) fn new(active: &Tensor, count: i64) -> Result<Self> {
        let flat = active.f_reshape([-1])?;
        let n_total = flat.size()[0];
        if count == n_total {
            return Ok(RowSelection { idx: None, n_total, n: count });
        }
        let idx = flat.f_nonzero()?.f_reshape([-1])?;
        Ok(RowSelection { idx: Some(idx), n_total, n: count })
    }

    /// Number of selected rows.
    pub(crate) fn len(&self) -> i64 {
        self.n
    }

    /// The selected rows of `x` (`[N, ...]`), in order.
    pub(crate) fn rows(&self, x: &Tensor) -> Result<Tensor> {
        match &self.idx {
            None => Ok(x.shallow_clone()),
            Some(idx) => Ok(x.f_index_select(0, idx)?),
        }
    }

    /// Scatters per-row values `[n]` into zeros `[N]` (differentiable in `vals`).
    pub(crate) fn scatter(&self, vals: &Tensor) -> Result<Tensor> {
        match &self.idx {
            None => Ok(vals.shallow_clone()),
            Some(idx) => {
                let zeros = Tensor::f_zeros([self.n_total], (vals.f_kind()?, vals.device()))?;
                Ok(zeros.f_index_add(0, idx, vals)?)
            }
        }
    }

    /// The flat indices (into `N`) of the selected rows `[n]` (i64 on `device`).
    pub(crate) fn indices(&self, device: Device) -> Result<Tensor> {
        match &self.idx {
            None => Ok(Tensor::f_arange(self.n_total, (Kind::Int64, device))?),
            Some(idx) => Ok(idx.shallow_clone()),
        }
    }

    /// The flat index (into `N`) of selected row `r`.
    pub(crate) fn flat_index(&self, r: i64) -> Result<i64> {
        match &self.idx {
            None => Ok(r),
            Some(idx) => Ok(i64::try_from(&idx.f_get(r)?)?),
        }
    }
}

/// Checks the selected rows `x` `[n, V]` for NaN / `+inf` entries or rows without a finite
/// entry, per `policy`; one device sync when checking. Returns whether every entry is known to
/// be finite (no `−inf` either), which lets the row formulas skip their support masks.
pub(crate) fn check_finite_rows(
    op: &'static str,
    name: &'static str,
    x: &Tensor,
    to_flat: &dyn Fn(i64) -> Result<i64>,
    batch_shape: &[i64],
    policy: NonFinitePolicy,
) -> Result<bool> {
    if x.size().first().copied().unwrap_or(0) == 0 {
        return Ok(true);
    }
    if policy == NonFinitePolicy::Propagate {
        return Ok(false);
    }
    // Fast path: a plain row sum (one cheap pass) is finite for every row without NaN, ±inf or
    // overflow. Only rows whose sum is not finite (−inf vocabulary masks, or real problems) get
    // the exact test: their max-shifted log-sum-exp is NaN or +inf iff the row holds NaN or
    // +inf, and −inf iff it has no finite entry.
    let x = x.f_detach()?;
    let suspicious = x.f_sum_dim_intlist(-1, false, None::<Kind>)?.f_isfinite()?.f_logical_not()?;
    let n_suspicious = i64::try_from(&suspicious.f_sum(Kind::Int64)?)?;
    if n_suspicious == 0 {
        return Ok(true);
    }
    let bad_row = x.f_logsumexp(-1, false)?.f_isfinite()?.f_logical_not()?;
    let count = i64::try_from(&bad_row.f_sum(Kind::Int64)?)?;
    if count > 0 {
        let r = i64::try_from(&bad_row.f_nonzero()?.f_get(0)?.f_get(0)?)?;
        let flat = to_flat(r)?;
        let what = crate::error::describe_bad_row(&x.f_get(r)?)?;
        return Err(Error::NonFiniteLogits {
            op,
            name,
            index: unravel(flat, batch_shape),
            count,
            what,
        });
    }
    Ok(false)
}

/// Detached scalar metrics gathered as tensors and read back with a single device sync.
#[derive(Default)]
pub(crate) struct MetricSink {
    names: Vec<&'static str>,
    /// Interleaved `[sum, count]` scalars, as f64 `[1]` tensors.
    values: Vec<Tensor>,
}

impl MetricSink {
    /// Adds metric `name` with a scalar `sum` tensor (detached here) and a host `count`.
    pub(crate) fn add(&mut self, name: &'static str, sum: &Tensor, count: f64) -> Result<()> {
        let count = Tensor::f_from_slice(&[count])?.f_to(sum.device())?;
        self.add_counted(name, sum, &count)
    }

    /// Adds metric `name` with scalar `sum` and `count` tensors (detached here).
    pub(crate) fn add_counted(
        &mut self,
        name: &'static str,
        sum: &Tensor,
        count: &Tensor,
    ) -> Result<()> {
        for t in [sum, count] {
            self.values.push(t.f_detach()?.f_to_kind(Kind::Double)?.f_reshape([1])?);
        }
        self.names.push(name);
        Ok(())
    }

    /// Adds a metric whose sum is known on the host.
    pub(crate) fn add_value(&mut self, name: &'static str, sum: f64, count: f64) -> Result<()> {
        self.add(name, &Tensor::f_from_slice(&[sum])?, count)
    }

    /// Reads every value back (one sync) into a [`Metrics`].
    pub(crate) fn finish(self) -> Result<Metrics> {
        let mut metrics = Metrics::new();
        if self.values.is_empty() {
            return Ok(metrics);
        }
        let device = self.values[0].device();
        let values: Vec<Tensor> =
            self.values.iter().map(|s| s.f_to(device)).collect::<Result<_, tch::TchError>>()?;
        let values = Vec::<f64>::try_from(&Tensor::f_cat(&values, 0)?)?;
        for (name, pair) in self.names.into_iter().zip(values.chunks(2)) {
            metrics.add(name, pair[0], pair[1]);
        }
        Ok(metrics)
    }
}

/// Masked sum of a per-row statistic: `Σ_r where(mask_r, stat_r, 0)` (never `0 · stat`).
pub(crate) fn masked_sum(stat: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(stat.f_where_scalarother(mask, 0.0)?.f_sum(Kind::Double)?)
}

/// With [`NonFinitePolicy::Error`]: [`Error::LossOverflow`] when a token loss of `tok` (`[B, T]`)
/// is not finite although every row of `inputs` (`[B, T, V]` each: the logits, the reference
/// logits) at that position is finite. A non-finite loss on a row with `−inf` entries is a
/// defined result (a label outside the support is `+inf`, an unusable reference row NaN; spec
/// E5 and §1.5) and passes; one on finite rows can only be an overflow. One small sync
/// (`[B, T]`) in the usual case.
pub(crate) fn check_overflow(
    op: &'static str,
    tok: &Tensor,
    policy: NonFinitePolicy,
    inputs: &[&Tensor],
) -> Result<()> {
    if policy == NonFinitePolicy::Propagate || tok.numel() == 0 || tok.dim() != 2 {
        return Ok(());
    }
    let bad = tok.f_detach()?.f_isfinite()?.f_logical_not()?;
    let count = i64::try_from(&bad.f_sum(Kind::Int64)?)?;
    if count == 0 {
        return Ok(());
    }
    let positions = Vec::<i64>::try_from(&bad.f_nonzero()?.f_flatten(0, -1)?)?;
    for pos in positions.chunks(2) {
        let (b, t) = (pos[0], pos[1]);
        let mut finite = true;
        for x in inputs {
            let row = x.f_get(b)?.f_get(t)?;
            if !bool::try_from(&row.f_isfinite()?.f_all()?)? {
                finite = false;
                break;
            }
        }
        if finite {
            let value = tok.f_detach()?.f_double_value(&[b, t])?;
            let dtype = match tok.f_kind()? {
                Kind::Float => "float32",
                Kind::Double => "float64",
                Kind::BFloat16 => "bfloat16",
                Kind::Half => "float16",
                _ => "its dtype",
            };
            return Err(Error::LossOverflow { op, index: vec![b, t], value, dtype, count });
        }
    }
    Ok(())
}

/// Builds the [`LossOutput`] of a token-level loss from token losses `tok` (`[B, T]`, zeros at
/// inactive positions, with the graph) and the number of active positions.
pub(crate) fn finish(
    op: &'static str,
    tok: Tensor,
    count: i64,
    reduction: Reduction,
    metrics: Metrics,
) -> Result<LossOutput> {
    let kind = tok.f_kind()?;
    let b = tok.size().first().copied().unwrap_or(0);
    // f64 accumulation across rows, result in the compute dtype.
    let sum = tok.f_sum(Kind::Double)?.f_to_kind(kind)?;
    let loss = match reduction {
        Reduction::None => tok.shallow_clone(),
        Reduction::PerSequence => tok.f_sum_dim_intlist(1, false, Kind::Double)?.f_to_kind(kind)?,
        Reduction::Sum => sum.shallow_clone(),
        Reduction::Mean => sum.f_mul_scalar(if count > 0 { 1.0 / count as f64 } else { 0.0 })?,
        Reduction::BatchMean => sum.f_mul_scalar(if b > 0 { 1.0 / b as f64 } else { 0.0 })?,
        other => {
            return Err(Error::InvalidConfig {
                op,
                name: "reduction",
                reason: format!("{other:?} is not supported by token-level losses"),
            });
        }
    };
    Ok(LossOutput {
        loss,
        per_example: tok,
        parts: vec![LossPart { name: "tokens", sum, count: count as f64, weight: 1.0 }],
        metrics,
    })
}

/// Rejects a value of config field `name` that the compute dtype `kind` cannot hold: beyond its
/// largest finite value, or non-zero but rounding to 0 (f32 for every dtype but f64; configs are
/// f64, the loss is not).
pub(crate) fn check_fits_dtype(
    op: &'static str,
    name: &'static str,
    value: f64,
    kind: Kind,
) -> Result<()> {
    if kind == Kind::Double || !value.is_finite() {
        return Ok(());
    }
    let narrowed = value as f32;
    let reason = if !narrowed.is_finite() {
        format!(
            "{value:e} is beyond the range of f32, the dtype this loss computes in (largest {:e}); use a smaller value or f64 inputs",
            f32::MAX
        )
    } else if value != 0.0 && narrowed == 0.0 {
        format!(
            "{value:e} rounds to 0 in f32, the dtype this loss computes in (smallest {:e}); use a larger value or f64 inputs",
            f32::from_bits(1)
        )
    } else {
        return Ok(());
    };
    Err(Error::InvalidConfig { op, name, reason })
}

/// Rejects a non-finite or negative `value` of config field `name`.
pub(crate) fn check_nonneg_finite(op: &'static str, name: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(Error::InvalidConfig {
            op,
            name,
            reason: format!("must be finite and >= 0, got {value}"),
        });
    }
    Ok(())
}

/// Rejects reductions a token-level loss does not know (future variants of the enum).
pub(crate) fn check_reduction(op: &'static str, reduction: Reduction) -> Result<()> {
    match reduction {
        Reduction::None
        | Reduction::PerSequence
        | Reduction::Sum
        | Reduction::Mean
        | Reduction::BatchMean => Ok(()),
        other => Err(Error::InvalidConfig {
            op,
            name: "reduction",
            reason: format!("{other:?} is not supported by token-level losses"),
        }),
    }
}

/// What every token-level loss computes before its row formula: the problem sizes, the selected
/// (active) rows and their count.
pub(crate) struct Prepared {
    pub dims: Dims,
    pub sel: RowSelection,
    pub rows: Rows,
    pub count: i64,
}

/// Selects the active rows of `logits` (and `ref_logits`, `labels`) in the compute dtype and
/// checks them for non-finite values per `policy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_rows(
    op: &'static str,
    sel: &RowSelection,
    dims: Dims,
    kind: Kind,
    logits: &Tensor,
    ref_logits: Option<&Tensor>,
    labels: &Tensor,
    policy: NonFinitePolicy,
) -> Result<Rows> {
    let batch = [dims.b, dims.t];
    let z = sel.rows(&logits.f_reshape([dims.n(), dims.v])?)?.f_to_kind(kind)?;
    let to_flat = |r: i64| sel.flat_index(r);
    let all_finite = check_finite_rows(op, "logits", &z, &to_flat, &batch, policy)?;
    let zo = match ref_logits {
        Some(r) => {
            let zo = sel.rows(&r.f_detach()?.f_reshape([dims.n(), dims.v])?)?.f_to_kind(kind)?;
            check_finite_rows(op, "ref_logits", &zo, &to_flat, &batch, policy)?;
            Some(zo)
        }
        None => None,
    };
    let labels = sel.rows(&labels.f_reshape([-1])?)?;
    let mut rows = Rows::new(z, zo, labels);
    rows.all_finite = all_finite;
    Ok(rows)
}

/// A validated token-level problem before any row is copied: sizes, the active positions, their
/// count and the labels as i64. [`Plan::select`] copies the active rows for the tch paths; the
/// kernel path reads the logits in place instead.
pub(crate) struct Plan {
    pub dims: Dims,
    pub kind: Kind,
    pub sel: RowSelection,
    pub count: i64,
    /// Labels (or the per-position ids the loss reads) `[B, T]`, i64.
    pub labels: Tensor,
    /// Active positions `[B, T]`, bool.
    pub active: Tensor,
}

impl Plan {
    /// A plan over `active` (`[B, T]` bool with `count` true entries).
    pub(crate) fn new(
        dims: Dims,
        kind: Kind,
        labels: Tensor,
        active: Tensor,
        count: i64,
    ) -> Result<Plan> {
        let sel = RowSelection::new(&active, count)?;
        Ok(Plan { dims, kind, sel, count, labels, active })
    }

    /// Selects the active rows (copies) in the compute dtype and checks them per `policy`.
    pub(crate) fn select(
        self,
        op: &'static str,
        logits: &Tensor,
        ref_logits: Option<&Tensor>,
        policy: NonFinitePolicy,
    ) -> Result<Prepared> {
        let rows = select_rows(
            op,
            &self.sel,
            self.dims,
            self.kind,
            logits,
            ref_logits,
            &self.labels,
            policy,
        )?;
        Ok(Prepared { dims: self.dims, sel: self.sel, rows, count: self.count })
    }
}

/// Validation of the weighted losses (TNT, NL, UL-annotated): shapes, devices, labels in range at
/// `w ≠ 0`. Nothing is copied.
pub(crate) fn plan_weighted(
    op: &'static str,
    logits: &Tensor,
    ref_logits: Option<&Tensor>,
    labels: &Tensor,
    weights: &TokenWeights,
) -> Result<Plan> {
    let (dims, kind) = check_logits(op, logits)?;
    let device = logits.device();
    if let Some(r) = ref_logits {
        check_shape(op, "ref_logits", r, &logits.size(), "the shape of logits", device)?;
        compute_kind(op, "ref_logits", r)?;
    }
    check_bt(op, "labels", labels, dims, device)?;
    let labels = as_ids(op, "labels", labels)?;
    check_bt(op, "weights", weights.signs(), dims, device)?;
    let active = weights.active_mask()?;
    let count = count_and_check_ids(op, "labels", &labels, &active, dims.v)?;
    Plan::new(dims, kind, labels, active, count)
}

/// Row selection for the weighted losses after [`plan_weighted`]: the active rows and their
/// negative-row mask.
pub(crate) fn select_weighted(
    op: &'static str,
    plan: Plan,
    logits: &Tensor,
    ref_logits: Option<&Tensor>,
    weights: &TokenWeights,
    policy: NonFinitePolicy,
) -> Result<Prepared> {
    let mut prep = plan.select(op, logits, ref_logits, policy)?;
    prep.rows.neg = Some(prep.sel.rows(&weights.signs().f_reshape([-1])?)?.f_lt(0)?);
    Ok(prep)
}

/// Scatters row losses back to `[B, T]` token losses.
pub(crate) fn token_losses(prep: &Prepared, row_loss: &Tensor) -> Result<Tensor> {
    Ok(prep.sel.scatter(row_loss)?.f_reshape([prep.dims.b, prep.dims.t])?)
}
