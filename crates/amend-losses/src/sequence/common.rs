//! Helpers shared by the sequence-level losses: input validation, stable scalar functions, the
//! reduction to a [`LossOutput`] and detached `(sum, count)` metrics.

use tch::{Device, Kind, Tensor};

use super::EmptyPolicy;
use crate::{Error, LossOutput, LossPart, Metrics, Reduction, Result};

/// The kind all loss arithmetic runs in: f64 for f64 inputs (tests), f32 otherwise (bf16 and f16
/// are upcast).
pub(crate) fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double { Kind::Double } else { Kind::Float }
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

pub(crate) fn is_integer(kind: Kind) -> bool {
    matches!(kind, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8)
}

pub(crate) fn check_float(op: &'static str, name: &'static str, t: &Tensor) -> Result<()> {
    if is_float(t.kind()) {
        Ok(())
    } else {
        Err(Error::DtypeMismatch {
            op,
            name,
            expected: "a floating-point kind (f32, f64, bf16 or f16)",
            got: t.kind(),
        })
    }
}

pub(crate) fn check_integer(op: &'static str, name: &'static str, t: &Tensor) -> Result<()> {
    if is_integer(t.kind()) {
        Ok(())
    } else {
        Err(Error::DtypeMismatch {
            op,
            name,
            expected: "an integer kind (i64 preferred)",
            got: t.kind(),
        })
    }
}

pub(crate) fn check_shape(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    expected: &[i64],
    describe: impl FnOnce() -> String,
) -> Result<()> {
    let got = t.size();
    if got == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { op, name, expected: describe(), got })
    }
}

pub(crate) fn check_rank(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    rank: usize,
    describe: &str,
) -> Result<()> {
    if t.dim() == rank {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { op, name, expected: describe.to_string(), got: t.size() })
    }
}

pub(crate) fn check_device(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    expected: Device,
) -> Result<()> {
    if t.device() == expected {
        Ok(())
    } else {
        Err(Error::DeviceMismatch { op, name, expected, got: t.device() })
    }
}

/// A boolean copy of a 0/1 mask given as bool, integer or float; other values are an error.
pub(crate) fn bool_mask(op: &'static str, name: &'static str, t: &Tensor) -> Result<Tensor> {
    let kind = t.kind();
    if kind == Kind::Bool {
        return Ok(t.shallow_clone());
    }
    if !is_integer(kind) && !is_float(kind) {
        return Err(Error::DtypeMismatch { op, name, expected: "bool or 0/1 values", got: kind });
    }
    let bad = t.f_ne(0)?.f_logical_and(&t.f_ne(1)?)?;
    if let Some((index, count)) = first_true(&bad)? {
        return Err(Error::InvalidInput {
            op,
            name,
            reason: format!(
                "mask entries must be 0 or 1; {count} entries are not (first at {index:?})"
            ),
        });
    }
    Ok(t.f_ne(0)?)
}

/// Index of the first `true` entry of a boolean tensor and the number of `true` entries.
pub(crate) fn first_true(mask: &Tensor) -> Result<Option<(Vec<i64>, i64)>> {
    let count = i64::try_from(mask.f_sum(Kind::Int64)?)?;
    if count == 0 {
        return Ok(None);
    }
    let nz = mask.f_nonzero()?; // [count, ndim], row-major order
    let first = nz.f_get(0)?;
    let index =
        if first.dim() == 0 { vec![i64::try_from(&first)?] } else { Vec::<i64>::try_from(&first)? };
    Ok(Some((index, count)))
}

/// Errors with [`Error::NonFinite`] if `t` has a non-finite entry where `active` is true (or
/// anywhere, without `active`).
pub(crate) fn check_finite(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    active: Option<&Tensor>,
) -> Result<()> {
    let mut bad = t.f_isfinite()?.f_logical_not()?;
    if let Some(a) = active {
        bad = bad.f_logical_and(a)?;
    }
    match first_true(&bad)? {
        None => Ok(()),
        Some((index, count)) => Err(Error::NonFinite { op, name, index, count }),
    }
}

/// `x` where `valid`, else exactly 0 (selection, never multiplication).
pub(crate) fn select(x: &Tensor, valid: &Tensor) -> Result<Tensor> {
    Ok(x.f_where_scalarother(valid, 0.0)?)
}

/// `log(1 − eˣ)` for `x < 0`: `log1p(−eˣ)` below `−ln 2`, `log(−expm1(x))` above. Each branch
/// only ever sees inputs where it is accurate, so neither leaks a non-finite gradient.
pub(crate) fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let low = x.f_lt(-std::f64::consts::LN_2)?;
    let x_low = x.f_where_scalarother(&low, -1.0)?;
    let x_high = x.f_where_scalarother(&low.f_logical_not()?, -1.0)?;
    let a = x_low.f_exp()?.f_neg()?.f_log1p()?;
    let b = x_high.f_expm1()?.f_neg()?.f_log()?;
    Ok(a.f_where_self(&low, &b)?)
}

/// Sum of a tensor as f64, detached.
pub(crate) fn sum_f64(x: &Tensor) -> Result<f64> {
    Ok(f64::try_from(x.f_detach()?.f_sum(Kind::Double)?)?)
}

/// Number of `true` entries.
pub(crate) fn count_f64(valid: &Tensor) -> Result<f64> {
    Ok(i64::try_from(valid.f_sum(Kind::Int64)?)? as f64)
}

/// Adds the detached `(Σ_valid x, #valid)` pair of `x` to `metrics` under `name`.
pub(crate) fn add_mean(
    metrics: &mut Metrics,
    name: &str,
    x: &Tensor,
    valid: &Tensor,
) -> Result<()> {
    let sum = sum_f64(&select(&x.f_detach()?, valid)?)?;
    let count = count_f64(valid)?;
    metrics.add(name, sum, count);
    Ok(())
}

/// Validity of each sequence under an [`EmptyPolicy`]: `len > 0` (and `base`). With
/// [`EmptyPolicy::Error`], the first sequence of `base` with `len = 0` is an error.
pub(crate) fn nonempty(
    op: &'static str,
    len: &Tensor,
    base: Option<&Tensor>,
    policy: EmptyPolicy,
) -> Result<Tensor> {
    let ne = len.f_gt(0)?;
    let empty = match base {
        Some(b) => ne.f_logical_not()?.f_logical_and(b)?,
        None => ne.f_logical_not()?,
    };
    if policy == EmptyPolicy::Error
        && let Some((index, _)) = first_true(&empty)?
    {
        return Err(Error::EmptySequence { op, index: index[0] });
    }
    Ok(match base {
        Some(b) => ne.f_logical_and(b)?,
        None => ne,
    })
}

/// `S / n` where `valid`, exactly 0 elsewhere; the division never sees `n = 0`.
pub(crate) fn safe_mean(sum: &Tensor, len: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let n = len.f_clamp_min(1)?.f_to_kind(sum.kind())?;
    select(&sum.f_div(&n)?, valid)
}

/// Validation of configuration scalars.
pub(crate) mod cfg {
    use crate::{Error, Result};

    pub(crate) fn finite(op: &'static str, name: &'static str, v: f64) -> Result<()> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(Error::InvalidConfig { op, name, reason: format!("must be finite, got {v}") })
        }
    }

    pub(crate) fn positive(op: &'static str, name: &'static str, v: f64) -> Result<()> {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                op,
                name,
                reason: format!("must be finite and > 0, got {v}"),
            })
        }
    }

    pub(crate) fn nonnegative(op: &'static str, name: &'static str, v: f64) -> Result<()> {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                op,
                name,
                reason: format!("must be finite and >= 0, got {v}"),
            })
        }
    }

    /// `lo <= v < hi`.
    pub(crate) fn half_open(
        op: &'static str,
        name: &'static str,
        v: f64,
        lo: f64,
        hi: f64,
    ) -> Result<()> {
        if v >= lo && v < hi {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                op,
                name,
                reason: format!("must be in [{lo}, {hi}), got {v}"),
            })
        }
    }
}

/// Builds the [`LossOutput`] of a sequence-level loss.
///
/// `per_example` holds the main part's per-unit values (exact zeros at inactive units); `parts`
/// are the `(sum, count, weight)` domains. The reduced loss:
///
/// * `Mean`: `Σ weight · sum / count` (a part with count 0 contributes 0 with a zero gradient);
/// * `Sum`: `Σ weight · sum`;
/// * `BatchMean`: `Σ weight · sum / E`, `E` = number of units of `per_example` (active or not);
/// * `None`, `PerSequence`: `per_example` itself.
pub(crate) fn finish(
    per_example: Tensor,
    parts: Vec<LossPart>,
    metrics: Metrics,
    reduction: Reduction,
) -> Result<LossOutput> {
    let units = per_example.size().first().copied().unwrap_or(1) as f64;
    let loss = match reduction {
        Reduction::None | Reduction::PerSequence => per_example.shallow_clone(),
        _ => {
            let mut total: Option<Tensor> = None;
            for part in &parts {
                let scale = match reduction {
                    Reduction::Sum => part.weight,
                    Reduction::BatchMean => {
                        if units == 0.0 {
                            0.0
                        } else {
                            part.weight / units
                        }
                    }
                    _ => {
                        if part.count == 0.0 {
                            0.0
                        } else {
                            part.weight / part.count
                        }
                    }
                };
                let term = part.sum.f_mul_scalar(scale)?;
                total = Some(match total {
                    None => term,
                    Some(t) => t.f_add(&term)?,
                });
            }
            match total {
                Some(t) => t,
                None => per_example.f_sum(per_example.kind())?.f_mul_scalar(0.0)?,
            }
        }
    };
    Ok(LossOutput { loss, per_example, parts, metrics })
}

/// A `(sum, count)` part over the valid units of `per_unit`.
pub(crate) fn part(
    name: &'static str,
    per_unit: &Tensor,
    valid: &Tensor,
    weight: f64,
) -> Result<LossPart> {
    let sum = select(per_unit, valid)?.f_sum(per_unit.kind())?;
    Ok(LossPart { name, sum, count: count_f64(valid)?, weight })
}

/// Generates `with_*` setters for config fields.
macro_rules! with_setters {
    ($ty:ty { $($setter:ident => $field:ident : $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Returns the config with `", stringify!($field), "` set.")]
                #[must_use]
                pub fn $setter(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
pub(crate) use with_setters;

/// Policy sums of a chosen/rejected batch, validated and cast to the compute kind.
pub(crate) struct Pairs {
    pub s_c: Tensor,
    pub s_r: Tensor,
    pub n_c: Tensor,
    pub n_r: Tensor,
    pub kind: Kind,
    pub device: Device,
    pub p: i64,
}

pub(crate) fn pairs(
    op: &'static str,
    chosen: &super::SeqLogps,
    rejected: &super::SeqLogps,
) -> Result<Pairs> {
    check_rank(op, "chosen.sum", &chosen.sum, 1, "[P]")?;
    check_float(op, "chosen.sum", &chosen.sum)?;
    let p = chosen.sum.size()[0];
    check_shape(op, "rejected.sum", &rejected.sum, &[p], || {
        format!("[P] = [{p}] matching chosen")
    })?;
    check_shape(op, "chosen.len", &chosen.len, &[p], || format!("[P] = [{p}]"))?;
    check_shape(op, "rejected.len", &rejected.len, &[p], || format!("[P] = [{p}]"))?;
    check_float(op, "rejected.sum", &rejected.sum)?;
    let device = chosen.sum.device();
    check_device(op, "rejected.sum", &rejected.sum, device)?;
    let kind = compute_kind(chosen.sum.kind());
    Ok(Pairs {
        s_c: chosen.sum.f_to_kind(kind)?,
        s_r: rejected.sum.f_to_kind(kind)?,
        n_c: chosen.len.shallow_clone(),
        n_r: rejected.len.shallow_clone(),
        kind,
        device,
        p,
    })
}

/// A reference (or other constant) per-unit input: `[len]`, float, finite, detached, in `kind`.
pub(crate) fn constant_input(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    len: i64,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    check_float(op, name, t)?;
    check_shape(op, name, t, &[len], || format!("[{len}] matching the policy log-probs"))?;
    check_device(op, name, t, device)?;
    check_finite(op, name, t, None)?;
    Ok(t.f_detach()?.f_to_kind(kind)?)
}

/// The TRL preference metrics over the valid pairs.
pub(crate) fn preference_metrics(
    metrics: &mut Metrics,
    reward_c: &Tensor,
    reward_r: &Tensor,
    logps_c: &Tensor,
    logps_r: &Tensor,
    valid: &Tensor,
) -> Result<()> {
    add_mean(metrics, "rewards/chosen", reward_c, valid)?;
    add_mean(metrics, "rewards/rejected", reward_r, valid)?;
    add_mean(metrics, "rewards/margins", &reward_c.f_sub(reward_r)?, valid)?;
    let acc = reward_c.f_gt_tensor(reward_r)?.f_to_kind(Kind::Double)?;
    add_mean(metrics, "rewards/accuracies", &acc, valid)?;
    add_mean(metrics, "logps/chosen", logps_c, valid)?;
    add_mean(metrics, "logps/rejected", logps_r, valid)?;
    Ok(())
}

/// The token-mean NLL part of an optional retain (or SFT) batch: `sum = −Σ S`, `count = Σ n`.
pub(crate) fn nll_part(
    op: &'static str,
    name: &'static str,
    logps: &super::SeqLogps,
    valid: Option<&Tensor>,
    weight: f64,
    kind: Kind,
    device: Device,
) -> Result<(LossPart, SumCountF)> {
    check_rank(op, name, &logps.sum, 1, "[B]")?;
    check_float(op, name, &logps.sum)?;
    check_device(op, name, &logps.sum, device)?;
    let b = logps.sum.size()[0];
    check_shape(op, name, &logps.len, &[b], || format!("len [B] = [{b}]"))?;
    let s = logps.sum.f_to_kind(kind)?;
    let (s, len) = match valid {
        Some(v) => (select(&s, v)?, logps.len.f_where_scalarother(v, 0)?),
        None => (s, logps.len.shallow_clone()),
    };
    let sum = s.f_sum(kind)?.f_neg()?;
    let count = i64::try_from(len.f_sum(Kind::Int64)?)? as f64;
    let value = sum_f64(&sum)?;
    Ok((LossPart { name, sum, count, weight }, (value, count)))
}

/// A detached `(sum, count)`.
pub(crate) type SumCountF = (f64, f64);
