//! How per-unit losses are combined, and the exact-normalisation pair `(sum, count)`.

use serde::{Deserialize, Serialize};

/// How a loss combines its per-unit values (tokens for token-level losses, examples, pairs or
/// groups for sequence-level losses).
///
/// Every loss in `amend` computes unreduced values `ℓᵢ` (exactly `0` at inactive units) and an
/// active mask `aᵢ`, and reports the pair
///
/// ```text
/// sum   = Σᵢ ℓᵢ          (carries the autograd graph in amend-losses)
/// count = Σᵢ aᵢ          (depends only on labels, weights and masks; no gradient)
/// ```
///
/// whatever the reduction. The reduction only decides the shape and value of the returned loss:
///
/// | variant | loss | gradient scale |
/// |---|---|---|
/// | `None` | the unreduced values, e.g. `[B, T]` | from the caller's upstream gradient |
/// | `PerSequence` | `[B]`, `Σₜ ℓ[b, t]` (token losses only) | from the caller |
/// | `Sum` | scalar `sum` | × 1 |
/// | `Mean` | scalar `sum / count`, and **`0` with a zero gradient when `count = 0`** | × 1/count |
/// | `BatchMean` | scalar `sum / B`, `B` = number of sequences (torch's `batchmean`) | × 1/B |
///
/// PyTorch returns NaN for the mean of an empty selection; `amend` returns `0` so that a
/// micro-batch whose tokens are all ignored contributes nothing instead of poisoning the step.
///
/// # Exact normalisation across micro-batches and ranks
///
/// Because `count` is known before the forward pass, a trainer that accumulates gradients over
/// micro-batches `k` (and ranks) computes the global count `N = Σₖ countₖ` first and then
/// back-propagates `sumₖ / N` for each micro-batch. The accumulated gradient then equals the
/// gradient of one `Mean` over the union of the micro-batches, which averaging per-micro-batch
/// means does not give when the micro-batches hold different numbers of active tokens.
///
/// ```
/// use amend_kernels::{Reduction, SumCount};
///
/// // Two micro-batches with 3 and 1 active tokens.
/// let parts = [SumCount::new(6.0, 3.0), SumCount::new(2.0, 1.0)];
/// let total = parts.iter().copied().fold(SumCount::ZERO, |a, b| a + b);
/// assert_eq!(total.mean(), 2.0); // (6 + 2) / 4, not (2 + 2) / 2
/// assert_eq!(Reduction::Mean.reduce_scalar(total, 2), 2.0);
/// assert_eq!(Reduction::Mean.reduce_scalar(SumCount::ZERO, 0), 0.0); // empty mean is 0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reduction {
    /// No reduction: one value per unit, `0` at inactive units.
    None,
    /// One value per sequence: the sum over its tokens (token-level losses only).
    PerSequence,
    /// The sum over all units.
    Sum,
    /// The sum divided by the number of active units; `0` (with a zero gradient) when there are none.
    Mean,
    /// The sum divided by the number of sequences in the batch, active or not.
    BatchMean,
}

impl Reduction {
    /// Reduces a `(sum, count)` pair to a scalar, as the scalar reductions define it.
    ///
    /// `batch` is the number of sequences (used by [`Reduction::BatchMean`]). For the non-scalar
    /// reductions ([`Reduction::None`], [`Reduction::PerSequence`]) this returns the plain sum, which is
    /// what the reduced value would add up to.
    pub fn reduce_scalar(self, total: SumCount, batch: usize) -> f64 {
        match self {
            Reduction::None | Reduction::PerSequence | Reduction::Sum => total.sum,
            Reduction::Mean => total.mean(),
            Reduction::BatchMean => {
                if batch == 0 {
                    0.0
                } else {
                    total.sum / batch as f64
                }
            }
        }
    }

    /// Whether the reduced loss is a scalar.
    pub fn is_scalar(self) -> bool {
        matches!(self, Reduction::Sum | Reduction::Mean | Reduction::BatchMean)
    }
}

/// A `(sum, count)` pair in `f64`: the exact-normalisation currency of `amend` (see [`Reduction`]).
///
/// Pairs from micro-batches or ranks add with `+`; [`SumCount::mean`] divides at the end.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SumCount {
    /// Sum of the per-unit values.
    pub sum: f64,
    /// Number of active units.
    pub count: f64,
}

impl SumCount {
    /// The empty pair `(0, 0)`.
    pub const ZERO: SumCount = SumCount { sum: 0.0, count: 0.0 };

    /// Makes a pair.
    pub fn new(sum: f64, count: f64) -> Self {
        SumCount { sum, count }
    }

    /// `sum / count`, and `0` when `count = 0`.
    pub fn mean(self) -> f64 {
        if self.count == 0.0 { 0.0 } else { self.sum / self.count }
    }
}

impl std::ops::Add for SumCount {
    type Output = SumCount;
    fn add(self, rhs: SumCount) -> SumCount {
        SumCount { sum: self.sum + rhs.sum, count: self.count + rhs.count }
    }
}

impl std::ops::AddAssign for SumCount {
    fn add_assign(&mut self, rhs: SumCount) {
        *self = *self + rhs;
    }
}

impl std::iter::Sum for SumCount {
    fn sum<I: Iterator<Item = SumCount>>(iter: I) -> SumCount {
        iter.fold(SumCount::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_empty_is_zero() {
        assert_eq!(SumCount::ZERO.mean(), 0.0);
        assert_eq!(Reduction::BatchMean.reduce_scalar(SumCount::new(3.0, 0.0), 0), 0.0);
    }

    #[test]
    fn sum_equals_mean_times_count() {
        let sc = SumCount::new(7.5, 3.0);
        assert_eq!(
            Reduction::Mean.reduce_scalar(sc, 1) * sc.count,
            Reduction::Sum.reduce_scalar(sc, 1)
        );
    }

    #[test]
    fn serde_names_are_snake_case() {
        let s = serde_json::to_string(&Reduction::PerSequence).unwrap();
        assert_eq!(s, "\"per_sequence\"");
    }
}
