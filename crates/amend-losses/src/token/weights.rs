//! [`TokenWeights`]: validated per-token weights in {−1, 0, +1}.

use tch::{Device, Kind, Tensor};

use super::common::unravel;
use crate::{Error, Result};

/// Per-token weights `w ∈ {−1, 0, +1}` `[B, T]`, validated once and reusable across losses.
///
/// `−1` marks a negative (unwanted) token, `+1` a positive one and `0` an ignored position
/// (padding). TNT, NL and UL-annotated train on `w ≠ 0`. Only the sign of a weight is used:
/// weights are never magnitude multipliers and are never clamped or rounded, so anything other
/// than exactly −1, 0 or +1 (0.5, 5, NaN, ±inf) is rejected.
///
/// Upstream (`google/t5patches`) is inconsistent here: its TNT forward form builds a "negative
/// probability" from `|w| ≠ 1`, TNRF/TNRLL silently drop such positions and NL scales by the
/// magnitude. An error is the only behaviour that cannot silently train the wrong objective.
///
/// # Shapes
///
/// * `weights`: `[B, T]`, any integer, float or bool dtype.
///
/// # Errors
///
/// * [`Error::ShapeMismatch`] if `weights` is not 2-D.
/// * [`Error::DtypeMismatch`] for complex dtypes.
/// * [`Error::InvalidTokenWeight`] naming the first offending value, its `(b, t)` index and the
///   number of invalid entries.
///
/// Validation costs one `[B, T]` comparison and one device sync.
///
/// # Example
///
/// ```
/// use amend_losses::token::TokenWeights;
/// use tch::Tensor;
///
/// let w = TokenWeights::new(&Tensor::from_slice(&[1i64, -1, 0, 1]).reshape([2, 2]))?;
/// assert_eq!((w.num_negative(), w.num_positive()), (1, 2));
/// assert_eq!(w.count_active(), 3.0);
///
/// let err = TokenWeights::new(&Tensor::from_slice(&[1.0f32, 5.0]).reshape([1, 2])).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "token weights must be -1, 0 or +1; found 5 at [0, 1] (1 invalid entries)"
/// );
/// # Ok::<(), amend_losses::Error>(())
/// ```
#[derive(Debug)]
pub struct TokenWeights {
    /// Signs as i8 `[B, T]`.
    signs: Tensor,
    num_negative: i64,
    num_positive: i64,
}

impl TokenWeights {
    /// Validates `weights` (`[B, T]`, values exactly −1, 0 or +1).
    pub fn new(weights: &Tensor) -> Result<Self> {
        const OP: &str = "TokenWeights::new";
        let size = weights.size();
        if size.len() != 2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                name: "weights",
                expected: "[B, T]".to_string(),
                got: size,
            });
        }
        let kind = weights.f_kind()?;
        let w = match kind {
            Kind::Bool => weights.f_to_kind(Kind::Int8)?,
            // Unsigned bytes cannot hold −1; compare in a signed dtype so 255 is not read as −1.
            Kind::Uint8 => weights.f_to_kind(Kind::Int16)?,
            Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble => {
                return Err(Error::DtypeMismatch {
                    op: OP,
                    name: "weights",
                    expected: "an integer, float or bool dtype",
                    got: kind,
                });
            }
            _ => weights.shallow_clone(),
        };
        let neg = w.f_eq(-1)?;
        let pos = w.f_eq(1)?;
        let valid = neg.f_logical_or(&pos)?.f_logical_or(&w.f_eq(0)?)?;
        let invalid = valid.f_logical_not()?;
        let stats = Tensor::f_stack(
            &[invalid.f_sum(Kind::Int64)?, neg.f_sum(Kind::Int64)?, pos.f_sum(Kind::Int64)?],
            0,
        )?;
        let stats = Vec::<i64>::try_from(&stats)?;
        if stats[0] > 0 {
            let first = i64::try_from(&invalid.f_reshape([-1])?.f_nonzero()?.f_get(0)?.f_get(0)?)?;
            let value = f64::try_from(&w.f_reshape([-1])?.f_get(first)?.f_to_kind(Kind::Double)?)?;
            return Err(Error::InvalidTokenWeight {
                value,
                index: unravel(first, &size),
                count: stats[0],
            });
        }
        let signs = pos.f_to_kind(Kind::Int8)?.f_sub(&neg.f_to_kind(Kind::Int8)?)?;
        Ok(TokenWeights { signs, num_negative: stats[1], num_positive: stats[2] })
    }

    /// The signs `[B, T]` as i8 in {−1, 0, +1}.
    pub fn signs(&self) -> &Tensor {
        &self.signs
    }

    /// `[B, T]`.
    pub fn shape(&self) -> Vec<i64> {
        self.signs.size()
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.signs.device()
    }

    /// Number of negative positions (`w = −1`).
    pub fn num_negative(&self) -> i64 {
        self.num_negative
    }

    /// Number of positive positions (`w = +1`).
    pub fn num_positive(&self) -> i64 {
        self.num_positive
    }

    /// Number of active positions (`w ≠ 0`): the `count` of TNT, NL and UL-annotated.
    pub fn count_active(&self) -> f64 {
        (self.num_negative + self.num_positive) as f64
    }

    /// Active positions `w ≠ 0` `[B, T]` bool.
    pub fn active_mask(&self) -> Result<Tensor> {
        Ok(self.signs.f_ne(0)?)
    }

    /// Negative positions `w = −1` `[B, T]` bool.
    pub fn negative_mask(&self) -> Result<Tensor> {
        Ok(self.signs.f_eq(-1)?)
    }

    /// The same weights on `device`.
    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(TokenWeights {
            signs: self.signs.f_to(device)?,
            num_negative: self.num_negative,
            num_positive: self.num_positive,
        })
    }
}

impl Clone for TokenWeights {
    /// A cheap copy sharing the signs tensor.
    fn clone(&self) -> Self {
        TokenWeights {
            signs: self.signs.shallow_clone(),
            num_negative: self.num_negative,
            num_positive: self.num_positive,
        }
    }
}

/// The `count` of the weighted token losses ([`tnt_loss`](super::tnt_loss),
/// [`nl_loss`](super::nl_loss), [`ul_annotated_loss`](super::ul_annotated_loss)): the number
/// of positions with `w ≠ 0`. It depends only on the weights, so a trainer can all-reduce it
/// over micro-batches and ranks before the forward pass.
///
/// # Example
///
/// ```
/// use amend_losses::token::{TokenWeights, count_active_weighted};
/// use tch::Tensor;
///
/// let w = TokenWeights::new(&Tensor::from_slice(&[1i64, -1, 0, 0]).reshape([2, 2]))?;
/// assert_eq!(count_active_weighted(&w), 2.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn count_active_weighted(weights: &TokenWeights) -> f64 {
    weights.count_active()
}
