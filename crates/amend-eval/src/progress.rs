//! [`TerminalProgress`]: progress bars on a terminal, one line per finished point otherwise.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::compare::{PointResult, Progress};

/// Progress on stderr: on a terminal one bar over the sweep's work (training steps and
/// evaluations of every run, parallel runs included) with its ETA, each finished point printed
/// above it; otherwise (logs, CI) one line per phase and per finished point.
#[derive(Debug)]
pub struct TerminalProgress {
    multi: MultiProgress,
    tty: bool,
    bar: RefCell<Option<ProgressBar>>,
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
            bar: RefCell::new(None),
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
        return format!("{} {}, seed {}: FAILED: {e}", p.method.name(), p.setting(), p.seed);
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
        "{} {}, seed {}: {} ({:.1} s train, {:.1} s eval)",
        p.method.name(),
        p.setting(),
        p.seed,
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

    fn sweep_started(&self, points: usize, work: u64) {
        self.stop_spinner();
        if !self.tty {
            eprintln!("{points} points to evaluate");
            return;
        }
        let bar = self.multi.add(ProgressBar::new(work));
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:<14} {bar:36.cyan/blue} {percent:>3}% [{elapsed_precise} < {eta_precise}]",
        ) {
            bar.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
        }
        bar.set_message(format!("0/{points} points"));
        *self.bar.borrow_mut() = Some(bar);
    }

    fn advance(&self, units: u64) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.inc(units);
        }
    }

    fn point_finished(&self, index: usize, total: usize, result: &PointResult) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.set_message(format!("{index}/{total} points"));
        }
        let width = total.to_string().len();
        self.line(&format!("[{index:>width$}/{total}] {}", point_summary(result)));
    }

    fn finish(&self) {
        self.stop_spinner();
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}
