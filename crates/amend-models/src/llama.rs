//! The Llama family: Llama 2 / 3 (with linear and `llama3` RoPE scaling), Mistral (sliding-window
//! attention) and Qwen2 (q/k/v biases), all with grouped-query attention and tied or untied
//! embeddings, with transformers' parameter names and `nn.Linear` `[out, in]` weights.
//!
//! References: Touvron et al., arXiv 2307.09288 (Llama 2); Dubey et al., arXiv 2407.21783
//! (Llama 3); Jiang et al., arXiv 2310.06825 (Mistral); Yang et al., arXiv 2407.10671 (Qwen2);
//! transformers `models/{llama,mistral,qwen2}/modeling_*.py`.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{LayerAttention, LlamaConfig, ModelConfig};
use crate::core::{Core, finish_load, open_dir, save};
use crate::layers::{
    KvCache, MaskSpec, Rope, activate, apply_rope, attention, build_mask, prepare, rms_norm,
};
use crate::model::{
    CausalLm, ForwardOptions, ForwardOutput, LayerWeight, LoadOptions, LogitsMode, MlpWeight,
    SaveOptions, WeightLayout,
};
use crate::params::Params;
use crate::source::{Builder, CopiedWeights, Init, RandomWeights, WeightSource};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Debug)]
struct Proj {
    w: Tensor,
    b: Option<Tensor>,
}

impl Proj {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.w, self.b.as_ref())?)
    }
}

#[derive(Debug)]
struct Layer {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
    input_norm: Tensor,
    post_norm: Tensor,
}

/// A Llama-family language model (Llama, Mistral, Qwen2).
///
/// ```
/// use amend_models::{CausalLm, Llama, LoadOptions};
/// # let dir = "tests/fixtures/models/llama"; // a tiny random Llama
/// let model = Llama::load(dir, &LoadOptions::default().with_kind(tch::Kind::BFloat16))?;
/// let ids = tch::Tensor::from_slice(&[1i64, 45, 99]).view([1, 3]);
/// let out = model.forward_hidden(&ids, None)?;
/// assert_eq!(out.hidden_states.len(), model.num_layers() + 1);
/// # Ok::<(), amend_models::Error>(())
/// ```
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    core: Core,
}

struct LlamaParts {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// Non-parameter buffers some Llama checkpoints contain (kept and written back on save).
fn ignorable(key: &str) -> bool {
    key.ends_with(".rotary_emb.inv_freq")
}

fn build(cfg: &LlamaConfig, src: &mut dyn WeightSource) -> Result<(LlamaParts, Params)> {
    let (v, h, i) = (cfg.vocab_size as i64, cfg.hidden_size as i64, cfg.intermediate_size as i64);
    let (nh, nkv, hd) =
        (cfg.num_attention_heads as i64, cfg.num_key_value_heads as i64, cfg.head_dim as i64);
    let std = cfg.initializer_range;
    let mut b = Builder::new(src);
    let embed = b.get("model.embed_tokens.weight", &[v, h], Init::Normal(std), None)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let ly = Some(l);
        let mut proj = |name: &str, out: i64, inp: i64, bias: bool| -> Result<Proj> {
            let w = b.get(
                &format!("model.layers.{l}.{name}.weight"),
                &[out, inp],
                Init::Normal(std),
                ly,
            )?;
            let bb =
                b.get_opt(bias, &format!("model.layers.{l}.{name}.bias"), &[out], Init::Zeros, ly)?;
            Ok(Proj { w, b: bb })
        };
        let qkv_bias = cfg.has_qkv_bias();
        let q = proj("self_attn.q_proj", nh * hd, h, qkv_bias)?;
        let k = proj("self_attn.k_proj", nkv * hd, h, qkv_bias)?;
        let vv = proj("self_attn.v_proj", nkv * hd, h, qkv_bias)?;
        let o = proj("self_attn.o_proj", h, nh * hd, cfg.attention_bias)?;
        let gate = proj("mlp.gate_proj", i, h, cfg.mlp_bias)?;
        let up = proj("mlp.up_proj", i, h, cfg.mlp_bias)?;
        let down = proj("mlp.down_proj", h, i, cfg.mlp_bias)?;
        let input_norm =
            b.get(&format!("model.layers.{l}.input_layernorm.weight"), &[h], Init::Ones, ly)?;
        let post_norm = b.get(
            &format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
            ly,
        )?;
        layers.push(Layer { q, k, v: vv, o, gate, up, down, input_norm, post_norm });
    }
    let norm = b.get("model.norm.weight", &[h], Init::Ones, None)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.shallow_clone()
    } else {
        b.get("lm_head.weight", &[v, h], Init::Normal(std), None)?
    };
    Ok((LlamaParts { embed, layers, norm, lm_head }, b.params))
}

impl Llama {
    fn from_parts(cfg: LlamaConfig, parts: LlamaParts, core: Core) -> Result<Self> {
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)?;
        let LlamaParts { embed, layers, norm, lm_head } = parts;
        Ok(Llama { config: ModelConfig::Llama(cfg), embed, layers, norm, lm_head, rope, core })
    }

    /// Loads a Hugging Face Llama, Mistral or Qwen2 directory (`config.json`,
    /// `model.safetensors` or a sharded index, optional `tokenizer.json` and
    /// `generation_config.json`).
    ///
    /// # Errors
    /// As [`Gpt2::load`](crate::Gpt2::load).
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let mut opened = open_dir(dir.as_ref(), opts)?;
        let cfg = match &opened.config {
            ModelConfig::Llama(c) => c.clone(),
            other => {
                return Err(Error::UnknownArchitecture {
                    path: opened.dir.join("config.json"),
                    model_type: format!(
                        "{} (expected llama, mistral or qwen2)",
                        other.model_type()
                    ),
                });
            }
        };
        let w = &mut opened.weights;
        let (parts, params) = build(&cfg, w)?;
        if cfg.tie_word_embeddings && w.reader.contains("lm_head.weight") {
            // A redundant copy of the tied matrix: checked, then dropped (transformers re-ties).
            let _ = w
                .reader
                .read("lm_head.weight", &[cfg.vocab_size as i64, cfg.hidden_size as i64])?;
        }
        let core = finish_load(opened, params, ignorable, opts)?;
        Llama::from_parts(cfg, parts, core)
    }

    /// A randomly initialised model (normal(0, initializer_range) weights, zero biases, unit
    /// norms), deterministic given `seed`.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::ModelTooLarge`] when its parameters
    /// cannot fit in memory; [`Error::Tch`].
    pub fn new_random(cfg: LlamaConfig, seed: u64, kind: Kind, device: Device) -> Result<Self> {
        cfg.validate()?;
        crate::params::check_float_kind("Llama::new_random", kind)?;
        let whole = crate::config::ModelConfig::Llama(cfg.clone());
        crate::machine::check_model_fits(&whole, kind, std::path::Path::new("<in memory>"))?;
        let mut src = RandomWeights::new(seed, kind, device);
        let (parts, params) = build(&cfg, &mut src)?;
        Llama::from_parts(cfg, parts, Core::new(params))
    }

    /// The Llama-family configuration.
    pub fn llama_config(&self) -> &LlamaConfig {
        match &self.config {
            ModelConfig::Llama(c) => c,
            // Invariant: a Llama is only ever built with a Llama-family config.
            _ => unreachable!("Llama holds a Llama config"),
        }
    }

    /// A deep copy (own storage), with the same trainable flags, mode and tokenizer.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn try_clone(&self) -> Result<Self> {
        let mut src = CopiedWeights::new(&self.core.params);
        let cfg = self.llama_config().clone();
        let (parts, params) = build(&cfg, &mut src)?;
        let core = self.core.copy_with(params)?;
        Llama::from_parts(cfg, parts, core)
    }

    /// Attaches a tokenizer (checked against the vocabulary) and the files to save with it.
    ///
    /// # Errors
    /// [`Error::TokenizerVocab`].
    pub fn set_tokenizer(
        &mut self,
        tokenizer: Tokenizer,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        tokenizer.check_fits(self.llama_config().vocab_size, Path::new("<tokenizer>"))?;
        self.core.tokenizer = Some(tokenizer);
        self.core.aux_files.extend(files);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: usize,
        ly: &Layer,
        h: &Tensor,
        mask: &MaskSpec,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = self.llama_config();
        let s = h.size();
        let (b, t) = (s[0], s[1]);
        let (nh, nkv, hd) =
            (cfg.num_attention_heads as i64, cfg.num_key_value_heads as i64, cfg.head_dim as i64);
        let x = rms_norm(h, &ly.input_norm, cfg.rms_norm_eps)?;
        let q = ly.q.apply(&x)?.f_view([b, t, nh, hd])?.f_transpose(1, 2)?;
        let k = ly.k.apply(&x)?.f_view([b, t, nkv, hd])?.f_transpose(1, 2)?;
        let v = ly.v.apply(&x)?.f_view([b, t, nkv, hd])?.f_transpose(1, 2)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(c) => c.update(l, &k, &v)?,
            None => (k, v),
        };
        let p = if self.core.training { cfg.attention_dropout } else { 0.0 };
        let a = attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt(), p, false)?;
        let a = a.f_transpose(1, 2)?.f_reshape([b, t, nh * hd])?;
        let h = h.f_add(&ly.o.apply(&a)?)?;
        let x = rms_norm(&h, &ly.post_norm, cfg.rms_norm_eps)?;
        let g = activate(&ly.gate.apply(&x)?, cfg.hidden_act)?;
        let m = ly.down.apply(&g.f_mul(&ly.up.apply(&x)?)?)?;
        Ok(h.f_add(&m)?)
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        let cfg = self.llama_config();
        let device = self.embed.device();
        let kind = self.embed.f_kind()?;
        let p = prepare(
            "Llama::forward",
            &self.config,
            device,
            input_ids,
            attention_mask,
            cache.as_deref(),
        )?;
        let full = build_mask(&p, None, device)?;
        let sliding = if cfg.layer_types.contains(&LayerAttention::SlidingAttention) {
            Some(build_mask(&p, cfg.sliding_window, device)?)
        } else {
            None
        };
        let (cos, sin) = self.rope.cos_sin(&p.positions, kind)?;
        let mut h = Tensor::f_embedding(&self.embed, &p.input_ids, -1, false, false)?;
        let mut hidden_states = Vec::new();
        if opts.hidden_states {
            hidden_states.push(h.shallow_clone());
        }
        for (l, ly) in self.layers.iter().enumerate() {
            let mask = match (cfg.layer_types[l], &sliding) {
                (LayerAttention::SlidingAttention, Some(m)) => m,
                _ => &full,
            };
            h = self.layer(l, ly, &h, mask, &cos, &sin, cache.as_deref_mut())?;
            if opts.hidden_states {
                hidden_states.push(h.shallow_clone());
            }
        }
        let last = rms_norm(&h, &self.norm, cfg.rms_norm_eps)?;
        let logits = match opts.logits {
            LogitsMode::All => Some(last.f_linear::<Tensor>(&self.lm_head, None)?),
            LogitsMode::Last => {
                Some(last.f_narrow(1, p.t as i64 - 1, 1)?.f_linear::<Tensor>(&self.lm_head, None)?)
            }
            LogitsMode::None => None,
        };
        if let Some(c) = cache {
            c.advance(p.t);
        }
        Ok(ForwardOutput { logits, hidden_states, last_hidden_state: last })
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    fn params(&self) -> &Params {
        &self.core.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.core.params
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        self.core.tokenizer.as_ref()
    }

    fn is_training(&self) -> bool {
        self.core.training
    }

    fn set_training(&mut self, training: bool) {
        self.core.training = training;
    }

    fn boxed_copy(&self) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn generation_config(&self) -> crate::GenerationConfig {
        self.core
            .generation
            .clone()
            .unwrap_or_else(|| crate::GenerationConfig::for_model_config(&self.config))
    }

    fn mlp_weight(&self, layer: usize, which: MlpWeight) -> Result<LayerWeight> {
        let ly = self.layers.get(layer).ok_or_else(|| {
            Error::invalid(
                "mlp_weight",
                "layer",
                format!("{layer} >= {} layers", self.layers.len()),
            )
        })?;
        let (name, proj) = match which {
            MlpWeight::Output => ("mlp.down_proj", &ly.down),
            MlpWeight::Input => ("mlp.up_proj", &ly.up),
            MlpWeight::Gate => ("mlp.gate_proj", &ly.gate),
        };
        Ok(LayerWeight {
            name: format!("model.layers.{layer}.{name}.weight"),
            tensor: proj.w.shallow_clone(),
            layout: WeightLayout::Linear,
            bias: proj
                .b
                .as_ref()
                .map(|b| (format!("model.layers.{layer}.{name}.bias"), b.shallow_clone())),
        })
    }

    fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<PathBuf> {
        save(&self.core, &self.config, dir, opts)
    }
}
