//! The report folder of a comparison: `report.md` (tables), `results.json` (every number and
//! the configuration), `plot.svg` and `plot.png`, written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::compare::{CompareResults, PointResult, fmt_value};
use crate::metrics::{Estimate, PointMetrics};
use crate::{Error, Result};

/// The files of a report folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// The folder.
    pub dir: PathBuf,
    /// `report.md`.
    pub markdown: PathBuf,
    /// `results.json`.
    pub json: PathBuf,
    /// `plot.svg` (absent when nothing can be plotted).
    pub svg: Option<PathBuf>,
    /// `plot.png` (absent when nothing can be plotted).
    pub png: Option<PathBuf>,
}

fn est(e: Option<Estimate>, digits: usize) -> String {
    match e {
        Some(e) if e.se.is_finite() => format!("{:.*} ± {:.*}", digits, e.value, digits, e.se),
        Some(e) => format!("{:.*}", digits, e.value),
        None => "—".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.digits$}"))
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "—".into(), |b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
}

fn metric_cells(m: &PointMetrics) -> [String; 4] {
    [
        est(m.unwanted_rate, 3),
        est(m.kl_ideal, 3),
        est(m.kl_control, 3),
        opt(m.heldout_perplexity, 3),
    ]
}

/// The rows of the matched-rate summary: `(method, Some(point) | None)`, reaching methods first
/// by increasing `KL(p*‖p_new)`.
fn summary_rows(r: &CompareResults) -> Vec<(String, Option<&PointResult>, String)> {
    let mut rows: Vec<(String, Option<&PointResult>, String)> = r
        .best
        .iter()
        .map(|b| {
            let p = b.point.map(|i| &r.points[i]);
            let note = if p.is_some() {
                String::new()
            } else {
                let lowest = r
                    .points
                    .iter()
                    .filter(|p| p.method == b.method && p.error.is_none())
                    .filter_map(|p| Some((p.metrics.unwanted_rate?.value, p)))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                match lowest {
                    Some((rate, p)) => format!(
                        "does not reach the target (lowest rate {rate:.3} at {}={})",
                        p.strength_name,
                        fmt_value(p.strength)
                    ),
                    None => "no successful point".into(),
                }
            };
            (b.method.name().to_string(), p, note)
        })
        .collect();
    rows.sort_by(|a, b| match (a.1, b.1) {
        (Some(x), Some(y)) => {
            let kx = x.metrics.kl_ideal.map_or(f64::INFINITY, |e| e.value);
            let ky = y.metrics.kl_ideal.map_or(f64::INFINITY, |e| e.value);
            kx.total_cmp(&ky)
        }
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    rows
}

/// The markdown report.
pub fn markdown(r: &CompareResults) -> String {
    let mut s = String::new();
    let c = &r.config;
    let _ = writeln!(s, "# amend compare: {}\n", r.task.name);
    if let Some(cmd) = r.environment.get("command") {
        let _ = writeln!(s, "Produced by `{cmd}`.\n");
    }
    let bm = &r.base_model;
    let _ = writeln!(
        s,
        "Every method starts from the same base model p° ({} parameters, `{}`) and trains for \
         {} AdamW steps at learning rate {} on the same {} prompt groups ({} per step; each \
         group holds a prompt's clean and unwanted responses sampled from p°); ProFS is not \
         trained but edits the weights once, from pairs of those clean and unwanted responses \
         (sweep over its rank k). The metrics are \
         computed on {} held-out prompts; p* is p° conditioned on producing no unwanted word, \
         the closest distribution to p° that never produces one. The ideal update is at (0, 0) \
         in the plot. See `docs/compare.md` for the task, the estimators and the methods.\n",
        bm.parameters,
        bm.dir,
        c.budget.steps,
        fmt_value(c.budget.lr),
        r.data.usable_groups,
        c.budget.prompts_per_step,
        r.task.eval_prompts,
    );
    // Summary.
    match r.target_rate {
        Some(t) => {
            let base = r.base_metrics.unwanted_rate.map_or(f64::NAN, |e| e.value);
            let _ = writeln!(
                s,
                "## Each method's best point at a matched unwanted rate\n\nTarget: unwanted \
                 rate ≤ {t:.3} ({}). For each method, the sweep point with the lowest \
                 KL(p*‖p_new) among those at or below the target. Lower is better in every \
                 column but the rate, which only has to meet the target. Standard errors after ±.\n",
                match c.target_rate {
                    crate::compare::TargetRate::FractionOfBase(f) => {
                        format!("{:.0} % of the base model's rate {base:.3}", f * 100.0)
                    }
                    crate::compare::TargetRate::Absolute(_) => "absolute".into(),
                }
            );
            let _ = writeln!(
                s,
                "| method | setting | unwanted rate | KL(p*‖p_new) | KL(p°‖p_new) on control \
                 prompts | held-out perplexity |\n|---|---|---|---|---|---|"
            );
            let [a, b, cc, d] = metric_cells(&r.base_metrics);
            let _ = writeln!(s, "| base p° | — | {a} | {b} | {cc} | {d} |");
            for (name, p, note) in summary_rows(r) {
                match p {
                    Some(p) => {
                        let [a, b, cc, d] = metric_cells(&p.metrics);
                        let _ = writeln!(
                            s,
                            "| {name} | {}={} | {a} | {b} | {cc} | {d} |",
                            p.strength_name,
                            fmt_value(p.strength)
                        );
                    }
                    None => {
                        let _ = writeln!(s, "| {name} | {note} | | | | |");
                    }
                }
            }
            s.push('\n');
        }
        None => {
            let _ = writeln!(
                s,
                "## Summary\n\nNo matched-rate summary: the unwanted rate could not be measured \
                 (see the skipped metrics below).\n"
            );
        }
    }
    if crate::plot::plottable(r) {
        let _ = writeln!(
            s,
            "![unwanted rate against KL(p*‖p_new)](plot.svg)\n\nOne curve per method through its \
             sweep points; the cross is the base model, the gold dot the ideal update.\n"
        );
    }
    // Every point.
    let _ = writeln!(
        s,
        "## Every sweep point\n\n| method | setting | unwanted rate | KL(p*‖p_new) | \
         KL(p°‖p_new) control | held-out ppl | unwanted-token log p | train s | eval s | peak \
         RSS MiB | final loss |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &r.points {
        if let Some(e) = &p.error {
            let _ = writeln!(
                s,
                "| {} | {}={} | failed: {} | | | | | | | | |",
                p.method.name(),
                p.strength_name,
                fmt_value(p.strength),
                e.replace('|', "/")
            );
            continue;
        }
        let [a, b, cc, d] = metric_cells(&p.metrics);
        let last = p.train.losses.last().copied();
        let _ = writeln!(
            s,
            "| {} | {}={} | {a} | {b} | {cc} | {d} | {} | {:.1} | {:.1} | {} | {} |",
            p.method.name(),
            p.strength_name,
            fmt_value(p.strength),
            est(p.metrics.unwanted_token_logprob, 2),
            p.train.seconds,
            p.metrics.eval_seconds,
            mib(p.memory.peak_rss_bytes),
            opt(last, 4),
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "Unwanted rate: fraction of {} sampled responses (temperature 1) containing an unwanted \
         word, binomial standard error. KL(p*‖p_new): from rejection samples of p° (nats per \
         response; standard error over prompts; the same samples for every row, so differences \
         between rows are more precise than each value). Peak RSS: the whole process's \
         high-water mark during the point's training and evaluation.\n",
        r.base_metrics.unwanted_rate.map_or(0, |e| e.n)
    );
    // Facts.
    let _ = writeln!(s, "## Data and base model\n");
    let d = &r.data;
    let _ = writeln!(
        s,
        "* Training data: {} samples of p° on {} training prompts ({} unwanted), {} \
         negative-prompt samples ({} unwanted), {} given responses; {} usable prompt groups with \
         {} responses, {} of {} response tokens annotated unwanted.",
        d.policy_samples,
        r.task.train_prompts,
        d.policy_unwanted,
        d.negative_samples,
        d.negative_unwanted,
        d.dataset_samples,
        d.usable_groups,
        d.usable_responses,
        d.negative_tokens,
        d.response_tokens
    );
    let f = &r.base_facts;
    let _ = writeln!(
        s,
        "* Rejection sampler: {} samples of p°, p°(U) = {}; KL(p*‖p°) = {} ({} prompts without \
         an accepted sample).",
        f.rejection_samples,
        est(f.rejection_unwanted_rate, 3),
        est(f.kl_ideal_base, 3),
        f.prompts_without_accepted_sample
    );
    if let Some(rep) = &bm.report {
        let _ = writeln!(
            s,
            "* Base model: {} ({}), held-out perplexity of the corpus {}, {:.0} s.",
            if bm.trained_now { "trained in this run" } else { "loaded from the cache" },
            &rep.hash[..16.min(rep.hash.len())],
            opt(rep.eval_perplexity, 3),
            rep.seconds
        );
    }
    let t = &r.timing;
    let _ = writeln!(
        s,
        "* Wall time: {:.0} s in all (base model {:.0} s, data {:.0} s, evaluator set-up {:.0} s, \
         {} sweep points {:.0} s).\n",
        t.total_seconds,
        t.base_model_seconds,
        t.data_seconds,
        t.eval_setup_seconds,
        r.points.len(),
        t.points_seconds
    );
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "## Skipped metrics\n");
        for k in &r.skipped {
            let _ = writeln!(s, "* `{}`: {}", k.metric, k.reason);
        }
        s.push('\n');
    }
    if !r.base_metrics.examples.is_empty() {
        let _ = writeln!(s, "## Example responses\n\nBase model:\n");
        for (p, y) in &r.base_metrics.examples {
            let _ = writeln!(s, "* `{p}` → `{}`", y.trim());
        }
        if let Some(best) = summary_rows(r).into_iter().find_map(|x| x.1) {
            let _ = writeln!(s, "\n{} (best at the matched rate):\n", best.label());
            for (p, y) in &best.metrics.examples {
                let _ = writeln!(s, "* `{p}` → `{}`", y.trim());
            }
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Environment\n");
    for (k, v) in &r.environment {
        let _ = writeln!(s, "* {k}: `{v}`");
    }
    let _ = writeln!(s, "\nThe full configuration and every number are in `results.json`.");
    s
}

/// A short plain-text table for the terminal: each method's best point at the matched rate.
pub fn terminal_summary(r: &CompareResults) -> String {
    let mut s = String::new();
    let Some(t) = r.target_rate else {
        let _ = writeln!(s, "no unwanted rate was measured; see report.md for the metrics");
        return s;
    };
    let _ = writeln!(
        s,
        "best point of each method at unwanted rate ≤ {t:.3} (lowest KL(p*‖p_new) first):\n"
    );
    let _ = writeln!(
        s,
        "  {:<12} {:<18} {:>15} {:>15} {:>12}",
        "method", "setting", "unwanted rate", "KL(p*‖p_new)", "KL control"
    );
    let row = |name: &str, setting: &str, m: &PointMetrics| {
        format!(
            "  {:<12} {:<18} {:>15} {:>15} {:>12}\n",
            name,
            setting,
            est(m.unwanted_rate, 3),
            est(m.kl_ideal, 3),
            opt(m.kl_control.map(|e| e.value), 3)
        )
    };
    s += &row("base p°", "", &r.base_metrics);
    for (name, p, note) in summary_rows(r) {
        match p {
            Some(p) => {
                s += &row(
                    &name,
                    &format!("{}={}", p.strength_name, fmt_value(p.strength)),
                    &p.metrics,
                );
            }
            None => {
                let _ = writeln!(s, "  {name:<12} {note}");
            }
        }
    }
    s
}

/// Report folders written before [`amend_models::output::OUTPUT_MARKER`] existed: they hold
/// `results.json` and only the report's files, so a later report may replace them.
pub const EARLIER_REPORT: amend_models::output::Legacy =
    amend_models::output::Legacy { marker: "results.json", known: is_report_file };

fn is_report_file(name: &str) -> bool {
    ["report.md", "results.json", "plot.svg", "plot.png"].contains(&name)
}

/// Writes the report folder `out`: `report.md`, `results.json`, `plot.svg`, `plot.png` and
/// `amend_output.json` (the list of these files).
///
/// The folder is assembled in a staging folder next to it (removed on an error or an
/// interruption, see [`amend_models::output::Staged`]) and renamed into place, so `out` is
/// never left half-written. An existing `out` is replaced only if it is empty or an earlier
/// report holding only the report's files; a folder with any other file is refused, so that
/// nothing amend did not write is ever deleted.
///
/// # Errors
/// [`Error::Model`] with [`amend_models::output::OutputError`] when `out` exists and may not be
/// replaced, or cannot be written; [`Error::Json`], [`Error::Plot`].
pub fn write_report(results: &CompareResults, out: &Path) -> Result<ReportFiles> {
    use amend_models::output::{Replace, Staged, check_replaceable};
    let refuse = |e: amend_models::output::OutputError| Error::from(amend_models::Error::from(e));
    if out.is_dir() {
        check_replaceable("report folder", out, Some(&EARLIER_REPORT)).map_err(refuse)?;
    }
    let staged = Staged::dir("report folder", out).map_err(refuse)?;
    staged.write_file("report.md", markdown(results).as_bytes()).map_err(refuse)?;
    let json = serde_json::to_vec_pretty(results)
        .map_err(|source| Error::Json { path: out.join("results.json"), source })?;
    staged.write_file("results.json", &json).map_err(refuse)?;
    let stage = staged.path();
    let plotted = crate::plot::plottable(results);
    if plotted {
        crate::plot::draw_plot(results, &stage.join("plot.svg"), &stage.join("plot.png"))?;
    }
    staged.commit(Replace::AmendOutput(Some(EARLIER_REPORT))).map_err(refuse)?;
    Ok(ReportFiles {
        dir: out.to_path_buf(),
        markdown: out.join("report.md"),
        json: out.join("results.json"),
        svg: plotted.then(|| out.join("plot.svg")),
        png: plotted.then(|| out.join("plot.png")),
    })
}
