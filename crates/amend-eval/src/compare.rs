//! The comparison: every method and sweep point trained from the same base model on the same
//! data with the same budget, evaluated with the same samplers, and collected into
//! [`CompareResults`].
//!
//! ```no_run
//! use amend_eval::compare::{CompareConfig, NoProgress, run_synthetic};
//! use amend_eval::report::write_report;
//!
//! let cfg = CompareConfig::quick();
//! let cache = amend_eval::compare::default_point_cache();
//! let results =
//!     run_synthetic(&cfg, &amend_eval::base::default_model_cache(), Some(&cache), &NoProgress)?;
//! write_report(&results, std::path::Path::new("compare-report"))?;
//! # Ok::<(), amend_eval::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use amend_models::CausalLm;
use amend_models::recipe::{TinyModelReport, TinyRecipe};
use serde::{Deserialize, Serialize};

use crate::annotate::{DataStats, SamplingConfig, TrainingData, sample_training_data};
use crate::frontier::{area, kl_at_rate, pareto_front};
use crate::methods::{Budget, Method, TrainStats, profs_method, train_method_checkpoints};
use crate::metrics::{BaseFacts, Estimate, EvalConfig, Evaluator, PointMetrics, Skipped};
use crate::synthetic::{SyntheticTask, SyntheticTaskConfig};
use crate::task::SuppressionTask;
use crate::{Result, memory};

/// The version of the `results.json` format.
pub const RESULTS_FORMAT: u32 = 2;

/// One method and the values of its strength knob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSweep {
    /// The method.
    pub method: Method,
    /// Values of [`Method::strength_name`].
    pub values: Vec<f64>,
}

/// The regime of a comparison: how the methods' training data relate the unwanted and the
/// clean responses (`--task`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Responses sampled from `p°` at temperature 1 and annotated; the sequence-level methods
    /// and ProFS pair each unwanted response with an unrelated clean response of the same prompt.
    #[default]
    Sampled,
    /// The same samples for the token-level methods; the sequence-level methods and ProFS get
    /// minimal pairs instead: each unwanted response and the same response with its unwanted
    /// words taken out ([`crate::pairs`]). Synthetic task only.
    Pairs,
    /// The TNT paper's setting: a task whose base model puts its highest probability on an
    /// unwanted word in many contexts ([`SyntheticTaskConfig::dominant_word`]), and training
    /// responses sampled at a low temperature ([`GREEDY_TEMPERATURE`]), so that the annotated
    /// tokens are often the base model's own top-1 choices. `p*` and the metrics are those of the
    /// other regimes (temperature 1). Synthetic task only; it has its own base model.
    Greedy,
}

/// The training-data temperature of the `greedy` regime.
pub const GREEDY_TEMPERATURE: f64 = 0.5;

/// The share of `blorp` among the unwanted words in the `greedy` regime.
pub const GREEDY_DOMINANT_WORD: f64 = 0.9;

impl Regime {
    /// Every regime, in report order.
    pub const ALL: [Regime; 3] = [Regime::Sampled, Regime::Pairs, Regime::Greedy];

    /// The name of `--task`.
    pub fn id(self) -> &'static str {
        match self {
            Regime::Sampled => "sampled",
            Regime::Pairs => "pairs",
            Regime::Greedy => "greedy",
        }
    }

    /// Whether the regime needs the synthetic task's grammar (it does not apply to user data).
    pub fn synthetic_only(self) -> bool {
        self != Regime::Sampled
    }

    /// The regime of a `--task` name.
    pub fn parse(s: &str) -> Option<Regime> {
        Regime::ALL.into_iter().find(|r| r.id() == s)
    }

    /// Whether `method` trains on the minimal pairs in this regime (the sequence-level methods
    /// and ProFS in `pairs`).
    pub fn uses_pairs(self, method: Method) -> bool {
        self == Regime::Pairs
            && matches!(
                method,
                Method::Npo
                    | Method::Dpo
                    | Method::Cp
                    | Method::Rrhf
                    | Method::Neat
                    | Method::Profs
            )
    }
}

/// The training budget as part of the sweep: every trained method and strength runs at every
/// learning rate, and is evaluated after every step count of `steps` (one run per learning
/// rate: the learning rate is constant after warm-up, so the model after `s` steps of a longer
/// run is the model of a run of `s` steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetGrid {
    /// AdamW learning rates.
    pub learning_rates: Vec<f64>,
    /// Step counts at which each run is evaluated.
    pub steps: Vec<usize>,
}

impl Default for BudgetGrid {
    fn default() -> Self {
        BudgetGrid { learning_rates: vec![1e-4, 3e-4], steps: vec![20, 60] }
    }
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
    /// The size of the synthetic base model (`--base-model`; informational: `base_recipe` is
    /// what is trained).
    pub base_size: crate::base::BaseSize,
    /// The base model's recipe (synthetic task only).
    pub base_recipe: TinyRecipe,
    /// How the training data is sampled from `p°`.
    pub sampling: SamplingConfig,
    /// How the metrics are estimated.
    pub eval: EvalConfig,
    /// The shared parts of the training budget (group batch size, warm-up, clipping, weight
    /// decay); its `steps` and `lr` are set per run from `grid`.
    pub budget: Budget,
    /// The learning rates and step counts every trained method runs at.
    pub grid: BudgetGrid,
    /// The regime (`--task`).
    pub regime: Regime,
    /// Training seeds: the comparison runs with seeds `seed, seed + 1, …, seed + seeds − 1`,
    /// each with its own training samples, batch order and evaluation samples.
    pub seeds: usize,
    /// Runs trained at once, each on its own copy of the base model with one libtorch thread
    /// (0: one per logical CPU). The numbers do not depend on it; per-point peak memory is only
    /// measured with 1.
    pub workers: usize,
    /// The methods and their sweeps.
    pub sweeps: Vec<MethodSweep>,
    /// The matched unwanted rates of the scores, as fractions of the base model's rate.
    pub matched_fractions: Vec<f64>,
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
            base_size: crate::base::BaseSize::Tiny,
            base_recipe: crate::base::base_recipe(0),
            sampling: SamplingConfig::default(),
            eval: EvalConfig::default(),
            budget: Budget::default(),
            grid: BudgetGrid::default(),
            regime: Regime::Sampled,
            seeds: 2,
            workers: 0,
            sweeps: Method::ALL
                .iter()
                .map(|&method| MethodSweep { method, values: method.default_sweep() })
                .collect(),
            matched_fractions: vec![0.25, 0.5],
            threads: Some(1),
            profs_layers: None,
        }
    }
}

impl CompareConfig {
    /// The default comparison: every method over its strength sweep × learning rates
    /// {1e-4, 3e-4} × steps {20, 60}, two training seeds (see `docs/compare.md` for its time).
    pub fn default_mode() -> Self {
        CompareConfig::default()
    }

    /// `--quick`: a smaller base model and corpus, fewer samples, steps {10, 20}, two strengths
    /// per method, two seeds. Checks the whole pipeline in a couple of minutes; its numbers are
    /// noisy.
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
            grid: BudgetGrid { steps: vec![10, 20], ..BudgetGrid::default() },
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

    /// Sets the size of the synthetic base model and its recipe ([`crate::base::BaseSize::recipe`],
    /// keeping the recipe's seed).
    ///
    /// ```
    /// use amend_eval::base::BaseSize;
    /// use amend_eval::compare::CompareConfig;
    /// let cfg = CompareConfig::default().with_base_size(BaseSize::Standard);
    /// assert_eq!(cfg.base_recipe.model.n_layer, 4);
    /// assert_eq!(cfg.with_base_size(BaseSize::Tiny), CompareConfig::default());
    /// ```
    pub fn with_base_size(mut self, size: crate::base::BaseSize) -> Self {
        self.base_size = size;
        self.base_recipe = size.recipe(self.mode == "quick", self.base_recipe.seed);
        self
    }

    /// Sets the regime and what it changes in the rest of the configuration: `greedy` makes
    /// `blorp` the dominant unwanted word of the task ([`GREEDY_DOMINANT_WORD`], so a new base
    /// model) and samples the training data at [`GREEDY_TEMPERATURE`]; the others keep the task
    /// and temperature 1.
    ///
    /// ```
    /// use amend_eval::compare::{CompareConfig, Regime};
    /// let cfg = CompareConfig::quick().with_regime(Regime::Greedy);
    /// assert_eq!(cfg.sampling.temperature, 0.5);
    /// assert_eq!(cfg.task.dominant_word, Some(0.9));
    /// let back = cfg.with_regime(Regime::Sampled);
    /// assert_eq!(back, CompareConfig::quick());
    /// ```
    pub fn with_regime(mut self, regime: Regime) -> Self {
        self.regime = regime;
        let greedy = regime == Regime::Greedy;
        self.task.dominant_word = greedy.then_some(GREEDY_DOMINANT_WORD);
        self.sampling.temperature = if greedy { GREEDY_TEMPERATURE } else { 1.0 };
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
    /// The learning rate (`None` for ProFS, which is not trained).
    pub lr: Option<f64>,
    /// Training steps (0 for ProFS).
    pub steps: usize,
    /// The training seed.
    pub seed: u64,
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

    /// `"α=10, lr 1e-4, 60 steps"`: the setting without the method and the seed.
    pub fn setting(&self) -> String {
        setting_label(&self.strength_name, self.strength, self.lr, self.steps)
    }
}

/// `"α=10, lr 1e-4, 60 steps"` (ProFS: `"k=2"`).
pub fn setting_label(name: &str, strength: f64, lr: Option<f64>, steps: usize) -> String {
    match lr {
        Some(lr) => format!("{name}={}, lr {}, {steps} steps", fmt_value(strength), fmt_value(lr)),
        None => format!("{name}={}", fmt_value(strength)),
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

/// The mean over seeds of one setting (method, strength, learning rate, steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregatePoint {
    /// The method.
    pub method: Method,
    /// The knob's name.
    pub strength_name: String,
    /// The knob's value.
    pub strength: f64,
    /// The learning rate (`None` for ProFS).
    pub lr: Option<f64>,
    /// Training steps (0 for ProFS).
    pub steps: usize,
    /// Indices into [`CompareResults::points`] of this setting's points, one per seed.
    pub points: Vec<usize>,
    /// Seeds whose point failed.
    pub failed: usize,
    /// Unwanted rate: mean over seeds ± standard error over seeds (`n` seeds).
    pub unwanted_rate: Option<Estimate>,
    /// `KL(p*‖p_new)`: mean ± standard error over seeds.
    pub kl_ideal: Option<Estimate>,
    /// `KL(p°‖p_new)` on control prompts: mean ± standard error over seeds.
    pub kl_control: Option<Estimate>,
    /// Held-out perplexity, mean over seeds.
    pub heldout_perplexity: Option<f64>,
    /// Training wall time, mean over seeds.
    pub train_seconds: f64,
    /// Peak resident memory, largest over seeds (only measured with one worker).
    pub peak_rss_bytes: Option<u64>,
}

impl AggregatePoint {
    /// `"α=10, lr 1e-4, 60 steps"`.
    pub fn setting(&self) -> String {
        setting_label(&self.strength_name, self.strength, self.lr, self.steps)
    }
}

/// One score of one method: its value per seed, their mean ± standard error, and how it
/// compares with the best method's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Per seed, in seed order (`None`: not reached with that seed).
    pub per_seed: Vec<Option<f64>>,
    /// Mean ± standard error over seeds; `None` unless every seed reached it.
    pub mean: Option<Estimate>,
    /// Whether this method has the lowest mean.
    pub best: bool,
    /// Paired difference to the best method's score (this − best), mean ± standard error over
    /// seeds (each seed shares its data and evaluation samples across methods).
    pub vs_best: Option<Estimate>,
    /// Whether the difference to the best is within noise (mean ≤ 2 standard errors); `None`
    /// for the best method itself, without a mean, or with one seed.
    pub within_noise: Option<bool>,
}

/// A method's frontier and scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSummary {
    /// The method.
    pub method: Method,
    /// Indices into [`CompareResults::aggregates`] of the Pareto frontier of its mean points,
    /// by unwanted rate ascending.
    pub frontier: Vec<usize>,
    /// Lowest `KL(p*‖p_new)` at each matched unwanted rate (in the order of
    /// [`CompareConfig::matched_fractions`]), interpolated along each seed's frontier.
    pub kl_at_matched: Vec<Score>,
    /// Normalised area under each seed's frontier (0 ideal, 1 no better than the base model).
    pub area: Score,
}

/// What one training seed established about the base model and its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// The training data.
    pub data: DataStats,
    /// The minimal pairs of the `pairs` regime (`None` in other regimes).
    pub pair_data: Option<DataStats>,
    /// What the evaluator established about `p°`.
    pub base_facts: BaseFacts,
    /// The metrics of `p°` on this seed's evaluation samples.
    pub base_metrics: PointMetrics,
    /// Metrics that could not be computed, and why.
    pub skipped: Vec<Skipped>,
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Base model (training or loading).
    pub base_model_seconds: f64,
    /// Training-data sampling and annotation, all seeds.
    pub data_seconds: f64,
    /// Evaluator set-up (samples of `p°`), all seeds.
    pub eval_setup_seconds: f64,
    /// All sweep points.
    pub points_seconds: f64,
    /// The whole comparison.
    pub total_seconds: f64,
    /// Training runs in all.
    pub runs: usize,
    /// Runs whose points were read from the point cache instead of computed.
    pub cached_runs: usize,
    /// Runs trained at once.
    pub workers: usize,
    /// Peak resident memory of the whole comparison, bytes.
    pub peak_rss_bytes: Option<u64>,
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
    /// The training data of the first seed (every seed's: [`CompareResults::seed_runs`]).
    pub data: DataStats,
    /// What the evaluator established about `p°` with the first seed.
    pub base_facts: BaseFacts,
    /// The metrics of `p°`: mean ± standard error over seeds (one seed: that seed's).
    pub base_metrics: PointMetrics,
    /// Metrics that could not be computed, and why (first seed).
    pub skipped: Vec<Skipped>,
    /// Per seed: data, base facts and base metrics.
    pub seed_runs: Vec<SeedRun>,
    /// Every point (method × strength × learning rate × steps × seed).
    pub points: Vec<PointResult>,
    /// Every setting's mean over seeds.
    pub aggregates: Vec<AggregatePoint>,
    /// The matched unwanted rates (fractions of the mean base rate), for the tables.
    pub matched_rates: Vec<f64>,
    /// Per method: frontier and scores, in the order of the sweeps.
    pub summary: Vec<MethodSummary>,
    /// Notes on the run (a point cache that could not be written, …).
    pub warnings: Vec<String>,
    /// Wall times.
    pub timing: Timing,
}

/// The right edge of the area score: three times the base model's `KL(p*‖p°)`, the plot's
/// right edge.
pub const AREA_CAP_OVER_BASE_KL: f64 = 3.0;

impl CompareResults {
    /// Groups the points into settings, the per-seed base metrics into their mean, and computes
    /// each method's frontier and scores.
    fn summarise(&mut self) {
        // Settings, in first-seen order.
        let mut aggregates: Vec<AggregatePoint> = Vec::new();
        for (i, p) in self.points.iter().enumerate() {
            let same = |a: &AggregatePoint| {
                a.method == p.method
                    && a.strength.to_bits() == p.strength.to_bits()
                    && a.lr.map(f64::to_bits) == p.lr.map(f64::to_bits)
                    && a.steps == p.steps
            };
            match aggregates.iter_mut().find(|a| same(a)) {
                Some(a) => a.points.push(i),
                None => aggregates.push(AggregatePoint {
                    method: p.method,
                    strength_name: p.strength_name.clone(),
                    strength: p.strength,
                    lr: p.lr,
                    steps: p.steps,
                    points: vec![i],
                    failed: 0,
                    unwanted_rate: None,
                    kl_ideal: None,
                    kl_control: None,
                    heldout_perplexity: None,
                    train_seconds: 0.0,
                    peak_rss_bytes: None,
                }),
            }
        }
        for a in &mut aggregates {
            let ok: Vec<&PointResult> =
                a.points.iter().map(|&i| &self.points[i]).filter(|p| p.error.is_none()).collect();
            a.failed = a.points.len() - ok.len();
            // A setting's mean needs every seed: a mean over the seeds that happened to
            // succeed would not be comparable with the others.
            let all = |f: &dyn Fn(&PointResult) -> Option<f64>| -> Option<Estimate> {
                let v: Vec<f64> = ok.iter().filter_map(|p| f(p)).collect();
                (a.failed == 0 && v.len() == ok.len()).then(|| Estimate::mean_of(&v)).flatten()
            };
            a.unwanted_rate = all(&|p| p.metrics.unwanted_rate.map(|e| e.value));
            a.kl_ideal = all(&|p| p.metrics.kl_ideal.map(|e| e.value));
            a.kl_control = all(&|p| p.metrics.kl_control.map(|e| e.value));
            a.heldout_perplexity = all(&|p| p.metrics.heldout_perplexity).map(|e| e.value);
            a.train_seconds = if ok.is_empty() {
                0.0
            } else {
                ok.iter().map(|p| p.train.seconds).sum::<f64>() / ok.len() as f64
            };
            a.peak_rss_bytes = ok.iter().filter_map(|p| p.memory.peak_rss_bytes).max();
        }
        self.aggregates = aggregates;

        // The base model over seeds.
        if self.seed_runs.len() > 1 {
            let est = |f: &dyn Fn(&PointMetrics) -> Option<f64>| -> Option<Estimate> {
                let v: Vec<f64> =
                    self.seed_runs.iter().filter_map(|s| f(&s.base_metrics)).collect();
                (v.len() == self.seed_runs.len()).then(|| Estimate::mean_of(&v)).flatten()
            };
            let mut m = self.seed_runs[0].base_metrics.clone();
            m.unwanted_rate = est(&|b| b.unwanted_rate.map(|e| e.value));
            m.kl_ideal = est(&|b| b.kl_ideal.map(|e| e.value));
            m.kl_control = est(&|b| b.kl_control.map(|e| e.value));
            m.heldout_perplexity = est(&|b| b.heldout_perplexity).map(|e| e.value);
            self.base_metrics = m;
        }
        let base_rate = self.base_metrics.unwanted_rate.map(|e| e.value);
        self.matched_rates = match base_rate {
            Some(r) => self.config.matched_fractions.iter().map(|f| f * r).collect(),
            None => vec![],
        };

        // Frontiers and scores.
        let methods: Vec<Method> = self.config.sweeps.iter().map(|s| s.method).collect();
        let seeds: Vec<u64> = self.seed_runs.iter().map(|s| s.seed).collect();
        let fractions = self.config.matched_fractions.clone();
        let mut summary = Vec::new();
        for &method in &methods {
            let mean_pts: Vec<(usize, (f64, f64))> = self
                .aggregates
                .iter()
                .enumerate()
                .filter(|(_, a)| a.method == method)
                .filter_map(|(i, a)| Some((i, (a.unwanted_rate?.value, a.kl_ideal?.value))))
                .collect();
            let front = pareto_front(&mean_pts.iter().map(|x| x.1).collect::<Vec<_>>());
            let frontier = front
                .iter()
                .filter_map(|f| mean_pts.iter().filter(|x| x.1 == *f).map(|x| x.0).next())
                .collect();
            let mut kl_at: Vec<Vec<Option<f64>>> = vec![Vec::new(); fractions.len()];
            let mut areas = Vec::new();
            for (si, &seed) in seeds.iter().enumerate() {
                let sr = &self.seed_runs[si].base_metrics;
                let pts: Vec<(f64, f64)> = self
                    .points
                    .iter()
                    .filter(|p| p.method == method && p.seed == seed && p.error.is_none())
                    .filter_map(|p| {
                        Some((p.metrics.unwanted_rate?.value, p.metrics.kl_ideal?.value))
                    })
                    .collect();
                let front = pareto_front(&pts);
                let (b_rate, b_kl) =
                    (sr.unwanted_rate.map(|e| e.value), sr.kl_ideal.map(|e| e.value));
                for (k, f) in fractions.iter().enumerate() {
                    kl_at[k].push(b_rate.and_then(|r| kl_at_rate(&front, f * r)));
                }
                areas.push(match (b_rate, b_kl) {
                    (Some(r), Some(k)) => area(&front, r, AREA_CAP_OVER_BASE_KL * k),
                    _ => None,
                });
            }
            summary.push(MethodSummary {
                method,
                frontier,
                kl_at_matched: kl_at.into_iter().map(score_of).collect(),
                area: score_of(areas),
            });
        }
        for k in 0..fractions.len() {
            mark_best(&mut summary, |m| &mut m.kl_at_matched[k]);
        }
        mark_best(&mut summary, |m| &mut m.area);
        self.summary = summary;
    }
}

fn score_of(per_seed: Vec<Option<f64>>) -> Score {
    let mean =
        per_seed.iter().copied().collect::<Option<Vec<f64>>>().and_then(|v| Estimate::mean_of(&v));
    Score { per_seed, mean, best: false, vs_best: None, within_noise: None }
}

/// Marks the method with the lowest mean score and each other's paired difference to it.
fn mark_best(summary: &mut [MethodSummary], score: impl Fn(&mut MethodSummary) -> &mut Score) {
    let best = summary
        .iter_mut()
        .enumerate()
        .filter_map(|(i, m)| Some((i, score(m).mean?.value)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|x| x.0);
    let Some(best) = best else { return };
    let best_seeds: Vec<f64> =
        score(&mut summary[best]).per_seed.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    score(&mut summary[best]).best = true;
    for (i, m) in summary.iter_mut().enumerate() {
        let s = score(m);
        if i == best || s.mean.is_none() {
            continue;
        }
        let diffs: Vec<f64> =
            s.per_seed.iter().zip(&best_seeds).map(|(a, b)| a.unwrap_or(f64::NAN) - b).collect();
        s.vs_best = Estimate::mean_of(&diffs);
        s.within_noise = s.vs_best.filter(|d| d.se.is_finite()).map(|d| d.value <= 2.0 * d.se);
    }
}

/// Progress reports of a comparison (the CLI draws progress bars with
/// [`crate::progress::TerminalProgress`]). Runs may train in parallel, so progress is counted
/// in units of work (one per training step and one per evaluation), which also gives the ETA.
pub trait Progress {
    /// A phase began (`"training the base model"`, …).
    fn phase(&self, message: &str);
    /// The sweep begins: `points` points to produce, `work` units of work in all.
    fn sweep_started(&self, points: usize, work: u64);
    /// `units` more units of work are done.
    fn advance(&self, units: u64);
    /// A point finished: the `index`-th of `total` (in finishing order).
    fn point_finished(&self, index: usize, total: usize, result: &PointResult);
    /// Everything finished.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str) {}
    fn sweep_started(&self, _: usize, _: u64) {}
    fn advance(&self, _: u64) {}
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

/// One seed's data and evaluator.
struct SeedCtx {
    seed: u64,
    data: TrainingData,
    pair_data: Option<TrainingData>,
    evaluator: Evaluator,
}

/// One training run (or ProFS edit): its points are the checkpoints of `cfg.grid.steps`.
#[derive(Debug, Clone, Copy)]
struct Job {
    seed_index: usize,
    method: Method,
    strength: f64,
    lr: Option<f64>,
}

enum Event {
    Advance(u64),
    Point(Box<PointResult>),
    Warning(String),
}

/// What a run's cached points are keyed by: everything that determines them.
#[derive(Serialize)]
struct RunKey<'a> {
    format: u32,
    version: &'static str,
    base: &'a str,
    task: &'a SuppressionTask,
    sampling: &'a SamplingConfig,
    eval: &'a EvalConfig,
    budget: &'a Budget,
    checkpoints: &'a [usize],
    regime: Regime,
    method: Method,
    strength: f64,
    lr: Option<f64>,
    seed: u64,
    profs_layers: &'a Option<std::ops::Range<usize>>,
    /// The version of the logit-lens view ProFS runs record (0 for the other methods; older
    /// cached ProFS runs lack it or mark other tokens).
    #[serde(skip_serializing_if = "is_zero")]
    profs_lens: u32,
}

/// The version of ProFS's logit-lens view in cached runs.
const PROFS_LENS_VERSION: u32 = 2;

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// A cached run: its key's hash and its points.
#[derive(Serialize, Deserialize)]
struct CachedRun {
    key: String,
    points: Vec<PointResult>,
}

/// Where finished runs are cached, and whether they are read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointCache {
    /// The folder (created when the first run finishes).
    pub dir: PathBuf,
    /// Read finished runs back (`false`: recompute every run, still writing the cache).
    pub resume: bool,
}

impl PointCache {
    /// A cache in `dir` that resumes.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PointCache { dir: dir.into(), resume: true }
    }
}

/// The default point cache: `${AMEND_CACHE_DIR:-~/.cache/amend}/compare-points`, resuming.
pub fn default_point_cache() -> PointCache {
    PointCache::new(amend_models::recipe::default_cache_dir().join("compare-points"))
}

/// What identifies the base model's weights: its directory and the names, sizes and
/// modification times of the files in it.
fn base_identity(info: &BaseModelInfo) -> String {
    let mut id = info.dir.clone();
    if let Ok(rd) = std::fs::read_dir(&info.dir) {
        let mut files: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let t = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
                Some(format!("{}:{}:{}", e.file_name().to_string_lossy(), m.len(), t.as_nanos()))
            })
            .collect();
        files.sort();
        id.push('|');
        id.push_str(&files.join(","));
    }
    id
}

fn hex_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, renamed).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The checkpoints of `cfg.grid.steps`, sorted and deduplicated.
fn checkpoints(cfg: &CompareConfig) -> Result<Vec<usize>> {
    let mut c: Vec<usize> = cfg.grid.steps.iter().copied().filter(|&s| s > 0).collect();
    c.sort_unstable();
    c.dedup();
    let bad_lr = cfg.grid.learning_rates.iter().any(|lr| !(lr.is_finite() && *lr > 0.0));
    let trained = cfg.sweeps.iter().any(|s| !s.method.is_tuning_free());
    let invalid = |name: &str, reason: &str| crate::Error::InvalidInput {
        op: "run_comparison",
        name: name.into(),
        reason: reason.into(),
    };
    if trained && c.is_empty() {
        return Err(invalid("grid.steps", "needs at least one positive step count"));
    }
    if trained && (cfg.grid.learning_rates.is_empty() || bad_lr) {
        return Err(invalid("grid.learning_rates", "needs positive, finite learning rates"));
    }
    if cfg.seeds == 0 {
        return Err(invalid("seeds", "needs at least one seed"));
    }
    if cfg.matched_fractions.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        return Err(invalid("matched_fractions", "fractions of the base rate must be positive"));
    }
    Ok(c)
}

/// Runs one job on `base` (this worker's copy of the base model), reporting through `emit`.
fn run_job(
    base: &dyn CausalLm,
    job: Job,
    ctx: &SeedCtx,
    cfg: &CompareConfig,
    checkpoints: &[usize],
    measure_memory: bool,
    emit: &dyn Fn(Event),
) -> Vec<PointResult> {
    let data = match (&ctx.pair_data, cfg.regime.uses_pairs(job.method)) {
        (Some(p), true) => p,
        _ => &ctx.data,
    };
    let point = |steps: usize| PointResult {
        method: job.method,
        strength_name: job.method.strength_name().into(),
        strength: job.strength,
        lr: job.lr,
        steps,
        seed: ctx.seed,
        metrics: PointMetrics::default(),
        train: TrainStats::default(),
        memory: MemoryStats::default(),
        error: None,
    };
    let before = if measure_memory { memory::current_rss_bytes() } else { None };
    let can_reset = measure_memory && memory::reset_peak_rss();
    let mem = || MemoryStats {
        rss_before_bytes: before,
        peak_rss_bytes: if can_reset { memory::peak_rss_bytes() } else { None },
    };
    let evaluate = |p: &mut PointResult, model: &dyn CausalLm| {
        match ctx.evaluator.evaluate(model) {
            Ok(m) => p.metrics = m,
            Err(e) => p.error = Some(error_chain(&e)),
        }
        p.memory = mem();
        emit(Event::Advance(1));
        emit(Event::Point(Box::new(p.clone())));
    };
    let Some(lr) = job.lr else {
        // ProFS: one edit, one evaluation.
        let mut p = point(0);
        let edited = crate::methods::profs_rank(job.strength)
            .and_then(|k| profs_method(base, data, k, cfg.profs_layers.clone(), ctx.seed));
        emit(Event::Advance(1));
        match edited {
            Ok((model, stats)) => {
                p.train = stats;
                evaluate(&mut p, &*model);
            }
            Err(e) => {
                p.error = Some(error_chain(&e));
                emit(Event::Advance(1));
                emit(Event::Point(Box::new(p.clone())));
            }
        }
        return vec![p];
    };
    let max_steps = checkpoints.last().copied().unwrap_or(0);
    let budget = Budget { steps: max_steps, lr, ..cfg.budget.clone() };
    let mut points = Vec::with_capacity(checkpoints.len());
    let mut done_steps = 0;
    let run = train_method_checkpoints(
        base,
        data,
        job.method,
        job.strength,
        &budget,
        checkpoints,
        ctx.seed,
        &mut |s, _| {
            done_steps = s;
            emit(Event::Advance(1));
        },
        &mut |steps, model, stats| {
            let mut p = point(steps);
            p.train = stats.clone();
            evaluate(&mut p, model);
            points.push(p);
            Ok(())
        },
    );
    if let Err(e) = run {
        // The checkpoints the run did not reach fail with its error.
        let msg = error_chain(&e);
        emit(Event::Advance((max_steps - done_steps) as u64));
        for &c in &checkpoints[points.len()..] {
            let mut p = point(c);
            p.error = Some(msg.clone());
            p.memory = mem();
            emit(Event::Advance(1));
            emit(Event::Point(Box::new(p.clone())));
            points.push(p);
        }
    }
    points
}

/// Runs the comparison of `cfg.sweeps` on `task` from the base model `base`: for every
/// training seed, every method × strength × learning rate is trained once and evaluated at
/// every step count of the grid (ProFS: edited once per rank), then each setting is averaged
/// over seeds and each method's frontier and scores are computed.
///
/// With `point_cache`, every finished run's points are stored there under a hash of
/// everything that determines them (base model files, task, sampling, evaluation, budget,
/// grid, regime, method, strength, learning rate, seed), and a run whose hash is there is read
/// back instead of trained: an interrupted comparison resumes where it stopped.
///
/// Points that fail (for example with a non-finite loss) are recorded with their error and the
/// comparison goes on.
///
/// # Errors
/// [`crate::Error::InvalidInput`] for an empty grid, no seeds, or the `pairs` regime without an
/// unwanted-word list; errors of sampling the training data and of the evaluator (no usable
/// data, model errors).
pub fn run_comparison(
    base: &dyn CausalLm,
    base_info: BaseModelInfo,
    task: &SuppressionTask,
    cfg: &CompareConfig,
    point_cache: Option<&PointCache>,
    progress: &dyn Progress,
) -> Result<CompareResults> {
    let t0 = Instant::now();
    if let Some(n) = cfg.threads {
        amend_models::machine::set_threads(i64::from(n))?;
    }
    let cfg = &fit_lengths(base, task, cfg)?;
    let checkpoints = checkpoints(cfg)?;
    if cfg.regime == Regime::Pairs && task.detector.is_none() {
        return Err(crate::Error::InvalidInput {
            op: "run_comparison",
            name: "regime".into(),
            reason: "the pairs regime needs the task's unwanted-word list".into(),
        });
    }
    let overall_peak = memory::reset_peak_rss();
    let mut ctxs = Vec::with_capacity(cfg.seeds);
    let mut seed_runs = Vec::with_capacity(cfg.seeds);
    let (mut data_seconds, mut eval_setup_seconds) = (0.0, 0.0);
    for i in 0..cfg.seeds {
        let seed = cfg.seed.wrapping_add(i as u64);
        let of = if cfg.seeds > 1 { format!(" (seed {seed})") } else { String::new() };
        progress.phase(&format!("sampling and annotating training data from the base model{of}"));
        let data = sample_training_data(base, task, &cfg.sampling, seed, &|m| progress.phase(m))?;
        data_seconds += data.stats.seconds;
        let pair_data = match (&task.detector, cfg.regime) {
            (Some(det), Regime::Pairs) => {
                Some(crate::pairs::minimal_pair_data(base, &data, det, seed)?)
            }
            _ => None,
        };
        progress.phase(&format!("sampling the base model for the metrics{of}"));
        let t_eval = Instant::now();
        let evaluator = Evaluator::new(base, task, cfg.eval.clone(), seed.wrapping_add(1000))?;
        let base_metrics = evaluator.evaluate(base)?;
        eval_setup_seconds += t_eval.elapsed().as_secs_f64();
        seed_runs.push(SeedRun {
            seed,
            data: data.stats.clone(),
            pair_data: pair_data.as_ref().map(|d| d.stats.clone()),
            base_facts: evaluator.base_facts().clone(),
            base_metrics,
            skipped: evaluator.skipped().to_vec(),
        });
        ctxs.push(SeedCtx { seed, data, pair_data, evaluator });
    }

    // The jobs, in report order.
    let mut jobs = Vec::new();
    for seed_index in 0..cfg.seeds {
        for sweep in &cfg.sweeps {
            for &strength in &sweep.values {
                if sweep.method.is_tuning_free() {
                    jobs.push(Job { seed_index, method: sweep.method, strength, lr: None });
                } else {
                    for &lr in &cfg.grid.learning_rates {
                        jobs.push(Job { seed_index, method: sweep.method, strength, lr: Some(lr) });
                    }
                }
            }
        }
    }
    let max_steps = checkpoints.last().copied().unwrap_or(0) as u64;
    let work_of = |j: &Job| if j.lr.is_some() { max_steps + checkpoints.len() as u64 } else { 2 };
    let points_of = |j: &Job| if j.lr.is_some() { checkpoints.len() } else { 1 };
    let total_points: usize = jobs.iter().map(points_of).sum();
    let total_work: u64 = jobs.iter().map(work_of).sum();

    // The point cache.
    let base_id = base_identity(&base_info);
    let key_of = |j: &Job| {
        let key = RunKey {
            format: RESULTS_FORMAT,
            version: env!("CARGO_PKG_VERSION"),
            base: &base_id,
            task,
            sampling: &cfg.sampling,
            eval: &cfg.eval,
            budget: &cfg.budget,
            checkpoints: if j.lr.is_some() { &checkpoints } else { &[] },
            regime: if cfg.regime.uses_pairs(j.method) { cfg.regime } else { Regime::Sampled },
            method: j.method,
            strength: j.strength,
            lr: j.lr,
            seed: ctxs[j.seed_index].seed,
            profs_layers: &cfg.profs_layers,
            profs_lens: if j.lr.is_none() { PROFS_LENS_VERSION } else { 0 },
        };
        hex_hash(&serde_json::to_vec(&key).unwrap_or_default())
    };
    let keys: Vec<String> = jobs.iter().map(key_of).collect();
    let file_of = |i: usize| {
        point_cache.map(|c| c.dir.join(format!("{}-{}.json", jobs[i].method.id(), &keys[i][..20])))
    };
    let mut finished: Vec<Option<Vec<PointResult>>> = (0..jobs.len())
        .map(|i| {
            if !point_cache.is_some_and(|c| c.resume) {
                return None;
            }
            let bytes = std::fs::read(file_of(i)?).ok()?;
            let run: CachedRun = serde_json::from_slice(&bytes).ok()?;
            (run.key == keys[i] && run.points.len() == points_of(&jobs[i])).then_some(run.points)
        })
        .collect();
    let cached_runs = finished.iter().filter(|f| f.is_some()).count();
    let pending: Vec<usize> = (0..jobs.len()).filter(|&i| finished[i].is_none()).collect();

    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
    .clamp(1, pending.len().max(1));
    let measure_memory = workers == 1;
    progress.sweep_started(total_points, total_work);
    let mut warnings = Vec::new();
    let mut done_points = 0;
    for (i, f) in finished.iter().enumerate() {
        if let Some(points) = f {
            progress.advance(work_of(&jobs[i]));
            for p in points {
                done_points += 1;
                progress.point_finished(done_points, total_points, p);
            }
        }
    }
    let store = |i: usize, points: &[PointResult]| -> Option<String> {
        let path = file_of(i)?;
        if points.iter().any(|p| p.error.is_some()) {
            return None; // failed runs are retried by the next comparison
        }
        let run = CachedRun { key: keys[i].clone(), points: points.to_vec() };
        let bytes = serde_json::to_vec(&run).ok()?;
        write_atomic(&path, &bytes)
            .err()
            .map(|e| format!("could not cache a finished run in {}: {e}", path.display()))
    };
    let t_points = Instant::now();
    if workers == 1 {
        let warnings_cell = std::cell::RefCell::new(Vec::new());
        let done = std::cell::Cell::new(done_points);
        let emit = |e: Event| match e {
            Event::Advance(n) => progress.advance(n),
            Event::Point(p) => {
                done.set(done.get() + 1);
                progress.point_finished(done.get(), total_points, &p);
            }
            Event::Warning(w) => warnings_cell.borrow_mut().push(w),
        };
        for &i in &pending {
            let j = jobs[i];
            let points = run_job(base, j, &ctxs[j.seed_index], cfg, &checkpoints, true, &emit);
            if let Some(w) = store(i, &points) {
                emit(Event::Warning(w));
            }
            finished[i] = Some(points);
        }
        warnings.extend(warnings_cell.into_inner());
    } else {
        let mut copies = Vec::with_capacity(workers);
        for _ in 0..workers {
            copies.push(base.boxed_copy()?);
        }
        let next = AtomicUsize::new(0);
        let slots: Mutex<Vec<Option<Vec<PointResult>>>> = Mutex::new(vec![None; jobs.len()]);
        let (tx, rx) = mpsc::channel::<Event>();
        std::thread::scope(|sc| {
            for model in copies {
                let tx = tx.clone();
                let (next, slots, jobs, ctxs, pending) = (&next, &slots, &jobs, &ctxs, &pending);
                let (checkpoints, store) = (&checkpoints, &store);
                sc.spawn(move || {
                    let emit = |e: Event| {
                        // The receiver lives until every worker is done.
                        let _ = tx.send(e);
                    };
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = pending.get(k) else { break };
                        let j = jobs[i];
                        let ctx = &ctxs[j.seed_index];
                        let points =
                            run_job(&*model, j, ctx, cfg, checkpoints, measure_memory, &emit);
                        if let Some(w) = store(i, &points) {
                            emit(Event::Warning(w));
                        }
                        if let Ok(mut s) = slots.lock() {
                            s[i] = Some(points);
                        }
                    }
                });
            }
            drop(tx);
            for e in rx {
                match e {
                    Event::Advance(n) => progress.advance(n),
                    Event::Point(p) => {
                        done_points += 1;
                        progress.point_finished(done_points, total_points, &p);
                    }
                    Event::Warning(w) => warnings.push(w),
                }
            }
        });
        let slots = slots.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, s) in slots.into_iter().enumerate() {
            if s.is_some() {
                finished[i] = s;
            }
        }
    }
    let points_seconds = t_points.elapsed().as_secs_f64();
    let points: Vec<PointResult> = finished.into_iter().flatten().flatten().collect();
    if points.len() != total_points {
        return Err(crate::Error::InvalidInput {
            op: "run_comparison",
            name: "workers".into(),
            reason: format!("a worker stopped early ({} of {total_points} points)", points.len()),
        });
    }
    let first = &seed_runs[0];
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
            data_seconds,
            eval_setup_seconds,
            points_seconds,
            total_seconds: base_info.seconds + t0.elapsed().as_secs_f64(),
            runs: jobs.len(),
            cached_runs,
            workers,
            peak_rss_bytes: if overall_peak { memory::peak_rss_bytes() } else { None },
        },
        base_model: base_info,
        data: first.data.clone(),
        base_facts: first.base_facts.clone(),
        base_metrics: first.base_metrics.clone(),
        skipped: first.skipped.clone(),
        seed_runs,
        points,
        aggregates: vec![],
        matched_rates: vec![],
        summary: vec![],
        warnings,
    };
    results.summarise();
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
/// `model_cache` or trains it there, and calls [`run_comparison`] (with `point_cache`).
///
/// # Errors
/// Errors of the task, the base-model recipe and [`run_comparison`].
pub fn run_synthetic(
    cfg: &CompareConfig,
    model_cache: &std::path::Path,
    point_cache: Option<&PointCache>,
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
    run_comparison(&model, info, &synthetic.suppression_task(), cfg, point_cache, progress)
}
