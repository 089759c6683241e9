//! The named parameters of a model.
//!
//! [`Params`] owns one handle to every parameter tensor, under its Hugging Face checkpoint key
//! (`transformer.h.0.mlp.c_proj.weight`, `model.layers.3.mlp.down_proj.weight`). The model's
//! layers hold shallow clones of the same tensors, so an in-place edit of a tensor returned here
//! (under [`tch::no_grad`]) changes the model, and device or dtype moves (which replace the data
//! with `set_data`) are seen by every handle.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// One named parameter.
#[derive(Debug)]
pub struct Parameter {
    name: String,
    tensor: Tensor,
    trainable: bool,
    layer: Option<usize>,
}

impl Parameter {
    /// The checkpoint key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor (shares storage with the model).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Whether the parameter requires gradients.
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// The block index for per-layer parameters (`None` for embeddings, final norm, LM head).
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }
}

/// The named parameters of a model, in checkpoint order.
#[derive(Debug, Default)]
pub struct Params {
    list: Vec<Parameter>,
    index: HashMap<String, usize>,
}

impl Params {
    /// Registers a parameter; `layer` is its block index, if any. New parameters are trainable.
    pub(crate) fn insert(
        &mut self,
        name: &str,
        tensor: &Tensor,
        layer: Option<usize>,
    ) -> Result<()> {
        if self.index.contains_key(name) {
            return Err(Error::invalid("Params::insert", "name", format!("duplicate `{name}`")));
        }
        let tensor = tensor.f_set_requires_grad(true)?;
        self.index.insert(name.to_string(), self.list.len());
        self.list.push(Parameter { name: name.to_string(), tensor, trainable: true, layer });
        Ok(())
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// All parameters in checkpoint order.
    pub fn iter(&self) -> impl Iterator<Item = &Parameter> {
        self.list.iter()
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Parameter> {
        self.index.get(name).map(|&i| &self.list[i])
    }

    /// The tensor called `name`, or [`Error::MissingParam`].
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .map(Parameter::tensor)
            .ok_or_else(|| Error::MissingParam { op: "Params::tensor", name: name.to_string() })
    }

    /// `(name, tensor)` pairs; the tensors share storage with the model.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.list.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    /// `(name, tensor)` pairs of the trainable parameters.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.list
            .iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect()
    }

    /// Number of scalar parameters (all, or only trainable ones).
    pub fn num_elements(&self, trainable_only: bool) -> usize {
        self.list.iter().filter(|p| p.trainable || !trainable_only).map(|p| p.tensor.numel()).sum()
    }

    /// Makes exactly the parameters for which `select` returns `true` trainable (and the others
    /// frozen) and returns how many are trainable.
    ///
    /// ```
    /// # use amend_models::{load, CausalLm, LoadOptions};
    /// # let mut model = load("tests/fixtures/models/gpt2", &LoadOptions::default())?;
    /// // Train only the MLP output projection (weight and bias) of block 1.
    /// let n = model.params_mut().set_trainable(|p| {
    ///     p.layer() == Some(1) && p.name().contains("mlp.c_proj")
    /// })?;
    /// assert_eq!(n, 2);
    /// # Ok::<(), amend_models::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Tch`] if libtorch refuses the flag.
    pub fn set_trainable(&mut self, select: impl Fn(&Parameter) -> bool) -> Result<usize> {
        let mut n = 0;
        for p in &mut self.list {
            let on = select(p);
            p.tensor = p.tensor.f_set_requires_grad(on)?;
            p.trainable = on;
            n += usize::from(on);
        }
        Ok(n)
    }

    /// Makes every parameter trainable.
    ///
    /// # Errors
    /// As [`Params::set_trainable`].
    pub fn unfreeze_all(&mut self) -> Result<()> {
        self.set_trainable(|_| true).map(|_| ())
    }

    /// Freezes every parameter.
    ///
    /// # Errors
    /// As [`Params::set_trainable`].
    pub fn freeze_all(&mut self) -> Result<()> {
        self.set_trainable(|_| false).map(|_| ())
    }

    /// Drops the gradients of all parameters.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn zero_grad(&mut self) -> Result<()> {
        for p in &mut self.list {
            let mut g = p.tensor.f_grad()?;
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Device of the parameters (that of the first one; all are kept on one device).
    pub fn device(&self) -> Device {
        self.list.first().map_or(Device::Cpu, |p| p.tensor.device())
    }

    /// Floating dtype of the parameters (that of the first one).
    pub fn kind(&self) -> Kind {
        self.list.first().and_then(|p| p.tensor.f_kind().ok()).unwrap_or(Kind::Float)
    }

    /// Moves every parameter to `device`, in place (all handles see the move).
    ///
    /// # Errors
    /// [`Error::Tch`] (e.g. the device does not exist).
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.list {
            if p.tensor.device() != device {
                let moved = p.tensor.f_to_device(device)?;
                p.tensor.f_set_data(&moved)?;
            }
        }
        Ok(())
    }

    /// Casts every parameter to the floating `kind`, in place.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a non-floating kind; [`Error::Tch`].
    pub fn to_kind(&mut self, kind: Kind) -> Result<()> {
        check_float_kind("Params::to_kind", kind)?;
        let _guard = tch::no_grad_guard();
        for p in &mut self.list {
            if p.tensor.f_kind()? != kind {
                let cast = p.tensor.f_to_kind(kind)?;
                p.tensor.f_set_data(&cast)?;
            }
        }
        Ok(())
    }

    /// Deep copies of every parameter (new storage), e.g. a snapshot to restore later with
    /// [`Params::copy_from`].
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        self.list.iter().map(|p| Ok((p.name.clone(), deep_copy(&p.tensor)?))).collect()
    }

    /// Copies values into the parameters in place, under no-grad. Every name must exist with the
    /// same shape; dtypes are converted.
    ///
    /// # Errors
    /// [`Error::MissingParam`], [`Error::ShapeMismatch`], [`Error::Tch`].
    pub fn copy_from<'a>(
        &mut self,
        values: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, src) in values {
            let i = *self.index.get(name).ok_or_else(|| Error::MissingParam {
                op: "Params::copy_from",
                name: name.to_string(),
            })?;
            let dst = &mut self.list[i].tensor;
            if dst.size() != src.size() {
                return Err(Error::ShapeMismatch {
                    op: "Params::copy_from",
                    expected: dst.size(),
                    got: src.size(),
                });
            }
            dst.f_copy_(src)?;
        }
        Ok(())
    }
}

/// A copy of `t` with its own storage, detached from any graph.
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut out = t.f_empty_like()?;
    out.f_copy_(&t.f_detach()?)?;
    Ok(out)
}

/// Errors unless `kind` is a floating dtype amend computes in.
pub(crate) fn check_float_kind(op: &'static str, kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double => Ok(()),
        other => Err(Error::invalid(
            op,
            "kind",
            format!("{other:?} is not a floating dtype (use Float, BFloat16, Half or Double)"),
        )),
    }
}
