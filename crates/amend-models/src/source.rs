//! Where the weights of a model being built come from: a checkpoint, a seeded random
//! initialisation, or another model (deep copy).

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, Normal};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::CheckpointReader;
use crate::params::{Params, deep_copy};
use crate::{Error, Result};

/// How a parameter is initialised when it is created rather than loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// A provider of parameter tensors by name.
pub(crate) trait WeightSource {
    fn take(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Tensor>;
}

/// Seeded random initialisation (Hugging Face's scheme: normal weights, zero biases, unit norms).
pub(crate) struct RandomWeights {
    rng: Xoshiro256PlusPlus,
    kind: Kind,
    device: Device,
}

impl RandomWeights {
    pub fn new(seed: u64, kind: Kind, device: Device) -> Self {
        RandomWeights { rng: Xoshiro256PlusPlus::seed_from_u64(seed), kind, device }
    }
}

impl WeightSource for RandomWeights {
    fn take(&mut self, _name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let opts = (self.kind, self.device);
        Ok(match init {
            Init::Zeros => Tensor::f_zeros(shape, opts)?,
            Init::Ones => Tensor::f_ones(shape, opts)?,
            Init::Normal(std) => {
                let n: i64 = shape.iter().product();
                let dist = Normal::new(0.0f32, std as f32)
                    .map_err(|e| Error::invalid("init", "initializer_range", e.to_string()))?;
                let data: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
                Tensor::f_from_slice(&data)?
                    .f_view(shape)?
                    .f_to_kind(self.kind)?
                    .f_to_device(self.device)?
            }
        })
    }
}

/// Deep copies of another model's parameters.
pub(crate) struct CopiedWeights {
    map: HashMap<String, Tensor>,
}

impl CopiedWeights {
    pub fn new(params: &Params) -> Self {
        CopiedWeights { map: params.named().into_iter().collect() }
    }
}

impl WeightSource for CopiedWeights {
    fn take(&mut self, name: &str, shape: &[i64], _init: Init) -> Result<Tensor> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| Error::MissingParam { op: "deep_copy", name: name.to_string() })?;
        if t.size() != shape {
            return Err(Error::ShapeMismatch {
                op: "deep_copy",
                expected: shape.to_vec(),
                got: t.size(),
            });
        }
        deep_copy(t)
    }
}

/// Tensors read from a checkpoint; `key_of` maps parameter names to file keys.
pub(crate) struct CheckpointWeights {
    pub reader: CheckpointReader,
    pub prefix_strip: Option<String>,
    pub file_keys: HashMap<String, String>,
    pub stored_kinds: HashMap<String, Kind>,
}

impl CheckpointWeights {
    pub fn new(reader: CheckpointReader) -> Self {
        CheckpointWeights {
            reader,
            prefix_strip: None,
            file_keys: HashMap::new(),
            stored_kinds: HashMap::new(),
        }
    }

    /// The file key of parameter `name` (dropping `prefix_strip` when the file lacks it).
    pub fn key_of(&self, name: &str) -> String {
        match &self.prefix_strip {
            Some(p) if name.starts_with(p.as_str()) => name[p.len()..].to_string(),
            _ => name.to_string(),
        }
    }
}

impl WeightSource for CheckpointWeights {
    fn take(&mut self, name: &str, shape: &[i64], _init: Init) -> Result<Tensor> {
        let key = self.key_of(name);
        let t = self.reader.read(&key, shape)?;
        if let Some(k) = self.reader.stored_kind(&key) {
            self.stored_kinds.insert(name.to_string(), k);
        }
        self.file_keys.insert(name.to_string(), key);
        Ok(t)
    }
}

/// Takes tensors from a source and registers them as parameters.
pub(crate) struct Builder<'a> {
    pub src: &'a mut dyn WeightSource,
    pub params: Params,
}

impl<'a> Builder<'a> {
    pub fn new(src: &'a mut dyn WeightSource) -> Self {
        Builder { src, params: Params::default() }
    }

    pub fn get(
        &mut self,
        name: &str,
        shape: &[i64],
        init: Init,
        layer: Option<usize>,
    ) -> Result<Tensor> {
        let t = self.src.take(name, shape, init)?;
        self.params.insert(name, &t, layer)?;
        Ok(t)
    }

    pub fn get_opt(
        &mut self,
        on: bool,
        name: &str,
        shape: &[i64],
        init: Init,
        layer: Option<usize>,
    ) -> Result<Option<Tensor>> {
        if on { self.get(name, shape, init, layer).map(Some) } else { Ok(None) }
    }
}
