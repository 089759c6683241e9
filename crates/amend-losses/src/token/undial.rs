//! UNDIAL: self-distillation towards the reference model's distribution with the forget token's
//! logit lowered by β, so unlearning moves mass off the memorised token without pushing the
//! rest of the distribution around.
//!
//! Paper: Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
//! Large Language Models", [arXiv 2402.10052](https://arxiv.org/abs/2402.10052). Parity target:
//! `locuslab/open-unlearning` `src/trainer/utils.py::compute_undial_loss` (commit d3d7cf9,
//! line 70), `configs/trainer/UNDIAL.yaml` (β = 10).
//!
//! Relation to TNT: the target `softmax(z° − β e_y)` is TNFF's mask-and-renormalise target in the
//! limit β → ∞ and the reference itself at β = 0; it runs on the fused kernel's reference-target
//! builder ([`reference_kl_loss`], forward, `KlValue::CrossEntropy`) with the adjusted reference
//! logits.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::ceu::active_after_first;
use super::common::{
    NonFinitePolicy, TokenBackend, as_ids, check_bt, check_fits_dtype, check_logits,
    check_reduction, check_shape, count_and_check_ids,
};
use super::reference_kl::{KlValue, RefKlConfig, reference_kl_loss};
use crate::{Error, LossOutput, Reduction, Result};

/// Configuration of [`undial_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UndialConfig {
    /// How far the forget token's reference logit is lowered, β ≥ 0 (finite). Default 10.0
    /// (open-unlearning's `UNDIAL.yaml`; its class default is 1.0).
    pub beta: f64,
    /// Label value of ignored positions. Default −100.
    pub ignore_index: i64,
    /// Reduction. Default `Mean` over the active tokens.
    pub reduction: Reduction,
    /// NaN / `+inf` logits at active positions. Default: error.
    pub non_finite: NonFinitePolicy,
    /// Gradient path (the fused KL kernel on CPU f32). Default: auto.
    pub backend: TokenBackend,
}

impl Default for UndialConfig {
    fn default() -> Self {
        UndialConfig {
            beta: 10.0,
            ignore_index: -100,
            reduction: Reduction::Mean,
            non_finite: NonFinitePolicy::Error,
            backend: TokenBackend::Auto,
        }
    }
}

impl UndialConfig {
    /// Sets [`UndialConfig::beta`].
    pub fn with_beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }

    /// Sets [`UndialConfig::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`UndialConfig::backend`].
    pub fn with_backend(mut self, backend: TokenBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Checks the configuration ([`Error::InvalidConfig`]).
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::InvalidConfig {
                op: "undial_loss",
                name: "beta",
                reason: format!(
                    "must be finite and >= 0 (β → ∞ is ceu-like exclusion against the reference; \
                     use reference_kl_loss with exclude for it), got {}",
                    self.beta
                ),
            });
        }
        check_reduction("undial_loss", self.reduction)
    }
}

/// UNDIAL on the forget tokens.
///
/// ```text
/// q = softmax(z° − β e_y)            z°: the frozen reference's logits (constant)
/// ℓ = CE(q, p) = −Σ_v q_v log p_v     on active positions (label ≠ ignore_index ∧ loss_mask)
/// ∂ℓ/∂z = p − q
/// loss = mean over active tokens
/// ```
///
/// The value includes `H(q)`, as open-unlearning's `CrossEntropyLoss` with soft labels does.
/// open-unlearning averages over *every* position of the shifted batch, prompt and padding
/// included, and its `−100` labels lower the logit of vocabulary entry `V − 100` there (negative
/// indexing); amend averages over the labelled positions only. The two agree when every position
/// is labelled (the fixtures check that case).
///
/// Memory: one `[B, T, V]` f32 copy of the reference logits holds the adjusted target logits;
/// the loss itself runs on the fused kernel without `[N, V]` temporaries.
///
/// # Metrics
///
/// `kl` (the mean value) and `ref_kl/top1_agreement`, from [`reference_kl_loss`].
///
/// # Shapes
///
/// `logits`, `ref_logits`: `[B, T, V]`, aligned with `labels [B, T]` (already shifted);
/// `loss_mask` optional `[B, T]`; output per [`Reduction`], one part `"tokens"`.
///
/// # Errors
///
/// As [`reference_kl_loss`], and [`Error::InvalidConfig`] for a negative or non-finite β (or one
/// f32 cannot hold).
///
/// # Example
///
/// ```
/// use amend_losses::token::{UndialConfig, undial_loss};
/// use tch::Tensor;
///
/// // Reference logits 0 everywhere, β = ln 2 on label 0: q ∝ (1/2, 1, 1) = (1/5, 2/5, 2/5).
/// let z = Tensor::from_slice(&[0.0f64, 0.0, 0.0]).reshape([1, 1, 3]);
/// let labels = Tensor::from_slice(&[0i64]).reshape([1, 1]);
/// let cfg = UndialConfig::default().with_beta(2f64.ln());
/// let out = undial_loss(&z, &z, &labels, None, &cfg)?;
/// assert!((out.loss.double_value(&[]) - 3f64.ln()).abs() < 1e-12); // −Σ q log(1/3)
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn undial_loss(
    logits: &Tensor,
    ref_logits: &Tensor,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &UndialConfig,
) -> Result<LossOutput> {
    const OP: &str = "undial_loss";
    cfg.validate()?;
    let (dims, kind) = check_logits(OP, logits)?;
    check_fits_dtype(OP, "beta", cfg.beta, kind)?;
    let device = logits.device();
    check_shape(OP, "ref_logits", ref_logits, &logits.size(), "the shape of logits", device)?;
    check_bt(OP, "labels", labels, dims, device)?;
    if let Some(m) = loss_mask {
        check_bt(OP, "loss_mask", m, dims, device)?;
    }
    let active = active_after_first(OP, labels, loss_mask, cfg.ignore_index, 0)?;
    let ids = as_ids(OP, "labels", labels)?;
    // Only active labels are read; they must be token ids.
    count_and_check_ids(OP, "labels", &ids, &active, dims.v)?;
    let compute = if ref_logits.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let shift = active.f_to_kind(compute)?.f_mul_scalar(-cfg.beta)?.f_unsqueeze(-1)?;
    let idx = ids.f_clamp(0, dims.v - 1)?.f_unsqueeze(-1)?;
    let adjusted = ref_logits.f_detach()?.f_to_kind(compute)?.f_scatter_add(-1, &idx, &shift)?;
    let rk = RefKlConfig {
        value: KlValue::CrossEntropy,
        reduction: cfg.reduction,
        non_finite: cfg.non_finite,
        backend: cfg.backend,
        ..RefKlConfig::default()
    };
    reference_kl_loss(logits, &adjusted, None, Some(&active), &rk)
}
