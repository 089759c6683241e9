//! The comparison: every method and sweep point trained from the same base model on the same
//! data with the same budget, evaluated with the same samplers, and collected into
//! [`CompareResults`].
//!
//! ```no_run
//! use amend_eval::compare::{CompareConfig, NoProgress, run_synthetic};
//! use amend_eval::report::write_report;
//!
//! let cfg = CompareConfig::quick();
//! let results = run_synthetic(&cfg, &amend_eval::base::default_model_cache(), &NoProgress)?;
//! write_report(&results, std::path::Path::new("compare-report"))?;
//! # Ok::<(), amend_eval::Error>(())
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use amend_models::CausalLm;
use amend_models::recipe::{TinyModelReport, TinyRecipe};
use serde::{Deserialize, Serialize};

use crate::annotate::{DataStats, SamplingConfig, sample_training_data};
use crate::methods::{Budget, Method, TrainStats, profs_method, train_method};
use crate::metrics::{BaseFacts, EvalConfig, Evaluator, PointMetrics, Skipped};
use crate::synthetic::{SyntheticTask, SyntheticTaskConfig};
use crate::task::SuppressionTask;
use crate::{Result, memory};

/// The version of the `results.json` format.
pub const RESULTS_FORMAT: u32 = 1;

/// One method and the values of its strength knob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSweep {
    /// The method.
    pub method: Method,
    /// Values of [`Method::strength_name`].
    pub values: Vec<f64>,
}

/// The unwanted rate at which methods are compared ("best point at matched unwanted rate").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRate {
    /// A fraction of the base model's measured rate.
    FractionOfBase(f64),
    /// An absolute rate.
    Absolute(f64),
}

/// Everything that determines a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// `"default"`, `"quick"` or `"user"` (informational).
    pub mode: String,
    /// Seed of the training-data sampler, the group order, libtorch's RNG and the evaluation
    /// samplers.
    pub seed: u64,
    /// The synthetic task (unused with user data).
    pub task: SyntheticTaskConfig,
    /// The base model's recipe (synthetic task only).
    pub base_recipe: TinyRecipe,
    /// How the training data is sampled from `p°`.
    pub sampling: SamplingConfig,
    /// How the metrics are estimated.
    pub eval: EvalConfig,
    /// The shared training budget.
    pub budget: Budget,
    /// The methods and their sweeps.
    pub sweeps: Vec<MethodSweep>,
    /// The matched unwanted rate of the summary.
    pub target_rate: TargetRate,
    /// libtorch intra-op threads (`None`: leave libtorch's setting); checked by
    /// [`amend_models::machine::check_threads`] (0 or more than 4 per logical CPU is an error).
    pub threads: Option<i32>,
    /// The layers ProFS edits, half-open (`None`: [`crate::methods::profs_layers`], the upper
    /// 60 % of the blocks).
    pub profs_layers: Option<std::ops::Range<usize>>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            mode: "default".into(),
            seed: 0,
            task: SyntheticTaskConfig::default(),
            base_recipe: crate::base::base_recipe(0),
            sampling: SamplingConfig::default(),
            eval: EvalConfig::default(),
            budget: Budget::default(),
            sweeps: Method::ALL
                .iter()
                .map(|&method| MethodSweep { method, values: method.default_sweep() })
                .collect(),
            target_rate: TargetRate::FractionOfBase(0.25),
            threads: Some(1),
            profs_layers: None,
        }
    }
}

impl CompareConfig {
    /// The default comparison (about 5 minutes on 2 cores, base-model training included).
    pub fn default_mode() -> Self {
        CompareConfig::default()
    }

    /// `--quick`: a smaller base model and corpus, fewer samples, 20 steps, two sweep points per
    /// method. Checks the whole pipeline in a couple of minutes; its numbers are noisy.
    pub fn quick() -> Self {
        CompareConfig {
            mode: "quick".into(),
            task: SyntheticTaskConfig {
                corpus_docs: 6000,
                eval_prompts: 32,
                control_prompts: 16,
                heldout_texts: 64,
                ..SyntheticTaskConfig::default()
            },
            base_recipe: crate::base::quick_base_recipe(0),
            sampling: SamplingConfig {
                samples_per_prompt: 6,
                negative_samples_per_prompt: 2,
                max_new_tokens: 32,
                ..SamplingConfig::default()
            },
            eval: EvalConfig {
                samples_per_prompt: 4,
                rejection_samples_per_prompt: 8,
                control_samples_per_prompt: 4,
                max_new_tokens: 32,
                ..EvalConfig::default()
            },
            budget: Budget { steps: 20, ..Budget::default() },
            sweeps: Method::ALL
                .iter()
                .map(|&method| MethodSweep { method, values: method.quick_sweep() })
                .collect(),
            ..CompareConfig::default()
        }
    }

    /// Keeps only `methods` (in the given order).
    pub fn with_methods(mut self, methods: &[Method]) -> Self {
        let old = std::mem::take(&mut self.sweeps);
        self.sweeps = methods
            .iter()
            .map(|&m| {
                old.iter().find(|s| s.method == m).cloned().unwrap_or(MethodSweep {
                    method: m,
                    values: if self.mode == "quick" { m.quick_sweep() } else { m.default_sweep() },
                })
            })
            .collect();
        self
    }

    /// Sets the seed of everything the comparison samples (the task and base model keep
    /// theirs: `task.seed`, `base_recipe.seed`).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Peak resident memory around one sweep point (see [`crate::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Resident set size before the point, bytes.
    pub rss_before_bytes: Option<u64>,
    /// Peak resident set size during training and evaluation of the point, bytes (process-wide;
    /// `None` where `/proc/self/clear_refs` is unavailable).
    pub peak_rss_bytes: Option<u64>,
}

impl MemoryStats {
    /// `peak − before`, the increment of the point.
    pub fn peak_increment_bytes(&self) -> Option<u64> {
        Some(self.peak_rss_bytes?.saturating_sub(self.rss_before_bytes?))
    }
}

/// One trained and evaluated sweep point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// The method.
    pub method: Method,
    /// The knob's name.
    pub strength_name: String,
    /// The knob's value.
    pub strength: f64,
    /// The metrics (default when the point failed).
    pub metrics: PointMetrics,
    /// Training statistics (losses per step, …).
    pub train: TrainStats,
    /// Peak memory.
    pub memory: MemoryStats,
    /// Why the point failed, if it did (for example a non-finite loss).
    pub error: Option<String>,
}

impl PointResult {
    /// `"TNFF α=10"`.
    pub fn label(&self) -> String {
        format!("{} {}={}", self.method.name(), self.strength_name, fmt_value(self.strength))
    }
}

/// A number without trailing zeros (`10`, `0.1`, `1e-5`).
pub fn fmt_value(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:e}")
    } else {
        let s = format!("{v}");
        s
    }
}

/// The base model of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModelInfo {
    /// Its directory.
    pub dir: String,
    /// The recipe (synthetic task).
    pub recipe: Option<TinyRecipe>,
    /// The recipe's report (synthetic task).
    pub report: Option<TinyModelReport>,
    /// Whether this run trained it (false: loaded from the cache or given).
    pub trained_now: bool,
    /// Parameters.
    pub parameters: usize,
    /// Wall time of training or loading.
    pub seconds: f64,
}

/// Facts about the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Name.
    pub name: String,
    /// Training prompts.
    pub train_prompts: usize,
    /// Held-out prompts.
    pub eval_prompts: usize,
    /// Control prompts.
    pub control_prompts: usize,
    /// The unwanted words, if known.
    pub unwanted_words: Option<Vec<String>>,
    /// The negative prefix, if any.
    pub negative_prefix: Option<String>,
    /// Given annotated responses.
    pub given_responses: usize,
}

/// Which point of a method is reported at the matched unwanted rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestPoint {
    /// The method.
    pub method: Method,
    /// Index into [`CompareResults::points`] of the point with the lowest `KL(p*‖p_new)` among
    /// those with an unwanted rate at most the target; `None` when no point reaches it.
    pub point: Option<usize>,
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Base model (training or loading).
    pub base_model_seconds: f64,
    /// Training-data sampling and annotation.
    pub data_seconds: f64,
    /// Evaluator set-up (samples of `p°`).
    pub eval_setup_seconds: f64,
    /// All sweep points.
    pub points_seconds: f64,
    /// The whole comparison.
    pub total_seconds: f64,
}

/// Everything a comparison produced: the configuration, the environment, every number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResults {
    /// [`RESULTS_FORMAT`].
    pub format: u32,
    /// The configuration.
    pub config: CompareConfig,
    /// Versions and machine facts (amend version, git commit, libtorch, threads, …).
    pub environment: BTreeMap<String, String>,
    /// The task.
    pub task: TaskInfo,
    /// The base model.
    pub base_model: BaseModelInfo,
    /// The training data.
    pub data: DataStats,
    /// What the evaluator established about `p°`.
    pub base_facts: BaseFacts,
    /// The metrics of `p°` itself.
    pub base_metrics: PointMetrics,
    /// Metrics that could not be computed, and why.
    pub skipped: Vec<Skipped>,
    /// Every sweep point, in run order.
    pub points: Vec<PointResult>,
    /// The target unwanted rate of the matched comparison.
    pub target_rate: Option<f64>,
    /// Each method's best point at the target rate.
    pub best: Vec<BestPoint>,
    /// Wall times.
    pub timing: Timing,
}

impl CompareResults {
    fn select_best(&mut self) {
        let base_rate = self.base_metrics.unwanted_rate.map(|e| e.value);
        self.target_rate = match self.config.target_rate {
            TargetRate::Absolute(r) => Some(r),
            TargetRate::FractionOfBase(f) => base_rate.map(|r| r * f),
        };
        let methods: Vec<Method> = self.config.sweeps.iter().map(|s| s.method).collect();
        self.best = methods
            .into_iter()
            .map(|method| {
                let point = self.target_rate.and_then(|target| {
                    self.points
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.method == method && p.error.is_none())
                        .filter_map(|(i, p)| {
                            let rate = p.metrics.unwanted_rate?.value;
                            let kl = p.metrics.kl_ideal?.value;
                            (rate <= target && kl.is_finite()).then_some((i, kl))
                        })
                        .min_by(|a, b| a.1.total_cmp(&b.1))
                        .map(|(i, _)| i)
                });
                BestPoint { method, point }
            })
            .collect();
    }
}

/// Progress reports of a comparison (the CLI draws progress bars with
/// [`crate::progress::TerminalProgress`]).
pub trait Progress {
    /// A phase began (`"training the base model"`, …).
    fn phase(&self, message: &str);
    /// Sweep point `index` of `total` began; it trains for `steps` steps.
    fn point_started(&self, index: usize, total: usize, label: &str, steps: usize);
    /// A training step of the current point finished.
    fn step(&self, step: usize, loss: f64);
    /// The current point's training finished; evaluation begins.
    fn evaluating(&self);
    /// The current point finished.
    fn point_finished(&self, index: usize, total: usize, result: &PointResult);
    /// Everything finished.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str) {}
    fn point_started(&self, _: usize, _: usize, _: &str, _: usize) {}
    fn step(&self, _: usize, _: f64) {}
    fn evaluating(&self) {}
    fn point_finished(&self, _: usize, _: usize, _: &PointResult) {}
}

/// The environment facts the library knows: amend-eval version, git commit (at build time),
/// OS, architecture, libtorch threads.
pub fn environment() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("amend_eval_version".into(), env!("CARGO_PKG_VERSION").into());
    env.insert(
        "git_commit".into(),
        option_env!("AMEND_GIT_COMMIT").filter(|s| !s.is_empty()).unwrap_or("unknown").into(),
    );
    env.insert("os".into(), std::env::consts::OS.into());
    env.insert("arch".into(), std::env::consts::ARCH.into());
    env.insert("libtorch_threads".into(), tch::get_num_threads().to_string());
    env.insert(
        "cpus".into(),
        std::thread::available_parallelism().map_or("unknown".into(), |n| n.to_string()),
    );
    env.insert("tch_version".into(), "0.26.0".into());
    env
}

/// Runs the comparison of `cfg.sweeps` on `task` from the base model `base`.
///
/// Sweep points that fail (for example with a non-finite loss) are recorded with their error
/// and the comparison goes on.
///
/// # Errors
/// Errors of sampling the training data and of the evaluator (no usable data, model errors).
pub fn run_comparison(
    base: &dyn CausalLm,
    base_info: BaseModelInfo,
    task: &SuppressionTask,
    cfg: &CompareConfig,
    progress: &dyn Progress,
) -> Result<CompareResults> {
    let t0 = Instant::now();
    if let Some(n) = cfg.threads {
        amend_models::machine::set_threads(i64::from(n))?;
    }
    let cfg = &fit_lengths(base, task, cfg)?;
    progress.phase("sampling and annotating training data from the base model");
    let data = sample_training_data(base, task, &cfg.sampling, cfg.seed, &|m| progress.phase(m))?;
    progress.phase("sampling the base model for the metrics (rejection sampler, control prompts)");
    let t_eval = Instant::now();
    let evaluator = Evaluator::new(base, task, cfg.eval.clone(), cfg.seed.wrapping_add(1000))?;
    let base_metrics = evaluator.evaluate(base)?;
    let eval_setup_seconds = t_eval.elapsed().as_secs_f64();
    let total: usize = cfg.sweeps.iter().map(|s| s.values.len()).sum();
    let t_points = Instant::now();
    let mut points = Vec::with_capacity(total);
    let mut index = 0;
    for sweep in &cfg.sweeps {
        for &strength in &sweep.values {
            index += 1;
            let mut point = PointResult {
                method: sweep.method,
                strength_name: sweep.method.strength_name().into(),
                strength,
                metrics: PointMetrics::default(),
                train: TrainStats::default(),
                memory: MemoryStats::default(),
                error: None,
            };
            let steps = if sweep.method.is_tuning_free() { 0 } else { cfg.budget.steps };
            progress.point_started(index, total, &point.label(), steps);
            point.memory.rss_before_bytes = memory::current_rss_bytes();
            let can_reset = memory::reset_peak_rss();
            let trained = if sweep.method.is_tuning_free() {
                crate::methods::profs_rank(strength)
                    .and_then(|k| profs_method(base, &data, k, cfg.profs_layers.clone(), cfg.seed))
            } else {
                train_method(
                    base,
                    &data,
                    sweep.method,
                    strength,
                    &cfg.budget,
                    cfg.seed,
                    &mut |s, l| progress.step(s, l),
                )
            };
            match trained {
                Ok((model, stats)) => {
                    point.train = stats;
                    progress.evaluating();
                    match evaluator.evaluate(&*model) {
                        Ok(m) => point.metrics = m,
                        Err(e) => point.error = Some(error_chain(&e)),
                    }
                }
                Err(e) => point.error = Some(error_chain(&e)),
            }
            if can_reset {
                point.memory.peak_rss_bytes = memory::peak_rss_bytes();
            }
            progress.point_finished(index, total, &point);
            points.push(point);
        }
    }
    let points_seconds = t_points.elapsed().as_secs_f64();
    let mut results = CompareResults {
        format: RESULTS_FORMAT,
        config: cfg.clone(),
        environment: environment(),
        task: TaskInfo {
            name: task.name.clone(),
            train_prompts: task.train_prompts.len(),
            eval_prompts: task.eval_prompts.len(),
            control_prompts: task.control_prompts.len(),
            unwanted_words: task.detector.as_ref().map(|d| d.words().to_vec()),
            negative_prefix: task.negative_prefix.clone(),
            given_responses: task.responses.len(),
        },
        timing: Timing {
            base_model_seconds: base_info.seconds,
            data_seconds: data.stats.seconds,
            eval_setup_seconds,
            points_seconds,
            total_seconds: base_info.seconds + t0.elapsed().as_secs_f64(),
        },
        base_model: base_info,
        data: data.stats.clone(),
        base_facts: evaluator.base_facts().clone(),
        base_metrics,
        skipped: evaluator.skipped().to_vec(),
        points,
        target_rate: None,
        best: vec![],
    };
    results.select_best();
    progress.finish();
    Ok(results)
}

/// `cfg` with `max_new_tokens` lowered so that the longest prompt plus the response fits the
/// model's positions (the effective values are what `results.json` records).
///
/// # Errors
/// [`crate::Error::InvalidInput`] when a prompt leaves no room for a response; tokenizer errors.
fn fit_lengths(
    base: &dyn CausalLm,
    task: &SuppressionTask,
    cfg: &CompareConfig,
) -> Result<CompareConfig> {
    let mut cfg = cfg.clone();
    let (Some(max), Some(tok)) = (base.config().max_positions(), base.tokenizer()) else {
        return Ok(cfg);
    };
    let prefix = task.negative_prefix.clone().unwrap_or_default();
    let mut longest = 0;
    for p in task.train_prompts.iter().chain(&task.eval_prompts).chain(&task.control_prompts) {
        longest = longest.max(tok.encode(p, true)?.len());
    }
    if !prefix.is_empty() {
        for p in &task.train_prompts {
            longest = longest.max(tok.encode(&format!("{prefix}{p}"), true)?.len());
        }
    }
    if longest + 1 > max {
        return Err(crate::Error::InvalidInput {
            op: "run_comparison",
            name: "prompts".into(),
            reason: format!(
                "the longest prompt has {longest} tokens and the model only {max} positions"
            ),
        });
    }
    let room = max - longest;
    cfg.sampling.max_new_tokens = cfg.sampling.max_new_tokens.min(room);
    cfg.eval.max_new_tokens = cfg.eval.max_new_tokens.min(room);
    Ok(cfg)
}

/// An error and its sources, `": "`-separated (for the report).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// Runs the comparison on the synthetic task: builds the task, loads the base model from
/// `model_cache` or trains it there, and calls [`run_comparison`].
///
/// # Errors
/// Errors of the task, the base-model recipe and [`run_comparison`].
pub fn run_synthetic(
    cfg: &CompareConfig,
    model_cache: &std::path::Path,
    progress: &dyn Progress,
) -> Result<CompareResults> {
    if let Some(n) = cfg.threads {
        amend_models::machine::set_threads(i64::from(n))?;
    }
    let synthetic = SyntheticTask::new(cfg.task.clone())?;
    let corpus = synthetic.corpus();
    let cached = amend_models::recipe::cache_path(model_cache, &corpus, &cfg.base_recipe)
        .join(amend_models::recipe::REPORT_FILE)
        .is_file();
    progress.phase(if cached {
        "loading the cached base model"
    } else {
        "training the base model (once; it is cached for later runs)"
    });
    let t0 = Instant::now();
    let (model, report, dir) =
        crate::base::load_or_train_base(model_cache, &corpus, &cfg.base_recipe, !cached)?;
    let info = BaseModelInfo {
        dir: dir.display().to_string(),
        recipe: Some(cfg.base_recipe.clone()),
        parameters: model.params().num_elements(false),
        report: Some(report),
        trained_now: !cached,
        seconds: t0.elapsed().as_secs_f64(),
    };
    run_comparison(&model, info, &synthetic.suppression_task(), cfg, progress)
}
