//! `ferry restore`: verify the whole image, fork a stub with the saved PID, rebuild the process
//! into it from outside, and let it run. On any failure the stub is killed: nothing half-built
//! is left running.

use crate::ctx::{Target, AREA};
use crate::schema::{MappingImage, ProcessImage, ZombieImage, TAG_PROCESS, TAG_ZOMBIE};
use crate::{files, memory, mm, regs, signals, EngineError, Result};
use ferry_image::{BlockIndex, ImageReader};
use ferry_sys::{procfs, spawn::spawn_stub, Frozen};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

pub mod validate;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub detach: bool,
    /// Accept regular files (fds) whose size or mode changed since the dump.
    pub allow_changed_files: bool,
    /// Restore into this network namespace (a /proc/PID/ns/net or /run/netns/NAME file).
    pub netns: Option<String>,
    /// Told how many page bytes have been written (`Phase::Pages`).
    pub progress: crate::Progress,
    /// Pages held apart from the image (pre-copy rounds), written into each process before
    /// the image's own pages.
    pub base: Option<std::sync::Arc<dyn BasePages>>,
    /// Let the tree run before its private anonymous memory is filled: a filler thread
    /// (`Restored::take_filler`) answers its page faults and fills the rest in the background.
    pub lazy: bool,
    /// Post-copy: where the pages the image lists as left behind (`MappingImage::lazy`) are
    /// fetched from. Implies `lazy`.
    pub remote: Option<std::sync::Arc<dyn crate::lazy::RemotePages>>,
    /// Called before the sockets are rebuilt: the addresses they bind are in place once it
    /// returns (a migration takes them on a thread of its own meanwhile).
    pub before_sockets: Option<Hook>,
    /// The page data's checksums were checked as it arrived (a migration's stream, checked
    /// frame by frame, written here moments ago): the blocks' own are not checked again.
    pub data_checked: bool,
}

/// A step of the caller's that the restore runs at a given point.
#[derive(Clone)]
pub struct Hook(pub std::sync::Arc<dyn Fn() -> Result<()> + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Pages of the restored processes that are not in the image: what pre-copy rounds sent.
pub trait BasePages: Send + Sync {
    /// Hand every page held for process `pid` to `write(address, bytes)`; returns the count.
    fn write_into(&self, pid: i32, write: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64>;
    /// Runs [start, end) of the pages held for process `pid` (for lazy restore).
    fn held(&self, _pid: i32) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Copy the pages held for `pid` inside [addr, addr + buf.len()) into `buf` (others are
    /// left as they are).
    fn read_into(&self, _pid: i32, _addr: u64, _buf: &mut [u8]) -> Result<()> {
        Ok(())
    }
    /// Runs [start, end) of process `pid` whose pre-copied pages are still valid, wherever
    /// they are held (here, or in a warm process).
    fn valid(&self, pid: i32) -> Vec<(u64, u64)> {
        self.held(pid)
    }
    /// Take pages of process `pid` that a warm process held alone, before it is dropped.
    fn absorb(&self, pid: i32, _addr: u64, _data: &[u8]) -> Result<()> {
        Err(EngineError::Failed(format!(
            "nowhere to keep the pre-copied pages of process {pid} held by its warm process"
        )))
    }
}

impl std::fmt::Debug for dyn crate::lazy::RemotePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemotePages")
    }
}

impl std::fmt::Debug for dyn BasePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasePages")
    }
}

/// A rebuilt tree, complete but not running yet. `resume` lets it run; dropping it kills
/// every process of it.
pub struct Restored {
    targets: Vec<Target>,
    stub: i32,
    built: crate::sockets::Built,
    root: i32,
    pub report: RestoreReport,
    t0: Instant,
    filler: Option<crate::lazy::Filler>,
    /// Lets the filler work ahead of need once the tree runs.
    filler_running: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Tells the filler that the tree runs from now on.
    filler_resumed: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The dump blocked TCP traffic (the tree had TCP sockets): lift the block on resume.
    lift: bool,
}

impl Restored {
    /// The thread filling lazily restored memory (with `RestoreOptions::lazy`): keep it until
    /// `wait` says every page is in place; dropping it earlier kills the tree.
    pub fn take_filler(&mut self) -> Option<crate::lazy::Filler> {
        self.filler.take()
    }

    /// The filler works ahead of need only once the returned flag is set (`resume` does not
    /// set it then): for a caller with something urgent to do right after the tree runs,
    /// such as telling the source, before the filler takes the CPUs.
    pub fn defer_fill_ahead(&mut self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        self.filler_running.take()
    }

    /// Connections go live, their traffic flows again, and the tree runs.
    pub fn resume(mut self) -> Result<RestoreReport> {
        let tg = Instant::now();
        let r = self.built.go_live().and_then(|_| {
            self.report.sockets_ms += tg.elapsed().as_secs_f64() * 1e3;
            if !self.lift {
                return Ok(false);
            }
            let tu = Instant::now();
            let r = crate::netblock::lift_here(&crate::netblock::table_name(self.root));
            self.report.unblock_ms = tu.elapsed().as_secs_f64() * 1e3;
            r
        });
        if let Err(e) = r {
            return Err(EngineError::Failed(format!(
                "restore of process {}: making its connections live: {e}",
                self.root
            )));
        }
        let tr = Instant::now();
        if let Some(r) = &self.filler_resumed {
            r.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Children first, so that nothing of the tree runs before all of it exists.
        for t in std::mem::take(&mut self.targets).into_iter().rev() {
            t.frozen.resume();
        }
        if let Some(r) = &self.filler_running {
            r.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let steps = &mut self.report.steps;
        *steps.entry("go_live".into()).or_default() += (tr - tg).as_secs_f64() * 1e3;
        *steps.entry("resume".into()).or_default() += tr.elapsed().as_secs_f64() * 1e3;
        self.report.restore_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        self.report.rest_ms = self.report.restore_ms
            - self.report.verify_ms
            - self.report.layout_ms
            - self.report.pages_ms;
        Ok(self.report.clone())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if self.targets.is_empty() {
            return;
        }
        if let Some(f) = self.filler.take() {
            f.abort();
        }
        for t in std::mem::take(&mut self.targets).into_iter().rev() {
            let pid = t.pid;
            t.frozen.kill();
            kill_reap(pid);
        }
        kill_reap(self.stub);
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RestoreReport {
    pub pid: i32,
    pub processes: usize,
    pub pages: u64,
    pub bytes: u64,
    /// From the start until the tree runs.
    pub restore_ms: f64,
    /// Reading and checking the whole image (metadata, every page block, the files it
    /// needs), before any process exists.
    pub verify_ms: f64,
    /// Recreating the mappings (and unlinked files) of every process.
    pub layout_ms: f64,
    /// Reading the page blocks and writing them into the processes.
    pub pages_ms: f64,
    /// Everything else: stubs, threads, registers, files, signals, attributes, resuming.
    pub rest_ms: f64,
    /// Sockets rebuilt (every socket of the tree, TCP connections in repair mode included).
    pub sockets: usize,
    /// Building the sockets in Ferry's process and making the repaired connections live
    /// (`sockets::build` for each, then `go_live`); part of `rest_ms`. Handing them to the
    /// processes is counted with the other fds.
    pub sockets_ms: f64,
    /// Lifting the traffic block the dump left (nftables); part of `rest_ms`.
    pub unblock_ms: f64,
    /// Page bytes over pages_ms.
    pub gb_per_s: f64,
    /// Of `bytes`, those placed with UFFDIO_COPY (large private anonymous memory), not
    /// written through /proc/PID/mem.
    #[serde(default)]
    pub uffd_bytes: u64,
    /// Exit status of the restored process when not detached.
    pub exit_status: Option<i32>,
    /// With lazy memory: bytes left to the filler when the tree was ready to run.
    #[serde(default)]
    pub lazy_bytes: u64,
    /// With lazy memory, when `restore` waited for it: how the filling went.
    #[serde(default)]
    pub fill: Option<crate::lazy::FillReport>,
    /// Milliseconds per step, summed over processes.
    #[serde(default)]
    pub steps: Steps,
    /// A process built before the freeze (`warm`): "used", or why it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<String>,
}

/// An image whose pages.fimg is mapped read-only: its page blocks are checked in place, with
/// no copy of ours.
pub fn open_mapped(
    dir: &Path,
) -> Result<(ImageReader, std::sync::Arc<ferry_sys::mem::MappedFile>)> {
    let map = std::sync::Arc::new(ferry_sys::mem::MappedFile::open(&dir.join("pages.fimg"))?);
    let meta_path = dir.join("meta.fimg");
    let meta = std::fs::File::open(&meta_path)
        .map_err(|e| EngineError::Failed(format!("opening {}: {e}", meta_path.display())))?;
    let r = ImageReader::from_buffered(
        Box::new(std::io::BufReader::new(meta)),
        Box::new(ferry_sys::mem::MappedReader {
            map: map.clone(),
            pos: 0,
        }),
    )?;
    Ok((r, map))
}

/// Every process of the image, parents before children, its records checked
/// (`validate::records`).
pub fn load(dir: &Path, r: &ImageReader) -> Result<Vec<ProcessImage>> {
    Ok(records_of(dir, r)?.0)
}

/// The processes and zombies of the image, checked (`validate::records`).
fn records_of(dir: &Path, r: &ImageReader) -> Result<(Vec<ProcessImage>, Vec<ZombieImage>)> {
    let procs: Vec<ProcessImage> = r.find(TAG_PROCESS)?;
    if procs.is_empty() {
        return Err(EngineError::Failed(format!(
            "{}: the image holds no process",
            dir.display()
        )));
    }
    let zombies: Vec<ZombieImage> = r.find(TAG_ZOMBIE)?;
    validate::records(&procs, &zombies).map_err(|e| in_dir(dir, e))?;
    Ok((procs, zombies))
}

/// An image read and checked as far as it can be before any process exists.
pub struct Checked {
    /// Parents before children.
    pub imgs: Vec<ProcessImage>,
    pub zombies: Vec<ZombieImage>,
    pub summary: ferry_image::Summary,
    /// Every page block, its data not checked yet (`ferry_image::check_blocks`).
    pub index: Vec<BlockIndex>,
}

/// Read the records and walk the page blocks' headers of the image in `dir` (read by `r`),
/// and refuse it unless the records make sense and agree with the blocks (`validate`). The
/// blocks' data is not checked here.
pub fn load_checked(dir: &Path, r: &mut ImageReader) -> Result<Checked> {
    let (imgs, zombies) = records_of(dir, r)?;
    // The headers are walked in order; the data is checked by the caller.
    let (summary, index) = r.index_pages()?;
    validate::pages(&imgs, &index).map_err(|e| in_dir(dir, e))?;
    Ok(Checked {
        imgs,
        zombies,
        summary,
        index,
    })
}

fn in_dir(dir: &Path, e: EngineError) -> EngineError {
    EngineError::Failed(format!("{}: {e}", dir.display()))
}

/// Rebuild the tree of the image in `dir`, complete but stopped: the caller resumes it (or
/// drops it, which kills it).
pub fn restore_held(dir: &Path, opts: &RestoreOptions) -> Result<Restored> {
    restore_held_with(dir, opts, None)
}

/// `restore_held`, into a process built before the freeze when it fits the image (see
/// `warm`); when it does not, it is killed and the tree is built as without it.
pub fn restore_held_with(
    dir: &Path,
    opts: &RestoreOptions,
    warm: Option<crate::warm::WarmTree>,
) -> Result<Restored> {
    let t0 = Instant::now();
    ferry_sys::timeline::mark(|| "restore: start".into());
    // Everything is checked before any process exists. pages.fimg is mapped: checked in
    // place, then written from there into the processes.
    let (mut reader, map) = open_mapped(dir)?;
    ferry_sys::timeline::mark(|| "verify: opened".into());
    let Checked {
        imgs,
        zombies,
        summary,
        index,
    } = load_checked(dir, &mut reader)?;
    ferry_sys::timeline::mark(|| "verify: loaded".into());
    // The data's checksums are checked on every CPU.
    if !opts.data_checked {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        ferry_image::check_blocks(map.bytes(), &index, threads)?;
    }
    ferry_sys::timeline::mark(|| "verify: blocks checked".into());
    // Paths on mounts the tree made are checked where they are now (or not, when the restore
    // makes them).
    let mounts = crate::namespaces::MountView::new(&imgs[0].namespaces);
    mounts.check()?;
    ferry_sys::timeline::mark(|| "verify: mounts".into());
    for img in &imgs {
        memory::check_files(&mounts.mappings(&img.mappings))?;
        files::check(&img.fds, opts.allow_changed_files, &mounts)?;
        if let Some(r) = &img.root {
            if !Path::new(r).is_dir() {
                return Err(EngineError::Failed(format!(
                    "process {}: its root directory {r} is not a directory here",
                    img.pid
                )));
            }
        }
    }
    let verify_ms = t0.elapsed().as_secs_f64() * 1e3;
    ferry_sys::timeline::mark(|| "verify: files".into());
    // Asked to stop (Ctrl-C) while the image was checked: nothing is built yet.
    ferry_sys::cancel::check()?;
    let lazy = opts.lazy || opts.remote.is_some();
    let mut warm_note = None;
    let mut over_job: Option<std::thread::JoinHandle<Result<()>>> = None;
    let warm = match warm {
        None => None,
        Some(mut w) => {
            let valid = opts
                .base
                .as_ref()
                .map(|b| b.valid(w.pid()))
                .unwrap_or_default();
            let fits = if !lazy || opts.netns.is_some() {
                Err("the restore fills every page before the process runs".to_string())
            } else {
                let newer: Vec<(u64, u64, u64)> = index
                    .iter()
                    .map(|b| (b.vaddr, b.data_offset, b.data_len))
                    .collect();
                w.fit(&imgs, &zombies, &valid, &newer)
            };
            let mut note = match &fits {
                Ok((0, _)) => "used".to_string(),
                Ok((n, _)) => format!("used, {n} changed mappings made again"),
                Err(why) => format!("not used: {why}"),
            };
            if fits.is_err() && w.holds_alone() > 0 {
                // Its pages exist nowhere else: into the page store before it is killed.
                let pid = w.pid();
                let base = opts.base.as_ref().ok_or_else(|| {
                    EngineError::Failed(format!(
                        "the warm process is not used ({note}) and nothing can keep its pages"
                    ))
                })?;
                let t = Instant::now();
                let n = w.salvage(&mut |a, d| base.absorb(pid, a, d))?;
                note += &format!(
                    "; its {} MiB read back in {:.0} ms",
                    n >> 20,
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            warm_note = Some(note);
            // Not fitting, it is dropped (killed) here, and its PID is free again.
            fits.ok().map(|(_, over)| {
                // Newer pages over older ones, on a thread: done before the tree is held.
                if !over.is_empty() {
                    over_job = Some(crate::warm::write_over(w.pid(), map.clone(), over));
                }
                w.take()
            })
        }
    };
    ferry_sys::timeline::mark(|| "warm fit".into());
    let mut times = Timings::default();
    let mut lap = Lap::new();
    let root = imgs[0].pid;
    // A fresh namespace, removed again if the restore fails.
    let mut fresh = FreshNetns(None);
    let netns = match opts.netns.as_deref().and_then(|n| n.strip_prefix("new:")) {
        Some(name) => {
            let p = crate::namespaces::fresh_netns(name, &imgs)?;
            fresh.0 = Some(name.to_string());
            Some(p)
        }
        None => opts.netns.clone(),
    };
    if let Some(ns) = &netns {
        // This thread, the stubs it forks and the sockets it makes all live there.
        ferry_sys::net::enter_netns(ns)?;
    }
    // Sockets first: an address that cannot be bound fails the restore before any process.
    let all_socks: Vec<&crate::sockets::SocketImage> =
        imgs.iter().flat_map(|i| i.sockets.iter()).collect();
    let mut built = crate::sockets::Built::default();
    if let Some(f) = &opts.before_sockets {
        (f.0)()?;
    }
    let ts = Instant::now();
    for s in &all_socks {
        crate::sockets::build(&mut built, s, &all_socks).map_err(|e| {
            match (&imgs[0].namespaces.net, &opts.netns) {
                (Some(_), None) => EngineError::Failed(format!(
                    "{e} (the tree lived in a network namespace of its own: restore it into \
                     one that holds its addresses with --netns)"
                )),
                _ => e,
            }
        })?;
    }
    let sockets_ms = ts.elapsed().as_secs_f64() * 1e3;
    lap.mark(&mut times.steps, "sockets");
    if opts.remote.is_none()
        && imgs
            .iter()
            .any(|i| i.mappings.iter().any(|m| !m.lazy.is_empty()))
    {
        return Err(EngineError::Failed(format!(
            "{}: part of this image's memory was left in the source process (post-copy); \
             only the migration that made it can restore it",
            dir.display()
        )));
    }
    // Each process's page blocks: they come in process order.
    let mut per_proc = Vec::new();
    {
        let mut next = 0usize;
        for img in &imgs {
            let budget: u64 = img.mappings.iter().map(|m| m.pages_saved).sum();
            let first = next;
            let mut n = 0u64;
            while n < budget {
                let b = index.get(next).ok_or_else(|| {
                    EngineError::Failed(format!(
                        "pages.fimg ended after {n} of the {budget} pages of process {}",
                        img.pid
                    ))
                })?;
                n += b.data_len / ferry_image::PAGE_SIZE as u64;
                next += 1;
            }
            per_proc.push(first..next);
        }
    }
    let mut filler = None;
    let mut missing: HashMap<i32, crate::lazy::RangeSet> = HashMap::new();
    let mut first: HashMap<i32, Vec<BlockIndex>> = HashMap::new();
    if lazy {
        let mut src =
            crate::lazy::Sources::new(opts.base.clone(), map.clone(), opts.remote.clone());
        for (img, r) in imgs.iter().zip(&per_proc) {
            let lazy_maps: Vec<&MappingImage> = img
                .mappings
                .iter()
                .filter(|m| memory::lazy_eligible(m))
                .collect();
            let mut mine: Vec<BlockIndex> = index[r.clone()]
                .iter()
                .filter(|b| {
                    lazy_maps
                        .iter()
                        .any(|m| m.start <= b.vaddr && b.vaddr < m.end)
                })
                .cloned()
                .collect();
            // Looked up by address; eager pages come after the mappings they are in.
            mine.sort_by_key(|b| b.vaddr);
            src.blocks.insert(img.pid, mine);
            let mut runs = crate::lazy::RangeSet::default();
            for m in &img.mappings {
                for &(s, e) in &m.lazy {
                    runs.insert(s, e);
                }
            }
            if opts.remote.is_some() {
                // The image's pages in lazily filled memory, with a source process behind it,
                // are those its threads touch first: placed at once, from here, though the
                // lazy runs around them (joined across small gaps) name them too.
                let here = src.blocks.get(&img.pid).cloned().unwrap_or_default();
                for b in &here {
                    runs.remove(b.vaddr, b.vaddr + b.data_len);
                }
                first.insert(img.pid, here);
            }
            src.remote_runs.insert(img.pid, runs);
            let ranges: Vec<(u64, u64)> = lazy_maps.iter().map(|m| (m.start, m.end)).collect();
            let mut m = src.missing(img.pid, &ranges);
            // What pre-copy wrote into the warm process is in place.
            if let Some((t, _, written)) = &warm {
                if t.pid == img.pid {
                    for (s, e) in written.runs() {
                        m.remove(s, e);
                    }
                }
            }
            missing.insert(img.pid, m);
        }
        ferry_sys::timeline::mark(|| "lazy: missing".into());
        filler = Some(crate::lazy::Filler::start(src)?);
    }
    lap.mark(&mut times.steps, "lazy_setup");
    // The tree is built on one CPU: its hundreds of ptrace round trips are plain switches
    // there. Every process and thread inherits the mask; they get ours back at the end.
    let (mut warm, mut warm_uffd, mut warm_written) = match warm {
        Some((t, u, w)) => (Some(t), u, Some(w)),
        None => (None, None, None),
    };
    let mut pinned =
        ferry_sys::sched::Pinned::here(&warm.iter().map(|t| t.pid).collect::<Vec<_>>());
    let stub = match &warm {
        Some(t) => t.pid,
        None => spawn_stub(Some(root))?,
    };
    let mut targets: Vec<Target> = Vec::new();
    let mut lazy_bytes = 0u64;
    let result = (|| -> Result<u64> {
        let built_ahead = warm.is_some();
        if let Some(t) = warm.take() {
            // Created and laid out already, stopped, in its namespaces: the tree goes on
            // from there.
            targets.push(t);
        } else {
            let frozen = Frozen::freeze_owned(stub)?;
            targets.push(Target::new(stub, frozen));
            let all: Vec<MappingImage> = imgs
                .iter()
                .flat_map(|i| i.mappings.iter().cloned())
                .collect();
            lap.mark(&mut times.steps, "stub");
            prepare(&mut targets[0], &all)?;
            lap.mark(&mut times.steps, "prepare");
        }
        if !built_ahead {
            crate::namespaces::restore(&mut targets[0], &imgs[0].namespaces)?;
        }
        crate::attrs::restore_session(&mut targets[0], root, &imgs[0].attrs)?;
        lap.mark(&mut times.steps, "namespaces");
        // The stub tree: each child is forked by its parent's stub, so parentage is right.
        for img in &imgs[1..] {
            let parent = targets
                .iter_mut()
                .find(|t| t.pid == img.ppid)
                .ok_or_else(|| EngineError::Failed(format!("no parent for process {}", img.pid)))?;
            let child = fork_child(parent, img.pid)?;
            let page = parent.page;
            let mut frozen = Frozen::freeze_owned(child)?;
            frozen.set_syscall_insn(page);
            let mut ct = Target::new(child, frozen);
            ct.page = page;
            crate::attrs::restore_session(&mut ct, img.pid, &img.attrs)?;
            targets.push(ct);
        }
        for z in &zombies {
            let parent = targets
                .iter_mut()
                .find(|t| t.pid == z.ppid)
                .ok_or_else(|| EngineError::Failed(format!("no parent for zombie {}", z.pid)))?;
            make_zombie(parent, z)?;
        }
        lap.mark(&mut times.steps, "tree");
        let pages_src = memory::Pages { map, index };
        let mut shmem = HashMap::new();
        let mut pages = 0;
        let total = summary.page_bytes;
        let mut before = 0u64;
        for ((t, img), blocks) in targets.iter_mut().zip(&imgs).zip(&per_proc) {
            let mut on_progress =
                |n: u64| opts.progress.report(crate::Phase::Pages, before + n, total);
            let lz = filler.as_ref().map(|f| Lazily {
                filler: f,
                missing: missing.remove(&img.pid).unwrap_or_default(),
                first: first.remove(&img.pid).unwrap_or_default(),
                hot: opts
                    .remote
                    .as_ref()
                    .map(|r| r.hot(img.pid))
                    .unwrap_or_default(),
                left: &mut lazy_bytes,
            });
            let n = build(
                t,
                img,
                &pages_src,
                blocks.clone(),
                lz,
                &mut shmem,
                img.pid == root,
                &built,
                &mut times,
                &mut on_progress,
                opts.base.as_deref(),
                warm_written.take(),
                warm_uffd.take(),
            )?;
            before += n * ferry_image::PAGE_SIZE as u64;
            pages += n;
        }
        if let Some(j) = over_job.take() {
            j.join().map_err(|_| {
                EngineError::Failed("writing the image's newer pages panicked".into())
            })??;
        }
        Ok(pages)
    })();
    let pages = match result {
        Ok(p) => {
            let tids: Vec<i32> = targets
                .iter()
                .flat_map(|t| procfs::list_threads(t.pid).unwrap_or_default())
                .collect();
            pinned.adopt(&tids);
            drop(pinned);
            ferry_sys::timeline::mark(|| "unpinned".into());
            p
        }
        Err(e) => {
            if let Some(f) = filler.take() {
                f.abort();
            }
            for t in targets.into_iter().rev() {
                let pid = t.pid;
                t.frozen.kill();
                kill_reap(pid);
            }
            kill_reap(stub);
            return Err(EngineError::Failed(format!(
                "restore of process {root} failed: {e}"
            )));
        }
    };
    let bytes = pages * ferry_image::PAGE_SIZE as u64;
    // Success: the namespace stays with the tree.
    fresh.0 = None;
    // Until the tree is held, ready; `resume` counts on to the end.
    let held_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The reader holds the last reference to the mapped pages.fimg: unmapping it takes ~25 ms
    // per GiB, which the tree need not wait for.
    std::thread::spawn(move || drop(reader));
    Ok(Restored {
        targets,
        stub,
        built,
        root,
        report: RestoreReport {
            pid: stub,
            processes: imgs.len(),
            pages,
            bytes,
            restore_ms: held_ms,
            verify_ms,
            layout_ms: times.layout_ms,
            pages_ms: times.pages_ms,
            uffd_bytes: times.uffd_bytes,
            rest_ms: held_ms - verify_ms - times.layout_ms - times.pages_ms,
            sockets: all_socks.len(),
            sockets_ms,
            unblock_ms: 0.0,
            gb_per_s: bytes as f64 / (times.pages_ms / 1e3).max(1e-9) / 1e9,
            exit_status: None,
            lazy_bytes,
            fill: None,
            steps: times.steps,
            warm: warm_note,
        },
        t0,
        filler_running: filler.as_ref().map(|f| f.running_flag()),
        filler_resumed: filler.as_ref().map(|f| f.resumed_flag()),
        filler,
        lift: all_socks.iter().any(|s| {
            matches!(s.family, libc::AF_INET | libc::AF_INET6) && s.ty == libc::SOCK_STREAM
        }),
    })
}

/// Rebuild the tree of the image in `dir` and let it run (waiting for its root to exit,
/// unless `detach`).
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport> {
    let mut held = restore_held(dir, opts)?;
    // The last point to stop at (Ctrl-C): the tree, held, is killed on drop.
    ferry_sys::cancel::check()?;
    let stub = held.stub;
    let filler = held.take_filler();
    let mut report = held.resume()?;
    if let Some(f) = filler {
        // The memory must be whole before Ferry may go (its exit would end the filling).
        report.fill = Some(f.wait().map_err(|e| {
            EngineError::Failed(format!("filling the memory of the restored tree: {e}"))
        })?);
    }
    if !opts.detach {
        // Ctrl-C ends Ferry as usual while it waits; the tree runs on.
        let _ = ferry_sys::cancel::uninstall();
        report.exit_status = Some(wait_exit(stub));
    }
    Ok(report)
}

/// Recreate a zombie: fork it from its parent and make it end the way it ended.
fn make_zombie(parent: &mut Target, z: &ZombieImage) -> Result<()> {
    let pid = fork_child(parent, z.pid)?;
    let page = parent.page;
    let mut f = Frozen::freeze_owned(pid)?;
    f.set_syscall_insn(page);
    if libc::WIFSIGNALED(z.status) {
        let sig = libc::WTERMSIG(z.status);
        // Default action for the signal, then die of it when released.
        let dfl = page + crate::ctx::SCRATCH_OFFSET + 2048;
        ferry_sys::mem::write_mem(pid, dfl, &[0u8; 32])?;
        f.inject_syscall(pid, libc::SYS_rt_sigaction, [sig as u64, dfl, 0, 8, 0, 0])?;
        f.inject_syscall(pid, libc::SYS_kill, [pid as u64, sig as u64, 0, 0, 0, 0])?;
        f.resume();
    } else {
        // exit_group does not return: the injection reports the exit.
        let code = libc::WEXITSTATUS(z.status) as u64;
        match f.inject_syscall(pid, libc::SYS_exit_group, [code, 0, 0, 0, 0, 0]) {
            Err(ferry_sys::Error::NoSuchProcess(_)) | Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fork a child of `parent` with PID `pid` (injected clone3 with set_tid). The child returns
/// into the restorer page and waits there in its pause loop.
fn fork_child(parent: &mut Target, pid: i32) -> Result<i32> {
    let tids = parent.put(3200, &(pid as u32).to_le_bytes())?;
    let mut args = Vec::new();
    for v in [0, 0, 0, 0, libc::SIGCHLD as u64, 0, 0, 0, tids, 1, 0] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let at = parent.put(3072, &args)?;
    let got = parent
        .sys(
            &format!("clone3 of child {pid}"),
            libc::SYS_clone3,
            [at, args.len() as u64, 0, 0, 0, 0],
        )
        .map_err(|e| match e {
            EngineError::Failed(m) if m.contains("os error 17") => EngineError::Failed(format!(
                "PID {pid} is taken by another process (or a zombie not reaped yet): {}",
                procfs::read_status(pid)
                    .map(|s| format!("{} in state {}", s.name, s.state))
                    .unwrap_or_else(|_| "gone now".into())
            )),
            e => e,
        })?;
    if got != pid as u64 {
        return Err(EngineError::Failed(format!(
            "child {pid} was created as {got}"
        )));
    }
    Ok(pid)
}

pub(crate) fn kill_reap(pid: i32) {
    // SAFETY: kill and waitpid have no memory effects beyond the status integer.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// Kill the tree rooted at `root`, a child of ours (so that its PID stays its own until we
/// reap it), as it is now: every descendant is stopped first (a stopped process cannot fork
/// or let its children escape to init), through a pidfd taken while it is still the child of
/// the process it was found under (never a later process that reused the PID), until a walk
/// finds none new; then all are killed. The root is not reaped.
pub fn kill_tree(root: i32) {
    // SAFETY: kill has no memory effects; `root` is our unreaped child.
    unsafe {
        libc::kill(root, libc::SIGSTOP);
    }
    let mut held: Vec<(i32, std::os::fd::OwnedFd)> = Vec::new();
    for _ in 0..64 {
        let mut new = 0;
        let mut todo = vec![root];
        while let Some(parent) = todo.pop() {
            for c in ferry_sys::procfs::children(parent) {
                todo.push(c);
                if held.iter().any(|(p, _)| *p == c) {
                    continue;
                }
                let Ok(fd) = ferry_sys::net::pidfd_open(c) else {
                    continue;
                };
                let ppid = std::fs::read_to_string(format!("/proc/{c}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .and_then(|(_, r)| r.split_whitespace().nth(1))
                            .and_then(|v| v.parse::<i32>().ok())
                    });
                if ppid == Some(parent) {
                    let _ = ferry_sys::net::pidfd_kill(&fd, libc::SIGSTOP);
                    held.push((c, fd));
                    new += 1;
                }
            }
        }
        if new == 0 {
            break;
        }
    }
    for (_, fd) in &held {
        let _ = ferry_sys::net::pidfd_kill(fd, libc::SIGKILL);
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(root, libc::SIGKILL);
    }
}

/// Exit code, or 128 + signal, as a shell reports it.
fn wait_exit(pid: i32) -> i32 {
    let mut st = 0;
    // SAFETY: waitpid writes only `st`.
    unsafe {
        libc::waitpid(pid, &mut st, 0);
    }
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    }
}

/// Create a thread with TID `tid` in the target (injected clone3 with set_tid) and seize it.
fn create_thread(t: &mut Target, tid: i32) -> Result<()> {
    let tids = t.put(3200, &(tid as u32).to_le_bytes())?;
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let mut args = Vec::new();
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size, cgroup.
    for v in [flags, 0, 0, 0, 0, 0, 0, 0, tids, 1, 0] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let at = t.put(3072, &args)?;
    let got = t.sys(
        &format!("clone3 of thread {tid}"),
        libc::SYS_clone3,
        [at, args.len() as u64, 0, 0, 0, 0],
    )?;
    if got != tid as u64 {
        return Err(EngineError::Failed(format!(
            "thread {tid} was created as {got}"
        )));
    }
    t.frozen.adopt_thread(tid)?;
    Ok(())
}

/// A page for our `syscall; int3` that overlaps neither the stub nor the saved layout.
fn free_page(pid: i32, saved: &[MappingImage]) -> Result<u64> {
    let own = procfs::read_maps(pid)?;
    let mut a = 0x10_0000u64;
    while a < 0x7fff_0000_0000 {
        let hit = own.iter().any(|m| a + AREA > m.start && a < m.end)
            || saved.iter().any(|m| a + AREA > m.start && a < m.end);
        if !hit {
            return Ok(a);
        }
        a += 0x10_0000;
    }
    Err(EngineError::Failed(
        "no free page for the restorer in the address space".into(),
    ))
}

/// Make the root stub ready to be driven: no rseq area, our page in place.
pub(crate) fn prepare(t: &mut Target, all: &[MappingImage]) -> Result<()> {
    let tid = t.pid;
    // The stub's inherited rseq area is about to disappear: unregister it first.
    if let Some(r) = t.frozen.rseq(tid)? {
        t.sys(
            "rseq unregistration",
            libc::SYS_rseq,
            [r.ptr, r.size as u64, 1, r.signature as u64, 0, 0],
        )?;
    }
    // The stub inherited the restorer's fds: none of them belongs to the process.
    t.sys(
        "close_range",
        libc::SYS_close_range,
        [0, u32::MAX as u64, 0, 0, 0, 0],
    )?;
    let page = free_page(t.pid, all)?;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let got = t.sys(
        "mmap of the restorer page",
        libc::SYS_mmap,
        [
            page,
            AREA,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            flags,
            u64::MAX,
            0,
        ],
    )?;
    if got != page {
        return Err(EngineError::Failed(format!(
            "restorer page mapped at {got:#x}, not {page:#x}"
        )));
    }
    // `syscall` for injections; threads created by an injected clone3 return after it and
    // wait in a pause loop at +16 until they are seized.
    let mut code = vec![0x0f, 0x05, 0xeb, 0x0c];
    code.resize(16, 0xcc);
    code.extend_from_slice(&[0xb8, 0x22, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7]);
    ferry_sys::mem::write_mem(t.pid, page, &code)?;
    t.frozen.set_syscall_insn(page);
    t.page = page;
    t.install_batch_code()
}

/// Time spent in the memory phases of `build`, over all processes.
#[derive(Debug, Default)]
struct Timings {
    layout_ms: f64,
    pages_ms: f64,
    uffd_bytes: u64,
    steps: Steps,
}

use crate::timing::Lap;
pub use crate::timing::Steps;

#[allow(clippy::too_many_arguments)]
fn build(
    t: &mut Target,
    img: &ProcessImage,
    page_src: &memory::Pages,
    blocks: std::ops::Range<usize>,
    lazily: Option<Lazily>,
    shmem: &mut HashMap<u64, (i32, u64, u64)>,
    is_root: bool,
    built: &crate::sockets::Built,
    times: &mut Timings,
    on_progress: &mut dyn FnMut(u64),
    base_pages: Option<&dyn BasePages>,
    // A warm process: what was written into it already.
    warm: Option<crate::lazy::RangeSet>,
    warm_uffd: Option<ferry_sys::uffd::LazyUffd>,
) -> Result<u64> {
    let tid = t.pid;
    let base = img
        .fds
        .iter()
        .map(|f| f.fd as u64 + 1)
        .max()
        .unwrap_or(0)
        .max(3);
    let tl = Instant::now();
    let mut lap = Lap::new();
    let ghosts = crate::ghost::restore(t, &img.ghosts, base)?;
    // A warm process has its layout, and the pre-copied pages outside lazily filled memory.
    if warm.is_none() {
        memory::restore_layout(t, &img.mappings, shmem, &ghosts, None)?;
        lap.mark(&mut times.steps, "layout");
    }
    // Lazily filled memory: registered before anything is written, never written here.
    let mut lazy_maps: Vec<(u64, u64)> = Vec::new();
    if let Some(lz) = lazily {
        let uffd = match warm_uffd {
            // The warm process's, registered on the same layout.
            Some(u) => u,
            None => {
                let u = ferry_sys::uffd::LazyUffd::new(&mut t.frozen)?;
                for m in img.mappings.iter().filter(|m| memory::lazy_eligible(m)) {
                    u.register(m.start, m.end)?;
                }
                u
            }
        };
        for m in img.mappings.iter().filter(|m| memory::lazy_eligible(m)) {
            lazy_maps.push((m.start, m.end));
        }
        // Each would otherwise be a fault, one by one, while the tree is still frozen.
        let mut missing = lz.missing;
        for b in &lz.first {
            let at = b.data_offset as usize;
            let data = page_src.map.bytes().get(at..at + b.data_len as usize);
            if let Some(data) = data.filter(|d| b.matches(d)) {
                if let Ok(ferry_sys::uffd::Fill::Done) = uffd.copy(b.vaddr, data) {
                    missing.remove(b.vaddr, b.vaddr + b.data_len);
                }
            }
        }
        ferry_sys::timeline::mark(|| "first pages placed".into());
        *lz.left += missing.bytes();
        lz.filler.add(img.pid, uffd, missing, lz.hot)?;
        lap.mark(&mut times.steps, "uffd");
    }
    let in_lazy = |a: u64| lazy_maps.iter().any(|&(s, e)| s <= a && a < e);
    let tp = Instant::now();
    if let Some(b) = base_pages {
        // Older copies first: the image's pages are newer.
        let pid = t.pid;
        if lazy_maps.is_empty() && warm.is_none() {
            b.write_into(pid, &mut |a, d| Ok(ferry_sys::mem::write_mem(pid, a, d)?))?;
        } else {
            // Only held pages outside lazily filled memory (the filler does the rest): none
            // usually, as pre-copy tracks private memory.
            let mut outside = crate::lazy::RangeSet::default();
            for (s, e) in b.held(pid) {
                outside.insert(s, e);
            }
            for &(s, e) in &lazy_maps {
                outside.remove(s, e);
            }
            for (s, e) in warm.iter().flat_map(|w| w.runs()) {
                outside.remove(s, e);
            }
            let mut buf = Vec::new();
            for (s, e) in outside.runs() {
                buf.resize((e - s) as usize, 0);
                b.read_into(pid, s, &mut buf)?;
                ferry_sys::mem::write_mem(pid, s, &buf)?;
            }
        }
    }
    // Large private anonymous memory is filled through a userfaultfd, unless pages of a base
    // copy are in place already (UFFDIO_COPY does not overwrite).
    let fill = if lazy_maps.is_empty() && base_pages.is_none() {
        memory::EagerFill::new(
            &mut t.frozen,
            &img.mappings,
            &page_src.index[blocks.clone()],
        )?
    } else {
        None
    };
    // Two writer threads on two CPUs: not on the one the round trips use.
    let pages = ferry_sys::sched::unpinned(|| {
        memory::restore_pages(
            t.pid,
            page_src,
            blocks,
            &in_lazy,
            fill.as_ref(),
            on_progress,
        )
    })?;
    times.uffd_bytes += fill.as_ref().map_or(0, |f| f.placed());
    // Unregisters the memory: from here on, a fault in it is an ordinary one.
    drop(fill);
    times.layout_ms += (tp - tl).as_secs_f64() * 1e3;
    times.pages_ms += tp.elapsed().as_secs_f64() * 1e3;
    lap.mark(&mut times.steps, "pages");
    ferry_sys::cancel::check()?;
    mm::restore(t, &img.mm, &img.exe)?;
    lap.mark(&mut times.steps, "mm");
    files::restore(t, &img.fds, &img.pipes, &img.fifos, &ghosts, built)?;
    lap.mark(&mut times.steps, "files");
    // The process's own attributes and its signal handlers: one batch, one stop.
    let cwd = t.stage_path(&img.cwd)?;
    t.queue(
        format!("chdir to {}", img.cwd),
        libc::SYS_chdir,
        [cwd, 0, 0, 0, 0, 0],
    )?;
    // Every path above is as the dumper saw it, from our root: the process enters its own
    // root only now (and before its credentials may drop the right to).
    if let Some(root) = &img.root {
        let p = t.stage_path(root)?;
        t.queue(
            format!("chroot to {root}"),
            libc::SYS_chroot,
            [p, 0, 0, 0, 0, 0],
        )?;
    }
    t.queue("umask", libc::SYS_umask, [img.umask as u64, 0, 0, 0, 0, 0])?;
    let comm = t.stage_path(&img.comm)?;
    t.queue(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        [libc::PR_SET_NAME as u64, comm, 0, 0, 0, 0],
    )?;
    signals::restore(t, &img.sigactions)?;
    lap.mark(&mut times.steps, "process_attrs");
    for th in img.threads.iter().filter(|th| th.tid != img.pid) {
        create_thread(t, th.tid)?;
    }
    lap.mark(&mut times.steps, "threads");
    // The leader last.
    let mut order: Vec<_> = img.threads.iter().filter(|th| th.tid != img.pid).collect();
    order.extend(img.threads.iter().filter(|th| th.tid == img.pid));
    for th in order {
        signals::restore_thread(t, th)?;
        regs::restore(t, th)?;
    }
    lap.mark(&mut times.steps, "registers");
    signals::restore_timers(t, &img.posix_timers)?;
    signals::restore_pending(t, img.pid, &img.threads, &img.shared_pending, &img.itimers)?;
    lap.mark(&mut times.steps, "timers_signals");
    crate::attrs::restore(t, &img.attrs, is_root)?;
    // Last: remove our page. The syscall returns into it, but the step trap stops first.
    let p = t.page;
    t.frozen
        .inject_syscall(tid, libc::SYS_munmap, [p, AREA, 0, 0, 0, 0])?;
    lap.mark(&mut times.steps, "creds_cleanup");
    Ok(pages)
}

/// For a lazily restored process: the filler that takes its userfaultfd.
struct Lazily<'a> {
    filler: &'a crate::lazy::Filler,
    /// What the process has to fill, and what first.
    missing: crate::lazy::RangeSet,
    hot: Vec<(u64, u64)>,
    /// Image blocks to place as soon as the memory is registered: the pages the threads
    /// touch before the process runs (their rseq areas) and right after.
    first: Vec<BlockIndex>,
    /// Bytes left to the filler, over all processes.
    left: &'a mut u64,
}

/// A network namespace made for this restore: deleted unless the restore succeeds.
struct FreshNetns(Option<String>);

impl Drop for FreshNetns {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &n])
                .status();
        }
    }
}
