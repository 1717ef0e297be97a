//! Where the time of a dump or a restore goes, step by step.

use std::time::Instant;

/// Milliseconds per step, summed over processes, and `<step>_syscalls`: the syscalls injected
/// into the target during the step.
pub type Steps = std::collections::BTreeMap<String, f64>;

/// Times consecutive steps.
pub(crate) struct Lap(Instant, u64);

impl Lap {
    pub(crate) fn new() -> Lap {
        Lap(Instant::now(), ferry_sys::freeze::injected_syscalls())
    }

    pub(crate) fn mark(&mut self, steps: &mut Steps, name: &str) {
        let n = ferry_sys::freeze::injected_syscalls();
        *steps.entry(format!("{name}_syscalls")).or_default() += (n - self.1) as f64;
        self.1 = n;
        ferry_sys::timeline::mark(|| name.to_string());
        let now = Instant::now();
        *steps.entry(name.to_string()).or_default() += (now - self.0).as_secs_f64() * 1e3;
        self.0 = now;
    }
}
