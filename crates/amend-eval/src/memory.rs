//! Peak resident memory of this process (Linux `/proc/self/status`).
//!
//! [`reset_peak_rss`] writes `5` to `/proc/self/clear_refs`, which resets the kernel's
//! high-water mark `VmHWM` to the current resident set size; [`peak_rss_bytes`] reads `VmHWM`
//! afterwards. The numbers are the resident memory of the whole process (libtorch, both models,
//! the data, allocator caches), not only of the measured step: compare them between methods,
//! and read [`current_rss_bytes`] before a step to see the increment. On other systems (or when
//! `/proc` is not writable) the functions return `false` / `None`.

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
    })
}

/// Resets the peak resident set size (`VmHWM`) to the current one. Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size since the process started or the last [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM").map(|k| k * 1024)
}

/// Current resident set size in bytes.
pub fn current_rss_bytes() -> Option<u64> {
    status_kib("VmRSS").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_tracks_a_large_allocation() {
        let before = current_rss_bytes().unwrap();
        assert!(peak_rss_bytes().unwrap() >= before);
        let reset = reset_peak_rss();
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let peak = peak_rss_bytes().unwrap();
        drop(v);
        assert!(peak >= before + (60 << 20), "peak {peak} before {before}");
        if reset {
            // After a reset the mark drops back to (about) the current size.
            assert!(reset_peak_rss());
            assert!(peak_rss_bytes().unwrap() < peak);
        }
    }
}
