//! The [`CausalLm`] trait every adapter implements, and the types of its calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, UnknownFields};
use crate::generation::GenerationConfig;
use crate::layers::KvCache;
use crate::params::{Parameter, Params};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Which logits a forward call computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogitsMode {
    /// Logits at every position, `[b_sz, seq_len, vocab]`.
    #[default]
    All,
    /// Logits at the last position only, `[b_sz, 1, vocab]` (generation).
    Last,
    /// No logits (fused-linear losses apply the LM head themselves).
    None,
}

/// Options of [`CausalLm::forward_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOptions {
    /// Return the residual stream after the embeddings and after every block.
    pub hidden_states: bool,
    /// Which logits to compute.
    pub logits: LogitsMode,
}

impl ForwardOptions {
    /// Logits at every position, no hidden states.
    pub fn logits() -> Self {
        ForwardOptions::default()
    }

    /// Hidden states of every layer and logits at every position.
    pub fn with_hidden_states() -> Self {
        ForwardOptions { hidden_states: true, logits: LogitsMode::All }
    }

    /// Hidden states only (no LM head).
    pub fn hidden_only() -> Self {
        ForwardOptions { hidden_states: true, logits: LogitsMode::None }
    }
}

/// The outputs of one forward call.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits, `[b_sz, seq_len, vocab]` (or `[b_sz, 1, vocab]` for [`LogitsMode::Last`]), in
    /// the model's dtype; `None` for [`LogitsMode::None`].
    pub logits: Option<Tensor>,
    /// With [`ForwardOptions::hidden_states`]: `num_layers + 1` tensors `[b_sz, seq_len, hidden]`,
    /// the embedding output then the output of each block, all **before** the final norm.
    /// Transformers' `hidden_states[i]` equals entry `i` for `i < num_layers`; its last entry is
    /// [`ForwardOutput::last_hidden_state`].
    pub hidden_states: Vec<Tensor>,
    /// The final normalised hidden state `[b_sz, seq_len, hidden]`: the LM head's input.
    pub last_hidden_state: Tensor,
}

/// Which MLP weight of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MlpWeight {
    /// The output ("value") projection: GPT-2 `mlp.c_proj`, Llama `mlp.down_proj`.
    Output,
    /// The input ("key") projection: GPT-2 `mlp.c_fc`, Llama `mlp.up_proj`.
    Input,
    /// The gate projection (Llama family only): `mlp.gate_proj`.
    Gate,
}

/// Memory layout of a projection weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WeightLayout {
    /// GPT-2 `Conv1D`: `[in, out]`, `y = x·W + b`.
    Conv1D,
    /// `nn.Linear`: `[out, in]`, `y = x·Wᵀ + b`.
    Linear,
}

/// One named weight of a block, sharing storage with the model.
#[derive(Debug)]
pub struct LayerWeight {
    /// Checkpoint key, e.g. `transformer.h.3.mlp.c_proj.weight`.
    pub name: String,
    /// The weight (a shallow clone: in-place edits under `tch::no_grad` change the model).
    pub tensor: Tensor,
    /// Its layout.
    pub layout: WeightLayout,
    /// The bias, if the projection has one (`name`, tensor).
    pub bias: Option<(String, Tensor)>,
}

/// Options of [`load`](crate::load) and the adapters' `load` functions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// Dtype of the parameters (f32 by default; bf16, f16 and f64 also work). Checkpoint tensors
    /// are converted on load; the stored dtypes are remembered for saving.
    #[serde(with = "kind_serde")]
    pub kind: Kind,
    /// Device of the parameters.
    #[serde(skip)]
    pub device: Device,
    /// Policy for unknown `config.json` keys (see [`config`](crate::config)).
    pub unknown_config_fields: UnknownFields,
    /// Read `tokenizer.json` when present (a missing file is not an error; the model then has no
    /// tokenizer).
    pub load_tokenizer: bool,
    /// What loading does with a weight that holds NaN or ±inf (after conversion to
    /// [`kind`](Self::kind)): [`Error::NonFiniteWeights`](crate::Error::NonFiniteWeights) naming
    /// the file and the tensor (the default), or load it as it is.
    pub non_finite: NonFiniteWeights,
}

/// What [`load`](crate::load) does with weights that hold NaN or ±inf, by the same names as the
/// losses' `non_finite` policy (`amend_losses::NonFinitePolicy`).
///
/// A model with such a weight scores and generates garbage without any error, so the default
/// refuses it. The check reads every floating-point weight once at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NonFiniteWeights {
    /// Refuse the checkpoint with [`Error::NonFiniteWeights`](crate::Error::NonFiniteWeights)
    /// (the default).
    #[default]
    Error,
    /// Load it anyway (to inspect a diverged checkpoint); NaN and inf propagate into the outputs.
    Propagate,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            kind: Kind::Float,
            device: Device::Cpu,
            unknown_config_fields: UnknownFields::Reject,
            load_tokenizer: true,
            non_finite: NonFiniteWeights::Error,
        }
    }
}

impl LoadOptions {
    /// Sets the dtype.
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets the device.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
}

/// Options of [`CausalLm::save_pretrained`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SaveOptions {
    /// Replace an existing output directory (only after the new one is complete).
    pub overwrite: bool,
    /// Store every tensor in this dtype instead of the dtype it was loaded from (models built in
    /// code store their current dtype).
    #[serde(with = "opt_kind_serde")]
    pub dtype: Option<Kind>,
    /// Extra files to write next to the weights (name → bytes), e.g. an edit manifest.
    pub extra_files: BTreeMap<String, Vec<u8>>,
}

/// A causal language model: the interface losses, editing and the comparison runner use.
///
/// The required methods are a small core (configuration, forward pass, parameters, tokenizer,
/// train/eval flag, deep copy); everything else has a default built on them, and capabilities an
/// adapter may lack ([`CausalLm::mlp_weight`], [`CausalLm::save_pretrained`]) default to
/// [`Error::Unsupported`], in the style of burn's backend trait.
///
/// Parameter names are the Hugging Face checkpoint keys.
pub trait CausalLm: Send {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Runs the model.
    ///
    /// `attention_mask` (1 = token, 0 = padding; any integer, bool or float dtype) may pad on
    /// either side. Positions are `cumsum(mask) − 1`, so a left-padded row gets the outputs it
    /// would get unpadded; padding queries produce finite values that must be ignored. With a
    /// `cache`, `input_ids` are the new tokens only, the mask covers cached plus new positions,
    /// and the cache advances by `seq_len`.
    ///
    /// # Shapes
    /// `input_ids: [b_sz, seq_len]` (integer), `attention_mask: [b_sz, cache_len + seq_len]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for ids outside the vocabulary, too many positions or a cache of
    /// the wrong batch size or capacity; [`Error::ShapeMismatch`] for a mask of the wrong shape;
    /// [`Error::Tch`].
    fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput>;

    /// The LM head weight `[vocab, hidden]` (the token embedding when tied), for fused-linear
    /// losses: `logits = last_hidden_state · Wᵀ`.
    fn lm_head_weight(&self) -> &Tensor;

    /// The named parameters.
    fn params(&self) -> &Params;

    /// The named parameters, mutably (trainable flags, device and dtype moves).
    fn params_mut(&mut self) -> &mut Params;

    /// The tokenizer, when the model has one.
    fn tokenizer(&self) -> Option<&Tokenizer>;

    /// Whether dropout is active.
    fn is_training(&self) -> bool;

    /// Switches between train mode (dropout on) and eval mode.
    fn set_training(&mut self, training: bool);

    /// A deep copy with its own parameter storage (a frozen reference model, a base for
    /// repeated edits). Trainable flags and the train/eval mode are copied.
    ///
    /// # Errors
    /// [`Error::Tch`].
    fn boxed_copy(&self) -> Result<Box<dyn CausalLm>>;

    /// Logits `[b_sz, seq_len, vocab]`.
    ///
    /// # Errors
    /// As [`CausalLm::forward_with`].
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let out = self.forward_with(input_ids, attention_mask, None, ForwardOptions::logits())?;
        out.logits.ok_or_else(|| {
            Error::invalid("CausalLm::forward", "logits", "adapter returned no logits")
        })
    }

    /// Logits, the hidden state after the embeddings and every block, and the final normalised
    /// hidden state.
    ///
    /// # Errors
    /// As [`CausalLm::forward_with`].
    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ForwardOutput> {
        self.forward_with(input_ids, attention_mask, None, ForwardOptions::with_hidden_states())
    }

    /// [`CausalLm::forward`] without recording a graph.
    ///
    /// # Errors
    /// As [`CausalLm::forward_with`].
    fn forward_no_grad(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.forward(input_ids, attention_mask)
    }

    /// The device of the parameters.
    fn device(&self) -> Device {
        self.params().device()
    }

    /// The dtype of the parameters.
    fn kind(&self) -> Kind {
        self.params().kind()
    }

    /// Moves the model to `device` in place.
    ///
    /// # Errors
    /// [`Error::Tch`].
    fn to_device(&mut self, device: Device) -> Result<()> {
        self.params_mut().to_device(device)
    }

    /// Casts the parameters to the floating `kind` in place.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a non-floating kind; [`Error::Tch`].
    fn to_kind(&mut self, kind: Kind) -> Result<()> {
        self.params_mut().to_kind(kind)
    }

    /// `(name, tensor)` for every parameter (tensors share storage with the model).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params().named()
    }

    /// Makes exactly the parameters selected by `select` trainable; returns how many are.
    ///
    /// # Errors
    /// [`Error::Tch`].
    fn set_trainable(&mut self, select: &dyn Fn(&Parameter) -> bool) -> Result<usize> {
        self.params_mut().set_trainable(select)
    }

    /// An empty KV cache for `batch` rows and `capacity` positions, in the model's dtype and
    /// device.
    ///
    /// # Errors
    /// As [`KvCache::new`].
    fn new_kv_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(self.config(), batch, capacity, self.kind(), self.device())
    }

    /// Generation defaults: `generation_config.json` when the checkpoint has one, with the
    /// config's end-of-sequence ids as stop tokens. Greedy unless the file says otherwise.
    fn generation_config(&self) -> GenerationConfig {
        GenerationConfig::for_model_config(self.config())
    }

    /// An MLP weight of block `layer`, with its name and layout (the edit target of ProFS and
    /// fine-tuning edits).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a layer out of range or a projection the architecture lacks;
    /// [`Error::Unsupported`] for adapters without named MLP weights.
    fn mlp_weight(&self, layer: usize, which: MlpWeight) -> Result<LayerWeight> {
        let _ = (layer, which);
        Err(Error::Unsupported { op: "mlp_weight", model_type: self.config().model_type().into() })
    }

    /// Writes the model as a Hugging Face directory (`config.json`, `model.safetensors`, the
    /// tokenizer and generation files) that transformers loads unchanged. The write goes to a
    /// temporary directory next to `dir` that is renamed into place; `dir` may not be (inside)
    /// the directory the model was loaded from. Returns the written directory.
    ///
    /// # Errors
    /// [`Error::OutputDir`], [`Error::Io`], [`Error::Tch`]; [`Error::Unsupported`] for adapters
    /// that cannot save.
    fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<PathBuf> {
        let _ = (dir, opts);
        Err(Error::Unsupported {
            op: "save_pretrained",
            model_type: self.config().model_type().into(),
        })
    }

    /// Number of layers (blocks).
    fn num_layers(&self) -> usize {
        self.config().num_layers()
    }
}

mod kind_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use tch::Kind;

    pub fn serialize<S: Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::kind_name(*k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        let name = String::deserialize(d)?;
        super::parse_kind(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype `{name}`")))
    }
}

mod opt_kind_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use tch::Kind;

    pub fn serialize<S: Serializer>(k: &Option<Kind>, s: S) -> Result<S::Ok, S::Error> {
        match k {
            Some(k) => s.serialize_some(super::kind_name(*k)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Kind>, D::Error> {
        let name = Option::<String>::deserialize(d)?;
        name.map(|n| {
            super::parse_kind(&n)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype `{n}`")))
        })
        .transpose()
    }
}

/// The name of a floating dtype as transformers writes it (`float32`, `bfloat16`, …).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "unsupported",
    }
}

/// Parses `f32`/`float32`/`float`, `bf16`/`bfloat16`, `f16`/`float16`/`half`, `f64`/`float64`.
pub fn parse_kind(name: &str) -> Option<Kind> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" | "fp32" => Some(Kind::Float),
        "bf16" | "bfloat16" => Some(Kind::BFloat16),
        "f16" | "float16" | "half" | "fp16" => Some(Kind::Half),
        "f64" | "float64" | "double" => Some(Kind::Double),
        _ => None,
    }
}
