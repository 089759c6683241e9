//! Training utilities: AdamW with weight-decay groups, learning-rate schedules with warm-up,
//! gradient clipping, a trainer generic over the loss (gradient accumulation, checkpoints, a
//! progress bar and a JSONL metrics log).
//!
//! The trainer does not know about losses: its step closure computes any loss (an amend loss, a
//! cross-entropy, …), calls [`Step::backward`] once per micro-batch, and records metrics. See
//! [`Trainer`] for an example.

mod optim;
mod schedule;
mod trainer;

pub use optim::{AdamW, AdamWConfig, DecayFilter, ParamGroup, clip_grad_norm};
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{
    MetricsLog, OPTIMIZER_FILE, Step, StepReport, TRAINER_STATE_FILE, TrainConfig, TrainSummary,
    Trainer, causal_lm_loss_sum,
};
