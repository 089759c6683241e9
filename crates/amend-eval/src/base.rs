//! The base model `p°` of the synthetic task: a tiny GPT-2 trained once by the project's
//! tiny-model recipe ([`amend_models::recipe`]) on the task's corpus and cached by the hash of
//! the recipe and the corpus.

use std::path::{Path, PathBuf};

use amend_models::Gpt2;
use amend_models::recipe::{
    RunOptions, TinyModelRecipe, TinyModelReport, TinyRecipe, TinyTrainRecipe, TokenizerRecipe,
    load_or_train,
};

use crate::Result;

pub use amend_models::recipe::{default_cache_dir, default_model_cache};

/// The recipe of the default comparison's base model: 2 layers of width 64, 4 heads, a
/// 512-token vocabulary, 64 positions (137 k parameters), 1200 steps of 32 documents at a peak
/// learning rate of 5e-3 (50 warm-up steps, cosine to 10 %). About a minute on 2 cores in
/// release.
pub fn base_recipe(seed: u64) -> TinyRecipe {
    TinyRecipe {
        tokenizer: TokenizerRecipe { vocab_size: 512, min_frequency: 2 },
        model: TinyModelRecipe { n_layer: 2, n_head: 4, n_embd: 64, n_positions: 64, dropout: 0.0 },
        train: TinyTrainRecipe {
            steps: 1200,
            batch_size: 32,
            lr: 5e-3,
            warmup_steps: 50,
            ..TinyTrainRecipe::default()
        },
        seed,
    }
}

/// The recipe of `--quick`: 2 layers of width 64, a 512-token vocabulary, 400 steps of 32
/// documents (about 20 s on 2 cores in release, about 30 s in a debug build).
pub fn quick_base_recipe(seed: u64) -> TinyRecipe {
    TinyRecipe {
        tokenizer: TokenizerRecipe { vocab_size: 512, min_frequency: 2 },
        model: TinyModelRecipe { n_layer: 2, n_head: 4, n_embd: 64, n_positions: 64, dropout: 0.0 },
        train: TinyTrainRecipe {
            steps: 400,
            batch_size: 32,
            lr: 5e-3,
            warmup_steps: 20,
            ..TinyTrainRecipe::default()
        },
        seed,
    }
}

/// The recipe of the `standard` base model (`amend compare --base-model standard`): 4 layers of
/// width 192, 6 heads, the same 512-token vocabulary and 64 positions (1.9 M parameters, 14
/// times the default's), 1500 steps of 32 documents at a peak learning rate of 2e-3 (100
/// warm-up steps, cosine to 10 %). About 5 minutes on 2 cores in release (316 s measured on an
/// Intel Xeon; `docs/compare.md`).
pub fn standard_base_recipe(seed: u64) -> TinyRecipe {
    TinyRecipe {
        tokenizer: TokenizerRecipe { vocab_size: 512, min_frequency: 2 },
        model: TinyModelRecipe {
            n_layer: 4,
            n_head: 6,
            n_embd: 192,
            n_positions: 64,
            dropout: 0.0,
        },
        train: TinyTrainRecipe {
            steps: 1500,
            batch_size: 32,
            lr: 2e-3,
            warmup_steps: 100,
            ..TinyTrainRecipe::default()
        },
        seed,
    }
}

/// The size of a comparison's synthetic base model.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum BaseSize {
    /// [`base_recipe`] (with `--quick`, [`quick_base_recipe`]): 2 layers, 137 k parameters.
    #[default]
    Tiny,
    /// [`standard_base_recipe`]: 4 layers, 1.9 M parameters (`--quick` keeps it).
    Standard,
}

impl BaseSize {
    /// Both sizes.
    pub const ALL: [BaseSize; 2] = [BaseSize::Tiny, BaseSize::Standard];

    /// The name of `--base-model`.
    pub fn id(self) -> &'static str {
        match self {
            BaseSize::Tiny => "tiny",
            BaseSize::Standard => "standard",
        }
    }

    /// The size of a `--base-model` name.
    pub fn parse(s: &str) -> Option<BaseSize> {
        BaseSize::ALL.into_iter().find(|b| b.id() == s)
    }

    /// The recipe of this size (`quick`: the shorter tiny recipe) with `seed`.
    pub fn recipe(self, quick: bool, seed: u64) -> TinyRecipe {
        match (self, quick) {
            (BaseSize::Tiny, false) => base_recipe(seed),
            (BaseSize::Tiny, true) => quick_base_recipe(seed),
            (BaseSize::Standard, _) => standard_base_recipe(seed),
        }
    }
}

/// Loads the base model of `recipe` trained on `corpus` from `cache_dir`, or trains and caches
/// it (atomically; concurrent runs are safe). Returns the model, the recipe's report and the
/// model directory.
///
/// # Errors
/// Errors of [`load_or_train`].
pub fn load_or_train_base(
    cache_dir: &Path,
    corpus: &[String],
    recipe: &TinyRecipe,
    progress: bool,
) -> Result<(Gpt2, TinyModelReport, PathBuf)> {
    Ok(load_or_train(cache_dir, corpus, recipe, &RunOptions { progress, metrics_path: None })?)
}
