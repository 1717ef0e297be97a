//! A diagnostic timeline: labelled instants on the monotonic clock, which every process of the
//! machine shares (time namespaces aside), so that the marks of a migration's source and of
//! its destination agent line up. Recorded only when `FERRY_TIMELINE` is set.

use std::sync::{Mutex, OnceLock};

static MARKS: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());

/// Whether marks are recorded (`FERRY_TIMELINE` set).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRY_TIMELINE").is_some())
}

/// Milliseconds on CLOCK_MONOTONIC.
pub fn now_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6)
        .unwrap_or(0.0)
}

/// Records `label()` now, if enabled (the label is built only then).
pub fn mark(label: impl FnOnce() -> String) {
    if enabled() {
        let t = now_ms();
        MARKS.lock().unwrap().push((label(), t));
    }
}

/// The marks recorded so far, oldest first; the record starts empty again.
pub fn take() -> Vec<(String, f64)> {
    std::mem::take(&mut *MARKS.lock().unwrap())
}
