//! The agent's copy of a migrating tree's memory during pre-copy: pages in a file of the
//! state directory, indexed by (pid, address); a page sent again replaces the older copy. At
//! restore it hands the pages of each process's still-tracked memory to the engine, which
//! writes them before the final image's newer ones.
//!
//! The index is a map of extents (runs of pages stored in consecutive slots), not of pages:
//! pre-copy sends memory in long runs, so a GiB is a few thousand extents, and deciding what
//! is valid at the freeze walks those, not a quarter of a million pages.

use crate::{io, Result};
use ferry_engine::BasePages;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// Pages [start, end) of one process, stored from slot `slot` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    end: u64,
    slot: u64,
}

/// Where to start walking `map` for extents that reach `a` or beyond: the start of the
/// extent holding `a`, if one does.
fn first_from(map: &BTreeMap<u64, Extent>, a: u64) -> u64 {
    map.range(..=a)
        .next_back()
        .filter(|(_, e)| e.end > a)
        .map(|(&s, _)| s)
        .unwrap_or(a)
}

pub struct PageStore {
    file: std::fs::File,
    path: PathBuf,
    /// Per process: extents by start address, never overlapping.
    extents: HashMap<i32, BTreeMap<u64, Extent>>,
    next: u64,
    /// Per process, the memory whose stored pages are still valid (from the final image).
    tracked: HashMap<i32, Vec<(u64, u64)>>,
    /// Per process, runs of the valid pages held (computed once, at `set_tracked`).
    held: HashMap<i32, Vec<(u64, u64)>>,
    /// Processes given pages after `set_tracked` (`Shared::absorb`): their `held` is computed
    /// again when next asked, once, not after every put.
    late: std::collections::HashSet<i32>,
}

impl PageStore {
    /// Create the store, or take the one reserved for the migration (`reserve`).
    pub fn create(path: &Path) -> Result<PageStore> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io(format!("creating {}", path.display())))?;
        Ok(PageStore {
            file,
            path: path.to_path_buf(),
            extents: HashMap::new(),
            next: 0,
            tracked: HashMap::new(),
            held: HashMap::new(),
            late: Default::default(),
        })
    }

    /// Allocate `bytes` of disk for a store at `path` ahead of time, so that a full disk shows
    /// before anything is frozen.
    pub fn reserve(path: &Path, bytes: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(path);
            return Err(io(format!(
                "reserving {} MiB for the pages in {}",
                bytes >> 20,
                path.display()
            ))(e));
        }
        Ok(())
    }

    /// Bytes of distinct pages held.
    pub fn bytes(&self) -> u64 {
        self.extents
            .values()
            .flat_map(|m| m.iter().map(|(s, e)| e.end - s))
            .sum()
    }

    fn write_at(&self, data: &[u8], slot: u64) -> Result<()> {
        self.file
            .write_all_at(data, slot * PAGE)
            .map_err(io(format!("writing pages to {}", self.path.display())))
    }

    /// Store a run of pages of process `pid` starting at `addr`: pages held already are
    /// overwritten in their slots, the others appended.
    pub fn put(&mut self, pid: i32, addr: u64, data: &[u8]) -> Result<()> {
        let end = addr + data.len() as u64 / PAGE * PAGE;
        let map = self.extents.entry(pid).or_default();
        // Pieces of [addr, end): Some(slot) where held, None for gaps.
        let mut pieces: Vec<(u64, u64, Option<u64>)> = Vec::new();
        let mut at = addr;
        for (&s, e) in map.range(first_from(map, addr)..end) {
            if s > at {
                pieces.push((at, s, None));
            }
            let (ps, pe) = (s.max(at), e.end.min(end));
            pieces.push((ps, pe, Some(e.slot + (ps - s) / PAGE)));
            at = pe;
        }
        if at < end {
            pieces.push((at, end, None));
        }
        for (s, e, slot) in pieces {
            let bytes = &data[(s - addr) as usize..(e - addr) as usize];
            match slot {
                Some(slot) => self.write_at(bytes, slot)?,
                None => {
                    let slot = self.next;
                    self.write_at(bytes, slot)?;
                    self.next += (e - s) / PAGE;
                    let map = self.extents.get_mut(&pid).unwrap();
                    // Grow the extent just before when it ends here in the slot just before.
                    let prev = map
                        .range(..s)
                        .next_back()
                        .filter(|(ps, pe)| pe.end == s && pe.slot + (s - *ps) / PAGE == slot)
                        .map(|(&ps, _)| ps);
                    match prev {
                        Some(ps) => map.get_mut(&ps).unwrap().end = e,
                        None => {
                            map.insert(s, Extent { end: e, slot });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// From the final image: per process, the memory whose stored pages are still valid.
    pub fn set_tracked(&mut self, tracked: HashMap<i32, Vec<(u64, u64)>>) {
        self.tracked = tracked;
        for r in self.tracked.values_mut() {
            r.sort_unstable();
        }
        self.held.clear();
        let pids: Vec<i32> = self.tracked.keys().copied().collect();
        for pid in pids {
            self.update_held(pid);
        }
    }

    /// Runs of the valid pages of `pid` held, again (after `set_tracked` or more pages).
    fn update_held(&mut self, pid: i32) {
        let Some(ranges) = self.tracked.get(&pid) else {
            return;
        };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (s, e) in self.valid(pid, 0, u64::MAX, ranges) {
            match runs.last_mut() {
                Some(l) if l.1 == s.0 => l.1 = e,
                _ => runs.push((s.0, e)),
            }
        }
        self.held.insert(pid, runs);
    }

    /// Valid stored pieces of `pid` inside [from, to), in address order: ((start, slot), end).
    fn valid(&self, pid: i32, from: u64, to: u64, ranges: &[(u64, u64)]) -> Vec<((u64, u64), u64)> {
        let mut out = Vec::new();
        let Some(map) = self.extents.get(&pid) else {
            return out;
        };
        let mut r = ranges.partition_point(|&(_, e)| e <= from);
        for (&s, x) in map.range(first_from(map, from)..to) {
            let (s0, e0) = (s.max(from), x.end.min(to));
            while r < ranges.len() && ranges[r].1 <= s0 {
                r += 1;
            }
            let mut k = r;
            while k < ranges.len() && ranges[k].0 < e0 {
                let (a, b) = (s0.max(ranges[k].0), e0.min(ranges[k].1));
                if a < b {
                    out.push(((a, x.slot + (a - s) / PAGE), b));
                }
                k += 1;
            }
        }
        out
    }

    fn read_at(&self, buf: &mut [u8], slot: u64) -> ferry_engine::Result<()> {
        self.file.read_exact_at(buf, slot * PAGE).map_err(|e| {
            ferry_engine::EngineError::Failed(format!(
                "reading the pre-copied pages from {}: {e}",
                self.path.display()
            ))
        })
    }
}

/// The store as the restore uses it: it may take back pages that a warm process held alone
/// (`BasePages::absorb`), after the valid ranges were set.
pub struct Shared(std::sync::Mutex<PageStore>);

impl Shared {
    pub fn new(s: PageStore) -> Shared {
        Shared(std::sync::Mutex::new(s))
    }
}

impl BasePages for Shared {
    fn held(&self, pid: i32) -> Vec<(u64, u64)> {
        let mut s = self.0.lock().unwrap();
        if s.late.remove(&pid) {
            s.update_held(pid);
        }
        s.held(pid)
    }

    fn valid(&self, pid: i32) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .unwrap()
            .tracked
            .get(&pid)
            .cloned()
            .unwrap_or_default()
    }

    fn read_into(&self, pid: i32, addr: u64, buf: &mut [u8]) -> ferry_engine::Result<()> {
        self.0.lock().unwrap().read_into(pid, addr, buf)
    }

    fn write_into(
        &self,
        pid: i32,
        write: &mut dyn FnMut(u64, &[u8]) -> ferry_engine::Result<()>,
    ) -> ferry_engine::Result<u64> {
        self.0.lock().unwrap().write_into(pid, write)
    }

    fn absorb(&self, pid: i32, addr: u64, data: &[u8]) -> ferry_engine::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.put(pid, addr, data)
            .map_err(|e| ferry_engine::EngineError::Failed(e.to_string()))?;
        s.late.insert(pid);
        Ok(())
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Its pages (all of them when the store was reserved ahead: a GiB or more on tmpfs)
        // are freed on a thread of low priority, a slice at a time, not by the caller (the
        // filler, whose report waits) and not all at once beside the moved process.
        if let Ok(f) = self.file.try_clone() {
            std::thread::spawn(move || {
                ferry_sys::sched::background_thread();
                const SLICE: u64 = 64 << 20;
                let mut len = f.metadata().map(|m| m.len()).unwrap_or(0);
                while len > SLICE {
                    len -= SLICE;
                    if f.set_len(len).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
        }
    }
}

impl BasePages for PageStore {
    fn held(&self, pid: i32) -> Vec<(u64, u64)> {
        self.held.get(&pid).cloned().unwrap_or_default()
    }

    fn read_into(&self, pid: i32, addr: u64, buf: &mut [u8]) -> ferry_engine::Result<()> {
        let Some(ranges) = self.tracked.get(&pid) else {
            return Ok(());
        };
        let end = addr + buf.len() as u64 / PAGE * PAGE;
        for ((s, slot), e) in self.valid(pid, addr, end, ranges) {
            self.read_at(&mut buf[(s - addr) as usize..(e - addr) as usize], slot)?;
        }
        Ok(())
    }

    fn write_into(
        &self,
        pid: i32,
        write: &mut dyn FnMut(u64, &[u8]) -> ferry_engine::Result<()>,
    ) -> ferry_engine::Result<u64> {
        let Some(ranges) = self.tracked.get(&pid) else {
            return Ok(0);
        };
        const MAX: u64 = 1 << 20;
        let mut buf = vec![0u8; MAX as usize];
        let mut pages = 0;
        for ((s, slot), e) in self.valid(pid, 0, u64::MAX, ranges) {
            let mut a = s;
            while a < e {
                let n = (e - a).min(MAX);
                self.read_at(&mut buf[..n as usize], slot + (a - s) / PAGE)?;
                write(a, &buf[..n as usize])?;
                a += n;
            }
            pages += (e - s) / PAGE;
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8, n: usize) -> Vec<u8> {
        vec![v; n * PAGE as usize]
    }

    fn read(s: &PageStore, pid: i32, addr: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0xeeu8; n * PAGE as usize];
        s.read_into(pid, addr, &mut b).unwrap();
        b.chunks(PAGE as usize).map(|c| c[0]).collect()
    }

    #[test]
    fn pages_sent_again_replace_older_ones_and_only_tracked_memory_counts() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = PageStore::create(&dir.join("p")).unwrap();
        let a = 0x10_0000u64;
        s.put(1, a, &page(1, 8)).unwrap();
        // Overlaps the end of the first run and goes beyond it.
        s.put(1, a + 6 * PAGE, &page(2, 4)).unwrap();
        // Inside, in the middle.
        s.put(1, a + 2 * PAGE, &page(3, 1)).unwrap();
        // A gap, then more.
        s.put(1, a + 12 * PAGE, &page(4, 2)).unwrap();
        s.put(2, a, &page(9, 2)).unwrap();
        assert_eq!(s.bytes(), 14 * PAGE);
        // Consecutive appends made one extent; the others stand apart.
        assert_eq!(s.extents[&1].len(), 2);
        let mut t = HashMap::new();
        t.insert(1, vec![(a + 12 * PAGE, a + 13 * PAGE), (a, a + 10 * PAGE)]);
        s.set_tracked(t);
        assert_eq!(
            read(&s, 1, a, 14),
            vec![1, 1, 3, 1, 1, 1, 2, 2, 2, 2, 0xee, 0xee, 4, 0xee]
        );
        // Process 2's memory is not tracked: its pages are no longer valid.
        assert_eq!(read(&s, 2, a, 2), vec![0xee, 0xee]);
        assert_eq!(
            s.held(1),
            vec![(a, a + 10 * PAGE), (a + 12 * PAGE, a + 13 * PAGE)]
        );
        let mut got = Vec::new();
        let n = s
            .write_into(1, &mut |addr, d| {
                got.push((addr, d.len() as u64 / PAGE, d[0]));
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 11);
        assert_eq!(got.iter().map(|g| g.1).sum::<u64>(), 11);
        assert!(got
            .iter()
            .any(|&(addr, _, v)| addr == a + 12 * PAGE && v == 4));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
