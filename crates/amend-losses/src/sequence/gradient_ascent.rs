//! Gradient ascent on the forget set: the negated NLL, the simplest unlearning baseline.
//!
//! Parity target: `locuslab/open-unlearning src/trainer/unlearn/grad_ascent.py` (the framework's
//! token-mean NLL, negated) and `GradDiff` (`configs/trainer/GradDiff.yaml`, with a retain NLL).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    add_mean, cfg, check_float, check_rank, check_shape, compute_kind, finish, nll_part, nonempty,
    safe_mean, select, with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{LossOutput, LossPart, Metrics, Reduction, Result};

/// How gradient ascent normalises the forget log-likelihood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GaNorm {
    /// Token mean over the whole forget batch, `Σ_b S_b / Σ_b n_b` (open-unlearning; default).
    #[default]
    Token,
    /// Mean over sequences of the per-sequence token mean `A_b`.
    Sequence,
    /// Mean over sequences of the summed log-prob `S_b`.
    SequenceSum,
}

/// Configuration of [`gradient_ascent_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradientAscentConfig {
    /// Normalisation of the forget term. Default [`GaNorm::Token`].
    pub norm: GaNorm,
    /// Weight of the forget part (open-unlearning `gamma`). Default 1.0.
    #[serde(alias = "gamma")]
    pub forget_weight: f64,
    /// Weight of the retain NLL part, used with a retain batch (GradDiff `alpha`). Default 1.0.
    #[serde(alias = "alpha")]
    pub retain_weight: f64,
    /// Empty forget sequences under [`GaNorm::Sequence`]. Default [`EmptyPolicy::Error`].
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for GradientAscentConfig {
    fn default() -> Self {
        Self {
            norm: GaNorm::Token,
            forget_weight: 1.0,
            retain_weight: 1.0,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(GradientAscentConfig {
    with_norm => norm: GaNorm,
    with_forget_weight => forget_weight: f64,
    with_retain_weight => retain_weight: f64,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl GradientAscentConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        cfg::nonnegative("gradient_ascent_loss", "forget_weight", self.forget_weight)?;
        cfg::nonnegative("gradient_ascent_loss", "retain_weight", self.retain_weight)
    }
}

/// Gradient ascent: minimise the log-likelihood of the forget responses (`L = −NLL`).
///
/// ```text
/// Token:        L = Σ_b S_b / Σ_b n_b     per_example S_b, part "forget_tokens" (count Σ n_b)
/// Sequence:     L = mean_b A_b            per_example A_b, part "forget" (count B)
/// SequenceSum:  L = mean_b S_b            per_example S_b, part "forget" (count B)
/// loss = forget_weight · L + retain_weight · (−Σ S_retain / Σ n_retain)   (retain optional)
/// metrics: logps/rejected = S, forget_loss, retain_loss
/// ```
///
/// `L → −∞` as training proceeds: unbounded by design, never clamped.
///
/// # Shapes
///
/// * `forget`: [`SeqLogps`] `[B]`;  `retain`: optional [`SeqLogps`] `[B']`
/// * `per_example`: `[B]`
///
/// # Errors
///
/// [`crate::Error::InvalidConfig`], [`crate::Error::ShapeMismatch`],
/// [`crate::Error::DtypeMismatch`], [`crate::Error::DeviceMismatch`],
/// [`crate::Error::EmptySequence`] (under [`GaNorm::Sequence`]).
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{gradient_ascent_loss, GradientAscentConfig, SeqLogps};
/// use tch::Tensor;
///
/// let forget = SeqLogps::from_sums(&Tensor::from_slice(&[-3.5f64, -0.6]), &Tensor::from_slice(&[3i64, 2]))?;
/// let out = gradient_ascent_loss(&forget, None, &GradientAscentConfig::default())?;
/// assert!((f64::try_from(&out.loss)? + 0.82).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn gradient_ascent_loss(
    forget: &SeqLogps,
    retain: Option<&SeqLogps>,
    cfg: &GradientAscentConfig,
) -> Result<LossOutput> {
    const OP: &str = "gradient_ascent_loss";
    cfg.validate()?;
    check_rank(OP, "forget.sum", &forget.sum, 1, "[B]")?;
    check_float(OP, "forget.sum", &forget.sum)?;
    let b = forget.sum.size()[0];
    check_shape(OP, "forget.len", &forget.len, &[b], || format!("[B] = [{b}]"))?;
    let (kind, device) = (compute_kind(forget.sum.kind()), forget.sum.device());
    let s = forget.sum.f_to_kind(kind)?;
    let all = Tensor::f_ones([b], (Kind::Bool, device))?;
    let mut metrics = Metrics::new();
    add_mean(&mut metrics, "logps/rejected", &s, &all)?;
    let (per_example, forget_part) = match cfg.norm {
        GaNorm::Token => {
            let count = i64::try_from(forget.len.f_sum(Kind::Int64)?)? as f64;
            let part = LossPart {
                name: "forget_tokens",
                sum: s.f_sum(kind)?,
                count,
                weight: cfg.forget_weight,
            };
            (s.shallow_clone(), part)
        }
        GaNorm::Sequence => {
            let valid = nonempty(OP, &forget.len, None, cfg.empty_policy)?;
            let a = safe_mean(&s, &forget.len, &valid)?;
            let part = super::common::part("forget", &a, &valid, cfg.forget_weight)?;
            (a, part)
        }
        GaNorm::SequenceSum => {
            let part = super::common::part("forget", &s, &all, cfg.forget_weight)?;
            (select(&s, &all)?, part)
        }
    };
    let forget_value = if forget_part.count == 0.0 {
        0.0
    } else {
        f64::try_from(forget_part.sum.f_detach()?.f_to_kind(Kind::Double)?)? / forget_part.count
    };
    metrics.add("forget_loss", forget_value * forget_part.count, forget_part.count);
    let mut parts = vec![forget_part];
    if let Some(retain) = retain {
        let (p, (sum, count)) =
            nll_part(OP, "retain", retain, None, cfg.retain_weight, kind, device)?;
        metrics.add("retain_loss", sum, count);
        parts.push(p);
    }
    finish(per_example, parts, metrics, cfg.reduction)
}
