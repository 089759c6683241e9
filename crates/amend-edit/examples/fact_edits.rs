//! FT-L vs FT-M vs FT-M with augmentation on the synthetic fact-edit task, single and batched.
//!
//! ```text
//! cargo run --release -p amend-edit --example fact_edits -- --threads 2 --json fact_edits.json
//! ```
//!
//! Trains (or loads from the cache) the task's tiny GPT-2, then runs each method on the task's
//! 20 counterfactual edits, once with every edit alone (single: weights restored between edits)
//! and once with all edits together (batched), and prints the metrics of both families. The
//! numbers are in `docs/editing.md`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

use amend_edit::ft::{
    Augmentation, EditMode, FtOptions, FtOutcome, FtRecipe, LocalityFacts, ParamSelector, ft_edit,
};
use amend_edit::metrics::{EvalConfig, FluencyConfig};
use amend_edit::tasks::facts::{FactTask, FactTaskConfig, default_model_cache};
use amend_models::recipe::RunOptions;

/// Compare fine-tuning editors on the synthetic fact-edit task.
#[derive(Debug, Parser)]
struct Args {
    /// Where trained task models are cached (default: $AMEND_CACHE_DIR/models or
    /// ~/.cache/amend/models).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// libtorch threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Write every outcome (reports, metrics, per-record numbers) to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Edited layer (the MLP output projection of this block is trained).
    #[arg(long, default_value_t = 1)]
    layer: usize,
    /// Learning rate of every method.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Epochs of every method.
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Tokens generated per prompt for fluency (0: no fluency).
    #[arg(long, default_value_t = 40)]
    fluency_tokens: usize,
    /// Only these methods (comma-separated: ft-l, ft-m, ft-m-aug).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let task = FactTask::new(&FactTaskConfig::default())?;
    let cache = args.cache_dir.clone().unwrap_or_else(default_model_cache);
    let t0 = Instant::now();
    let (model, report, dir) = task.model(
        &FactTask::recipe(),
        &cache,
        &RunOptions { progress: true, metrics_path: None },
    )?;
    println!(
        "model {} ({} parameters, eval perplexity {:.3}, trained in {:.0} s; loaded in {:.1} s)",
        dir.display(),
        report.num_parameters,
        report.eval_perplexity.unwrap_or(f64::NAN),
        report.seconds,
        t0.elapsed().as_secs_f64()
    );
    let base = task.answer_stats(&model, None, 64)?;
    println!("base accuracy per relation: {:?}", base.accuracy);

    let params = ParamSelector::MlpOutput { layers: vec![args.layer] };
    let ft_l = FtRecipe::ft_l(params.clone()).with_lr(args.lr).with_epochs(args.epochs);
    let ft_m = FtRecipe::ft_m(params.clone()).with_lr(args.lr).with_epochs(args.epochs);
    let aug = Augmentation::generated(10, 42, LocalityFacts::SameAnswer { per_edit: 10 });
    let ft_m_aug = FtRecipe { name: "ft-m-aug".into(), ..ft_m.clone().with_augmentation(aug) };
    let eval = EvalConfig {
        batch_size: 32,
        fluency: (args.fluency_tokens > 0).then(|| FluencyConfig {
            max_new_tokens: args.fluency_tokens,
            ..FluencyConfig::default()
        }),
    };
    let opts =
        FtOptions { locality_pool: task.locality_pool.clone(), eval: Some(eval), progress: true };

    let mut outcomes: Vec<(String, String, FtOutcome, f64)> = Vec::new();
    for recipe in [ft_l, ft_m, ft_m_aug] {
        if !args.methods.is_empty() && !args.methods.contains(&recipe.name) {
            continue;
        }
        for mode in [EditMode::Single, EditMode::Batched] {
            let mut r = recipe.clone().with_mode(mode);
            // Equal budgets: in single mode every step is one full batch of the edit's rows
            // (1 for FT-L/FT-M; 1 + 10 + 10 with augmentation, as Gangadhar & Stratos do).
            r.batch_size = None;
            if mode == EditMode::Batched {
                // All edits (and their augmentation rows) in batches of 32 rows.
                r.batch_size = Some(32);
                r.shuffle = true;
            }
            let mut m = model.try_clone()?;
            let t = Instant::now();
            let out = ft_edit(&mut m, &task.edits, &r, &opts)?;
            let secs = t.elapsed().as_secs_f64();
            outcomes.push((recipe.name.clone(), format!("{mode:?}").to_lowercase(), out, secs));
        }
    }

    print_tables(&outcomes);
    if let Some(path) = &args.json {
        let v: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|(n, mode, o, s)| serde_json::json!({"method": n, "mode": mode, "seconds": s, "outcome": o}))
            .collect();
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "model_dir": dir, "model_report": report, "base_accuracy": base, "runs": v,
            }))?,
        )?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// One cell: a percentage with one decimal, or `–` when the metric does not apply.
fn cell(x: Option<f64>) -> String {
    x.map_or("–".to_string(), |v| format!("{v:.1}"))
}

/// Prints one markdown table per metric family (they are never mixed, spec MET-1), then the
/// training budgets.
fn print_tables(outcomes: &[(String, String, FtOutcome, f64)]) {
    let with_metrics: Vec<_> = outcomes
        .iter()
        .filter_map(|(n, mode, o, s)| Some((n, mode, o, o.metrics.as_ref()?, s)))
        .collect();
    let Some((_, _, _, first, _)) = with_metrics.first() else { return };

    println!("\nmemit-prob (CounterFact probability comparison), % of prompts:\n");
    println!(
        "| method | mode | ES (efficacy) | PS (paraphrase) | NS (neighbourhood) | S = hmean |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, mode: &str, p: &amend_edit::metrics::ProbSummary| {
        println!(
            "| {name} | {mode} | {} | {} | {} | {} |",
            cell(p.efficacy.map(|s| s.mean)),
            cell(p.paraphrase.map(|s| s.mean)),
            cell(p.neighbourhood.map(|s| s.mean)),
            cell(p.score),
        );
    };
    row("(before)", "", &first.memit_prob.pre);
    for (name, mode, _, m, _) in &with_metrics {
        row(name, mode, &m.memit_prob.post);
    }

    println!("\neasyedit-tokacc (token accuracy; locality = unchanged argmax predictions), %:\n");
    println!(
        "| method | mode | rewrite_acc | rephrase_acc | locality (mean) | neighbourhood | same_subject | hmean (amend) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |name: &str, mode: &str, e: &amend_edit::metrics::EasyEditPhase| {
        let loc = (!e.locality.is_empty())
            .then(|| e.locality.values().sum::<f64>() / e.locality.len() as f64);
        println!(
            "| {name} | {mode} | {} | {} | {} | {} | {} | {} |",
            cell(e.rewrite_acc),
            cell(e.rephrase_acc),
            cell(loc),
            cell(e.locality.get("neighbourhood").copied()),
            cell(e.locality.get("same_subject").copied()),
            cell(e.edit_score_amend),
        );
    };
    row("(before)", "", &first.easyedit_tokacc.pre);
    for (name, mode, _, m, _) in &with_metrics {
        row(name, mode, &m.easyedit_tokacc.post);
    }

    println!(
        "\nmemit-tokacc (zsRE token accuracy; specificity = absolute accuracy of the locality probes), %:\n"
    );
    println!("| method | mode | efficacy | paraphrase | specificity | S = hmean |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, mode: &str, z: &amend_edit::metrics::ZsreSummary| {
        println!(
            "| {name} | {mode} | {} | {} | {} | {} |",
            cell(z.efficacy.map(|s| s.mean)),
            cell(z.paraphrase.map(|s| s.mean)),
            cell(z.specificity.map(|s| s.mean)),
            cell(z.score),
        );
    };
    row("(before)", "", &first.memit_tokacc.pre);
    for (name, mode, _, m, _) in &with_metrics {
        row(name, mode, &m.memit_tokacc.post);
    }

    println!("\nfluency and budget:\n");
    println!("| method | mode | GE ×100 | rows E/P/R | optimizer steps | wall time |");
    println!("|---|---|---|---|---|---|");
    println!("| (before) | | {} | | | |", cell(first.fluency.as_ref().map(|f| f.pre.ge.mean)));
    for (name, mode, out, m, secs) in &with_metrics {
        let d = &out.report.data_counts;
        let steps: usize = out.report.runs.iter().map(|r| r.steps).sum();
        println!(
            "| {name} | {mode} | {} | {}/{}/{} | {steps} | {secs:.0} s |",
            cell(m.fluency.as_ref().map(|f| f.post.ge.mean)),
            d.edits,
            d.paraphrases,
            d.locality,
        );
    }
}
