//! The fine-tuning edit objectives (spec B.2): the conditional likelihood with `TokenMean` or
//! `ExampleMean`, and EasyEdit's `prompt_last`. Token NLLs come from
//! [`amend_losses::token::nll_loss`]; the two edit-specific reductions are here.

use tch::{Kind, Tensor};

use amend_losses::Reduction;
use amend_losses::token::{NllConfig, nll_loss};
use amend_models::{CausalLm, ForwardOptions};

use super::batch::TrainBatch;
use super::recipe::{Objective, TargetReduction};
use crate::{Error, Result};

/// Reduces per-example sums `[B]` with per-example counts `[B]`.
fn reduce(sums: &Tensor, counts: &Tensor, reduction: TargetReduction) -> Result<Tensor> {
    // f64 stays f64 (tests, finite differences); everything else is reduced in f32.
    let kind = if sums.f_kind()? == Kind::Double { Kind::Double } else { Kind::Float };
    let sums = sums.f_to_kind(kind)?;
    let counts = counts.f_to_kind(kind)?;
    match reduction {
        TargetReduction::TokenMean => {
            let n = counts.f_sum(kind)?.f_double_value(&[])?;
            if n == 0.0 {
                // Nothing to train: loss 0 with a zero gradient.
                return Ok(sums.f_sum(kind)?.f_mul_scalar(0.0)?);
            }
            Ok(sums.f_sum(kind)?.f_div_scalar(n)?)
        }
        TargetReduction::ExampleMean => {
            let active = counts.f_gt(0.0)?;
            let n = active.f_sum(kind)?.f_double_value(&[])?;
            if n == 0.0 {
                return Ok(sums.f_sum(kind)?.f_mul_scalar(0.0)?);
            }
            // Masking by selection: rows without targets contribute an exact 0.
            let safe = counts.f_clamp_min(1.0)?;
            let per = sums.f_div(&safe)?;
            let zero = per.f_zeros_like()?;
            Ok(per.f_where_self(&active, &zero)?.f_sum(kind)?.f_div_scalar(n)?)
        }
    }
}

/// Conditional negative log-likelihood of the target tokens (Gangadhar & Stratos `L_cond`; EasyEdit
/// FT-M).
///
/// ```text
/// ℓ_{b,j} = −log softmax(z_{b, j−1})[x_{b, j}]        for target positions j (mask_{b,j} = 1)
/// TokenMean:    L = Σ_{b,j} ℓ_{b,j} / Σ_{b,j} mask_{b,j}
/// ExampleMean:  L = mean_b ( Σ_j ℓ_{b,j} / Σ_j mask_{b,j} )   over rows with targets
/// ```
///
/// `target_mask` marks positions of the **input** holding target tokens (built by position, FT-1);
/// position 0 has no prediction and must be false. A batch without targets gives 0 with a zero
/// gradient.
///
/// # Shapes
/// `logits: [B, T, V]`, `input_ids: [B, T]` (integer), `target_mask: [B, T]` (bool) → scalar.
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::InvalidInput`] when position 0 is marked or `T < 2`;
/// [`Error::Loss`] (labels out of range, non-finite logits).
///
/// # Example
///
/// The test vector of spec B.6:
///
/// ```
/// use amend_edit::ft::{conditional_nll, TargetReduction};
/// use tch::Tensor;
/// let logits = Tensor::from_slice(&[2.0f32, 1., 0., -1., 0.5, 0., 1.5, 0., 0., 0., 0.5, 1.])
///     .view([1, 3, 4]);
/// // ids [0, 1, 2, 3]: prompt [0, 1], target [2, 3] (the 4th logit row is never used)
/// let logits = Tensor::cat(&[logits, Tensor::zeros([1, 1, 4], tch::kind::FLOAT_CPU)], 1);
/// let ids = Tensor::from_slice(&[0i64, 1, 2, 3]).view([1, 4]);
/// let mask = Tensor::from_slice(&[false, false, true, true]).view([1, 4]);
/// let l = conditional_nll(&logits, &ids, &mask, TargetReduction::TokenMean)?;
/// assert!((l.double_value(&[]) - 0.72337).abs() < 1e-5);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn conditional_nll(
    logits: &Tensor,
    input_ids: &Tensor,
    target_mask: &Tensor,
    reduction: TargetReduction,
) -> Result<Tensor> {
    const OP: &str = "conditional_nll";
    let ls = logits.size();
    let is = input_ids.size();
    let ms = target_mask.size();
    if ls.len() != 3 || is.len() != 2 || ls[..2] != is[..] {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "logits",
            expected: vec![is.first().copied().unwrap_or(-1), is.get(1).copied().unwrap_or(-1), -1],
            got: ls,
        });
    }
    if ms != is {
        return Err(Error::ShapeMismatch { op: OP, name: "target_mask", expected: is, got: ms });
    }
    let t = ls[1];
    if t < 2 {
        return Err(Error::invalid(OP, "input_ids", "sequences need at least 2 positions"));
    }
    let mask = target_mask.f_to_kind(Kind::Bool)?;
    if bool::try_from(mask.f_select(1, 0)?.f_any()?)? {
        return Err(Error::invalid(OP, "target_mask", "position 0 has no prediction"));
    }
    let z = logits.f_narrow(1, 0, t - 1)?;
    let y = input_ids.f_narrow(1, 1, t - 1)?;
    let m = mask.f_narrow(1, 1, t - 1)?;
    let cfg = NllConfig::default().with_reduction(Reduction::PerSequence);
    let out = nll_loss(&z, &y, Some(&m), &cfg)?;
    let counts = m.f_sum_dim_intlist(&[1i64][..], false, Kind::Double)?;
    reduce(&out.loss, &counts, reduction)
}

/// EasyEdit FT-L (`objective_optimization: prompt_last`): every target token is scored from the
/// logits at the **last prompt position**.
///
/// ```text
/// ℓ_{b,j} = −log softmax(z_b^last)[o_{b,j}]
/// ExampleMean:  L = mean_b (1/|o_b|) Σ_j ℓ_{b,j}      (EasyEdit)
/// TokenMean:    L = Σ_{b,j} ℓ_{b,j} / Σ_b |o_b|
/// ```
///
/// # Shapes
/// `last_logits: [B, V]`, `targets: [B, L]` (integer), `targets_mask: [B, L]` (bool) → scalar.
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::Loss`].
///
/// # Example
///
/// Spec B.6: both targets [2, 3] scored from position 1 give 1.345611.
///
/// ```
/// use amend_edit::ft::{prompt_last_nll, TargetReduction};
/// use tch::Tensor;
/// let last = Tensor::from_slice(&[0.5f32, 0., 1.5, 0.]).view([1, 4]);
/// let tg = Tensor::from_slice(&[2i64, 3]).view([1, 2]);
/// let tm = Tensor::from_slice(&[true, true]).view([1, 2]);
/// let l = prompt_last_nll(&last, &tg, &tm, TargetReduction::ExampleMean)?;
/// assert!((l.double_value(&[]) - 1.345611).abs() < 1e-5);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn prompt_last_nll(
    last_logits: &Tensor,
    targets: &Tensor,
    targets_mask: &Tensor,
    reduction: TargetReduction,
) -> Result<Tensor> {
    const OP: &str = "prompt_last_nll";
    let ls = last_logits.size();
    let ts = targets.size();
    if ls.len() != 2 || ts.len() != 2 || ls[0] != ts[0] {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "last_logits",
            expected: vec![ts.first().copied().unwrap_or(-1), -1],
            got: ls,
        });
    }
    if targets_mask.size() != ts {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "targets_mask",
            expected: ts,
            got: targets_mask.size(),
        });
    }
    // The same row of logits for every target position: [B, L, V] (a broadcast view).
    let z = last_logits.f_unsqueeze(1)?.f_expand([ls[0], ts[1], ls[1]], false)?;
    let m = targets_mask.f_to_kind(Kind::Bool)?;
    let cfg = NllConfig::default().with_reduction(Reduction::PerSequence);
    let out = nll_loss(&z, targets, Some(&m), &cfg)?;
    let counts = m.f_sum_dim_intlist(&[1i64][..], false, Kind::Double)?;
    reduce(&out.loss, &counts, reduction)
}

/// The edit loss of one batch under `objective` (a scalar with the graph).
///
/// # Errors
/// Forward errors; as [`conditional_nll`] and [`prompt_last_nll`].
pub fn batch_loss<M: CausalLm + ?Sized>(
    model: &M,
    batch: &TrainBatch,
    objective: Objective,
    reduction: TargetReduction,
) -> Result<Tensor> {
    let logits = model
        .forward_with(
            &batch.input_ids,
            Some(&batch.attention_mask),
            None,
            ForwardOptions::logits(),
        )?
        .logits
        .ok_or_else(|| Error::invalid("batch_loss", "model", "adapter returned no logits"))?;
    match objective {
        Objective::PromptLast => {
            let idx = batch
                .last_prompt
                .f_view([-1, 1, 1])?
                .f_expand([logits.size()[0], 1, logits.size()[2]], false)?;
            let last = logits.f_gather(1, &idx, false)?.f_squeeze_dim(1)?;
            prompt_last_nll(&last, &batch.targets, &batch.targets_mask, reduction)
        }
        _ => conditional_nll(&logits, &batch.input_ids, &batch.target_mask, reduction),
    }
}
