//! A small trainer generic over the loss: the caller's closure runs the micro-batches of one
//! optimizer step and back-propagates through [`Step::backward`]; the trainer does everything
//! around it (train mode, learning-rate schedule, gradient clipping, AdamW, metrics log,
//! progress bar, checkpoints).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::Tensor;

use super::optim::{AdamW, AdamWConfig, clip_grad_norm};
use super::schedule::{LrSchedule, ScheduleKind};
use crate::model::{CausalLm, SaveOptions};
use crate::{Error, Result};

/// Optimizer state file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint directory.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Trainer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Optimizer steps of the run.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warm-up.
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// Clip the global gradient norm to this value (`None`: no clipping; the norm is still
    /// logged).
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step, passed to the step closure as
    /// [`Step::accum_steps`]; the closure decides how to use it.
    pub grad_accum_steps: usize,
    /// Write a metrics line every this many steps (0: never).
    pub log_every: usize,
    /// JSONL metrics file (one object per logged step), created or truncated at the start.
    pub metrics_path: Option<PathBuf>,
    /// Save a checkpoint every this many steps (needs `checkpoint_dir`).
    pub checkpoint_every: Option<usize>,
    /// Directory of `checkpoint-<step>` folders.
    pub checkpoint_dir: Option<PathBuf>,
    /// Show a progress bar on stderr (only drawn on a terminal).
    pub progress: bool,
    /// Seed of libtorch's RNG (dropout), set when the trainer is created.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            lr: 1e-3,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            optimizer: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            grad_accum_steps: 1,
            log_every: 1,
            metrics_path: None,
            checkpoint_every: None,
            checkpoint_dir: None,
            progress: true,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule of this config.
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            kind: self.schedule,
            peak_lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

/// What the step closure sees: the step's index and learning rate, and [`Step::backward`].
#[derive(Debug)]
pub struct Step {
    index: usize,
    accum_steps: usize,
    lr: f64,
    loss: f64,
    backward_calls: usize,
    tokens: usize,
    metrics: BTreeMap<String, (f64, f64)>,
}

impl Step {
    /// 0-based index of the optimizer step.
    pub fn index(&self) -> usize {
        self.index
    }

    /// [`TrainConfig::grad_accum_steps`].
    pub fn accum_steps(&self) -> usize {
        self.accum_steps
    }

    /// Learning rate this step will use.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Back-propagates a scalar loss, accumulating gradients; its value is added to the step's
    /// logged loss. Call it once per micro-batch with that micro-batch's share of the step loss
    /// (e.g. `LossOutput::normalized_by(global_counts)`, or `mean_loss / accum_steps`): the step
    /// minimises the sum of what is passed here. Returns the value.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a non-scalar tensor; [`Error::Tch`].
    pub fn backward(&mut self, loss: &Tensor) -> Result<f64> {
        if loss.numel() != 1 {
            return Err(Error::invalid(
                "Step::backward",
                "loss",
                format!("expected a scalar, got {:?}", loss.size()),
            ));
        }
        let v = loss.f_double_value(&[])?;
        loss.f_backward()?;
        self.loss += v;
        self.backward_calls += 1;
        Ok(v)
    }

    /// Records a metric as a `(sum, count)` pair; the logged value is Σsum / Σcount over the step.
    pub fn record(&mut self, name: &str, sum: f64, count: f64) {
        let e = self.metrics.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += count;
    }

    /// Counts training tokens (for the tokens/s figure).
    pub fn add_tokens(&mut self, n: usize) {
        self.tokens += n;
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based number of the step just taken.
    pub step: usize,
    /// Sum of the values passed to [`Step::backward`].
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens counted with [`Step::add_tokens`].
    pub tokens: usize,
    /// Recorded metrics (Σsum / Σcount).
    pub metrics: BTreeMap<String, f64>,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Totals of a [`Trainer::fit`] run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps taken in this call.
    pub steps: usize,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Mean loss over the last `min(10, steps)` steps.
    pub tail_loss: f64,
    /// Tokens counted.
    pub tokens: usize,
    /// Wall time.
    pub seconds: f64,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
}

/// A JSONL metrics file: one JSON object per line, flushed after each line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates (or truncates) `path`, creating its parent directory.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let f = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(f) })
    }

    /// Appends one object.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`].
    pub fn write(&mut self, record: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(|source| Error::Json { path: self.path.clone(), source })?;
        self.out.write_all(b"\n").map_err(|e| Error::io(&self.path, e))?;
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// The trainer.
///
/// ```
/// use amend_models::train::{causal_lm_loss_sum, TrainConfig, Trainer};
/// use amend_models::{load, CausalLm, LoadOptions};
/// use amend_models::tokenizer::{pad_batch, PaddingSide};
/// # let dir = "tests/fixtures/models/gpt2"; // a tiny random GPT-2
/// let mut model = load(dir, &LoadOptions::default())?;
/// let batch = pad_batch(&[vec![5, 6, 7, 8], vec![9, 10]], 0, PaddingSide::Right, tch::Device::Cpu)?;
/// let cfg = TrainConfig { steps: 3, lr: 1e-3, progress: false, ..Default::default() };
/// let mut trainer = Trainer::new(&model, cfg)?;
/// let summary = trainer.fit(&mut model, |model, step| {
///     // One micro-batch per step; with several, divide each sum by the step's total count.
///     let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask))?;
///     let (sum, count) = causal_lm_loss_sum(&logits, &batch.input_ids, Some(&batch.attention_mask))?;
///     step.backward(&sum.f_div_scalar(count)?)?;
///     step.add_tokens(count as usize);
///     Ok(())
/// })?;
/// assert_eq!(summary.steps, 3);
/// # Ok::<(), amend_models::Error>(())
/// ```
#[derive(Debug)]
pub struct Trainer {
    cfg: TrainConfig,
    opt: AdamW,
    schedule: LrSchedule,
    step: usize,
    log: Option<MetricsLog>,
    bar: ProgressBar,
    tokens: usize,
    started: Instant,
}

impl Trainer {
    /// A trainer over the trainable parameters of `model`; seeds libtorch's RNG with
    /// `cfg.seed` and opens the metrics log.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for invalid settings or no trainable parameter; [`Error::Io`].
    pub fn new<M: CausalLm + ?Sized>(model: &M, cfg: TrainConfig) -> Result<Self> {
        if cfg.checkpoint_every.is_some_and(|n| n == 0)
            || (cfg.checkpoint_every.is_some() && cfg.checkpoint_dir.is_none())
        {
            return Err(Error::invalid(
                "Trainer::new",
                "checkpoint_every",
                "needs a positive value and checkpoint_dir",
            ));
        }
        if !(cfg.lr.is_finite() && cfg.lr >= 0.0) {
            return Err(Error::invalid("Trainer::new", "lr", format!("{}", cfg.lr)));
        }
        if let Some(m) = cfg.max_grad_norm
            && (m.is_nan() || m <= 0.0)
        {
            return Err(Error::invalid(
                "Trainer::new",
                "max_grad_norm",
                format!("{m} must be > 0"),
            ));
        }
        tch::manual_seed(cfg.seed as i64);
        let opt = AdamW::new(model.params(), cfg.optimizer.clone())?;
        let log = cfg.metrics_path.as_deref().map(MetricsLog::create).transpose()?;
        let bar = if cfg.progress {
            let bar =
                ProgressBar::with_draw_target(Some(cfg.steps as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        let schedule = cfg.lr_schedule();
        Ok(Trainer { cfg, opt, schedule, step: 0, log, bar, tokens: 0, started: Instant::now() })
    }

    /// Optimizer steps taken (including those restored by [`Trainer::resume`]).
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// One optimizer step: zero gradients, run `f` (which calls [`Step::backward`] once per
    /// micro-batch), clip, step AdamW at the scheduled learning rate, log.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `f` never called `backward`; [`Error::NonFinite`] for a NaN or
    /// infinite loss or gradient norm (the parameters are left unchanged); errors of `f`.
    pub fn step<M, F>(&mut self, model: &mut M, f: F) -> Result<StepReport>
    where
        M: CausalLm + ?Sized,
        F: FnOnce(&M, &mut Step) -> Result<()>,
    {
        let t0 = Instant::now();
        let was_training = model.is_training();
        model.set_training(true);
        self.opt.zero_grad()?;
        let lr = self.schedule.lr_at(self.step);
        let mut st = Step {
            index: self.step,
            accum_steps: self.cfg.grad_accum_steps.max(1),
            lr,
            loss: 0.0,
            backward_calls: 0,
            tokens: 0,
            metrics: BTreeMap::new(),
        };
        let r = f(model, &mut st);
        model.set_training(was_training);
        r?;
        if st.backward_calls == 0 {
            return Err(Error::invalid(
                "Trainer::step",
                "closure",
                "the step closure never called Step::backward",
            ));
        }
        if !st.loss.is_finite() {
            self.opt.zero_grad()?;
            return Err(Error::NonFinite { step: self.step + 1, what: "loss", value: st.loss });
        }
        let params: Vec<&Tensor> = self.opt.params().map(|(_, t)| t).collect();
        let grad_norm = clip_grad_norm(params, self.cfg.max_grad_norm.unwrap_or(f64::INFINITY))?;
        if !grad_norm.is_finite() {
            self.opt.zero_grad()?;
            return Err(Error::NonFinite {
                step: self.step + 1,
                what: "grad_norm",
                value: grad_norm,
            });
        }
        self.opt.step(lr)?;
        self.step += 1;
        self.tokens += st.tokens;
        let report = StepReport {
            step: self.step,
            loss: st.loss,
            lr,
            grad_norm,
            tokens: st.tokens,
            metrics: st
                .metrics
                .iter()
                .map(|(k, &(s, c))| (k.clone(), if c > 0.0 { s / c } else { 0.0 }))
                .collect(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        if self.cfg.log_every > 0
            && (self.step.is_multiple_of(self.cfg.log_every) || self.step == self.cfg.steps)
        {
            self.write_log(&report)?;
        }
        self.bar.set_position(self.step as u64);
        self.bar.set_message(format!("loss {:.4} lr {:.2e}", report.loss, lr));
        Ok(report)
    }

    fn write_log(&mut self, r: &StepReport) -> Result<()> {
        let Some(log) = &mut self.log else { return Ok(()) };
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut rec = json!({
            "step": r.step,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "tokens_per_s": if r.seconds > 0.0 { r.tokens as f64 / r.seconds } else { 0.0 },
            "step_s": r.seconds,
            "elapsed_s": elapsed,
        });
        for (k, v) in &r.metrics {
            rec[k] = json!(v);
        }
        log.write(&rec)
    }

    /// Runs steps until [`TrainConfig::steps`] are done, saving checkpoints as configured.
    ///
    /// # Errors
    /// As [`Trainer::step`]; errors of saving checkpoints.
    pub fn fit<M, F>(&mut self, model: &mut M, mut f: F) -> Result<TrainSummary>
    where
        M: CausalLm + ?Sized,
        F: FnMut(&M, &mut Step) -> Result<()>,
    {
        let t0 = Instant::now();
        let start = self.step;
        let mut losses = Vec::new();
        let mut tokens = 0;
        let mut checkpoints = Vec::new();
        while self.step < self.cfg.steps {
            let r = self.step(model, &mut f)?;
            losses.push(r.loss);
            tokens += r.tokens;
            if let (Some(every), Some(dir)) =
                (self.cfg.checkpoint_every, self.cfg.checkpoint_dir.clone())
                && self.step.is_multiple_of(every)
            {
                checkpoints.push(
                    self.save_checkpoint(model, &dir.join(format!("checkpoint-{}", self.step)))?,
                );
            }
        }
        self.bar.finish();
        let tail = &losses[losses.len().saturating_sub(10)..];
        Ok(TrainSummary {
            steps: self.step - start,
            final_loss: losses.last().copied().unwrap_or(f64::NAN),
            tail_loss: if tail.is_empty() {
                f64::NAN
            } else {
                tail.iter().sum::<f64>() / tail.len() as f64
            },
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
            checkpoints,
        })
    }

    /// Writes `dir` atomically: the model as a Hugging Face directory plus
    /// [`OPTIMIZER_FILE`] and [`TRAINER_STATE_FILE`] (step, config). An existing `dir` is
    /// replaced.
    ///
    /// # Errors
    /// Errors of [`CausalLm::save_pretrained`]; [`Error::Tch`].
    pub fn save_checkpoint<M: CausalLm + ?Sized>(&self, model: &M, dir: &Path) -> Result<PathBuf> {
        let state = self.opt.state_tensors()?;
        let tmp = tempfile::NamedTempFile::new().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        Tensor::write_safetensors(&state, tmp.path())?;
        let opt_bytes = std::fs::read(tmp.path()).map_err(|e| Error::io(tmp.path(), e))?;
        let trainer_state = json!({ "step": self.step, "tokens": self.tokens, "config": self.cfg });
        let mut extra = BTreeMap::new();
        extra.insert(OPTIMIZER_FILE.to_string(), opt_bytes);
        extra.insert(
            TRAINER_STATE_FILE.to_string(),
            serde_json::to_vec_pretty(&trainer_state)
                .map_err(|source| Error::Json { path: dir.join(TRAINER_STATE_FILE), source })?,
        );
        model
            .save_pretrained(dir, &SaveOptions { overwrite: true, dtype: None, extra_files: extra })
    }

    /// Restores the optimizer state and step count from a checkpoint directory written by
    /// [`Trainer::save_checkpoint`]. Load the model from the same directory first (e.g. with
    /// [`load`](crate::load)) and build the trainer on it.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`]; as [`AdamW::load_state_tensors`].
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: state_path.clone(), source })?;
        let step = v["step"]
            .as_u64()
            .ok_or_else(|| Error::config(&state_path, "step", "missing or not an integer"))?;
        self.opt.load(&dir.join(OPTIMIZER_FILE))?;
        self.step = step as usize;
        self.tokens = v["tokens"].as_u64().unwrap_or(0) as usize;
        self.bar.set_position(self.step as u64);
        Ok(())
    }
}

/// Mean next-token cross-entropy of `logits` on `input_ids` over positions where `mask` (of the
/// *target* token) is 1, returned as `(sum, count)` so callers can normalise over gradient
/// accumulation exactly.
///
/// # Shapes
/// `logits: [b_sz, seq_len, vocab]`, `input_ids`, `mask: [b_sz, seq_len]` → `sum: []` (f32,
/// with graph), `count`.
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::Tch`].
pub fn causal_lm_loss_sum(
    logits: &Tensor,
    input_ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, f64)> {
    let op = "causal_lm_loss_sum";
    let (ls, is) = (logits.size(), input_ids.size());
    if ls.len() != 3 || is.len() != 2 || ls[..2] != is[..] || ls[1] < 2 {
        return Err(Error::ShapeMismatch {
            op,
            expected: vec![is.first().copied().unwrap_or(0), is.get(1).copied().unwrap_or(0), -1],
            got: ls,
        });
    }
    if let Some(m) = mask
        && m.size() != is
    {
        return Err(Error::ShapeMismatch { op, expected: is, got: m.size() });
    }
    let (b, t, v) = (ls[0], ls[1], ls[2]);
    // Targets are the ids shifted left, with the ignore index at the last position, so the
    // logits are used in place (no copy of `logits[:, :-1]`).
    let pred = logits.f_reshape([b * t, v])?;
    let pred =
        if pred.f_kind()? == tch::Kind::Float { pred } else { pred.f_to_kind(tch::Kind::Float)? };
    let ids = input_ids.f_to_kind(tch::Kind::Int64)?;
    let last = ids.f_narrow(1, 0, 1)?.f_full_like(-100)?;
    let mut targets = Tensor::f_cat(&[&ids.f_narrow(1, 1, t - 1)?, &last], 1)?;
    let count = match mask {
        None => (b * (t - 1)) as f64,
        Some(m) => {
            let keep = m.f_narrow(1, 1, t - 1)?.f_ne(0)?;
            let keep = Tensor::f_cat(&[&keep, &last.f_ne(-100)?], 1)?;
            // Masking by selection: padded targets become the ignore index.
            targets = targets.f_where_scalarother(&keep, -100)?;
            keep.f_sum(tch::Kind::Int64)?.f_int64_value(&[])? as f64
        }
    };
    let targets = targets.f_reshape([b * t])?;
    let sum =
        pred.f_cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0)?;
    Ok((sum, count))
}
