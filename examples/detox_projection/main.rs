//! ProFS (DeTox) end to end: find the subspace in which unwanted texts differ from wanted ones,
//! project it out of the MLP value weights, measure before and after, and save the edited model
//! as a Hugging Face directory.
//!
//! ```text
//! cargo run --example detox_projection
//! ```
//!
//! It runs on the embedded synthetic fact task: a tiny GPT-2 that knows, for 80 invented people,
//! where they live, what they play, and so on. The "unwanted behaviour" is one answer of one
//! relation (the most common place people live in): the preference pairs are the true sentence
//! (preferred) and the same sentence ending in that answer (dis-preferred). With your own model
//! and data, replace the task by `amend::models::load(dir, ..)` and pairs read with
//! `amend::edit::io::read_jsonl` (schema in docs/editing-data.md).

use std::time::Instant;

use anyhow::{Context, Result};

use amend::edit::manifest::{MANIFEST_FILE, OutputOptions, write_edited_model};
use amend::edit::metrics::{mean_text_nll, score_answers};
use amend::edit::profs::{PreferencePair, ProfsConfig, profs_edit, profs_manifest};
use amend::edit::tasks::facts::{FactTask, FactTaskConfig, RELATIONS, default_model_cache};
use amend::models::recipe::RunOptions;
use amend::models::{CausalLm, LoadOptions};

fn main() -> Result<()> {
    tch::set_num_threads(2);
    let start = Instant::now();

    // 1. The task and its model. The model is trained on the first run (about 8 minutes in
    //    the debug profile on 2 cores) and cached under $AMEND_CACHE_DIR/models (default
    //    ~/.cache/amend/models).
    let task = FactTask::new(&FactTaskConfig::default())?;
    let cache = default_model_cache();
    let (mut model, trained, model_dir) = task
        .model(&FactTask::recipe(), &cache, &RunOptions { progress: true, metrics_path: None })
        .context("cannot train or load the fact task's model")?;
    println!(
        "model: {} ({} parameters, {} layers, hidden {})",
        model_dir.display(),
        trained.num_parameters,
        model.num_layers(),
        model.gpt2_config().n_embd
    );

    // 2. Preference pairs: for relation 0 ("lives in"), the true sentence is preferred and the
    //    same sentence with the suppressed city is dis-preferred.
    let relation = 0;
    let suppressed = task.most_common_object(relation);
    let suppressed_name = RELATIONS[relation].objects[suppressed];
    let pairs = task.preference_pairs(relation, suppressed);
    let example = pairs.first().context("the task produced no preference pairs")?;
    println!(
        "suppress `{suppressed_name}` for relation `{}`: {} preference pairs, e.g.\n  + {}\n  - {}",
        RELATIONS[relation].name,
        pairs.len(),
        example.preferred,
        example.dispreferred
    );

    // 3. Before: which city the model answers for every person, and the mean NLL per token of
    //    both sides of the pairs.
    model.set_training(false);
    let before = measure(&task, &model, relation, suppressed, &pairs)?;

    // 4. The edit. The embedded model is not one of the reference checkpoints, so the layers
    //    and the rank are explicit: the upper half of the blocks, k = 2 (gpt2-medium's default).
    //    Everything else is the reference default (centering on the top singular direction of
    //    the preferred embeddings, mean over real tokens, paired sampling).
    //    Other settings can be tried from the command line: `-- 0..4 8` edits layers 0..4, k = 8.
    let n = model.num_layers();
    let mut args = std::env::args().skip(1);
    let layers = match args.next() {
        Some(a) => parse_range(&a)?,
        None => n / 2..n,
    };
    let k = match args.next() {
        Some(k) => k.parse().with_context(|| format!("rank `{k}` is not a number"))?,
        None => 2,
    };
    let cfg = ProfsConfig::default().with_layers(layers).with_k(k);
    let report = profs_edit(&mut model, &pairs, &cfg)?;
    println!(
        "\nProFS: layers {}..{}, k = {}, {} pairs, {:.2} s",
        report.layers.start, report.layers.end, report.k, report.pairs_used, report.seconds
    );
    for l in &report.layer_summaries {
        // Singular values of the centred difference matrix: a sharp drop after the k-th means
        // the unwanted direction is low-rank; `explained_energy` = Σ_{j≤k} σ_j² / Σ_j σ_j².
        let top: Vec<String> =
            l.singular_values.iter().take(5).map(|s| format!("{s:.3}")).collect();
        println!(
            "  layer {}: sigma_1..5 = [{}], energy in top {} = {:.1}%, k_eff = {}",
            l.layer,
            top.join(", "),
            l.k,
            100.0 * l.explained_energy,
            l.k_eff
        );
    }
    println!("tensors changed:");
    for c in &report.changed {
        println!(
            "  {}: ‖ΔW‖_F = {:.4} ({:.2}% of ‖W‖_F), max |ΔW| = {:.4}",
            c.name,
            c.frobenius_delta,
            100.0 * c.relative_delta,
            c.max_abs_delta
        );
    }
    for w in &report.warnings {
        println!("warning [{}]: {}", w.code, w.message);
    }

    // 5. After: the same measurements.
    let after = measure(&task, &model, relation, suppressed, &pairs)?;
    println!("\n{:<52} {:>8} {:>8}", "", "before", "after");
    for (name, b, a) in [
        (
            format!("answers `{suppressed_name}` (share of all {} people)", task.subjects.len()),
            100.0 * before.suppressed_share,
            100.0 * after.suppressed_share,
        ),
        (
            format!("answers `{suppressed_name}` where it is true"),
            100.0 * before.suppressed_own,
            100.0 * after.suppressed_own,
        ),
        (
            format!("accuracy `{}`", RELATIONS[relation].name),
            100.0 * before.accuracy,
            100.0 * after.accuracy,
        ),
    ] {
        println!("{name:<52} {b:>7.1}% {a:>7.1}%");
    }
    for (name, b, a) in [
        (
            format!("mean NLL of `{suppressed_name}` where it is false"),
            before.nll_suppressed,
            after.nll_suppressed,
        ),
        ("mean NLL/token, preferred texts".to_string(), before.nll_preferred, after.nll_preferred),
        (
            "mean NLL/token, dis-preferred texts".to_string(),
            before.nll_dispreferred,
            after.nll_dispreferred,
        ),
    ] {
        println!("{name:<52} {b:>8.3} {a:>8.3}");
    }

    // 6. Save: a new Hugging Face directory (config, safetensors, tokenizer files) written
    //    atomically, with the manifest `amend_edit.json` (config, σ per layer, edited keys,
    //    deliberate differences from the reference code, SHA-256 of the input weights).
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("fact-gpt2-profs");
    let manifest = profs_manifest(&report, Some(&model_dir))?;
    write_edited_model(&model, &out, &manifest, &OutputOptions::default())?;
    let mut files: Vec<String> = std::fs::read_dir(&out)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    println!("\nwrote {}: {}", out.display(), files.join(", "));

    // The directory loads like any checkpoint; its edited tensors are the ones in memory.
    let reloaded = amend::models::load(&out, &LoadOptions::default())?;
    for c in &report.changed {
        let (a, b) = (reloaded.params().tensor(&c.name)?, model.params().tensor(&c.name)?);
        anyhow::ensure!(a.equal(b), "{} differs after reloading", c.name);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE))?)?;
    println!(
        "reloaded: edited tensors identical; the manifest lists {} edited keys",
        manifest["edited_keys"].as_array().map_or(0, Vec::len)
    );
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// What the example measures before and after the edit.
struct Measures {
    /// Share of people whose lowest-NLL answer is the suppressed object.
    suppressed_share: f64,
    /// The same among the people for whom it is the true answer.
    suppressed_own: f64,
    /// Share of people whose lowest-NLL answer is their true object.
    accuracy: f64,
    /// Mean NLL per token of the suppressed object where it is not the true answer.
    nll_suppressed: f64,
    /// Mean NLL per token of the preferred and dis-preferred texts.
    nll_preferred: f64,
    nll_dispreferred: f64,
}

/// Scores every object of `relation` for every person (first template only, to stay fast) and
/// the texts of the preference pairs.
fn measure(
    task: &FactTask,
    model: &impl CausalLm,
    relation: usize,
    suppressed: usize,
    pairs: &[PreferencePair],
) -> Result<Measures> {
    let objects = RELATIONS[relation].objects;
    let prompts: Vec<String> =
        (0..task.subjects.len()).map(|s| task.prompt(s, relation, 0)).collect();
    let items: Vec<(&str, &str)> =
        prompts.iter().flat_map(|p| objects.iter().map(move |o| (p.as_str(), *o))).collect();
    let scores = score_answers(model, &items, 64)?;
    let (mut share, mut own, mut own_n, mut correct, mut nll, mut nll_n) = (0, 0, 0, 0, 0.0, 0);
    for (s, block) in scores.chunks(objects.len()).enumerate() {
        let choice = block
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.mean_nll.total_cmp(&b.1.mean_nll))
            .map_or(0, |(i, _)| i);
        let truth = task.objects[s][relation];
        share += usize::from(choice == suppressed);
        correct += usize::from(choice == truth);
        if truth == suppressed {
            own_n += 1;
            own += usize::from(choice == suppressed);
        } else {
            nll_n += 1;
            nll += block[suppressed].mean_nll;
        }
    }
    let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let preferred: Vec<&str> = pairs.iter().map(|p| p.preferred.as_str()).collect();
    let dispreferred: Vec<&str> = pairs.iter().map(|p| p.dispreferred.as_str()).collect();
    Ok(Measures {
        suppressed_share: frac(share, prompts.len()),
        suppressed_own: frac(own, own_n),
        accuracy: frac(correct, prompts.len()),
        nll_suppressed: if nll_n == 0 { f64::NAN } else { nll / nll_n as f64 },
        nll_preferred: mean_text_nll(model, &preferred, 64, None)?,
        nll_dispreferred: mean_text_nll(model, &dispreferred, 64, None)?,
    })
}

/// Parses a half-open layer range `A..B`.
fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once("..").with_context(|| format!("`{s}` is not a range A..B"))?;
    Ok(a.parse().with_context(|| format!("`{a}` is not a layer"))?
        ..b.parse().with_context(|| format!("`{b}` is not a layer"))?)
}
