//! Model configurations: typed views of Hugging Face `config.json` files.
//!
//! # Field policy
//!
//! A `config.json` is read as a JSON object and every key is checked before anything is built:
//!
//! * keys amend implements (sizes, epsilons, rope settings, biases, …) are parsed into
//!   [`Gpt2Config`] or [`LlamaConfig`]; a value amend cannot run faithfully is an
//!   [`Error::Config`] naming the field: an unsupported `rope_scaling` / `rope_parameters` type
//!   (`dynamic`, `yarn`, `longrope`, …), a `partial_rotary_factor` below 1, an activation other
//!   than those of [`Activation`], `add_cross_attention: true`, non-empty `pruned_heads`, a
//!   `quantization_config`;
//! * keys that do not change the network (names, versions, label maps, `use_cache`, the default
//!   dtype, `initializer_range`, generation defaults stored in old configs, …) are accepted and
//!   ignored (the list is [`IGNORED_FIELDS`]);
//! * any other key is an [`Error::Config`] ("unknown field"), because amend cannot know whether it
//!   changes the computation. [`UnknownFields::Warn`] loads such a config anyway and logs each
//!   unknown key with `tracing::warn!`.
//!
//! Both the legacy (`rope_theta` + `rope_scaling`) and the transformers 5 (`rope_parameters`)
//! spellings of the rotary settings are read. Configs written by amend for models it built use
//! the transformers 5 spelling.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{Error, Result};

/// What to do with a `config.json` key amend does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum UnknownFields {
    /// Refuse the config with [`Error::Config`] (the default).
    #[default]
    Reject,
    /// Load anyway and log a warning per unknown key.
    Warn,
}

/// Keys accepted and ignored in every `config.json` because they do not change the network.
pub const IGNORED_FIELDS: &[&str] = &[
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
    "_name_or_path",
    "architectures",
    "attn_implementation",
    "bad_words_ids",
    "begin_suppress_tokens",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "gradient_checkpointing",
    "id2label",
    "initializer_range",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "name_or_path",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "prefix",
    "problem_type",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
    "use_cache",
];

/// Keys that are checked (and must have a harmless value) in every config.
const CHECKED_COMMON: &[&str] = &[
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "add_cross_attention",
    "pruned_heads",
    "quantization_config",
];

const GPT2_FIELDS: &[&str] = &[
    "vocab_size",
    "n_positions",
    "n_ctx",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
];

const LLAMA_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "pretraining_tp",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
];

/// Activation functions of the MLP blocks.
///
/// The three tanh approximations of GELU are the same function; in f32 and f64 amend computes
/// all of them with libtorch's fused `gelu(approximate="tanh")`, in bf16 and f16 with
/// transformers' formula for each, so that low-precision results round like transformers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Activation {
    /// GPT-2's `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    #[serde(rename = "gelu_new")]
    GeluNew,
    /// `gelu_pytorch_tanh`: libtorch's tanh-approximated GELU.
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluPytorchTanh,
    /// `gelu_fast`: `0.5·x·(1 + tanh(0.7978845608·x·(1 + 0.044715·x²)))`.
    #[serde(rename = "gelu_fast")]
    GeluFast,
    /// Exact (erf) GELU (`gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// `relu`.
    #[serde(rename = "relu")]
    Relu,
    /// SiLU / swish (`silu`, `swish`), Llama's gate activation.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    fn parse(path: &Path, field: &str, name: &str) -> Result<Self> {
        match name {
            "gelu_new" => Ok(Activation::GeluNew),
            "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
            "gelu_fast" => Ok(Activation::GeluFast),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::config(
                path,
                field,
                format!(
                    "unsupported activation `{other}` (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, silu, swish)"
                ),
            )),
        }
    }

    /// The name written to `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluNew => "gelu_new",
            Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
            Activation::GeluFast => "gelu_fast",
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }
}

/// One id or a list of ids (`eos_token_id` may be either in Hugging Face configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The special token ids of a config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (one or several).
    pub eos_token_id: Option<TokenIds>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
}

/// GPT-2 configuration (`model_type: "gpt2"`), field names as in `GPT2Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Rows of the token embedding (`wte`).
    pub vocab_size: usize,
    /// Rows of the position embedding (`wpe`): the longest sequence the model accepts.
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// MLP inner size (`None`: `4 * n_embd`).
    pub n_inner: Option<usize>,
    /// MLP activation.
    pub activation_function: Activation,
    /// Dropout after the attention and MLP projections (train mode only).
    pub resid_pdrop: f64,
    /// Dropout after the embeddings (train mode only).
    pub embd_pdrop: f64,
    /// Dropout on the attention probabilities (train mode only).
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Std of the normal initialisation (used by [`Gpt2::new_random`](crate::Gpt2::new_random)).
    pub initializer_range: f64,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// Also scale attention scores by `1/(layer_idx + 1)`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute attention scores and softmax in f32 whatever the model dtype.
    pub reorder_and_upcast_attn: bool,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Special token ids.
    #[serde(flatten)]
    pub special_tokens: SpecialTokens,
}

impl Default for Gpt2Config {
    /// The `GPT2Config()` defaults of transformers (GPT-2 small).
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: Activation::GeluNew,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            special_tokens: SpecialTokens {
                bos_token_id: Some(50256),
                eos_token_id: Some(TokenIds::One(50256)),
                pad_token_id: None,
            },
        }
    }
}

impl Gpt2Config {
    /// MLP inner size.
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks sizes (non-zero, heads divide the hidden size, dropouts in `[0, 1)`).
    pub fn validate(&self) -> Result<()> {
        let p = Path::new("<in memory>");
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.inner_size()),
        ] {
            if v == 0 {
                return Err(Error::config(p, field, "must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::config(
                p,
                "n_head",
                format!("{} heads do not divide n_embd = {}", self.n_head, self.n_embd),
            ));
        }
        check_prob(p, "resid_pdrop", self.resid_pdrop)?;
        check_prob(p, "embd_pdrop", self.embd_pdrop)?;
        check_prob(p, "attn_pdrop", self.attn_pdrop)?;
        check_positive(p, "layer_norm_epsilon", self.layer_norm_epsilon)?;
        Ok(())
    }

    fn from_map(map: &Map<String, Value>, path: &Path) -> Result<Self> {
        let d = Gpt2Config::default();
        let activation = match get::<String>(map, path, "activation_function")? {
            Some(name) => Activation::parse(path, "activation_function", &name)?,
            None => d.activation_function,
        };
        let cfg = Gpt2Config {
            vocab_size: get(map, path, "vocab_size")?.unwrap_or(d.vocab_size),
            n_positions: get(map, path, "n_positions")?.unwrap_or(d.n_positions),
            n_embd: get(map, path, "n_embd")?.unwrap_or(d.n_embd),
            n_layer: get(map, path, "n_layer")?.unwrap_or(d.n_layer),
            n_head: get(map, path, "n_head")?.unwrap_or(d.n_head),
            n_inner: get_nullable(map, path, "n_inner")?.flatten(),
            activation_function: activation,
            resid_pdrop: get(map, path, "resid_pdrop")?.unwrap_or(d.resid_pdrop),
            embd_pdrop: get(map, path, "embd_pdrop")?.unwrap_or(d.embd_pdrop),
            attn_pdrop: get(map, path, "attn_pdrop")?.unwrap_or(d.attn_pdrop),
            layer_norm_epsilon: get(map, path, "layer_norm_epsilon")?
                .unwrap_or(d.layer_norm_epsilon),
            initializer_range: get(map, path, "initializer_range")?.unwrap_or(d.initializer_range),
            scale_attn_weights: get(map, path, "scale_attn_weights")?
                .unwrap_or(d.scale_attn_weights),
            scale_attn_by_inverse_layer_idx: get(map, path, "scale_attn_by_inverse_layer_idx")?
                .unwrap_or(false),
            reorder_and_upcast_attn: get(map, path, "reorder_and_upcast_attn")?.unwrap_or(false),
            tie_word_embeddings: get(map, path, "tie_word_embeddings")?.unwrap_or(true),
            special_tokens: special_tokens(map, path, &d.special_tokens)?,
        };
        if let Some(n_ctx) = get::<usize>(map, path, "n_ctx")?
            && n_ctx != cfg.n_positions
        {
            return Err(Error::config(
                path,
                "n_ctx",
                format!("n_ctx = {n_ctx} differs from n_positions = {}", cfg.n_positions),
            ));
        }
        cfg.validate().map_err(|e| relocate(e, path))?;
        Ok(cfg)
    }

    /// The `config.json` object transformers reads for this configuration.
    pub fn to_hf_json(&self) -> Value {
        let mut m = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": self.activation_function.hf_name(),
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        write_special_tokens(&mut m, &self.special_tokens);
        m
    }
}

/// The Llama-family architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LlamaFamily {
    /// Llama 2 / 3 (`model_type: "llama"`).
    Llama,
    /// Mistral (`model_type: "mistral"`): sliding-window attention when `sliding_window` is set.
    Mistral,
    /// Qwen2 / Qwen2.5 (`model_type: "qwen2"`): biases on q, k and v.
    Qwen2,
}

impl LlamaFamily {
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Mistral => "mistral",
            LlamaFamily::Qwen2 => "qwen2",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "LlamaForCausalLM",
            LlamaFamily::Mistral => "MistralForCausalLM",
            LlamaFamily::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Rotary position embedding frequency scaling (`rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies (`8` for Llama 3.1).
        factor: f64,
        /// `1` for Llama 3.1.
        low_freq_factor: f64,
        /// `4` for Llama 3.1.
        high_freq_factor: f64,
        /// Pre-training context (`8192` for Llama 3.1).
        original_max_position_embeddings: usize,
    },
}

/// Attention kind of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerAttention {
    /// Causal attention over every earlier position.
    FullAttention,
    /// Causal attention over the last `sliding_window` positions (key index > query index − window).
    SlidingAttention,
}

/// Llama-family configuration (`model_type` `llama`, `mistral` or `qwen2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which architecture of the family.
    pub family: LlamaFamily,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when below `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// MLP gate activation.
    pub hidden_act: Activation,
    /// Context length the model was trained for (not enforced: RoPE extrapolates).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on q, k, v and o (Llama's `attention_bias`).
    pub attention_bias: bool,
    /// Biases on q, k and v only (always on for Qwen2).
    pub qkv_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Window of sliding-attention layers.
    pub sliding_window: Option<usize>,
    /// Attention kind per layer (`num_hidden_layers` entries).
    pub layer_types: Vec<LayerAttention>,
    /// Dropout on attention probabilities (train mode only).
    pub attention_dropout: f64,
    /// Std of the normal initialisation.
    pub initializer_range: f64,
    /// Special token ids.
    pub special_tokens: SpecialTokens,
}

impl LlamaConfig {
    /// A small Llama configuration with the given sizes and transformers' other defaults.
    pub fn new(
        family: LlamaFamily,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        LlamaConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            hidden_act: Activation::Silu,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            attention_bias: false,
            qkv_bias: family == LlamaFamily::Qwen2,
            mlp_bias: false,
            tie_word_embeddings: false,
            sliding_window: None,
            layer_types: vec![LayerAttention::FullAttention; num_hidden_layers],
            attention_dropout: 0.0,
            initializer_range: 0.02,
            special_tokens: SpecialTokens::default(),
        }
    }

    /// Whether q, k and v have biases.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias || self.qkv_bias
    }

    /// Checks sizes and consistency.
    pub fn validate(&self) -> Result<()> {
        let p = Path::new("<in memory>");
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::config(p, field, "must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(Error::config(
                p,
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(p, "head_dim", "RoPE needs an even head_dim"));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(Error::config(
                p,
                "layer_types",
                format!("{} entries for {} layers", self.layer_types.len(), self.num_hidden_layers),
            ));
        }
        if self.layer_types.contains(&LayerAttention::SlidingAttention) {
            match self.sliding_window {
                Some(0) | None => {
                    return Err(Error::config(
                        p,
                        "sliding_window",
                        "sliding-attention layers need a positive sliding_window",
                    ));
                }
                Some(_) => {}
            }
        }
        check_positive(p, "rms_norm_eps", self.rms_norm_eps)?;
        check_positive(p, "rope_theta", self.rope_theta)?;
        check_prob(p, "attention_dropout", self.attention_dropout)?;
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => check_positive(p, "rope_scaling.factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
                ..
            } => {
                check_positive(p, "rope_scaling.factor", factor)?;
                check_positive(p, "rope_scaling.low_freq_factor", low_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::config(
                        p,
                        "rope_scaling.high_freq_factor",
                        "must exceed low_freq_factor",
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err(Error::config(
                        p,
                        "rope_scaling.original_max_position_embeddings",
                        "must be positive",
                    ));
                }
            }
        }
        Ok(())
    }

    fn from_map(family: LlamaFamily, map: &Map<String, Value>, path: &Path) -> Result<Self> {
        let req = |key: &str| -> Result<usize> {
            get::<usize>(map, path, key)?.ok_or_else(|| Error::config(path, key, "missing"))
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_hidden_layers = req("num_hidden_layers")?;
        let num_key_value_heads =
            get_nullable::<usize>(map, path, "num_key_value_heads")?.flatten();
        let head_dim = get_nullable::<usize>(map, path, "head_dim")?.flatten();
        if num_attention_heads == 0 {
            return Err(Error::config(path, "num_attention_heads", "must be positive"));
        }
        if head_dim.is_none() && hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!("{num_attention_heads} heads do not divide hidden_size = {hidden_size}"),
            ));
        }
        // Per-layer lists below have one entry per layer: a count beyond this machine's memory in
        // bytes can never load, and must not abort in an allocation here (the full size check
        // runs when the model is built).
        if let Some(mem) = crate::machine::total_memory()
            && num_hidden_layers as u64 > mem
        {
            return Err(Error::config(
                path,
                "num_hidden_layers",
                format!("{num_hidden_layers} layers cannot fit in this machine's memory"),
            ));
        }
        let hidden_act = match get::<String>(map, path, "hidden_act")? {
            Some(name) => Activation::parse(path, "hidden_act", &name)?,
            None => Activation::Silu,
        };
        let max_position_embeddings = get::<usize>(map, path, "max_position_embeddings")?
            .unwrap_or(match family {
                LlamaFamily::Llama => 2048,
                LlamaFamily::Mistral => 4096 * 32,
                LlamaFamily::Qwen2 => 32768,
            });
        let (rope_theta, rope_scaling) = parse_rope(map, path, max_position_embeddings)?;

        // Sliding windows: Mistral applies `sliding_window` (default 4096) to every layer;
        // Qwen2 only when `use_sliding_window`, to layers >= max_window_layers (or per
        // `layer_types`); Llama has none.
        let (sliding_window, layer_types) = match family {
            LlamaFamily::Llama => {
                if let Some(Some(w)) = get_nullable::<usize>(map, path, "sliding_window")? {
                    return Err(Error::config(
                        path,
                        "sliding_window",
                        format!("llama models have no sliding window (got {w})"),
                    ));
                }
                (None, vec![LayerAttention::FullAttention; num_hidden_layers])
            }
            LlamaFamily::Mistral => {
                if map.contains_key("layer_types") {
                    return Err(Error::config(
                        path,
                        "layer_types",
                        "per-layer attention types are not part of Mistral (Ministral) and are not supported",
                    ));
                }
                let w = match get_nullable::<usize>(map, path, "sliding_window")? {
                    None => Some(4096),
                    Some(w) => w,
                };
                let kind = if w.is_some() {
                    LayerAttention::SlidingAttention
                } else {
                    LayerAttention::FullAttention
                };
                (w, vec![kind; num_hidden_layers])
            }
            LlamaFamily::Qwen2 => {
                let use_sw = get::<bool>(map, path, "use_sliding_window")?.unwrap_or(false);
                let w = match get_nullable::<usize>(map, path, "sliding_window")? {
                    None => Some(4096),
                    Some(w) => w,
                };
                let w = if use_sw { w } else { None };
                let max_window_layers = get::<usize>(map, path, "max_window_layers")?.unwrap_or(28);
                let types = match get_nullable::<Vec<LayerAttention>>(map, path, "layer_types")?
                    .flatten()
                {
                    Some(t) => t,
                    None => (0..num_hidden_layers)
                        .map(|i| {
                            if w.is_some() && i >= max_window_layers {
                                LayerAttention::SlidingAttention
                            } else {
                                LayerAttention::FullAttention
                            }
                        })
                        .collect(),
                };
                if types.contains(&LayerAttention::SlidingAttention) && w.is_none() {
                    return Err(Error::config(
                        path,
                        "layer_types",
                        "sliding_attention layers without use_sliding_window and sliding_window",
                    ));
                }
                (w, types)
            }
        };
        let attention_bias = get::<bool>(map, path, "attention_bias")?.unwrap_or(false);
        if family != LlamaFamily::Llama && map.contains_key("attention_bias") && attention_bias {
            return Err(Error::config(
                path,
                "attention_bias",
                format!("not a {} option", family.model_type()),
            ));
        }
        let mlp_bias = get::<bool>(map, path, "mlp_bias")?.unwrap_or(false);
        if family != LlamaFamily::Llama && mlp_bias {
            return Err(Error::config(
                path,
                "mlp_bias",
                format!("not a {} option", family.model_type()),
            ));
        }
        let default_tokens = match family {
            LlamaFamily::Llama | LlamaFamily::Mistral => SpecialTokens {
                bos_token_id: Some(1),
                eos_token_id: Some(TokenIds::One(2)),
                pad_token_id: None,
            },
            LlamaFamily::Qwen2 => SpecialTokens::default(),
        };
        let cfg = LlamaConfig {
            family,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: head_dim.unwrap_or(hidden_size / num_attention_heads),
            hidden_act,
            max_position_embeddings,
            rms_norm_eps: get(map, path, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            attention_bias,
            qkv_bias: family == LlamaFamily::Qwen2,
            mlp_bias,
            tie_word_embeddings: get(map, path, "tie_word_embeddings")?.unwrap_or(false),
            sliding_window,
            layer_types,
            attention_dropout: get(map, path, "attention_dropout")?.unwrap_or(0.0),
            initializer_range: get(map, path, "initializer_range")?.unwrap_or(0.02),
            special_tokens: special_tokens(map, path, &default_tokens)?,
        };
        cfg.validate().map_err(|e| relocate(e, path))?;
        Ok(cfg)
    }

    /// The `config.json` object transformers reads for this configuration.
    pub fn to_hf_json(&self) -> Value {
        let mut rope = match self.rope_scaling {
            RopeScaling::Default => json!({"rope_type": "default"}),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        rope["rope_theta"] = json!(self.rope_theta);
        let mut m = json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act.hf_name(),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        match self.family {
            LlamaFamily::Llama => {
                m["attention_bias"] = json!(self.attention_bias);
                m["mlp_bias"] = json!(self.mlp_bias);
            }
            LlamaFamily::Mistral => m["sliding_window"] = json!(self.sliding_window),
            LlamaFamily::Qwen2 => {
                let sliding = self.layer_types.contains(&LayerAttention::SlidingAttention);
                m["use_sliding_window"] = json!(sliding);
                m["sliding_window"] = json!(self.sliding_window);
                m["layer_types"] = json!(self.layer_types);
            }
        }
        write_special_tokens(&mut m, &self.special_tokens);
        m
    }
}

/// The configuration of any supported model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", rename_all = "lowercase")]
#[non_exhaustive]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// Llama, Mistral or Qwen2.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads and checks a `config.json` (see the [module docs](self) for the field policy).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::UnknownArchitecture`] and [`Error::Config`] naming
    /// the field at fault.
    pub fn from_file(path: impl AsRef<Path>, unknown: UnknownFields) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        Self::from_hf_json(&value, path, unknown)
    }

    /// Parses a `config.json` value; `path` is only used in error messages.
    ///
    /// # Errors
    /// As [`ModelConfig::from_file`], without the I/O errors.
    pub fn from_hf_json(value: &Value, path: &Path, unknown: UnknownFields) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| Error::config(path, "<root>", "config.json is not a JSON object"))?;
        let model_type = match map.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Error::config(path, "model_type", "not a string")),
            None => return Err(Error::config(path, "model_type", "missing")),
        };
        let (fields, family) = match model_type.as_str() {
            "gpt2" => (GPT2_FIELDS, None),
            "llama" => (LLAMA_FIELDS, Some(LlamaFamily::Llama)),
            "mistral" => (LLAMA_FIELDS, Some(LlamaFamily::Mistral)),
            "qwen2" => (LLAMA_FIELDS, Some(LlamaFamily::Qwen2)),
            _ => {
                return Err(Error::UnknownArchitecture { path: path.to_path_buf(), model_type });
            }
        };
        if let Some(Value::Array(archs)) = map.get("architectures") {
            for a in archs {
                let name = a.as_str().unwrap_or_default();
                let ok = matches!(
                    name,
                    "GPT2LMHeadModel"
                        | "GPT2Model"
                        | "LlamaForCausalLM"
                        | "LlamaModel"
                        | "MistralForCausalLM"
                        | "MistralModel"
                        | "Qwen2ForCausalLM"
                        | "Qwen2Model"
                );
                if !ok {
                    return Err(Error::config(
                        path,
                        "architectures",
                        format!("`{name}` is not a causal LM amend supports"),
                    ));
                }
            }
        }
        for key in map.keys() {
            let known = fields.contains(&key.as_str())
                || CHECKED_COMMON.contains(&key.as_str())
                || IGNORED_FIELDS.contains(&key.as_str());
            if !known {
                match unknown {
                    UnknownFields::Reject => {
                        return Err(Error::config(
                            path,
                            key.clone(),
                            format!(
                                "unknown {model_type} config field; amend cannot tell whether it changes the model (load with UnknownFields::Warn to ignore it)"
                            ),
                        ));
                    }
                    UnknownFields::Warn => {
                        tracing::warn!(path = %path.display(), field = %key, "ignoring unknown config field");
                    }
                }
            }
        }
        if let Some(q) = map.get("quantization_config")
            && !q.is_null()
        {
            return Err(Error::config(
                path,
                "quantization_config",
                "quantized checkpoints are not supported",
            ));
        }
        if get::<bool>(map, path, "add_cross_attention")?.unwrap_or(false) {
            return Err(Error::config(
                path,
                "add_cross_attention",
                "cross-attention is not supported",
            ));
        }
        if let Some(p) = map.get("pruned_heads") {
            let empty = p.is_null() || p.as_object().is_some_and(|o| o.is_empty());
            if !empty {
                return Err(Error::config(path, "pruned_heads", "pruned heads are not supported"));
            }
        }
        match family {
            None => Ok(ModelConfig::Gpt2(Gpt2Config::from_map(map, path)?)),
            Some(f) => Ok(ModelConfig::Llama(LlamaConfig::from_map(f, map, path)?)),
        }
    }

    /// The `config.json` object transformers reads for this configuration.
    pub fn to_hf_json(&self) -> Value {
        match self {
            ModelConfig::Gpt2(c) => c.to_hf_json(),
            ModelConfig::Llama(c) => c.to_hf_json(),
        }
    }

    /// Checks sizes and consistency.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt2(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
        }
    }

    /// The Hugging Face `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(c) => c.family.model_type(),
        }
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Hidden size.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    /// MLP inner size.
    pub fn intermediate_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.inner_size(),
            ModelConfig::Llama(c) => c.intermediate_size,
        }
    }

    /// Rows of the embedding matrix (may exceed the tokenizer's vocabulary).
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Query heads.
    pub fn num_heads(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Llama(c) => c.num_attention_heads,
        }
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Llama(c) => c.num_key_value_heads,
        }
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd / c.n_head,
            ModelConfig::Llama(c) => c.head_dim,
        }
    }

    /// Longest sequence the model accepts (`None`: no hard limit, as with RoPE).
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            ModelConfig::Gpt2(c) => Some(c.n_positions),
            ModelConfig::Llama(_) => None,
        }
    }

    /// Whether the LM head shares the token embedding.
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::Gpt2(c) => c.tie_word_embeddings,
            ModelConfig::Llama(c) => c.tie_word_embeddings,
        }
    }

    /// Special token ids from the config.
    pub fn special_tokens(&self) -> &SpecialTokens {
        match self {
            ModelConfig::Gpt2(c) => &c.special_tokens,
            ModelConfig::Llama(c) => &c.special_tokens,
        }
    }
}

fn parse_rope(
    map: &Map<String, Value>,
    path: &Path,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling)> {
    if let Some(f) = get::<f64>(map, path, "partial_rotary_factor")?
        && f != 1.0
    {
        return Err(Error::config(
            path,
            "partial_rotary_factor",
            format!("partial rotary embeddings ({f}) are not supported"),
        ));
    }
    let top_theta = get::<f64>(map, path, "rope_theta")?;
    // transformers 5 writes `rope_parameters`; older configs `rope_scaling` (possibly null).
    let (field, params) = match (map.get("rope_parameters"), map.get("rope_scaling")) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(p)) if !p.is_null() => ("rope_scaling", Some(p)),
        _ => ("rope_parameters", None),
    };
    let Some(params) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::Default));
    };
    let obj = params.as_object().ok_or_else(|| {
        Error::config(path, field, "not an object (per-layer RoPE is not supported)")
    })?;
    let sub = |k: &str| format!("{field}.{k}");
    let num = |k: &str| -> Result<Option<f64>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| Error::config(path, sub(k), "not a number"))
            }
        }
    };
    for k in obj.keys() {
        let known = matches!(
            k.as_str(),
            "rope_type"
                | "type"
                | "rope_theta"
                | "factor"
                | "low_freq_factor"
                | "high_freq_factor"
                | "original_max_position_embeddings"
                | "partial_rotary_factor"
        );
        if !known {
            return Err(Error::config(path, sub(k), "unknown RoPE parameter"));
        }
    }
    if let Some(f) = num("partial_rotary_factor")?
        && f != 1.0
    {
        return Err(Error::config(
            path,
            sub("partial_rotary_factor"),
            format!("partial rotary embeddings ({f}) are not supported"),
        ));
    }
    let theta = num("rope_theta")?.or(top_theta).unwrap_or(10000.0);
    let rope_type = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .map(|v| v.as_str().ok_or_else(|| Error::config(path, sub("rope_type"), "not a string")))
        .transpose()?
        .unwrap_or("default");
    let need = |k: &str| -> Result<f64> {
        num(k)?.ok_or_else(|| {
            Error::config(path, sub(k), format!("required by rope_type `{rope_type}`"))
        })
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?
                .map_or(max_position_embeddings, |v| v as usize),
        },
        other => {
            return Err(Error::config(
                path,
                sub("rope_type"),
                format!(
                    "RoPE scaling `{other}` is not supported (supported: default, linear, llama3)"
                ),
            ));
        }
    };
    Ok((theta, scaling))
}

fn special_tokens(
    map: &Map<String, Value>,
    path: &Path,
    defaults: &SpecialTokens,
) -> Result<SpecialTokens> {
    Ok(SpecialTokens {
        bos_token_id: get_nullable(map, path, "bos_token_id")?.unwrap_or(defaults.bos_token_id),
        eos_token_id: get_nullable(map, path, "eos_token_id")?
            .unwrap_or_else(|| defaults.eos_token_id.clone()),
        pad_token_id: get_nullable(map, path, "pad_token_id")?.unwrap_or(defaults.pad_token_id),
    })
}

fn write_special_tokens(m: &mut Value, t: &SpecialTokens) {
    m["bos_token_id"] = json!(t.bos_token_id);
    m["eos_token_id"] = json!(t.eos_token_id);
    m["pad_token_id"] = json!(t.pad_token_id);
}

/// Reads `key` (absent or `null` → `None`).
fn get<T: DeserializeOwned>(map: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<T>> {
    Ok(get_nullable(map, path, key)?.flatten())
}

/// Reads `key`: absent → `None`, `null` → `Some(None)`.
fn get_nullable<T: DeserializeOwned>(
    map: &Map<String, Value>,
    path: &Path,
    key: &str,
) -> Result<Option<Option<T>>> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => T::deserialize(v)
            .map(|x| Some(Some(x)))
            .map_err(|e| Error::config(path, key, format!("invalid value {v}: {e}"))),
    }
}

fn check_prob(path: &Path, field: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::config(path, field, format!("{p} is not in [0, 1)")));
    }
    Ok(())
}

fn check_positive(path: &Path, field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::config(path, field, format!("{v} must be positive and finite")));
    }
    Ok(())
}

/// Moves a validation error of an in-memory config onto the file it came from.
fn relocate(e: Error, path: &Path) -> Error {
    match e {
        Error::Config { field, reason, .. } => {
            Error::Config { path: path.to_path_buf(), field, reason }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&v, Path::new("config.json"), UnknownFields::Reject)
    }

    #[test]
    fn gpt2_defaults_round_trip_through_hf_json() {
        let cfg = ModelConfig::Gpt2(Gpt2Config::default());
        let back = parse(cfg.to_hf_json()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn llama3_rope_scaling_is_parsed_from_legacy_spelling() {
        let v = json!({
            "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let ModelConfig::Llama(c) = parse(v).unwrap() else { panic!("not llama") };
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!(c.head_dim, 16);
        let back = parse(ModelConfig::Llama(c.clone()).to_hf_json()).unwrap();
        assert_eq!(back, ModelConfig::Llama(c));
    }

    #[test]
    fn unsupported_rope_type_names_the_field() {
        let v = json!({
            "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_scaling": {"type": "yarn", "factor": 4.0}
        });
        match parse(v) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "rope_scaling.rope_type"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_field_is_rejected_unless_warned() {
        let mut v = Gpt2Config::default().to_hf_json();
        v["use_flash_magic"] = json!(true);
        match parse(v.clone()) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "use_flash_magic"),
            other => panic!("expected a config error, got {other:?}"),
        }
        ModelConfig::from_hf_json(&v, Path::new("c.json"), UnknownFields::Warn).unwrap();
    }

    #[test]
    fn unknown_model_type_is_its_own_error() {
        let v = json!({"model_type": "bert"});
        assert!(
            matches!(parse(v), Err(Error::UnknownArchitecture { model_type, .. }) if model_type == "bert")
        );
    }

    #[test]
    fn mistral_defaults_to_a_4096_window_and_null_disables_it() {
        let base = json!({
            "model_type": "mistral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2
        });
        let ModelConfig::Llama(c) = parse(base.clone()).unwrap() else { panic!() };
        assert_eq!(c.sliding_window, Some(4096));
        let mut v = base;
        v["sliding_window"] = Value::Null;
        let ModelConfig::Llama(c) = parse(v).unwrap() else { panic!() };
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.layer_types, vec![LayerAttention::FullAttention; 2]);
    }

    #[test]
    fn bad_values_name_their_fields() {
        let cases = [
            (json!({"model_type": "gpt2", "n_embd": 10, "n_head": 3}), "n_head"),
            (json!({"model_type": "gpt2", "activation_function": "mish"}), "activation_function"),
            (json!({"model_type": "gpt2", "add_cross_attention": true}), "add_cross_attention"),
            (json!({"model_type": "gpt2", "n_layer": "two"}), "n_layer"),
            (
                json!({"model_type": "gpt2", "quantization_config": {"bits": 4}}),
                "quantization_config",
            ),
            (
                json!({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]}),
                "architectures",
            ),
        ];
        for (v, want) in cases {
            match parse(v) {
                Err(Error::Config { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: expected a config error, got {other:?}"),
            }
        }
    }
}
