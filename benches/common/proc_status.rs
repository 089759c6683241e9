//! Peak-RSS measurement of one step, shared by `benches/peak_mem.rs` and `benches/peers.rs`.
//! tch exposes no CPU allocator statistics, so a child process resets its peak RSS
//! (`/proc/self/clear_refs`, Linux ≥ 4.0), reads `VmRSS`, runs one step and reads `VmHWM`.

/// A field of `/proc/self/status` in KiB (`"VmRSS:"`, `"VmHWM:"`).
pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

/// Resets `VmHWM` to the current RSS and returns `VmRSS` in KiB, so that allocations made while
/// preparing a step's inputs do not count.
pub fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    status_kib("VmRSS:")
}
