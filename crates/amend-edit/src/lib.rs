//! Model editing: subspace projection (ProFS / DeTox) and pure fine-tuning edits (FT-L, FT-M,
//! with the augmentation of Gangadhar & Stratos), with the standard editing metrics (efficacy,
//! paraphrase generalisation, locality, portability, fluency, edit score) in both protocol
//! families.
//!
//! | module | what |
//! |---|---|
//! | [`profs`] | ProFS: pooled embeddings, centred SVD basis, low-rank projection of the MLP value weights ([arXiv 2405.13967](https://arxiv.org/abs/2405.13967)) |
//! | [`ft`] | FT-L, FT-M, conditional likelihood with augmentation ([arXiv 2402.11078](https://arxiv.org/abs/2402.11078)); single / sequential / batched edits |
//! | [`metrics`] | efficacy, paraphrase, locality, portability, fluency, edit score; `memit-prob`, `memit-tokacc`, `easyedit-tokacc`; ProFS perplexity and generations |
//! | [`tasks`] | the synthetic fact-edit task (seeded fact base, tiny GPT-2, counterfactual edits) |
//! | [`manifest`] | the `amend_edit.json` manifest and the atomic write of edited directories |
//! | [`io`] | JSONL readers for preference pairs and edit requests |
//!
//! Edits work on any [`amend_models::CausalLm`] in memory ([`profs::profs_edit`],
//! [`ft::ft_edit`]) or directory to directory ([`profs::profs_edit_dir`], [`ft::ft_edit_dir`]):
//! a new Hugging Face directory is written atomically, never over the input, with unedited
//! tensors bit-identical and a manifest of what was done. Every check (layer ranges, targets,
//! ranks, texts, tokenisation) runs before the first tensor is modified.
//!
//! Errors are the one enum [`Error`], which wraps the model and loss errors as sources and names
//! the offending item (pair index and side, edit index and field, layer, key, file and line).
//!
//! # Deliberate differences from the reference implementations
//!
//! ProFS (`Uppaal/detox-edit`): D1 pairs kept paired, D2 no dropped rows, D3 mask-aware pooling,
//! D4 explicit target table, D5 layer range checked, D6 one embedding definition, D7 f32
//! projection with one cast, D8 one SVD per layer, D9 typed rank errors (details and parity
//! options in [`profs`]). Fine-tuning (`au-revoir/model-editing-ft`): DF1 position masks, DF2
//! deep-copy restores, DF3 f32 master weights, DF4 effective weight decay stated (details in
//! [`ft`]). Both lists are written to every manifest with the parity options in use.
//!
//! # Example
//!
//! ```
//! use amend_edit::ft::{ft_edit, EditMode, FtOptions, FtRecipe, ParamSelector};
//! use amend_edit::profs::{profs_edit, PreferencePair, ProfsConfig};
//! use amend_edit::EditRequest;
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../amend-models/tests/fixtures/models/gpt2");
//! let mut model = amend_models::load(dir, &Default::default())?; // a tiny random GPT-2
//!
//! // ProFS: project the "shouting" direction out of the MLP of block 1.
//! let pairs = vec![
//!     PreferencePair::new("the cat sat on the mat", "THE CAT SAT ON THE MAT!!"),
//!     PreferencePair::new("a dog ran home", "A DOG RAN HOME!!"),
//! ];
//! let report = profs_edit(&mut model, &pairs, &ProfsConfig::default().with_layers(1..2).with_k(1))?;
//! println!("sigma_1 = {}", report.layer_summaries[0].sigma_top_k[0]);
//!
//! // FT-M: one counterfactual edit of the MLP output of block 0.
//! let edit = EditRequest::new("The capital of France is", "Rome").with_target_true("Paris");
//! let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![0] }).with_mode(EditMode::Batched);
//! let out = ft_edit(&mut model, &[edit], &recipe, &FtOptions::default())?;
//! println!("{:?}", out.metrics.unwrap().memit_prob.post.efficacy);
//! # Ok::<(), amend_edit::Error>(())
//! ```
//!
//! The user guide is `docs/editing.md`; the JSONL schemas are in `docs/editing-data.md`.
#![doc(test(attr(deny(warnings))))]

mod error;
pub mod ft;
pub mod io;
pub mod manifest;
pub mod metrics;
pub mod profs;
pub mod report;
mod request;
pub mod tasks;
mod util;

pub use error::{Error, Result};
pub use report::{DeliberateDifference, EditWarning};
pub use request::{EditRequest, QaPair, validate_requests};
