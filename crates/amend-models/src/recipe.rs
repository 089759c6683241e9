//! The tiny-model recipe: a byte-level BPE tokenizer trained on a text corpus and a small
//! GPT-2-architecture model trained from scratch on the same corpus, saved as a Hugging Face
//! directory. Used by the comparison tasks and tests; nothing is downloaded.
//!
//! The recipe takes any corpus (`&[String]`, one document per entry) and a [`TinyRecipe`]
//! (sizes, steps, learning rate, seed). A run is deterministic given the recipe and the corpus on
//! one machine with a fixed number of threads (BLAS summation order may differ across thread
//! counts). [`recipe_hash`] identifies a run for caching and [`load_or_train`] caches models under
//! that hash.
//!
//! # Data
//!
//! Each document is encoded as `<|endoftext|> tokens… <|endoftext|>` (the tokenizer's
//! post-processor adds the leading `<|endoftext|>`, which is the BOS, EOS and padding token), cut
//! to `n_positions` tokens. Batches are drawn from a seeded shuffle of the training documents,
//! right-padded, and trained with the mean next-token cross-entropy over real tokens. A held-out
//! fraction of documents gives the evaluation loss.
//!
//! ```no_run
//! use amend_models::recipe::{synthetic_corpus, train_tiny_model, RunOptions, TinyRecipe};
//! use amend_models::{generate, GenerationConfig};
//! let corpus = synthetic_corpus(2000, 0);
//! let (model, report) = train_tiny_model(&corpus, &TinyRecipe::default(), &RunOptions::default())?;
//! println!("eval perplexity {:.2}", report.eval_perplexity.unwrap_or(f64::NAN));
//! let out = generate(&model, &["the"], &GenerationConfig::sampling(12, 1.0, 0))?;
//! println!("{}", out[0].text.as_deref().unwrap_or(""));
//! # Ok::<(), amend_models::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

use crate::config::{Gpt2Config, SpecialTokens, TokenIds};
use crate::model::{CausalLm, SaveOptions};
use crate::tokenizer::{PaddingSide, Tokenizer, pad_batch};
use crate::train::{AdamWConfig, ScheduleKind, TrainConfig, Trainer, causal_lm_loss_sum};
use crate::{Error, Gpt2, LoadOptions, Result};

/// The special token of recipe tokenizers: BOS, EOS and padding.
pub const SPECIAL_TOKEN: &str = "<|endoftext|>";

/// Bumped whenever the recipe's code changes what a given recipe and corpus produce.
pub const RECIPE_VERSION: u32 = 1;

/// Tokenizer training settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizerRecipe {
    /// Target vocabulary size (256 byte tokens + the special token + merges).
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    pub min_frequency: u64,
}

impl Default for TokenizerRecipe {
    fn default() -> Self {
        TokenizerRecipe { vocab_size: 1024, min_frequency: 2 }
    }
}

/// Model sizes (GPT-2 architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TinyModelRecipe {
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Longest sequence (documents are cut to it).
    pub n_positions: usize,
    /// Dropout of embeddings, residuals and attention during training.
    pub dropout: f64,
}

impl Default for TinyModelRecipe {
    fn default() -> Self {
        TinyModelRecipe { n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128, dropout: 0.0 }
    }
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TinyTrainRecipe {
    /// Optimizer steps.
    pub steps: usize,
    /// Documents per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Schedule after warm-up.
    pub schedule: ScheduleKind,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW weight decay (biases and norms excluded).
    pub weight_decay: f64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// Fraction of documents held out for the evaluation loss.
    pub eval_fraction: f64,
}

impl Default for TinyTrainRecipe {
    fn default() -> Self {
        TinyTrainRecipe {
            steps: 800,
            batch_size: 32,
            lr: 3e-3,
            warmup_steps: 40,
            schedule: ScheduleKind::Cosine,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            eval_fraction: 0.05,
        }
    }
}

/// The whole recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TinyRecipe {
    /// Tokenizer settings.
    pub tokenizer: TokenizerRecipe,
    /// Model sizes.
    pub model: TinyModelRecipe,
    /// Optimisation.
    pub train: TinyTrainRecipe,
    /// Seed of the initialisation, the data order and dropout.
    pub seed: u64,
}

impl Default for TinyRecipe {
    /// About 0.9 M parameters with a 1024-token vocabulary; a few minutes on 2 cores.
    fn default() -> Self {
        TinyRecipe {
            tokenizer: TokenizerRecipe::default(),
            model: TinyModelRecipe::default(),
            train: TinyTrainRecipe::default(),
            seed: 0,
        }
    }
}

impl TinyRecipe {
    /// A very small recipe for tests and examples (a few seconds): 2 layers of width 48, a
    /// 400-token vocabulary, 150 steps of 16 documents.
    pub fn quick() -> Self {
        TinyRecipe {
            tokenizer: TokenizerRecipe { vocab_size: 400, min_frequency: 2 },
            model: TinyModelRecipe {
                n_layer: 2,
                n_head: 2,
                n_embd: 48,
                n_positions: 64,
                dropout: 0.0,
            },
            train: TinyTrainRecipe {
                steps: 150,
                batch_size: 16,
                lr: 1e-2,
                warmup_steps: 10,
                ..TinyTrainRecipe::default()
            },
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        let op = "train_tiny_model";
        if self.tokenizer.vocab_size < 258 {
            return Err(Error::invalid(
                op,
                "tokenizer.vocab_size",
                "must be at least 258 (256 bytes + special + 1 merge)",
            ));
        }
        if self.train.steps == 0 || self.train.batch_size == 0 {
            return Err(Error::invalid(op, "train", "steps and batch_size must be positive"));
        }
        if !(0.0..0.5).contains(&self.train.eval_fraction) {
            return Err(Error::invalid(op, "train.eval_fraction", "must be in [0, 0.5)"));
        }
        if self.model.n_positions < 2 {
            return Err(Error::invalid(op, "model.n_positions", "must be at least 2"));
        }
        Ok(())
    }
}

/// Options of one run that do not change its result (and are not hashed).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show a progress bar.
    pub progress: bool,
    /// JSONL metrics file of the training run.
    pub metrics_path: Option<PathBuf>,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyModelReport {
    /// [`recipe_hash`] of the recipe and corpus.
    pub hash: String,
    /// Vocabulary size of the trained tokenizer (= model vocabulary).
    pub vocab_size: usize,
    /// Parameters of the model.
    pub num_parameters: usize,
    /// Mean training loss over the last 10 steps.
    pub train_loss: f64,
    /// Mean next-token loss on the held-out documents.
    pub eval_loss: Option<f64>,
    /// `exp(eval_loss)`.
    pub eval_perplexity: Option<f64>,
    /// Training documents / held-out documents.
    pub documents: (usize, usize),
    /// Tokens trained on.
    pub tokens_seen: usize,
    /// Wall time of tokenizer and model training.
    pub seconds: f64,
}

/// A stable hex SHA-256 of the recipe, the corpus and [`RECIPE_VERSION`]: equal hashes mean
/// equal runs.
pub fn recipe_hash(corpus: &[String], recipe: &TinyRecipe) -> String {
    let mut h = Sha256::new();
    h.update(b"amend-tiny-recipe");
    h.update(RECIPE_VERSION.to_le_bytes());
    // Invariant: the recipe is plain data and always serialises.
    h.update(serde_json::to_vec(recipe).expect("recipe serialises"));
    h.update((corpus.len() as u64).to_le_bytes());
    for doc in corpus {
        h.update((doc.len() as u64).to_le_bytes());
        h.update(doc.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Trains a byte-level BPE tokenizer (GPT-2 style, no prefix space) on `corpus`, with
/// [`SPECIAL_TOKEN`] as id 0 and a post-processor that puts it before every encoded text.
/// Returns the tokenizer and the files a Hugging Face directory needs for it
/// (`tokenizer.json`, `tokenizer_config.json`).
///
/// # Errors
/// [`Error::InvalidInput`] for an empty corpus; [`Error::Tokenizer`].
pub fn train_bpe_tokenizer(
    corpus: &[String],
    cfg: &TokenizerRecipe,
    model_max_length: usize,
) -> Result<(Tokenizer, Vec<NamedFile>)> {
    if corpus.iter().all(|d| d.trim().is_empty()) {
        return Err(Error::invalid("train_bpe_tokenizer", "corpus", "no text"));
    }
    let tok_err = |source| Error::Tokenizer { path: None, source };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(SPECIAL_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(tok_err)?;
    tok.train(&mut trainer, corpus.iter()).map_err(tok_err)?;
    let special = tok.token_to_id(SPECIAL_TOKEN).ok_or_else(|| {
        Error::invalid("train_bpe_tokenizer", "special", "special token missing after training")
    })?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{SPECIAL_TOKEN} $A"))
        .and_then(|b| b.try_pair(format!("{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B")))
        .map_err(|e| Error::invalid("train_bpe_tokenizer", "template", e.to_string()))?
        .special_tokens(vec![(SPECIAL_TOKEN.to_string(), special)])
        .build()
        .map_err(|e| Error::invalid("train_bpe_tokenizer", "template", e.to_string()))?;
    tok.with_post_processor(Some(post));
    let json = tok.to_string(false).map_err(tok_err)?;
    let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(tok_err)?;
    let tokenizer = Tokenizer::from_inner(inner).with_special_tokens(
        Some(special),
        vec![special],
        Some(special),
    );
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKEN,
        "eos_token": SPECIAL_TOKEN,
        "unk_token": SPECIAL_TOKEN,
        "pad_token": SPECIAL_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
    });
    // Invariant: a json! value always serialises.
    let files = vec![
        ("tokenizer.json".to_string(), json.into_bytes()),
        (
            "tokenizer_config.json".to_string(),
            serde_json::to_vec_pretty(&tok_config).expect("json"),
        ),
    ];
    Ok((tokenizer, files))
}

/// Builds and trains the tiny model on `corpus` (see the [module docs](self)).
///
/// # Errors
/// [`Error::InvalidInput`] for an invalid recipe or a corpus with fewer than 2 documents;
/// tokenizer and training errors.
pub fn train_tiny_model(
    corpus: &[String],
    recipe: &TinyRecipe,
    run: &RunOptions,
) -> Result<(Gpt2, TinyModelReport)> {
    recipe.validate()?;
    if corpus.len() < 2 {
        return Err(Error::invalid("train_tiny_model", "corpus", "needs at least 2 documents"));
    }
    let t0 = Instant::now();
    let hash = recipe_hash(corpus, recipe);
    let m = &recipe.model;
    let (tokenizer, files) = train_bpe_tokenizer(corpus, &recipe.tokenizer, m.n_positions)?;
    let special = tokenizer.pad_token_id();
    let vocab = tokenizer.max_token_id().map_or(0, |x| x as usize + 1);

    // Documents → token ids, shuffled once and split into train / eval.
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(recipe.seed);
    let mut docs: Vec<Vec<u32>> = Vec::with_capacity(corpus.len());
    for d in corpus {
        let mut ids = tokenizer.encode(d, true)?;
        ids.push(special);
        ids.truncate(m.n_positions);
        if ids.len() >= 2 {
            docs.push(ids);
        }
    }
    if docs.len() < 2 {
        return Err(Error::invalid(
            "train_tiny_model",
            "corpus",
            "fewer than 2 non-empty documents",
        ));
    }
    docs.shuffle(&mut rng);
    let n_eval =
        ((docs.len() as f64 * recipe.train.eval_fraction).round() as usize).min(docs.len() - 1);
    let eval_docs = docs.split_off(docs.len() - n_eval);

    let cfg = Gpt2Config {
        vocab_size: vocab,
        n_positions: m.n_positions,
        n_embd: m.n_embd,
        n_layer: m.n_layer,
        n_head: m.n_head,
        resid_pdrop: m.dropout,
        embd_pdrop: m.dropout,
        attn_pdrop: m.dropout,
        special_tokens: SpecialTokens {
            bos_token_id: Some(special),
            eos_token_id: Some(TokenIds::One(special)),
            pad_token_id: Some(special),
        },
        ..Gpt2Config::default()
    };
    let mut model = Gpt2::new_random(cfg, recipe.seed, Kind::Float, Device::Cpu)?;
    let gen_config = serde_json::json!({
        "bos_token_id": special, "eos_token_id": special, "pad_token_id": special, "do_sample": false,
    });
    let mut files = files;
    // Invariant: a json! value always serialises.
    files.push((
        "generation_config.json".into(),
        serde_json::to_vec_pretty(&gen_config).expect("json"),
    ));
    model.set_tokenizer(tokenizer, files)?;

    let t = &recipe.train;
    let train_cfg = TrainConfig {
        steps: t.steps,
        lr: t.lr,
        schedule: t.schedule,
        warmup_steps: t.warmup_steps,
        min_lr_ratio: t.min_lr_ratio,
        optimizer: AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
        max_grad_norm: Some(t.max_grad_norm),
        grad_accum_steps: 1,
        log_every: 1,
        metrics_path: run.metrics_path.clone(),
        checkpoint_every: None,
        checkpoint_dir: None,
        progress: run.progress,
        seed: recipe.seed,
    };
    let mut trainer = Trainer::new(&model, train_cfg)?;
    let mut order: Vec<usize> = (0..docs.len()).collect();
    let mut cursor = order.len();
    let summary = trainer.fit(&mut model, |model, step| {
        let mut batch = Vec::with_capacity(t.batch_size);
        for _ in 0..t.batch_size {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            batch.push(docs[order[cursor]].clone());
            cursor += 1;
        }
        let b = pad_batch(&batch, special, PaddingSide::Right, Device::Cpu)?;
        let logits = model.forward(&b.input_ids, Some(&b.attention_mask))?;
        let (sum, count) = causal_lm_loss_sum(&logits, &b.input_ids, Some(&b.attention_mask))?;
        step.backward(&sum.f_div_scalar(count.max(1.0))?)?;
        step.add_tokens(count as usize);
        Ok(())
    })?;

    let eval_loss =
        if eval_docs.is_empty() { None } else { Some(mean_loss(&model, &eval_docs, special)?) };
    let report = TinyModelReport {
        hash,
        vocab_size: vocab,
        num_parameters: model.params().num_elements(false),
        train_loss: summary.tail_loss,
        eval_loss,
        eval_perplexity: eval_loss.map(f64::exp),
        documents: (docs.len(), eval_docs.len()),
        tokens_seen: summary.tokens,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((model, report))
}

/// Mean next-token loss over `docs` (no grad).
fn mean_loss(model: &Gpt2, docs: &[Vec<u32>], pad: u32) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut count) = (0.0, 0.0);
    for chunk in docs.chunks(64) {
        let b = pad_batch(chunk, pad, PaddingSide::Right, Device::Cpu)?;
        let logits = model.forward(&b.input_ids, Some(&b.attention_mask))?;
        let (s, c) = causal_lm_loss_sum(&logits, &b.input_ids, Some(&b.attention_mask))?;
        sum += s.f_double_value(&[])?;
        count += c;
    }
    Ok(if count > 0.0 { sum / count } else { 0.0 })
}

/// A file to write next to the weights: (file name, bytes).
pub type NamedFile = (String, Vec<u8>);

/// Report file written next to a cached model.
pub const REPORT_FILE: &str = "recipe_report.json";
/// Recipe file written next to a cached model.
pub const RECIPE_FILE: &str = "recipe.json";

/// The cache root: `$AMEND_CACHE_DIR`, else `$XDG_CACHE_HOME/amend`, else `~/.cache/amend`
/// (empty variables count as unset). Without `XDG_CACHE_HOME` this is the folder
/// `scripts/setup-libtorch.sh` installs PyTorch into.
pub fn default_cache_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty("AMEND_CACHE_DIR") {
        return dir;
    }
    if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        return xdg.join("amend");
    }
    nonempty("HOME").unwrap_or_else(std::env::temp_dir).join(".cache").join("amend")
}

/// Where trained models are cached by default (the comparison's base models, the fact-edit
/// task's model): `<`[`default_cache_dir`]`>/models`, to pass to [`load_or_train`].
pub fn default_model_cache() -> PathBuf {
    default_cache_dir().join("models")
}

/// The cache directory of a recipe and corpus: `cache_dir/tiny-gpt2-<first 16 hex of the hash>`.
pub fn cache_path(cache_dir: &Path, corpus: &[String], recipe: &TinyRecipe) -> PathBuf {
    cache_dir.join(format!("tiny-gpt2-{}", &recipe_hash(corpus, recipe)[..16]))
}

/// Loads the model of this recipe and corpus from `cache_dir` if a previous run saved it there,
/// otherwise trains it and saves it (atomically) as a Hugging Face directory with the recipe and
/// the report. Returns the model, the report and the directory.
///
/// # Errors
/// As [`train_tiny_model`] and [`Gpt2::load`]; [`Error::Io`], [`Error::Json`].
pub fn load_or_train(
    cache_dir: &Path,
    corpus: &[String],
    recipe: &TinyRecipe,
    run: &RunOptions,
) -> Result<(Gpt2, TinyModelReport, PathBuf)> {
    let dir = cache_path(cache_dir, corpus, recipe);
    if let Some(found) = load_cached(&dir, corpus, recipe)? {
        return Ok((found.0, found.1, dir));
    }
    let (model, report) = train_tiny_model(corpus, recipe, run)?;
    let mut extra = std::collections::BTreeMap::new();
    let json = |v: serde_json::Value, name: &str| {
        serde_json::to_vec_pretty(&v).map_err(|source| Error::Json { path: dir.join(name), source })
    };
    extra.insert(
        RECIPE_FILE.to_string(),
        json(serde_json::json!({ "hash": report.hash, "recipe": recipe }), RECIPE_FILE)?,
    );
    extra.insert(
        REPORT_FILE.to_string(),
        json(serde_json::to_value(&report).unwrap_or_default(), REPORT_FILE)?,
    );
    match model.save_pretrained(&dir, &SaveOptions { extra_files: extra, ..SaveOptions::default() })
    {
        Ok(_) => Ok((model, report, dir)),
        // Another process finished the same run first: use its (identical) result.
        Err(Error::OutputDir { .. }) if dir.join(REPORT_FILE).is_file() => {
            let found = load_cached(&dir, corpus, recipe)?.ok_or_else(|| Error::OutputDir {
                path: dir.clone(),
                reason: "holds a different recipe".into(),
            })?;
            Ok((found.0, found.1, dir))
        }
        Err(e) => Err(e),
    }
}

fn load_cached(
    dir: &Path,
    corpus: &[String],
    recipe: &TinyRecipe,
) -> Result<Option<(Gpt2, TinyModelReport)>> {
    let report_path = dir.join(REPORT_FILE);
    if !report_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&report_path).map_err(|e| Error::io(&report_path, e))?;
    let report: TinyModelReport = serde_json::from_str(&text)
        .map_err(|source| Error::Json { path: report_path.clone(), source })?;
    if report.hash != recipe_hash(corpus, recipe) {
        return Err(Error::OutputDir {
            path: dir.to_path_buf(),
            reason: format!(
                "cached model has hash {} (hash prefix collision or a modified cache)",
                report.hash
            ),
        });
    }
    let model = Gpt2::load(dir, &LoadOptions::default())?;
    Ok(Some((model, report)))
}

/// A small synthetic English-like corpus for tests and docs: `n_docs` short documents from a
/// seeded template grammar (about 150 words).
///
/// ```
/// let a = amend_models::recipe::synthetic_corpus(3, 7);
/// assert_eq!(a, amend_models::recipe::synthetic_corpus(3, 7));
/// assert_eq!(a.len(), 3);
/// ```
pub fn synthetic_corpus(n_docs: usize, seed: u64) -> Vec<String> {
    const ADJ: &[&str] = &[
        "small", "large", "red", "blue", "green", "quiet", "loud", "old", "young", "bright",
        "dark", "happy", "tired", "clever", "gentle", "brave", "soft", "warm", "cold", "quick",
    ];
    const NOUN: &[&str] = &[
        "cat", "dog", "bird", "fox", "horse", "child", "farmer", "teacher", "river", "tree",
        "house", "garden", "boat", "book", "window", "mountain", "village", "friend", "baker",
        "lamp",
    ];
    const VERB: &[&str] = &[
        "sees",
        "likes",
        "follows",
        "finds",
        "helps",
        "watches",
        "paints",
        "carries",
        "visits",
        "hears",
        "calls",
        "remembers",
    ];
    const INTRANS: &[&str] =
        &["sleeps", "runs", "sings", "waits", "rests", "laughs", "walks", "dreams"];
    const PREP: &[&str] = &["near", "under", "behind", "beside", "above", "inside"];
    const TIME: &[&str] =
        &["today", "at night", "in the morning", "every day", "after the rain", "in winter"];
    const NAME: &[&str] = &["anna", "ben", "clara", "david", "emma", "felix", "grace", "hugo"];
    fn pick(rng: &mut Xoshiro256PlusPlus, xs: &[&'static str]) -> &'static str {
        xs[rng.random_range(0..xs.len())]
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let r = &mut rng;
    let mut docs = Vec::with_capacity(n_docs);
    for _ in 0..n_docs {
        let n = r.random_range(1..=3usize);
        let mut sentences = Vec::with_capacity(n);
        for _ in 0..n {
            let s = match r.random_range(0..5u32) {
                0 => format!(
                    "the {} {} {} the {} {}.",
                    pick(r, ADJ),
                    pick(r, NOUN),
                    pick(r, VERB),
                    pick(r, NOUN),
                    pick(r, TIME)
                ),
                1 => format!(
                    "{} {} {} the {} {}.",
                    pick(r, NAME),
                    pick(r, INTRANS),
                    pick(r, PREP),
                    pick(r, ADJ),
                    pick(r, NOUN)
                ),
                2 => format!(
                    "a {} {} {} the {}.",
                    pick(r, NOUN),
                    pick(r, INTRANS),
                    pick(r, PREP),
                    pick(r, NOUN)
                ),
                3 => format!(
                    "where is the {}? the {} is {} the {}.",
                    pick(r, NOUN),
                    pick(r, NOUN),
                    pick(r, PREP),
                    pick(r, NOUN)
                ),
                _ => format!(
                    "{} {} a {} {}.",
                    pick(r, NAME),
                    pick(r, VERB),
                    pick(r, ADJ),
                    pick(r, NOUN)
                ),
            };
            sentences.push(s);
        }
        docs.push(sentences.join(" "));
    }
    docs
}
