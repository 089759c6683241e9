//! Shared helpers of the token-loss integration tests.
#![allow(dead_code)]

use amend_losses::{LossOutput, Result};
use tch::{Device, Kind, Tensor};

/// A tensor of `kind` with `shape` from f64 data.
pub fn tensor(data: &[f64], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(data).reshape(shape).to_kind(kind)
}

/// A leaf tensor requiring grad.
pub fn leaf(data: &[f64], shape: &[i64], kind: Kind) -> Tensor {
    tensor(data, shape, kind).set_requires_grad(true)
}

/// i64 tensor.
pub fn ids(data: &[i64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(data).reshape(shape)
}

/// Flattened values as f64.
pub fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).reshape([-1])).expect("read back")
}

/// Scalar value.
pub fn scalar(t: &Tensor) -> f64 {
    t.detach().to_kind(Kind::Double).double_value(&[])
}

/// Runs `f` on a fresh leaf copy of `x` and returns (output, gradient of `output.loss` summed).
pub fn loss_and_grad(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<LossOutput>,
) -> Result<(LossOutput, Vec<f64>)> {
    let leaf = x.detach().copy().set_requires_grad(true);
    let out = f(&leaf)?;
    out.loss.sum(out.loss.kind()).backward();
    let g = leaf.grad();
    let g = if g.defined() { vals(&g) } else { vec![0.0; x.numel()] };
    Ok((out, g))
}

/// The CPU device.
pub const CPU: Device = Device::Cpu;
