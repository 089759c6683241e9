//! The model-level ProFS edit: sample pairs, embed, compute the bases, edit the MLP weights, and
//! write the edited directory with its manifest.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use amend_models::{CausalLm, LoadOptions};

use super::basis::{LayerBasis, LayerSummary, profs_basis};
use super::config::{Pairing, Pooling, ProfsConfig};
use super::embed::pooled_embeddings;
use super::project::{TensorChange, apply_projection};
use super::targets::{ResolvedTarget, TargetDims, TargetRole, profs_defaults, resolve_targets};
use crate::manifest::{
    Manifest, OutputOptions, hash_weight_files, to_json_value, write_edited_model,
};
use crate::report::{DeliberateDifference, EditWarning, diff};
use crate::util::deep_copy;
use crate::{Error, Result};

/// One preference pair: the preferred (e.g. non-toxic) and the dis-preferred (toxic) text.
///
/// JSONL field names: `preferred` / `dispreferred`; the aliases `chosen` / `rejected` and the
/// `ajyl/dpo_toxic` names `unpert_gen_text` / `pert_gen_text` are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The preferred text.
    #[serde(alias = "chosen", alias = "unpert_gen_text", alias = "non_toxic")]
    pub preferred: String,
    /// The dis-preferred text.
    #[serde(alias = "rejected", alias = "pert_gen_text", alias = "toxic")]
    pub dispreferred: String,
}

impl PreferencePair {
    /// A pair.
    pub fn new(preferred: impl Into<String>, dispreferred: impl Into<String>) -> Self {
        PreferencePair { preferred: preferred.into(), dispreferred: dispreferred.into() }
    }

    /// Pairs up two parallel lists.
    ///
    /// # Errors
    /// [`Error::PairCountMismatch`] when the lists differ in length.
    pub fn zip(preferred: &[String], dispreferred: &[String]) -> Result<Vec<PreferencePair>> {
        if preferred.len() != dispreferred.len() {
            return Err(Error::PairCountMismatch {
                op: "PreferencePair::zip",
                preferred: preferred.len(),
                dispreferred: dispreferred.len(),
            });
        }
        Ok(preferred.iter().zip(dispreferred).map(|(p, d)| PreferencePair::new(p, d)).collect())
    }
}

/// The pair indices used for each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairIndices {
    /// Indices of the preferred texts.
    pub preferred: Vec<usize>,
    /// Indices of the dis-preferred texts (equal to `preferred` unless `IndependentCompat`).
    pub dispreferred: Vec<usize>,
}

/// Draws the pair indices (PF-1): `cfg.indices` when given, else all pairs when the data has at
/// most `n_pairs`, else `n_pairs` indices without replacement from a seeded shuffle. Under
/// `Pairing::IndependentCompat` the two sides are drawn independently (two shuffles), as the
/// reference HEAD does.
///
/// # Errors
/// [`Error::InvalidInput`] for no data, `n_pairs = 0`, or explicit indices out of range or
/// repeated.
pub fn sample_pair_indices(n_available: usize, cfg: &ProfsConfig) -> Result<PairIndices> {
    const OP: &str = "sample_pair_indices";
    if n_available == 0 {
        return Err(Error::invalid(OP, "pairs", "no preference pairs"));
    }
    if let Some(idx) = &cfg.indices {
        if idx.is_empty() {
            return Err(Error::invalid(OP, "indices", "empty index list"));
        }
        let mut seen = vec![false; n_available];
        for (pos, &i) in idx.iter().enumerate() {
            if i >= n_available {
                return Err(Error::invalid(
                    OP,
                    format!("indices[{pos}]"),
                    format!("{i} is out of range for {n_available} pairs"),
                ));
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::invalid(OP, format!("indices[{pos}]"), format!("{i} repeated")));
            }
        }
        return Ok(PairIndices { preferred: idx.clone(), dispreferred: idx.clone() });
    }
    if cfg.n_pairs == 0 {
        return Err(Error::invalid(OP, "n_pairs", "must be positive"));
    }
    let n = cfg.n_pairs.min(n_available);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
    let draw = |rng: &mut Xoshiro256PlusPlus| {
        let mut all: Vec<usize> = (0..n_available).collect();
        all.shuffle(rng);
        all.truncate(n);
        all
    };
    Ok(match cfg.pairing {
        Pairing::IndependentCompat => {
            let a = draw(&mut rng);
            let b = draw(&mut rng);
            PairIndices { preferred: a, dispreferred: b }
        }
        _ if cfg.n_pairs >= n_available => {
            let all: Vec<usize> = (0..n_available).collect();
            PairIndices { preferred: all.clone(), dispreferred: all }
        }
        _ => {
            let a = draw(&mut rng);
            PairIndices { preferred: a.clone(), dispreferred: a }
        }
    })
}

/// What a ProFS edit did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfsReport {
    /// `model_type` of the edited model.
    pub model_type: String,
    /// Layers of the model.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Edited layers (half-open).
    pub layers: Range<usize>,
    /// Rank asked for.
    pub k: usize,
    /// Whether `layers` / `k` came from the reference defaults (A.5).
    pub defaults_used: bool,
    /// The configuration as given.
    pub config: ProfsConfig,
    /// Pairs in the data.
    pub pairs_available: usize,
    /// Pairs used.
    pub pairs_used: usize,
    /// The pair indices used.
    pub pair_indices: PairIndices,
    /// Texts cut to `max_len` tokens.
    pub truncated_texts: usize,
    /// Per-layer singular values, ranks and explained energy, and per basis direction its
    /// energy share and logit-lens tokens ([`LENS_TOKENS`] at each end).
    pub layer_summaries: Vec<LayerSummary>,
    /// Every tensor the edit changed, and by how much.
    pub changed: Vec<TensorChange>,
    /// Degenerate layers left unedited (PF-8).
    pub skipped_layers: Vec<usize>,
    /// Warnings issued.
    pub warnings: Vec<EditWarning>,
    /// Deliberate differences from `Uppaal/detox-edit` (A.6) and parity options in use.
    pub deliberate_differences: Vec<DeliberateDifference>,
    /// Wall time of the edit (embedding, SVD, projection).
    pub seconds: f64,
}

/// The deliberate differences of spec A.6, flagged with the parity options `cfg` uses.
pub fn profs_deliberate_differences(cfg: &ProfsConfig) -> Vec<DeliberateDifference> {
    vec![
        diff(
            "D1",
            "pairs broken by independent sub-sampling of the two sides (HEAD)",
            "one index per pair for both sides",
            Some("Pairing::IndependentCompat"),
            cfg.pairing == Pairing::IndependentCompat,
        ),
        diff(
            "D2",
            "only floor(N/50) batches processed: the tail of N is dropped",
            "all N rows processed (last batch partial)",
            None,
            false,
        ),
        diff(
            "D3",
            "mean pooling over padding, each side padded separately",
            "mean over real tokens (attention mask)",
            Some("Pooling::MeanAllPositions"),
            cfg.pooling == Pooling::MeanAllPositions,
        ),
        diff(
            "D4",
            "keys selected by substring ('weight' and 'mlp'): OPT edits silently nothing",
            "explicit per-family target table, error when a key is missing",
            None,
            false,
        ),
        diff("D5", "layer range beyond L silently truncated", "error", None, false),
        diff(
            "D6",
            "last-block embedding taken after ln_f for GPT-J only",
            "residual stream after the block, before any final norm, for every family",
            None,
            false,
        ),
        diff(
            "D7",
            "projector cast to fp16 before the matmul (7B models)",
            "projection in the SVD dtype, one final cast to the stored dtype",
            None,
            false,
        ),
        diff(
            "D8",
            "same SVD recomputed per weight and for unedited layers",
            "one SVD per edited layer",
            None,
            false,
        ),
        diff(
            "D9",
            "k > min(N, D) raises IndexError; k = D silently zeroes W",
            "typed error RankTooLarge; warning at k = D",
            None,
            false,
        ),
    ]
}

fn check_texts(pairs: &[PreferencePair]) -> Result<()> {
    for (i, p) in pairs.iter().enumerate() {
        for (side, text) in [("preferred", &p.preferred), ("dispreferred", &p.dispreferred)] {
            if text.trim().is_empty() {
                return Err(Error::InvalidPair { index: i, side, reason: "empty text".into() });
            }
        }
    }
    Ok(())
}

/// Tokens listed at each end of a direction's logit-lens view in the report.
pub const LENS_TOKENS: usize = 10;

/// Projects the dis-preferred subspace out of the MLP value weights of `model`, in place
/// (ProFS / DeTox, arXiv 2405.13967; reference `Uppaal/detox-edit`).
///
/// For each layer `ℓ` in `cfg.layers`: pool the embeddings of the N sampled pairs
/// ([`pooled_embeddings`]), compute the basis `V_k` of the centred difference matrix
/// ([`profs_basis`]) and edit the value weight (and optionally the key weight and value bias):
///
/// ```text
/// Conv1D [d_ff, D] (GPT-2):      W ← W − (W V_k) V_kᵀ
/// Linear [D, d_ff] (Llama, …):   W ← W − V_k (V_kᵀ W)
/// ```
///
/// Tuning-free and deterministic (given `cfg.seed` or `cfg.indices`). All checks (layer range,
/// targets, rank, texts, tokenisation) and all bases are done before the first tensor is
/// modified. The model is run in eval mode (its train/eval flag is restored afterwards).
///
/// # Errors
/// [`Error::NoDefaultForModel`] (no `layers`/`k` for a non-reference model),
/// [`Error::LayerRange`], [`Error::NoMatchingTarget`], [`Error::ZeroRank`],
/// [`Error::RankTooLarge`], [`Error::InvalidPair`] (empty text, no tokens),
/// [`Error::InvalidInput`] (no pairs, bad indices, `batch` or `max_len` 0),
/// [`Error::RankDeficient`], [`Error::DegenerateLayer`], [`Error::Model`] (no tokenizer, forward
/// errors), [`Error::Tch`].
///
/// # Example
///
/// ```
/// use amend_edit::profs::{profs_edit, PreferencePair, ProfsConfig};
/// use amend_models::{load, LoadOptions};
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../amend-models/tests/fixtures/models/gpt2");
/// let mut model = load(dir, &LoadOptions::default())?;  // a tiny random GPT-2, 2 layers
/// let pairs = vec![
///     PreferencePair::new("the cat sat on the mat", "the cat sat on the hat"),
///     PreferencePair::new("a dog ran home", "a dog ran away"),
///     PreferencePair::new("birds sing", "birds shout loudly"),
/// ];
/// let report = profs_edit(&mut model, &pairs, &ProfsConfig::default().with_layers(1..2).with_k(1))?;
/// assert_eq!(report.changed[0].name, "transformer.h.1.mlp.c_proj.weight");
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn profs_edit<M: CausalLm + ?Sized>(
    model: &mut M,
    pairs: &[PreferencePair],
    cfg: &ProfsConfig,
) -> Result<ProfsReport> {
    const OP: &str = "profs_edit";
    let t0 = Instant::now();
    let mc = model.config();
    let model_type = mc.model_type().to_string();
    let dims = TargetDims {
        num_layers: mc.num_layers(),
        hidden: mc.hidden_size(),
        intermediate: mc.intermediate_size(),
    };
    // Layers and rank: explicit, or the reference defaults (A.5) for reference shapes only.
    let defaults = profs_defaults(&model_type, dims.num_layers, dims.hidden, dims.intermediate);
    let defaults_used = cfg.layers.is_none() || cfg.k.is_none();
    let (layers, k) = match (&cfg.layers, cfg.k, defaults) {
        (Some(l), Some(k), _) => (l.clone(), k),
        (l, k, Some((dl, dk))) => (l.clone().unwrap_or(dl), k.unwrap_or(dk)),
        (_, _, None) => {
            return Err(Error::NoDefaultForModel {
                model_type,
                num_layers: dims.num_layers,
                hidden: dims.hidden,
                intermediate: dims.intermediate,
            });
        }
    };
    let targets = {
        let params = model.params();
        let shape_of = |name: &str| params.get(name).map(|p| p.tensor().size());
        resolve_targets(
            &model_type,
            &shape_of,
            dims,
            &layers,
            cfg.edit_values,
            cfg.edit_keys,
            cfg.project_bias,
        )?
    };
    if cfg.batch == 0 {
        return Err(Error::invalid(OP, "batch", "must be positive"));
    }
    if cfg.max_len == 0 {
        return Err(Error::invalid(OP, "max_len", "must be positive"));
    }
    check_texts(pairs)?;
    let idx = sample_pair_indices(pairs.len(), cfg)?;
    let n = idx.preferred.len();
    if k == 0 {
        return Err(Error::ZeroRank);
    }
    if k > n || k > dims.hidden {
        return Err(Error::RankTooLarge { k, n_pairs: n, hidden: dims.hidden });
    }
    // Tokenise (each text independently, truncated to max_len, with the model's BOS convention).
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: OP })?;
    let mut truncated = 0usize;
    let mut encode = |i: usize, side: &'static str, text: &str| -> Result<Vec<u32>> {
        let mut ids = tok.encode(text, true)?;
        if ids.is_empty() {
            return Err(Error::InvalidPair { index: i, side, reason: "text has no tokens".into() });
        }
        if ids.len() > cfg.max_len {
            ids.truncate(cfg.max_len);
            truncated += 1;
        }
        Ok(ids)
    };
    let pos: Vec<Vec<u32>> = idx
        .preferred
        .iter()
        .map(|&i| encode(i, "preferred", &pairs[i].preferred))
        .collect::<Result<_>>()?;
    let neg: Vec<Vec<u32>> = idx
        .dispreferred
        .iter()
        .map(|&i| encode(i, "dispreferred", &pairs[i].dispreferred))
        .collect::<Result<_>>()?;

    // Embed (eval mode), then the bases: everything that can fail happens before any edit.
    let was_training = model.is_training();
    model.set_training(false);
    let layer_list: Vec<usize> = layers.clone().collect();
    let pb = cfg.progress.then(|| {
        let pb = ProgressBar::new((2 * n) as u64);
        pb.set_style(
            ProgressStyle::with_template("ProFS embed {bar:30} {pos}/{len} texts [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    });
    let embedded =
        pooled_embeddings(&*model, &pos, &layer_list, cfg.pooling, cfg.batch, pb.as_ref())
            .and_then(|xp| {
                pooled_embeddings(&*model, &neg, &layer_list, cfg.pooling, cfg.batch, pb.as_ref())
                    .map(|xn| (xp, xn))
            });
    model.set_training(was_training);
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let (xp, xn) = embedded?;
    let opts = cfg.basis_options(k);
    let mut bases: Vec<LayerBasis> = Vec::with_capacity(layer_list.len());
    for ((p, q), &l) in xp.iter().zip(&xn).zip(&layer_list) {
        bases.push(profs_basis(p, q, l, &opts)?);
    }

    // Diagnostics of each direction (the head is not edited, so before or after is the same).
    let mut layer_summaries = Vec::with_capacity(bases.len());
    for b in &bases {
        let mut summary = b.summary();
        summary.directions = b.directions(model.lm_head_weight(), LENS_TOKENS)?;
        layer_summaries.push(summary);
    }

    // Edit.
    let changed = apply_bases(model, &targets, &bases)?;
    let skipped_layers: Vec<usize> = bases.iter().filter(|b| b.skipped).map(|b| b.layer).collect();
    let mut warnings: Vec<EditWarning> = Vec::new();
    for w in bases.iter().flat_map(|b| &b.warnings) {
        if !warnings.contains(w) {
            warnings.push(w.clone());
        }
    }
    Ok(ProfsReport {
        model_type,
        num_layers: dims.num_layers,
        hidden: dims.hidden,
        layers,
        k,
        defaults_used,
        config: cfg.clone(),
        pairs_available: pairs.len(),
        pairs_used: n,
        pair_indices: idx,
        truncated_texts: truncated,
        layer_summaries,
        changed,
        skipped_layers,
        warnings,
        deliberate_differences: profs_deliberate_differences(cfg),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Applies precomputed bases to the resolved targets of `model` (in place, under no-grad) and
/// reports the change of each tensor. Targets of skipped layers are left alone.
///
/// # Errors
/// [`Error::Model`] (`MissingParam`); as [`apply_projection`].
pub fn apply_bases<M: CausalLm + ?Sized>(
    model: &mut M,
    targets: &[ResolvedTarget],
    bases: &[LayerBasis],
) -> Result<Vec<TensorChange>> {
    let _guard = tch::no_grad_guard();
    let mut changed = Vec::new();
    for t in targets {
        let Some(basis) = bases.iter().find(|b| b.layer == t.layer).and_then(|b| b.basis.as_ref())
        else {
            continue;
        };
        let role = match t.role {
            TargetRole::Value => "value",
            TargetRole::Key => "key",
        };
        let mut w = model.params().tensor(&t.name)?.shallow_clone();
        let before = deep_copy(&w)?;
        apply_projection(&mut w, basis, t.layout, t.side)?;
        changed.push(TensorChange::measure(&t.name, Some(t.layer), role, &before, &w)?);
        if let Some(bias) = &t.bias {
            let mut b = model.params().tensor(bias)?.shallow_clone();
            let before = deep_copy(&b)?;
            apply_projection(&mut b, basis, t.layout, t.side)?;
            changed.push(TensorChange::measure(bias, Some(t.layer), "value_bias", &before, &b)?);
        }
    }
    Ok(changed)
}

/// Loads `model_dir`, applies [`profs_edit`] and writes the edited model to `out_dir` (a new
/// Hugging Face directory, written atomically, with `amend_edit.json`). The model is loaded in
/// f32 and every edited tensor is cast once back to its stored dtype.
///
/// # Errors
/// As [`profs_edit`]; [`Error::Model`] for load and save errors (`OutputDir` when `out_dir` is,
/// contains or is inside `model_dir`, or exists without `overwrite`); [`Error::Io`].
pub fn profs_edit_dir(
    model_dir: &Path,
    pairs: &[PreferencePair],
    cfg: &ProfsConfig,
    out_dir: &Path,
    out: &OutputOptions,
) -> Result<(ProfsReport, PathBuf)> {
    let mut model = amend_models::load(model_dir, &LoadOptions::default())?;
    let report = profs_edit(&mut model, pairs, cfg)?;
    let manifest = profs_manifest(&report, Some(model_dir))?;
    let dir = write_edited_model(&model, out_dir, &manifest, out)?;
    Ok((report, dir))
}

/// The IO-5 manifest of a ProFS edit.
///
/// # Errors
/// [`Error::Io`] hashing the input weights; [`Error::Json`].
pub fn profs_manifest(report: &ProfsReport, input_dir: Option<&Path>) -> Result<Manifest> {
    Ok(Manifest {
        method: "profs".into(),
        amend_version: env!("CARGO_PKG_VERSION").into(),
        input_dir: input_dir.map(Path::to_path_buf),
        input_weights_sha256: match input_dir {
            Some(d) => hash_weight_files(d)?,
            None => Default::default(),
        },
        config: to_json_value("config", &report.config)?,
        edited_keys: report.changed.iter().map(|c| c.name.clone()).collect(),
        warnings: report.warnings.clone(),
        deliberate_differences: report.deliberate_differences.clone(),
        report: to_json_value("report", report)?,
    })
}
