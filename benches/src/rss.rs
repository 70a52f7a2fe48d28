//! Resident memory of this process, from `/proc` (Linux; zeros elsewhere).

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Reset the peak resident set size to the current one (`/proc/self/clear_refs`).
pub fn reset_peak_rss() {
    // Writing 5 resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the process started or the last reset, KiB.
pub fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Current resident set size, KiB.
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}
