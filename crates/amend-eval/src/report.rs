//! The report folder of a comparison: `report.md` (tables), `results.json` (every number and
//! the configuration), `plot.svg` and `plot.png`, written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::compare::{
    AggregatePoint, CompareResults, MethodSummary, PointResult, Score, fmt_value,
};
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

fn frac(f: f64) -> String {
    match f {
        x if (x - 0.25).abs() < 1e-12 => "¼".into(),
        x if (x - 0.5).abs() < 1e-12 => "½".into(),
        x => format!("{x}×"),
    }
}

/// A score cell: `0.034 ± 0.004 ★` (best), `… ≈` (within noise of the best), `not reached (1/2
/// seeds)`.
fn score_cell(sc: &Score, digits: usize) -> String {
    let seeds = sc.per_seed.len();
    let reached = sc.per_seed.iter().filter(|v| v.is_some()).count();
    match sc.mean {
        Some(m) => {
            let mark = if sc.best {
                " ★"
            } else if sc.within_noise == Some(true) {
                " ≈"
            } else {
                ""
            };
            format!("{}{mark}", est(Some(m), digits))
        }
        None if reached == 0 => "not reached".into(),
        None => format!("reached in {reached}/{seeds} seeds"),
    }
}

/// The methods in summary order: by mean area (lowest first), then those without one.
fn summary_order(r: &CompareResults) -> Vec<&MethodSummary> {
    let mut v: Vec<&MethodSummary> = r.summary.iter().collect();
    let key = |m: &MethodSummary| m.area.mean.map_or(f64::INFINITY, |e| e.value);
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v
}

fn agg_cells(a: &AggregatePoint) -> [String; 4] {
    [
        est(a.unwanted_rate, 3),
        est(a.kl_ideal, 3),
        est(a.kl_control, 3),
        opt(a.heldout_perplexity, 3),
    ]
}

/// The setting of `m` with the lowest mean `KL(p*‖p_new)` at a mean rate at most `rate`.
fn best_setting_at<'a>(
    r: &'a CompareResults,
    m: &MethodSummary,
    rate: f64,
) -> Option<&'a AggregatePoint> {
    m.frontier
        .iter()
        .map(|&i| &r.aggregates[i])
        .filter(|a| a.unwanted_rate.is_some_and(|e| e.value <= rate))
        .min_by(|a, b| {
            let k = |x: &AggregatePoint| x.kl_ideal.map_or(f64::INFINITY, |e| e.value);
            k(a).total_cmp(&k(b))
        })
}

/// A token of the logit-lens table: quoted, in bold when the data annotates it unwanted.
fn lens_token(t: &crate::methods::LensToken) -> String {
    let text = format!("`{}`", t.text.replace('`', "'").replace('|', "\\|"));
    if t.unwanted { format!("**{text}**") } else { text }
}

/// ProFS's logit-lens view: for the largest rank of the first seed (its directions include
/// those of every smaller rank: they are the leading singular vectors of the same matrix), each
/// basis direction's energy and the tokens at both ends of `W_U v_j`.
fn profs_lens(s: &mut String, r: &CompareResults) {
    let Some(p) = r
        .points
        .iter()
        .filter(|p| p.method == crate::methods::Method::Profs && !p.train.lens.is_empty())
        .filter(|p| r.seed_runs.first().is_none_or(|sr| sr.seed == p.seed))
        .max_by(|a, b| a.strength.total_cmp(&b.strength))
    else {
        return;
    };
    let lens = &p.train.lens;
    let with_unwanted = lens.iter().filter(|d| d.unwanted_tokens() > 0).count();
    let _ = writeln!(
        s,
        "## ProFS: what the projected subspace is\n\nThe logit-lens view the reference logs, for \
         k = {} (seed {}): each basis direction v_j of each edited layer, its share of the \
         difference matrix's energy σ_j²/Σσ², and the tokens with the largest and the smallest \
         entries of W_U·v_j (a singular vector has no sign). The training data's unwanted \
         tokens (annotated unwanted at 90 % of their occurrences or more) are in bold. When the \
         subspace is the unwanted one, one end lists them; {} of the {} directions have one \
         among the {} tokens of an end (the table shows 6).\n",
        fmt_value(p.strength),
        p.seed,
        with_unwanted,
        lens.len(),
        lens.first().map_or(0, |d| d.top.len())
    );
    let _ = writeln!(s, "| layer | v_j | energy | largest W_U·v_j | smallest W_U·v_j |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for d in lens {
        let show = |ts: &[crate::methods::LensToken]| {
            ts.iter().take(6).map(lens_token).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {} | {} |",
            d.layer,
            d.index + 1,
            d.energy,
            show(&d.top),
            show(&d.bottom)
        );
    }
    s.push('\n');
}

/// "Which method is best in which regime": one column per comparison (a regime, a base model),
/// one row per method, each cell the method's area under its frontier and its `KL(p*‖p_new)` at
/// the first matched rate (★ best, ≈ within noise of the best, as in each report). Methods in
/// the order of their mean rank by area over the comparisons.
///
/// ```
/// use amend_eval::compare::CompareResults;
/// use amend_eval::report::regime_summary;
/// let read = |p: &str| -> Result<CompareResults, Box<dyn std::error::Error>> {
///     Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
/// };
/// // The committed reports of two regimes.
/// let a = read("../../docs/compare/results.json")?;
/// let b = read("../../docs/compare-pairs/results.json")?;
/// let table = regime_summary(&[("sampled", &a), ("pairs", &b)]);
/// assert!(table.starts_with("| method | sampled: area · KL at ¼ base | pairs: "));
/// assert_eq!(table.lines().count(), 2 + a.summary.len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn regime_summary(runs: &[(&str, &CompareResults)]) -> String {
    let mut s = String::new();
    let mut methods: Vec<crate::methods::Method> = Vec::new();
    for (_, r) in runs {
        for m in &r.summary {
            if !methods.contains(&m.method) {
                methods.push(m.method);
            }
        }
    }
    // Mean rank by area (a method without an area ranks last in that comparison).
    let rank = |method: crate::methods::Method| -> f64 {
        let mut total = 0.0;
        for (_, r) in runs {
            let order = summary_order(r);
            total += order.iter().position(|m| m.method == method).unwrap_or(order.len()) as f64;
        }
        total / runs.len().max(1) as f64
    };
    methods.sort_by(|a, b| rank(*a).total_cmp(&rank(*b)));
    let heads: Vec<String> = runs
        .iter()
        .map(|(label, r)| {
            let f = r.config.matched_fractions.first().map_or_else(String::new, |f| frac(*f));
            format!("{label}: area · KL at {f} base")
        })
        .collect();
    let _ = writeln!(s, "| method | {} |", heads.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(runs.len()));
    for m in methods {
        let cells: Vec<String> = runs
            .iter()
            .map(|(_, r)| match r.summary.iter().find(|x| x.method == m) {
                Some(x) => format!(
                    "{} · {}",
                    score_cell(&x.area, 3),
                    x.kl_at_matched.first().map_or_else(|| "—".into(), |k| score_cell(k, 3))
                ),
                None => "—".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", m.name(), cells.join(" | "));
    }
    s
}

/// The markdown report.
pub fn markdown(r: &CompareResults) -> String {
    let mut s = String::new();
    let c = &r.config;
    let _ = writeln!(s, "# amend compare: {}, regime `{}`\n", r.task.name, c.regime.id());
    if let Some(cmd) = r.environment.get("command") {
        let _ = writeln!(s, "Produced by `{cmd}`.\n");
    }
    let bm = &r.base_model;
    let lrs: Vec<String> = c.grid.learning_rates.iter().map(|&x| fmt_value(x)).collect();
    let steps: Vec<String> = c.grid.steps.iter().map(ToString::to_string).collect();
    let seeds: Vec<String> = r.seed_runs.iter().map(|x| x.seed.to_string()).collect();
    let _ = writeln!(
        s,
        "Every method starts from the same base model p° ({} parameters, `{}`). Every trained \
         method runs at every strength of its sweep × learning rate {{{}}} × steps {{{}}} \
         (AdamW, {} prompt groups per step), the same grid for all, nothing tuned per method; \
         ProFS is not trained but edits the weights once per rank k. Everything is repeated for \
         training seeds {{{}}} (each with its own training samples, batch order and evaluation \
         samples). p* is p° conditioned on producing no unwanted word, the closest distribution \
         to p° that never produces one; the metrics are computed on {} held-out prompts. See \
         `docs/compare.md` for the task, the estimators and the scores.\n",
        bm.parameters,
        bm.dir,
        lrs.join(", "),
        steps.join(", "),
        c.budget.prompts_per_step,
        seeds.join(", "),
        r.task.eval_prompts,
    );
    if let Some(base_rate) = r.base_metrics.unwanted_rate.filter(|_| !r.matched_rates.is_empty()) {
        let _ = writeln!(s, "## Which method is best\n");
        let heads: Vec<String> = c
            .matched_fractions
            .iter()
            .zip(&r.matched_rates)
            .map(|(f, t)| format!("KL(p*‖p_new) at rate ≤ {} base ({t:.3})", frac(*f)))
            .collect();
        let _ = writeln!(
            s,
            "| method | {} | area under the frontier | best setting at rate ≤ {:.3} |\n|---|{}---|---|",
            heads.join(" | "),
            r.matched_rates[0],
            "---|".repeat(heads.len())
        );
        for m in summary_order(r) {
            let cells: Vec<String> = m.kl_at_matched.iter().map(|x| score_cell(x, 3)).collect();
            let setting = best_setting_at(r, m, r.matched_rates[0])
                .map_or("—".into(), AggregatePoint::setting);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {setting} |",
                m.method.name(),
                cells.join(" | "),
                score_cell(&m.area, 3)
            );
        }
        let _ = writeln!(
            s,
            "\nBase model: unwanted rate {}, KL(p*‖p°) {}. Each score is computed per seed from \
             that seed's points and base model, then averaged: mean ± standard error over {} \
             seeds. KL at a matched rate: the lowest KL(p*‖p_new) at an unwanted rate at most \
             the given fraction of the base model's, interpolated along the method's Pareto \
             frontier over all its settings (a random mixture of two models reaches the line \
             between them). Area: the area under the frontier (unwanted rate over KL from 0 to {} \
             × KL(p*‖p°), the rate never above the base model's), divided by that of the base \
             model: 0 is the ideal update, 1 no better than doing nothing. Lower is better in \
             every column. ★ best; ≈ within noise of the best (paired difference over seeds at \
             most two standard errors); \"not reached\": no setting gets the rate that low.\n",
            est(Some(base_rate), 3),
            est(r.base_metrics.kl_ideal, 3),
            r.seed_runs.len(),
            crate::compare::AREA_CAP_OVER_BASE_KL,
        );
    } else {
        let _ = writeln!(
            s,
            "## Summary\n\nNo frontier and no scores: the unwanted rate could not be measured \
             (see the skipped metrics below).\n"
        );
    }
    if crate::plot::plottable(r) {
        let _ = writeln!(
            s,
            "![unwanted rate against KL(p*‖p_new)](plot.svg)\n\nEach method's Pareto frontier \
             over all its settings (means over seeds; faint dots: its other settings); the \
             cross is the base model, the gold dot the ideal update, the grey lines the matched \
             rates.\n"
        );
    }
    // Frontiers.
    let _ = writeln!(
        s,
        "## Frontiers\n\nThe settings on each method's frontier of mean points, by unwanted rate \
         (mean ± standard error over seeds).\n\n| method | setting | unwanted rate | \
         KL(p*‖p_new) | KL(p°‖p_new) on control prompts | held-out perplexity |\n|---|---|---|---|---|---|"
    );
    let [a, b, cc, d] = metric_cells(&r.base_metrics);
    let _ = writeln!(s, "| base p° | — | {a} | {b} | {cc} | {d} |");
    for m in &r.summary {
        for &i in &m.frontier {
            let ag = &r.aggregates[i];
            let [a, b, cc, d] = agg_cells(ag);
            let _ =
                writeln!(s, "| {} | {} | {a} | {b} | {cc} | {d} |", m.method.name(), ag.setting());
        }
    }
    s.push('\n');
    // Every setting.
    let _ = writeln!(
        s,
        "## Every setting\n\nMean ± standard error over seeds (every seed's point is in \
         `results.json`).\n\n| method | setting | unwanted rate | KL(p*‖p_new) | KL(p°‖p_new) \
         control | held-out ppl | train s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|"
    );
    for ag in &r.aggregates {
        if ag.failed > 0 {
            let _ = writeln!(
                s,
                "| {} | {} | failed with {} of {} seeds | | | | | |",
                ag.method.name(),
                ag.setting(),
                ag.failed,
                ag.points.len()
            );
            continue;
        }
        let [a, b, cc, d] = agg_cells(ag);
        let _ = writeln!(
            s,
            "| {} | {} | {a} | {b} | {cc} | {d} | {:.1} | {} |",
            ag.method.name(),
            ag.setting(),
            ag.train_seconds,
            mib(ag.peak_rss_bytes),
        );
    }
    s.push('\n');
    let failed: Vec<&PointResult> = r.points.iter().filter(|p| p.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed points\n");
        for p in failed {
            let _ = writeln!(
                s,
                "* {} {}, seed {}: {}",
                p.method.name(),
                p.setting(),
                p.seed,
                p.error.as_deref().unwrap_or_default()
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Unwanted rate: fraction of {} sampled responses per seed (temperature 1) containing an \
         unwanted word. KL(p*‖p_new): from rejection samples of p° (nats per response). Within a \
         seed every setting is scored on the same samples, so differences between settings are \
         more precise than the standard errors over seeds suggest. Peak RSS: the process's \
         high-water mark during the run ({}).\n",
        r.seed_runs.first().and_then(|x| x.base_metrics.unwanted_rate).map_or(0, |e| e.n),
        if r.timing.workers > 1 {
            format!(
                "not measured per point: {} runs trained at once; --workers 1 measures it",
                r.timing.workers
            )
        } else {
            "one run at a time".into()
        }
    );
    // Facts.
    let _ = writeln!(s, "## Data and base model\n");
    for sr in &r.seed_runs {
        let d = &sr.data;
        let _ = writeln!(
            s,
            "* Seed {}: {} samples of p° (temperature {}) on {} training prompts ({} unwanted), \
             {} negative-prompt samples ({} unwanted), {} given responses; {} usable prompt \
             groups with {} responses, {} of {} response tokens annotated unwanted; where an \
             unwanted word begins, p° gives its first token a mean probability of {} and ranks it \
             first {}.{}",
            sr.seed,
            d.policy_samples,
            fmt_value(c.sampling.temperature),
            r.task.train_prompts,
            d.policy_unwanted,
            d.negative_samples,
            d.negative_unwanted,
            d.dataset_samples,
            d.usable_groups,
            d.usable_responses,
            d.negative_tokens,
            d.response_tokens,
            opt(Some(d.unwanted_start_mass).filter(|x| x.is_finite()), 3),
            if d.unwanted_start_top1.is_finite() {
                format!("at {:.0} % of them", 100.0 * d.unwanted_start_top1)
            } else {
                "nowhere".into()
            },
            match &sr.pair_data {
                Some(_) => " Sequence-level methods and ProFS: each unwanted response paired with \
                            its own counterpart without the unwanted words."
                    .to_string(),
                None => String::new(),
            }
        );
        let f = &sr.base_facts;
        let _ = writeln!(
            s,
            "  Rejection sampler: {} samples of p°, p°(U) = {}; KL(p*‖p°) = {} ({} prompts \
             without an accepted sample).",
            f.rejection_samples,
            est(f.rejection_unwanted_rate, 3),
            est(f.kl_ideal_base, 3),
            f.prompts_without_accepted_sample
        );
    }
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
         {} points from {} runs {:.0} s, {} of the runs read from the point cache, {} at once); \
         peak memory of the process {} MiB.\n",
        t.total_seconds,
        t.base_model_seconds,
        t.data_seconds,
        t.eval_setup_seconds,
        r.points.len(),
        t.runs,
        t.points_seconds,
        t.cached_runs,
        t.workers,
        mib(t.peak_rss_bytes),
    );
    for w in &r.warnings {
        let _ = writeln!(s, "* Warning: {w}");
    }
    profs_lens(&mut s, r);
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
        let best = summary_order(r).into_iter().find_map(|m| {
            let ag = best_setting_at(r, m, *r.matched_rates.first()?)?;
            Some((m, ag))
        });
        if let Some((m, ag)) = best
            && let Some(p) = ag.points.first().map(|&i| &r.points[i])
        {
            let _ = writeln!(
                s,
                "\n{} {} (seed {}; the best method's best setting at the first matched rate):\n",
                m.method.name(),
                ag.setting(),
                p.seed
            );
            for (q, y) in &p.metrics.examples {
                let _ = writeln!(s, "* `{q}` → `{}`", y.trim());
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

/// A short plain-text table for the terminal: each method's scores.
pub fn terminal_summary(r: &CompareResults) -> String {
    let mut s = String::new();
    if r.matched_rates.is_empty() {
        let _ = writeln!(s, "no unwanted rate was measured; see report.md for the metrics");
        return s;
    }
    let _ = writeln!(
        s,
        "scores of each method over {} seeds (lower is better; ★ best, ≈ within noise of it):\n",
        r.seed_runs.len()
    );
    let mut head = format!("  {:<12}", "method");
    for (f, t) in r.config.matched_fractions.iter().zip(&r.matched_rates) {
        head += &format!(" {:>22}", format!("KL at rate≤{t:.3} ({})", frac(*f)));
    }
    head += &format!(" {:>22}", "area");
    let _ = writeln!(s, "{head}");
    let _ = writeln!(
        s,
        "  {:<12} base p°: unwanted rate {}, KL(p*‖p°) {}",
        "",
        est(r.base_metrics.unwanted_rate, 3),
        est(r.base_metrics.kl_ideal, 3)
    );
    for m in summary_order(r) {
        let mut line = format!("  {:<12}", m.method.name());
        for sc in &m.kl_at_matched {
            line += &format!(" {:>22}", score_cell(sc, 3));
        }
        line += &format!(" {:>22}", score_cell(&m.area, 3));
        let _ = writeln!(s, "{line}");
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
