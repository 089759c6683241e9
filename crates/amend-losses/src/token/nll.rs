//! Plain and conditional negative log-likelihood (token cross-entropy).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{SelectedLogpConfig, SelectedLogpOut};

use super::common::{
    MetricSink, NonFinitePolicy, Plan, TokenBackend, as_ids, as_mask, check_bt, check_logits,
    check_overflow, check_reduction, count_and_check_ids, finish, masked_sum, token_losses,
};
use super::kernel::{self, argmax, fused, inject, row_scale, threads};
use super::rows::{RowLoss, Rows, eval_rows, minus_onehot};
use crate::bridge::CpuSlice;
use crate::{LossOutput, Reduction, Result};

/// Configuration of [`nll_loss`] and [`conditional_nll_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NllConfig {
    /// Label value that marks a position as ignored (default −100, as PyTorch and TRL).
    pub ignore_index: i64,
    /// Reduction (default `Mean` over the active tokens).
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions (default: error).
    pub non_finite: NonFinitePolicy,
    /// Gradient path (default: automatic).
    pub backend: TokenBackend,
}

impl Default for NllConfig {
    fn default() -> Self {
        NllConfig {
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl NllConfig {
    /// Sets [`NllConfig::ignore_index`].
    pub fn with_ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Sets [`NllConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`NllConfig::non_finite`].
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Sets [`NllConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        check_reduction("nll_loss", self.reduction)
    }
}

/// `−log p_y`, gradient `p − e_y`.
pub(crate) struct NllRows;

impl RowLoss for NllRows {
    fn composite(&self, rows: &Rows) -> Result<Tensor> {
        Ok(rows.log_probs()?.at(&rows.labels)?.f_neg()?)
    }

    fn closed_form(&self, rows: &Rows, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
        let lp = rows.log_probs()?;
        let value = lp.at(&rows.labels)?.f_neg()?;
        let grad = if want_grad { Some(minus_onehot(&lp.p()?, &rows.labels)?) } else { None };
        Ok((value, grad))
    }
}

/// TRL-named NLL diagnostics: `mean_token_accuracy` (argmax = label) over the active tokens.
///
/// TRL's `entropy` is not computed: it costs two more passes over `[n, V]` than the loss
/// itself.
pub(crate) fn nll_metrics(rows: &Rows, sink: &mut MetricSink) -> Result<()> {
    let count = rows.z.size()[0] as f64;
    let hit = rows.z.f_argmax(-1, false)?.f_eq_tensor(&rows.labels)?;
    sink.add("mean_token_accuracy", &hit.f_sum(Kind::Float)?, count)
}

/// The active mask of the NLL family: `label ≠ ignore_index ∧ loss_mask`.
fn nll_active(
    op: &'static str,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    ignore_index: i64,
) -> Result<Tensor> {
    let mut active = labels.f_ne(ignore_index)?;
    if let Some(m) = loss_mask {
        active = active.f_logical_and(&as_mask(op, "loss_mask", m)?)?;
    }
    Ok(active)
}

fn plan_nll(
    op: &'static str,
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &NllConfig,
) -> Result<Plan> {
    cfg.validate()?;
    let (dims, kind) = check_logits(op, logits)?;
    let device = logits.device();
    check_bt(op, "labels", labels, dims, device)?;
    if let Some(m) = loss_mask {
        check_bt(op, "loss_mask", m, dims, device)?;
    }
    let labels = as_ids(op, "labels", labels)?;
    let active = nll_active(op, &labels, loss_mask, cfg.ignore_index)?;
    let count = count_and_check_ids(op, "labels", &labels, &active, dims.v)?;
    Plan::new(dims, kind, labels, active, count)
}

/// [`nll_loss`] on the fused selected-token kernel; `None`: a row was rejected as non-finite,
/// take the composite path.
fn nll_kernel(
    op: &'static str,
    plan: &Plan,
    logits: &Tensor,
    cfg: &NllConfig,
) -> Result<Option<LossOutput>> {
    let scale = row_scale(&plan.active)?;
    let s = CpuSlice::<f32>::strict(&scale, op, "row_scale")?;
    let y = CpuSlice::<i64>::new(&plan.labels, op, "labels")?;
    let kcfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(threads());
    let Some(fused) = fused(op, logits, |io, vocab, loss| {
        let out = SelectedLogpOut::new(loss);
        amend_kernels::selected_logp(io, vocab, y.as_slice(), Some(s.as_slice()), &kcfg, out)
    })?
    else {
        return Ok(None);
    };
    let tok = inject(logits, &fused, &plan.active, plan.count, cfg.reduction)?;
    let mut sink = MetricSink::default();
    let hit = argmax(logits)?.f_eq_tensor(&plan.labels)?.f_to_kind(Kind::Float)?;
    sink.add("mean_token_accuracy", &masked_sum(&hit, &plan.active)?, plan.count as f64)?;
    check_overflow(op, &tok, cfg.non_finite, &[logits])?;
    finish(op, tok, plan.count, cfg.reduction, sink.finish()?).map(Some)
}

/// Token negative log-likelihood (cross-entropy with hard labels).
///
/// ```text
/// ℓ[b,t] = −log softmax(z[b,t])_y      on active positions (label ≠ ignore_index ∧ loss_mask)
/// ∂ℓ/∂z  = p − e_y
/// ```
///
/// No label smoothing and no z-loss. This is also the positive-position term of TNFLL, NL and
/// UL-annotated. For the conditional (prompt-masked) form see [`conditional_nll_loss`].
///
/// # Metrics
///
/// `mean_token_accuracy` (TRL's SFT name), over the active tokens.
///
/// # Shapes
///
/// * `logits`: `[B, T, V]`, f16 / bf16 / f32 / f64, aligned with `labels` (already shifted).
/// * `labels`: `[B, T]`, integer; `ignore_index` marks ignored positions.
/// * `loss_mask`: optional `[B, T]` bool (or integer 0/1); `false` excludes a position.
///
/// # Errors
///
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch),
/// [`Error::DtypeMismatch`](crate::Error::DtypeMismatch),
/// [`Error::DeviceMismatch`](crate::Error::DeviceMismatch),
/// [`Error::VocabTooSmall`](crate::Error::VocabTooSmall),
/// [`Error::LabelOutOfRange`](crate::Error::LabelOutOfRange) (at active positions),
/// [`Error::NonFiniteLogits`](crate::Error::NonFiniteLogits).
///
/// # Example
///
/// ```
/// use amend_losses::token::{NllConfig, nll_loss};
/// use tch::Tensor;
///
/// let logits = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 2.0, 0.0, 0.0]).reshape([1, 2, 3]);
/// let labels = Tensor::from_slice(&[1i64, -100]).reshape([1, 2]);
/// let out = nll_loss(&logits, &labels, None, &NllConfig::default())?;
/// assert!((out.loss.double_value(&[]) - 3f64.ln()).abs() < 1e-6);
/// assert_eq!(out.count(), 1.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn nll_loss(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &NllConfig,
) -> Result<LossOutput> {
    const OP: &str = "nll_loss";
    let plan = plan_nll(OP, logits, labels, loss_mask, cfg)?;
    if kernel::use_kernel(OP, cfg.backend, logits)?
        && let Some(out) = nll_kernel(OP, &plan, logits, cfg)?
    {
        return Ok(out);
    }
    let prep = plan.select(OP, logits, None, cfg.non_finite)?;
    let mut sink = MetricSink::default();
    let row_loss =
        eval_rows(&NllRows, &prep.rows, cfg.backend, &mut |rows, _| nll_metrics(rows, &mut sink))?;
    let tok = token_losses(&prep, &row_loss)?;
    check_overflow(OP, &tok, cfg.non_finite, &[logits])?;
    finish(OP, tok, prep.count, cfg.reduction, sink.finish()?)
}

/// Conditional NLL: the NLL of the response given the prompt, with prompt positions masked.
///
/// ```text
/// ℓ[b,t] = −log p(y_t | y_<t)   where ¬prompt_mask[b,t] ∧ label ≠ ignore_index, else 0
/// ```
///
/// `prompt_mask[b, t]` is true where `labels[b, t]` belongs to the prompt (after shifting, the
/// label at position `t` is the token the logits at `t` predict). Build the mask from positions
/// (prompt lengths), never from token values. Equivalent to [`nll_loss`] with
/// `loss_mask = ¬prompt_mask`.
///
/// # Shapes
///
/// As [`nll_loss`], with `prompt_mask: [B, T]` bool (or integer 0/1).
///
/// # Errors
///
/// As [`nll_loss`].
///
/// # Example
///
/// ```
/// use amend_losses::token::{NllConfig, conditional_nll_loss};
/// use tch::Tensor;
///
/// let logits = Tensor::zeros([1, 3, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let labels = Tensor::from_slice(&[5i64, 1, 2]).reshape([1, 3]); // 5: a prompt id, never read
/// let prompt = Tensor::from_slice(&[true, false, false]).reshape([1, 3]);
/// let out = conditional_nll_loss(&logits, &labels, &prompt, &NllConfig::default())?;
/// assert!((out.loss.double_value(&[]) - 4f64.ln()).abs() < 1e-6);
/// assert_eq!(out.count(), 2.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn conditional_nll_loss(
    logits: &Tensor,
    labels: &Tensor,
    prompt_mask: &Tensor,
    cfg: &NllConfig,
) -> Result<LossOutput> {
    const OP: &str = "conditional_nll_loss";
    let (dims, _) = check_logits(OP, logits)?;
    check_bt(OP, "prompt_mask", prompt_mask, dims, logits.device())?;
    let response = as_mask(OP, "prompt_mask", prompt_mask)?.f_logical_not()?;
    nll_loss(logits, labels, Some(&response), cfg)
}

/// The `count` of [`nll_loss`]: the number of positions with `label ≠ ignore_index` and
/// `loss_mask` set. Depends only on labels and masks (no logits), so a trainer can all-reduce it
/// before the forward pass.
///
/// # Errors
///
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if `loss_mask` differs from `labels` in
/// shape, [`Error::DtypeMismatch`](crate::Error::DtypeMismatch) for non-integer labels or a float
/// mask.
///
/// # Example
///
/// ```
/// use amend_losses::token::count_active_nll;
/// use tch::Tensor;
///
/// let labels = Tensor::from_slice(&[3i64, -100, 2, 7]).reshape([2, 2]);
/// let mask = Tensor::from_slice(&[true, true, false, true]).reshape([2, 2]);
/// assert_eq!(count_active_nll(&labels, Some(&mask), -100)?, 2.0);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn count_active_nll(
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    ignore_index: i64,
) -> Result<f64> {
    const OP: &str = "count_active_nll";
    let labels = as_ids(OP, "labels", labels)?;
    if let Some(m) = loss_mask {
        super::common::check_shape(
            OP,
            "loss_mask",
            m,
            &labels.size(),
            "the shape of labels",
            labels.device(),
        )?;
    }
    let active = nll_active(OP, &labels, loss_mask, ignore_index)?;
    Ok(i64::try_from(&active.f_sum(Kind::Int64)?)? as f64)
}
