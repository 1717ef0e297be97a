//! Lazy memory: the restored tree runs before its private anonymous memory is filled. That
//! memory is registered with a userfaultfd in missing mode (created inside each process by an
//! injected syscall); one filler thread answers faults at once, in blocks of 64 KiB, and fills
//! the rest ahead of need until nothing is missing. Pages come from the image, from pages held
//! apart (pre-copy rounds) or from the frozen source process (post-copy, `RemotePages`).
//!
//! The events that change the address space keep the filler right: a forked child gets a
//! userfaultfd of its own (its missing pages are its parent's), mremap moves what is missing,
//! and madvise(DONTNEED) or munmap drop it, so stale contents never land on fresh memory. The
//! filler reads events and fills pages on one thread, so an event is always seen before the
//! next fill.

use crate::restore::BasePages;
use crate::{EngineError, Result};
use ferry_image::{BlockIndex, PAGE_SIZE};
use ferry_sys::uffd::{Fill, LazyUffd, UffdEvent};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const PAGE: u64 = PAGE_SIZE as u64;
/// A fault is answered with the missing pages of its aligned 64 KiB block.
const FAULT_BLOCK: u64 = 64 << 10;
/// Filling ahead of need goes in runs of up to 1 MiB: a fault waits for the one being
/// placed, not for its fetch (faults have a connection of their own). Runs of 256 KiB
/// doubled the total of a post-copy of Redis (1 GiB) and did not shorten its slowest write.
const PUSH_RUN: u64 = 1 << 20;

/// Pages left in the frozen source process (post-copy).
pub trait RemotePages: Send + Sync {
    /// The contents of process `pid` (its PID as dumped) at [addr, addr + buf.len()), and the
    /// runs [start, end) of it that the source does not hold (never written, or discarded):
    /// zero in `buf`, and best left unallocated. `urgent`: a thread waits on it (a fault),
    /// so it must not queue behind what was asked ahead.
    fn fetch(&self, pid: i32, addr: u64, buf: &mut [u8], urgent: bool) -> Result<Vec<(u64, u64)>>;
    /// A hint: `fetch` will soon want `len` bytes at `addr` of `pid` (exactly that). Asking
    /// now lets the source read them while the filler writes the pages before them.
    fn prefetch(&self, _pid: i32, _addr: u64, _len: usize) {}
    /// Whether a fetch of exactly that would return without waiting for the source (its
    /// answer is here, or fetching has failed).
    fn ready(&self, _pid: i32, _addr: u64, _len: usize) -> bool {
        true
    }
    /// While answers asked ahead are awaited: a descriptor that polls readable when one comes
    /// (then taken in by `take_in`). The filler waits on it and on the faults at once.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Read an answer that came (without waiting for more). Called every turn: one may be
    /// buffered already, with nothing left on the descriptor to wake the poll.
    fn take_in(&self) {}
    /// The oldest answer asked ahead that came and is still kept: (pid, address, length).
    fn arrived(&self) -> Option<(i32, u64, usize)> {
        None
    }
    /// Drop the answer kept for exactly that request.
    fn discard(&self, _pid: i32, _addr: u64, _len: usize) {}
    /// Runs of process `pid` to fill first: the memory it used last before the freeze.
    fn hot(&self, _pid: i32) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// Page ranges, [start, end) by start, never overlapping. Touching ranges are kept apart: they
/// may lie in different mappings, and one UFFDIO_COPY cannot cross mappings.
#[derive(Debug, Clone, Default)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl FromIterator<(u64, u64)> for RangeSet {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(runs: I) -> Self {
        let mut r = RangeSet::default();
        for (s, e) in runs {
            r.insert(s, e);
        }
        r
    }
}

/// Where memory moved by mremap after the restore came from: runs of the live address
/// space, each with the address its contents had in the image. What is not listed did not
/// move. The data for a page that moved before it was filled is the image's at its old
/// address, not at its new one.
#[derive(Debug, Clone, Default)]
pub struct Moves(BTreeMap<u64, (u64, u64)>);

impl Moves {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The image address of live address `a`, and how far (bytes) from `a` that holds.
    fn source_of(&self, a: u64) -> (u64, u64) {
        if let Some((&s, &(e, src))) = self.0.range(..=a).next_back() {
            if a < e {
                return (src + (a - s), e - a);
            }
        }
        let next = self
            .0
            .range(a..)
            .next()
            .map(|(&s, _)| s)
            .unwrap_or(u64::MAX);
        (a, next - a)
    }

    fn cut(&mut self, from: u64, to: u64) {
        let hit: Vec<(u64, u64, u64)> = self
            .0
            .range(..to)
            .filter(|(_, &(e, _))| e > from)
            .map(|(&s, &(e, src))| (s, e, src))
            .collect();
        for (s, e, src) in hit {
            self.0.remove(&s);
            if s < from {
                self.0.insert(s, (from, src));
            }
            if e > to {
                self.0.insert(to, (e, src + (to - s)));
            }
        }
    }

    /// [from, from + len) now lives at [to, to + len); what was at `to` is gone.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let mut pieces = Vec::new();
        let mut a = from;
        while a < from + len {
            let (src, n) = self.source_of(a);
            let n = n.min(from + len - a);
            pieces.push((a - from + to, a - from + to + n, src));
            a += n;
        }
        self.cut(from, from + len);
        self.cut(to, to + len);
        for (s, e, src) in pieces {
            if s != src {
                self.0.insert(s, (e, src));
            }
        }
    }
}

impl RangeSet {
    pub fn insert(&mut self, mut s: u64, mut e: u64) {
        if s >= e {
            return;
        }
        // Merge with everything that overlaps.
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..e)
            .rev()
            .take_while(|&(_, &end)| end > s)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in touching {
            self.0.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.0.insert(s, e);
    }

    pub fn remove(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .0
            .range(..e)
            .rev()
            .take_while(|&(_, &end)| end > s)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in hit {
            self.0.remove(&a);
            if a < s {
                self.0.insert(a, s);
            }
            if b > e {
                self.0.insert(e, b);
            }
        }
    }

    /// Whether one range holds all of [s, e).
    pub fn covers(&self, s: u64, e: u64) -> bool {
        self.0
            .range(..=s)
            .next_back()
            .is_some_and(|(_, &end)| end >= e)
    }

    pub fn contains(&self, a: u64) -> bool {
        self.0.range(..=a).next_back().is_some_and(|(_, &e)| e > a)
    }

    /// The parts of [s, e) in the set.
    pub fn within(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .0
            .range(..e)
            .rev()
            .take_while(|&(_, &end)| end > s)
            .map(|(&a, &b)| (a.max(s), b.min(e)))
            .collect();
        v.reverse();
        v
    }

    /// The parts of [s, e) that the set does not hold.
    pub fn gaps(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur = s;
        for (a, b) in self.within(s, e) {
            if cur < a {
                out.push((cur, a));
            }
            cur = cur.max(b);
        }
        if cur < e {
            out.push((cur, e));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&a, &b)| (a, b))
    }

    /// The first run at or after `a`, cut at `a`.
    fn first_from(&self, a: u64) -> Option<(u64, u64)> {
        match self.0.range(..=a).next_back() {
            Some((_, &e)) if e > a => Some((a, e)),
            _ => self.0.range(a..).next().map(|(&s, &e)| (s, e)),
        }
    }
}

/// Where the pages of lazily restored memory come from. Later sources override earlier ones:
/// pre-copied pages, then the image's (newer), then the source process's (disjoint from the
/// image).
pub struct Sources {
    pub base: Option<Arc<dyn BasePages>>,
    pub map: Arc<ferry_sys::mem::MappedFile>,
    /// Per process (PID as dumped): its page blocks in pages.fimg, by address.
    pub blocks: HashMap<i32, Vec<BlockIndex>>,
    pub remote: Option<Arc<dyn RemotePages>>,
    pub remote_runs: HashMap<i32, RangeSet>,
    checked: HashSet<(i32, u64)>,
}

impl Sources {
    pub fn new(
        base: Option<Arc<dyn BasePages>>,
        map: Arc<ferry_sys::mem::MappedFile>,
        remote: Option<Arc<dyn RemotePages>>,
    ) -> Sources {
        Sources {
            base,
            map,
            blocks: HashMap::new(),
            remote,
            remote_runs: HashMap::new(),
            checked: HashSet::new(),
        }
    }

    /// The data of [addr, addr + buf.len()) into `buf`, and the runs of it (offsets in `buf`)
    /// that the source process said it does not hold. `urgent`: for a fault.
    fn read(
        &mut self,
        pid: i32,
        addr: u64,
        buf: &mut [u8],
        urgent: bool,
    ) -> Result<Vec<(usize, usize)>> {
        buf.fill(0);
        let mut absent = Vec::new();
        let end = addr + buf.len() as u64;
        if let Some(b) = &self.base {
            b.read_into(pid, addr, buf)?;
        }
        if let Some(blocks) = self.blocks.get(&pid) {
            let from = blocks.partition_point(|b| b.vaddr + b.data_len <= addr);
            for b in blocks[from..].iter().take_while(|b| b.vaddr < end) {
                let at = b.data_offset as usize;
                let data = self
                    .map
                    .bytes()
                    .get(at..at + b.data_len as usize)
                    .ok_or_else(|| {
                        EngineError::Failed(format!(
                            "pages.fimg is shorter than it was verified (block at {:#x})",
                            b.vaddr
                        ))
                    })?;
                if self.checked.insert((pid, b.vaddr)) && !b.matches(data) {
                    return Err(EngineError::Failed(format!(
                        "pages.fimg changed since it was verified: the block of pages at {:#x} \
                         no longer matches its CRC",
                        b.vaddr
                    )));
                }
                let s = b.vaddr.max(addr);
                let e = (b.vaddr + b.data_len).min(end);
                if e <= s {
                    continue;
                }
                buf[(s - addr) as usize..(e - addr) as usize]
                    .copy_from_slice(&data[(s - b.vaddr) as usize..(e - b.vaddr) as usize]);
            }
        }
        if let (Some(r), Some(runs)) = (&self.remote, self.remote_runs.get(&pid)) {
            for (s, e) in runs.within(addr, end) {
                let got = r.fetch(
                    pid,
                    s,
                    &mut buf[(s - addr) as usize..(e - addr) as usize],
                    urgent,
                )?;
                absent.extend(
                    got.into_iter()
                        .filter(|&(a, b)| s <= a && a < b && b <= e)
                        .map(|(a, b)| ((a - addr) as usize, (b - addr) as usize)),
                );
            }
        }
        Ok(absent)
    }

    /// The part of `missing` (process `pid`'s) whose pages are in the source process.
    fn remote_part(&self, pid: i32, missing: &RangeSet) -> RangeSet {
        let mut part = RangeSet::default();
        if let (Some(_), Some(runs)) = (&self.remote, self.remote_runs.get(&pid)) {
            for (s, e) in runs.runs() {
                for (a, b) in missing.within(s, e) {
                    part.insert(a, b);
                }
            }
        }
        part
    }

    /// Ask the source process ahead for the parts of [addr, addr + len) that `read` will
    /// fetch from it.
    fn prefetch(&self, pid: i32, addr: u64, len: u64) {
        if let (Some(r), Some(runs)) = (&self.remote, self.remote_runs.get(&pid)) {
            for (s, e) in runs.within(addr, addr + len) {
                r.prefetch(pid, s, (e - s) as usize);
            }
        }
    }

    /// Whether `read` of [addr, addr + len) would not wait for the source process; when it
    /// would, what it wants from there is asked for (as far as room allows).
    fn ready(&self, pid: i32, addr: u64, len: u64) -> bool {
        let mut all = true;
        if let (Some(r), Some(runs)) = (&self.remote, self.remote_runs.get(&pid)) {
            for (s, e) in runs.within(addr, addr + len) {
                let n = (e - s) as usize;
                if !r.ready(pid, s, n) {
                    r.prefetch(pid, s, n);
                    all = false;
                }
            }
        }
        all
    }

    /// What process `pid` has to fill inside `ranges` (its lazily restored mappings).
    pub fn missing(&self, pid: i32, ranges: &[(u64, u64)]) -> RangeSet {
        let mut set = RangeSet::default();
        let mut mappings = RangeSet::default();
        for &(s, e) in ranges {
            mappings.insert(s, e);
        }
        // Only the ranges that overlap: the page store holds thousands of runs after a few
        // rounds of scattered writes, and this runs in the frozen phase of a migration.
        let mut add = |s: u64, e: u64| {
            for (a, b) in mappings.within(s, e) {
                set.insert(a, b);
            }
        };
        if let Some(b) = &self.base {
            for (s, e) in b.held(pid) {
                add(s, e);
            }
        }
        for b in self.blocks.get(&pid).into_iter().flatten() {
            add(b.vaddr, b.vaddr + b.data_len);
        }
        for (s, e) in self
            .remote_runs
            .get(&pid)
            .into_iter()
            .flat_map(|r| r.runs())
        {
            add(s, e);
        }
        set
    }
}

/// One userfaultfd and what is still missing behind it.
struct Consumer {
    /// Whose pages it gets (the PID as dumped; a fork child gets its parent's).
    source_pid: i32,
    /// The process it fills now.
    live_pid: i32,
    uffd: LazyUffd,
    missing: RangeSet,
    /// The part of `missing` whose pages are in the source process (post-copy): filled
    /// before the rest, which is here already, so that the source can go sooner.
    remote: RangeSet,
    /// Filled first (hot memory), in this order.
    hot: Vec<(u64, u64)>,
    /// Faults that could not be answered yet (the address space was changing).
    retry: Vec<u64>,
    /// Where the last fault was: filling ahead goes on from there (memory near a fault is
    /// likely next).
    cursor: Option<u64>,
    /// Memory moved since the restore, and where its data was in the image.
    moves: Moves,
}

impl Consumer {
    /// [s, e) is missing no more (filled, or dropped by the process).
    fn done(&mut self, s: u64, e: u64) {
        self.missing.remove(s, e);
        self.remote.remove(s, e);
    }
}

/// What filling took.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FillReport {
    /// Bytes filled in (faults and ahead of need).
    pub bytes: u64,
    /// Faults answered with pages, and with the zero page.
    pub faults: u64,
    pub zero_faults: u64,
    /// Forked children whose memory was filled too.
    pub forks: u64,
    /// From the start of the filler until nothing was missing.
    pub fill_ms: f64,
    /// Longest wait of a faulting thread on a fetch, in ms.
    pub max_fault_ms: f64,
    /// Their mean, in ms.
    #[serde(default)]
    pub mean_fault_ms: f64,
    /// Told when no page was left in the source process, before the end (`fill_ms` is then
    /// the time until that point): the bytes still to fill from here.
    #[serde(default)]
    pub local_left_bytes: u64,
    /// Faults answered before the tree ran (the restore's own calls touching missing pages,
    /// such as a thread's rseq registration): each was a fetch inside the downtime.
    #[serde(default)]
    pub frozen_faults: u64,
}

/// The filler thread. Dropping it (or `abort`) stops it; processes still missing pages are
/// killed first, so none runs on with holes in its memory.
pub struct Filler {
    tx: Option<Sender<NewConsumer>>,
    handle: Option<std::thread::JoinHandle<Result<FillReport>>>,
    stop: Arc<AtomicBool>,
    watch: Arc<Watch>,
    /// Set once the tree runs: filling ahead of need waits until then, so that it does not
    /// take the CPU from the rest of the restore (the downtime) on a small machine.
    running: Arc<AtomicBool>,
    /// Set just before the tree is let go: faults answered until then count as the
    /// restore's own (`FillReport::frozen_faults`).
    resumed: Arc<AtomicBool>,
    released: Arc<Released>,
}

/// The processes being filled, and the guardian that kills them if Ferry dies meanwhile.
struct Watch {
    pids: Mutex<Vec<i32>>,
    guardian: Mutex<Option<ferry_sys::guard::Guardian>>,
}

impl Watch {
    fn add(&self, pid: i32, uffd: &LazyUffd) -> Result<()> {
        self.pids.lock().unwrap().push(pid);
        if let Some(g) = self.guardian.lock().unwrap().as_ref() {
            g.watch(pid, Some(uffd.raw()))?;
        }
        Ok(())
    }
}

impl Filler {
    /// Prepares what `start` needs that costs time (its guardian process), ahead of a frozen
    /// phase.
    pub fn prepare() {
        ferry_sys::guard::prepare();
    }

    pub fn start(sources: Sources) -> Result<Filler> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Arc::new(Watch {
            pids: Mutex::new(Vec::new()),
            guardian: Mutex::new(Some(ferry_sys::guard::Guardian::spawn()?)),
        });
        let running = Arc::new(AtomicBool::new(false));
        let resumed = Arc::new(AtomicBool::new(false));
        let released: Arc<Released> = Arc::default();
        let (st, w, go, rel, up) = (
            stop.clone(),
            watch.clone(),
            running.clone(),
            released.clone(),
            resumed.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("ferry-filler".into())
            .spawn(move || {
                let r = run(sources, rx, &st, &w, &go, &up, &rel);
                if r.is_err() || st.load(Ordering::Relaxed) {
                    kill_all(&w.pids.lock().unwrap());
                    // Dropped without "done": it kills what it watches too.
                    w.guardian.lock().unwrap().take();
                } else if let Some(g) = w.guardian.lock().unwrap().take() {
                    g.done();
                }
                // Whoever waits for the source's release hears the end as well.
                let _held = rel.0.lock().unwrap();
                rel.1.notify_all();
                r
            })
            .map_err(|e| EngineError::Failed(format!("starting the page filler: {e}")))?;
        Ok(Filler {
            tx: Some(tx),
            handle: Some(handle),
            stop,
            watch,
            running,
            resumed,
            released,
        })
    }

    /// The flag that lets filling ahead of need begin (faults are answered at once anyway).
    pub fn running_flag(&self) -> Arc<AtomicBool> {
        self.running.clone()
    }

    /// The flag to set just before the tree runs.
    pub fn resumed_flag(&self) -> Arc<AtomicBool> {
        self.resumed.clone()
    }

    /// Fill process `pid` (PID as dumped, also its PID now) through `uffd`.
    pub fn add(
        &self,
        pid: i32,
        uffd: LazyUffd,
        missing: RangeSet,
        hot: Vec<(u64, u64)>,
    ) -> Result<()> {
        self.watch.add(pid, &uffd)?;
        if let Some(tx) = &self.tx {
            let _ = tx.send((pid, uffd, missing, hot));
        }
        Ok(())
    }

    /// Every process is added: once nothing is missing the filler ends.
    pub fn seal(&mut self) {
        self.tx = None;
    }

    /// Wait until no page is left in the source process (post-copy; seals the filler): from
    /// then on the tree needs nothing of the source, which can go while the rest fills from
    /// here. What was filled by then; None when filling ended first (`wait` tells how).
    pub fn wait_released(&mut self) -> Option<FillReport> {
        self.seal();
        let mut g = self.released.0.lock().unwrap();
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            if self.is_finished() {
                return None;
            }
            // The filler thread notifies at the release and at its end; the timeout only
            // bounds a wake-up missed between its check and this wait.
            g = self
                .released
                .1
                .wait_timeout(g, std::time::Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// Wait until every page is in place (or filling failed, which killed the tree).
    pub fn wait(mut self) -> Result<FillReport> {
        self.seal();
        let h = self.handle.take().expect("filler joined twice");
        h.join()
            .map_err(|_| EngineError::Failed("the page filler panicked".into()))?
    }

    /// Has it ended (all filled or failed)?
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stop filling and kill the processes that may still miss pages.
    pub fn abort(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop_now();
        }
    }
}

fn kill_all(pids: &[i32]) {
    for &p in pids {
        // SAFETY: kill has no memory effects.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

type NewConsumer = (i32, LazyUffd, RangeSet, Vec<(u64, u64)>);

/// What was filled when nothing was left in the source process, once told.
type Released = (Mutex<Option<FillReport>>, std::sync::Condvar);

fn run(
    mut src: Sources,
    rx: Receiver<NewConsumer>,
    stop: &AtomicBool,
    watch: &Watch,
    running: &AtomicBool,
    resumed: &AtomicBool,
    released: &Released,
) -> Result<FillReport> {
    let t0 = Instant::now();
    let mut rep = FillReport::default();
    let mut told = false;
    let mut cons: Vec<Consumer> = Vec::new();
    let mut open = true;
    let mut buf = vec![0u8; PUSH_RUN as usize];
    let mut rr = 0usize;
    // The run to fill ahead waits for its data from the source process.
    let mut waiting = false;
    let mut fault_wait = 0f64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(EngineError::Failed("page filling was stopped".into()));
        }
        while open {
            match rx.try_recv() {
                Ok((pid, uffd, missing, hot)) => cons.push(Consumer {
                    source_pid: pid,
                    live_pid: pid,
                    uffd,
                    remote: src.remote_part(pid, &missing),
                    missing,
                    hot,
                    retry: Vec::new(),
                    cursor: None,
                    moves: Moves::default(),
                }),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Nothing missing: closing the userfaultfd hands the memory back to the kernel.
        cons.retain(|c| !c.missing.is_empty() || !c.retry.is_empty());
        if !open && !told && cons.iter().all(|c| c.remote.is_empty()) {
            // Nothing more will come from the source process.
            told = true;
            let mut r = rep.clone();
            r.fill_ms = t0.elapsed().as_secs_f64() * 1e3;
            r.local_left_bytes = cons.iter().map(|c| c.missing.bytes()).sum();
            *released.0.lock().unwrap() = Some(r);
            released.1.notify_all();
        }
        if cons.is_empty() && !open {
            rep.fill_ms = t0.elapsed().as_secs_f64() * 1e3;
            return Ok(rep);
        }
        let mut fds: Vec<libc::pollfd> = cons
            .iter()
            .map(|c| libc::pollfd {
                fd: c.uffd.raw(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wake = src.remote.as_ref().and_then(|r| r.wake_fd());
        if let Some(fd) = wake {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ahead = running.load(Ordering::Relaxed);
        let busy = ahead && cons.iter().any(|c| !c.missing.is_empty());
        let timeout = if busy && !waiting {
            0
        } else if ahead {
            // Waiting for data asked ahead: its arrival (the wake descriptor) ends the wait.
            if waiting {
                20
            } else {
                5
            }
        } else {
            1
        };
        // SAFETY: `fds` is a valid array of pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        // Also when the descriptor did not wake the poll: an answer read into a buffer with
        // the one before it leaves nothing on the socket to wake it (a post-copy of Redis
        // hung so, with the filler waiting for it).
        if let Some(r) = &src.remote {
            r.take_in();
        }
        if n > 0 {
            let mut forks = Vec::new();
            for (i, f) in fds[..cons.len()].iter().enumerate() {
                if f.revents & libc::POLLIN == 0 {
                    continue;
                }
                let c = &mut cons[i];
                for ev in c.uffd.events()? {
                    match ev {
                        UffdEvent::Fault(a) => c.retry.push(a & !(PAGE - 1)),
                        UffdEvent::Fork(fd) => {
                            rep.forks += 1;
                            // The event does not name the child: it is the new one among
                            // the forker's children.
                            let known = watch.pids.lock().unwrap().clone();
                            let child = ferry_sys::procfs::children(c.live_pid)
                                .into_iter()
                                .find(|p| !known.contains(p))
                                .unwrap_or(0);
                            let uffd = LazyUffd::from_fork(fd, child);
                            if child > 0 {
                                watch.add(child, &uffd)?;
                            }
                            forks.push(Consumer {
                                source_pid: c.source_pid,
                                live_pid: child,
                                uffd,
                                missing: c.missing.clone(),
                                remote: c.remote.clone(),
                                hot: c.hot.clone(),
                                retry: Vec::new(),
                                cursor: None,
                                moves: c.moves.clone(),
                            });
                        }
                        UffdEvent::Remap { from, to, len } => {
                            for set in [&mut c.missing, &mut c.remote] {
                                let moved = set.within(from, from + len);
                                set.remove(from, from + len);
                                for (s, e) in moved {
                                    set.insert(s - from + to, e - from + to);
                                }
                            }
                            c.moves.remap(from, to, len);
                        }
                        UffdEvent::Remove { start, end } => c.done(start, end),
                    }
                }
            }
            cons.extend(forks);
        }
        // Faults first: a thread waits on each.
        for c in cons.iter_mut() {
            let faults = std::mem::take(&mut c.retry);
            for a in faults {
                let tf = Instant::now();
                let before = rep.faults;
                match answer_fault(&mut src, c, a, &mut buf, &mut rep)? {
                    true => {}
                    false => c.retry.push(a),
                }
                // A fault of the restore blocks it: it is answered before the tree is let go.
                if !resumed.load(Ordering::Relaxed) {
                    rep.frozen_faults += rep.faults - before;
                }
                let ms = tf.elapsed().as_secs_f64() * 1e3;
                rep.max_fault_ms = rep.max_fault_ms.max(ms);
                fault_wait += ms;
                rep.mean_fault_ms = fault_wait / rep.faults.max(1) as f64;
            }
        }
        waiting = false;
        if cons.is_empty() || !ahead {
            continue;
        }
        // What came from the source is placed first, wherever filling went since it was
        // asked: a fault moves it elsewhere, and an answer left aside would be fetched again
        // (1 GiB written at 50 MB/s: 2.6 times as much fetched).
        let mut placed = false;
        if let Some(r) = src.remote.clone() {
            if let Some((pid, a, n)) = r.arrived() {
                // Not where memory moved: there the answer's addresses are not the live ones.
                for c in cons
                    .iter_mut()
                    .filter(|c| c.source_pid == pid && c.moves.is_empty())
                {
                    for (s, e) in c.remote.within(a, a + n as u64) {
                        fill(&mut src, c, s, e, &mut buf, &mut rep, false)?;
                    }
                }
                r.discard(pid, a, n);
                placed = true;
            }
        }
        // Ahead of need: one run of one process, round robin. Also in a turn that served
        // faults: a process faulting all the time would otherwise get its memory only by
        // faults (1 GiB written at 50 MB/s: whole after 7 s instead of 1 s idle).
        rr = (rr + 1) % cons.len();
        if let Some(i) = (0..cons.len())
            .map(|k| (rr + k) % cons.len())
            .find(|&i| !cons[i].missing.is_empty())
        {
            let c = &mut cons[i];
            let run = next_run(&c.missing, &c.remote, &mut c.hot, &mut c.cursor);
            if let Some((s, e)) = run {
                // Only once its data is here: a fault meanwhile is answered at once, over
                // a connection of its own, instead of after this run (Redis's rehashing
                // touches hundreds of missing pages in one go: a write took 200-450 ms).
                let ready = source_pieces(&c.moves, s, e - s)
                    .into_iter()
                    .fold(true, |all, (from, _, n)| {
                        src.ready(c.source_pid, from, n) && all
                    });
                // The runs after it are asked for now, so that the source reads them and
                // they cross while this one is written (post-copy, 1 GiB idle: filled in
                // 0.95 s with one run asked at a time, 0.57 s with more).
                for (ns, ne) in runs_after(c, (s, e), AHEAD_RUNS) {
                    for (from, _, n) in source_pieces(&c.moves, ns, ne - ns) {
                        src.prefetch(c.source_pid, from, n);
                    }
                }
                if !ready {
                    waiting = !placed;
                } else if !placed {
                    fill(&mut src, c, s, e, &mut buf, &mut rep, false)?;
                }
            }
        }
    }
}

/// Runs asked for ahead of the one being filled.
const AHEAD_RUNS: usize = 3;

/// The `n` runs `next_run` will give after [s, e), as far as they can be told (a fault or an
/// event changes them).
fn runs_after(c: &Consumer, first: (u64, u64), n: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut prev = first;
    for _ in 0..n {
        let overlaps = |r: (u64, u64)| {
            std::iter::once(first)
                .chain(out.iter().copied())
                .any(|x| r.0 < x.1 && x.0 < r.1)
        };
        // `run_after` tells the run after the first one only: in address order it gives the
        // first one again when asked past it. Then on from the last one told.
        let next = run_after(&c.missing, &c.remote, &c.hot, c.cursor, prev)
            .filter(|&r| !overlaps(r))
            .or_else(|| c.remote.first_from(prev.1).map(in_cell))
            .filter(|&r| !overlaps(r));
        let Some(r) = next else { break };
        out.push(r);
        prev = r;
    }
    out
}

/// A run cut at the end of its aligned 1 MiB cell. Runs filled ahead of need start where
/// faults left holes; on a fixed grid, what is asked ahead of a run still holds the run
/// after a fault cut it (unaligned, 1 GiB written at 50 MB/s: a third more fetched).
fn in_cell((a, b): (u64, u64)) -> (u64, u64) {
    (a, b.min((a / PUSH_RUN + 1) * PUSH_RUN))
}

/// The next run to fill ahead of need: after the last fault, then hot memory, then what is
/// in the source process, then the rest, in address order. (A consumer's `missing`, `remote`,
/// `hot` and `cursor`; what is done with drops out of the last two.)
fn next_run(
    missing: &RangeSet,
    remote: &RangeSet,
    hot: &mut Vec<(u64, u64)>,
    cursor: &mut Option<u64>,
) -> Option<(u64, u64)> {
    if let Some(at) = *cursor {
        // The rest of the fault's neighbourhood (8 MiB on), if anything of it is missing.
        match missing.within(at, at + (8 << 20)).first() {
            Some(&r) => return Some(in_cell(r)),
            None => *cursor = None,
        }
    }
    while let Some(&(s, e)) = hot.first() {
        if let Some(&r) = missing.within(s, e).first() {
            return Some(in_cell(r));
        }
        hot.remove(0);
    }
    remote
        .first_from(0)
        .or_else(|| missing.first_from(0))
        .map(in_cell)
}

/// What `next_run` will give once the run it gave, [s, e), is filled (unless a fault or an
/// event comes first).
fn run_after(
    missing: &RangeSet,
    remote: &RangeSet,
    hot: &[(u64, u64)],
    cursor: Option<u64>,
    (s, e): (u64, u64),
) -> Option<(u64, u64)> {
    let from = |a: u64, end: u64| {
        missing
            .first_from(a)
            .filter(|r| r.0 < end)
            .map(|(a, b)| in_cell((a, b.min(end))))
    };
    if let Some(at) = cursor {
        // The fault's neighbourhood; once it is done, hot memory or the first run (not
        // foretold).
        return from(e.max(at), at + (8 << 20));
    }
    if let Some(&(_, he)) = hot.first() {
        // [s, e) came from the first hot run: its rest, then the next hot runs.
        if let Some(r) = from(e, he) {
            return Some(r);
        }
        if let Some(r) = hot[1..].iter().find_map(|&(hs, he)| from(hs, he)) {
            return Some(r);
        }
    }
    // In address order: what is in the source, then the rest.
    let first_without = |set: &RangeSet| match set.first_from(0)? {
        (a, b) if a < s => Some((a, b.min(s))),
        (a, _) if a == s => set.first_from(e),
        r => Some(r),
    };
    first_without(remote)
        .or_else(|| first_without(missing))
        .map(in_cell)
}

/// Answer a fault at page `a`; false when it must be tried again after the events.
fn answer_fault(
    src: &mut Sources,
    c: &mut Consumer,
    a: u64,
    buf: &mut [u8],
    rep: &mut FillReport,
) -> Result<bool> {
    if !c.missing.contains(a) {
        // Nothing saved there: it reads as zero (or was filled meanwhile).
        return match c.uffd.zero(a, PAGE)? {
            Fill::Again => Ok(false),
            _ => {
                rep.zero_faults += 1;
                Ok(true)
            }
        };
    }
    rep.faults += 1;
    ferry_sys::timeline::mark(|| format!("fault at {a:#x}"));
    let blk = a & !(FAULT_BLOCK - 1);
    c.cursor = Some(blk + FAULT_BLOCK);
    let runs = c.missing.within(blk, blk + FAULT_BLOCK);
    // The faulting page's run first.
    let mut order: Vec<(u64, u64)> = runs
        .iter()
        .copied()
        .filter(|r| r.0 <= a && a < r.1)
        .collect();
    order.extend(runs.iter().copied().filter(|r| !(r.0 <= a && a < r.1)));
    for (s, e) in order {
        if !fill(src, c, s, e, buf, rep, true)? && s <= a && a < e {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fill [s, e) of `c` (all missing when called); false when the address space is changing.
/// `urgent`: for a fault.
fn fill(
    src: &mut Sources,
    c: &mut Consumer,
    s: u64,
    e: u64,
    buf: &mut [u8],
    rep: &mut FillReport,
    urgent: bool,
) -> Result<bool> {
    let mut at = s;
    while at < e {
        let len = (e - at).min(buf.len() as u64);
        let data = &mut buf[..len as usize];
        // Piece by piece where memory moved: each piece's data is at its old address.
        let mut absent: Vec<(u64, u64)> = Vec::new();
        for (from, done, n) in source_pieces(&c.moves, at, len) {
            let gaps = src.read(
                c.source_pid,
                from,
                &mut data[done as usize..(done + n) as usize],
                urgent,
            )?;
            absent.extend(
                gaps.iter()
                    .map(|&(a, b)| (done + a as u64, done + b as u64)),
            );
        }
        // Pages the source does not hold get the zero page: no memory for them.
        absent.sort_unstable();
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut cur = 0u64;
        for (a, b) in absent {
            let a = a.max(cur);
            if a >= b {
                continue;
            }
            if cur < a {
                pieces.push((cur, a, true));
            }
            pieces.push((a, b, false));
            cur = b;
        }
        if cur < len {
            pieces.push((cur, len, true));
        }
        for (ps, pe, has_data) in pieces {
            let piece = has_data.then(|| &data[ps as usize..pe as usize]);
            if let Err(off) = place(c, at + ps, pe - ps, piece, rep)? {
                c.done(at, at + ps + off);
                return Ok(false);
            }
        }
        c.done(at, at + len);
        at += len;
    }
    Ok(true)
}

/// Where the data of [at, at + len) is read (`fill` reads at most a buffer at a time): pieces
/// (image address, offset from `at`, length), split where memory moved.
fn source_pieces(moves: &Moves, at: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let mut v = Vec::new();
    let mut done = 0u64;
    while done < len {
        let (from, n) = moves.source_of(at + done);
        let n = n.min(len - done);
        v.push((from, done, n));
        done += n;
    }
    v
}

/// Put [at, at + len) in place: `data`, or the zero page (None). Err(offset): the address
/// space is changing, and what lies before `offset` is in place.
fn place(
    c: &Consumer,
    at: u64,
    len: u64,
    data: Option<&[u8]>,
    rep: &mut FillReport,
) -> Result<std::result::Result<(), u64>> {
    let put = |off: u64, n: u64| match data {
        Some(d) => c.uffd.copy(at + off, &d[off as usize..(off + n) as usize]),
        None => c.uffd.zero(at + off, n),
    };
    let count = |n: u64, rep: &mut FillReport| {
        if data.is_some() {
            rep.bytes += n;
        }
    };
    let mut off = 0u64;
    while off < len {
        match put(off, len - off)? {
            Fill::Done => {
                count(len - off, rep);
                off = len;
            }
            Fill::Exists(n) => {
                // Pages up to the present one went in; that one is there already.
                count(n, rep);
                off += n + PAGE;
            }
            Fill::Again => return Ok(Err(off)),
            Fill::Gone if len - off > PAGE => {
                // The run may cross into another mapping (one split since): page by page.
                for p in (off..len).step_by(PAGE as usize) {
                    match put(p, PAGE)? {
                        Fill::Done => count(PAGE, rep),
                        Fill::Again => return Ok(Err(p)),
                        _ => {}
                    }
                }
                off = len;
            }
            Fill::Gone => off = len,
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::{next_run, run_after, Moves, RangeSet};

    /// What is asked ahead is what filling takes next, when no fault comes between: in address
    /// order, in a fault's neighbourhood and through hot memory.
    #[test]
    fn the_run_foretold_is_the_next_one_filled() {
        const M: u64 = 1 << 20;
        let missing: RangeSet = [
            (0, 3 * M / 2),
            (2 * M, 2 * M + 4096),
            (5 * M + 8192, 7 * M),
            (20 * M, 22 * M),
            (40 * M, 41 * M),
        ]
        .into_iter()
        .collect();
        let in_source: RangeSet = [(M, 3 * M / 2), (20 * M, 21 * M + 4096)]
            .into_iter()
            .collect();
        for (hot, cursor, remote) in [
            (vec![], None, RangeSet::default()),
            (vec![], Some(5 * M), RangeSet::default()),
            (
                vec![(20 * M + 4096, 21 * M + 8192), (0, M / 2)],
                None,
                RangeSet::default(),
            ),
            (vec![(40 * M, 50 * M)], Some(M), RangeSet::default()),
            (vec![], None, in_source.clone()),
            (vec![(40 * M, 50 * M)], Some(5 * M), in_source.clone()),
        ] {
            let (mut missing, mut remote, mut hot, mut cursor) =
                (missing.clone(), remote, hot, cursor);
            let mut runs = 0;
            while let Some(r) = next_run(&missing, &remote, &mut hot, &mut cursor) {
                // Within one aligned MiB.
                assert!(r.0 < r.1 && (r.1 - 1) / M == r.0 / M, "{r:x?}");
                let told = run_after(&missing, &remote, &hot, cursor, r);
                missing.remove(r.0, r.1);
                remote.remove(r.0, r.1);
                let next = next_run(&missing, &remote, &mut hot.clone(), &mut cursor.clone());
                // What is in the source goes before the rest (after faults and hot memory).
                if hot.is_empty() && cursor.is_none() && !remote.is_empty() {
                    assert!(next.is_some_and(|n| remote.contains(n.0)), "{next:x?}");
                }
                // Leaving a neighbourhood is not foretold.
                if told.is_some() || cursor.is_none() {
                    assert_eq!(told, next, "after {r:x?}");
                }
                runs += 1;
            }
            assert!(missing.is_empty() && runs >= 8);
        }
    }

    #[test]
    fn moved_memory_reads_from_where_it_was() {
        const P: u64 = 4096;
        let mut m = Moves::default();
        // Nothing moved: every address is its own source.
        assert_eq!(m.source_of(10 * P).0, 10 * P);
        // Four pages at 100 moved onto 200 (what was at 200 is gone).
        m.remap(100 * P, 200 * P, 4 * P);
        assert_eq!(m.source_of(200 * P), (100 * P, 4 * P));
        assert_eq!(m.source_of(203 * P).0, 103 * P);
        assert_eq!(m.source_of(204 * P).0, 204 * P);
        // Moved again, partly: the middle two pages go to 300; the rest stay at 200.
        m.remap(201 * P, 300 * P, 2 * P);
        assert_eq!(m.source_of(300 * P), (101 * P, 2 * P));
        assert_eq!(m.source_of(200 * P), (100 * P, P));
        assert_eq!(m.source_of(203 * P), (103 * P, P));
        // 201-202 now hold nothing moved: their own addresses (they read as unmapped).
        assert_eq!(m.source_of(201 * P).0, 201 * P);
        // Something moved onto moved memory replaces it; moved back, it is its own source.
        m.remap(50 * P, 300 * P, P);
        assert_eq!(m.source_of(300 * P), (50 * P, P));
        assert_eq!(m.source_of(301 * P).0, 102 * P);
        m.remap(300 * P, 50 * P, P);
        assert_eq!(m.source_of(50 * P).0, 50 * P);
        assert!(!m.0.contains_key(&(50 * P)));
    }

    #[test]
    fn range_set() {
        let mut r = RangeSet::default();
        r.insert(0x1000, 0x3000);
        r.insert(0x5000, 0x6000);
        r.insert(0x3000, 0x4000);
        assert!(r.covers(0x1000, 0x3000) && r.covers(0x2000, 0x2800));
        assert!(!r.covers(0x2000, 0x3800) && !r.covers(0x4000, 0x5000));
        // Touching runs stay apart (they may be different mappings); overlapping ones merge.
        assert_eq!(
            r.runs().collect::<Vec<_>>(),
            [(0x1000, 0x3000), (0x3000, 0x4000), (0x5000, 0x6000)]
        );
        r.insert(0x2000, 0x3800);
        assert_eq!(
            r.runs().collect::<Vec<_>>(),
            [(0x1000, 0x4000), (0x5000, 0x6000)]
        );
        r.remove(0x2000, 0x5800);
        assert_eq!(
            r.runs().collect::<Vec<_>>(),
            [(0x1000, 0x2000), (0x5800, 0x6000)]
        );
        assert!(r.contains(0x1fff) && !r.contains(0x2000) && r.contains(0x5800));
        assert_eq!(
            r.within(0x1800, 0x5900),
            [(0x1800, 0x2000), (0x5800, 0x5900)]
        );
        assert_eq!(r.bytes(), 0x1800);
        assert_eq!(r.gaps(0x1800, 0x6800), [(0x2000, 0x5800), (0x6000, 0x6800)]);
        assert_eq!(r.gaps(0x1800, 0x1c00), []);
        assert_eq!(r.gaps(0x3000, 0x4000), [(0x3000, 0x4000)]);
        let t: RangeSet = [(0x1000, 0x2000), (0x2000, 0x3000)].into_iter().collect();
        assert_eq!(t.gaps(0, 0x4000), [(0, 0x1000), (0x3000, 0x4000)]);
        // The next run to fill from an address on, cut there.
        assert_eq!(r.first_from(0x1800), Some((0x1800, 0x2000)));
        assert_eq!(r.first_from(0x2000), Some((0x5800, 0x6000)));
        assert_eq!(r.first_from(0), Some((0x1000, 0x2000)));
        assert_eq!(r.first_from(0x6000), None);
        // Runs filled ahead stay in their aligned 1 MiB cell.
        assert_eq!(super::in_cell((0x1000, 0x300000)), (0x1000, 0x100000));
        assert_eq!(super::in_cell((0x100000, 0x180000)), (0x100000, 0x180000));
        r.insert(0, 0x10000);
        assert_eq!(r.runs().collect::<Vec<_>>(), [(0, 0x10000)]);
    }
}
