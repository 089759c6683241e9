//! Running fine-tuning edits: training rows, the training loop, single / sequential / batched
//! modes with exact restores, evaluation before and after.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use amend_models::train::LrSchedule;
use amend_models::{CausalLm, LoadOptions};

use super::augment::{LocalityFacts, first_words, paraphrase_prefixes};
use super::batch::{BatchOptions, EditRow, RowKind, build_batch};
use super::loss::batch_loss;
use super::optim::EditOptimizer;
use super::recipe::{EditMode, FtRecipe, MaskMode};
use crate::manifest::{
    Manifest, OutputOptions, hash_weight_files, to_json_value, write_edited_model,
};
use crate::metrics::{
    EditMetrics, EvalConfig, ProbRecord, RecordEval, evaluate_requests, record_locality, summarize,
};
use crate::profs::TensorChange;
use crate::report::{DeliberateDifference, EditWarning, diff};
use crate::request::{EditRequest, QaPair, answer_ids, validate_requests};
use crate::util::deep_copy;
use crate::{Error, Result};

/// Deep copies of named parameters, to restore them exactly (FT-4).
///
/// The copies own their storage (never a shallow clone or a view), so in-place updates of the
/// live parameters do not reach them.
#[derive(Debug)]
pub struct WeightSnapshot {
    tensors: Vec<(String, Tensor)>,
}

impl WeightSnapshot {
    /// Copies the parameters called `names` (all parameters when `names` is `None`).
    ///
    /// # Errors
    /// [`Error::Model`] (`MissingParam`); [`Error::Tch`].
    pub fn capture<M: CausalLm + ?Sized>(model: &M, names: Option<&[String]>) -> Result<Self> {
        let params = model.params();
        let mut tensors = Vec::new();
        match names {
            None => {
                for p in params.iter() {
                    tensors.push((p.name().to_string(), deep_copy(p.tensor())?));
                }
            }
            Some(names) => {
                for n in names {
                    tensors.push((n.clone(), deep_copy(params.tensor(n)?)?));
                }
            }
        }
        Ok(WeightSnapshot { tensors })
    }

    /// The copied tensors.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// Copies the snapshot back into the model's parameters (in place, under no-grad).
    ///
    /// # Errors
    /// [`Error::Model`] (`MissingParam`, `ShapeMismatch`).
    pub fn restore<M: CausalLm + ?Sized>(&self, model: &mut M) -> Result<()> {
        model.params_mut().copy_from(self.tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
        Ok(())
    }

    /// How each parameter differs now from the snapshot.
    ///
    /// # Errors
    /// [`Error::Model`]; [`Error::Tch`].
    pub fn changes<M: CausalLm + ?Sized>(&self, model: &M) -> Result<Vec<TensorChange>> {
        let params = model.params();
        self.tensors
            .iter()
            .map(|(n, before)| {
                let p = params.get(n).ok_or_else(|| amend_models::Error::MissingParam {
                    op: "WeightSnapshot::changes",
                    name: n.clone(),
                })?;
                TensorChange::measure(n, p.layer(), "trained", before, p.tensor())
            })
            .collect()
    }
}

/// Numbers of training rows by origin (`|E|`, `|P|`, `|R|`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Edit rows (E).
    pub edits: usize,
    /// Pseudo-paraphrase rows (P).
    pub paraphrases: usize,
    /// Locality rows (R).
    pub locality: usize,
}

impl DataCounts {
    fn of(rows: &[EditRow]) -> Self {
        let n = |k| rows.iter().filter(|r| r.kind == k).count();
        DataCounts {
            edits: n(RowKind::Edit),
            paraphrases: n(RowKind::Paraphrase),
            locality: n(RowKind::Locality),
        }
    }
}

/// What one training run did (one edit in single/sequential mode, all edits when batched).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunLog {
    /// Requests trained in this run.
    pub requests: Vec<usize>,
    /// Rows by origin.
    pub rows: DataCounts,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Batches whose loss was below `skip_below` (no step).
    pub skipped_steps: usize,
    /// Epochs run.
    pub epochs_run: usize,
    /// Whether `early_stop_avg` ended the run.
    pub stopped_early: bool,
    /// Loss of the first batch.
    pub first_loss: f64,
    /// Mean batch loss of the last epoch.
    pub final_epoch_loss: f64,
    /// `‖Δθ‖₂` over all trained parameters at the end of the run.
    pub update_norm: f64,
    /// Wall time.
    pub seconds: f64,
}

/// What a fine-tuning edit did (FT-6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FtReport {
    /// The recipe.
    pub recipe: FtRecipe,
    /// `model_type`.
    pub model_type: String,
    /// Trained parameter names.
    pub trained_params: Vec<String>,
    /// Trained scalars.
    pub trained_elements: usize,
    /// Rows by origin over all runs.
    pub data_counts: DataCounts,
    /// The paraphrase prefixes used.
    pub prefixes: Vec<String>,
    /// One entry per training run.
    pub runs: Vec<RunLog>,
    /// Change of each trained tensor (batched / sequential: final vs original; single: empty,
    /// every edit was undone).
    pub changed: Vec<TensorChange>,
    /// Single mode: whether every parameter was restored bit-exactly after the last edit
    /// (checked against the snapshot).
    pub restored_exactly: Option<bool>,
    /// Warnings.
    pub warnings: Vec<EditWarning>,
    /// Deliberate differences from `au-revoir/model-editing-ft` (DF1–DF4).
    pub deliberate_differences: Vec<DeliberateDifference>,
    /// Wall time.
    pub seconds: f64,
}

/// Compact numbers of one record in one phase, with EasyEdit's metric names (`rewrite_acc`,
/// `rephrase_acc`, `locality`, `portability`, `fluency`) plus the CounterFact scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordNumbers {
    /// `memit-prob` scores (fractions).
    pub prob: ProbRecord,
    /// Token accuracy of `target_new` on the rewrite prompt.
    pub rewrite_acc: f64,
    /// … on the paraphrases.
    pub rephrase_acc: Option<f64>,
    /// Absolute correctness of the locality probes.
    pub locality_correct: Option<f64>,
    /// EasyEdit `locality` per key: share of answer positions whose prediction is unchanged
    /// from before the edit (post phase only; not correctness, see `locality_correct`).
    pub locality: std::collections::BTreeMap<String, f64>,
    /// Portability per key.
    pub portability: std::collections::BTreeMap<String, f64>,
    /// Generation entropy.
    pub fluency: Option<f64>,
}

/// Per-record numbers before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordMetrics {
    /// Index of the request.
    pub index: usize,
    /// Before the edit.
    pub pre: RecordNumbers,
    /// After the edit.
    pub post: RecordNumbers,
}

/// The result of [`ft_edit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FtOutcome {
    /// What was done.
    pub report: FtReport,
    /// Summary metrics (when evaluation was on).
    pub metrics: Option<EditMetrics>,
    /// Per-record metrics (when evaluation was on).
    pub records: Vec<RecordMetrics>,
}

/// Options of [`ft_edit`] that are not part of the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct FtOptions {
    /// Facts `LocalityFacts::Random` draws from (prompt, true answer).
    pub locality_pool: Vec<QaPair>,
    /// Evaluation before and after (off when `None`).
    pub eval: Option<EvalConfig>,
    /// Progress bars.
    pub progress: bool,
}

impl Default for FtOptions {
    fn default() -> Self {
        FtOptions { locality_pool: vec![], eval: Some(EvalConfig::default()), progress: false }
    }
}

/// The deliberate differences of spec B.5 with the parity options `recipe` uses.
pub fn ft_deliberate_differences(recipe: &FtRecipe) -> Vec<DeliberateDifference> {
    vec![
        diff(
            "DF1",
            "labels kept wherever the token id occurs in the target (prompt tokens equal to a target token are trained)",
            "target mask by position",
            Some("MaskMode::ValueMaskCompat"),
            recipe.mask == MaskMode::ValueMaskCompat,
        ),
        diff(
            "DF2",
            "single edits restored from model.state_dict() (storage shared with the live weights): edits accumulate",
            "restore from a deep copy; accumulation is the explicit EditMode::Sequential",
            Some("EditMode::Sequential"),
            recipe.mode == EditMode::Sequential,
        ),
        diff(
            "DF3",
            "AdamW steps directly on bf16 weights (small updates rounded away)",
            "f32 master weights, the stored weight re-rounded after each step",
            None,
            false,
        ),
        diff(
            "DF4",
            "weight_decay = 0.05 declared for mass editing but never passed to the trainer",
            "presets state the effective value (0 for gs-mass)",
            None,
            false,
        ),
    ]
}

/// Builds the training rows (E ∪ P ∪ R) of `requests` (spec B.3).
///
/// E: `ids(prompt) → ids(" " + target_new)`; P: `ids(prefix + prompt) → target_new` for each
/// prefix; R: locality facts per [`LocalityFacts`], answers cut to `locality_words` words.
///
/// # Errors
/// [`Error::InvalidEdit`]; [`Error::InvalidInput`] when random locality facts are asked for and
/// the pool is empty; [`Error::Model`].
pub fn training_rows<M: CausalLm + ?Sized>(
    model: &M,
    requests: &[EditRequest],
    indices: &[usize],
    recipe: &FtRecipe,
    prefixes: &[String],
    pool: &[QaPair],
    rng: &mut Xoshiro256PlusPlus,
) -> Result<Vec<EditRow>> {
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: "ft_edit" })?;
    let aug = &recipe.augmentation;
    let mut rows = Vec::new();
    for &i in indices {
        let r = &requests[i];
        let prompt = r.rewrite_prompt();
        let target = answer_ids(tok, &r.target_new)?;
        if target.is_empty() {
            return Err(Error::InvalidEdit {
                index: i,
                field: "target_new".into(),
                reason: format!("target {:?} tokenises to nothing", r.target_new),
            });
        }
        rows.push(EditRow {
            prompt_ids: tok.encode(&prompt, true)?,
            target_ids: target.clone(),
            kind: RowKind::Edit,
            request: i,
        });
        for pre in prefixes {
            rows.push(EditRow {
                prompt_ids: tok.encode(&format!("{pre}{prompt}"), true)?,
                target_ids: target.clone(),
                kind: RowKind::Paraphrase,
                request: i,
            });
        }
        let facts: Vec<(String, String)> = match &aug.locality {
            LocalityFacts::None => vec![],
            LocalityFacts::Random { per_edit } | LocalityFacts::SameAnswer { per_edit } => {
                if *per_edit > 0 && pool.is_empty() {
                    return Err(Error::invalid(
                        "ft_edit",
                        "locality_pool",
                        "locality facts from the pool were asked for but the pool is empty",
                    ));
                }
                let mut idx: Vec<usize> = (0..pool.len()).collect();
                idx.shuffle(rng);
                if let (LocalityFacts::SameAnswer { .. }, Some(t)) = (&aug.locality, &r.target_true)
                {
                    // Facts whose answer is this edit's old answer first (the ones an edit is
                    // most likely to drag along), then the rest at random.
                    idx.sort_by_key(|&j| pool[j].answer != *t);
                }
                idx.truncate(*per_edit);
                idx.into_iter().map(|j| (pool[j].prompt.clone(), pool[j].answer.clone())).collect()
            }
            LocalityFacts::Neighbourhood { per_edit } => match &r.target_true {
                Some(t) => {
                    r.neighbourhood.iter().take(*per_edit).map(|p| (p.clone(), t.clone())).collect()
                }
                None => vec![],
            },
        };
        for (p, a) in facts {
            let ids = answer_ids(tok, &first_words(&a, aug.locality_words))?;
            if ids.is_empty() {
                continue;
            }
            rows.push(EditRow {
                prompt_ids: tok.encode(&p, true)?,
                target_ids: ids,
                kind: RowKind::Locality,
                request: i,
            });
        }
    }
    Ok(rows)
}

/// Trains `rows` into the parameters named `trained` (which must already be trainable) with the
/// recipe's optimizer, schedule, batching, skip / early-stop rules and norm box. The model should
/// be in the train/eval mode the caller wants.
///
/// # Errors
/// [`Error::NonFinite`] for a NaN/∞ loss before any step (the step is not taken),
/// [`Error::Diverged`] when it happens after updates (naming the learning rate); batch, loss and optimizer
/// errors.
pub fn train_rows<M: CausalLm + ?Sized>(
    model: &mut M,
    rows: &[EditRow],
    recipe: &FtRecipe,
    trained: &[String],
    progress: Option<&ProgressBar>,
) -> Result<RunLog> {
    const OP: &str = "train_rows";
    let t0 = Instant::now();
    if rows.is_empty() {
        return Err(Error::invalid(OP, "rows", "no training rows"));
    }
    let params: Vec<(String, Tensor)> = trained
        .iter()
        .map(|n| Ok((n.clone(), model.params().tensor(n)?.shallow_clone())))
        .collect::<Result<_>>()?;
    let start = WeightSnapshot {
        tensors: params
            .iter()
            .map(|(n, t)| Ok((n.clone(), deep_copy(t)?)))
            .collect::<Result<_>>()?,
    };
    let mut opt = EditOptimizer::new(params, recipe.optimizer.clone(), recipe.norm_box)?;
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: OP })?;
    let eos = if recipe.append_eos {
        Some(tok.eos_token_ids().first().copied().unwrap_or_else(|| tok.pad_token_id()))
    } else {
        None
    };
    let bopts = BatchOptions {
        objective: recipe.objective,
        mask: recipe.mask,
        pad: tok.pad_token_id(),
        eos,
        side: recipe.padding,
        max_length: recipe.max_length,
    };
    let bs = recipe.batch_size.unwrap_or(rows.len()).min(rows.len());
    let per_epoch = rows.len().div_ceil(bs);
    let sched = LrSchedule {
        kind: recipe.schedule,
        peak_lr: recipe.lr,
        warmup_steps: recipe.warmup_steps,
        total_steps: recipe.epochs * per_epoch,
        min_lr_ratio: 0.0,
    };
    let device = model.device();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(recipe.seed);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let (mut steps, mut skipped, mut batches) = (0usize, 0usize, 0usize);
    let mut first_loss = f64::NAN;
    let mut last_epoch = f64::NAN;
    let mut epochs_run = 0;
    let mut stopped_early = false;
    for _epoch in 0..recipe.epochs {
        if recipe.shuffle {
            order.shuffle(&mut rng);
        }
        let mut losses = Vec::with_capacity(per_epoch);
        for chunk in order.chunks(bs) {
            let refs: Vec<&EditRow> = chunk.iter().map(|&i| &rows[i]).collect();
            let batch = build_batch(&refs, &bopts, device)?;
            opt.zero_grad()?;
            // Once a step has been taken, non-finite values mean the updates blew up: say so
            // and name the learning rate instead of blaming the logits or the data.
            let diverged =
                |what: String| Error::Diverged { op: OP, step: steps, lr: recipe.lr, what };
            let loss = match batch_loss(&*model, &batch, recipe.objective, recipe.reduction) {
                Err(Error::Loss(amend_losses::Error::NonFiniteLogits {
                    what,
                    count,
                    index,
                    ..
                })) if steps > 0 => {
                    return Err(diverged(format!(
                        "the model's logits are not finite at {count} positions; the first, \
                         {index:?}, {what}"
                    )));
                }
                r => r?,
            };
            let lv = loss.f_double_value(&[])?;
            if !lv.is_finite() {
                if steps > 0 {
                    return Err(diverged(format!("loss = {lv}")));
                }
                return Err(Error::NonFinite { op: OP, what: "loss", step: steps, value: lv });
            }
            if batches == 0 {
                first_loss = lv;
            }
            batches += 1;
            losses.push(lv);
            let lr = sched.lr_at(steps);
            if recipe.skip_below.is_some_and(|thr| lv < thr) {
                skipped += 1;
            } else {
                loss.f_backward()?;
                if let Some(max) = recipe.max_grad_norm {
                    let norm = opt.grad_norm()?;
                    if !norm.is_finite() && steps > 0 {
                        return Err(diverged(format!("gradient norm = {norm}")));
                    }
                    if !norm.is_finite() {
                        return Err(Error::NonFinite {
                            op: OP,
                            what: "grad_norm",
                            step: steps,
                            value: norm,
                        });
                    }
                    if norm > max {
                        opt.scale_grads(max / (norm + 1e-6))?;
                    }
                }
                opt.step(lr)?;
                steps += 1;
            }
            if let Some(pb) = progress {
                pb.set_message(format!("loss {lv:.4}"));
            }
        }
        opt.zero_grad()?;
        epochs_run += 1;
        last_epoch = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        if let Some(pb) = progress {
            pb.inc(1);
        }
        if recipe.early_stop_avg.is_some_and(|thr| last_epoch < thr) {
            stopped_early = true;
            break;
        }
    }
    if let Some(pb) = progress {
        pb.inc((recipe.epochs - epochs_run) as u64);
    }
    let update_norm = start
        .changes(&*model)?
        .iter()
        .map(|c| c.frobenius_delta * c.frobenius_delta)
        .sum::<f64>()
        .sqrt();
    Ok(RunLog {
        requests: {
            let mut r: Vec<usize> = rows.iter().map(|r| r.request).collect();
            r.dedup();
            r
        },
        rows: DataCounts::of(rows),
        steps,
        skipped_steps: skipped,
        epochs_run,
        stopped_early,
        first_loss,
        final_epoch_loss: last_epoch,
        update_norm,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn numbers(e: &RecordEval, pre: Option<&RecordEval>) -> Result<RecordNumbers> {
    Ok(RecordNumbers {
        prob: e.prob(),
        rewrite_acc: e.rewrite_acc(),
        rephrase_acc: e.rephrase_acc(),
        locality_correct: e.locality_correct(),
        locality: match pre {
            Some(p) => record_locality(p, e)?,
            None => Default::default(),
        },
        portability: e.portability_acc(),
        fluency: e.fluency,
    })
}

/// Edits `model` by fine-tuning on `requests` (spec Part B): FT-L, FT-M, or the conditional
/// likelihood with paraphrase / locality augmentation (Gangadhar & Stratos, arXiv 2402.11078),
/// over all parameters or a chosen subset, in single, sequential or batched mode, with f32
/// updates. Evaluates every request before and after when `opts.eval` is set.
///
/// * `Single`: each edit trains from the original weights; its post-edit metrics are taken, then
///   the trained parameters are restored from a deep copy (the model ends bit-identical to how
///   it started; [`FtReport::restored_exactly`] records the check).
/// * `Sequential`: edits are trained one after another without restoring; metrics after all.
/// * `Batched`: all rows of all edits form one training set.
///
/// The model runs in eval mode (no dropout) while editing and evaluating; its train/eval flag
/// and its trainable flags are restored afterwards.
///
/// # Errors
/// [`Error::InvalidEdit`] naming the request and field (empty or untokenisable targets, …);
/// [`Error::NoTrainableParams`], [`Error::LayerOutOfRange`] (parameter selection);
/// [`Error::InvalidInput`] (recipe); [`Error::NonFinite`]; model and tensor errors.
///
/// # Example
///
/// ```
/// use amend_edit::ft::{ft_edit, FtOptions, FtRecipe, ParamSelector, EditMode};
/// use amend_edit::EditRequest;
/// use amend_models::{load, LoadOptions};
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../amend-models/tests/fixtures/models/gpt2");
/// let mut model = load(dir, &LoadOptions::default())?;
/// let req = EditRequest::new("The capital of France is", "Rome").with_target_true("Paris");
/// let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] })
///     .with_mode(EditMode::Batched)
///     .with_lr(1e-2)
///     .with_epochs(10);
/// let out = ft_edit(&mut model, &[req], &recipe, &FtOptions::default())?;
/// let m = out.metrics.unwrap();
/// assert!(m.memit_prob.post.efficacy.unwrap().mean >= m.memit_prob.pre.efficacy.unwrap().mean);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn ft_edit<M: CausalLm + ?Sized>(
    model: &mut M,
    requests: &[EditRequest],
    recipe: &FtRecipe,
    opts: &FtOptions,
) -> Result<FtOutcome> {
    let t0 = Instant::now();
    recipe.validate()?;
    validate_requests(&*model, requests)?;
    let trained = recipe.params.resolve(&*model)?;
    let mut warnings = Vec::new();
    if let LocalityFacts::Neighbourhood { .. } = recipe.augmentation.locality {
        warnings.push(EditWarning::new(
            "B.3",
            None,
            "locality facts are the requests' own neighbourhood prompts: the neighbourhood metrics (NS, locality) are no longer held out",
        ));
    }
    if let LocalityFacts::Random { per_edit } | LocalityFacts::SameAnswer { per_edit } =
        recipe.augmentation.locality
        && per_edit > opts.locality_pool.len()
        && !opts.locality_pool.is_empty()
    {
        warnings.push(EditWarning::new(
            "B.3",
            None,
            format!(
                "{per_edit} locality facts per edit asked for, the pool has {}",
                opts.locality_pool.len()
            ),
        ));
    }
    let was_training = model.is_training();
    let prev_trainable: Vec<String> =
        model.params().iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
    model.set_training(false);
    let result = run(model, requests, recipe, opts, &trained, &mut warnings);
    // Restore the mode and the trainable flags whatever happened.
    model.set_training(was_training);
    let restore_flags = model.set_trainable(&|p| prev_trainable.iter().any(|n| n == p.name()));
    let (runs, changed, restored, prefixes, pre, posts) = result?;
    restore_flags?;
    let (metrics, records) = match (&pre, &posts) {
        (Some(pre), Some(post)) => {
            let m = summarize(pre, post)?;
            let recs = pre
                .iter()
                .zip(post)
                .enumerate()
                .map(|(i, (a, b))| {
                    Ok(RecordMetrics {
                        index: i,
                        pre: numbers(a, None)?,
                        post: numbers(b, Some(a))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (Some(m), recs)
        }
        _ => (None, vec![]),
    };
    let mut counts = DataCounts::default();
    for r in &runs {
        counts.edits += r.rows.edits;
        counts.paraphrases += r.rows.paraphrases;
        counts.locality += r.rows.locality;
    }
    let trained_elements =
        trained.iter().filter_map(|n| model.params().get(n)).map(|p| p.tensor().numel()).sum();
    Ok(FtOutcome {
        report: FtReport {
            recipe: recipe.clone(),
            model_type: model.config().model_type().to_string(),
            trained_params: trained,
            trained_elements,
            data_counts: counts,
            prefixes,
            runs,
            changed,
            restored_exactly: restored,
            warnings,
            deliberate_differences: ft_deliberate_differences(recipe),
            seconds: t0.elapsed().as_secs_f64(),
        },
        metrics,
        records,
    })
}

type RunParts = (
    Vec<RunLog>,
    Vec<TensorChange>,
    Option<bool>,
    Vec<String>,
    Option<Vec<RecordEval>>,
    Option<Vec<RecordEval>>,
);

fn run<M: CausalLm + ?Sized>(
    model: &mut M,
    requests: &[EditRequest],
    recipe: &FtRecipe,
    opts: &FtOptions,
    trained: &[String],
    _warnings: &mut Vec<EditWarning>,
) -> Result<RunParts> {
    let pre = match &opts.eval {
        Some(cfg) => Some(evaluate_requests(&*model, requests, cfg)?),
        None => None,
    };
    let prefixes = paraphrase_prefixes(&*model, &recipe.augmentation.paraphrases)?;
    model.set_trainable(&|p| trained.iter().any(|n| n == p.name()))?;
    let snapshot = WeightSnapshot::capture(&*model, Some(trained))?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(recipe.seed ^ 0x5eed_1ca1);
    let groups: Vec<Vec<usize>> = match recipe.mode {
        EditMode::Batched => vec![(0..requests.len()).collect()],
        _ => (0..requests.len()).map(|i| vec![i]).collect(),
    };
    let pb = opts.progress.then(|| {
        let pb = ProgressBar::new((groups.len() * recipe.epochs) as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} epochs [{elapsed}<{eta}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(recipe.name.clone());
        pb
    });
    let mut runs = Vec::with_capacity(groups.len());
    let mut posts: Vec<RecordEval> = Vec::new();
    let mut restored = None;
    for g in &groups {
        let rows =
            training_rows(&*model, requests, g, recipe, &prefixes, &opts.locality_pool, &mut rng)?;
        let log = train_rows(model, &rows, recipe, trained, pb.as_ref());
        if recipe.mode == EditMode::Single {
            let log = match log {
                Ok(l) => l,
                Err(e) => {
                    snapshot.restore(model)?;
                    return Err(e);
                }
            };
            let post = match &opts.eval {
                Some(cfg) => {
                    let own: Vec<EditRequest> = g.iter().map(|&i| requests[i].clone()).collect();
                    evaluate_requests(&*model, &own, cfg)
                }
                None => Ok(vec![]),
            };
            snapshot.restore(model)?;
            posts.extend(post?);
            runs.push(log);
        } else {
            runs.push(log?);
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let changed = if recipe.mode == EditMode::Single {
        let exact = snapshot.changes(&*model)?.iter().all(|c| c.frobenius_delta == 0.0);
        restored = Some(exact);
        vec![]
    } else {
        if let Some(cfg) = &opts.eval {
            posts = evaluate_requests(&*model, requests, cfg)?;
        }
        snapshot.changes(&*model)?
    };
    let post = opts.eval.as_ref().map(|_| posts);
    Ok((runs, changed, restored, prefixes, pre, post))
}

/// The IO-5 manifest of a fine-tuning edit.
///
/// # Errors
/// [`Error::Io`] hashing the input weights; [`Error::Json`].
pub fn ft_manifest(outcome: &FtOutcome, input_dir: Option<&Path>) -> Result<Manifest> {
    let r = &outcome.report;
    Ok(Manifest {
        method: "finetune".into(),
        amend_version: env!("CARGO_PKG_VERSION").into(),
        input_dir: input_dir.map(Path::to_path_buf),
        input_weights_sha256: match input_dir {
            Some(d) => hash_weight_files(d)?,
            None => Default::default(),
        },
        config: to_json_value("recipe", &r.recipe)?,
        edited_keys: r
            .changed
            .iter()
            .filter(|c| c.frobenius_delta > 0.0)
            .map(|c| c.name.clone())
            .collect(),
        warnings: r.warnings.clone(),
        deliberate_differences: r.deliberate_differences.clone(),
        report: to_json_value("report", r)?,
    })
}

/// Loads `model_dir`, applies [`ft_edit`] and writes the edited model to `out_dir` (atomically,
/// with `amend_edit.json`). Single mode leaves no edited model: it is an error here (use
/// [`ft_edit`] for per-edit metrics).
///
/// # Errors
/// [`Error::InvalidInput`] for `EditMode::Single`; as [`ft_edit`]; load and save errors.
pub fn ft_edit_dir(
    model_dir: &Path,
    requests: &[EditRequest],
    recipe: &FtRecipe,
    opts: &FtOptions,
    out_dir: &Path,
    out: &OutputOptions,
) -> Result<(FtOutcome, PathBuf)> {
    if recipe.mode == EditMode::Single {
        return Err(Error::invalid(
            "ft_edit_dir",
            "mode",
            "single mode restores the original weights after every edit: there is no edited model to write",
        ));
    }
    let mut model = amend_models::load(model_dir, &LoadOptions::default())?;
    let outcome = ft_edit(&mut model, requests, recipe, opts)?;
    let manifest = ft_manifest(&outcome, Some(model_dir))?;
    let dir = write_edited_model(&model, out_dir, &manifest, out)?;
    Ok((outcome, dir))
}
