//! Editing facts by fine-tuning: FT-M (EasyEdit's conditional-likelihood fine-tuning of one MLP
//! output matrix) applied to 20 counterfactual edits at once, with the editing metrics before
//! and after in two protocol families, and the edited model written as a Hugging Face directory.
//!
//! ```text
//! cargo run --example fact_edit                # writes to a temporary directory
//! cargo run --example fact_edit -- ./edited    # keeps the edited model in ./edited
//! ```
//!
//! It runs on the embedded synthetic fact task (a tiny GPT-2 trained on invented biographies;
//! trained once and cached). With your own model and edits, replace the task by
//! `amend::models::load(dir, ..)` and requests read with `amend::edit::io::read_jsonl`
//! (schema in docs/editing-data.md), and use the preset's learning rate for large models.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use amend::edit::ft::{EditMode, FtOptions, FtRecipe, ParamSelector, ft_edit, ft_manifest};
use amend::edit::manifest::{METRICS_FILE, OutputOptions, write_edited_model};
use amend::edit::metrics::{EditMetrics, EvalConfig, score_answers};
use amend::edit::tasks::facts::{FactTask, FactTaskConfig, default_model_cache};
use amend::models::recipe::RunOptions;
use amend::models::{CausalLm, LoadOptions};

fn main() -> Result<()> {
    tch::set_num_threads(2);
    let start = Instant::now();

    // 1. The task and its model (trained on the first run, about 8 minutes in the debug
    //    profile on 2 cores, then cached under $AMEND_CACHE_DIR/models, default
    //    ~/.cache/amend/models).
    let task = FactTask::new(&FactTaskConfig::default())?;
    let (mut model, _, model_dir) = task
        .model(&FactTask::recipe(), &default_model_cache(), &RunOptions::default())
        .context("cannot train or load the fact task's model")?;

    // 2. The edit requests: each rewrites one fact to another object of the same relation, with
    //    held-out paraphrases, neighbourhood prompts (other people with the same true answer)
    //    and locality probes (the person's other facts).
    let first = task.edits.first().context("the task has no edits")?;
    println!(
        "{} edits, e.g. {:?}: {:?} -> {:?} ({} paraphrases, {} neighbourhood prompts)",
        task.edits.len(),
        first.rewrite_prompt(),
        first.target_true.as_deref().unwrap_or("?"),
        first.target_new,
        first.rephrase.len(),
        first.neighbourhood.len()
    );

    // 3. The recipe: FT-M on the MLP output projection (`c_proj`) of the middle block. The
    //    EasyEdit preset (Adam, lr 5e-4, 25 epochs, skip and stop below a loss of 1e-2) is tuned
    //    for 7B models; this tiny model needs a larger step. Batched: all edits in one training
    //    set, 32 rows per step, shuffled.
    let layer = model.num_layers() / 2;
    let mut recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![layer] })
        .with_mode(EditMode::Batched)
        .with_lr(5e-3);
    recipe.batch_size = Some(32);
    recipe.shuffle = true;

    // 4. Edit, with the metrics of every request measured before and after.
    let opts = FtOptions {
        eval: Some(EvalConfig { batch_size: 32, fluency: None }),
        ..FtOptions::default()
    };
    let outcome = ft_edit(&mut model, &task.edits, &recipe, &opts)?;
    let report = &outcome.report;
    println!(
        "{}: trained {} ({} scalars), {} optimizer steps, {:.1} s",
        report.recipe.name,
        report.trained_params.join(", "),
        report.trained_elements,
        report.runs.iter().map(|r| r.steps).sum::<usize>(),
        report.seconds
    );
    if let Some(m) = &outcome.metrics {
        print_metrics(m);
    }

    // 5. Write the edited model: a new Hugging Face directory (written atomically; never over
    //    the input), the manifest `amend_edit.json` (recipe, data counts, trained tensors,
    //    SHA-256 of the input weights) and the metrics next to the weights.
    let tmp = tempfile::tempdir()?;
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => tmp.path().join("fact-gpt2-ftm"),
    };
    let manifest = ft_manifest(&outcome, Some(&model_dir))?;
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(METRICS_FILE.to_string(), serde_json::to_vec_pretty(&outcome)?);
    let written = write_edited_model(
        &model,
        &out,
        &manifest,
        &OutputOptions { overwrite: false, extra_files: extra },
    )?;
    let mut files: Vec<String> = std::fs::read_dir(&written)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    println!("\nwrote {}: {}", written.display(), files.join(", "));

    // The written directory is an ordinary checkpoint: reload it and score one edit's old and
    // new answers (mean NLL per answer token; lower is more likely).
    let reloaded = amend::models::load(&written, &LoadOptions::default())?;
    let prompt = first.rewrite_prompt();
    let old = first.target_true.as_deref().context("the edit has no old answer")?;
    let items = [(prompt.as_str(), first.target_new.as_str()), (prompt.as_str(), old)];
    let scored = score_answers(&reloaded, &items, 2)?;
    println!(
        "reloaded: {prompt:?} -> NLL({:?}) = {:.3}, NLL({old:?}) = {:.3}",
        first.target_new, scored[0].mean_nll, scored[1].mean_nll
    );
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The summary metrics, one block per protocol family (they are never mixed).
fn print_metrics(m: &EditMetrics) {
    let pct = |x: Option<f64>| x.map_or("  –  ".to_string(), |v| format!("{v:5.1}"));
    let p = &m.memit_prob;
    println!("\nmemit-prob (CounterFact: is NLL(new) < NLL(old)?), % of prompts   before  after");
    for (name, b, a) in [
        ("ES  efficacy (rewrite prompts)", p.pre.efficacy, p.post.efficacy),
        ("PS  paraphrases (held out)", p.pre.paraphrase, p.post.paraphrase),
        ("NS  neighbourhood (keeps old answer)", p.pre.neighbourhood, p.post.neighbourhood),
    ] {
        println!("  {name:<62} {}  {}", pct(b.map(|s| s.mean)), pct(a.map(|s| s.mean)));
    }
    println!(
        "  {:<62} {}  {}",
        "S   edit score = hmean(ES, PS, NS)",
        pct(p.pre.score),
        pct(p.post.score)
    );

    let e = &m.easyedit_tokacc;
    println!("easyedit-tokacc (token accuracy of the new answer), %");
    println!("  {:<62} {}  {}", "rewrite_acc", pct(e.pre.rewrite_acc), pct(e.post.rewrite_acc));
    println!("  {:<62} {}  {}", "rephrase_acc", pct(e.pre.rephrase_acc), pct(e.post.rephrase_acc));
    for (key, v) in &e.post.locality {
        let name = format!("locality[{key}] (argmax unchanged by the edit)");
        println!("  {name:<62} {}  {}", pct(None), pct(Some(*v)));
    }
    println!(
        "  {:<62} {}  {}",
        "hmean(rewrite, rephrase, mean locality) (amend-specific)",
        pct(None),
        pct(e.post.edit_score_amend)
    );
}
