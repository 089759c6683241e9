//! Small tensor helpers.

use tch::Tensor;

use crate::Result;

/// A copy of `t` with its own storage, detached from any graph (never shares storage with `t`).
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut out = t.f_empty_like()?;
    out.f_copy_(&t.f_detach()?)?;
    Ok(out)
}

/// The values of a tensor as `Vec<f64>`.
pub(crate) fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(t.f_to_kind(tch::Kind::Double)?.f_flatten(0, -1)?)?)
}
