//! A warm destination: the process created before the freeze, so that the frozen phase of a
//! migration does not pay for it.
//!
//! While the process still runs at the source, the source reads its layout (`preview`). The
//! destination creates a stub with the process's PID and lays out its memory (`prebuild`).
//! Pre-copied pages go straight into it as they arrive (`WarmTree::write`): private file
//! pages the program wrote (its libraries' data) by /proc/PID/mem, and the lazily filled
//! memory by UFFDIO_COPY (first copy) or /proc/PID/mem (pages sent again). Fresh memory is
//! so paid for once, while the source runs, and the filler has little left after the
//! freeze. At the commit, `restore::restore_held_with` uses the warm process when the final
//! image has the same single process with a layout it can be brought to: stale pages are
//! dropped (MADV_DONTNEED), changed mappings made again. Otherwise the pages that only it
//! holds are read out into the page store (`salvage`), it is killed, and the tree is built
//! from nothing, as without it.

use crate::ctx::Target;
use crate::lazy::RangeSet;
use crate::schema::{MapKind, MappingImage, ProcessImage, ZombieImage};
use crate::{EngineError, Result};
use ferry_sys::{procfs, spawn::spawn_stub, Frozen};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The layout of a running process, as the source saw it before the freeze.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmLayout {
    pub pid: i32,
    pub mappings: Vec<MappingImage>,
    /// Resident memory of each mapping (smaps Rss), KiB, in the order of `mappings`: which
    /// ones memory reserved ahead is worth moving into.
    #[serde(default)]
    pub resident_kb: Vec<u64>,
    /// The namespaces the process made for itself (UTS, IPC, a mount namespace with no
    /// mounts of its own): made around the process when it is built ahead, so that the
    /// restore has nothing left to create.
    #[serde(default)]
    pub namespaces: crate::namespaces::Namespaces,
}

/// The layout of `root` as it runs now, built from `smaps` (read just before). Err: why it
/// cannot be built ahead (the restore then builds it at the commit, as without it).
pub fn preview(root: i32, smaps: &[procfs::SmapsEntry]) -> std::result::Result<WarmLayout, String> {
    let tree = crate::precopy::tree_of(root);
    if tree.len() != 1 {
        return Err(format!(
            "the tree has {} processes (only one is built ahead)",
            tree.len()
        ));
    }
    let ours = |what: &str| {
        let a = std::fs::read_link(format!("/proc/self/{what}")).ok();
        a.is_some() && a == std::fs::read_link(format!("/proc/{root}/{what}")).ok()
    };
    if !ours("root") {
        return Err("the process has a root of its own".into());
    }
    let namespaces =
        crate::namespaces::dump(root).map_err(|e| format!("reading its namespaces: {e}"))?;
    if !namespaces.mounts.is_empty() {
        return Err("the process has mounts of its own".into());
    }
    let maps = procfs::read_maps(root).map_err(|e| e.to_string())?;
    let mappings = crate::memory::describe(root, &maps, smaps, &mut |_, shown| {
        Err(EngineError::Failed(format!("{shown} is mapped")))
    })
    .map_err(|e| format!("its layout could not be read ahead: {e}"))?;
    if let Some(m) = mappings.iter().find(|m| !warmable(m)) {
        return Err(format!(
            "mapping {:#x}-{:#x} ({:?}) is rebuilt only at the commit",
            m.start, m.end, m.kind
        ));
    }
    let resident_kb = mappings
        .iter()
        .map(|m| {
            smaps
                .iter()
                .filter(|e| e.start < m.end && m.start < e.end)
                .map(|e| e.rss_kb)
                .sum()
        })
        .collect();
    Ok(WarmLayout {
        pid: root,
        mappings,
        resident_kb,
        namespaces,
    })
}

/// Memory made resident ahead of an expected migration: a stub with the process's PID,
/// holding one private anonymous area whose pages the machine has given already. The warm
/// process is built from it (`prebuild_with`): its largest, mostly resident mappings of
/// private anonymous memory are moved in from there (mremap moves pages, not bytes), so
/// pre-copied pages land in memory that is in place. On a VM that pays for first touch of
/// fresh memory (several times the cost of the copy here), that takes it off the migration.
/// Dropping it kills the stub.
pub struct Reservation {
    pid: i32,
    pool: (u64, u64),
    /// The namespaces made around the stub (none of its own: the default).
    namespaces: crate::namespaces::Namespaces,
    /// Our mounts when its mount namespace was copied from ours (`mount_ids`).
    mounts_seen: Option<Vec<u32>>,
    /// How long making it resident took.
    pub populate_ms: f64,
    /// true: hand the stub over (detached, waiting); false: kill it.
    ctl: Option<std::sync::mpsc::Sender<bool>>,
    /// The stub's tracer until then: if Ferry dies, the kernel kills the stub with it.
    holder: Option<std::thread::JoinHandle<()>>,
}

/// The stub of a reservation under way, once it exists (a pidfd: killing through it can never
/// hit a later process that took the PID), for `Reservation::abandon`.
pub type StubHandle = std::sync::Arc<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>;

/// Memory is reserved in whole 2 MiB units.
const RESERVE_ALIGN: u64 = 2 << 20;

impl Reservation {
    /// Reserve `bytes` of resident memory for process `pid` (whose PID it takes here too).
    /// Blocks while the memory is made resident (about as long as first touch of that much).
    /// `stub` is set to the stub once it exists: killing it stops the reservation
    /// (`abandon`).
    /// `namespaces`: those the process made for itself, made around the stub now (the
    /// process is built in them later; `namespaces::restore` then has nothing to do).
    pub fn reserve(
        pid: i32,
        bytes: u64,
        stub: StubHandle,
        namespaces: Option<crate::namespaces::Namespaces>,
    ) -> Result<Reservation> {
        use std::sync::mpsc::channel;
        let namespaces = namespaces
            .filter(|n| n.mounts.is_empty())
            .unwrap_or_default();
        let ns = namespaces.clone();
        let mounts_seen = namespaces.mnt.then(mount_ids);
        let len = bytes.div_ceil(RESERVE_ALIGN).max(1) * RESERVE_ALIGN;
        let (tx, rx) = channel::<Result<((u64, u64), f64)>>();
        let (ctl, cmd) = channel::<bool>();
        let stub_pid = stub;
        let holder = std::thread::Builder::new()
            .name("ferry-reserve".into())
            .spawn(move || {
                let t0 = Instant::now();
                let stub = match spawn_stub(Some(pid)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                *stub_pid.lock().unwrap() = ferry_sys::net::pidfd_open(stub).ok();
                let frozen = match Frozen::freeze_owned(stub) {
                    Ok(f) => f,
                    Err(e) => {
                        crate::restore::kill_reap(stub);
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let mut t = Target::new(stub, frozen);
                let made = (|| -> Result<(u64, u64)> {
                    crate::restore::prepare(&mut t, &[])?;
                    crate::namespaces::restore(&mut t, &ns)?;
                    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
                    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
                    let a = t.sys(
                        "mmap of reserved memory",
                        libc::SYS_mmap,
                        [0, len, rw, flags, u64::MAX, 0],
                    )?;
                    // Done ahead, it must not take CPU time from the workloads here.
                    let idle = ferry_sys::sched::set_idle(t.pid, true).is_ok();
                    let r = t.sys(
                        &format!("making {} MiB of reserved memory resident", len >> 20),
                        libc::SYS_madvise,
                        [a, len, MADV_POPULATE_WRITE, 0, 0, 0],
                    );
                    if idle {
                        ferry_sys::sched::set_idle(t.pid, false)?;
                    }
                    r?;
                    Ok((a, a + len))
                })();
                let ok = made.is_ok();
                let _ = tx.send(made.map(|p| (p, t0.elapsed().as_secs_f64() * 1e3)));
                if ok && cmd.recv() == Ok(true) {
                    // It waits in pause, untraced, for the thread that builds it to seize it.
                    t.frozen.resume();
                } else {
                    t.frozen.kill();
                    crate::restore::kill_reap(stub);
                }
            })
            .map_err(|e| EngineError::Failed(format!("starting a thread: {e}")))?;
        match rx.recv() {
            Ok(Ok((pool, populate_ms))) => Ok(Reservation {
                pid,
                pool,
                namespaces,
                mounts_seen,
                populate_ms,
                ctl: Some(ctl),
                holder: Some(holder),
            }),
            Ok(Err(e)) => {
                let _ = holder.join();
                Err(e)
            }
            Err(_) => {
                let _ = holder.join();
                Err(EngineError::Failed(
                    "the thread reserving memory ended without a word".into(),
                ))
            }
        }
    }

    /// Stop a reservation under way (`reserve` on another thread, which then fails) or made:
    /// its stub, `stub` as set by `reserve`, is killed (through its pidfd: if it is gone
    /// already, nothing is).
    pub fn abandon(stub: &StubHandle) {
        if let Some(fd) = stub.lock().unwrap().as_ref() {
            let _ = ferry_sys::net::pidfd_kill(fd, libc::SIGKILL);
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.pool.1 - self.pool.0
    }

    /// The stub, running untraced (seize it at once), and where its reserved memory is.
    fn hand_over(mut self) -> (i32, (u64, u64)) {
        if let Some(c) = self.ctl.take() {
            let _ = c.send(true);
        }
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
        (self.pid, self.pool)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(c) = self.ctl.take() {
            let _ = c.send(false);
        }
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}

/// madvise(2): fault every page of a range in, writable (Linux 5.14).
const MADV_POPULATE_WRITE: u64 = 23;

/// The highest start, 2 MiB-aligned, of `len` free bytes below 0x7000_0000_0000 that stays a
/// 2 MiB gap away from every range of `taken` (so that it merges with none of them).
fn free_gap(taken: &[(u64, u64)], len: u64) -> Option<u64> {
    const LOW: u64 = 0x1000_0000;
    // Sorted and merged: ranges may nest (a stub's maps beside a layout's).
    let t: Vec<(u64, u64)> = taken.iter().copied().collect::<RangeSet>().runs().collect();
    let mut top = 0x7000_0000_0000u64;
    let fits = |lo: u64, top: u64| -> Option<u64> {
        let c = top.checked_sub(RESERVE_ALIGN + len)? & !(RESERVE_ALIGN - 1);
        (c >= lo.checked_add(RESERVE_ALIGN)?.max(LOW)).then_some(c)
    };
    for &(s, e) in t.iter().rev() {
        if s >= top {
            continue;
        }
        if let Some(c) = fits(e, top) {
            return Some(c);
        }
        top = s;
    }
    fits(0, top)
}

/// Mappings that a warm process can hold: no memory shared with another process of the tree
/// and no saved (unlinked) file.
fn warmable(m: &MappingImage) -> bool {
    match m.kind {
        MapKind::SharedAnon | MapKind::Hugetlb => false,
        MapKind::File => m.ghost.is_none(),
        _ => true,
    }
}

/// Two mappings that the restore would build the same way.
fn same_mapping(x: &MappingImage, y: &MappingImage) -> bool {
    x.start == y.start
        && x.end == y.end
        && (x.read, x.write, x.exec, x.shared) == (y.read, y.write, y.exec, y.shared)
        && x.kind == y.kind
        && x.path == y.path
        && x.offset == y.offset
        && x.shmem == y.shmem
        && x.ghost == y.ghost
        && x.advice == y.advice
}

/// What changed from layout `old` to `new`: the mappings of `old` that are gone, and those
/// of `new` that are to be made.
fn layout_diff<'a>(
    old: &'a [MappingImage],
    new: &'a [MappingImage],
) -> (Vec<&'a MappingImage>, Vec<&'a MappingImage>) {
    let by_start = |l: &'a [MappingImage]| {
        l.iter()
            .map(|m| (m.start, m))
            .collect::<std::collections::HashMap<u64, &MappingImage>>()
    };
    let (o, n) = (by_start(old), by_start(new));
    let kept = |m: &MappingImage, other: &std::collections::HashMap<u64, &MappingImage>| {
        other.get(&m.start).is_some_and(|x| same_mapping(m, x))
    };
    (
        old.iter().filter(|m| !kept(m, &n)).collect(),
        new.iter().filter(|m| !kept(m, &o)).collect(),
    )
}

/// The parts of gone mappings that stay in place: where a made mapping of lazily filled
/// memory is built like a gone one but for its bounds (an arena that grew, shrank or merged
/// with a neighbour), their overlap keeps its pages.
fn kept_in_place(gone: &[&MappingImage], made: &[&MappingImage]) -> RangeSet {
    let mut keep = RangeSet::default();
    for g in gone.iter().filter(|g| crate::memory::lazy_eligible(g)) {
        for m in made {
            let mut bounds = (*g).clone();
            (bounds.start, bounds.end) = (m.start, m.end);
            let (a, b) = (g.start.max(m.start), g.end.min(m.end));
            if a < b && same_mapping(&bounds, m) {
                keep.insert(a, b);
            }
        }
    }
    keep
}

/// Pages at an address, from an offset of pages.fimg: (address, offset, length).
pub(crate) type PageCopy = (u64, u64, u64);

/// Write the image's newer pages (`over`, from `fit`) into process `pid` on a thread of its
/// own, beside the rest of the restore; join it before the process runs.
pub(crate) fn write_over(
    pid: i32,
    map: std::sync::Arc<ferry_sys::mem::MappedFile>,
    over: Vec<PageCopy>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let bytes = map.bytes();
        let runs = over
            .iter()
            .map(|&(a, off, len)| {
                bytes
                    .get(off as usize..(off + len) as usize)
                    .map(|d| (a, d))
                    .ok_or_else(|| {
                        EngineError::Failed(format!(
                            "pages.fimg is shorter than it was verified (pages at {a:#x})"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        ferry_sys::mem::write_mem_runs(pid, &runs)?;
        ferry_sys::timeline::mark(|| format!("newer pages written over: {}", runs.len()));
        Ok(())
    })
}

/// A process created ahead of the freeze, stopped, with its memory laid out. Dropping it
/// kills it.
pub struct WarmTree {
    target: Option<Target>,
    /// Its lazily filled memory, registered with a userfaultfd of its own already.
    uffd: Option<ferry_sys::uffd::LazyUffd>,
    layout: WarmLayout,
    /// Where pre-copied pages are written in at once: memory not filled lazily.
    direct: RangeSet,
    /// The lazily filled memory (one range per mapping).
    lazy: RangeSet,
    /// Every page written into it.
    written: RangeSet,
    /// The pages written into lazily filled memory: held nowhere else.
    took: RangeSet,
    /// /proc/PID/mem of the process, for pages written again.
    mem: Option<std::fs::File>,
    pub built_ms: f64,
    /// Bytes of its memory moved in from a reservation (resident before any page came).
    pub moved_in: u64,
    /// Memory moved in from a reservation: present (zero where nothing came), so pages are
    /// written over there, not copied in with the userfaultfd.
    moved: RangeSet,
    /// Our mounts when its mount namespace was copied from ours: a mount made or removed
    /// here since would be missing from it (or still in it), so it is then not used.
    mounts_seen: Option<Vec<u32>>,
}

/// The IDs of our mounts, in mountinfo order (empty if unreadable).
fn mount_ids() -> Vec<u32> {
    ferry_sys::mount::read_mountinfo("self")
        .map(|m| m.iter().map(|m| m.id).collect())
        .unwrap_or_default()
}

/// The mappings of `layout` that reserved memory (`bytes` of it) goes into, largest first:
/// private anonymous memory (not a stack, which grows down, nor huge pages) at least three
/// quarters resident, so that few of the pages moved in stay zero.
fn worth_moving_in(layout: &WarmLayout, bytes: u64) -> Vec<&MappingImage> {
    let mut c: Vec<&MappingImage> = layout
        .mappings
        .iter()
        .zip(layout.resident_kb.iter().chain(std::iter::repeat(&0)))
        .filter(|(m, &kb)| {
            // Pre-copy tracks writable memory only: the rest would be dropped at the commit.
            crate::memory::lazy_eligible(m)
                && m.write
                && m.kind != MapKind::Stack
                && m.thp_kb == 0
                && !m.advice.iter().any(|a| a == "hugepage")
                && kb * 1024 * 4 >= (m.end - m.start) * 3
        })
        .map(|(m, _)| m)
        .collect();
    c.sort_by_key(|m| std::cmp::Reverse(m.end - m.start));
    let mut left = bytes;
    c.retain(|m| {
        let fits = m.end - m.start <= left;
        if fits {
            left -= m.end - m.start;
        }
        fits
    });
    c
}

/// Create the process of `layout` (its PID, its mappings), stopped, traced by the calling
/// thread (which must be the one that restores it later).
pub fn prebuild(layout: WarmLayout) -> Result<WarmTree> {
    prebuild_with(layout, None)
}

/// `prebuild`, from memory reserved ahead for the process when there is some (its largest,
/// mostly resident mappings of private anonymous memory are moved in from there).
pub fn prebuild_with(layout: WarmLayout, reserved: Option<Reservation>) -> Result<WarmTree> {
    let t0 = Instant::now();
    if let Some(m) = layout.mappings.iter().find(|m| !warmable(m)) {
        return Err(EngineError::Failed(format!(
            "mapping {:#x}-{:#x} cannot be built ahead",
            m.start, m.end
        )));
    }
    crate::memory::check_files(&layout.mappings)?;
    if !layout.namespaces.mounts.is_empty() {
        return Err(EngineError::Failed(
            "a process with mounts of its own cannot be built ahead".into(),
        ));
    }
    // Namespaces made at the reservation, or to be made now.
    let mut ns_made = false;
    let mut mounts_seen = None;
    let (stub, pool) = match reserved {
        Some(r)
            if r.pid == layout.pid
                && (r.namespaces.made_alike(&layout.namespaces)
                    || r.namespaces.made_alike(&Default::default())) =>
        {
            ns_made = r.namespaces.made_alike(&layout.namespaces);
            if ns_made {
                mounts_seen = r.mounts_seen.clone();
            }
            let (stub, pool) = r.hand_over();
            (stub, Some(pool))
        }
        other => {
            // Reserved for another PID, or in namespaces the process no longer has: let go
            // of it (and of the PID it holds) first.
            drop(other);
            (spawn_stub(Some(layout.pid))?, None)
        }
    };
    let frozen = match Frozen::freeze_owned(stub) {
        Ok(f) => f,
        Err(e) => {
            crate::restore::kill_reap(stub);
            return Err(e.into());
        }
    };
    let mut tree = WarmTree {
        target: Some(Target::new(stub, frozen)),
        uffd: None,
        direct: layout
            .mappings
            .iter()
            .filter(|m| !crate::memory::lazy_eligible(m) && m.kind == MapKind::File)
            .map(|m| (m.start, m.end))
            .collect(),
        lazy: layout
            .mappings
            .iter()
            .filter(|m| crate::memory::lazy_eligible(m))
            .map(|m| (m.start, m.end))
            .collect(),
        layout,
        written: RangeSet::default(),
        took: RangeSet::default(),
        mem: None,
        built_ms: 0.0,
        moved_in: 0,
        moved: RangeSet::default(),
        mounts_seen: None,
    };
    let t = tree.target.as_mut().unwrap();
    crate::restore::prepare(t, &tree.layout.mappings)?;
    if !ns_made {
        mounts_seen = tree.layout.namespaces.mnt.then(mount_ids);
        crate::namespaces::restore(t, &tree.layout.namespaces)?;
    }
    tree.mounts_seen = mounts_seen;
    // The reserved memory goes out of the way of the layout first (its pages move with it).
    let pool = match pool {
        Some((a, b)) => {
            let mut taken: Vec<(u64, u64)> = procfs::read_maps(stub)?
                .iter()
                .map(|m| (m.start, m.end))
                .collect();
            taken.extend(tree.layout.mappings.iter().map(|m| (m.start, m.end)));
            match free_gap(&taken, b - a) {
                Some(to) => {
                    t.sys(
                        "mremap of reserved memory out of the layout's way",
                        libc::SYS_mremap,
                        [
                            a,
                            b - a,
                            b - a,
                            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                            to,
                            0,
                        ],
                    )?;
                    Some((to, to + (b - a)))
                }
                // No room for it beside the layout: built without it (the layout's own
                // unmapping of the stub's memory takes it).
                None => None,
            }
        }
        None => None,
    };
    crate::memory::restore_layout(
        t,
        &tree.layout.mappings,
        &mut Default::default(),
        &Default::default(),
        pool,
    )?;
    if let Some(pool) = pool {
        let chosen = worth_moving_in(&tree.layout, pool.1 - pool.0);
        let moved = crate::memory::move_in(t, pool, &chosen)?;
        // Present already (zero where nothing comes): written over like pages sent again, and
        // held here only.
        for (s, e) in moved {
            tree.written.insert(s, e);
            tree.moved.insert(s, e);
            tree.moved_in += e - s;
        }
    }
    // Registered before anything is written there, as the restore would.
    let uffd = ferry_sys::uffd::LazyUffd::new(&mut t.frozen)?;
    for m in tree
        .layout
        .mappings
        .iter()
        .filter(|m| crate::memory::lazy_eligible(m))
    {
        uffd.register(m.start, m.end)?;
    }
    tree.uffd = Some(uffd);
    let path = format!("/proc/{stub}/mem");
    tree.mem = Some(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EngineError::Failed(format!("opening {path}: {e}")))?,
    );
    tree.built_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(tree)
}

impl WarmTree {
    pub fn pid(&self) -> i32 {
        self.layout.pid
    }

    /// Pre-copied pages of process `pid` at `addr`, written into the warm process where its
    /// layout has memory for them. With `lazy_too`, that includes its lazily filled memory,
    /// whose pages are then held only here. Returns the parts of [addr, end) that the page
    /// store must hold: all but those.
    pub fn write(
        &mut self,
        pid: i32,
        addr: u64,
        data: &[u8],
        lazy_too: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let end = addr + data.len() as u64;
        if self.target.is_none() || pid != self.layout.pid {
            return Ok(vec![(addr, end)]);
        }
        for (a, b) in self.direct.within(addr, end) {
            let off = (a - addr) as usize;
            self.write_mem(a, &data[off..off + (b - a) as usize])?;
            self.written.insert(a, b);
        }
        if !lazy_too {
            return Ok(vec![(addr, end)]);
        }
        for (a, b) in self.lazy.within(addr, end) {
            self.write_lazy(a, &data[(a - addr) as usize..(b - addr) as usize])?;
        }
        Ok(self.lazy.gaps(addr, end))
    }

    fn write_mem(&self, at: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        // Read-only memory (relocated library data) takes /proc/PID/mem.
        let n = ferry_sys::mem::write_mem_vm(self.layout.pid, at, data)?;
        let (at, data) = (at + n as u64, &data[n..]);
        if data.is_empty() {
            return Ok(());
        }
        let f = self.mem.as_ref().expect("a warm tree has its memory open");
        f.write_all_at(data, at).map_err(|e| {
            EngineError::Failed(format!(
                "writing {} bytes at {at:#x} of the warm process {}: {e}",
                data.len(),
                self.layout.pid
            ))
        })
    }

    /// Pages of one lazily filled mapping: copied in where absent (which also maps them),
    /// written over where sent before.
    fn write_lazy(&mut self, at: u64, data: &[u8]) -> Result<()> {
        let end = at + data.len() as u64;
        // Written here before (true), or present since it was moved in from a reservation
        // (true), or missing (false).
        let mut pieces: Vec<(u64, u64, bool)> = self
            .took
            .within(at, end)
            .into_iter()
            .map(|(a, b)| (a, b, true))
            .collect();
        for (s, e) in self.took.gaps(at, end) {
            pieces.extend(
                self.moved
                    .within(s, e)
                    .into_iter()
                    .map(|(a, b)| (a, b, true)),
            );
            pieces.extend(
                self.moved
                    .gaps(s, e)
                    .into_iter()
                    .map(|(a, b)| (a, b, false)),
            );
        }
        let uffd = self.uffd.as_ref().expect("a warm tree has its userfaultfd");
        for (a, b, present) in pieces {
            let d = &data[(a - at) as usize..(b - at) as usize];
            if present {
                self.write_mem(a, d)?;
                self.took.insert(a, b);
                continue;
            }
            let mut off = 0u64;
            while off < b - a {
                match uffd.copy(a + off, &d[off as usize..])? {
                    ferry_sys::uffd::Fill::Done => off = b - a,
                    ferry_sys::uffd::Fill::Exists(n) => {
                        // Present although never written here: written over, as any page
                        // sent again.
                        let p = a + off + n;
                        let o = (off + n) as usize;
                        self.write_mem(p, &d[o..o + 4096])?;
                        off += n + 4096;
                    }
                    f => {
                        return Err(EngineError::Failed(format!(
                            "UFFDIO_COPY at {:#x} of the warm process {}: {f:?}",
                            a + off,
                            self.layout.pid
                        )))
                    }
                }
            }
            self.took.insert(a, b);
            self.written.insert(a, b);
        }
        Ok(())
    }

    /// Bytes held only by the warm process (pages of its lazily filled memory).
    pub fn holds_alone(&self) -> u64 {
        self.took.bytes()
    }

    /// Read out the pages held only here, for `put(address, bytes)` to keep, before the warm
    /// process is dropped. Returns the bytes read.
    pub fn salvage(&self, put: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let (Some(f), Some(_)) = (&self.mem, &self.target) else {
            return Ok(0);
        };
        const MAX: u64 = 1 << 20;
        let mut buf = vec![0u8; MAX as usize];
        let mut n = 0;
        for (s, e) in self.took.runs() {
            let mut a = s;
            while a < e {
                let len = (e - a).min(MAX);
                let b = &mut buf[..len as usize];
                f.read_exact_at(b, a).map_err(|err| {
                    EngineError::Failed(format!(
                        "reading pages at {a:#x} back from the warm process {}: {err}",
                        self.layout.pid
                    ))
                })?;
                put(a, b)?;
                a += len;
                n += len;
            }
        }
        Ok(n)
    }

    /// Makes the warm process the final image's, if it can be: one process, the same PID,
    /// every mapping that changed since it was built made again (unmapped, mapped, registered
    /// if lazily filled), and dropped: the pages written into it that `valid` (the memory
    /// whose pre-copied pages still hold: the mappings the source still tracked) does not
    /// cover, and those left in the source to fetch (post-copy's `MappingImage::lazy`). Ok:
    /// how many mappings were made again, and the pages written into it that the image has
    /// newer copies of (`newer`: its blocks, as address, offset in pages.fimg and length),
    /// as (address, offset, length): the caller writes them over before the process runs.
    /// Err: why it cannot be used (it is then only fit to be killed, after `salvage`).
    pub(crate) fn fit(
        &mut self,
        imgs: &[ProcessImage],
        zombies: &[ZombieImage],
        valid: &[(u64, u64)],
        newer: &[(u64, u64, u64)],
    ) -> std::result::Result<(usize, Vec<PageCopy>), String> {
        if imgs.len() != 1 || !zombies.is_empty() {
            return Err("the tree has more than one process".into());
        }
        let img = &imgs[0];
        if img.pid != self.layout.pid {
            return Err(format!(
                "it is process {}, not {}",
                img.pid, self.layout.pid
            ));
        }
        if !self.layout.namespaces.made_alike(&img.namespaces) {
            return Err("its namespaces changed since it was built".into());
        }
        if self.mounts_seen.as_ref().is_some_and(|m| *m != mount_ids()) {
            return Err("the mounts here changed since its mount namespace was made".into());
        }
        let valid_set: RangeSet = valid.iter().copied().collect();
        let old = self.layout.mappings.clone();
        let (gone, made) = layout_diff(&old, &img.mappings);
        if let Some(m) = gone
            .iter()
            .chain(&made)
            .find(|m| crate::memory::kernel_area(m.kind))
        {
            return Err(format!("its {:?} area moved", m.kind));
        }
        if let Some(m) = made.iter().find(|m| !warmable(m)) {
            return Err(format!(
                "mapping {:#x}-{:#x} ({:?}) appeared since it was built",
                m.start, m.end, m.kind
            ));
        }
        let keep = kept_in_place(&gone, &made);
        let mut unmap: RangeSet = gone.iter().map(|g| (g.start, g.end)).collect();
        for (s, e) in keep.runs() {
            unmap.remove(s, e);
        }
        // Pages held only here and still valid at the source must not be unmapped.
        for (s, e) in unmap.runs() {
            for (a, b) in self.took.within(s, e) {
                if !valid_set.within(a, b).is_empty() {
                    return Err(format!(
                        "mapping {s:#x}-{e:#x} changed in a way that would lose its pre-copied \
                         pages"
                    ));
                }
            }
        }
        // From here on, an error leaves it only fit to be killed.
        let changed = made.len().max(gone.len());
        if changed > 0 {
            self.remake(&gone, &made, &keep)
                .map_err(|e| format!("remaking {changed} changed mappings: {e}"))?;
        }
        self.layout.mappings = img.mappings.clone();
        let mut stale = self.written.clone();
        for (s, e) in valid_set.runs() {
            stale.remove(s, e);
        }
        for m in &img.mappings {
            for &(s, e) in &m.lazy {
                for (a, b) in self.written.within(s, e) {
                    stale.insert(a, b);
                }
            }
        }
        // The image's pages are the newest: written over what pre-copy sent (by the caller,
        // beside the rest of the restore), not dropped.
        let mut over: Vec<PageCopy> = Vec::new();
        for &(s, off, len) in newer {
            for (a, b) in self.written.within(s, s + len) {
                over.push((a, off + (a - s), b - a));
                stale.remove(a, b);
            }
        }
        ferry_sys::timeline::mark(|| {
            format!(
                "fit: {} stale runs, {} bytes; written {} runs",
                stale.runs().count(),
                stale.bytes(),
                self.written.runs().count()
            )
        });
        if !stale.is_empty() {
            self.drop_pages(&stale)
                .map_err(|e| format!("dropping {} stale bytes: {e}", stale.bytes()))?;
        }
        Ok((changed, over))
    }

    /// Drop the pages of `stale` (MADV_DONTNEED): lazily filled memory becomes missing again
    /// (the filler puts the final image's pages there, or zeros), file pages read the file's.
    fn drop_pages(&mut self, stale: &RangeSet) -> Result<()> {
        let t = self.target.as_mut().expect("a warm tree holds its process");
        let uffd = self.uffd.as_ref();
        // An madvise of registered memory waits until its event is read.
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            if let Some(u) = uffd {
                let done = &done;
                s.spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if u.wait(1) {
                            let _ = u.events();
                        }
                    }
                });
            }
            let r = (|| -> Result<()> {
                for (a, b) in stale.runs() {
                    t.queue(
                        "madvise(MADV_DONTNEED) of a stale pre-copied page",
                        libc::SYS_madvise,
                        [a, b - a, libc::MADV_DONTNEED as u64, 0, 0, 0],
                    )?;
                }
                t.flush()
            })();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        });
        for (a, b) in stale.runs() {
            self.written.remove(a, b);
            self.took.remove(a, b);
            self.moved.remove(a, b);
        }
        r
    }

    /// Unmaps `gone` and maps `made` (which do not overlap the mappings kept), but for
    /// `keep`: memory that stays where it is.
    fn remake(
        &mut self,
        gone: &[&MappingImage],
        made: &[&MappingImage],
        keep: &RangeSet,
    ) -> Result<()> {
        let t = self.target.as_mut().expect("a warm tree holds its process");
        for m in gone {
            for (s, e) in keep.gaps(m.start, m.end) {
                // Registered memory: unmapped, it would wait for a reader of the event.
                if crate::memory::lazy_eligible(m) {
                    if let Some(u) = &self.uffd {
                        u.unregister(s, e)?;
                    }
                }
                t.queue(
                    "munmap of a changed mapping",
                    libc::SYS_munmap,
                    [s, e - s, 0, 0, 0, 0],
                )?;
                self.written.remove(s, e);
                self.took.remove(s, e);
                self.moved.remove(s, e);
                self.direct.remove(s, e);
                self.lazy.remove(s, e);
            }
        }
        let mut pieces: Vec<MappingImage> = Vec::new();
        for m in made {
            for (s, e) in keep.gaps(m.start, m.end) {
                let mut p = (*m).clone();
                if p.kind == MapKind::File {
                    p.offset += s - m.start;
                }
                (p.start, p.end) = (s, e);
                pieces.push(p);
            }
        }
        crate::memory::map_each(
            t,
            pieces.iter(),
            &mut Default::default(),
            &Default::default(),
        )?;
        t.flush()?;
        for p in pieces.iter().filter(|p| crate::memory::lazy_eligible(p)) {
            if let Some(u) = &self.uffd {
                u.register(p.start, p.end)?;
            }
            self.lazy.insert(p.start, p.end);
        }
        Ok(())
    }

    /// The process, for the restore to finish, the userfaultfd of its lazily filled memory,
    /// and the ranges already written into it.
    pub(crate) fn take(mut self) -> (Target, Option<ferry_sys::uffd::LazyUffd>, RangeSet) {
        let t = self.target.take().expect("a warm tree holds its process");
        (t, self.uffd.take(), std::mem::take(&mut self.written))
    }
}

impl Drop for WarmTree {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            let pid = t.pid;
            t.frozen.kill();
            crate::restore::kill_reap(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, kind: MapKind) -> MappingImage {
        MappingImage {
            start,
            end: start + 4096,
            read: true,
            write: true,
            exec: false,
            shared: false,
            kind,
            path: None,
            offset: 0,
            file_size: None,
            file_mtime: None,
            pages_saved: 0,
            lazy: Vec::new(),
            shmem: None,
            ghost: None,
            advice: Vec::new(),
            thp_kb: 0,
            huge_page_kb: 0,
        }
    }

    #[test]
    fn reserved_memory_goes_to_a_gap_clear_of_everything() {
        const M: u64 = 2 << 20;
        let top = 0x7000_0000_0000u64;
        // Nothing taken: just under the top, aligned.
        assert_eq!(free_gap(&[], 10 * M), Some(top - 11 * M));
        // A mapping near the top: below it, a 2 MiB gap away.
        let taken = [(top - 5 * M, top - 4 * M)];
        let g = free_gap(&taken, 10 * M).unwrap();
        assert!(
            g + 10 * M + M <= top - 5 * M && g.is_multiple_of(M),
            "{g:#x}"
        );
        // Too small a gap between two mappings is skipped.
        let taken = [(top - 20 * M, top - 10 * M), (top - 8 * M, top - M)];
        let g = free_gap(&taken, 4 * M).unwrap();
        assert!(g + 5 * M <= top - 20 * M, "{g:#x}");
        // No room at all.
        assert_eq!(free_gap(&[(0, top)], M), None);
        // Nested ranges (a stub's maps beside a layout's): nothing inside the outer one.
        let taken = [(top - 40 * M, top - M), (top - 30 * M, top - 29 * M)];
        let g = free_gap(&taken, 4 * M).unwrap();
        assert!(g + 5 * M <= top - 40 * M, "{g:#x}");
    }

    #[test]
    fn reserved_memory_goes_to_the_largest_mostly_resident_anonymous_mappings() {
        let big = |start: u64, pages: u64, kind: MapKind| {
            let mut x = m(start, kind);
            x.end = start + pages * 4096;
            x
        };
        let mut file = big(0x100_0000, 256, MapKind::File);
        file.path = Some("/lib/x.so".into());
        let layout = WarmLayout {
            pid: 1,
            mappings: vec![
                big(0x1000_0000, 1024, MapKind::Anon), // 4 MiB, all resident
                big(0x2000_0000, 2048, MapKind::Anon), // 8 MiB, a quarter resident
                big(0x3000_0000, 512, MapKind::Heap),  // 2 MiB, all resident
                big(0x4000_0000, 256, MapKind::Stack), // a stack grows down: never
                file,                                  // not anonymous: never
            ],
            resident_kb: vec![4096, 2048, 2048, 1024, 1024],
            namespaces: Default::default(),
        };
        let pick = |bytes: u64| -> Vec<u64> {
            worth_moving_in(&layout, bytes)
                .iter()
                .map(|m| m.start)
                .collect()
        };
        assert_eq!(pick(64 << 20), vec![0x1000_0000, 0x3000_0000]);
        // What does not fit in the reservation is left out.
        assert_eq!(pick(5 << 20), vec![0x1000_0000]);
        assert_eq!(pick(3 << 20), vec![0x3000_0000]);
    }

    #[test]
    fn layouts_differ_by_what_the_restore_builds() {
        let a = vec![m(0x1000, MapKind::Anon), m(0x3000, MapKind::Heap)];
        let mut b = a.clone();
        // Pages saved and huge pages counted do not change what is built.
        b[0].pages_saved = 1;
        b[1].thp_kb = 2048;
        let starts = |l: Vec<&MappingImage>| l.iter().map(|m| m.start).collect::<Vec<_>>();
        let (gone, made) = layout_diff(&a, &b);
        assert!(gone.is_empty() && made.is_empty());
        b[1].write = false;
        let (gone, made) = layout_diff(&a, &b);
        assert_eq!((starts(gone), starts(made)), (vec![0x3000], vec![0x3000]));
        let (gone, made) = layout_diff(&a, &a[..1]);
        assert_eq!((starts(gone), starts(made)), (vec![0x3000], vec![]));
        let mut c = a.clone();
        c[0].advice.push("dontfork".into());
        c.push(m(0x9000, MapKind::Anon));
        let (gone, made) = layout_diff(&a, &c);
        assert_eq!(
            (starts(gone), starts(made)),
            (vec![0x1000], vec![0x1000, 0x9000])
        );
        // A heap that grew is made again.
        let mut d = a.clone();
        d[1].end += 0x4000;
        let (gone, made) = layout_diff(&a, &d);
        assert_eq!((starts(gone), starts(made)), (vec![0x3000], vec![0x3000]));
    }

    #[test]
    fn memory_that_grew_or_merged_stays_in_place() {
        let grown = |s: u64, e: u64, kind| {
            let mut x = m(s, kind);
            x.end = e;
            x
        };
        let old = [
            grown(0x10000, 0x20000, MapKind::Anon),
            grown(0x40000, 0x50000, MapKind::Heap),
            grown(0x80000, 0x90000, MapKind::Anon),
        ];
        let mut ro = grown(0x80000, 0x90000, MapKind::Anon);
        ro.write = false;
        let new = [
            // Grew at both ends: the old range stays.
            grown(0x8000, 0x28000, MapKind::Anon),
            // Shrank: its remaining part stays.
            grown(0x40000, 0x48000, MapKind::Heap),
            // Made read-only: built again.
            ro,
        ];
        let (gone, made) = layout_diff(&old, &new);
        let keep = kept_in_place(&gone, &made);
        assert_eq!(
            keep.runs().collect::<Vec<_>>(),
            vec![(0x10000, 0x20000), (0x40000, 0x48000)]
        );
        // A file mapping is never kept: its pages are the file's.
        let f = [grown(0x10000, 0x20000, MapKind::File)];
        let g = [grown(0x10000, 0x30000, MapKind::File)];
        let (gone, made) = layout_diff(&f, &g);
        assert!(kept_in_place(&gone, &made).is_empty());
    }

    #[test]
    fn shared_and_saved_files_are_not_built_ahead() {
        assert!(warmable(&m(0, MapKind::Anon)));
        assert!(!warmable(&m(0, MapKind::SharedAnon)));
        let mut f = m(0, MapKind::File);
        assert!(warmable(&f));
        f.ghost = Some(7);
        assert!(!warmable(&f));
    }
}
