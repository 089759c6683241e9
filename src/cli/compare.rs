//! `amend compare`: the methods side by side on a task with a known ideal update.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use amend::eval::compare::{
    BaseModelInfo, CompareConfig, NoProgress, Progress, TargetRate, run_comparison, run_synthetic,
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
/// CP, RRHF, NEAT) starts from that model, trains on the same annotated samples with the same
/// budget over a sweep of its strength (ProFS, tuning-free, edits the weights once per rank k
/// from pairs of the same samples), and is scored on held-out prompts by its unwanted rate
/// and by KL(p*‖p_new), its distance to the ideal update p* (the base model conditioned on never
/// producing an unwanted word). The report folder gets report.md (tables), results.json (every
/// number and the configuration), plot.svg and plot.png.
///
/// With --model DIR --data FILE.jsonl, runs the same comparison on a local Hugging Face model
/// with your prompts and annotations (schema: docs/compare-data.md).
///
/// Examples:
///   amend compare                        # 3 to 6 minutes on 2 cores
///   amend compare --quick                # about a minute; noisy numbers
///   amend compare --methods tnff,tnrr,nl,ul,dpo --seed 1 --out reports/s1
///   amend compare --model ./my-gpt2 --data prompts.jsonl --quick
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Smaller base model, fewer samples, 20 steps and two sweep points per method.
    #[arg(long)]
    pub quick: bool,
    /// Comma-separated methods (default: all): tnff, tnrr, tnrf, tnfll, tnrll, nl, ul,
    /// welleck_ul, npo, dpo, cp, rrhf, neat, profs.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub methods: Vec<String>,
    /// Seed of the training-data samples, the batch order and the evaluation samplers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the synthetic task and its base model (a new value trains a new base model).
    #[arg(long, default_value_t = 0)]
    pub task_seed: u64,
    /// Report folder. An existing one is replaced only if it is empty or an earlier report
    /// holding nothing but the report's files; it may not be, contain or sit inside --model,
    /// --data or the model cache.
    #[arg(long, default_value = "reports/compare", value_name = "DIR")]
    pub out: PathBuf,
    /// libtorch threads. 1 is fastest for the tiny default model and safe when other jobs
    /// share the cores (libtorch's thread pool spins while waiting).
    #[arg(long, default_value = "1", value_name = "N", value_parser = super::threads_arg)]
    pub threads: i32,
    /// A local Hugging Face checkpoint to compare the methods on (needs --data).
    #[arg(long, value_name = "DIR", requires = "data")]
    pub model: Option<PathBuf>,
    /// Prompts and annotations for --model, JSON Lines (see docs/compare-data.md).
    #[arg(long, value_name = "FILE.jsonl", requires = "model")]
    pub data: Option<PathBuf>,
    /// Training steps of every method (default: 60, or 20 with --quick).
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// AdamW learning rate of every method (default 1e-4).
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Layers ProFS edits, half-open START..END (default: the upper 60 % of the blocks,
    /// ⌊2L/5⌋..L, where the reference ranges start).
    #[arg(long, value_name = "START..END", value_parser = parse_range)]
    pub profs_layers: Option<std::ops::Range<usize>>,
    /// Matched unwanted rate of the summary, as a fraction of the base model's rate.
    #[arg(long, default_value_t = 0.25, value_name = "F")]
    pub target_fraction: f64,
    /// Where base models are cached (default ${AMEND_CACHE_DIR:-~/.cache/amend}/models).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not draw progress bars or print progress lines.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub load: super::LoadArgs,
}

/// Runs `amend compare`.
pub fn run(args: &CompareArgs) -> Result<()> {
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
    cfg.task.seed = args.task_seed;
    cfg.base_recipe.seed = args.task_seed;
    cfg.threads = Some(args.threads);
    if let Some(s) = args.steps {
        cfg.budget.steps = s.max(1);
    }
    if let Some(lr) = args.lr {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a positive number");
        }
        cfg.budget.lr = lr;
    }
    if !(args.target_fraction.is_finite() && args.target_fraction > 0.0) {
        bail!("--target-fraction must be positive");
    }
    cfg.target_rate = TargetRate::FractionOfBase(args.target_fraction);
    cfg.profs_layers.clone_from(&args.profs_layers);
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
            run_comparison(model.as_dyn(), info, &task, &cfg, progress)?
        }
        _ => {
            let cache =
                args.cache_dir.clone().unwrap_or_else(amend::eval::base::default_model_cache);
            run_synthetic(&cfg, &cache, progress)?
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
        "\n{} sweep points in {:.0} s. Report: {}/ (report.md, results.json{})\n",
        results.points.len(),
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
