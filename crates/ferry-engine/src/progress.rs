//! Progress of the long phases (the memory of a dump, the pages of a restore), for a caller
//! that shows it: the CLI draws a bar when stderr is a terminal.

use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Dump: bytes of memory read from the tree so far; the total is an estimate (the
    /// resident anonymous and shared memory of the tree), which the count may pass.
    Memory,
    /// Restore: bytes of pages written into the new processes; the total is exact.
    Pages,
}

type Callback = dyn Fn(Phase, u64, u64) + Send + Sync;

/// A callback taking (phase, bytes done, bytes expected); none by default.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Callback>>);

impl Progress {
    pub fn new(f: impl Fn(Phase, u64, u64) + Send + Sync + 'static) -> Progress {
        Progress(Some(Arc::new(f)))
    }

    pub fn report(&self, phase: Phase, done: u64, total: u64) {
        if let Some(f) = &self.0 {
            f(phase, done, total);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(callback)"
        } else {
            "Progress(none)"
        })
    }
}
