//! SIGINT and SIGTERM: remove this run's unfinished outputs, then end as the signal would.
//!
//! Every output is assembled in a staging folder next to it and renamed into place when
//! complete (`amend::models::output`). Without a handler, a signal would end the process with
//! its staging folders still on disk; with it, a signal thread removes them (waiting for a
//! rename in progress, so an output is either complete or absent) and then re-raises the signal
//! with its default action, so the exit status still says "killed by SIGTERM". Staging folders
//! left by SIGKILL are removed by the next run that writes next to them.

/// Installs the handler (Unix; elsewhere a no-op).
pub fn install() {
    #[cfg(unix)]
    {
        use std::io::Write;

        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "cannot handle SIGINT/SIGTERM ({e}): an interrupted run may leave its \
                     .amend-tmp-* staging folder, removed by the next run"
                );
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("amend-signals".into()).spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let removed = amend::models::output::abandon_in_flight();
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                let what = if removed > 0 {
                    "removed the unfinished output"
                } else {
                    "no output was unfinished"
                };
                let _ = writeln!(std::io::stderr(), "amend: interrupted by {name}: {what}");
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                signal_hook::low_level::exit(128 + sig);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the signal thread ({e})");
        }
    }
}
