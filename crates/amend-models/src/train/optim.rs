//! AdamW with weight-decay groups, f32 master weights for low-precision parameters, and
//! gradient-norm clipping.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::params::{Params, deep_copy};
use crate::{Error, Result};

/// Which parameters receive weight decay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DecayFilter {
    /// Every parameter.
    All,
    /// Every parameter except biases and normalisation weights (the usual choice, as in
    /// transformers' `Trainer`): names ending in `.bias`, and 1-D weights of `ln_*`, `*norm*`
    /// modules.
    #[default]
    ExcludeBiasAndNorm,
}

impl DecayFilter {
    /// Whether parameter `name` of shape `shape` is decayed.
    pub fn decays(self, name: &str, shape: &[i64]) -> bool {
        match self {
            DecayFilter::All => true,
            DecayFilter::ExcludeBiasAndNorm => {
                let norm_like = shape.len() == 1
                    && (name.contains(".ln_")
                        || name.contains("norm")
                        || name.contains("layernorm"));
                !(name.ends_with(".bias") || norm_like)
            }
        }
    }
}

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay of the decayed group.
    pub weight_decay: f64,
    /// Which parameters are decayed.
    pub decay_filter: DecayFilter,
}

impl Default for AdamWConfig {
    /// PyTorch's `AdamW` defaults (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decay_filter: DecayFilter::default(),
        }
    }
}

/// A named group of parameters sharing a weight decay.
#[derive(Debug)]
pub struct ParamGroup {
    /// Group name (`decay`, `no_decay`, or your own).
    pub name: String,
    /// Weight decay of the group.
    pub weight_decay: f64,
    /// `(name, tensor)` pairs; tensors share storage with the model.
    pub params: Vec<(String, Tensor)>,
}

#[derive(Debug)]
struct State {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// f32 copy of a bf16/f16 parameter, updated instead of it.
    master: Option<Tensor>,
}

/// AdamW (Loshchilov & Hutter, arXiv 1711.05101), step for step as `torch.optim.AdamW`
/// (`foreach=False`, `amsgrad=False`):
///
/// ```text
/// θ ← θ·(1 − lr·λ)
/// m ← β₁·m + (1 − β₁)·g            v ← β₂·v + (1 − β₂)·g²
/// θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
/// ```
///
/// Parameters stored in bf16 or f16 are updated through f32 master copies (and the optimizer
/// state is f32), so small updates are not lost to rounding. Parameters without a gradient are
/// skipped (their moments do not decay), as in PyTorch.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    state: Vec<Vec<Option<State>>>,
    step: u64,
}

impl AdamW {
    /// AdamW over the trainable parameters of `params`, in two groups: `decay` (weight decay
    /// `cfg.weight_decay`) and `no_decay` (0), split by `cfg.decay_filter`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for hyper-parameters out of range or no trainable parameter.
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let mut decay = vec![];
        let mut no_decay = vec![];
        for (name, t) in params.trainable() {
            if cfg.decay_filter.decays(&name, &t.size()) {
                decay.push((name, t))
            } else {
                no_decay.push((name, t))
            }
        }
        let groups = vec![
            ParamGroup { name: "decay".into(), weight_decay: cfg.weight_decay, params: decay },
            ParamGroup { name: "no_decay".into(), weight_decay: 0.0, params: no_decay },
        ];
        Self::with_groups(groups, cfg)
    }

    /// AdamW over explicit groups (each with its own weight decay; `cfg.weight_decay` and
    /// `cfg.decay_filter` are not used).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for hyper-parameters out of range, duplicate names or no
    /// parameter at all.
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        let op = "AdamW::new";
        for (name, v) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(op, "betas", format!("{name} = {v} is not in [0, 1)")));
            }
        }
        if cfg.eps.is_nan() || cfg.eps <= 0.0 {
            return Err(Error::invalid(op, "eps", format!("{} must be > 0", cfg.eps)));
        }
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            if g.weight_decay.is_nan() || g.weight_decay < 0.0 {
                return Err(Error::invalid(
                    op,
                    "weight_decay",
                    format!("group {}: {}", g.name, g.weight_decay),
                ));
            }
            for (n, _) in &g.params {
                if !seen.insert(n.clone()) {
                    return Err(Error::invalid(
                        op,
                        "groups",
                        format!("`{n}` is in more than one group"),
                    ));
                }
            }
        }
        if seen.is_empty() {
            return Err(Error::invalid(op, "params", "no trainable parameters"));
        }
        let state = groups.iter().map(|g| g.params.iter().map(|_| None).collect()).collect();
        Ok(AdamW { cfg, groups, state, step: 0 })
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The `(name, tensor)` pairs of every group.
    pub fn params(&self) -> impl Iterator<Item = &(String, Tensor)> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Drops all gradients.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn zero_grad(&mut self) -> Result<()> {
        for (_, p) in self.groups.iter().flat_map(|g| g.params.iter()) {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One AdamW step at learning rate `lr` with the current gradients.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a negative or non-finite `lr`; [`Error::Tch`].
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("AdamW::step", "lr", format!("{lr}")));
        }
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, (_, p)) in group.params.iter().enumerate() {
                let grad = p.f_grad()?;
                if !grad.defined() {
                    continue;
                }
                let low = !matches!(p.f_kind()?, Kind::Float | Kind::Double);
                let st = match &mut self.state[gi][pi] {
                    Some(s) => s,
                    slot @ None => {
                        let master =
                            if low { Some(p.f_detach()?.f_to_kind(Kind::Float)?) } else { None };
                        let like = master.as_ref().unwrap_or(p);
                        *slot = Some(State {
                            exp_avg: like.f_zeros_like()?,
                            exp_avg_sq: like.f_zeros_like()?,
                            master,
                        });
                        // Invariant: the slot was filled on the line above.
                        slot.as_mut().expect("state just initialised")
                    }
                };
                let g = if low { grad.f_to_kind(Kind::Float)? } else { grad };
                let mut theta = match &st.master {
                    Some(m) => m.shallow_clone(),
                    None => p.f_detach()?,
                };
                if group.weight_decay != 0.0 {
                    let _ = theta.f_mul_scalar_(1.0 - lr * group.weight_decay)?;
                }
                // Same arithmetic as torch's single-tensor AdamW, with two temporaries.
                let _ = st.exp_avg.f_lerp_(&g, 1.0 - b1)?;
                let _ = st.exp_avg_sq.f_mul_scalar_(b2)?;
                let _ = st.exp_avg_sq.f_add_(&g.f_square()?.f_mul_scalar_(1.0 - b2)?)?;
                let mut denom = st.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_div_scalar_(bc2_sqrt)?;
                let _ = denom.f_add_scalar_(eps)?;
                let _ = st.exp_avg.f_div_out(&denom, &denom)?; // denom ← m / denom
                let _ = denom.f_mul_scalar_(-step_size)?;
                let _ = theta.f_add_(&denom)?;
                if st.master.is_some() {
                    let mut target = p.f_detach()?;
                    target.f_copy_(&theta)?;
                }
            }
        }
        Ok(())
    }

    /// The optimizer state as named tensors: `step`, and `exp_avg.<param>`,
    /// `exp_avg_sq.<param>` (and `master.<param>` for low-precision parameters).
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), Tensor::f_from_slice(&[self.step as i64])?)];
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, (name, _)) in g.params.iter().enumerate() {
                if let Some(st) = &self.state[gi][pi] {
                    out.push((format!("exp_avg.{name}"), deep_copy(&st.exp_avg)?));
                    out.push((format!("exp_avg_sq.{name}"), deep_copy(&st.exp_avg_sq)?));
                    if let Some(m) = &st.master {
                        out.push((format!("master.{name}"), deep_copy(m)?));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Restores a state written by [`AdamW::state_tensors`] (e.g. from a checkpoint's
    /// `optimizer.safetensors`). Tensors are moved to each parameter's device.
    ///
    /// # Errors
    /// [`Error::MissingParam`] / [`Error::ShapeMismatch`] for a state that does not fit;
    /// [`Error::Tch`].
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let mut map: HashMap<String, Tensor> = tensors.into_iter().collect();
        let step = map
            .remove("step")
            .ok_or_else(|| Error::MissingParam { op: "AdamW::load_state", name: "step".into() })?;
        let step = step.f_int64_value(&[0])?;
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, (name, p)) in g.params.iter().enumerate() {
                let (Some(m), Some(v)) = (
                    map.remove(&format!("exp_avg.{name}")),
                    map.remove(&format!("exp_avg_sq.{name}")),
                ) else {
                    self.state[gi][pi] = None;
                    continue;
                };
                if m.size() != p.size() || v.size() != p.size() {
                    return Err(Error::ShapeMismatch {
                        op: "AdamW::load_state",
                        expected: p.size(),
                        got: m.size(),
                    });
                }
                let dev = p.device();
                let master = map
                    .remove(&format!("master.{name}"))
                    .map(|t| t.f_to_device(dev))
                    .transpose()?;
                self.state[gi][pi] = Some(State {
                    exp_avg: m.f_to_device(dev)?,
                    exp_avg_sq: v.f_to_device(dev)?,
                    master,
                });
            }
        }
        if let Some(extra) = map.keys().next() {
            return Err(Error::MissingParam {
                op: "AdamW::load_state (state for unknown parameter)",
                name: extra.clone(),
            });
        }
        self.step = step.max(0) as u64;
        Ok(())
    }

    /// Reads a state saved by [`AdamW::save`].
    ///
    /// # Errors
    /// As [`AdamW::load_state_tensors`]; [`Error::Tch`] for an unreadable file.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors = Tensor::read_safetensors(path)?;
        self.load_state_tensors(tensors)
    }

    /// Writes the state to a safetensors file.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let state = self.state_tensors()?;
        Tensor::write_safetensors(&state, path)?;
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
///
/// ```text
/// n = ‖(‖g₁‖₂, …, ‖g_k‖₂)‖₂      g_i ← g_i · min(1, max_norm / (n + 1e-6))
/// ```
///
/// A non-finite norm is returned without touching the gradients.
///
/// # Errors
/// [`Error::InvalidInput`] for a negative `max_norm`; [`Error::Tch`].
pub fn clip_grad_norm<'a>(
    params: impl IntoIterator<Item = &'a Tensor>,
    max_norm: f64,
) -> Result<f64> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid("clip_grad_norm", "max_norm", format!("{max_norm}")));
    }
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .into_iter()
        .map(|p| p.f_grad())
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms =
        grads.iter().map(|g| g.f_norm()?.f_to_kind(Kind::Double)).collect::<Result<Vec<_>, _>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?;
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for mut g in grads {
            let _ = g.f_mul_scalar_(coef)?;
        }
    }
    Ok(total)
}
