//! `amend edit`: edit a model and write the result as a new Hugging Face directory.
//!
//! `amend edit project` applies ProFS (subspace projection, tuning-free); `amend edit finetune`
//! applies FT-L / FT-M / FT-M with augmentation. Both run on the embedded synthetic fact-edit
//! task when no model and data are given.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use amend::edit::ft::{
    Augmentation, EditMode, FtOptions, FtRecipe, LocalityFacts, ParamSelector, ft_edit, ft_manifest,
};
use amend::edit::io::read_jsonl;
use amend::edit::manifest::{
    MANIFEST_FILE, METRICS_FILE, OutputOptions, write_dir_atomically, write_edited_model,
};
use amend::edit::metrics::{EvalConfig, FluencyConfig, mean_text_nll};
use amend::edit::profs::{
    Centering, Pairing, Pooling, PreferencePair, ProfsConfig, RankPolicy, SvdDtype, profs_edit,
    profs_manifest,
};
use amend::edit::tasks::facts::{FactTask, FactTaskConfig, default_model_cache};
use amend::edit::{EditRequest, QaPair};
use amend::models::recipe::RunOptions;
use amend::models::{CausalLm, Model};

/// Edit a model: ProFS subspace projection (`project`) or fine-tuning edits (`finetune`).
///
/// Each command writes a new Hugging Face directory (config.json, model.safetensors, tokenizer
/// files) atomically, with `amend_edit.json` (how it was made) and `amend_edit_metrics.json`
/// (metrics before and after) next to the weights. The input directory is never written; an
/// interrupted or failed run (Ctrl-C, SIGTERM, a write error) leaves no output.
/// Without --model, both commands run on the embedded synthetic fact-edit task (a tiny GPT-2
/// trained on a seeded fact base, cached under $AMEND_CACHE_DIR/models or
/// ~/.cache/amend/models).
#[derive(Debug, Args)]
pub struct EditArgs {
    #[command(subcommand)]
    pub command: EditCommand,
}

/// The editing methods.
#[derive(Debug, Subcommand)]
pub enum EditCommand {
    Project(ProjectArgs),
    Finetune(FinetuneArgs),
}

/// Options shared by both commands.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Hugging Face checkpoint directory to edit (default: the embedded fact-edit task's model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Output directory (a new Hugging Face directory). It may not be, contain or sit inside an
    /// input (the model, the data files, the model cache).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing output directory, only if it is an earlier amend output holding
    /// nothing but amend's files (listed in its amend_output.json), and only once the new one is
    /// complete.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the metrics JSON to this file (not an input, not inside --out; replaced if it
    /// exists). Both --out and --metrics are written, or neither.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    #[command(flatten)]
    pub threads: super::ThreadsArgs,
    #[command(flatten)]
    pub load: super::LoadArgs,
    /// Cache of the embedded task's model (default: $AMEND_CACHE_DIR/models or
    /// ~/.cache/amend/models).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of the embedded task.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub task_seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// ProFS / DeTox: project the subspace separating dis-preferred from preferred texts out of the
/// MLP value weights of a range of layers (tuning-free, deterministic).
///
/// Pairs file (JSONL, one pair per line): {"preferred": "...", "dispreferred": "..."}
/// ("chosen"/"rejected" and "unpert_gen_text"/"pert_gen_text" are accepted too); see
/// docs/editing-data.md. Reference defaults for --layers/--rank exist only for gpt2-medium,
/// GPT-J 6B, Mistral 7B and OPT 6.7B; other models need both.
///
/// Without --model/--pairs: the embedded fact task, suppressing the most common object of its
/// first relation (pairs: true fact vs the same sentence with the suppressed object), layers
/// L/2..L, rank 2.
///
/// Example: amend edit project --model ./gpt2-medium --pairs pairs.jsonl --out ./gpt2-profs
#[derive(Debug, Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Preference pairs (JSONL).
    #[arg(long, value_name = "FILE", requires = "model")]
    pub pairs: Option<PathBuf>,
    /// Edited layers, half-open: A..B edits blocks A to B-1.
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub layers: Option<Range<usize>>,
    /// Rank k of the projected subspace.
    #[arg(long, value_name = "K")]
    pub rank: Option<usize>,
    /// Centering of the difference matrix.
    #[arg(long, value_enum, default_value_t = CenteringArg::Top)]
    pub centering: CenteringArg,
    /// Sentence pooling (all-positions is the reference's parity option).
    #[arg(long, value_enum, default_value_t = PoolingArg::Masked)]
    pub pooling: PoolingArg,
    /// Draw the two sides independently (reference HEAD parity option; breaks the pairs).
    #[arg(long)]
    pub independent_pairs: bool,
    /// Pairs drawn from the file.
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub n_pairs: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u64,
    /// Use exactly these pairs: a file with 0-based pair indices (a JSON array, or one per line);
    /// overrides --n-pairs and --seed.
    #[arg(long, value_name = "FILE")]
    pub indices: Option<PathBuf>,
    /// Tokens per text.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_len: usize,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub batch: usize,
    /// Also edit the MLP key (input) weights (not recommended by the reference).
    #[arg(long)]
    pub edit_keys: bool,
    /// Also project the value bias.
    #[arg(long)]
    pub project_bias: bool,
    /// SVD in f64 instead of f32.
    #[arg(long)]
    pub svd_f64: bool,
    /// What to do when k exceeds the numerical rank of a layer.
    #[arg(long, value_enum, default_value_t = RankPolicyArg::WarnKeep)]
    pub rank_policy: RankPolicyArg,
    /// Leave degenerate layers unedited (with a warning) instead of failing.
    #[arg(long)]
    pub allow_degenerate_layers: bool,
    /// A full ProFS configuration (JSON, fields of amend_edit::profs::ProfsConfig); flags given
    /// explicitly override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Edit by fine-tuning: FT-L, FT-M, FT-M with paraphrase and locality augmentation, or the
/// Gangadhar & Stratos presets.
///
/// Edits file (JSONL, one request per line): {"prompt": "...", "target_new": "...",
/// "target_true": "...", "rephrase": [...], "neighbourhood": [...], "locality": {...}}; see
/// docs/editing-data.md. Targets are trained and scored as " " + target.
///
/// Modes: batched (all edits trained together; the edited model is written), sequential (one
/// after another, accumulating; written), single (each edit alone, weights restored after it;
/// only the metrics are written, into --out, because no edited model remains).
///
/// Without --model/--edits: the embedded fact task's 20 counterfactual edits on its tiny GPT-2
/// (locality facts for augmentation come from the task's pool).
///
/// Example: amend edit finetune --model ./gpt2 --edits edits.jsonl --method ft-m --layers 5 --out ./gpt2-ftm
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Edit requests (JSONL).
    #[arg(long, value_name = "FILE", requires = "model")]
    pub edits: Option<PathBuf>,
    /// Method preset.
    #[arg(long, value_enum, default_value_t = MethodArg::FtM)]
    pub method: MethodArg,
    /// How edits are applied.
    #[arg(long, value_enum, default_value_t = ModeArg::Batched)]
    pub mode: ModeArg,
    /// Train the MLP output projection of these layers (e.g. 5 or 3,4 or 2..6) (default: the
    /// middle layer for FT-L/FT-M, all parameters for the gs-* presets).
    #[arg(long, value_name = "LAYERS", value_parser = parse_layers, conflicts_with = "all_params")]
    pub layers: Option<LayerList>,
    /// Train every parameter (full fine-tuning).
    #[arg(long)]
    pub all_params: bool,
    /// Learning rate (default: the preset's; 5e-3 on the embedded task).
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Epochs over the training rows.
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Rows per optimizer step (default: the preset's; batched mode: 32).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// L-infinity box around the original weights.
    #[arg(long, value_name = "EPS")]
    pub norm_box: Option<f64>,
    /// Locality facts for augmentation (JSONL of {"prompt", "answer"}).
    #[arg(long, value_name = "FILE")]
    pub locality_pool: Option<PathBuf>,
    /// Tokens generated per prompt for the fluency metric (0: skip fluency).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub fluency_tokens: usize,
    /// A full recipe (JSON, fields of amend_edit::ft::FtRecipe) instead of --method; --mode,
    /// --layers, --lr, --epochs, --batch-size and --norm-box still override it.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Skip the evaluation before and after.
    #[arg(long)]
    pub no_eval: bool,
}

/// Centering choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CenteringArg {
    /// Remove the top singular direction of the preferred embeddings (reference).
    Top,
    /// Remove the mean direction of the preferred embeddings.
    Mean,
    /// No centering (ablation; damages the model).
    None,
}

/// Pooling choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PoolingArg {
    /// Mean over real tokens.
    Masked,
    /// Mean over all positions including padding (reference parity).
    AllPositions,
}

/// Rank policy choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RankPolicyArg {
    /// Warn and keep k.
    WarnKeep,
    /// Warn and use the numerical rank.
    Clamp,
    /// Fail.
    Error,
}

/// Fine-tuning presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// EasyEdit FT-L: targets scored from the last prompt position.
    FtL,
    /// EasyEdit FT-M: conditional likelihood of the target.
    FtM,
    /// FT-M with paraphrase prefixes generated from the model and locality facts (from
    /// --locality-pool, those with the edit's old answer first).
    FtMAug,
    /// Gangadhar & Stratos single-edit recipe (all parameters).
    GsSingle,
    /// Gangadhar & Stratos mass-edit recipe (all parameters).
    GsMass,
}

/// Edit modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Each edit alone, weights restored after it (metrics only).
    Single,
    /// One edit after another, accumulating.
    Sequential,
    /// All edits together.
    Batched,
}

fn parse_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("`{s}` is not of the form A..B"))?;
    let a: usize = a.trim().parse().map_err(|e| format!("`{a}`: {e}"))?;
    let b: usize = b.trim().parse().map_err(|e| format!("`{b}`: {e}"))?;
    if a >= b {
        return Err(format!("`{s}` is empty (A must be < B)"));
    }
    Ok(a..b)
}

/// A list of layers (`5`, `3,4` or `2..6`).
#[derive(Debug, Clone)]
pub struct LayerList(pub Vec<usize>);

fn parse_layers(s: &str) -> Result<LayerList, String> {
    if s.contains("..") {
        return parse_range(s).map(|r| LayerList(r.collect()));
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|e| format!("`{x}`: {e}")))
        .collect::<Result<Vec<usize>, String>>()
        .map(LayerList)
}

/// Runs `amend edit`.
pub fn run(args: &EditArgs) -> Result<()> {
    match &args.command {
        EditCommand::Project(a) => run_project(a),
        EditCommand::Finetune(a) => run_finetune(a),
    }
}

fn setup(c: &CommonArgs) {
    c.threads.apply();
}

fn load_model(c: &CommonArgs, dir: &Path) -> Result<Model> {
    let opts = c.load.options(tch::Kind::Float);
    amend::models::load(dir, &opts)
        .with_context(|| format!("cannot load a model from {}", dir.display()))
}

/// The embedded task and its model.
fn embedded(c: &CommonArgs) -> Result<(FactTask, Model, PathBuf)> {
    let task = FactTask::new(&FactTaskConfig { seed: c.task_seed, ..FactTaskConfig::default() })?;
    let cache = c.cache_dir.clone().unwrap_or_else(default_model_cache);
    if !c.quiet {
        eprintln!("embedded fact-edit task: model cache {}", cache.display());
    }
    let (model, report, dir) = task
        .model(&FactTask::recipe(), &cache, &RunOptions { progress: !c.quiet, metrics_path: None })
        .context("cannot train or load the embedded task's model")?;
    if !c.quiet {
        eprintln!(
            "model {} ({} parameters, held-out perplexity {:.3})",
            dir.display(),
            report.num_parameters,
            report.eval_perplexity.unwrap_or(f64::NAN)
        );
    }
    Ok((task, Model::Gpt2(model), dir))
}

/// Checks `--out` and `--metrics` against the inputs (flag, path) and each other, before any
/// work and again just before writing (see `amend::models::output::check_outputs`): neither may
/// be, contain or sit inside an input (the model cache too, for the embedded task) or the other;
/// an existing `--out` is replaced only with --overwrite and only if it is an earlier amend
/// output holding nothing else; `--metrics` is replaced if it exists.
fn check_outputs(c: &CommonArgs, inputs: &[(&str, Option<&PathBuf>)]) -> Result<()> {
    use amend::models::output::{Existing, OutputKind, OutputSpec};
    let cache = c.cache_dir.clone().unwrap_or_else(default_model_cache);
    let mut ins: Vec<(&str, &Path)> =
        inputs.iter().filter_map(|(l, p)| p.map(|p| (*l, p.as_path()))).collect();
    if let Some(m) = &c.model {
        ins.push(("--model", m));
    } else {
        ins.push(("--cache-dir", &cache));
    }
    let mut specs = vec![OutputSpec {
        label: "--out",
        path: &c.out,
        kind: OutputKind::Dir,
        existing: if c.overwrite {
            Existing::ReplaceAmendOutput { legacy: Some(amend::edit::manifest::EARLIER_OUTPUT) }
        } else {
            Existing::Refuse {
                hint: "pass --overwrite to replace it (only an earlier amend output is replaced)",
            }
        },
    }];
    if let Some(m) = &c.metrics {
        specs.push(OutputSpec {
            label: "--metrics",
            path: m,
            kind: OutputKind::File,
            existing: Existing::ReplaceFile,
        });
    }
    amend::models::output::check_outputs(&specs, &ins)?;
    Ok(())
}

/// Writes the `--metrics` copy (staged, then renamed into place).
fn write_metrics_copy(path: Option<&PathBuf>, bytes: &[u8]) -> Result<()> {
    use amend::models::output::{Replace, Staged};
    if let Some(p) = path {
        let staged = Staged::file("--metrics", p)?;
        std::fs::write(staged.path(), bytes)
            .with_context(|| format!("cannot write --metrics {}", p.display()))?;
        staged.commit(Replace::Any)?;
    }
    Ok(())
}

fn run_project(a: &ProjectArgs) -> Result<()> {
    let c = &a.common;
    let inputs = [
        ("--pairs", a.pairs.as_ref()),
        ("--indices", a.indices.as_ref()),
        ("--config", a.config.as_ref()),
    ];
    check_outputs(c, &inputs)?;
    setup(c);
    let mut cfg: ProfsConfig = match &a.config {
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a ProFS config", p.display()))?,
        None => ProfsConfig::default(),
    };
    cfg.centering = match a.centering {
        CenteringArg::Top => Centering::TopSingularOfPreferred,
        CenteringArg::Mean => Centering::Mean,
        CenteringArg::None => Centering::None,
    };
    cfg.pooling = match a.pooling {
        PoolingArg::Masked => Pooling::MeanMasked,
        PoolingArg::AllPositions => Pooling::MeanAllPositions,
    };
    if a.independent_pairs {
        cfg.pairing = Pairing::IndependentCompat;
    }
    cfg.n_pairs = a.n_pairs;
    cfg.seed = a.seed;
    cfg.max_len = a.max_len;
    cfg.batch = a.batch;
    cfg.edit_keys |= a.edit_keys;
    cfg.project_bias |= a.project_bias;
    if a.svd_f64 {
        cfg.svd_dtype = SvdDtype::F64;
    }
    cfg.rank_policy = match a.rank_policy {
        RankPolicyArg::WarnKeep => RankPolicy::WarnKeep,
        RankPolicyArg::Clamp => RankPolicy::Clamp,
        RankPolicyArg::Error => RankPolicy::Error,
    };
    cfg.allow_degenerate_layers |= a.allow_degenerate_layers;
    cfg.progress = !c.quiet;
    if let Some(p) = &a.indices {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let idx: Vec<usize> = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => text
                .split_whitespace()
                .map(|x| {
                    x.parse().with_context(|| format!("{}: `{x}` is not an index", p.display()))
                })
                .collect::<Result<_>>()?,
        };
        cfg.indices = Some(idx);
    }
    if let Some(l) = &a.layers {
        cfg.layers = Some(l.clone());
    }
    if let Some(k) = a.rank {
        cfg.k = Some(k);
    }

    let (mut model, pairs, input_dir, task) = match (&c.model, &a.pairs) {
        (Some(dir), Some(pairs)) => {
            let pairs: Vec<PreferencePair> = read_jsonl(pairs)?;
            (load_model(c, dir)?, pairs, dir.clone(), None)
        }
        (Some(_), None) => bail!("--model needs --pairs (a JSONL file of preference pairs)"),
        (None, _) => {
            let (task, model, dir) = embedded(c)?;
            let sup = task.most_common_object(0);
            let pairs = task.preference_pairs(0, sup);
            let n = model.num_layers();
            cfg.layers.get_or_insert(n / 2..n);
            cfg.k.get_or_insert(2);
            (model, pairs, dir, Some((task, sup)))
        }
    };
    let used: Vec<&PreferencePair> = pairs.iter().take(cfg.n_pairs.min(200)).collect();
    let pref: Vec<&str> = used.iter().map(|p| p.preferred.as_str()).collect();
    let disp: Vec<&str> = used.iter().map(|p| p.dispreferred.as_str()).collect();
    let nll = |m: &Model| -> Result<(f64, f64)> {
        // Truncated as the edit truncates them (--max-len), so that long pairs can be edited.
        let cap = Some(cfg.max_len);
        let side = |texts: &[&str], side: &str| -> Result<f64> {
            match mean_text_nll(m, texts, 16, cap) {
                Err(amend::edit::Error::Model(amend::models::Error::TooLong {
                    index,
                    tokens,
                    context,
                    field,
                    ..
                })) => bail!(
                    "pair {index} (counting from 0), {side} text: {tokens} tokens with --max-len {} are more than \
                     the model's context of {context} tokens (`{field}` in its config.json); \
                     pass --max-len {context} or less",
                    cfg.max_len
                ),
                r => Ok(r?),
            }
        };
        Ok((side(&pref, "preferred")?, side(&disp, "dispreferred")?))
    };
    model.set_training(false);
    let before = nll(&model)?;
    let stats_before = match &task {
        Some((t, sup)) => Some(t.answer_stats(&model, Some((0, *sup)), 64)?),
        None => None,
    };
    let report = profs_edit(&mut model, &pairs, &cfg)?;
    let after = nll(&model)?;
    let stats_after = match &task {
        Some((t, sup)) => Some(t.answer_stats(&model, Some((0, *sup)), 64)?),
        None => None,
    };
    let metrics = json!({
        "method": "profs",
        "input": input_dir,
        "pair_texts_scored": used.len(),
        "preferred_mean_nll": {"pre": before.0, "post": after.0},
        "dispreferred_mean_nll": {"pre": before.1, "post": after.1},
        "embedded_task": task.as_ref().map(|(t, sup)| json!({
            "suppressed": {"relation": amend::edit::tasks::facts::RELATIONS[0].name,
                           "object": amend::edit::tasks::facts::RELATIONS[0].objects[*sup]},
            "answers_pre": stats_before, "answers_post": stats_after,
            "n_subjects": t.subjects.len(),
        })),
        "report": report,
    });
    let bytes = serde_json::to_vec_pretty(&metrics)?;
    let manifest = profs_manifest(&report, Some(&input_dir))?;
    let mut extra = BTreeMap::new();
    extra.insert(METRICS_FILE.to_string(), bytes.clone());
    // Both outputs or neither: an error or an interruption undoes the one already written.
    let transaction = amend::models::output::Transaction::begin();
    check_outputs(c, &inputs)?;
    let dir = write_edited_model(
        &model,
        &c.out,
        &manifest,
        &OutputOptions { overwrite: c.overwrite, extra_files: extra },
    )?;
    write_metrics_copy(c.metrics.as_ref(), &bytes)?;
    transaction.confirm();
    println!(
        "ProFS: layers {}..{}, k = {}, {} pairs; {} tensors edited; wrote {}",
        report.layers.start,
        report.layers.end,
        report.k,
        report.pairs_used,
        report.changed.len(),
        dir.display()
    );
    // Decoded tokens of the logit-lens view (ids when the model has no tokenizer).
    let show = |ids: &[i64]| -> String {
        let words: Vec<String> = ids
            .iter()
            .take(6)
            .map(|&t| match model.tokenizer() {
                Some(tok) => match tok.decode(&[t as u32], false) {
                    Ok(w) => format!("{w:?}"),
                    Err(_) => format!("#{t}"),
                },
                None => format!("#{t}"),
            })
            .collect();
        words.join(" ")
    };
    for l in &report.layer_summaries {
        println!(
            "  layer {:>3}: sigma_1..k = {:?}, k_eff = {}, energy {:.3}{}",
            l.layer,
            l.sigma_top_k.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>(),
            l.k_eff,
            l.explained_energy,
            if l.skipped { " (skipped)" } else { "" }
        );
        for (j, d) in l.directions.iter().enumerate() {
            println!(
                "      v{}: energy {:.3}; W_U·v largest: {}; smallest: {}",
                j + 1,
                d.energy,
                show(&d.top_tokens),
                show(&d.bottom_tokens)
            );
        }
    }
    println!(
        "mean NLL per token: preferred {:.4} -> {:.4}, dis-preferred {:.4} -> {:.4}",
        before.0, after.0, before.1, after.1
    );
    if let (Some(b), Some(a2)) = (&stats_before, &stats_after) {
        println!(
            "suppressed object chosen: {:.1}% -> {:.1}% of prompts ({:.1}% -> {:.1}% where it is the true answer)",
            100.0 * b.suppressed_rate.unwrap_or(0.0),
            100.0 * a2.suppressed_rate.unwrap_or(0.0),
            100.0 * b.suppressed_rate_own.unwrap_or(0.0),
            100.0 * a2.suppressed_rate_own.unwrap_or(0.0)
        );
    }
    for w in &report.warnings {
        eprintln!("warning [{}]: {}", w.code, w.message);
    }
    Ok(())
}

fn run_finetune(a: &FinetuneArgs) -> Result<()> {
    let c = &a.common;
    let inputs = [
        ("--edits", a.edits.as_ref()),
        ("--locality-pool", a.locality_pool.as_ref()),
        ("--recipe", a.recipe.as_ref()),
    ];
    check_outputs(c, &inputs)?;
    setup(c);
    let (mut model, requests, pool, input_dir, embedded_task) = match (&c.model, &a.edits) {
        (Some(dir), Some(edits)) => {
            let requests: Vec<EditRequest> = read_jsonl(edits)?;
            let pool: Vec<QaPair> = match &a.locality_pool {
                Some(p) => read_jsonl(p)?,
                None => vec![],
            };
            (load_model(c, dir)?, requests, pool, dir.clone(), false)
        }
        (Some(_), None) => bail!("--model needs --edits (a JSONL file of edit requests)"),
        (None, _) => {
            let (task, model, dir) = embedded(c)?;
            (model, task.edits.clone(), task.locality_pool.clone(), dir, true)
        }
    };
    let n = model.num_layers();
    let mid = vec![n / 2];
    let mut recipe = match (&a.recipe, a.method) {
        (Some(p), _) => serde_json::from_slice::<FtRecipe>(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a fine-tuning recipe", p.display()))?,
        (None, MethodArg::FtL) => FtRecipe::ft_l(ParamSelector::MlpOutput { layers: mid }),
        (None, MethodArg::FtM) => FtRecipe::ft_m(ParamSelector::MlpOutput { layers: mid }),
        (None, MethodArg::FtMAug) => FtRecipe {
            name: "ft-m-aug".into(),
            ..FtRecipe::ft_m(ParamSelector::MlpOutput { layers: mid }).with_augmentation(
                Augmentation::generated(
                    10,
                    42,
                    if pool.is_empty() {
                        LocalityFacts::None
                    } else {
                        LocalityFacts::SameAnswer { per_edit: 10 }
                    },
                ),
            )
        },
        (None, MethodArg::GsSingle) => FtRecipe::gs_single(),
        (None, MethodArg::GsMass) => FtRecipe::gs_mass(),
    };
    if a.recipe.is_none()
        && pool.is_empty()
        && matches!(
            recipe.augmentation.locality,
            LocalityFacts::Random { .. } | LocalityFacts::SameAnswer { .. }
        )
    {
        eprintln!("note: no --locality-pool given: training without locality facts");
        recipe.augmentation.locality = LocalityFacts::None;
    }
    recipe.mode = match a.mode {
        ModeArg::Single => EditMode::Single,
        ModeArg::Sequential => EditMode::Sequential,
        ModeArg::Batched => EditMode::Batched,
    };
    if a.recipe.is_none() && recipe.batch_size == Some(1) {
        if a.mode == ModeArg::Batched {
            recipe.batch_size = Some(32);
            recipe.shuffle = true;
        } else {
            // One full batch of each edit's rows per step (1 row without augmentation).
            recipe.batch_size = None;
        }
    }
    if let Some(l) = &a.layers {
        recipe.params = ParamSelector::MlpOutput { layers: l.0.clone() };
    }
    if a.all_params {
        recipe.params = ParamSelector::All;
    }
    if embedded_task && a.recipe.is_none() && a.lr.is_none() {
        // The presets' learning rates are for billion-parameter models.
        recipe.lr = 5e-3;
    }
    if let Some(lr) = a.lr {
        recipe.lr = lr;
    }
    if let Some(e) = a.epochs {
        recipe.epochs = e;
    }
    if let Some(b) = a.batch_size {
        recipe.batch_size = Some(b);
    }
    if let Some(e) = a.norm_box {
        recipe.norm_box = Some(e);
    }
    let eval = (!a.no_eval).then(|| EvalConfig {
        batch_size: 32,
        fluency: (a.fluency_tokens > 0).then(|| FluencyConfig {
            max_new_tokens: a.fluency_tokens,
            ..FluencyConfig::default()
        }),
    });
    let opts = FtOptions { locality_pool: pool, eval, progress: !c.quiet };
    let outcome = ft_edit(&mut model, &requests, &recipe, &opts)?;
    let bytes = serde_json::to_vec_pretty(&json!({
        "method": recipe.name,
        "input": input_dir,
        "outcome": outcome,
    }))?;
    let manifest = ft_manifest(&outcome, Some(&input_dir))?;
    let mut extra = BTreeMap::new();
    extra.insert(METRICS_FILE.to_string(), bytes.clone());
    // Both outputs or neither: an error or an interruption undoes the one already written.
    let transaction = amend::models::output::Transaction::begin();
    check_outputs(c, &inputs)?;
    let dir = if recipe.mode == EditMode::Single {
        extra.insert(MANIFEST_FILE.to_string(), manifest.to_bytes()?);
        write_dir_atomically(&c.out, &extra, c.overwrite, Some(&input_dir))?
    } else {
        write_edited_model(
            &model,
            &c.out,
            &manifest,
            &OutputOptions { overwrite: c.overwrite, extra_files: extra },
        )?
    };
    write_metrics_copy(c.metrics.as_ref(), &bytes)?;
    transaction.confirm();
    let r = &outcome.report;
    println!(
        "{} ({:?}): {} edits, rows E/P/R = {}/{}/{}, {} trained tensors ({} scalars), {} optimizer steps, {:.1} s",
        recipe.name,
        recipe.mode,
        requests.len(),
        r.data_counts.edits,
        r.data_counts.paraphrases,
        r.data_counts.locality,
        r.trained_params.len(),
        r.trained_elements,
        r.runs.iter().map(|x| x.steps).sum::<usize>(),
        r.seconds
    );
    if let Some(m) = &outcome.metrics {
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
        let s = |x: Option<amend::edit::metrics::Stat>| f(x.map(|s| s.mean));
        for (phase, p, e) in [
            ("before", &m.memit_prob.pre, &m.easyedit_tokacc.pre),
            ("after ", &m.memit_prob.post, &m.easyedit_tokacc.post),
        ] {
            println!(
                "{phase}: memit-prob ES {} PS {} NS {} S {} | easyedit-tokacc rewrite {} rephrase {} locality {:?}",
                s(p.efficacy),
                s(p.paraphrase),
                s(p.neighbourhood),
                f(p.score),
                f(e.rewrite_acc),
                f(e.rephrase_acc),
                e.locality.iter().map(|(k, v)| format!("{k} {v:.1}")).collect::<Vec<_>>()
            );
        }
    }
    if recipe.mode == EditMode::Single {
        println!(
            "single mode: every edit was undone (restored exactly: {}); wrote the metrics to {}",
            r.restored_exactly.unwrap_or(false),
            dir.display()
        );
    } else {
        println!("wrote {}", dir.display());
    }
    for w in &r.warnings {
        eprintln!("warning [{}]: {}", w.code, w.message);
    }
    Ok(())
}
