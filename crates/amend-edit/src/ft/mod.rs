//! Editing by fine-tuning (spec Part B): EasyEdit FT-L and FT-M, and the conditional likelihood
//! with paraphrase and locality augmentation of Gangadhar & Stratos ("Model Editing by Standard
//! Fine-Tuning", <https://arxiv.org/abs/2402.11078>; reference code `au-revoir/model-editing-ft`).
//!
//! ```text
//! L_cond(θ) = − Σ_{(c,o)} Σ_t log p_θ(o_t | c, o_<t) / Σ_{(c,o)} |o|      (TokenMean)
//! FT-M:     mean over examples of each example's mean target NLL            (ExampleMean)
//! FT-L:     −(1/|o|) Σ_j log softmax(z_last(c))[o_j]                         (prompt_last)
//! training set = E ∪ P ∪ R: edits, prefix pseudo-paraphrases, locality facts
//! ```
//!
//! | piece | item |
//! |---|---|
//! | recipe and presets | [`FtRecipe`] (`ft_l`, `ft_m`, `gs_single`, `gs_mass`), [`ParamSelector`], [`EditMode`] |
//! | losses | [`conditional_nll`], [`prompt_last_nll`], [`batch_loss`] |
//! | rows and masks | [`EditRow`], [`build_batch`] (position masks, FT-1/FT-2) |
//! | augmentation | [`Augmentation`], [`RELEASED_PREFIXES`], [`paraphrase_prefixes`] |
//! | optimizer | [`EditOptimizer`] (AdamW/SGD, f32 master weights, norm box) |
//! | running edits | [`ft_edit`], [`ft_edit_dir`], [`train_rows`], [`WeightSnapshot`] |
//!
//! # Deliberate differences from `au-revoir/model-editing-ft`
//!
//! | id | reference | amend | parity option |
//! |---|---|---|---|
//! | DF1 | labels kept wherever the token occurs in the target | mask by position | [`MaskMode::ValueMaskCompat`] |
//! | DF2 | single edits restored from a state dict sharing storage (edits accumulate) | restore from a deep copy | [`EditMode::Sequential`] is the explicit accumulate mode |
//! | DF3 | AdamW directly on bf16 weights | f32 master weights | — |
//! | DF4 | weight decay 0.05 declared but unused (mass editing) | presets state the effective value | — |
//!
//! The same list, with the parity options in use, is written to every manifest.

mod augment;
mod batch;
mod editor;
mod loss;
mod optim;
mod recipe;

pub use augment::{
    Augmentation, LocalityFacts, Paraphrases, RELEASED_PREFIXES, paraphrase_prefixes,
};
pub use batch::{BatchOptions, EditRow, RowKind, TrainBatch, build_batch};
pub use editor::{
    DataCounts, FtOptions, FtOutcome, FtReport, RecordMetrics, RecordNumbers, RunLog,
    WeightSnapshot, ft_deliberate_differences, ft_edit, ft_edit_dir, ft_manifest, train_rows,
    training_rows,
};
pub use loss::{batch_loss, conditional_nll, prompt_last_nll};
pub use optim::EditOptimizer;
pub use recipe::{
    EditMode, FtRecipe, MaskMode, Objective, OptimizerConfig, OptimizerKind, ParamSelector,
    TargetReduction,
};
