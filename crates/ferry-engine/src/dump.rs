//! `ferry dump`: freeze, collect, stream, verify, then kill or resume.

use crate::schema::{ProcessImage, ZombieImage, TAG_PROCESS, TAG_ZOMBIE};
use crate::timing::{Lap, Steps};
use crate::{files, memory, mm, regs, signals, EngineError, Result};
use ferry_image::{ImageReader, ImageWriter};
use ferry_sys::{procfs, Frozen};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leave {
    /// Kill the process once the image is complete and verified (the default).
    #[default]
    Killed,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub leave: Leave,
    /// Told how much memory has been read (`Phase::Memory`).
    pub progress: crate::Progress,
}

#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub processes: usize,
    pub threads: usize,
    pub mappings: usize,
    pub pages: u64,
    pub bytes: u64,
    /// Time the process was stopped.
    pub frozen_ms: f64,
    /// Time to seize and interrupt every thread of the tree.
    pub freeze_ms: f64,
    /// Time to collect everything but memory (registers, files, signals, ...).
    pub collect_ms: f64,
    /// Time to read the memory and write it into the image.
    pub memory_ms: f64,
    /// Time to sync the image and read it back whole.
    pub verify_ms: f64,
    pub total_ms: f64,
    /// Page bytes over memory_ms.
    pub gb_per_s: f64,
    pub left: String,
}

fn children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for tid in procfs::list_threads(pid).unwrap_or_default() {
        let s =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        v.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
    }
    v
}

/// RssAnon + RssShmem of a process, KiB (0 when unreadable).
fn resident_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("RssAnon:")
                .or_else(|| l.strip_prefix("RssShmem:"))
        })
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum()
}

/// Everything but memory, for one frozen process.
fn collect(
    frozen: &mut Frozen,
    seen: &mut files::Seen,
    socks: &mut crate::sockets::DumpState,
    tree: &[i32],
    steps: &mut Steps,
) -> Result<(ProcessImage, Vec<procfs::Mapping>)> {
    let pid = frozen.pid();
    let mut lap = Lap::new();
    // Where BPF serves: every thread's clear-child-tid address and alternate stack in one
    // pass, not two injected syscalls per thread.
    let known: std::collections::HashMap<i32, ferry_sys::taskstate::TaskState> =
        ferry_sys::taskstate::threads(pid)
            .map(|v| v.into_iter().map(|t| (t.tid, t)).collect())
            .unwrap_or_default();
    ferry_sys::timeline::mark(|| "thread states read".into());
    let mut threads = regs::dump(frozen, &known)?;
    lap.mark(steps, "registers");
    for th in threads.iter_mut() {
        (th.sigaltstack, th.pending) = signals::dump_thread(frozen, th.tid, known.get(&th.tid))?;
    }
    let (shared_pending, itimers) = signals::dump_process(frozen)?;
    let posix_timers = signals::dump_timers(frozen)?;
    lap.mark(steps, "signals_timers");
    let maps = procfs::read_maps(pid)?;
    let st = procfs::read_status(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    let umask = field("Umask:")
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022);
    let ppid = field("PPid:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut ghosts = Vec::new();
    lap.mark(steps, "maps_status");
    let (fds, pipes, fifos, sockets) = files::dump(pid, seen, &mut ghosts, socks, tree)?;
    lap.mark(steps, "files_sockets");
    let mm = mm::dump(pid, frozen)?;
    lap.mark(steps, "mm");
    let sigactions = signals::dump(frozen)?;
    lap.mark(steps, "sigactions");
    let attrs = crate::attrs::dump(frozen)?;
    let exe = procfs::read_exe(pid)?.display().to_string();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .map_err(|e| EngineError::Failed(format!("reading /proc/{pid}/root: {e}")))?
        .display()
        .to_string();
    lap.mark(steps, "attrs");
    let img = ProcessImage {
        pid,
        ppid,
        comm: st.name,
        exe,
        threads,
        mappings: Vec::new(),
        mm,
        fds,
        sigactions,
        cwd,
        root: (root != "/").then_some(root),
        umask,
        pipes,
        fifos,
        shared_pending,
        itimers,
        posix_timers,
        ghosts,
        attrs,
        sockets,
        namespaces: Default::default(),
    };
    Ok((img, maps))
}

fn zombie(pid: i32, ppid: i32) -> Result<ZombieImage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| EngineError::Failed(format!("reading /proc/{pid}/stat: {e}")))?;
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    // Field 52 (exit_code) is the 50th after the command name.
    let status = rest
        .split_whitespace()
        .nth(49)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ZombieImage { pid, ppid, status })
}

/// Refuse a tree member whose state this version cannot carry: stopped by a signal (it would
/// come back running) or whose main thread exited (pthread_exit) while others run on. Other
/// threads seen exited are on their way out (the kernel reaps them at once): the freeze
/// does not find them.
fn check_member(pid: i32) -> Result<()> {
    let st = procfs::read_status(pid)?;
    if st.state == 'T' {
        return Err(EngineError::Unsupported {
            pid,
            what: "it is stopped by a signal (SIGSTOP or SIGTSTP): continue it (kill -CONT) before the dump".into(),
        });
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap_or_default();
    if s.rsplit_once(')')
        .map(|(_, r)| r.trim_start().starts_with('Z'))
        .unwrap_or(false)
    {
        return Err(EngineError::Unsupported {
            pid,
            what: format!(
                "its main thread {pid} has exited but is not reaped while other threads run on \
                 (a zombie thread)"
            ),
        });
    }
    Ok(())
}

/// Check and freeze child `c` of the tree. A child that exits meanwhile is not part of the
/// tree (gone: None) or is one of its zombies (`Some(Err(zombie))`); anything else that
/// fails stops the dump.
fn freeze_child(c: i32, parent: i32) -> Result<Option<std::result::Result<Frozen, ZombieImage>>> {
    let exited = |e: EngineError| -> Result<Option<std::result::Result<Frozen, ZombieImage>>> {
        // It may have been exiting: then it is a zombie now (its parent, frozen, cannot reap
        // it) or, at worst, gone.
        for _ in 0..20 {
            match procfs::check_inspectable(c) {
                Err(ferry_sys::Error::Zombie(_)) => return Ok(Some(Err(zombie(c, parent)?))),
                Err(ferry_sys::Error::NoSuchProcess(_)) => return Ok(None),
                _ => std::thread::sleep(std::time::Duration::from_micros(500)),
            }
        }
        Err(e)
    };
    match procfs::check_inspectable(c) {
        Err(ferry_sys::Error::Zombie(_)) => return Ok(Some(Err(zombie(c, parent)?))),
        Err(ferry_sys::Error::NoSuchProcess(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    if let Err(e) = check_member(c) {
        return exited(e);
    }
    match Frozen::freeze(c) {
        Ok(f) => Ok(Some(Ok(f))),
        // Also "no such process": a zombie has no thread left to seize, yet its parent
        // will wait for it.
        Err(e) => exited(e.into()),
    }
}

/// Freeze `pid` and all its descendants, parents before children; zombies are recorded.
fn freeze_tree(pid: i32, zombies: &mut Vec<ZombieImage>) -> Result<Vec<Frozen>> {
    check_member(pid)?;
    let mut tree = vec![Frozen::freeze(pid)?];
    let mut i = 0;
    while i < tree.len() {
        for c in children(tree[i].pid()) {
            if tree.iter().any(|f| f.pid() == c) {
                continue;
            }
            match freeze_child(c, tree[i].pid())? {
                Some(Ok(f)) => tree.push(f),
                Some(Err(z)) => zombies.push(z),
                None => {}
            }
        }
        i += 1;
    }
    Ok(tree)
}

/// What `dump_into` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DumpStats {
    pub processes: usize,
    pub threads: usize,
    pub mappings: usize,
    pub freeze_ms: f64,
    pub collect_ms: f64,
    pub memory_ms: f64,
    /// Milliseconds (and injected syscalls) per step of the frozen part.
    pub steps: Steps,
}

/// For pre-copy: per process, the memory the receiver already holds (tracked ranges) and the
/// parts of it written since (dirty ranges), decided once the tree is frozen.
/// Called with the PID and its smaps (read once, for the dump and for the delta: it costs
/// about 18 ms per GiB mapped).
pub type DeltaFn<'a> = dyn FnMut(i32, &[procfs::SmapsEntry]) -> Result<Option<memory::Delta>> + 'a;

/// A frozen tree whose image has been written. `kill` ends it (it lives on elsewhere);
/// dropping it, or `resume`, lets it run on as before.
pub struct Held {
    // Dropped first: sockets leave repair mode and traffic flows before the tree resumes.
    net: NetGuard,
    tree: Vec<Frozen>,
    ppids: Vec<i32>,
    zombies: Vec<ZombieImage>,
    since: Instant,
    /// smaps read before the freeze and used in the image: `check_smaps` compares them with
    /// the frozen processes'.
    hinted: Vec<(i32, Vec<procfs::SmapsEntry>)>,
    /// The frozen processes' smaps against the hint, read on a thread from the end of the
    /// collection on (per PID).
    smaps_check: Option<std::thread::JoinHandle<SmapsVerdicts>>,
}

/// The smaps of a frozen process's mappings `maps`, from a hint read while it ran: a mapping
/// the hint holds as it is now, or one that grew, shrank or was cut since (a heap's brk, an
/// allocator's arena), which takes the flags of the hinted mappings it overlaps: a mapping's
/// flags are one set, and `check_smaps_of` compares them with the frozen process's own later.
/// None (read smaps now) when a mapping overlaps nothing hinted, overlaps hinted ones that
/// disagree, or changed its protection since.
fn smaps_from_hint(
    maps: &[procfs::Mapping],
    hint: &[procfs::SmapsEntry],
) -> Option<Vec<procfs::SmapsEntry>> {
    let has = |f: &[String], x: &str| f.iter().any(|v| v == x);
    maps.iter()
        .map(|m| {
            if let Some(h) = hint.iter().find(|h| h.start == m.start && h.end == m.end) {
                return Some(h.clone());
            }
            let mut over = overlapping(hint, m);
            let first = over.next()?;
            if over
                .any(|h| h.vm_flags != first.vm_flags || h.kernel_page_kb != first.kernel_page_kb)
            {
                return None;
            }
            let thp = overlapping(hint, m).map(|h| h.anon_huge_kb).sum();
            let f = &first.vm_flags;
            let prot_same = has(f, "rd") == m.read
                && has(f, "wr") == m.write
                && has(f, "ex") == m.exec
                && has(f, "sh") == m.shared;
            prot_same.then(|| procfs::SmapsEntry {
                start: m.start,
                end: m.end,
                vm_flags: first.vm_flags.clone(),
                kernel_page_kb: first.kernel_page_kb,
                anon_huge_kb: thp,
                ..Default::default()
            })
        })
        .collect()
}

/// The entries of `hint` that overlap mapping `m`.
fn overlapping<'a>(
    hint: &'a [procfs::SmapsEntry],
    m: &'a procfs::Mapping,
) -> impl Iterator<Item = &'a procfs::SmapsEntry> {
    hint.iter().filter(|h| h.start < m.end && m.start < h.end)
}

/// Make ready now what a dump would otherwise set up while the tree is frozen: resident
/// buffers for the pages, and the BPF program that reads mapping flags. Without BPF, smaps
/// serves (slower, as it walks the page tables): the error says why BPF cannot.
pub fn prepare_for_freeze() -> Result<()> {
    // Faulting the buffers in (~9 ms) need not hold up the caller: the freeze is far off.
    std::thread::spawn(memory::warm_buffers);
    // Signal dispositions and thread state fall back to other readers quietly: only slower.
    Ok(ferry_sys::vmaflags::prepare_all()?)
}

/// The smaps entries of a frozen process's mappings `maps` from its own `vm_flags` (read with
/// BPF), carrying the VmFlags codes the image uses: protection, advice, hugetlb and
/// userfaultfd registration. Transparent huge pages, which only smaps counts, come from the
/// hint's entries that overlap the mapping. None (use smaps) when a mapping is missing from
/// `flags` or is hugetlb memory, whose page size only smaps shows.
fn smaps_from_flags(
    maps: &[procfs::Mapping],
    flags: &[ferry_sys::vmaflags::VmaFlags],
    hint: Option<&Vec<procfs::SmapsEntry>>,
) -> Option<Vec<procfs::SmapsEntry>> {
    use ferry_sys::vmaflags::bits;
    const CODES: [(u64, &str); 13] = [
        (bits::READ, "rd"),
        (bits::WRITE, "wr"),
        (bits::EXEC, "ex"),
        (bits::SHARED, "sh"),
        (bits::DONTCOPY, "dc"),
        (bits::HUGETLB, "ht"),
        (bits::WIPEONFORK, "wf"),
        (bits::DONTDUMP, "dd"),
        (bits::HUGEPAGE, "hg"),
        (bits::NOHUGEPAGE, "nh"),
        (bits::MERGEABLE, "mg"),
        (bits::UFFD_MISSING, "um"),
        (bits::UFFD_WP, "uw"),
    ];
    maps.iter()
        .map(|m| {
            if m.kind == procfs::MapKind::Vsyscall {
                // Not a mapping of the process's own (the kernel's page, shown in maps):
                // nothing to iterate, nothing the image saves.
                return Some(procfs::SmapsEntry {
                    start: m.start,
                    end: m.end,
                    vm_flags: vec!["ex".into()],
                    kernel_page_kb: 4,
                    anon_huge_kb: 0,
                    ..Default::default()
                });
            }
            let f = flags
                .iter()
                .find(|f| f.start == m.start && f.end == m.end)?;
            if f.flags & bits::HUGETLB != 0 {
                return None;
            }
            let thp = hint.map_or(0, |h| overlapping(h, m).map(|h| h.anon_huge_kb).sum());
            Some(procfs::SmapsEntry {
                start: m.start,
                end: m.end,
                vm_flags: CODES
                    .iter()
                    .filter(|(b, _)| f.flags & b != 0)
                    .map(|(_, c)| c.to_string())
                    .collect(),
                kernel_page_kb: 4,
                anon_huge_kb: thp,
                ..Default::default()
            })
        })
        .collect()
}

/// The smaps a dump used for process `pid` (from a hint) against its frozen own: an error
/// names the first mapping whose flags changed in between.
fn check_smaps_of(pid: i32, used: &[procfs::SmapsEntry]) -> Result<()> {
    // "uw" is pre-copy's own registration: a mapping registered while the hint was read went
    // whole into the image, which is safe; one no longer registered is not.
    let uw = |f: &[String]| f.iter().any(|x| x == "uw");
    let rest = |f: &[String]| f.iter().filter(|x| *x != "uw").cloned().collect::<Vec<_>>();
    for n in &procfs::read_smaps(pid)? {
        let same = used.iter().any(|u| {
            u.start == n.start
                && u.end == n.end
                && u.kernel_page_kb == n.kernel_page_kb
                && (!uw(&u.vm_flags) || uw(&n.vm_flags))
                && rest(&u.vm_flags) == rest(&n.vm_flags)
        });
        if !same {
            return Err(EngineError::Failed(format!(
                "process {pid}: mapping {:#x}-{:#x} changed its flags ({}) just before the \
                 freeze; the image taken with the earlier ones is dropped",
                n.start,
                n.end,
                n.vm_flags.join(" ")
            )));
        }
    }
    Ok(())
}

/// Per PID, whether its smaps still match the hint.
type SmapsVerdicts = Vec<(i32, Result<()>)>;

/// smaps of processes read just before the freeze, by PID. Reading smaps walks every page
/// table (about 18 ms per GiB mapped): with a hint the dump reads it while the tree runs,
/// and `Held::check_smaps` makes sure, later, that nothing in it changed.
pub type SmapsHint = std::collections::HashMap<i32, Vec<procfs::SmapsEntry>>;

impl Held {
    pub fn pids(&self) -> Vec<i32> {
        self.tree.iter().map(|f| f.pid()).collect()
    }

    /// The smaps the image was made from, where they came from a hint, against the frozen
    /// processes' own: an error names the first mapping whose flags changed in between (the
    /// image would be wrong: drop it and resume). Read while the tree is still frozen.
    pub fn check_smaps(&mut self) -> Result<()> {
        let Some(job) = self.smaps_check.take() else {
            return self
                .hinted
                .iter()
                .try_for_each(|(pid, used)| check_smaps_of(*pid, used));
        };
        let mut results: std::collections::HashMap<i32, Result<()>> = job
            .join()
            .map_err(|_| EngineError::Failed("the smaps check panicked".into()))?
            .into_iter()
            .collect();
        // Only the processes whose image used the hint count.
        for (pid, used) in &self.hinted {
            match results.remove(pid) {
                Some(r) => r?,
                None => check_smaps_of(*pid, used)?,
            }
        }
        Ok(())
    }

    /// Time since the tree was frozen.
    pub fn frozen_ms(&self) -> f64 {
        self.since.elapsed().as_secs_f64() * 1e3
    }

    /// Kill the tree, children first; their connections stay blocked for the restore.
    pub fn kill(mut self) {
        kill_tree(std::mem::take(&mut self.tree), &self.ppids, &self.zombies);
        // Closed still in repair mode: the peers hear nothing.
        self.net.keep_blocked();
    }

    /// The tree is about to run elsewhere: from now on it dies with Ferry, so it can never
    /// run here again, whatever happens to Ferry. Cheap (no process exits yet): the slow
    /// part, `kill_moved`, can wait until the tree runs at the destination.
    pub fn doom(&mut self) -> Result<()> {
        for f in &mut self.tree {
            f.bind_to_us()?;
        }
        Ok(())
    }

    /// Kill the tree, which runs on elsewhere now with its addresses: its connections need
    /// no block here any more.
    pub fn kill_moved(mut self) {
        kill_tree(std::mem::take(&mut self.tree), &self.ppids, &self.zombies);
        self.net.st.repaired.clear();
        crate::netblock::lift(&mut self.net.st.blocks, &self.net.table);
    }

    /// Let the tree run on.
    pub fn resume(mut self) {
        self.net.release();
        for f in std::mem::take(&mut self.tree) {
            f.resume();
        }
    }

    /// Leave the tree stopped by SIGSTOP.
    pub fn stop(mut self) {
        self.net.release();
        for f in std::mem::take(&mut self.tree) {
            // SAFETY: kill(2) has no memory effects; SIGSTOP takes effect at the detach.
            unsafe {
                libc::kill(f.pid(), libc::SIGSTOP);
            }
            f.resume();
        }
    }
}

/// Most pages read eagerly for lazily restored memory (`memory::Delta::eager`): 2 MiB.
const EAGER_MAX: usize = 512;

/// Freeze the tree of `pid` and write its image into `w` (not finished: the caller commits
/// it). With `delta`, tracked memory contributes only its dirty pages. `on_frozen` runs as
/// soon as the tree is frozen, before the collection (work that needs the tree frozen and
/// can run beside it, such as the last scan of written pages). `netblock`: the traffic block
/// installed ahead (`netblock::prepare`), if any. On error the tree runs on untouched.
pub fn dump_into(
    pid: i32,
    w: &mut ImageWriter,
    progress: &crate::Progress,
    mut delta: Option<&mut DeltaFn>,
    hint: Option<&SmapsHint>,
    on_frozen: Option<&mut dyn FnMut()>,
    netblock: Option<crate::netblock::Prepared>,
) -> Result<(Held, DumpStats)> {
    memory::warm_buffers();
    // Loaded before the freeze (once per process), not during it.
    let _ = ferry_sys::vmaflags::prepare_all();
    let t0 = Instant::now();
    ferry_sys::timeline::mark(|| "freezing".into());
    procfs::check_inspectable(pid)?;
    // Any error from here on drops the Frozen processes, which resumes them untouched.
    let mut zombies = Vec::new();
    let mut tree = freeze_tree(pid, &mut zombies)?;
    ferry_sys::timeline::mark(|| "frozen".into());
    // Asked to stop (Ctrl-C): the tree resumes as it was.
    ferry_sys::cancel::check()?;
    if let Some(f) = on_frozen {
        f();
    }
    let tf = Instant::now();
    let freeze_ms = (tf - t0).as_secs_f64() * 1e3;
    let tree_pids: Vec<i32> = tree.iter().map(|f| f.pid()).collect();
    let mut steps = Steps::new();
    let mut lap = Lap::new();
    // The injected syscalls of the collection, each a ptrace round trip, run on one CPU.
    let all_tids: Vec<i32> = tree
        .iter()
        .flat_map(|f| f.threads().iter().map(|t| t.tid))
        .collect();
    let pinned = ferry_sys::sched::Pinned::here(&all_tids);
    // Dropped before `tree` on any error: sockets leave repair mode and their traffic is
    // unblocked before the processes resume.
    let mut net = NetGuard {
        st: Default::default(),
        table: crate::netblock::table_name(pid),
    };
    net.st.blocks = netblock.map(|p| p.take()).unwrap_or_default();
    crate::sockets::plan_blocks(&mut net.st, &tree_pids)?;
    ferry_sys::timeline::mark(|| "netblock: planned".into());
    crate::netblock::apply(&mut net.st.blocks, &net.table)?;
    lap.mark(&mut steps, "netblock");
    let mut seen = files::Seen::default();
    let mut collected = Vec::new();
    for f in tree.iter_mut() {
        collected.push(collect(f, &mut seen, &mut net.st, &tree_pids, &mut steps)?);
        ferry_sys::cancel::check()?;
    }
    // `collect` timed its own steps.
    lap = Lap::new();
    drop(pinned);
    lap.mark(&mut steps, "unpin");
    // With a hint (a live migration), the frozen processes' own mapping flags where BPF reads
    // them (microseconds, no page walk): their smaps entries come from those flags, and need
    // no check against the hint.
    let mut from_flags: std::collections::HashMap<i32, Vec<procfs::SmapsEntry>> =
        Default::default();
    if let Some(h) = hint {
        for (img, maps) in &collected {
            let own = ferry_sys::vmaflags::vma_flags(img.pid).ok();
            if let Some(e) = own.and_then(|f| smaps_from_flags(maps, &f, h.get(&img.pid))) {
                from_flags.insert(img.pid, e);
            }
        }
    }
    lap.mark(&mut steps, "vma_flags");
    // The hint against the frozen tree, from now on beside the dump and the rebuild. Not
    // earlier: a smaps read holds the mmap lock that the collection's brk query waits for.
    let smaps_check = hint.map(|h| {
        let todo: Vec<(i32, Vec<procfs::SmapsEntry>)> = tree_pids
            .iter()
            .filter(|p| !from_flags.contains_key(p))
            .filter_map(|p| h.get(p).map(|s| (*p, s.clone())))
            .collect();
        std::thread::spawn(move || {
            todo.iter()
                .map(|(p, s)| (*p, check_smaps_of(*p, s)))
                .collect()
        })
    });
    lap = Lap::new();
    crate::sockets::check_peers(&mut net.st)?;
    crate::namespaces::check_tree(&tree_pids)?;
    collected[0].0.namespaces = crate::namespaces::dump(pid)?;
    crate::namespaces::check_paths(&collected[0].0.namespaces, collected.iter().map(|c| &c.0))?;
    let threads: usize = collected.iter().map(|c| c.0.threads.len()).sum();
    let pids: Vec<i32> = collected.iter().map(|c| c.0.pid).collect();
    let ppids: Vec<i32> = collected.iter().map(|c| c.0.ppid).collect();
    let nmaps: usize = collected.iter().map(|c| c.1.len()).sum();
    // What the memory phase will read, roughly: the tree's resident anonymous and shared memory.
    let expected: u64 = pids.iter().map(|&p| resident_kb(p) * 1024).sum();
    lap.mark(&mut steps, "tree_checks");
    let tm = Instant::now();
    let collect_ms = (tm - tf).as_secs_f64() * 1e3;
    let mut read_so_far = 0u64;
    let mut on_chunk = |n: u64| {
        read_so_far += n;
        progress.report(crate::Phase::Memory, read_so_far, expected.max(read_so_far));
    };
    // Pages are written process by process: a restore reads them back in the same order.
    let mut hinted = Vec::new();
    for (mut img, maps) in collected {
        // The hint serves when it accounts for every mapping of the frozen process.
        let hit = hint
            .and_then(|h| h.get(&img.pid))
            .and_then(|h| smaps_from_hint(&maps, h));
        let smaps = match (from_flags.remove(&img.pid), hit) {
            (Some(own), _) => own,
            (None, Some(h)) => {
                hinted.push((img.pid, h.clone()));
                h
            }
            (None, None) => procfs::read_smaps(img.pid)?,
        };
        let mut d = match delta.as_mut() {
            Some(f) => f(img.pid, &smaps)?,
            None => None,
        };
        if let Some(d) = d.as_mut().filter(|d| d.lazy) {
            d.eager = img.threads.iter().flat_map(regs::first_touched).collect();
            // Read while frozen: a process with thousands of threads keeps only the pages
            // the restore itself touches (rseq areas); the rest are fetched once it runs.
            if d.eager.len() > EAGER_MAX {
                d.eager = img
                    .threads
                    .iter()
                    .filter_map(|t| t.rseq.map(|r| r.ptr & !(ferry_image::PAGE_SIZE as u64 - 1)))
                    .take(EAGER_MAX)
                    .collect();
            }
            d.eager.sort_unstable();
            d.eager.dedup();
            ferry_sys::timeline::mark(|| format!("eager pages: {}", d.eager.len()));
        }
        lap.mark(&mut steps, "smaps_delta");
        let (mappings, _) = memory::dump(
            img.pid,
            &maps,
            &smaps,
            w,
            &mut img.ghosts,
            &mut on_chunk,
            d.as_ref(),
        )?;
        img.mappings = mappings;
        w.meta(TAG_PROCESS, &img)?;
        lap.mark(&mut steps, "memory");
    }
    for z in &zombies {
        w.meta(TAG_ZOMBIE, z)?;
    }
    let memory_ms = tm.elapsed().as_secs_f64() * 1e3;
    Ok((
        Held {
            net,
            tree,
            ppids,
            zombies,
            since: t0,
            hinted,
            smaps_check,
        },
        DumpStats {
            processes: pids.len(),
            threads,
            mappings: nmaps,
            freeze_ms,
            collect_ms,
            memory_ms,
            steps,
        },
    ))
}

pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpReport> {
    let t0 = Instant::now();
    procfs::check_inspectable(pid)?;
    let mut w = ImageWriter::create(dir)?;
    let (held, st) = match dump_into(pid, &mut w, &opts.progress, None, None, None, None) {
        Ok(x) => x,
        Err(e) => {
            // Leave no half-written image behind; the tree has resumed.
            drop(w);
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    // A process that keeps running needs nothing more from us: let it go before the image is
    // synced and verified.
    let mut held = Some(held);
    let mut frozen_ms = 0.0;
    if opts.leave == Leave::Running {
        let h = held.take().unwrap();
        frozen_ms = h.frozen_ms();
        h.resume();
    }
    // The process is killed only after the image is synced and reads back whole.
    let tv = Instant::now();
    let finished = w.finish().map_err(crate::EngineError::from).and_then(|s| {
        // Read back with plain reads through a bounded buffer, not a mapping: a mapped image
        // would count in our resident memory, which must not grow with the dump.
        ImageReader::open(dir)?
            .verify_pages()
            .map(|_| s)
            .map_err(Into::into)
    });
    // The last point to stop at (Ctrl-C): no image, and the process runs on.
    let summary = match finished.and_then(|s| Ok(ferry_sys::cancel::check().map(|_| s)?)) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    let verify_ms = tv.elapsed().as_secs_f64() * 1e3;
    if let Some(h) = &held {
        frozen_ms = h.frozen_ms();
    }
    let left = match (opts.leave, held) {
        (Leave::Killed, Some(h)) => {
            h.kill();
            "killed"
        }
        (Leave::Stopped, Some(h)) => {
            h.stop();
            "stopped"
        }
        _ => "running",
    };
    let total = t0.elapsed().as_secs_f64();
    Ok(DumpReport {
        pid,
        processes: st.processes,
        threads: st.threads,
        mappings: st.mappings,
        pages: summary.pages,
        bytes: summary.page_bytes,
        frozen_ms,
        freeze_ms: st.freeze_ms,
        collect_ms: st.collect_ms,
        memory_ms: st.memory_ms,
        verify_ms,
        total_ms: total * 1e3,
        gb_per_s: summary.page_bytes as f64 / (st.memory_ms / 1e3).max(1e-9) / 1e9,
        left: left.into(),
    })
}

/// The dump's hold on the tree's sockets: repair mode and the traffic block.
struct NetGuard {
    st: crate::sockets::DumpState,
    table: String,
}

impl NetGuard {
    /// The tree goes on running: sockets leave repair mode, traffic flows again.
    fn release(&mut self) {
        self.st.release();
        crate::netblock::lift(&mut self.st.blocks, &self.table);
    }

    /// The tree was killed: close our copies in repair mode, leave the block for the restore.
    fn keep_blocked(&mut self) {
        self.st.repaired.clear();
        crate::netblock::keep_applied(&mut self.st.blocks, &self.table);
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Kill a frozen tree, children first, each reaped by its own (still frozen) parent through an
/// injected wait4, as are the tree's zombies: their PIDs are free at once for a restore, even
/// where nobody would reap orphans. The root is left to its own parent.
fn kill_tree(mut tree: Vec<Frozen>, ppids: &[i32], zombies: &[ZombieImage]) {
    const WALL: u64 = libc::__WALL as u64;
    for z in zombies {
        if let Some(p) = tree.iter_mut().find(|f| f.pid() == z.ppid) {
            let pp = p.pid();
            let _ = p.inject_syscall(pp, libc::SYS_wait4, [z.pid as u64, 0, WALL, 0, 0, 0]);
        }
    }
    while let Some(child) = tree.pop() {
        let (pid, ppid) = (child.pid(), ppids.get(tree.len()).copied().unwrap_or(0));
        child.kill_and_release();
        if let Some(p) = tree.iter_mut().find(|f| f.pid() == ppid) {
            let pp = p.pid();
            let _ = p.inject_syscall(pp, libc::SYS_wait4, [pid as u64, 0, WALL, 0, 0, 0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::smaps_from_hint;
    use ferry_sys::procfs::{MapKind, Mapping, SmapsEntry};

    fn map(start: u64, end: u64, write: bool) -> Mapping {
        Mapping {
            start,
            end,
            read: true,
            write,
            exec: false,
            shared: false,
            offset: 0,
            inode: 0,
            kind: MapKind::Anonymous,
        }
    }

    fn entry(start: u64, end: u64, flags: &str, thp: u64) -> SmapsEntry {
        SmapsEntry {
            start,
            end,
            vm_flags: flags.split(' ').map(String::from).collect(),
            kernel_page_kb: 4,
            anon_huge_kb: thp,
            ..Default::default()
        }
    }

    #[test]
    fn entries_from_the_kernels_flags_carry_the_codes_the_image_uses() {
        use super::smaps_from_flags;
        use ferry_sys::vmaflags::{bits, VmaFlags};
        let flags = vec![
            VmaFlags {
                start: 0x1000,
                end: 0x5000,
                flags: bits::READ | bits::WRITE | bits::DONTCOPY | bits::UFFD_WP | 0x70,
            },
            VmaFlags {
                start: 0x9000,
                end: 0xa000,
                flags: bits::READ | bits::HUGEPAGE,
            },
        ];
        let hint = vec![
            entry(0x1000, 0x3000, "rd wr", 2048),
            entry(0x3000, 0x5000, "rd wr", 4),
        ];
        let got = smaps_from_flags(
            &[map(0x1000, 0x5000, true), map(0x9000, 0xa000, false)],
            &flags,
            Some(&hint),
        )
        .unwrap();
        assert_eq!(got[0].vm_flags, ["rd", "wr", "dc", "uw"]);
        assert_eq!(
            got[0].anon_huge_kb, 2052,
            "huge pages from the overlapping hint"
        );
        assert_eq!(got[1].vm_flags, ["rd", "hg"]);
        assert_eq!(got[1].anon_huge_kb, 0);
        // A mapping the flags do not hold, or hugetlb memory: smaps is needed.
        assert!(smaps_from_flags(&[map(0x20000, 0x21000, true)], &flags, None).is_none());
        let ht = [VmaFlags {
            start: 0x1000,
            end: 0x5000,
            flags: bits::READ | bits::HUGETLB,
        }];
        assert!(smaps_from_flags(&[map(0x1000, 0x5000, false)], &ht, None).is_none());
    }

    #[test]
    fn a_hint_serves_mappings_that_grew_or_were_cut_but_not_new_or_reprotected_ones() {
        let hint = vec![
            entry(0x1000, 0x5000, "rd wr mr mw me ac", 0),
            entry(0x9000, 0xa000, "rd wr mr mw me ac dc", 0),
            entry(0xa000, 0xc000, "rd wr mr mw me ac hg", 2048),
        ];
        // As it was: the hinted entries themselves.
        let same = smaps_from_hint(&[map(0x1000, 0x5000, true)], &hint).unwrap();
        assert_eq!(same, vec![hint[0].clone()]);
        // Grown (a heap's brk) and cut in two: the flags of the mapping they came from, at
        // their own bounds.
        let got = smaps_from_hint(
            &[
                map(0x1000, 0x8000, true),
                map(0x9000, 0x9800, true),
                map(0x9800, 0xa000, true),
            ],
            &hint,
        )
        .unwrap();
        assert_eq!((got[0].start, got[0].end), (0x1000, 0x8000));
        assert_eq!(got[0].vm_flags, hint[0].vm_flags);
        assert_eq!(got[2].vm_flags, hint[1].vm_flags);
        // Spanning two hinted mappings whose flags differ: unknown.
        assert!(smaps_from_hint(&[map(0x9000, 0xc000, true)], &hint).is_none());
        // Overlapping nothing hinted: unknown.
        assert!(smaps_from_hint(&[map(0x20000, 0x21000, true)], &hint).is_none());
        // Protection changed since (mprotect): unknown.
        assert!(smaps_from_hint(&[map(0x1000, 0x3000, false)], &hint).is_none());
    }
}
