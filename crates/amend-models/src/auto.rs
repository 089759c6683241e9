//! [`Model`]: any supported architecture behind one type, and [`load`], which picks the adapter
//! from `config.json`.

use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::config::ModelConfig;
use crate::generation::GenerationConfig;
use crate::layers::KvCache;
use crate::model::{
    CausalLm, ForwardOptions, ForwardOutput, LayerWeight, LoadOptions, MlpWeight, SaveOptions,
};
use crate::params::Params;
use crate::tokenizer::Tokenizer;
use crate::{Error, Gpt2, Llama, Result};

/// A model of any supported architecture.
#[derive(Debug)]
#[non_exhaustive]
pub enum Model {
    /// GPT-2.
    Gpt2(Gpt2),
    /// Llama, Mistral or Qwen2.
    Llama(Llama),
}

/// Loads the Hugging Face checkpoint directory `dir`, choosing the adapter from the
/// `model_type` of its `config.json`.
///
/// ```
/// use amend_models::{load, CausalLm, LoadOptions};
/// # let dir = "tests/fixtures/models/qwen2"; // a tiny random Qwen2
/// let model = load(dir, &LoadOptions::default())?;
/// assert_eq!(model.config().model_type(), "qwen2");
/// assert_eq!(model.num_layers(), 2);
/// # Ok::<(), amend_models::Error>(())
/// ```
///
/// # Errors
/// As [`Gpt2::load`]; [`Error::UnknownArchitecture`] for other `model_type`s.
pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Model> {
    let dir = dir.as_ref();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| crate::checkpoint::io_error(&config_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| Error::Json { path: config_path.clone(), source })?;
    // Only the model_type matters here; the adapter re-reads and checks the whole file.
    match value.get("model_type").and_then(|v| v.as_str()) {
        Some("gpt2") => Ok(Model::Gpt2(Gpt2::load(dir, opts)?)),
        Some("llama" | "mistral" | "qwen2") => Ok(Model::Llama(Llama::load(dir, opts)?)),
        Some(other) => {
            Err(Error::UnknownArchitecture { path: config_path, model_type: other.to_string() })
        }
        None => Err(Error::config(config_path, "model_type", "missing or not a string")),
    }
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Model::Gpt2($m) => $e,
            Model::Llama($m) => $e,
        }
    };
}

impl Model {
    /// A deep copy (own storage).
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn try_clone(&self) -> Result<Self> {
        Ok(match self {
            Model::Gpt2(m) => Model::Gpt2(m.try_clone()?),
            Model::Llama(m) => Model::Llama(m.try_clone()?),
        })
    }

    /// The adapter as a trait object.
    pub fn as_dyn(&self) -> &dyn CausalLm {
        each!(self, m => m)
    }

    /// The adapter as a mutable trait object.
    pub fn as_dyn_mut(&mut self) -> &mut dyn CausalLm {
        each!(self, m => m)
    }
}

impl From<Gpt2> for Model {
    fn from(m: Gpt2) -> Self {
        Model::Gpt2(m)
    }
}

impl From<Llama> for Model {
    fn from(m: Llama) -> Self {
        Model::Llama(m)
    }
}

impl CausalLm for Model {
    fn config(&self) -> &ModelConfig {
        each!(self, m => m.config())
    }

    fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        each!(self, m => m.forward_with(input_ids, attention_mask, cache, opts))
    }

    fn lm_head_weight(&self) -> &Tensor {
        each!(self, m => m.lm_head_weight())
    }

    fn params(&self) -> &Params {
        each!(self, m => m.params())
    }

    fn params_mut(&mut self) -> &mut Params {
        each!(self, m => m.params_mut())
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        each!(self, m => m.tokenizer())
    }

    fn is_training(&self) -> bool {
        each!(self, m => m.is_training())
    }

    fn set_training(&mut self, training: bool) {
        each!(self, m => m.set_training(training))
    }

    fn boxed_copy(&self) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn generation_config(&self) -> GenerationConfig {
        each!(self, m => m.generation_config())
    }

    fn mlp_weight(&self, layer: usize, which: MlpWeight) -> Result<LayerWeight> {
        each!(self, m => m.mlp_weight(layer, which))
    }

    fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<PathBuf> {
        each!(self, m => m.save_pretrained(dir, opts))
    }
}

impl CausalLm for Box<dyn CausalLm> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }

    fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        (**self).forward_with(input_ids, attention_mask, cache, opts)
    }

    fn lm_head_weight(&self) -> &Tensor {
        (**self).lm_head_weight()
    }

    fn params(&self) -> &Params {
        (**self).params()
    }

    fn params_mut(&mut self) -> &mut Params {
        (**self).params_mut()
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        (**self).tokenizer()
    }

    fn is_training(&self) -> bool {
        (**self).is_training()
    }

    fn set_training(&mut self, training: bool) {
        (**self).set_training(training)
    }

    fn boxed_copy(&self) -> Result<Box<dyn CausalLm>> {
        (**self).boxed_copy()
    }

    fn generation_config(&self) -> GenerationConfig {
        (**self).generation_config()
    }

    fn mlp_weight(&self, layer: usize, which: MlpWeight) -> Result<LayerWeight> {
        (**self).mlp_weight(layer, which)
    }

    fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<PathBuf> {
        (**self).save_pretrained(dir, opts)
    }
}
