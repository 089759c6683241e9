//! The low-rank weight edit `W ← W (I − P)` / `W ← (I − P) W` in both layouts (spec A.3 step 9).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use amend_models::WeightLayout;

use crate::{Error, Result};

/// Which side of a weight the projection acts on.
///
/// `Output` removes the subspace from what the layer **writes** (the value edit of ProFS: the MLP
/// can no longer write into `span(V_k)`); `Input` removes it from what the layer **reads** (the key
/// edit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The output dimension: Conv1D `[in, out]` → columns, Linear `[out, in]` → rows.
    Output,
    /// The input dimension: Conv1D → rows, Linear → columns.
    Input,
}

/// Whether the projected dimension is dim 0 (rows) of the weight.
fn projects_rows(layout: WeightLayout, side: Side) -> Result<bool> {
    match (layout, side) {
        (WeightLayout::Conv1D, Side::Output) | (WeightLayout::Linear, Side::Input) => Ok(false),
        (WeightLayout::Conv1D, Side::Input) | (WeightLayout::Linear, Side::Output) => Ok(true),
        (other, _) => Err(Error::invalid(
            "apply_projection",
            "layout",
            format!("unsupported weight layout {other:?}"),
        )),
    }
}

/// `W (I − V Vᵀ)` or `(I − V Vᵀ) W` without materialising the `[D, D]` projector.
///
/// ```text
/// columns (Conv1D value, Linear key):  W − (W V) Vᵀ
/// rows    (Linear value, Conv1D key):  W − V (Vᵀ W)
/// bias (1-D, output side):             b − V (Vᵀ b)
/// ```
///
/// The result is in the basis dtype (f32 or f64): `weight` is cast to it first (D7).
///
/// # Shapes
/// `weight`: `[r, c]` (or `[D]` for a bias) with the projected dimension of size `D`;
/// `basis`: `[D, k]`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the projected dimension is not `D`; [`Error::InvalidInput`] for a
/// non-floating tensor; [`Error::Tch`].
///
/// # Example
///
/// ```
/// use amend_edit::profs::{projected, Side, WeightLayout};
/// use tch::Tensor;
/// let w = Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6.]).view([2, 3]); // Conv1D [d_ff, D]
/// let v = Tensor::from_slice(&[0.0f32, 0., 1.]).view([3, 1]);              // basis e₃
/// let out = projected(&w, &v, WeightLayout::Conv1D, Side::Output)?;
/// assert_eq!(Vec::<f32>::try_from(out.flatten(0, -1))?, vec![1., 2., 0., 4., 5., 0.]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn projected(
    weight: &Tensor,
    basis: &Tensor,
    layout: WeightLayout,
    side: Side,
) -> Result<Tensor> {
    const OP: &str = "apply_projection";
    let bs = basis.size();
    if bs.len() != 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "basis",
            expected: vec![-1, -1],
            got: bs,
        });
    }
    let d = bs[0];
    let ws = weight.size();
    if !weight.f_is_floating_point()? || !basis.f_is_floating_point()? {
        return Err(Error::invalid(OP, "weight", "weight and basis must be floating tensors"));
    }
    let kind = basis.f_kind()?;
    let _guard = tch::no_grad_guard();
    let w = weight.f_detach()?.f_to_kind(kind)?;
    match ws.len() {
        1 => {
            if ws[0] != d {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    name: "weight",
                    expected: vec![d],
                    got: ws,
                });
            }
            let coef = basis.f_tr()?.f_mv(&w)?;
            Ok(w.f_sub(&basis.f_mv(&coef)?)?)
        }
        2 => {
            if projects_rows(layout, side)? {
                if ws[0] != d {
                    return Err(Error::ShapeMismatch {
                        op: OP,
                        name: "weight",
                        expected: vec![d, -1],
                        got: ws,
                    });
                }
                let coef = basis.f_tr()?.f_matmul(&w)?; // [k, c]
                Ok(w.f_sub(&basis.f_matmul(&coef)?)?)
            } else {
                if ws[1] != d {
                    return Err(Error::ShapeMismatch {
                        op: OP,
                        name: "weight",
                        expected: vec![-1, d],
                        got: ws,
                    });
                }
                let coef = w.f_matmul(basis)?; // [r, k]
                Ok(w.f_sub(&coef.f_matmul(&basis.f_tr()?)?)?)
            }
        }
        _ => Err(Error::ShapeMismatch { op: OP, name: "weight", expected: vec![-1, -1], got: ws }),
    }
}

/// Applies the projection to `weight` in place (under no-grad): computes [`projected`] in the
/// basis dtype and copies it back, cast once to the weight's dtype (round to nearest even).
/// `weight` may share storage with a model parameter (the model then uses the edited weight).
///
/// # Shapes
/// As [`projected`].
///
/// # Errors
/// As [`projected`].
///
/// # Example
///
/// ```
/// use amend_edit::profs::{apply_projection, Side, WeightLayout};
/// use tch::Tensor;
/// let mut w = Tensor::from_slice(&[1.0f32, 4., 2., 5., 3., 6.]).view([3, 2]); // Linear [D, d_ff]
/// let v = Tensor::from_slice(&[0.0f32, 0., 1.]).view([3, 1]);
/// apply_projection(&mut w, &v, WeightLayout::Linear, Side::Output)?;
/// assert_eq!(Vec::<f32>::try_from(w.flatten(0, -1))?, vec![1., 4., 2., 5., 0., 0.]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn apply_projection(
    weight: &mut Tensor,
    basis: &Tensor,
    layout: WeightLayout,
    side: Side,
) -> Result<()> {
    let new = projected(weight, basis, layout, side)?;
    let _guard = tch::no_grad_guard();
    weight.f_copy_(&new)?;
    Ok(())
}

/// How much an edit changed one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorChange {
    /// Checkpoint key.
    pub name: String,
    /// Its layer.
    pub layer: Option<usize>,
    /// `value`, `key`, `value_bias`, or `trained` (fine-tuning).
    pub role: String,
    /// `‖W_new − W_old‖_F`.
    pub frobenius_delta: f64,
    /// `‖W_old‖_F`.
    pub frobenius_before: f64,
    /// `‖ΔW‖_F / ‖W_old‖_F` (0 for a zero weight).
    pub relative_delta: f64,
    /// `max |ΔW|`.
    pub max_abs_delta: f64,
}

impl TensorChange {
    /// Measures `after − before` in f64.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn measure(
        name: &str,
        layer: Option<usize>,
        role: &str,
        before: &Tensor,
        after: &Tensor,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let b = before.f_to_kind(Kind::Double)?;
        let a = after.f_to_kind(Kind::Double)?;
        let delta = a.f_sub(&b)?;
        let fd = delta.f_norm()?.f_double_value(&[])?;
        let fb = b.f_norm()?.f_double_value(&[])?;
        let max_abs = delta.f_abs()?.f_max()?.f_double_value(&[])?;
        Ok(TensorChange {
            name: name.to_string(),
            layer,
            role: role.to_string(),
            frobenius_delta: fd,
            frobenius_before: fb,
            relative_delta: if fb > 0.0 { fd / fb } else { 0.0 },
            max_abs_delta: max_abs,
        })
    }
}
