//! RMU (representation misdirection for unlearning): on the forget data, push one layer's hidden
//! states towards a fixed random direction scaled by a steering coefficient; on the retain data,
//! keep that layer's hidden states where the frozen model has them.
//!
//! Paper: Li et al., "The WMDP Benchmark" §5 ([arXiv 2403.03218](https://arxiv.org/abs/2403.03218)),
//! reference code `centerforaisafety/wmdp rmu/unlearn.py`. Parity target:
//! `locuslab/open-unlearning` `src/trainer/unlearn/rmu.py` (`compute_activation_loss`,
//! `get_control_vector`, `retain_loss_type: EMBED_DIFF`; commit d3d7cf9) and
//! `configs/trainer/RMU.yaml` (steering coefficient 2, γ = α = 1, layer 7).
//!
//! Which layer and which parameters are trained is the caller's choice (the reference trains
//! layers ℓ−2..ℓ's MLP down-projections; open-unlearning's YAML trains everything); hidden states
//! come from the model adapters (`amend_models::CausalLm::forward_hidden`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::common::{cfg, check_device, check_float, check_rank, check_shape, with_setters};
use super::seq_logps::EmptyPolicy;
use crate::{Error, LossOutput, LossPart, Metrics, Reduction, Result};

/// Configuration of [`rmu_loss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmuConfig {
    /// Weight γ ≥ 0 of the forget (misdirection) term. Default 1.0.
    #[serde(alias = "gamma")]
    pub forget_weight: f64,
    /// Weight α ≥ 0 of the retain (representation-preservation) term. Default 1.0.
    #[serde(alias = "alpha")]
    pub retain_weight: f64,
    /// Sequences without an active token. Default [`EmptyPolicy::Error`] (open-unlearning divides
    /// by their count, 0, and gets NaN).
    pub empty_policy: EmptyPolicy,
    /// `Mean` (default): the mean over sequences of each term, weighted and summed.
    pub reduction: Reduction,
}

impl Default for RmuConfig {
    fn default() -> Self {
        Self {
            forget_weight: 1.0,
            retain_weight: 1.0,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(RmuConfig {
    with_forget_weight => forget_weight: f64,
    with_retain_weight => retain_weight: f64,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl RmuConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        cfg::nonnegative("rmu_loss", "forget_weight", self.forget_weight)?;
        cfg::nonnegative("rmu_loss", "retain_weight", self.retain_weight)?;
        match self.reduction {
            Reduction::Mean | Reduction::Sum | Reduction::None | Reduction::PerSequence => Ok(()),
            other => Err(Error::InvalidConfig {
                op: "rmu_loss",
                name: "reduction",
                reason: format!("{other:?} is not supported (use mean, sum or per_sequence)"),
            }),
        }
    }
}

/// RMU's control vector `c · u / ‖u‖` with `u ~ U[0, 1)^D` from tch's generator (seed it with
/// `tch::manual_seed` for a reproducible direction), as the reference draws it once per run.
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a non-finite or negative coefficient or `dim = 0`.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::rmu_control_vector;
/// use tch::{Device, Kind};
///
/// tch::manual_seed(0);
/// let u = rmu_control_vector(16, 6.5, Kind::Float, Device::Cpu)?;
/// assert!((u.norm().double_value(&[]) - 6.5).abs() < 1e-5);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn rmu_control_vector(
    dim: i64,
    steering_coeff: f64,
    kind: Kind,
    device: tch::Device,
) -> Result<Tensor> {
    cfg::nonnegative("rmu_control_vector", "steering_coeff", steering_coeff)?;
    if dim <= 0 {
        return Err(Error::InvalidConfig {
            op: "rmu_control_vector",
            name: "dim",
            reason: format!("must be > 0, got {dim}"),
        });
    }
    let u = Tensor::f_rand([dim], (kind, device))?;
    Ok(u.f_div(&u.f_norm()?)?.f_mul_scalar(steering_coeff)?)
}

/// `m_b = Σ_t mask_bt · mean_d (h_btd − target_btd)² / Σ_t mask_bt`, per sequence; validity.
fn activation_mse(
    op: &'static str,
    name: &'static str,
    h: &Tensor,
    target: &Tensor,
    mask: &Tensor,
    policy: EmptyPolicy,
) -> Result<(Tensor, Tensor)> {
    let m = super::common::bool_mask(op, name, mask)?;
    let per_tok = h.f_sub(target)?.f_square()?.f_mean_dim([-1i64].as_slice(), false, h.kind())?;
    let per_tok = per_tok.f_where_scalarother(&m, 0.0)?;
    let n = m.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?;
    let valid = n.f_gt(0)?;
    if policy == EmptyPolicy::Error
        && let Some((index, _)) = super::common::first_true(&valid.f_logical_not()?)?
    {
        return Err(Error::EmptySequence { op, index: index[0] });
    }
    let sums = per_tok.f_sum_dim_intlist([1i64].as_slice(), false, h.kind())?;
    let per_seq =
        sums.f_div(&n.f_clamp_min(1)?.f_to_kind(h.kind())?)?.f_where_scalarother(&valid, 0.0)?;
    Ok((per_seq, valid))
}

/// RMU on one layer's hidden states.
///
/// ```text
/// mse(h, t)_b = Σ_t m_bt · mean_d (h_btd − t_btd)² / Σ_t m_bt          per sequence
/// forget = mean_b mse(h^f, c·u)_b        h^f: the policy's hidden states on the forget batch
/// retain = mean_b mse(h^r, h°^r)_b       h°^r: the frozen model's, on the retain batch (constant)
/// loss   = γ · forget + α · retain
/// ```
///
/// `m` is the label mask of each batch (open-unlearning: `labels != −100`). Parts: `"forget"`
/// (count = valid forget sequences, weight γ) and `"retain"` (count = valid retain sequences,
/// weight α). `per_example` holds the forget term per sequence.
///
/// # Shapes
///
/// * `forget_hidden`: `[B, T, D]` float (on the autograd graph); `forget_mask`: `[B, T]` bool or
///   0/1; `control`: `[D]` (from [`rmu_control_vector`]; constant).
/// * `retain`: optional `(hidden [B', T', D], ref_hidden [B', T', D], mask [B', T'])`.
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::ShapeMismatch`], [`Error::DtypeMismatch`],
/// [`Error::DeviceMismatch`], [`Error::EmptySequence`] for a sequence without active tokens
/// under [`EmptyPolicy::Error`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{rmu_loss, RmuConfig};
/// use tch::Tensor;
///
/// let h = Tensor::from_slice(&[1.0f64, 1.0, 3.0, 3.0]).view([1, 2, 2]).set_requires_grad(true);
/// let mask = Tensor::from_slice(&[true, true]).view([1, 2]);
/// let c = Tensor::from_slice(&[1.0f64, 1.0]);
/// let out = rmu_loss(&h, &mask, &c, None, &RmuConfig::default())?;
/// assert_eq!(out.loss.double_value(&[]), 2.0); // (0 + 4) / 2 tokens
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn rmu_loss(
    forget_hidden: &Tensor,
    forget_mask: &Tensor,
    control: &Tensor,
    retain: Option<(&Tensor, &Tensor, &Tensor)>,
    cfg: &RmuConfig,
) -> Result<LossOutput> {
    const OP: &str = "rmu_loss";
    cfg.validate()?;
    check_rank(OP, "forget_hidden", forget_hidden, 3, "[B, T, D]")?;
    check_float(OP, "forget_hidden", forget_hidden)?;
    let s = forget_hidden.size();
    let (b, t, d) = (s[0], s[1], s[2]);
    let device = forget_hidden.device();
    let kind = super::common::compute_kind(forget_hidden.kind());
    check_shape(OP, "forget_mask", forget_mask, &[b, t], || format!("[B, T] = [{b}, {t}]"))?;
    check_device(OP, "forget_mask", forget_mask, device)?;
    check_shape(OP, "control", control, &[d], || format!("[D] = [{d}]"))?;
    check_device(OP, "control", control, device)?;
    check_float(OP, "control", control)?;
    let hf = forget_hidden.f_to_kind(kind)?;
    let target = control.f_detach()?.f_to_kind(kind)?.f_view([1, 1, d])?.f_expand_as(&hf)?;
    let (forget, fvalid) =
        activation_mse(OP, "forget_mask", &hf, &target, forget_mask, cfg.empty_policy)?;
    let fcount = i64::try_from(fvalid.f_sum(Kind::Int64)?)? as f64;
    let mut metrics = Metrics::new();
    let fsum = forget.f_sum(kind)?;
    metrics.add("forget_loss", f64::try_from(&fsum.f_detach()?)?, fcount);
    let mut parts =
        vec![LossPart { name: "forget", sum: fsum, count: fcount, weight: cfg.forget_weight }];
    if let Some((hr, hr_ref, mr)) = retain {
        check_rank(OP, "retain_hidden", hr, 3, "[B', T', D]")?;
        check_float(OP, "retain_hidden", hr)?;
        let rs = hr.size();
        check_shape(OP, "retain_hidden", hr, &[rs[0], rs[1], d], || {
            format!("[B', T', D] with D = {d}")
        })?;
        check_shape(OP, "retain_ref_hidden", hr_ref, &rs, || {
            format!("{rs:?}, the shape of retain_hidden")
        })?;
        check_shape(OP, "retain_mask", mr, &[rs[0], rs[1]], || {
            format!("[B', T'] = [{}, {}]", rs[0], rs[1])
        })?;
        for (name, x) in [("retain_hidden", hr), ("retain_ref_hidden", hr_ref), ("retain_mask", mr)]
        {
            check_device(OP, name, x, device)?;
        }
        check_float(OP, "retain_ref_hidden", hr_ref)?;
        let (ret, rvalid) = activation_mse(
            OP,
            "retain_mask",
            &hr.f_to_kind(kind)?,
            &hr_ref.f_detach()?.f_to_kind(kind)?,
            mr,
            cfg.empty_policy,
        )?;
        let rcount = i64::try_from(rvalid.f_sum(Kind::Int64)?)? as f64;
        let rsum = ret.f_sum(kind)?;
        metrics.add("retain_loss", f64::try_from(&rsum.f_detach()?)?, rcount);
        parts.push(LossPart {
            name: "retain",
            sum: rsum,
            count: rcount,
            weight: cfg.retain_weight,
        });
    }
    let loss = match cfg.reduction {
        Reduction::None | Reduction::PerSequence => forget.shallow_clone(),
        _ => {
            let mut total = Tensor::f_zeros([], (kind, device))?;
            for p in &parts {
                let scale = match cfg.reduction {
                    Reduction::Sum => p.weight,
                    _ if p.count == 0.0 => 0.0,
                    _ => p.weight / p.count,
                };
                total = total.f_add(&p.sum.f_mul_scalar(scale)?)?;
            }
            total
        }
    };
    Ok(LossOutput { loss, per_example: forget, parts, metrics })
}
