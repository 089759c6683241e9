//! Learning-rate schedules with linear warm-up, as transformers' `get_*_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScheduleKind {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to `min_lr_ratio · peak` at `total_steps`.
    Linear,
    /// Half-cosine decay to `min_lr_ratio · peak` at `total_steps`.
    #[default]
    Cosine,
}

/// A learning-rate schedule.
///
/// With `s` the 0-based index of the optimizer step, `w` the warm-up steps, `T` the total
/// steps and `r` the minimum ratio:
///
/// ```text
/// s < w:    lr = peak · s / w
/// linear:   lr = peak · (r + (1 − r) · max(0, (T − s) / (T − w)))
/// cosine:   lr = peak · (r + (1 − r) · ½(1 + cos(π · min(1, (s − w) / (T − w)))))
/// constant: lr = peak
/// ```
///
/// With `r = 0` these are exactly transformers' `get_linear_schedule_with_warmup`,
/// `get_cosine_schedule_with_warmup` and `get_constant_schedule_with_warmup` (so the first step
/// of a warm-up runs at lr 0, as there).
///
/// ```
/// use amend_models::train::{LrSchedule, ScheduleKind};
/// let s = LrSchedule { kind: ScheduleKind::Linear, peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, min_lr_ratio: 0.0 };
/// assert_eq!(s.lr_at(5), 5e-4);
/// assert!((s.lr_at(60) - 5e-4).abs() < 1e-12);
/// assert_eq!(s.lr_at(110), 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Shape after warm-up.
    pub kind: ScheduleKind,
    /// Learning rate at the end of warm-up.
    pub peak_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Final learning rate as a fraction of the peak (0 in transformers).
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return self.peak_lr * s / w.max(1.0);
        }
        let r = self.min_lr_ratio;
        let factor = match self.kind {
            ScheduleKind::Constant => return self.peak_lr,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = ((s - w) / (t - w).max(1.0)).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak_lr * (r + (1.0 - r) * factor)
    }
}
