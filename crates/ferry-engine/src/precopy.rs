//! Pre-copy: track the writes of a running tree and copy its memory in rounds while it runs,
//! so that the final, frozen dump carries only what changed since the last round.
//!
//! Every private writable mapping and private file mapping present when tracking starts is
//! registered for asynchronous write-protection (userfaultfd WP_ASYNC); each round's
//! PAGEMAP_SCAN returns the pages written since the previous one (in a file mapping, the
//! private copies, never the file's own pages) and re-arms them. Mappings created later are
//! registered by the next round, which sends their present pages (a server that grows its
//! heap or a hash table while it moves would otherwise send all of it while frozen); a
//! mapping put where a registered one was (the kernel then refuses the scan) is registered
//! again and the scan retried. Mappings that could not be registered count as untracked: the
//! final dump carries them whole. A page discarded with MADV_DONTNEED shows as written, and the
//! final dump sends it as zeros, so a stale copy never survives.

use crate::memory::Delta;
use crate::{EngineError, Result};
use ferry_sys::uffd::WriteTracker;
use ferry_sys::{procfs, Frozen};
use std::collections::HashMap;

/// Largest run read and handed over at once.
const RUN: u64 = 4 << 20;

/// Receives each run of pages: (pid, address, bytes).
pub type SendFn<'a> = dyn FnMut(i32, u64, &[u8]) -> Result<()> + 'a;

/// A last scan under way: the written page runs it finds.
type LastScanJob = std::thread::JoinHandle<ferry_sys::Result<Vec<(u64, u64)>>>;

pub struct Tracking {
    trackers: HashMap<i32, WriteTracker>,
    buf: Vec<u8>,
    /// Per process, the pages sent so far: a page the kernel reports written that reads as
    /// zero is sent only if an older copy of it was (a discarded page); memory never touched
    /// shows as written too, and sending its zeros would make the destination allocate it.
    sent: HashMap<i32, crate::lazy::RangeSet>,
    /// The last scans, started at the freeze (`start_last_scans`).
    last: HashMap<i32, LastScanJob>,
    /// Only private file mappings are tracked (`start_files`).
    files_only: bool,
}

/// The tree of `pid` as it is now (no freezing): the root and its descendants.
pub fn tree_of(pid: i32) -> Vec<i32> {
    let mut v = vec![pid];
    let mut i = 0;
    while i < v.len() {
        for tid in procfs::list_threads(v[i]).unwrap_or_default() {
            let s = std::fs::read_to_string(format!("/proc/{}/task/{tid}/children", v[i]))
                .unwrap_or_default();
            for c in s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()) {
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
        i += 1;
    }
    v
}

/// Private memory that may hold pages of its own: writable, or a private file mapping made
/// read-only after it was written (RELRO). Tracking the latter costs nothing (it is never
/// written again) and keeps its pages out of the final copy.
fn trackable(m: &procfs::Mapping) -> bool {
    use ferry_sys::MapKind as K;
    !m.shared
        && match m.kind {
            K::Anonymous | K::Heap | K::Stack => m.write,
            K::File { .. } => true,
            _ => false,
        }
}

/// What a tracking follows: every trackable mapping, or only the file ones.
fn tracks(files_only: bool, m: &procfs::Mapping) -> bool {
    trackable(m) && (!files_only || is_file(m))
}

fn is_file(m: &procfs::Mapping) -> bool {
    matches!(m.kind, ferry_sys::MapKind::File { .. })
}

fn register(t: &mut WriteTracker, m: &procfs::Mapping) -> ferry_sys::Result<()> {
    if is_file(m) {
        t.register_file(m.start, m.end)
    } else {
        t.register(m.start, m.end)
    }
}

/// `runs` sorted, overlapping and touching ones merged.
fn normalize(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    // Each registered range's runs come in order: most often, all of them do.
    if !runs.is_sorted() {
        runs.sort_unstable();
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The runs (offset, length) of `chunk`, read at `addr`, to send: every page that holds data,
/// and the zero pages that `sent` has an older copy of.
fn worth_sending(chunk: &[u8], addr: u64, sent: &crate::lazy::RangeSet) -> Vec<(usize, usize)> {
    const PAGE: usize = 4096;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for off in (0..chunk.len()).step_by(PAGE) {
        let page = &chunk[off..(off + PAGE).min(chunk.len())];
        let keep = !ferry_sys::mem::is_zero(page) || sent.contains(addr + off as u64);
        if !keep {
            continue;
        }
        match out.last_mut() {
            Some(l) if l.0 + l.1 == off => l.1 += page.len(),
            _ => out.push((off, page.len())),
        }
    }
    out
}

impl Tracking {
    /// Start tracking every process of the tree of `pid`. Each is frozen for the time it
    /// takes to create its userfaultfd and register its mappings (well under a millisecond
    /// per process), then runs on.
    pub fn start(pid: i32) -> Result<Tracking> {
        Self::start_with(pid, false)
    }

    /// Track only the private file mappings of the tree of `pid` (their pages that the
    /// program wrote: its libraries' data and relocations): post-copy sends them ahead of the
    /// freeze, as they are not filled lazily, and leaves the rest for later.
    pub fn start_files(pid: i32) -> Result<Tracking> {
        Self::start_with(pid, true)
    }

    fn start_with(pid: i32, files_only: bool) -> Result<Tracking> {
        let mut trackers = HashMap::new();
        for p in tree_of(pid) {
            let mut f = match Frozen::freeze(p) {
                Ok(f) => f,
                Err(ferry_sys::Error::NoSuchProcess(_)) | Err(ferry_sys::Error::Zombie(_)) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let mut t = WriteTracker::new(&mut f)?;
            for m in procfs::read_maps(p)?
                .iter()
                .filter(|m| tracks(files_only, m))
            {
                // A mapping the kernel will not track is simply sent whole at the end.
                let _ = register(&mut t, m);
            }
            trackers.insert(p, t);
        }
        if trackers.is_empty() {
            return Err(EngineError::Failed(format!(
                "process {pid}: nothing to track (it exited?)"
            )));
        }
        Ok(Tracking {
            trackers,
            buf: vec![0u8; RUN as usize],
            sent: HashMap::new(),
            last: HashMap::new(),
            files_only,
        })
    }

    /// One round: read the pages written since the last round (the first round: every page
    /// present) from the running processes and hand them to `send(pid, address, bytes)`.
    /// Returns the bytes sent.
    pub fn round(&mut self, send: &mut SendFn) -> Result<u64> {
        let mut total = 0;
        let pids: Vec<i32> = self.trackers.keys().copied().collect();
        for pid in pids {
            // New mappings since the last round: tracked from now on, sent whole by this scan.
            let maps = procfs::read_maps(pid).unwrap_or_default();
            let maps: Vec<&procfs::Mapping> =
                maps.iter().filter(|m| tracks(self.files_only, m)).collect();
            let t = self.trackers.get_mut(&pid).unwrap();
            for m in maps.iter().copied() {
                if !t.covers(m.start, m.end) {
                    let _ = register(t, m);
                }
            }
            let scanned = t.written_all().or_else(|_| {
                // A mapping replaced in place is not registered, and the failed scan may have
                // re-armed pages it never reported: start over on the current layout, which
                // sends this process's present memory again.
                let now: Vec<(u64, u64, bool)> =
                    maps.iter().map(|m| (m.start, m.end, is_file(m))).collect();
                t.reset_to(&now);
                t.written_all()
            });
            let runs = match scanned {
                Ok(r) => r,
                // A process that exited during pre-copy is no longer part of the tree.
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                    self.trackers.remove(&pid);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for (s, e) in runs {
                let mut a = s;
                while a < e {
                    let len = (e - a).min(RUN) as usize;
                    let chunk = &mut self.buf[..len];
                    let got = ferry_sys::mem::read_mem(pid, a, chunk)?;
                    if got < len {
                        // Unmapped meanwhile: the final dump sees the new layout.
                        chunk[got..].fill(0);
                    }
                    let sent = self.sent.entry(pid).or_default();
                    for (off, n) in worth_sending(chunk, a, sent) {
                        send(pid, a + off as u64, &chunk[off..off + n])?;
                        let (s, e) = (a + off as u64, a + (off + n) as u64);
                        // Pages sent before, mostly: nothing to add.
                        if !sent.covers(s, e) {
                            sent.insert(s, e);
                        }
                        total += n as u64;
                    }
                    a += len as u64;
                }
            }
        }
        Ok(total)
    }

    /// Bytes written since the last round, without consuming them (an estimate for the
    /// convergence decision is the previous round's size; this is exact but costs a scan).
    pub fn pids(&self) -> Vec<i32> {
        self.trackers.keys().copied().collect()
    }

    /// For the final dump, with the tree frozen: what process `pid` had tracked (mappings
    /// still registered) and what was written there since the last round.
    pub fn delta(&mut self, pid: i32, smaps: &[procfs::SmapsEntry]) -> Result<Option<Delta>> {
        let Some(t) = self.trackers.get_mut(&pid) else {
            return Ok(None);
        };
        let dirty = match self.last.remove(&pid).map(|h| h.join()) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => {
                return Err(EngineError::Failed(format!(
                    "the last scan of process {pid}'s written pages panicked"
                )))
            }
            None => t.written_all_last()?,
        };
        ferry_sys::timeline::mark(|| "last scan joined".into());
        // In address order, each page once: a mapping that grew is registered again over
        // its old range, so two registered ranges may overlap.
        let dirty = normalize(dirty);
        let regs = t.ranges().to_vec();
        // Still registered: the kernel shows "uw" in VmFlags.
        let tracked = smaps
            .iter()
            .filter(|s| s.vm_flags.iter().any(|f| f == "uw"))
            .filter(|s| regs.iter().any(|&(a, b)| a <= s.start && s.end <= b))
            .map(|s| (s.start, s.end))
            .collect();
        Ok(Some(Delta {
            tracked,
            dirty,
            lazy: false,
            eager: Vec::new(),
        }))
    }

    /// With the tree just frozen: start each process's last scan of written pages on a thread
    /// of its own, beside the dump's collection (which runs on one CPU); `delta` takes its
    /// result. Nothing writes the processes' memory from now on but injected syscalls,
    /// whose output lands below the stack's red zone, where nothing lives.
    pub fn start_last_scans(&mut self) {
        for (&pid, t) in &self.trackers {
            if let Ok(scan) = t.last_scan() {
                self.last
                    .insert(pid, std::thread::spawn(move || scan.run()));
            }
        }
    }

    /// Stop tracking (the processes' memory behaves as before).
    pub fn stop(self) {
        for (_, t) in self.trackers {
            t.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_sending;

    #[test]
    fn written_runs_from_overlapping_ranges_come_once_in_order() {
        let runs = vec![
            (0x5000, 0x6000),
            (0x1000, 0x3000),
            (0x2000, 0x4000),
            (0x4000, 0x5000),
        ];
        assert_eq!(super::normalize(runs), vec![(0x1000, 0x6000)]);
        assert_eq!(
            super::normalize(vec![(0x3000, 0x4000), (0x1000, 0x2000)]),
            vec![(0x1000, 0x2000), (0x3000, 0x4000)]
        );
    }

    #[test]
    fn zero_pages_are_sent_only_over_an_older_copy() {
        let mut chunk = vec![0u8; 5 * 4096];
        chunk[0] = 1; // data
        chunk[2 * 4096 + 9] = 1; // data
        let mut sent = crate::lazy::RangeSet::default();
        // Page 3 was sent before and reads as zero now (discarded): it goes again.
        sent.insert(0x10000 + 3 * 4096, 0x10000 + 4 * 4096);
        assert_eq!(
            worth_sending(&chunk, 0x10000, &sent),
            vec![(0, 4096), (2 * 4096, 2 * 4096)]
        );
        assert!(worth_sending(&[0u8; 8192], 0, &Default::default()).is_empty());
    }
}
