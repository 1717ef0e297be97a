//! Scheduling of Ferry's own threads.

/// Threads held on one CPU, each with the CPU mask it had, put back on drop.
///
/// A ptrace round trip wakes the tracee, then the tracer. On different CPUs each wakeup may
/// have to bring a halted virtual CPU back (tens of microseconds on a microVM); on one CPU it
/// is a plain switch. Injected syscalls, hundreds of them in a dump or a restore, are such
/// round trips.
pub struct Pinned {
    saved: Vec<(i32, libc::cpu_set_t)>,
}

std::thread_local! {
    /// While the calling thread is pinned: its own mask, and the one-CPU mask.
    static PINNED: std::cell::Cell<Option<(libc::cpu_set_t, libc::cpu_set_t)>> =
        const { std::cell::Cell::new(None) };
}

fn set_mask(tid: i32, m: &libc::cpu_set_t) {
    // SAFETY: the kernel reads `m`, a valid cpu_set_t.
    unsafe {
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), m);
    }
}

/// Run `f` with the calling thread on its own CPU mask again, if it is pinned: for work that
/// wants every CPU (threads it spawns inherit the mask), such as writing pages.
pub fn unpinned<R>(f: impl FnOnce() -> R) -> R {
    let Some((own, one)) = PINNED.with(|p| p.get()) else {
        return f();
    };
    set_mask(0, &own);
    let r = f();
    set_mask(0, &one);
    r
}

impl Pinned {
    /// Hold the calling thread and `tids` on the CPU the caller runs on now. Threads that
    /// cannot be moved (gone, or not ours to move) are left as they are.
    pub fn here(tids: &[i32]) -> Pinned {
        // SAFETY: sched_getcpu has no arguments and no memory effects.
        let cpu = unsafe { libc::sched_getcpu() };
        let mut saved = Vec::new();
        if cpu < 0 {
            return Pinned { saved };
        }
        // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET writes inside `one`; cpu is a CPU number the kernel gave us.
        unsafe { libc::CPU_SET(cpu as usize, &mut one) };
        for &tid in std::iter::once(&0).chain(tids) {
            // SAFETY: as above.
            let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let sz = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: the kernel writes at most `sz` bytes into `old` and reads `one`.
            let ok = unsafe {
                libc::sched_getaffinity(tid, sz, &mut old) == 0
                    && libc::sched_setaffinity(tid, sz, &one) == 0
            };
            if ok {
                if tid == 0 {
                    PINNED.with(|p| p.set(Some((old, one))));
                }
                saved.push((tid, old));
            }
        }
        Pinned { saved }
    }

    /// Threads made since (they inherited the pinned mask): on drop they get the mask the
    /// caller had.
    pub fn adopt(&mut self, tids: &[i32]) {
        let Some(&(_, mask)) = self.saved.iter().find(|(t, _)| *t == 0) else {
            return;
        };
        for &tid in tids {
            if !self.saved.iter().any(|(t, _)| *t == tid) {
                self.saved.push((tid, mask));
            }
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.saved.iter().any(|(t, _)| *t == 0) {
            PINNED.with(|p| p.set(None));
        }
        for (tid, old) in self.saved.drain(..).rev() {
            set_mask(tid, &old);
        }
    }
}

/// Run process `pid` (one thread) only when a CPU has nothing else to do (SCHED_IDLE), or
/// back as usual (SCHED_OTHER). For work done ahead, such as making memory resident, that
/// must not take CPU time from the workloads beside it.
pub fn set_idle(pid: i32, idle: bool) -> crate::Result<()> {
    let p = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: sched_setscheduler reads `p` only, which outlives the call.
    let rc = unsafe { libc::sched_setscheduler(pid, policy, &p) };
    if rc != 0 {
        return Err(crate::Error::io(
            format!("setting the scheduling policy of process {pid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Lower the calling thread to the lowest nice level (19): for cleanup that must not take
/// CPU time from the workloads beside it (freeing a GiB of memory costs ~0.1-0.2 s of
/// kernel time here).
pub fn background_thread() {
    // SAFETY: gettid and setpriority take integers only; they change this thread's nice level.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(tid: i32) -> usize {
        let st = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let l = st
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        l.split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    }

    #[test]
    fn pinned_threads_share_one_cpu_and_get_their_masks_back() {
        // SAFETY: gettid has no memory effects.
        let me = unsafe { libc::gettid() };
        let before = cpus(me);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            // SAFETY: as above.
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        {
            let mut p = Pinned::here(&[tid]);
            assert_eq!(cpus(me), 1);
            assert_eq!(cpus(tid), 1);
            // Work that wants every CPU gets the thread's own mask for a while.
            assert_eq!(unpinned(|| cpus(me)), before);
            assert_eq!(cpus(me), 1);
            // A thread made while pinned inherits the one CPU; adopted, it gets ours back.
            let (tx2, rx2) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let late = std::thread::spawn(move || {
                // SAFETY: as above.
                tx2.send(unsafe { libc::gettid() }).unwrap();
                stop_rx.recv().unwrap();
            });
            let late_tid = rx2.recv().unwrap();
            assert_eq!(cpus(late_tid), 1);
            p.adopt(&[late_tid]);
            drop(p);
            assert_eq!(cpus(late_tid), before);
            stop_tx.send(()).unwrap();
            late.join().unwrap();
        }
        assert_eq!(cpus(me), before);
        assert_eq!(cpus(tid), before);
        done_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
