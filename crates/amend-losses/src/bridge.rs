//! The bridge between tch tensors and the fused kernels of [`amend_kernels`]: zero-copy slices
//! of CPU tensors, kernel outputs allocated by libtorch, and gradient injection into autograd.
//!
//! # Why gradient injection
//!
//! The kernels compute a loss and its gradient with respect to the logits in one sweep
//! ("gradient in forward"). tch has no custom autograd `Function` (tch-rs #70, #279, #437), so
//! the fused value enters the graph through a surrogate whose value is the kernel's value and
//! whose gradient is the kernel's gradient (kernels spec §3.2, token-losses §1.8):
//!
//! ```text
//! s   = ⟨g.detach(), x⟩                 (per row: bmm of [N,1,V]×[N,V,1]; scalar: dot)
//! out = value.detach() + (s − s.detach())  ⇒  out == value (bitwise),  ∂out/∂x == g
//! ```
//!
//! Built per row ([`inject_rows`]), autograd multiplies each row's Jacobian by whatever upstream
//! gradient arrives, so per-token weights after `Reduction::None`, masks, loss scaling and
//! gradient accumulation all come out exactly as for the torch-op composite, with no special
//! case. `⟨g, x⟩` goes through `bmm`/`dot`, never `(g * x).sum()`, which would materialise a
//! third `[N, V]` tensor.
//!
//! **First order only.** The injected part has no second derivative: `create_graph` /
//! double backward through it gives zero Hessian-vector products, and `keep_graph` has no effect
//! on it. Use the composite path where higher-order gradients are needed.
//!
//! # Zero-copy views
//!
//! [`CpuSlice`] hands a kernel the storage of a CPU, contiguous tensor of the right dtype as a
//! slice, without copying. Anything else is either rejected ([`CpuSlice::strict`]) or first
//! converted with `f_contiguous` / `f_to_kind` ([`CpuSlice::new`]); every such copy is counted
//! ([`copies_made`]) so benchmarks can report it. Kernel outputs are allocated by libtorch
//! ([`CpuBuf`], `f_empty`) and filled through a mutable slice, so autograd owns them and no
//! `[N, V]` `Vec` is ever copied into a tensor.
//!
//! Aliasing contract: a view reads the tensor's storage directly. While a [`CpuSlice`] is alive,
//! its tensor borrow prevents in-place ops through that handle, but tch cannot stop writes
//! through *other* handles to the same storage (shallow clones, views, other threads). Do not
//! write to the storage through another handle while a view is alive — the same contract as
//! `Tensor::data_ptr`.
//!
//! # Example
//!
//! A fused cross-entropy whose gradient flows to the logits like `cross_entropy`'s:
//!
//! ```
//! use amend_kernels::{SelectedLogpConfig, SelectedLogpOut, selected_logp};
//! use amend_losses::bridge::{CpuSlice, Sanitize, fused_rows, inject_rows};
//! use tch::{Kind, Tensor};
//!
//! let logits = Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 0.3, 0.1, -0.2])
//!     .reshape([2, 4])
//!     .set_requires_grad(true);
//! let labels = Tensor::from_slice(&[1i64, 3]);
//! let y = CpuSlice::<i64>::strict(&labels, "example", "labels")?;
//! let cfg = SelectedLogpConfig::default();
//! let fused = fused_rows(&logits, "example", true, |io, vocab, loss| {
//!     selected_logp(io, vocab, y.as_slice(), None, &cfg, SelectedLogpOut::new(loss))
//! })?;
//! let per_row = inject_rows(&logits, &fused.values, fused.grad.as_ref(), Sanitize::None)?;
//! per_row.sum(Kind::Float).backward();
//!
//! let reference = logits.detach().set_requires_grad(true);
//! reference.cross_entropy_for_logits(&labels).backward();
//! let (a, b) = (logits.grad(), reference.grad() * 2.0); // mean over 2 rows vs sum
//! assert!(f64::try_from((a - b).abs().max())? < 1e-6);
//! # Ok::<(), amend_losses::Error>(())
//! ```
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use amend_kernels::{BatchStats, LogitsIo};
use tch::kind::Element;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

static COPIES: AtomicUsize = AtomicUsize::new(0);

/// Number of tensors [`CpuSlice::new`] had to copy (dtype conversion or `f_contiguous`) since
/// the process started. Benchmarks read it before and after a timed call to report copies.
pub fn copies_made() -> usize {
    COPIES.load(Ordering::Relaxed)
}

fn invalid(op: &'static str, name: &'static str, reason: String) -> Error {
    Error::InvalidInput { op, name, reason }
}

/// A read-only slice over the storage of a contiguous CPU tensor of element type `T`
/// (`f32` for logits, `i64` for labels), or over a converted copy of it.
///
/// The view borrows the tensor for `'t`, so in-place ops through that handle cannot run while it
/// is alive (see the aliasing contract in the [module docs](self)).
pub struct CpuSlice<'t, T: Element> {
    /// An alias of the viewed storage (`detach`, shares memory) or the converted copy; keeps it
    /// alive.
    tensor: Tensor,
    len: usize,
    copied: bool,
    _borrow: PhantomData<(&'t Tensor, T)>,
}

impl<'t, T: Element> CpuSlice<'t, T> {
    /// A zero-copy view, or an error: the tensor must be a defined, dense CPU tensor of kind
    /// `T::KIND` and contiguous.
    ///
    /// # Errors
    ///
    /// [`Error::DtypeMismatch`] for another dtype, [`Error::InvalidInput`] for another device,
    /// a non-contiguous, sparse or undefined tensor, [`Error::Tch`] from libtorch.
    pub fn strict(t: &'t Tensor, op: &'static str, name: &'static str) -> Result<Self> {
        Self::check_defined(t, op, name)?;
        Self::check_cpu(t, op, name)?;
        let kind = t.f_kind()?;
        if kind != T::KIND {
            return Err(Error::DtypeMismatch { op, name, expected: kind_name::<T>(), got: kind });
        }
        if !t.is_contiguous() {
            return Err(invalid(
                op,
                name,
                format!(
                    "tensor of shape {:?} is not contiguous (call `contiguous()` first)",
                    t.size()
                ),
            ));
        }
        Self::wrap(t.f_detach()?, false, op, name)
    }

    /// A view that converts when it must: CPU is required, but another dtype is converted with
    /// `f_to_kind` and a non-contiguous tensor is copied with `f_contiguous`. Each copy is counted
    /// in [`copies_made`]. A tensor that already qualifies is viewed without a copy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a non-CPU, sparse or undefined tensor, [`Error::Tch`].
    pub fn new(t: &'t Tensor, op: &'static str, name: &'static str) -> Result<Self> {
        Self::check_defined(t, op, name)?;
        Self::check_cpu(t, op, name)?;
        let kind = t.f_kind()?;
        let mut x = t.f_detach()?;
        let mut copied = false;
        if kind != T::KIND {
            x = x.f_to_kind(T::KIND)?;
            copied = true;
        }
        if !x.is_contiguous() {
            x = x.f_contiguous()?;
            copied = true;
        }
        if copied {
            COPIES.fetch_add(1, Ordering::Relaxed);
        }
        Self::wrap(x, copied, op, name)
    }

    fn check_defined(t: &Tensor, op: &'static str, name: &'static str) -> Result<()> {
        if !t.defined() {
            return Err(invalid(op, name, "tensor is undefined".into()));
        }
        if t.is_sparse() || t.is_mkldnn() {
            return Err(invalid(op, name, "sparse and MKL-DNN tensors are not supported".into()));
        }
        Ok(())
    }

    fn check_cpu(t: &Tensor, op: &'static str, name: &'static str) -> Result<()> {
        match t.device() {
            Device::Cpu => Ok(()),
            d => Err(invalid(
                op,
                name,
                format!("the fused kernels run on CPU tensors, this one is on {d:?}"),
            )),
        }
    }

    fn wrap(tensor: Tensor, copied: bool, op: &'static str, name: &'static str) -> Result<Self> {
        let len = tensor.numel();
        if len > 0 {
            let ptr = tensor.data_ptr();
            if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
                return Err(invalid(op, name, "storage pointer is null or misaligned".into()));
            }
        }
        Ok(CpuSlice { tensor, len, copied, _borrow: PhantomData })
    }

    /// The elements in row-major order.
    pub fn as_slice(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        let ptr = self.tensor.data_ptr() as *const T;
        // SAFETY: `wrap` checked that `self.tensor` is a defined, dense, contiguous CPU tensor of
        // kind `T::KIND` (strict) or made it one (new), with `len` elements, a non-null pointer
        // aligned for `T`; contiguity means its `len` elements are consecutive from `data_ptr`.
        // `self.tensor` keeps the storage alive for the lifetime of the returned borrow of
        // `self`, and writes through other handles are excluded by the documented contract.
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }

    /// Whether the view is over a converted copy rather than the tensor's own storage.
    pub fn was_copied(&self) -> bool {
        self.copied
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn kind_name<T: Element>() -> &'static str {
    match T::KIND {
        Kind::Float => "f32 (Kind::Float)",
        Kind::Int64 => "i64 (Kind::Int64)",
        Kind::Double => "f64 (Kind::Double)",
        _ => "the kernel's element type",
    }
}

/// A fresh CPU `f32` tensor allocated by libtorch (`f_empty`, uninitialised until written) that
/// a kernel fills through [`CpuBuf::as_mut_slice`]; [`CpuBuf::into_tensor`] hands it to autograd.
///
/// The buffer holds the only handle to its storage until `into_tensor`, so the mutable slice
/// cannot alias anything.
pub struct CpuBuf {
    tensor: Tensor,
    len: usize,
}

impl CpuBuf {
    /// An uninitialised `[shape]` f32 CPU tensor.
    ///
    /// # Errors
    ///
    /// [`Error::Tch`] if libtorch cannot allocate it.
    pub fn empty(shape: &[i64]) -> Result<Self> {
        let tensor = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
        let len = tensor.numel();
        Ok(CpuBuf { tensor, len })
    }

    /// A zero-filled `[shape]` f32 CPU tensor.
    ///
    /// # Errors
    ///
    /// [`Error::Tch`] if libtorch cannot allocate it.
    pub fn zeros(shape: &[i64]) -> Result<Self> {
        let tensor = Tensor::f_zeros(shape, (Kind::Float, Device::Cpu))?;
        let len = tensor.numel();
        Ok(CpuBuf { tensor, len })
    }

    /// The elements, for a kernel to write.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if self.len == 0 {
            return &mut [];
        }
        let ptr = self.tensor.data_ptr() as *mut f32;
        // SAFETY: `self.tensor` was created by `f_empty`/`f_zeros` as a contiguous f32 CPU tensor
        // of `len` elements (so `ptr` is non-null and aligned), and `CpuBuf` holds the only
        // handle to it (it is never cloned or exposed before `into_tensor` consumes `self`), so
        // the exclusive borrow of `self` makes this the only access to the storage.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
    }

    /// The elements.
    pub fn as_slice(&self) -> &[f32] {
        if self.len == 0 {
            return &[];
        }
        let ptr = self.tensor.data_ptr() as *const f32;
        // SAFETY: as in `as_mut_slice`; the shared borrow of `self` excludes writes.
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }

    /// The tensor, now owned by the caller (and autograd).
    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }
}

/// A reusable `[capacity, width]` f32 CPU buffer for chunked loops: each chunk's logits are
/// written into it by tch ops through [`ChunkBuf::view`] and then handed to a kernel (often
/// `LogitsIo::InPlace`) through [`ChunkBuf::rows_mut`], so a loop over chunks allocates (and
/// first-touches) its `[C, V]` buffer once.
///
/// Aliasing contract (crate-internal): the views share the buffer's storage, so no tch op may
/// read or write a view while a slice from [`ChunkBuf::rows_mut`] is alive. Callers use the
/// view and the slice one after the other, never at the same time.
pub(crate) struct ChunkBuf {
    tensor: Tensor,
    width: i64,
}

impl ChunkBuf {
    /// An uninitialised buffer of `capacity` rows (at least 1) of `width` floats.
    pub(crate) fn new(capacity: i64, width: i64) -> Result<Self> {
        let tensor = Tensor::f_empty([capacity.max(1), width.max(0)], (Kind::Float, Device::Cpu))?;
        Ok(ChunkBuf { tensor, width: width.max(0) })
    }

    /// The first `rows` rows, as a contiguous tensor sharing the buffer.
    pub(crate) fn view(&self, rows: i64) -> Result<Tensor> {
        Ok(self.tensor.f_narrow(0, 0, rows)?)
    }

    /// The first `rows` rows, for a kernel to read and write.
    pub(crate) fn rows_mut(&mut self, rows: i64) -> &mut [f32] {
        let cap = self.tensor.size()[0];
        let len = usize::try_from(rows.clamp(0, cap) * self.width).unwrap_or(0);
        if len == 0 {
            return &mut [];
        }
        let ptr = self.tensor.data_ptr() as *mut f32;
        // SAFETY: `self.tensor` was created by `f_empty` as a contiguous f32 CPU tensor of
        // `cap · width ≥ len` elements, so `ptr` is non-null, aligned and valid for `len`
        // elements. `ChunkBuf` holds the tensor for the lifetime of the exclusive borrow of
        // `self`, and its crate-internal callers do not touch views of the buffer while the
        // slice is alive (see the type's aliasing contract).
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

/// What [`fused_rows`] returns: the kernel's per-row values and, when requested, its gradient,
/// both as libtorch-owned f32 tensors without a graph.
#[derive(Debug)]
pub struct FusedRows {
    /// Per-row values, shaped like the logits without their last dimension (`[B, T]` for
    /// `[B, T, V]` logits).
    pub values: Tensor,
    /// `∂values[r]/∂logits[r]`, shaped like the logits, if it was computed.
    pub grad: Option<Tensor>,
    /// The kernel's f64 batch reduction and active count.
    pub stats: BatchStats,
}

/// Runs a row kernel on the logits of a tensor: views the logits (zero-copy when they are a
/// contiguous CPU f32 tensor, a counted copy otherwise), allocates the per-row value tensor and,
/// if `with_grad`, the gradient tensor, and calls `kernel(io, vocab, values)`.
///
/// `with_grad` is usually `logits.requires_grad()`: a value-only call (reference model,
/// evaluation, `no_grad`) does not pay for the gradient. The gradient is written into a fresh
/// libtorch tensor (`f_empty`), never copied.
///
/// # Shapes
///
/// `logits`: `[..., V]` (any leading dimensions; rows are their product). `values`: `[...]`,
/// `grad`: `[..., V]`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a 0-d tensor, view errors of [`CpuSlice::new`], the kernel's
/// error as [`Error::Kernel`], [`Error::Tch`].
pub fn fused_rows<F>(
    logits: &Tensor,
    op: &'static str,
    with_grad: bool,
    kernel: F,
) -> Result<FusedRows>
where
    F: FnOnce(LogitsIo<'_>, usize, &mut [f32]) -> amend_kernels::Result<BatchStats>,
{
    let shape = logits.size();
    let Some((&vocab, lead)) = shape.split_last() else {
        return Err(Error::ShapeMismatch {
            op,
            name: "logits",
            expected: "[..., vocab] with at least one dimension".into(),
            got: shape,
        });
    };
    let z = CpuSlice::<f32>::new(logits, op, "logits")?;
    let vocab = usize::try_from(vocab).unwrap_or(0);
    let mut values = CpuBuf::empty(lead)?;
    let (stats, grad) = if with_grad {
        let mut g = CpuBuf::empty(&shape)?;
        let stats =
            kernel(LogitsIo::grad(z.as_slice(), g.as_mut_slice()), vocab, values.as_mut_slice())?;
        (stats, Some(g.into_tensor()))
    } else {
        (kernel(LogitsIo::value(z.as_slice()), vocab, values.as_mut_slice())?, None)
    };
    Ok(FusedRows { values: values.into_tensor(), grad, stats })
}

/// How [`inject_rows`] / [`inject_sum`] keep non-finite logits out of the surrogate's value.
///
/// `⟨g, x⟩` reads every logit, and `0 · NaN` or `0 · (−inf)` is NaN even where the gradient is
/// 0. Logits are not validated by the loss layer, so inactive positions may hold anything
/// (token-losses §1.4), and active rows may hold `−inf` (a masked vocabulary, §1.5).
#[derive(Debug, Clone, Copy)]
pub enum Sanitize<'a> {
    /// Every logit is finite: the surrogate is one `bmm` / `dot`.
    None,
    /// Rows where this bool tensor (shaped like the values) is false are inactive: their `⟨g, x⟩`
    /// is replaced by 0 through `where`, so NaN/inf there never reach the output; their
    /// gradient is 0 either way. Active rows must be finite. Costs one `[N]` select.
    InactiveRows(&'a Tensor),
    /// Any logit may be non-finite: the surrogate uses `nan_to_num(x, 0, 0, 0)` (whose gradient
    /// passes where `x` is finite and is 0 elsewhere, where the kernel's gradient is 0 anyway).
    /// Costs an `[N, V]` temporary; use it when the kernel reports
    /// [`BatchStats::masked_vocab_rows`] `> 0`.
    Full,
}

/// The per-row surrogate: `out[r] = value[r] + (s[r] − s[r].detach())` with `s[r] = ⟨g[r], x[r]⟩`
/// (a `[N,1,V]×[N,V,1]` `bmm`), so `out == value` and `∂out[r]/∂x[r] == g[r]`.
///
/// Apply the reduction (or per-token weights) to the result with ordinary tensor ops: autograd
/// multiplies each row's Jacobian by its upstream gradient, exactly as for the composite.
/// With `grad = None` (value-only call) the detached values are returned. First order only (see
/// the [module docs](self)).
///
/// `value` and `grad` are the kernel's f32 outputs; the result has `x`'s dtype.
///
/// # Shapes
///
/// `x`: `[..., V]`; `value`: `[...]` (or any shape with `N = x.numel() / V` elements, which the
/// result keeps); `grad`: like `x`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the shapes disagree, [`Error::Tch`].
pub fn inject_rows(
    x: &Tensor,
    value: &Tensor,
    grad: Option<&Tensor>,
    sanitize: Sanitize<'_>,
) -> Result<Tensor> {
    const OP: &str = "inject_rows";
    let (rows, vocab) = rows_vocab(x, OP)?;
    let kind = x.f_kind()?;
    check_numel(value, rows, OP, "value")?;
    let value = value.f_detach()?.f_to_kind(kind)?;
    let Some(g) = grad else {
        return Ok(value);
    };
    check_same_numel(g, x, OP)?;
    let s = row_dots(x, g, rows, vocab, kind, sanitize)?.f_reshape(value.size())?;
    // `s − s.detach()` is exactly 0, so the value is the kernel's to the last bit.
    Ok(value.f_add(&s.f_sub(&s.f_detach()?)?)?)
}

/// The scalar surrogate: `out = value + (s − s.detach())` with `s = ⟨g, x⟩` over all elements
/// (one `dot` on flattened views when no sanitising is needed).
///
/// Use it when the kernel already applied the reduction (for example `value = Σ_r loss[r]` or a
/// mean with `grad` scaled by `1/count`). First order only.
///
/// # Shapes
///
/// `x`: `[..., V]`; `value`: one element; `grad`: like `x`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the shapes disagree, [`Error::Tch`].
pub fn inject_sum(
    x: &Tensor,
    value: &Tensor,
    grad: Option<&Tensor>,
    sanitize: Sanitize<'_>,
) -> Result<Tensor> {
    const OP: &str = "inject_sum";
    let (rows, vocab) = rows_vocab(x, OP)?;
    let kind = x.f_kind()?;
    check_numel(value, 1, OP, "value")?;
    let value = value.f_detach()?.f_to_kind(kind)?.f_reshape([] as [i64; 0])?;
    let Some(g) = grad else {
        return Ok(value);
    };
    check_same_numel(g, x, OP)?;
    let s = match sanitize {
        Sanitize::None => {
            let gf = g.f_detach()?.f_to_kind(kind)?.f_reshape([-1])?;
            x.f_reshape([-1])?.f_dot(&gf)?
        }
        _ => row_dots(x, g, rows, vocab, kind, sanitize)?.f_sum(kind)?,
    };
    // `s − s.detach()` is exactly 0, so the value is the kernel's to the last bit.
    Ok(value.f_add(&s.f_sub(&s.f_detach()?)?)?)
}

/// `s[r] = ⟨g[r], x̂[r]⟩` as `[rows]`, sanitised as asked.
fn row_dots(
    x: &Tensor,
    g: &Tensor,
    rows: i64,
    vocab: i64,
    kind: Kind,
    sanitize: Sanitize<'_>,
) -> Result<Tensor> {
    let gr = g.f_detach()?.f_to_kind(kind)?.f_reshape([rows, vocab, 1])?;
    let xs = match sanitize {
        Sanitize::Full => x.f_nan_to_num(0.0, 0.0, 0.0)?,
        _ => x.shallow_clone(),
    };
    let s = xs.f_reshape([rows, 1, vocab])?.f_bmm(&gr)?.f_reshape([rows])?;
    match sanitize {
        Sanitize::InactiveRows(active) => {
            check_numel(active, rows, "inject_rows", "active")?;
            let a = active.f_to_kind(Kind::Bool)?.f_reshape([rows])?.f_to(s.device())?;
            Ok(s.f_where_self(&a, &s.f_zeros_like()?)?)
        }
        _ => Ok(s),
    }
}

fn rows_vocab(x: &Tensor, op: &'static str) -> Result<(i64, i64)> {
    let shape = x.size();
    match shape.last() {
        Some(&v) if v > 0 => Ok((x.numel() as i64 / v, v)),
        _ => Err(Error::ShapeMismatch {
            op,
            name: "x",
            expected: "[..., vocab] with vocab > 0".into(),
            got: shape,
        }),
    }
}

fn check_numel(t: &Tensor, n: i64, op: &'static str, name: &'static str) -> Result<()> {
    if t.numel() as i64 == n {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { op, name, expected: format!("{n} elements"), got: t.size() })
    }
}

fn check_same_numel(g: &Tensor, x: &Tensor, op: &'static str) -> Result<()> {
    if g.size() == x.size() {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op,
            name: "grad",
            expected: format!("{:?} (like x)", x.size()),
            got: g.size(),
        })
    }
}
