//! GPT-2 (`GPT2LMHeadModel`), with transformers' parameter names and Conv1D `[in, out]` weights.
//!
//! Reference: Radford et al., "Language Models are Unsupervised Multitask Learners" (2019);
//! transformers `models/gpt2/modeling_gpt2.py`.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{Gpt2Config, ModelConfig};
use crate::core::{Core, finish_load, open_dir, save};
use crate::layers::{
    KvCache, MaskSpec, activate, attention, build_mask, dropout, layer_norm, prepare,
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
struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: (Tensor, Tensor),
    attn_proj: (Tensor, Tensor),
    ln_2: (Tensor, Tensor),
    c_fc: (Tensor, Tensor),
    mlp_proj: (Tensor, Tensor),
}

/// A GPT-2 language model.
///
/// ```
/// use amend_models::{CausalLm, Gpt2, LoadOptions};
/// # let dir = "tests/fixtures/models/gpt2"; // a tiny random GPT-2
/// let model = Gpt2::load(dir, &LoadOptions::default())?;
/// let ids = tch::Tensor::from_slice(&[64i64, 290, 18]).view([1, 3]);
/// let logits = model.forward_no_grad(&ids, None)?;
/// assert_eq!(logits.size(), vec![1, 3, 320]); // [b_sz, seq_len, vocab]
/// # Ok::<(), amend_models::Error>(())
/// ```
#[derive(Debug)]
pub struct Gpt2 {
    config: ModelConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    lm_head: Tensor,
    core: Core,
}

/// Checkpoint keys GPT-2 files may hold besides the parameters: the causal-mask buffers of old
/// transformers versions. They are kept and written back on save.
fn ignorable(key: &str) -> bool {
    key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias")
}

fn build(cfg: &Gpt2Config, src: &mut dyn WeightSource) -> Result<(Gpt2Parts, Params)> {
    let (v, p, h, i) =
        (cfg.vocab_size as i64, cfg.n_positions as i64, cfg.n_embd as i64, cfg.inner_size() as i64);
    let std = cfg.initializer_range;
    let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
    let mut b = Builder::new(src);
    let wte = b.get("transformer.wte.weight", &[v, h], Init::Normal(std), None)?;
    let wpe = b.get("transformer.wpe.weight", &[p, h], Init::Normal(std), None)?;
    let mut blocks = Vec::with_capacity(cfg.n_layer);
    for l in 0..cfg.n_layer {
        let n = |s: &str| format!("transformer.h.{l}.{s}");
        let ly = Some(l);
        let mut pair =
            |w: &str, ws: &[i64], wi: Init, bs: &[i64], bi: Init| -> Result<(Tensor, Tensor)> {
                Ok((
                    b.get(&n(&format!("{w}.weight")), ws, wi, ly)?,
                    b.get(&n(&format!("{w}.bias")), bs, bi, ly)?,
                ))
            };
        let ln_1 = pair("ln_1", &[h], Init::Ones, &[h], Init::Zeros)?;
        let c_attn = pair("attn.c_attn", &[h, 3 * h], Init::Normal(std), &[3 * h], Init::Zeros)?;
        let attn_proj = pair("attn.c_proj", &[h, h], Init::Normal(proj_std), &[h], Init::Zeros)?;
        let ln_2 = pair("ln_2", &[h], Init::Ones, &[h], Init::Zeros)?;
        let c_fc = pair("mlp.c_fc", &[h, i], Init::Normal(std), &[i], Init::Zeros)?;
        let mlp_proj = pair("mlp.c_proj", &[i, h], Init::Normal(proj_std), &[h], Init::Zeros)?;
        blocks.push(Block { ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj });
    }
    let ln_f = (
        b.get("transformer.ln_f.weight", &[h], Init::Ones, None)?,
        b.get("transformer.ln_f.bias", &[h], Init::Zeros, None)?,
    );
    let lm_head = if cfg.tie_word_embeddings {
        wte.shallow_clone()
    } else {
        b.get("lm_head.weight", &[v, h], Init::Normal(std), None)?
    };
    Ok((Gpt2Parts { wte, wpe, blocks, ln_f, lm_head }, b.params))
}

struct Gpt2Parts {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    lm_head: Tensor,
}

/// `x·W + b` for a Conv1D weight `[in, out]` on `x: [b, t, in]`.
fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let s = x.size();
    let out = w.size()[1];
    let x2 = x.f_reshape([-1, s[s.len() - 1]])?;
    Ok(b.f_addmm(&x2, w)?.f_view([s[0], s[1], out])?)
}

impl Gpt2 {
    fn from_parts(config: Gpt2Config, parts: Gpt2Parts, core: Core) -> Self {
        let Gpt2Parts { wte, wpe, blocks, ln_f, lm_head } = parts;
        Gpt2 { config: ModelConfig::Gpt2(config), wte, wpe, blocks, ln_f, lm_head, core }
    }

    /// Loads a Hugging Face GPT-2 directory (`config.json`, `model.safetensors` or a sharded
    /// index, optional `tokenizer.json` and `generation_config.json`). Files saved from
    /// `GPT2Model` (keys without the `transformer.` prefix) load too.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::Config`], [`Error::UnknownArchitecture`] (a
    /// non-GPT-2 config), [`Error::ModelTooLarge`] (checked before reading any tensor),
    /// [`Error::NoWeights`], [`Error::TruncatedFile`], [`Error::Safetensors`],
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::TensorShape`],
    /// [`Error::TensorDtype`], [`Error::Tokenizer`], [`Error::TokenizerVocab`].
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let mut opened = open_dir(dir.as_ref(), opts)?;
        let cfg = match &opened.config {
            ModelConfig::Gpt2(c) => c.clone(),
            other => {
                return Err(Error::UnknownArchitecture {
                    path: opened.dir.join("config.json"),
                    model_type: format!("{} (expected gpt2)", other.model_type()),
                });
            }
        };
        let w = &mut opened.weights;
        if !w.reader.contains("transformer.wte.weight") && w.reader.contains("wte.weight") {
            w.prefix_strip = Some("transformer.".into());
        }
        let (parts, params) = build(&cfg, w)?;
        if cfg.tie_word_embeddings && w.reader.contains("lm_head.weight") {
            // A redundant copy of the tied matrix: checked, then dropped (transformers re-ties).
            let _ = w.reader.read("lm_head.weight", &[cfg.vocab_size as i64, cfg.n_embd as i64])?;
        }
        let core = finish_load(opened, params, ignorable, opts)?;
        Ok(Gpt2::from_parts(cfg, parts, core))
    }

    /// A randomly initialised model (transformers' GPT-2 scheme: normal(0, initializer_range)
    /// weights, the residual projections scaled by `1/sqrt(2·n_layer)`, zero biases, unit norms),
    /// deterministic given `seed`.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::ModelTooLarge`] when its parameters
    /// cannot fit in memory; [`Error::Tch`].
    pub fn new_random(cfg: Gpt2Config, seed: u64, kind: Kind, device: Device) -> Result<Self> {
        cfg.validate()?;
        crate::params::check_float_kind("Gpt2::new_random", kind)?;
        let whole = crate::config::ModelConfig::Gpt2(cfg.clone());
        crate::machine::check_model_fits(&whole, kind, std::path::Path::new("<in memory>"))?;
        let mut src = RandomWeights::new(seed, kind, device);
        let (parts, params) = build(&cfg, &mut src)?;
        Ok(Gpt2::from_parts(cfg, parts, Core::new(params)))
    }

    /// The GPT-2 configuration.
    pub fn gpt2_config(&self) -> &Gpt2Config {
        match &self.config {
            ModelConfig::Gpt2(c) => c,
            // Invariant: a Gpt2 is only ever built with a GPT-2 config.
            _ => unreachable!("Gpt2 holds a GPT-2 config"),
        }
    }

    /// A deep copy (own storage), with the same trainable flags, mode and tokenizer.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn try_clone(&self) -> Result<Self> {
        let mut src = CopiedWeights::new(&self.core.params);
        let cfg = self.gpt2_config().clone();
        let (parts, params) = build(&cfg, &mut src)?;
        let core = self.core.copy_with(params)?;
        Ok(Gpt2::from_parts(cfg, parts, core))
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
        tokenizer.check_fits(self.gpt2_config().vocab_size, Path::new("<tokenizer>"))?;
        self.core.tokenizer = Some(tokenizer);
        self.core.aux_files.extend(files);
        Ok(())
    }

    fn block(
        &self,
        l: usize,
        blk: &Block,
        h: &Tensor,
        mask: &MaskSpec,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = self.gpt2_config();
        let train = self.core.training;
        let s = h.size();
        let (b, t, d) = (s[0], s[1], s[2]);
        let nh = cfg.n_head as i64;
        let hd = d / nh;
        let x = layer_norm(h, &blk.ln_1.0, &blk.ln_1.1, cfg.layer_norm_epsilon)?;
        let qkv = conv1d(&x, &blk.c_attn.0, &blk.c_attn.1)?;
        let parts = qkv.f_split(d, 2)?;
        let heads =
            |x: &Tensor| -> Result<Tensor> { Ok(x.f_view([b, t, nh, hd])?.f_transpose(1, 2)?) };
        let (q, k, v) = (heads(&parts[0])?, heads(&parts[1])?, heads(&parts[2])?);
        let (k, v) = match cache {
            Some(c) => c.update(l, &k, &v)?,
            None => (k, v),
        };
        let mut scale = if cfg.scale_attn_weights { 1.0 / (hd as f64).sqrt() } else { 1.0 };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (l + 1) as f64;
        }
        let p_attn = if train { cfg.attn_pdrop } else { 0.0 };
        let a = attention(&q, &k, &v, mask, scale, p_attn, cfg.reorder_and_upcast_attn)?;
        let a = a.f_transpose(1, 2)?.f_reshape([b, t, d])?;
        let a = dropout(conv1d(&a, &blk.attn_proj.0, &blk.attn_proj.1)?, cfg.resid_pdrop, train)?;
        let h = h.f_add(&a)?;
        let x = layer_norm(&h, &blk.ln_2.0, &blk.ln_2.1, cfg.layer_norm_epsilon)?;
        let m = activate(&conv1d(&x, &blk.c_fc.0, &blk.c_fc.1)?, cfg.activation_function)?;
        let m = dropout(conv1d(&m, &blk.mlp_proj.0, &blk.mlp_proj.1)?, cfg.resid_pdrop, train)?;
        Ok(h.f_add(&m)?)
    }
}

impl CausalLm for Gpt2 {
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
        let cfg = self.gpt2_config();
        let device = self.wte.device();
        let p = prepare(
            "Gpt2::forward",
            &self.config,
            device,
            input_ids,
            attention_mask,
            cache.as_deref(),
        )?;
        let mask = build_mask(&p, None, device)?;
        let tok = Tensor::f_embedding(&self.wte, &p.input_ids, -1, false, false)?;
        let pos = Tensor::f_embedding(&self.wpe, &p.positions, -1, false, false)?;
        let mut h = dropout(tok.f_add(&pos)?, cfg.embd_pdrop, self.core.training)?;
        let mut hidden_states = Vec::new();
        if opts.hidden_states {
            hidden_states.push(h.shallow_clone());
        }
        for (l, blk) in self.blocks.iter().enumerate() {
            h = self.block(l, blk, &h, &mask, cache.as_deref_mut())?;
            if opts.hidden_states {
                hidden_states.push(h.shallow_clone());
            }
        }
        let last = layer_norm(&h, &self.ln_f.0, &self.ln_f.1, cfg.layer_norm_epsilon)?;
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
        let blk = self.blocks.get(layer).ok_or_else(|| {
            Error::invalid(
                "mlp_weight",
                "layer",
                format!("{layer} >= {} layers", self.blocks.len()),
            )
        })?;
        let (name, pair) = match which {
            MlpWeight::Output => ("mlp.c_proj", &blk.mlp_proj),
            MlpWeight::Input => ("mlp.c_fc", &blk.c_fc),
            MlpWeight::Gate => {
                return Err(Error::invalid("mlp_weight", "which", "GPT-2 has no gate projection"));
            }
        };
        Ok(LayerWeight {
            name: format!("transformer.h.{layer}.{name}.weight"),
            tensor: pair.0.shallow_clone(),
            layout: WeightLayout::Conv1D,
            bias: Some((format!("transformer.h.{layer}.{name}.bias"), pair.1.shallow_clone())),
        })
    }

    fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<PathBuf> {
        save(&self.core, &self.config, dir, opts)
    }
}
