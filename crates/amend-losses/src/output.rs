//! [`LossOutput`]: what every loss returns.

use std::collections::BTreeMap;

use amend_kernels::SumCount;
use tch::Tensor;

#[cfg(doc)]
use crate::Reduction;
use crate::Result;

/// One normalisation domain of a loss: a summed value with the graph, and the number of units it
/// is normalised by.
///
/// Most losses have one part (`"tokens"`, `"pairs"`, `"examples"`, ...). Losses with two domains,
/// such as ORPO (pairs + tokens of the NLL term) or NPO with a retain term, have two, each with
/// its own count and weight.
#[derive(Debug)]
pub struct LossPart {
    /// Name of the domain, for example `"tokens"` or `"pairs"`.
    pub name: &'static str,
    /// Scalar `Σ ℓᵢ` over the units of this part, with the autograd graph.
    pub sum: Tensor,
    /// Number of active units (exact integer stored as `f64`; no gradient).
    pub count: f64,
    /// Weight of this part in the total loss.
    pub weight: f64,
}

/// Detached scalar metrics, each kept as a `(sum, count)` pair so that they aggregate exactly
/// across micro-batches and ranks (merge with [`Metrics::merge`], read with [`Metrics::mean`]).
///
/// Names follow TRL where TRL has the same quantity (`rewards/chosen`, `rewards/margins`,
/// `logps/chosen`, ...); method-specific metrics are prefixed with the method (`tnt/neg_mass`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    entries: BTreeMap<String, SumCount>,
}

impl Metrics {
    /// An empty set of metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `(sum, count)` to metric `name`.
    pub fn add(&mut self, name: impl Into<String>, sum: f64, count: f64) {
        *self.entries.entry(name.into()).or_default() += SumCount::new(sum, count);
    }

    /// Adds every metric of `other` to this one.
    pub fn merge(&mut self, other: &Metrics) {
        for (k, v) in &other.entries {
            *self.entries.entry(k.clone()).or_default() += *v;
        }
    }

    /// The `(sum, count)` pair of a metric.
    pub fn get(&self, name: &str) -> Option<SumCount> {
        self.entries.get(name).copied()
    }

    /// The value `sum / count` of a metric (`0` when its count is 0).
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.get(name).map(SumCount::mean)
    }

    /// All metrics in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, SumCount)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// All metric values (`sum / count`) in name order.
    pub fn to_means(&self) -> BTreeMap<String, f64> {
        self.entries.iter().map(|(k, v)| (k.clone(), v.mean())).collect()
    }
}

/// What every loss returns.
///
/// * `loss`: the reduced loss, whose shape the [`Reduction`] decides (scalar for `Sum`, `Mean` and
///   `BatchMean`; `[B, T]` for `None` on token losses; `[B]` for `PerSequence`). Call
///   `backward()` on it.
/// * `per_example`: the unreduced values (token losses `[B, T]` with exact zeros at inactive
///   positions, or one value per example, pair or group), on the same graph.
/// * `parts`: `(sum, count)` per normalisation domain, for exact normalisation across gradient
///   accumulation and data-parallel ranks: all-reduce each part's `count` to `N` first, then
///   back-propagate `Σ weight · sum / N` per micro-batch (see [`Reduction`]).
/// * `metrics`: detached diagnostics.
#[derive(Debug)]
pub struct LossOutput {
    /// The reduced loss.
    pub loss: Tensor,
    /// Unreduced per-unit losses, with the graph.
    pub per_example: Tensor,
    /// `(sum, count)` per normalisation domain.
    pub parts: Vec<LossPart>,
    /// Detached metrics.
    pub metrics: Metrics,
}

impl LossOutput {
    /// `Σ weight · sum` over the parts, with the graph (the loss under [`Reduction::Sum`]).
    pub fn weighted_sum(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for part in &self.parts {
            let term = part.sum.f_mul_scalar(part.weight)?;
            total = Some(match total {
                None => term,
                Some(t) => t.f_add(&term)?,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Ok(self.loss.f_sum(self.loss.kind())?),
        }
    }

    /// The count of the first (main) part, or `0` if there are no parts.
    pub fn count(&self) -> f64 {
        self.parts.first().map_or(0.0, |p| p.count)
    }

    /// `Σ weight · sum / count` with every part normalised by the given global counts (one per
    /// part, in order): the quantity to back-propagate per micro-batch for exact normalisation.
    ///
    /// A part whose global count is `0` contributes `0` with a zero gradient.
    pub fn normalized_by(&self, global_counts: &[f64]) -> Result<Tensor> {
        if global_counts.len() != self.parts.len() {
            return Err(crate::Error::InvalidInput {
                op: "LossOutput::normalized_by",
                name: "global_counts",
                reason: format!(
                    "{} counts given for {} parts",
                    global_counts.len(),
                    self.parts.len()
                ),
            });
        }
        let mut total: Option<Tensor> = None;
        for (part, &n) in self.parts.iter().zip(global_counts) {
            let scale = if n == 0.0 { 0.0 } else { part.weight / n };
            let term = part.sum.f_mul_scalar(scale)?;
            total = Some(match total {
                None => term,
                Some(t) => t.f_add(&term)?,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Ok(self.loss.f_sum(self.loss.kind())?.f_mul_scalar(0.0)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    fn output(values: &[f64], count: f64) -> (Tensor, LossOutput) {
        let x = Tensor::from_slice(values).set_requires_grad(true);
        let sum = x.sum(Kind::Double);
        let loss = &sum / count.max(1.0);
        let out = LossOutput {
            loss,
            per_example: x.shallow_clone(),
            parts: vec![LossPart { name: "tokens", sum, count, weight: 1.0 }],
            metrics: Metrics::new(),
        };
        (x, out)
    }

    #[test]
    fn normalized_by_global_count_matches_one_big_mean() -> Result<()> {
        // Micro-batches with 3 and 1 active tokens: the accumulated gradient of sum_k / 4 equals
        // the gradient of the mean over all 4 tokens (1/4 each), not of the mean of means.
        let (x1, o1) = output(&[1.0, 2.0, 3.0], 3.0);
        let (x2, o2) = output(&[4.0], 1.0);
        let n = o1.count() + o2.count();
        o1.normalized_by(&[n])?.backward();
        o2.normalized_by(&[n])?.backward();
        for g in
            Vec::<f64>::try_from(x1.grad())?.into_iter().chain(Vec::<f64>::try_from(x2.grad())?)
        {
            assert!((g - 0.25).abs() < 1e-15);
        }
        Ok(())
    }

    #[test]
    fn normalized_by_zero_count_is_zero_with_zero_grad() -> Result<()> {
        let (x, o) = output(&[7.0], 0.0);
        let l = o.normalized_by(&[0.0])?;
        assert_eq!(f64::try_from(&l)?, 0.0);
        l.backward();
        assert_eq!(Vec::<f64>::try_from(x.grad())?, vec![0.0]);
        Ok(())
    }

    #[test]
    fn normalized_by_rejects_wrong_number_of_counts() {
        let (_, o) = output(&[1.0], 1.0);
        assert!(matches!(o.normalized_by(&[1.0, 2.0]), Err(crate::Error::InvalidInput { .. })));
    }

    #[test]
    fn metrics_merge_exactly() {
        let mut a = Metrics::new();
        a.add("rewards/accuracies", 2.0, 3.0);
        let mut b = Metrics::new();
        b.add("rewards/accuracies", 1.0, 1.0);
        a.merge(&b);
        assert_eq!(a.mean("rewards/accuracies"), Some(0.75));
        assert_eq!(a.mean("missing"), None);
    }
}
