//! [`TerminalProgress`]: progress bars on a terminal, one line per finished point otherwise.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::compare::{PointResult, Progress};

/// Progress on stderr: on a terminal an overall bar over the sweep points and a bar over the
/// current point's training steps, with each finished point printed above them; otherwise
/// (logs, CI) one line per phase and per finished point.
#[derive(Debug)]
pub struct TerminalProgress {
    multi: MultiProgress,
    tty: bool,
    bars: RefCell<Option<(ProgressBar, ProgressBar)>>,
    spinner: RefCell<Option<ProgressBar>>,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    /// Progress on stderr.
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        TerminalProgress {
            multi: MultiProgress::with_draw_target(target),
            tty,
            bars: RefCell::new(None),
            spinner: RefCell::new(None),
        }
    }

    fn line(&self, msg: &str) {
        if self.tty {
            // A failed write to the terminal is not worth stopping a comparison for.
            let _ = self.multi.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }

    fn stop_spinner(&self) {
        if let Some(s) = self.spinner.borrow_mut().take() {
            s.finish_and_clear();
            self.multi.remove(&s);
        }
    }
}

/// `"unwanted 0.176 ± 0.017, KL(p*‖p_new) 0.210 ± 0.018"` for a finished point.
pub fn point_summary(p: &PointResult) -> String {
    if let Some(e) = &p.error {
        return format!("{}: FAILED: {e}", p.label());
    }
    let m = &p.metrics;
    let mut parts = Vec::new();
    if let Some(r) = m.unwanted_rate {
        parts.push(format!("unwanted {:.3} ± {:.3}", r.value, r.se));
    }
    if let Some(k) = m.kl_ideal {
        parts.push(format!("KL(p*‖p_new) {:.3} ± {:.3}", k.value, k.se));
    }
    if let Some(k) = m.kl_control {
        parts.push(format!("KL control {:.3}", k.value));
    }
    if let Some(u) = m.unwanted_token_logprob {
        parts.push(format!("unwanted-token log p {:.2}", u.value));
    }
    format!(
        "{}: {} ({:.1} s train, {:.1} s eval)",
        p.label(),
        parts.join(", "),
        p.train.seconds,
        m.eval_seconds
    )
}

impl Progress for TerminalProgress {
    fn phase(&self, message: &str) {
        self.stop_spinner();
        if self.tty {
            let s = self.multi.add(ProgressBar::new_spinner());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                s.set_style(style);
            }
            s.set_message(message.to_string());
            s.enable_steady_tick(Duration::from_millis(120));
            *self.spinner.borrow_mut() = Some(s);
        } else {
            eprintln!("{message}");
        }
    }

    fn point_started(&self, index: usize, total: usize, label: &str, steps: usize) {
        self.stop_spinner();
        let mut bars = self.bars.borrow_mut();
        let (overall, current) = bars.get_or_insert_with(|| {
            let overall = self.multi.add(ProgressBar::new(total as u64));
            if let Ok(style) = ProgressStyle::with_template(
                "points {bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
            ) {
                overall.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
            }
            let current = self.multi.add(ProgressBar::new(steps as u64));
            if let Ok(style) =
                ProgressStyle::with_template("{msg:<28} {bar:30.green/white} {pos}/{len} steps")
            {
                current.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
            }
            (overall, current)
        });
        overall.set_position(index as u64 - 1);
        current.set_length(steps as u64);
        current.set_position(0);
        current.set_message(label.to_string());
    }

    fn step(&self, step: usize, _loss: f64) {
        if let Some((_, current)) = self.bars.borrow().as_ref() {
            current.set_position(step as u64);
        }
    }

    fn evaluating(&self) {
        if let Some((_, current)) = self.bars.borrow().as_ref() {
            let label = current.message();
            current.set_message(format!("{label} (evaluating)"));
        }
    }

    fn point_finished(&self, index: usize, total: usize, result: &PointResult) {
        if let Some((overall, _)) = self.bars.borrow().as_ref() {
            overall.set_position(index as u64);
        }
        let width = total.to_string().len();
        self.line(&format!("[{index:>width$}/{total}] {}", point_summary(result)));
    }

    fn finish(&self) {
        self.stop_spinner();
        if let Some((overall, current)) = self.bars.borrow_mut().take() {
            current.finish_and_clear();
            overall.finish_and_clear();
        }
    }
}
