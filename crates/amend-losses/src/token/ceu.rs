//! CE-U (cross-entropy unlearning): the cross-entropy between the model and its own detached
//! distribution with the label's logit set to −∞, i.e. the model's mass moved off the label
//! and renormalised over the other tokens.
//!
//! Paper: Yang et al., "CE-U: Cross Entropy Unlearning", [arXiv 2503.01224](https://arxiv.org/abs/2503.01224).
//! Parity target: `locuslab/open-unlearning` `src/trainer/unlearn/ceu.py`
//! (`cross_entropy_unlearning_loss`, `compute_batch_ceu` with `ignore_first_n_answer_tokens = 1`,
//! commit d3d7cf9).
//!
//! Relation to TNT: the target is TNFF's mask-and-renormalise target `q_v ∝ p_v (v ≠ y)`, built
//! from the model itself instead of a frozen reference. It runs on the same fused kernel target
//! builder ([`reference_kl_loss`] with `exclude = y`, `KlValue::CrossEntropy`), with the detached
//! logits as the reference.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::common::{
    NonFinitePolicy, TokenBackend, as_ids, as_mask, check_bt, check_logits, check_reduction,
};
use super::reference_kl::{KlValue, RefKlConfig, reference_kl_loss};
use crate::{LossOutput, Reduction, Result};

/// Configuration of [`ceu_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CeuConfig {
    /// Leave out the first `n` labelled positions of each row (the paper's footnote: the first
    /// answer token carries the question's information). Default 1 (open-unlearning).
    pub ignore_first_n_answer_tokens: usize,
    /// Label value of ignored positions. Default −100.
    pub ignore_index: i64,
    /// Reduction. Default `Mean` over the active tokens.
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions. Default: error.
    pub non_finite: NonFinitePolicy,
    /// Gradient path (the fused KL kernel on CPU f32). Default: auto.
    pub backend: TokenBackend,
}

impl Default for CeuConfig {
    fn default() -> Self {
        CeuConfig {
            ignore_first_n_answer_tokens: 1,
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl CeuConfig {
    /// Sets [`CeuConfig::ignore_first_n_answer_tokens`].
    pub fn with_ignore_first_n_answer_tokens(mut self, n: usize) -> Self {
        self.ignore_first_n_answer_tokens = n;
        self
    }

    /// Sets [`CeuConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`CeuConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`crate::Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        check_reduction("ceu_loss", self.reduction)
    }
}

/// The active positions of `labels` (≠ `ignore`, and `loss_mask`) without the first `skip`
/// active positions of each row.
pub(crate) fn active_after_first(
    op: &'static str,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    ignore: i64,
    skip: usize,
) -> Result<Tensor> {
    let ids = as_ids(op, "labels", labels)?;
    let mut active = ids.f_ne(ignore)?;
    if let Some(m) = loss_mask {
        active = active.f_logical_and(&as_mask(op, "loss_mask", m)?)?;
    }
    if skip > 0 {
        let pos = active.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?;
        active = active.f_logical_and(&pos.f_gt(skip as i64)?)?;
    }
    Ok(active)
}

/// Cross-entropy unlearning on the forget tokens.
///
/// ```text
/// q_v = exp(z̄_v − LSE_{u≠y}(z̄)) for v ≠ y,  q_y = 0       z̄ = z detached (the model itself)
/// ℓ   = CE(q, p) = −Σ_v q_v log p_v                          on active positions
/// ∂ℓ/∂z = p − q
/// active: label ≠ ignore_index ∧ loss_mask, minus the first `ignore_first_n_answer_tokens`
///         active positions of each row
/// loss = mean over active tokens
/// ```
///
/// The value includes the target's entropy `H(q)` (as open-unlearning's `F.cross_entropy` with
/// soft targets does); the gradient is that of `KL(q ‖ p)`. A row where the model already puts
/// all its mass on `y` has the uniform-over-the-rest target (masked log-sum-exp, no NaN).
///
/// # Metrics
///
/// `kl` (the mean value, as reported) and `ref_kl/top1_agreement` (fraction of active tokens
/// whose argmax is already the target's, i.e. not `y`), from [`reference_kl_loss`].
///
/// # Shapes
///
/// `logits [B, T, V]` aligned with `labels [B, T]` (already shifted), `loss_mask` optional
/// `[B, T]`; output per [`Reduction`], one part `"tokens"`.
///
/// # Errors
///
/// As [`reference_kl_loss`].
///
/// # Example
///
/// ```
/// use amend_losses::token::{CeuConfig, ceu_loss};
/// use tch::Tensor;
///
/// // Three equal logits, label 0: q = (0, 1/2, 1/2), p = 1/3 each, CE = log 3.
/// let logits = Tensor::from_slice(&[0.0f64, 0.0, 0.0]).reshape([1, 1, 3]);
/// let labels = Tensor::from_slice(&[0i64]).reshape([1, 1]);
/// let cfg = CeuConfig::default().with_ignore_first_n_answer_tokens(0);
/// let out = ceu_loss(&logits, &labels, None, &cfg)?;
/// assert!((out.loss.double_value(&[]) - 3f64.ln()).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn ceu_loss(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &CeuConfig,
) -> Result<LossOutput> {
    const OP: &str = "ceu_loss";
    cfg.validate()?;
    let (dims, _) = check_logits(OP, logits)?;
    check_bt(OP, "labels", labels, dims, logits.device())?;
    if let Some(m) = loss_mask {
        check_bt(OP, "loss_mask", m, dims, logits.device())?;
    }
    let active = active_after_first(
        OP,
        labels,
        loss_mask,
        cfg.ignore_index,
        cfg.ignore_first_n_answer_tokens,
    )?;
    let exclude = as_ids(OP, "labels", labels)?.f_where_scalarother(&active, -1)?;
    let rk = RefKlConfig {
        value: KlValue::CrossEntropy,
        reduction: cfg.reduction,
        non_finite: cfg.non_finite,
        backend: cfg.backend,
        ..RefKlConfig::default()
    };
    reference_kl_loss(logits, &logits.f_detach()?, Some(&exclude), Some(&active), &rk)
}
