//! A warm destination: the process created before the freeze, so that the frozen phase of a
//! migration does not pay for it.
//!
//! While the process still runs at the source, the source reads its layout (`preview`). The
//! destination creates a stub with the process's PID and lays out its memory (`prebuild`).
//! Pre-copied pages of memory that is not filled lazily (private file pages a program
//! wrote, such as its libraries' data) go straight into it as they arrive
//! (`WarmTree::write`). At the commit, `restore::restore_held_with` uses the warm process
//! when the final image has the same single process with the same layout; otherwise it
//! kills the warm process and builds the tree from nothing, as without it.

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
    if !ours("ns/mnt") || !ours("root") {
        return Err("the process has a mount namespace or root of its own".into());
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
    Ok(WarmLayout {
        pid: root,
        mappings,
    })
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

/// A process created ahead of the freeze, stopped, with its memory laid out. Dropping it
/// kills it.
pub struct WarmTree {
    target: Option<Target>,
    /// Its lazily filled memory, registered with a userfaultfd of its own already.
    uffd: Option<ferry_sys::uffd::LazyUffd>,
    layout: WarmLayout,
    /// Where pre-copied pages are written in at once: memory not filled lazily.
    direct: RangeSet,
    written: RangeSet,
    pub built_ms: f64,
}

/// Create the process of `layout` (its PID, its mappings), stopped, traced by the calling
/// thread (which must be the one that restores it later).
pub fn prebuild(layout: WarmLayout) -> Result<WarmTree> {
    let t0 = Instant::now();
    if let Some(m) = layout.mappings.iter().find(|m| !warmable(m)) {
        return Err(EngineError::Failed(format!(
            "mapping {:#x}-{:#x} cannot be built ahead",
            m.start, m.end
        )));
    }
    crate::memory::check_files(&layout.mappings)?;
    let stub = spawn_stub(Some(layout.pid))?;
    let frozen = match Frozen::freeze_owned(stub) {
        Ok(f) => f,
        Err(e) => {
            crate::restore::kill_reap(stub);
            return Err(e.into());
        }
    };
    let mut tree = WarmTree {
        target: Some(Target {
            pid: stub,
            frozen,
            page: 0,
            queued: Vec::new(),
        }),
        uffd: None,
        direct: {
            let mut d = RangeSet::default();
            for m in layout
                .mappings
                .iter()
                .filter(|m| !crate::memory::lazy_eligible(m) && m.kind == MapKind::File)
            {
                d.insert(m.start, m.end);
            }
            d
        },
        layout,
        written: RangeSet::default(),
        built_ms: 0.0,
    };
    let t = tree.target.as_mut().unwrap();
    crate::restore::prepare(t, &tree.layout.mappings)?;
    crate::memory::restore_layout(
        t,
        &tree.layout.mappings,
        &mut Default::default(),
        &Default::default(),
    )?;
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
    tree.built_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(tree)
}

impl WarmTree {
    pub fn pid(&self) -> i32 {
        self.layout.pid
    }

    /// Pre-copied pages of process `pid` at `addr`: the part in memory that is not filled
    /// lazily goes into the warm process now (the rest is the page store's).
    pub fn write(&mut self, pid: i32, addr: u64, data: &[u8]) -> Result<()> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        if pid != self.layout.pid {
            return Ok(());
        }
        let end = addr + data.len() as u64;
        for (a, b) in self.direct.within(addr, end) {
            let off = (a - addr) as usize;
            ferry_sys::mem::write_mem(t.pid, a, &data[off..off + (b - a) as usize])?;
            self.written.insert(a, b);
        }
        Ok(())
    }

    /// Makes the warm process the final image's, if it can be: one process, the same PID,
    /// every mapping that changed since it was built made again (unmapped, mapped, registered
    /// if lazily filled), and every page written into it still valid (`held`: the page
    /// store's valid ranges of the process). Ok: how many mappings were made again. Err: why
    /// it cannot be used (it is then only fit to be killed).
    pub(crate) fn fit(
        &mut self,
        imgs: &[ProcessImage],
        zombies: &[ZombieImage],
        held: &[(u64, u64)],
    ) -> std::result::Result<usize, String> {
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
        if img.namespaces.mnt {
            return Err("the process has a mount namespace of its own".into());
        }
        // Put back below; on an error the warm tree is only fit to be killed.
        let old = std::mem::take(&mut self.layout.mappings);
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
        let changed = made.len().max(gone.len());
        if changed > 0 {
            self.remake(&gone, &made)
                .map_err(|e| format!("remaking {changed} changed mappings: {e}"))?;
        }
        self.layout.mappings = img.mappings.clone();
        let mut stale = self.written.clone();
        for &(s, e) in held {
            stale.remove(s, e);
        }
        if !stale.is_empty() {
            return Err(format!(
                "{} bytes written into it are no longer valid",
                stale.bytes()
            ));
        }
        Ok(changed)
    }

    /// Unmaps `gone` and maps `made` (which do not overlap the mappings kept).
    fn remake(&mut self, gone: &[&MappingImage], made: &[&MappingImage]) -> Result<()> {
        let t = self.target.as_mut().expect("a warm tree holds its process");
        for m in gone {
            // Registered memory: unmapped, it would wait for a reader of the event.
            if crate::memory::lazy_eligible(m) {
                if let Some(u) = &self.uffd {
                    u.unregister(m.start, m.end)?;
                }
            }
            t.queue(
                "munmap of a changed mapping",
                libc::SYS_munmap,
                [m.start, m.end - m.start, 0, 0, 0, 0],
            )?;
            self.written.remove(m.start, m.end);
            self.direct.remove(m.start, m.end);
        }
        crate::memory::map_each(
            t,
            made.iter().copied(),
            &mut Default::default(),
            &Default::default(),
        )?;
        for m in made {
            if crate::memory::lazy_eligible(m) {
                if let Some(u) = &self.uffd {
                    u.register(m.start, m.end)?;
                }
            }
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
    fn shared_and_saved_files_are_not_built_ahead() {
        assert!(warmable(&m(0, MapKind::Anon)));
        assert!(!warmable(&m(0, MapKind::SharedAnon)));
        let mut f = m(0, MapKind::File);
        assert!(warmable(&f));
        f.ghost = Some(7);
        assert!(!warmable(&f));
    }
}
