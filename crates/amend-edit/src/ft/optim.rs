//! The optimizer of fine-tuning edits: AdamW or SGD with f32 master weights for low-precision
//! parameters (FT-3) and the L∞ norm box of EasyEdit (FT-5).

use tch::{Kind, Tensor};

use super::recipe::{OptimizerConfig, OptimizerKind};
use crate::util::deep_copy;
use crate::{Error, Result};

#[derive(Debug)]
struct State {
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    /// f32 copy of a bf16/f16 parameter; the update runs on it and the parameter is re-rounded
    /// from it after every step.
    master: Option<Tensor>,
    /// f32 value before the edit (centre of the norm box).
    origin: Option<Tensor>,
}

/// AdamW / SGD over named parameters, updated in f32.
///
/// ```text
/// AdamW:  θ ← θ(1 − lr·λ);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
///         θ ← θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)               (torch.optim.AdamW)
/// SGD:    θ ← θ(1 − lr·λ) − lr·g
/// box:    θ ← clamp(θ, θ₀ − ε, θ₀ + ε)                              (optional, θ₀ = start value)
/// ```
///
/// Parameters stored in bf16 or f16 get an f32 master copy: the update (and the box) act on the
/// master and the stored weight is re-rounded from it after each step (round to nearest even),
/// so updates far below the storage precision accumulate instead of being rounded away (DF3).
#[derive(Debug)]
pub struct EditOptimizer {
    cfg: OptimizerConfig,
    params: Vec<(String, Tensor)>,
    state: Vec<State>,
    norm_box: Option<f64>,
    steps: u64,
}

impl EditOptimizer {
    /// An optimizer over `params` (tensors sharing storage with the model; they must require
    /// gradients). `norm_box` keeps every parameter within `ε` of its value now.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for no parameters or a non-floating parameter; [`Error::Tch`].
    pub fn new(
        params: Vec<(String, Tensor)>,
        cfg: OptimizerConfig,
        norm_box: Option<f64>,
    ) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::invalid("EditOptimizer::new", "params", "no parameters"));
        }
        let mut state = Vec::with_capacity(params.len());
        for (name, p) in &params {
            if !p.f_is_floating_point()? {
                return Err(Error::invalid(
                    "EditOptimizer::new",
                    name.clone(),
                    "not a floating tensor",
                ));
            }
            let low = !matches!(p.f_kind()?, Kind::Float | Kind::Double);
            let master = if low { Some(p.f_detach()?.f_to_kind(Kind::Float)?) } else { None };
            let origin = match norm_box {
                Some(_) => Some(match &master {
                    Some(m) => deep_copy(m)?,
                    None => deep_copy(p)?,
                }),
                None => None,
            };
            state.push(State { exp_avg: None, exp_avg_sq: None, master, origin });
        }
        Ok(EditOptimizer { cfg, params, state, norm_box, steps: 0 })
    }

    /// The parameters.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Drops all gradients.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn zero_grad(&mut self) -> Result<()> {
        for (_, p) in &self.params {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// The global L2 norm of the gradients (f64).
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0.0f64;
        for (_, p) in &self.params {
            let g = p.f_grad()?;
            if g.defined() {
                let n = g.f_to_kind(Kind::Double)?.f_norm()?.f_double_value(&[])?;
                sq += n * n;
            }
        }
        Ok(sq.sqrt())
    }

    /// Scales every gradient by `factor` (gradient clipping).
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn scale_grads(&mut self, factor: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (_, p) in &self.params {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_mul_scalar_(factor)?;
            }
        }
        Ok(())
    }

    /// One step at learning rate `lr` with the current gradients (parameters without a gradient
    /// are skipped).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a negative or non-finite `lr`; [`Error::Tch`].
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("EditOptimizer::step", "lr", format!("{lr}")));
        }
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let c = &self.cfg;
        let (b1, b2, eps, wd) = (c.beta1, c.beta2, c.eps, c.weight_decay);
        for ((_, p), st) in self.params.iter().zip(self.state.iter_mut()) {
            let grad = p.f_grad()?;
            if !grad.defined() {
                continue;
            }
            let g = if st.master.is_some() { grad.f_to_kind(Kind::Float)? } else { grad };
            let mut theta = match &st.master {
                Some(m) => m.shallow_clone(),
                None => p.f_detach()?,
            };
            if wd != 0.0 {
                let _ = theta.f_mul_scalar_(1.0 - lr * wd)?;
            }
            match c.kind {
                OptimizerKind::Sgd => {
                    let _ = theta.f_sub_(&g.f_mul_scalar(lr)?)?;
                }
                _ => {
                    let m = match &mut st.exp_avg {
                        Some(m) => m,
                        slot @ None => slot.insert(theta.f_zeros_like()?),
                    };
                    let v = match &mut st.exp_avg_sq {
                        Some(v) => v,
                        slot @ None => slot.insert(theta.f_zeros_like()?),
                    };
                    let bc1 = 1.0 - b1.powi(t);
                    let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
                    let _ = m.f_lerp_(&g, 1.0 - b1)?;
                    let _ = v.f_mul_scalar_(b2)?;
                    let _ = v.f_add_(&g.f_square()?.f_mul_scalar_(1.0 - b2)?)?;
                    let mut denom = v.f_sqrt()?;
                    let _ = denom.f_div_scalar_(bc2_sqrt)?;
                    let _ = denom.f_add_scalar_(eps)?;
                    let _ = m.f_div_out(&denom, &denom)?;
                    let _ = denom.f_mul_scalar_(-lr / bc1)?;
                    let _ = theta.f_add_(&denom)?;
                }
            }
            if let (Some(e), Some(o)) = (self.norm_box, &st.origin) {
                let lo = o.f_sub_scalar(e)?;
                let hi = o.f_add_scalar(e)?;
                let clamped = theta.f_clamp_tensor(Some(&lo), Some(&hi))?;
                theta.f_copy_(&clamped)?;
            }
            if st.master.is_some() {
                let mut target = p.f_detach()?;
                target.f_copy_(&theta)?;
            }
        }
        Ok(())
    }
}
