//! `amend compare`: the methods side by side on a task with a known ideal update.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use amend::eval::compare::{
    BaseModelInfo, CompareConfig, NoProgress, PointCache, Progress, Regime, default_point_cache,
    run_comparison, run_synthetic,
};
use amend::eval::methods::Method;
use amend::eval::progress::TerminalProgress;
use amend::eval::report::{terminal_summary, write_report};
use amend::models::CausalLm;

/// Compare methods that remove an unwanted behaviour, side by side, on a task whose ideal update
/// is known.
///
/// Without --model, runs the embedded synthetic suppression task: a tiny GPT-2 (trained once
/// and cached under ${AMEND_CACHE_DIR:-~/.cache/amend}/models) says one of five made-up words
/// in about a fifth of its responses. Every method (TNT variants, NL, UL, Welleck UL, NPO, DPO,
/// CP, RRHF, NEAT) starts from that model and trains on the same annotated samples over the
/// same grid: each strength of its sweep × every learning rate × every step count (ProFS,
/// tuning-free, edits the weights once per rank k). Everything is repeated for two training
/// seeds. Each point is scored on held-out prompts by its unwanted rate and by KL(p*‖p_new),
/// its distance to the ideal update p* (the base model conditioned on never producing an
/// unwanted word); each method by its Pareto frontier: the lowest KL at a quarter and half of
/// the base model's unwanted rate, and the area under the frontier (0 ideal, 1 no better than
/// the base model), mean ± standard error over seeds. The report folder gets report.md,
/// results.json (every number and the configuration), plot.svg and plot.png.
///
/// Finished runs are cached (under ${AMEND_CACHE_DIR:-~/.cache/amend}/compare-points, or
/// --cache-dir/compare-points) by a hash of everything that determines them, so an interrupted
/// comparison started again resumes where it stopped (--fresh recomputes everything).
///
/// With --model DIR --data FILE.jsonl, runs the same comparison on a local Hugging Face model
/// with your prompts and annotations (schema: docs/compare-data.md).
///
/// Examples:
///   amend compare                        # 7 to 9 minutes on 2 cores (docs/compare.md)
///   amend compare --quick                # about a minute; noisy numbers
///   amend compare --task pairs           # minimal pairs for the sequence-level methods
///   amend compare --task greedy          # unwanted words are the base model's top-1 choices
///   amend compare --methods tnrr,nl,ul,dpo --seeds 3 --out reports/s3
///   amend compare --lr 1e-4 --steps 60 --seeds 1   # one budget, one seed (the old report)
///   amend compare --model ./my-gpt2 --data prompts.jsonl --quick
///   amend compare --summary reports/compare,reports/compare-greedy   # one table of both
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Smaller base model, fewer samples, steps 10 and 20, two strengths per method.
    #[arg(long)]
    pub quick: bool,
    /// The regime: `sampled` (temperature-1 samples of the base model; sequence-level methods
    /// pair unrelated clean and unwanted responses of a prompt), `pairs` (the same samples for
    /// the token-level methods; minimal pairs, each unwanted response and itself without the
    /// unwanted words, for NPO, DPO, CP, RRHF, NEAT and ProFS) or `greedy` (the TNT paper's
    /// setting: a base model, trained once, whose most likely word in many contexts is an
    /// unwanted one, and training samples at temperature 0.5, so the annotated tokens are
    /// often its top-1 choices). `pairs` and `greedy` need the synthetic task.
    #[arg(long, default_value = "sampled", value_name = "REGIME", value_parser = parse_regime)]
    pub task: Regime,
    /// The synthetic base model: `tiny` (2 layers, 137 k parameters; trained in about 40 s) or
    /// `standard` (4 layers of width 192, 1.9 M parameters; trained once in about 5 minutes and
    /// cached; every run is about 6 times slower: 22 minutes with --seeds 1, see
    /// docs/compare.md). Synthetic task only.
    #[arg(long, default_value = "tiny", value_name = "SIZE", value_parser = parse_base_size)]
    pub base_model: amend::eval::base::BaseSize,
    /// Comma-separated methods (default: all): tnff, tnrr, tnrf, tnfll, tnrll, nl, ul,
    /// welleck_ul, npo, dpo, cp, rrhf, neat, profs.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub methods: Vec<String>,
    /// The first training seed (of the training-data samples, the batch order and the
    /// evaluation samplers); the run uses --seeds consecutive seeds from it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How many training seeds (default 2). Tables give mean ± standard error over them.
    #[arg(long, value_name = "N")]
    pub seeds: Option<usize>,
    /// Seed of the synthetic task and its base model (a new value trains a new base model).
    #[arg(long, default_value_t = 0)]
    pub task_seed: u64,
    /// Report folder. An existing one is replaced only if it is empty or an earlier report
    /// holding nothing but the report's files; it may not be, contain or sit inside --model,
    /// --data or the model cache.
    #[arg(long, default_value = "reports/compare", value_name = "DIR")]
    pub out: PathBuf,
    /// libtorch threads per run. 1 is fastest for the tiny default model and safe when other
    /// jobs share the cores (libtorch's thread pool spins while waiting).
    #[arg(long, default_value = "1", value_name = "N", value_parser = super::threads_arg)]
    pub threads: i32,
    /// Runs trained at once, each on its own copy of the base model (default: one per logical
    /// CPU). The numbers do not depend on it; per-point peak memory is measured only with 1.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// A local Hugging Face checkpoint to compare the methods on (needs --data).
    #[arg(long, value_name = "DIR", requires = "data")]
    pub model: Option<PathBuf>,
    /// Prompts and annotations for --model, JSON Lines (see docs/compare-data.md).
    #[arg(long, value_name = "FILE.jsonl", requires = "model")]
    pub data: Option<PathBuf>,
    /// Comma-separated step counts at which every run is evaluated (default 20,60; with
    /// --quick 10,20). One run per learning rate gives all of them.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub steps: Vec<usize>,
    /// Comma-separated AdamW learning rates of every method (default 1e-4,3e-4).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub lr: Vec<f64>,
    /// Layers ProFS edits, half-open START..END (default: the upper 60 % of the blocks,
    /// ⌊2L/5⌋..L, where the reference ranges start).
    #[arg(long, value_name = "START..END", value_parser = parse_range)]
    pub profs_layers: Option<std::ops::Range<usize>>,
    /// Comma-separated matched unwanted rates of the scores, as fractions of the base model's
    /// rate (default 0.25,0.5).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub matched: Vec<f64>,
    /// Where base models are cached (default ${AMEND_CACHE_DIR:-~/.cache/amend}/models); the
    /// finished runs go to its compare-points folder.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Recompute every run instead of reading finished ones from the point cache (they are
    /// still written to it).
    #[arg(long)]
    pub fresh: bool,
    /// Run nothing: print the table "which method is best in which regime" of finished reports
    /// (comma-separated report folders, each with its results.json), one column per report.
    #[arg(long, value_delimiter = ',', value_name = "DIRS", conflicts_with_all = ["model", "data", "quick"])]
    pub summary: Vec<PathBuf>,
    /// Do not draw progress bars or print progress lines.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub load: super::LoadArgs,
}

/// Runs `amend compare`.
pub fn run(args: &CompareArgs) -> Result<()> {
    if !args.summary.is_empty() {
        return summarize(&args.summary);
    }
    check_out(args)?;
    let mut cfg = if args.quick { CompareConfig::quick() } else { CompareConfig::default_mode() };
    if !args.methods.is_empty() {
        let mut methods = Vec::new();
        for m in &args.methods {
            let Some(method) = Method::parse(m) else {
                let known: Vec<&str> = Method::ALL.iter().map(|m| m.id()).collect();
                bail!("unknown method `{m}` (known: {})", known.join(", "));
            };
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        cfg = cfg.with_methods(&methods);
    }
    cfg = cfg.with_seed(args.seed);
    cfg = cfg.with_regime(args.task).with_base_size(args.base_model);
    cfg.task.seed = args.task_seed;
    cfg.base_recipe.seed = args.task_seed;
    cfg.threads = Some(args.threads);
    if let Some(n) = args.seeds {
        if n == 0 {
            bail!("--seeds must be at least 1");
        }
        cfg.seeds = n;
    }
    if let Some(n) = args.workers {
        if n == 0 {
            bail!("--workers must be at least 1");
        }
        cfg.workers = n;
    }
    if !args.steps.is_empty() {
        if args.steps.contains(&0) {
            bail!("--steps must be positive step counts");
        }
        cfg.grid.steps.clone_from(&args.steps);
    }
    if !args.lr.is_empty() {
        if args.lr.iter().any(|lr| !(lr.is_finite() && *lr > 0.0)) {
            bail!("--lr must be positive numbers");
        }
        cfg.grid.learning_rates.clone_from(&args.lr);
    }
    if !args.matched.is_empty() {
        if args.matched.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            bail!("--matched must be positive fractions of the base model's rate");
        }
        cfg.matched_fractions.clone_from(&args.matched);
    }
    cfg.profs_layers.clone_from(&args.profs_layers);
    if args.base_model != amend::eval::base::BaseSize::Tiny && args.model.is_some() {
        bail!("--base-model is the synthetic task's base model; --model gives your own");
    }
    if args.task.synthetic_only() && args.model.is_some() {
        bail!(
            "--task {} needs the synthetic task's grammar; it does not apply to --model/--data",
            args.task.id()
        );
    }
    let mut points = match &args.cache_dir {
        Some(d) => PointCache::new(d.join("compare-points")),
        None => default_point_cache(),
    };
    points.resume = !args.fresh;
    let points = Some(&points);
    tch::set_num_threads(args.threads);

    let terminal = TerminalProgress::new();
    let progress: &dyn Progress = if args.no_progress { &NoProgress } else { &terminal };
    let started = std::time::Instant::now();
    let mut results = match (&args.model, &args.data) {
        (Some(dir), Some(data)) => {
            cfg.mode = format!("{}user", if args.quick { "quick-" } else { "" });
            let task = amend::eval::user_data::load_jsonl(data)
                .with_context(|| format!("cannot read {}", data.display()))?;
            let opts = args.load.options(tch::Kind::Float);
            progress.phase(&format!("loading {}", dir.display()));
            let t0 = std::time::Instant::now();
            let model = amend::models::load(dir, &opts)
                .with_context(|| format!("cannot load a model from {}", dir.display()))?;
            let info = BaseModelInfo {
                dir: dir.display().to_string(),
                recipe: None,
                report: None,
                trained_now: false,
                parameters: model.params().num_elements(false),
                seconds: t0.elapsed().as_secs_f64(),
            };
            run_comparison(model.as_dyn(), info, &task, &cfg, points, progress)?
        }
        _ => {
            let cache =
                args.cache_dir.clone().unwrap_or_else(amend::eval::base::default_model_cache);
            run_synthetic(&cfg, &cache, points, progress)?
        }
    };
    let runtime = amend::runtime::RuntimeInfo::detect();
    let env = &mut results.environment;
    env.insert("amend_version".into(), env!("CARGO_PKG_VERSION").into());
    env.insert(
        "libtorch_version".into(),
        runtime.libtorch_version.unwrap_or_else(|| "unknown".into()),
    );
    env.insert("command".into(), command_line());
    check_out(args)?;
    let files = write_report(&results, &args.out)
        .with_context(|| format!("cannot write the report to {}", args.out.display()))?;
    let mut out = String::new();
    out += "\n";
    out += &terminal_summary(&results);
    out += &format!(
        "\n{} points ({} runs, {} from the point cache) in {:.0} s. Report: {}/ (report.md, \
         results.json{})\n",
        results.points.len(),
        results.timing.runs,
        results.timing.cached_runs,
        started.elapsed().as_secs_f64(),
        files.dir.display(),
        if files.svg.is_some() { ", plot.svg, plot.png" } else { "" }
    );
    super::score::emit(&out)
}

/// Checks --out before any work (and again before writing): it may not be, contain or sit
/// inside --model, --data or the model cache, and an existing folder is replaced only if it is
/// empty or an earlier report holding nothing but the report's files.
fn check_out(args: &CompareArgs) -> Result<()> {
    use amend::models::output::{Existing, OutputKind, OutputSpec, check_outputs};
    let cache = args.cache_dir.clone().unwrap_or_else(amend::eval::base::default_model_cache);
    let mut inputs: Vec<(&str, &std::path::Path)> = Vec::new();
    if let Some(m) = &args.model {
        inputs.push(("--model", m));
    }
    if let Some(d) = &args.data {
        inputs.push(("--data", d));
    }
    if args.model.is_none() {
        inputs.push(("--cache-dir", &cache));
    }
    let spec = OutputSpec {
        label: "--out",
        path: &args.out,
        kind: OutputKind::Dir,
        existing: Existing::ReplaceAmendOutput {
            legacy: Some(amend::eval::report::EARLIER_REPORT),
        },
    };
    check_outputs(&[spec], &inputs)?;
    Ok(())
}

/// `--summary`: the regime table of finished reports, labelled by regime (and base model when it
/// is not the tiny one, and mode when it is not the default).
fn summarize(dirs: &[PathBuf]) -> Result<()> {
    let mut runs = Vec::with_capacity(dirs.len());
    for d in dirs {
        let path = d.join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let r: amend::eval::compare::CompareResults = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an amend compare results.json", path.display()))?;
        let mut label = format!("`{}`", r.config.regime.id());
        if r.config.base_size != amend::eval::base::BaseSize::Tiny {
            label += &format!(" ({} model)", r.config.base_size.id());
        }
        if !matches!(r.config.mode.as_str(), "default") {
            label += &format!(" ({})", r.config.mode);
        }
        runs.push((label, r));
    }
    let refs: Vec<(&str, &amend::eval::compare::CompareResults)> =
        runs.iter().map(|(l, r)| (l.as_str(), r)).collect();
    super::score::emit(&amend::eval::report::regime_summary(&refs))
}

/// A `--base-model` size.
fn parse_base_size(s: &str) -> std::result::Result<amend::eval::base::BaseSize, String> {
    use amend::eval::base::BaseSize;
    BaseSize::parse(s).ok_or_else(|| {
        let known: Vec<&str> = BaseSize::ALL.iter().map(|b| b.id()).collect();
        format!("unknown base model `{s}` (known: {})", known.join(", "))
    })
}

/// A `--task` regime.
fn parse_regime(s: &str) -> std::result::Result<Regime, String> {
    Regime::parse(s).ok_or_else(|| {
        let known: Vec<&str> = Regime::ALL.iter().map(|r| r.id()).collect();
        format!("unknown regime `{s}` (known: {})", known.join(", "))
    })
}

/// `START..END` (half-open, non-empty).
fn parse_range(s: &str) -> std::result::Result<std::ops::Range<usize>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("expected START..END, got `{s}`"))?;
    let parse = |x: &str| x.trim().parse::<usize>().map_err(|e| format!("`{x}`: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

/// The command line as typed (program name shortened to `amend`).
fn command_line() -> String {
    let mut parts = vec!["amend".to_string()];
    parts.extend(std::env::args().skip(1).map(|a| {
        if a.is_empty() || a.contains(char::is_whitespace) { format!("{a:?}") } else { a }
    }));
    parts.join(" ")
}
