//! The fused-kernel backend of the token-level losses: [`TokenBackend::Kernel`], and what
//! [`TokenBackend::Auto`] picks for CPU f32 logits.
//!
//! A token loss on this path runs one kernel of [`amend_kernels`] over **every** row of the
//! logits, in their own storage (no row selection, no copy for contiguous CPU f32 logits):
//! inactive rows are skipped by the kernel (loss 0, gradient row 0, never read), active rows get
//! their value and `∂ℓ/∂z` in one sweep. The gradient is written into one fresh libtorch tensor
//! and injected into autograd per row ([`crate::bridge::inject_rows`]), so per-token weights,
//! masks and every reduction compose with it exactly as with the composite path.
//!
//! | loss | kernel |
//! |---|---|
//! | TNFF, TNRR, TNRF, TNFLL, TNRLL | [`amend_kernels::tnt`] |
//! | UL on annotated tokens | [`amend_kernels::tnt`] (`UlAnnotated`) |
//! | NL | [`amend_kernels::selected_logp`] with per-row scale `+1` / `−α`, plus the floor |
//! | (conditional) NLL | [`amend_kernels::selected_logp`] |
//! | Welleck UL, sequence UL | [`amend_kernels::unlikelihood`] (padded candidate lists) |
//! | reference KL (forward / reverse) | [`amend_kernels::token_kl`] (`Reference` target) |
//!
//! Metrics come from value-only kernel calls (one or two `exp` per element over the rows that
//! need them) and `argmax`; nothing allocates an `[N, V]` temporary except the gradient.
//!
//! When a kernel rejects an active row as non-finite, the caller evaluates the batch on the
//! composite path instead (see [`TokenBackend`]).

use amend_kernels::{BatchStats, KernelError, LogitsIo, SelectedLogpConfig, SelectedLogpOut};
use tch::{Device, Kind, Tensor};

use super::common::TokenBackend;
use crate::bridge::{CpuBuf, CpuSlice, FusedRows, Sanitize, fused_rows, inject_rows};
use crate::{Error, Result};

/// Whether `backend` evaluates a loss on `x` (logits or hidden states) with the fused kernels:
/// `Auto` and `Kernel` for CPU f32 tensors; `Kernel` on anything else is an error.
pub(crate) fn use_kernel(op: &'static str, backend: TokenBackend, x: &Tensor) -> Result<bool> {
    let kind = x.f_kind()?;
    let device = x.device();
    let eligible = device == Device::Cpu && kind == Kind::Float;
    match backend {
        TokenBackend::Auto => Ok(eligible),
        TokenBackend::Kernel if eligible => Ok(true),
        TokenBackend::Kernel => Err(Error::InvalidConfig {
            op,
            name: "backend",
            reason: format!(
                "the fused kernel runs on CPU f32 inputs, these are {kind:?} on {device:?} (use \
                 `auto`, `composite` or `closed_form`)"
            ),
        }),
        _ => Ok(false),
    }
}

/// Threads for a kernel call: libtorch's intra-op thread count (the kernels split rows over
/// scoped threads and start no pool of their own).
pub(crate) fn threads() -> usize {
    usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// Whether a gradient with respect to `x` would be recorded here: `x` requires grad and grad
/// mode is on (a view taken under `tch::no_grad` does not require grad).
pub(crate) fn wants_grad(x: &Tensor) -> Result<bool> {
    Ok(x.requires_grad() && x.f_alias()?.requires_grad())
}

/// Runs a row kernel over every row of `logits` (`[..., V]`), with the gradient when
/// [`wants_grad`]. `Ok(None)` when the kernel rejected an active row as non-finite (NaN, `+inf`,
/// no finite logit, or an unusable reference row): the caller then takes the composite path.
pub(crate) fn fused<F>(op: &'static str, logits: &Tensor, kernel: F) -> Result<Option<FusedRows>>
where
    F: FnOnce(LogitsIo<'_>, usize, &mut [f32]) -> amend_kernels::Result<BatchStats>,
{
    match fused_rows(logits, op, wants_grad(logits)?, kernel) {
        Ok(f) => Ok(Some(f)),
        Err(Error::Kernel(KernelError::NonFiniteRow { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Token losses shaped like `fused.values` that carry the kernel's gradient to `logits`
/// (detached values when no gradient was computed). `active` (bool, shaped like the values)
/// marks the rows the kernel computed; `count` of them are true; `reduction` is the one the loss
/// applies next.
///
/// The gradient goes to autograd through [`attach_rows`](crate::attach::attach_rows): no
/// surrogate product over `[N, V]`. Under `Mean` (`BatchMean`) the `1/count` (`1/B`) the
/// reduction will apply is folded into the kernel's buffer now, so that under a sum or a mean
/// the upstream gradient is exactly that scale and the buffer itself is `∂loss/∂logits`.
pub(crate) fn inject(
    logits: &Tensor,
    fused: &FusedRows,
    active: &Tensor,
    count: i64,
    reduction: crate::Reduction,
) -> Result<Tensor> {
    let _ = active;
    match fused.grad.as_ref() {
        Some(g) => {
            let units = match reduction {
                crate::Reduction::Mean => count,
                crate::Reduction::BatchMean => logits.size().first().copied().unwrap_or(0),
                _ => 1,
            };
            // The reduction multiplies by this same f64 (`finish`), so the upstream gradient
            // equals it bit for bit.
            let scale = if units > 0 { 1.0 / units as f64 } else { 1.0 };
            let kind = logits.f_kind()?;
            let out = crate::attach::attach_rows(logits, &fused.values, g, scale)?;
            Ok(if out.kind() == kind { out } else { out.f_to_kind(kind)? })
        }
        None => inject_rows(logits, &fused.values, None, Sanitize::None),
    }
}

/// `mask` (bool) as an f32 row scale (1 where true, 0 elsewhere).
pub(crate) fn row_scale(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.f_to_kind(Kind::Float)?.f_contiguous()?)
}

/// Value-only `log p_y` (and `LSE`) of the rows of `z` (`[..., V]`, CPU) where `mask` holds,
/// through [`amend_kernels::selected_logp`]; 0 elsewhere. Shaped like `mask`, f32.
pub(crate) fn logp_at(
    op: &'static str,
    z: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let shape = mask.size();
    let vocab = z.size().last().copied().unwrap_or(0);
    let zs = CpuSlice::<f32>::new(z, op, "logits")?;
    let ys = CpuSlice::<i64>::new(labels, op, "labels")?;
    let scale = row_scale(mask)?;
    let ss = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let mut loss = CpuBuf::empty(&shape)?;
    let mut logp = CpuBuf::empty(&shape)?;
    let mut lse = CpuBuf::empty(&shape)?;
    let cfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(threads());
    amend_kernels::selected_logp(
        LogitsIo::value(zs.as_slice()),
        usize::try_from(vocab).unwrap_or(0),
        ys.as_slice(),
        Some(ss.as_slice()),
        &cfg,
        SelectedLogpOut::new(loss.as_mut_slice())
            .with_logp(logp.as_mut_slice())
            .with_lse(lse.as_mut_slice()),
    )?;
    Ok((logp.into_tensor(), lse.into_tensor()))
}

/// The argmax of `zo` over each active row's target support: columns where `z > −inf`, minus
/// `exclude[r]` when it is `≥ 0`; the first maximum on ties (as `argmax`). Inactive rows get 0.
/// All tensors on the CPU; `zo`, `z`: `[..., V]`; `exclude`, `active`: the leading shape.
pub(crate) fn target_argmax(
    op: &'static str,
    zo: &Tensor,
    z: &Tensor,
    exclude: Option<&Tensor>,
    active: &Tensor,
) -> Result<Tensor> {
    let shape = active.size();
    let vocab = usize::try_from(z.size().last().copied().unwrap_or(0)).unwrap_or(0);
    let zos = CpuSlice::<f32>::new(zo, op, "ref_logits")?;
    let zs = CpuSlice::<f32>::new(z, op, "logits")?;
    let acts = Vec::<bool>::try_from(&active.f_to_kind(Kind::Bool)?.f_reshape([-1])?)?;
    let ex = match exclude {
        Some(e) => Some(Vec::<i64>::try_from(&e.f_reshape([-1])?)?),
        None => None,
    };
    let mut out = vec![0i64; acts.len()];
    if vocab > 0 {
        let rows = zos.as_slice().chunks_exact(vocab).zip(zs.as_slice().chunks_exact(vocab));
        for (r, (zo_r, z_r)) in rows.enumerate() {
            if !acts.get(r).copied().unwrap_or(false) {
                continue;
            }
            let skip = ex.as_ref().and_then(|e| usize::try_from(e[r]).ok());
            let mut best = (usize::MAX, f32::NEG_INFINITY);
            for (v, (&a, &b)) in zo_r.iter().zip(z_r).enumerate() {
                if b == f32::NEG_INFINITY || Some(v) == skip {
                    continue;
                }
                // Active rows hold no NaN (the kernel checked them), so `>` keeps the first maximum.
                if best.0 == usize::MAX || a > best.1 {
                    best = (v, a);
                }
            }
            out[r] = if best.0 == usize::MAX { 0 } else { best.0 as i64 };
        }
    }
    Ok(Tensor::f_from_slice(&out)?.f_reshape(shape.as_slice())?)
}

/// Argmax of the rows of `x` (`[..., V]`) under `no_grad`, i64, shaped like the leading dims.
pub(crate) fn argmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_detach()?.f_argmax(-1, false)?)
}

/// Zeroes the gradient rows of `fused` where `rows` (bool, shaped like the values) holds, and
/// sets their value to `value`.
pub(crate) fn override_rows(fused: &mut FusedRows, rows: &Tensor, value: f64) -> Result<()> {
    let flat = rows.f_reshape([-1])?;
    let idx = flat.f_nonzero()?.f_reshape([-1])?;
    if idx.size()[0] == 0 {
        return Ok(());
    }
    fused.values = fused.values.f_masked_fill(rows, value)?;
    if let Some(g) = &mut fused.grad {
        let v = g.size().last().copied().unwrap_or(0);
        let mut g2 = g.f_view([-1, v])?;
        let _ = g2.f_index_fill_(0, &idx, 0.0)?;
    }
    Ok(())
}
