//! The agent's copy of a migrating tree's memory during pre-copy: pages in a file of the
//! state directory, indexed by (pid, address); a page sent again replaces the older copy. At
//! restore it hands the pages of each process's still-tracked memory to the engine, which
//! writes them before the final image's newer ones.

use crate::{io, Result};
use ferry_engine::BasePages;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

pub struct PageStore {
    file: std::fs::File,
    path: PathBuf,
    index: HashMap<(i32, u64), u64>,
    next: u64,
    /// Per process, the memory whose stored pages are still valid (from the final image).
    tracked: HashMap<i32, Vec<(u64, u64)>>,
    /// Per process, the addresses held, sorted as they arrive (so that `set_tracked`, in the
    /// downtime, only walks them).
    by_pid: HashMap<i32, std::collections::BTreeSet<u64>>,
    /// Per process, runs of the valid pages held (computed once, at `set_tracked`).
    held: HashMap<i32, Vec<(u64, u64)>>,
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
            index: HashMap::new(),
            next: 0,
            tracked: HashMap::new(),
            by_pid: HashMap::new(),
            held: HashMap::new(),
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
        self.index.len() as u64 * PAGE
    }

    /// Store a run of pages of process `pid` starting at `addr`.
    pub fn put(&mut self, pid: i32, addr: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64 / PAGE;
        let fresh = (0..n).all(|i| !self.index.contains_key(&(pid, addr + i * PAGE)));
        if fresh {
            // The common case: one write at the end of the file.
            let slot = self.next;
            self.file
                .write_all_at(&data[..(n * PAGE) as usize], slot * PAGE)
                .map_err(io(format!("writing pages to {}", self.path.display())))?;
            let set = self.by_pid.entry(pid).or_default();
            for i in 0..n {
                self.index.insert((pid, addr + i * PAGE), slot + i);
                set.insert(addr + i * PAGE);
            }
            self.next += n;
            return Ok(());
        }
        let mut next = self.next;
        let set = self.by_pid.entry(pid).or_default();
        for i in 0..n {
            set.insert(addr + i * PAGE);
        }
        let slots: Vec<u64> = (0..n)
            .map(|i| {
                *self.index.entry((pid, addr + i * PAGE)).or_insert_with(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        self.next = next;
        // Pages sent again usually sit in consecutive slots: one write per such run.
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            let p = &data[i * PAGE as usize..j * PAGE as usize];
            self.file
                .write_all_at(p, slots[i] * PAGE)
                .map_err(io(format!("writing pages to {}", self.path.display())))?;
            i = j;
        }
        Ok(())
    }

    pub fn set_tracked(&mut self, tracked: HashMap<i32, Vec<(u64, u64)>>) {
        self.tracked = tracked;
        // One pass over the index, then per process: sorted pages walked against the
        // sorted tracked ranges.
        self.held.clear();
        for (&pid, pages) in &self.by_pid {
            if !self.tracked.contains_key(&pid) {
                continue;
            }
            let mut ranges = self.tracked[&pid].clone();
            ranges.sort_unstable();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut r = 0;
            for &a in pages {
                while r < ranges.len() && ranges[r].1 <= a {
                    r += 1;
                }
                if r == ranges.len() {
                    break;
                }
                if a < ranges[r].0 {
                    continue;
                }
                match runs.last_mut() {
                    Some(l) if l.1 == a => l.1 += PAGE,
                    _ => runs.push((a, a + PAGE)),
                }
            }
            self.held.insert(pid, runs);
        }
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
        let n = buf.len() / PAGE as usize;
        let slot = |i: usize| {
            let a = addr + i as u64 * PAGE;
            if !ranges.iter().any(|&(s, e)| s <= a && a < e) {
                return None;
            }
            self.index.get(&(pid, a)).copied()
        };
        let mut i = 0;
        while i < n {
            let Some(first) = slot(i) else {
                i += 1;
                continue;
            };
            // Consecutive pages in consecutive slots: one read.
            let mut j = i + 1;
            while j < n && slot(j) == Some(first + (j - i) as u64) {
                j += 1;
            }
            self.file
                .read_exact_at(&mut buf[i * PAGE as usize..j * PAGE as usize], first * PAGE)
                .map_err(|e| {
                    ferry_engine::EngineError::Failed(format!(
                        "reading the pre-copied pages from {}: {e}",
                        self.path.display()
                    ))
                })?;
            i = j;
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
        let mut pages: Vec<(u64, u64)> = self
            .index
            .iter()
            .filter(|((p, a), _)| *p == pid && ranges.iter().any(|&(s, e)| s <= *a && *a < e))
            .map(|((_, a), s)| (*a, *s))
            .collect();
        pages.sort_unstable();
        let mut buf = vec![0u8; 1 << 20];
        let mut i = 0;
        while i < pages.len() {
            // A run of consecutive addresses stored in consecutive slots: one read.
            let mut j = i + 1;
            while j < pages.len()
                && j - i < buf.len() / PAGE as usize
                && pages[j].0 == pages[j - 1].0 + PAGE
                && pages[j].1 == pages[j - 1].1 + 1
            {
                j += 1;
            }
            let len = (j - i) * PAGE as usize;
            self.file
                .read_exact_at(&mut buf[..len], pages[i].1 * PAGE)
                .map_err(|e| {
                    ferry_engine::EngineError::Failed(format!(
                        "reading the pre-copied pages from {}: {e}",
                        self.path.display()
                    ))
                })?;
            write(pages[i].0, &buf[..len])?;
            i = j;
        }
        Ok(pages.len() as u64)
    }
}
