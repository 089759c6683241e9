//! The kernels' gradient handed to autograd as it is, through a custom autograd function written
//! in C++ against the same libtorch (`csrc/attach_rows.cpp`; tch has no API for custom functions).
//!
//! Compared with the surrogate of [`bridge::inject_rows`](crate::bridge::inject_rows)
//! (`value + ⟨g, x⟩ − ⟨g, x⟩.detach()`), it saves the surrogate's `[N, V]` product in the forward
//! pass and, when the upstream gradient is uniformly `scale` (a `Sum`, or a `Mean` whose `1/count`
//! was folded into `g`), the `[N, V]` product of the backward pass too: `g` itself becomes
//! `x.grad` (libtorch's AccumulateGrad adopts it without a copy when the graph is not retained).
//! Any other upstream gradient (per-token weights, a retained graph) gets the out-of-place
//! `g · upstream / scale`, which is what the surrogate costs. First order only, like the
//! surrogate.
//!
//! This is the crate's only `unsafe` code: two FFI calls whose pointers come from live tch
//! tensors (see the `SAFETY` comments).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{Error, Result};

unsafe extern "C" {
    fn amend_attach_rows(
        x: *mut C_tensor,
        value: *mut C_tensor,
        grad: *mut C_tensor,
        scale: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// `out = value` (a copy, shaped like `value`) with `∂out[r]/∂x[r] = grad[r]`.
///
/// `x` is the logits the kernel read (`[..., V]`, requiring grad), `value` its per-row values
/// (`[...]`), `grad` the kernel's gradient shaped like `x`. `grad` is multiplied by `scale` (> 0,
/// the factor the caller's reduction applies next) in place, kept until the backward pass and
/// returned as the gradient when the upstream gradient is uniformly `scale`, so autograd may
/// adopt it as `x.grad`: do not read or write it afterwards.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when `grad` is not shaped like `x`, [`Error::Tch`] with libtorch's
/// message when the autograd call fails.
pub(crate) fn attach_rows(x: &Tensor, value: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    const OP: &str = "attach_rows";
    if grad.size() != x.size() {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "grad",
            expected: format!("{:?}, the shape of the logits", x.size()),
            got: grad.size(),
        });
    }
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    // SAFETY: the three tensor pointers come from live tch tensors borrowed for the duration of
    // the call; the C++ side only copies their handles (reference counts), never frees or
    // mutates the objects. `out` receives a `new at::Tensor` on success, whose ownership passes
    // to the `Tensor` below; `err` is a writable buffer of the length passed.
    let rc = unsafe {
        amend_attach_rows(
            x.as_ptr() as *mut C_tensor,
            value.as_ptr() as *mut C_tensor,
            grad.as_ptr() as *mut C_tensor,
            scale,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: the C++ side NUL-terminates `err` within its length on failure.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(Error::Tch(tch::TchError::Torch(format!("{OP}: {msg}"))));
    }
    // SAFETY: `out` is a heap-allocated `at::Tensor` created for us (see above).
    Ok(unsafe { Tensor::from_ptr(out) })
}
