//! Memory: the mappings of a process and the pages that must travel.
//!
//! Dump: every mapping is described; pages are saved when the file cannot provide them:
//! present or swapped pages of private anonymous memory (zero pages skipped), private copies
//! (COW) of file pages, and pages of shared anonymous memory. vDSO areas are not saved: the
//! running kernel's are moved to the old addresses on restore.
//!
//! Restore: the stub's own mappings are removed, its vDSO areas moved as one unit, each saved
//! mapping recreated at its address, and the pages written through /proc/PID/mem.

use crate::ctx::Target;
use crate::schema::{MapKind, MappingImage};
use crate::{EngineError, Result};
use ferry_image::{ImageWriter, PAGE_SIZE};
use ferry_sys::mem::{pagemap, read_mem, read_mem_forced, PM_FILE, PM_PRESENT, PM_SWAPPED};
use ferry_sys::procfs::{self, Mapping};

fn kind_of(m: &Mapping) -> MapKind {
    use ferry_sys::MapKind as K;
    match &m.kind {
        K::Heap => MapKind::Heap,
        K::Stack => MapKind::Stack,
        K::Vdso => MapKind::Vdso,
        K::Vvar => MapKind::Vvar,
        K::VvarVclock => MapKind::VvarVclock,
        K::Vsyscall => MapKind::Vsyscall,
        // A shared anonymous mapping shows as the unlinked /dev/zero.
        K::File {
            path,
            deleted: true,
        } if m.shared && path.as_os_str() == "/dev/zero" => MapKind::SharedAnon,
        K::File { .. } => MapKind::File,
        K::Other(n) if m.shared && (n.starts_with("/dev/zero") || n.starts_with("[anon_shmem")) => {
            MapKind::SharedAnon
        }
        K::Anonymous if m.shared => MapKind::SharedAnon,
        _ => MapKind::Anon,
    }
}

/// Pre-copy: memory the receiver of the image holds already (`tracked`, whole mappings) and
/// the pages of it written since it was sent (`dirty`). A tracked mapping contributes only
/// its dirty pages, zero or not (a zero page may replace older contents).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub tracked: Vec<(u64, u64)>,
    /// Sorted, none overlapping another.
    pub dirty: Vec<(u64, u64)>,
    /// Post-copy: private anonymous memory is not read at all; the runs it would have
    /// contributed are listed in `MappingImage::lazy` and fetched from the frozen process on
    /// demand after the restored copy runs.
    pub lazy: bool,
    /// With `lazy`: pages read now all the same (sorted page addresses), those the restored
    /// threads touch before anything else (`regs::first_touched`).
    pub eager: Vec<u64>,
}

impl Delta {
    fn covers(&self, start: u64, end: u64) -> bool {
        self.tracked.iter().any(|&(s, e)| s <= start && end <= e)
    }

    /// Split lazy `runs` (sorted) into those left lazy and the eager pages inside them.
    fn split_eager(&self, runs: &[(u64, u64)]) -> (Runs, Runs) {
        let page = PAGE_SIZE as u64;
        let (mut lazy, mut eager) = (Vec::new(), Vec::new());
        for &(s, e) in runs {
            let mut a = s;
            let first = self.eager.partition_point(|&p| p.saturating_add(page) <= s);
            for &p in self.eager[first..].iter().take_while(|&&p| p < e) {
                let (ps, pe) = (p.max(s), p.saturating_add(page).min(e));
                if ps > a {
                    lazy.push((a, ps));
                }
                match eager.last_mut() {
                    Some((_, last)) if *last == ps => *last = pe,
                    _ => eager.push((ps, pe)),
                }
                a = pe;
            }
            if a < e {
                lazy.push((a, e));
            }
        }
        (lazy, eager)
    }

    /// Dirty page runs inside [start, end), found by binary search: a process written all
    /// over has hundreds of thousands of runs, and this is asked once per mapping.
    fn dirty_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self.dirty.partition_point(|&(_, e)| e <= start);
        self.dirty[first..]
            .iter()
            .take_while(|&&(s, _)| s < end)
            .map(|&(s, e)| (s.max(start), e.min(end)))
            .collect()
    }
}

/// Page runs [start, end), sorted.
type Runs = Vec<(u64, u64)>;

/// A run of pages read from the process, on its way to the image.
struct Chunk {
    addr: u64,
    len: usize,
    skip_zero: bool,
    buf: Vec<u8>,
    /// Further runs, their data after the first's in `buf`: scattered dirty pages travel
    /// many to a chunk, not one chunk (and one thread handoff) per page or per mapping.
    more: Vec<(u64, usize)>,
    /// The blocks to write (address, offset in `buf`, length, checksum of the data), found
    /// by the reading thread (`Chunk::prepare`) so that the writing one only writes.
    blocks: Vec<(u64, usize, usize, ferry_image::PageHasher)>,
}

impl Chunk {
    /// Split the chunk's runs into blocks of pages to save (all-zero pages left out where
    /// `skip_zero`) and checksum each.
    fn prepare(&mut self) {
        let mut off = 0;
        let runs: Vec<(u64, usize)> = std::iter::once((self.addr, self.len))
            .chain(self.more.iter().copied())
            .collect();
        for (a, len) in runs {
            let data = &self.buf[off..off + len];
            let zero = |p: &[u8]| self.skip_zero && ferry_sys::mem::is_zero(p);
            let n = len / PAGE_SIZE;
            let mut j = 0;
            while j < n {
                if zero(&data[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]) {
                    j += 1;
                    continue;
                }
                let mut k = j + 1;
                while k < n && !zero(&data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]) {
                    k += 1;
                }
                let mut h = ferry_image::PageHasher::new();
                h.update(&data[j * PAGE_SIZE..k * PAGE_SIZE]);
                self.blocks.push((
                    a + (j * PAGE_SIZE) as u64,
                    off + j * PAGE_SIZE,
                    (k - j) * PAGE_SIZE,
                    h,
                ));
                j = k;
            }
            off += len;
        }
    }
}

const CHUNK: usize = 4 << 20;
/// Post-copy fetches 64 KiB around a fault: lazy runs closer than that are joined.
const LAZY_GAP: u64 = 64 << 10;

/// Add the run [a, a + len) to the lazy runs of a mapping, which come in address order. A gap
/// smaller than a post-copy fetch (pages the destination holds a current copy of, or holes)
/// joins the runs: memory written all over in small pieces is left in the source as a few
/// runs, not as hundreds of thousands that the image must list and the destination register
/// while the process is frozen.
fn push_lazy(runs: &mut Vec<(u64, u64)>, a: u64, len: u64) {
    match runs.last_mut() {
        Some(l) if a >= l.1 && a - l.1 < LAZY_GAP => l.1 = l.1.max(a + len),
        _ => runs.push((a, a + len)),
    }
}
const BUFFERS: usize = 4;

/// Chunk buffers kept between dumps, their pages already faulted in: reading into a fresh
/// buffer costs a page fault and a page clear per 4 KiB, some 8 ms for the 16 MiB, paid while
/// the process is frozen.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn buffer() -> Vec<u8> {
    POOL.lock()
        .unwrap()
        .pop()
        .unwrap_or_else(|| vec![0u8; CHUNK])
}

fn recycle(b: Vec<u8>) {
    let mut p = POOL.lock().unwrap();
    if p.len() < BUFFERS && b.len() == CHUNK {
        p.push(b);
    }
}

/// Make the dump's buffers resident ahead of a freeze (cheap when they are already).
pub fn warm_buffers() {
    let bufs: Vec<Vec<u8>> = (0..BUFFERS)
        .map(|_| {
            let mut b = buffer();
            for i in (0..b.len()).step_by(PAGE_SIZE) {
                b[i] = 1;
            }
            b
        })
        .collect();
    for b in bufs {
        recycle(b);
    }
}

/// Describe every mapping and stream the pages that must be saved. Reading the process
/// (pagemap + process_vm_readv) and writing the image (zero check, checksum, write) run on
/// two threads, overlapped. Returns the mappings and the number of pages written.
pub fn dump(
    pid: i32,
    maps: &[Mapping],
    smaps: &[procfs::SmapsEntry],
    w: &mut ImageWriter,
    ghosts: &mut Vec<crate::schema::GhostFile>,
    on_chunk: &mut dyn FnMut(u64),
    delta: Option<&Delta>,
) -> Result<(Vec<MappingImage>, u64)> {
    let mut out = describe(pid, maps, smaps, &mut |link, shown| {
        crate::ghost::dump(pid, link, shown, ghosts)
    })?;
    ferry_sys::timeline::mark(|| format!("memory: {} mappings described", out.len()));
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Chunk>>(3);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(buffer());
    }
    let mut total = 0u64;
    let mut lazy_runs: Vec<Vec<(u64, u64)>> = Vec::new();
    let saved_per = std::thread::scope(|s| -> Result<Vec<u64>> {
        // Owned here so that an early error return wakes a reader waiting for a buffer.
        let free_tx = free_tx;
        let out_ref = &out;
        let reader = s.spawn(move || {
            let mut lazy = vec![Vec::new(); out_ref.len()];
            let r = read_all(pid, maps, out_ref, &full_tx, &free_rx, delta, &mut lazy);
            ferry_sys::timeline::mark(|| "memory: read".into());
            if let Err(e) = r {
                let _ = full_tx.send(Err(e));
            }
            (free_rx, lazy)
        });
        let mut per = vec![0u64; out.len()];
        for c in full_rx {
            let c = c?;
            ferry_sys::cancel::check()?;
            for (a, off, len, h) in &c.blocks {
                w.pages_hashed(*a, &c.buf[*off..off + len], h)?;
                let n = (len / PAGE_SIZE) as u64;
                // A chunk spans mappings: each block counts for its own.
                let mi = out_ref.partition_point(|m| m.start <= *a).saturating_sub(1);
                per[mi] += n;
                total += n;
            }
            let off = c.len + c.more.iter().map(|m| m.1).sum::<usize>();
            on_chunk(off as u64);
            let _ = free_tx.send(c.buf);
        }
        drop(free_tx);
        // The buffers, for the next dump.
        if let Ok((free_rx, lazy)) = reader.join() {
            while let Ok(b) = free_rx.try_recv() {
                recycle(b);
            }
            lazy_runs = lazy;
        }
        Ok(per)
    })?;
    for ((m, n), l) in out.iter_mut().zip(saved_per).zip(lazy_runs) {
        m.pages_saved = n;
        m.lazy = l;
    }
    Ok((out, total))
}

/// Each mapping as the image records it, without its pages. `saved_ghost(link, shown)`
/// saves an unlinked mapped file (its map_files link, and its name as maps shows it) and
/// returns its inode.
pub(crate) fn describe(
    pid: i32,
    maps: &[Mapping],
    smaps: &[procfs::SmapsEntry],
    saved_ghost: &mut dyn FnMut(&str, &str) -> Result<u64>,
) -> Result<Vec<MappingImage>> {
    let mut out = Vec::new();
    let mut files: std::collections::HashMap<(String, u64), Option<std::fs::Metadata>> =
        Default::default();
    let hugetlb = |m: &Mapping| {
        smaps
            .iter()
            .any(|s| s.start == m.start && s.vm_flags.iter().any(|f| f == "ht"))
    };
    for m in maps {
        let kind = kind_of(m);
        let (path, deleted) = match &m.kind {
            ferry_sys::MapKind::File { path, deleted } if kind == MapKind::File => {
                (Some(path.display().to_string()), *deleted)
            }
            ferry_sys::MapKind::Other(n) if kind == MapKind::SharedAnon => (Some(n.clone()), false),
            _ => (None, false),
        };
        let mut ghost = None;
        // hugetlbfs memory shows as an unlinked file; its pages travel like anonymous memory.
        if kind == MapKind::File && deleted && !hugetlb(m) {
            let shown = format!("{} (deleted)", path.clone().unwrap_or_default());
            let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            ghost = Some(saved_ghost(&link, &shown)?);
        }
        // The mapped file itself (map_files), as the path may lie in a mount namespace of
        // the process's own.
        // Once per file: a library is mapped four or five times, and each lookup in
        // map_files costs tens of microseconds while the tree is frozen.
        let meta = path
            .as_ref()
            .filter(|_| kind == MapKind::File)
            .and_then(|p| {
                files
                    .entry((p.clone(), m.inode))
                    .or_insert_with(|| {
                        std::fs::metadata(format!(
                            "/proc/{pid}/map_files/{:x}-{:x}",
                            m.start, m.end
                        ))
                        .or_else(|_| std::fs::metadata(p))
                        .ok()
                    })
                    .clone()
            });
        out.push(MappingImage {
            start: m.start,
            end: m.end,
            read: m.read,
            write: m.write,
            exec: m.exec,
            shared: m.shared,
            kind,
            path,
            offset: m.offset,
            file_size: meta.as_ref().map(|x| x.len()),
            file_mtime: meta.as_ref().map(|x| {
                use std::os::unix::fs::MetadataExt;
                x.mtime()
            }),
            pages_saved: 0,
            lazy: Vec::new(),
            shmem: (kind == MapKind::SharedAnon).then_some(m.inode),
            ghost,
            advice: Vec::new(),
            thp_kb: 0,
            huge_page_kb: 0,
        });
    }
    add_smaps(pid, smaps, maps, &mut out)?;
    Ok(out)
}

/// madvise(2) advice that the kernel shows in smaps VmFlags: (code, name in the image, advice).
const ADVICE: [(&str, &str, i32); 6] = [
    ("dc", "dontfork", libc::MADV_DONTFORK),
    ("wf", "wipeonfork", libc::MADV_WIPEONFORK),
    ("hg", "hugepage", libc::MADV_HUGEPAGE),
    ("nh", "nohugepage", libc::MADV_NOHUGEPAGE),
    ("dd", "dontdump", libc::MADV_DONTDUMP),
    ("mg", "mergeable", libc::MADV_MERGEABLE),
];

pub(crate) fn kernel_area(k: MapKind) -> bool {
    matches!(
        k,
        MapKind::Vdso | MapKind::Vvar | MapKind::VvarVclock | MapKind::Vsyscall
    )
}

/// Advice, transparent huge pages and hugetlbfs memory, from /proc/PID/smaps.
fn add_smaps(
    pid: i32,
    smaps: &[procfs::SmapsEntry],
    maps: &[Mapping],
    out: &mut [MappingImage],
) -> Result<()> {
    for (m, img) in maps.iter().zip(out.iter_mut()) {
        let Some(s) = smaps.iter().find(|s| s.start == m.start && s.end == m.end) else {
            return Err(EngineError::Failed(format!(
                "process {pid}: mapping {:#x}-{:#x} is not in its smaps",
                m.start, m.end
            )));
        };
        img.thp_kb = s.anon_huge_kb;
        if s.vm_flags.iter().any(|f| f == "ht") {
            let anon = matches!(&m.kind, ferry_sys::MapKind::File { path, deleted: true }
                if path.as_os_str() == "/anon_hugepage");
            if m.shared || !anon {
                return Err(EngineError::Unsupported {
                    pid,
                    what: format!(
                        "mapping {:#x}-{:#x} ({}) is {} hugetlbfs memory, which this version \
                         cannot dump (only private MAP_HUGETLB memory)",
                        m.start,
                        m.end,
                        m.name(),
                        if m.shared { "shared" } else { "file-backed" }
                    ),
                });
            }
            img.kind = MapKind::Hugetlb;
            img.path = None;
            img.file_size = None;
            img.file_mtime = None;
            img.huge_page_kb = s.kernel_page_kb;
        }
        if kernel_area(img.kind) {
            continue;
        }
        img.advice = ADVICE
            .iter()
            .filter(|(code, _, _)| s.vm_flags.iter().any(|f| f == code))
            .map(|(_, name, _)| name.to_string())
            .collect();
    }
    Ok(())
}

/// Re-apply the saved advice to a recreated mapping.
fn advise(t: &mut Target, m: &MappingImage) -> Result<()> {
    for a in &m.advice {
        let Some(&(_, _, adv)) = ADVICE.iter().find(|(_, name, _)| name == a) else {
            return Err(EngineError::Failed(format!(
                "mapping {:#x}-{:#x}: unknown madvise advice {a:?} in the image",
                m.start, m.end
            )));
        };
        t.queue(
            format!("madvise({a}) of mapping {:#x}-{:#x}", m.start, m.end),
            libc::SYS_madvise,
            [m.start, m.end - m.start, adv as u64, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Memory that can be filled on demand after the process runs (userfaultfd missing mode):
/// private anonymous memory.
pub fn lazy_eligible(img: &MappingImage) -> bool {
    matches!(img.kind, MapKind::Anon | MapKind::Heap | MapKind::Stack) && !img.shared
}

fn saves_pages(img: &MappingImage) -> bool {
    match img.kind {
        k if kernel_area(k) => false,
        // Writes to a shared file mapping are in the file already.
        MapKind::File if img.shared => false,
        _ => true,
    }
}

/// The reading half: runs of wanted pages, read into recycled buffers.
fn read_all(
    pid: i32,
    maps: &[Mapping],
    imgs: &[MappingImage],
    tx: &std::sync::mpsc::SyncSender<Result<Chunk>>,
    free: &std::sync::mpsc::Receiver<Vec<u8>>,
    delta: Option<&Delta>,
    lazy_out: &mut [Vec<(u64, u64)>],
) -> Result<()> {
    let per = CHUNK / PAGE_SIZE;
    // Runs of tracked memory (written pages, and the eager pages of lazy memory), of
    // unreadable and readable mappings: read together at the end, many mappings to a chunk,
    // not a chunk (a buffer and a thread handoff) per mapping.
    let mut later: [Vec<(u64, u64)>; 2] = Default::default();
    for (mi, (m, img)) in maps.iter().zip(imgs).enumerate() {
        if !saves_pages(img) {
            continue;
        }
        let lazy = delta.is_some_and(|d| d.lazy) && lazy_eligible(img);
        // Runs left behind: listed here, not handed to the writer (a process has hundreds
        // of mappings, and a handoff between threads each cost more than the listing).
        let runs = &mut lazy_out[mi];
        let mut put_lazy = |list: &[(u64, u64)]| {
            for &(a, e) in list {
                push_lazy(runs, a, e - a);
            }
        };
        if let Some(d) = delta.filter(|d| d.covers(m.start, m.end)) {
            let dirty = d.dirty_in(m.start, m.end);
            if lazy {
                put_lazy(&d.split_eager(&dirty).0);
                // Also those not written since a round: the pages of the rounds may not be in
                // place yet at the destination when the restore touches them.
                let (_, eager) = d.split_eager(&[(m.start, m.end)]);
                later[usize::from(m.read)].extend(eager);
            } else {
                later[usize::from(m.read)].extend(dirty);
            }
            continue;
        }
        if lazy {
            // Post-copy: the whole mapping stays in the source, which says, page by page as
            // they are fetched, where it holds nothing. Listing its present pages here would
            // walk every page table while the process is frozen (~2 ms per GiB).
            let (left, eager) = match delta {
                Some(d) => d.split_eager(&[(m.start, m.end)]),
                None => (vec![(m.start, m.end)], Vec::new()),
            };
            put_lazy(&left);
            later[usize::from(m.read)].extend(eager);
            continue;
        }
        let kind = img.kind;
        let npages = (m.len() / PAGE_SIZE as u64) as usize;
        let wanted = |f: u64| {
            if f & (PM_PRESENT | PM_SWAPPED) == 0 {
                return false;
            }
            // In a private file mapping only the private copies differ from the file.
            !(kind == MapKind::File && f & PM_FILE != 0)
        };
        // Shared memory: the pages of the object, not of this process's page table (a child
        // may have written pages the parent never touched). Without its map_files entry, the
        // page table serves.
        let shared = (kind == MapKind::SharedAnon)
            .then(|| ferry_sys::mem::shared_data_runs(pid, m.start, m.end, m.offset).ok())
            .flatten();
        let mut i = 0;
        while i < npages {
            let n = (npages - i).min(per);
            let start = m.start + (i * PAGE_SIZE) as u64;
            let flags = match &shared {
                Some(runs) => {
                    let mut v = vec![0u64; n];
                    let end = start + (n * PAGE_SIZE) as u64;
                    for &(s, e) in runs {
                        let (lo, hi) = (s.max(start), e.min(end));
                        for p in (lo..hi).step_by(PAGE_SIZE) {
                            v[((p - start) / PAGE_SIZE as u64) as usize] = PM_PRESENT;
                        }
                    }
                    v
                }
                None => pagemap(pid, start, n)?,
            };
            let mut j = 0;
            while j < n {
                if !wanted(flags[j]) {
                    j += 1;
                    continue;
                }
                let mut k = j;
                while k < n && wanted(flags[k]) {
                    k += 1;
                }
                let a = start + (j * PAGE_SIZE) as u64;
                let len = (k - j) * PAGE_SIZE;
                let Ok(mut buf) = free.recv() else {
                    return Ok(());
                };
                let chunk = &mut buf[..len];
                if !m.read || read_mem(pid, a, chunk)? != len {
                    read_mem_forced(pid, a, chunk)?;
                }
                let mut c = Chunk {
                    addr: a,
                    len,
                    skip_zero: kind != MapKind::File,
                    buf,
                    more: Vec::new(),
                    blocks: Vec::new(),
                };
                c.prepare();
                if tx.send(Ok(c)).is_err() {
                    return Ok(());
                }
                j = k;
            }
            i += n;
        }
    }
    for (readable, runs) in later.iter().enumerate() {
        if !read_runs(pid, readable == 1, runs, tx, free)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Read `runs` (of mappings all `readable` or all not), many runs to a chunk, and send the
/// chunks on. False when the receiving end has gone.
fn read_runs(
    pid: i32,
    readable: bool,
    runs: &[(u64, u64)],
    tx: &std::sync::mpsc::SyncSender<Result<Chunk>>,
    free: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<bool> {
    // The chunk being filled, and how much of its buffer is used.
    let mut cur: Option<(Chunk, usize)> = None;
    for &(s, e) in runs {
        let mut a = s;
        while a < e {
            let len = ((e - a) as usize).min(CHUNK);
            if cur.as_ref().is_some_and(|(_, used)| used + len > CHUNK) {
                let (mut c, used) = cur.take().unwrap();
                read_chunk(pid, readable, &mut c, used)?;
                c.prepare();
                if tx.send(Ok(c)).is_err() {
                    return Ok(false);
                }
            }
            let (c, used) = match cur.as_mut() {
                Some(x) => x,
                None => {
                    let Ok(buf) = free.recv() else {
                        return Ok(false);
                    };
                    cur.insert((
                        Chunk {
                            addr: a,
                            len,
                            skip_zero: false,
                            buf,
                            more: Vec::new(),
                            blocks: Vec::new(),
                        },
                        0,
                    ))
                }
            };
            if *used > 0 {
                c.more.push((a, len));
            }
            // Read when the chunk is full: scattered dirty pages, many runs to a call.
            *used += len;
            a += len as u64;
        }
    }
    if let Some((mut c, used)) = cur {
        read_chunk(pid, readable, &mut c, used)?;
        c.prepare();
        if tx.send(Ok(c)).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fill a chunk of pre-copy's dirty runs (its first run, then `more`), `used` bytes in all: one
/// process_vm_readv for the lot where it can, run by run (forced where unreadable) otherwise.
fn read_chunk(pid: i32, readable: bool, c: &mut Chunk, used: usize) -> Result<()> {
    let runs: Vec<(u64, usize)> = std::iter::once((c.addr, c.len))
        .chain(c.more.iter().copied())
        .collect();
    let buf = &mut c.buf[..used];
    if readable && ferry_sys::mem::read_mem_runs(pid, &runs, buf)? == used {
        return Ok(());
    }
    let mut off = 0;
    for (a, len) in runs {
        let part = &mut buf[off..off + len];
        if !readable || read_mem(pid, a, part)? != len {
            read_mem_forced(pid, a, part)?;
        }
        off += len;
    }
    Ok(())
}

/// Refuse files that changed since the dump.
pub fn check_files(maps: &[MappingImage]) -> Result<()> {
    // Each file once (a library is mapped four or five times): the rebuild of a migration
    // waits for this.
    let mut seen: std::collections::HashSet<(&str, Option<u64>)> = Default::default();
    for m in maps
        .iter()
        .filter(|m| m.kind == MapKind::File && m.ghost.is_none())
    {
        let p = m.path.as_deref().unwrap_or("");
        if !seen.insert((p, m.file_size)) {
            continue;
        }
        let meta = std::fs::metadata(p).map_err(|e| {
            EngineError::Failed(format!(
                "mapped file {p} cannot be opened for the restore: {e}"
            ))
        })?;
        // A mapped file of another size cannot be the same code or data; not overridable.
        if Some(meta.len()) != m.file_size {
            return Err(EngineError::Failed(format!(
                "mapped file {p} changed since the dump (size {} now, {} then)",
                meta.len(),
                m.file_size.unwrap_or(0)
            )));
        }
    }
    Ok(())
}

const PROT_R: u64 = libc::PROT_READ as u64;
const PROT_W: u64 = libc::PROT_WRITE as u64;
const PROT_X: u64 = libc::PROT_EXEC as u64;

fn prot(m: &MappingImage) -> u64 {
    (if m.read { PROT_R } else { 0 })
        | (if m.write { PROT_W } else { 0 })
        | (if m.exec { PROT_X } else { 0 })
}

/// Remove the stub's own memory except our page, the vDSO areas and `keep` (memory made
/// resident ahead, moved in later by `move_in`), move the vDSO areas to the saved addresses,
/// and recreate every saved mapping.
pub fn restore_layout(
    t: &mut Target,
    saved: &[MappingImage],
    shmem: &mut std::collections::HashMap<u64, (i32, u64, u64)>,
    ghosts: &std::collections::HashMap<u64, u64>,
    keep: Option<(u64, u64)>,
) -> Result<()> {
    let own = procfs::read_maps(t.pid)?;
    let is_vdso = |k: &ferry_sys::MapKind| {
        matches!(
            k,
            ferry_sys::MapKind::Vdso | ferry_sys::MapKind::Vvar | ferry_sys::MapKind::VvarVclock
        )
    };
    for m in &own {
        if m.start == t.page || is_vdso(&m.kind) || m.kind == ferry_sys::MapKind::Vsyscall {
            continue;
        }
        let (ks, ke) = keep.unwrap_or((0, 0));
        for (a, b) in [
            (m.start, m.end.min(ks).max(m.start)),
            (m.start.max(ke).min(m.end), m.end),
        ] {
            if a < b {
                t.queue(
                    "munmap of the stub's memory",
                    libc::SYS_munmap,
                    [a, b - a, 0, 0, 0, 0],
                )?;
            }
        }
    }
    // Move the running kernel's vDSO areas where the process expects them.
    for m in own.iter().filter(|m| is_vdso(&m.kind)) {
        let want = match m.kind {
            ferry_sys::MapKind::Vdso => MapKind::Vdso,
            ferry_sys::MapKind::Vvar => MapKind::Vvar,
            _ => MapKind::VvarVclock,
        };
        let Some(s) = saved.iter().find(|s| s.kind == want) else {
            t.sys(
                "munmap of an unneeded vDSO area",
                libc::SYS_munmap,
                [m.start, m.len(), 0, 0, 0, 0],
            )?;
            continue;
        };
        if s.end - s.start != m.len() {
            return Err(EngineError::Failed(format!(
                "the vDSO area {:?} has another size on this kernel ({} vs {} bytes)",
                want,
                m.len(),
                s.end - s.start
            )));
        }
        if s.start != m.start {
            t.sys(
                "mremap of the vDSO",
                libc::SYS_mremap,
                [
                    m.start,
                    m.len(),
                    m.len(),
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    s.start,
                    0,
                ],
            )?;
        }
    }
    map_each(t, saved, shmem, ghosts)
}

/// Move pieces of `pool` (private anonymous memory of the target, populated ahead and out
/// of the way of every mapping) over each of `maps` (private anonymous, mapped already), in
/// order while the pool lasts: mremap moves the pages themselves, so the memory is resident
/// before anything is written there. Each takes its mapping's protection and advice; the rest
/// of the pool is unmapped. Returns the ranges filled so, all of whose pages are present
/// (zero where nothing is written).
pub(crate) fn move_in(
    t: &mut Target,
    pool: (u64, u64),
    maps: &[&MappingImage],
) -> Result<Vec<(u64, u64)>> {
    let mut at = pool.0;
    let mut moved = Vec::new();
    for m in maps {
        let len = m.end - m.start;
        if !lazy_eligible(m) || m.kind == MapKind::Stack || at + len > pool.1 {
            continue;
        }
        t.queue(
            format!("mremap of reserved memory onto {:#x}-{:#x}", m.start, m.end),
            libc::SYS_mremap,
            [
                at,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                m.start,
                0,
            ],
        )?;
        if prot(m) != PROT_R | PROT_W {
            t.queue(
                format!("mprotect of {:#x}-{:#x}", m.start, m.end),
                libc::SYS_mprotect,
                [m.start, len, prot(m), 0, 0, 0],
            )?;
        }
        // The mapping made before was replaced, and its advice with it.
        advise(t, m)?;
        moved.push((m.start, m.end));
        at += len;
    }
    if at < pool.1 {
        t.queue(
            "munmap of unused reserved memory",
            libc::SYS_munmap,
            [at, pool.1 - at, 0, 0, 0, 0],
        )?;
    }
    t.flush()?;
    Ok(moved)
}

/// Maps each of `saved` (not the kernel's areas) over whatever is there, with its advice.
pub(crate) fn map_each<'a>(
    t: &mut Target,
    saved: impl IntoIterator<Item = &'a MappingImage>,
    shmem: &mut std::collections::HashMap<u64, (i32, u64, u64)>,
    ghosts: &std::collections::HashMap<u64, u64>,
) -> Result<()> {
    let mut open_files: std::collections::HashMap<(&str, i32), u64> = Default::default();
    for m in saved {
        let len = m.end - m.start;
        let fixed = libc::MAP_FIXED as u64;
        match m.kind {
            MapKind::Vdso | MapKind::Vvar | MapKind::VvarVclock | MapKind::Vsyscall => continue,
            MapKind::Hugetlb => {
                let size = m.huge_page_kb.max(4) * 1024;
                if !size.is_power_of_two() {
                    return Err(EngineError::Failed(format!(
                        "mapping {:#x}-{:#x}: odd huge page size {} KiB",
                        m.start, m.end, m.huge_page_kb
                    )));
                }
                let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB) as u64
                    | fixed
                    | ((size.trailing_zeros() as u64) << libc::MAP_HUGE_SHIFT);
                t.sys(
                    &format!(
                        "mmap of hugetlb memory {:#x}-{:#x} ({} KiB pages; are there enough \
                         free huge pages, /proc/sys/vm/nr_hugepages?)",
                        m.start, m.end, m.huge_page_kb
                    ),
                    libc::SYS_mmap,
                    [m.start, len, prot(m), flags, u64::MAX, 0],
                )?;
            }
            MapKind::Anon | MapKind::Heap | MapKind::Stack => {
                let mut flags = libc::MAP_PRIVATE as u64 | libc::MAP_ANONYMOUS as u64 | fixed;
                if m.kind == MapKind::Stack {
                    flags |= libc::MAP_GROWSDOWN as u64;
                }
                t.queue(
                    "mmap of anonymous memory",
                    libc::SYS_mmap,
                    [m.start, len, prot(m), flags, u64::MAX, 0],
                )?;
            }
            MapKind::SharedAnon if m.shmem.is_some_and(|i| shmem.contains_key(&i)) => {
                // Shared with a process restored before: map the same object through its
                // /proc map_files entry.
                let (pid, a, b) = shmem[&m.shmem.unwrap()];
                let path = format!("/proc/{pid}/map_files/{a:x}-{b:x}");
                let p = t.put_path(&path)?;
                let fd = t.sys(
                    &format!("open of {path}"),
                    libc::SYS_openat,
                    [
                        libc::AT_FDCWD as u64,
                        p,
                        (libc::O_RDWR | libc::O_CLOEXEC) as u64,
                        0,
                        0,
                        0,
                    ],
                )?;
                let flags = libc::MAP_SHARED as u64 | fixed;
                let r = t.sys(
                    "mmap of shared memory",
                    libc::SYS_mmap,
                    [m.start, len, prot(m), flags, fd, m.offset],
                );
                t.sys("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
                r?;
            }
            MapKind::SharedAnon => {
                if let Some(i) = m.shmem {
                    shmem.insert(i, (t.pid, m.start, m.end));
                }
                let flags = libc::MAP_SHARED as u64 | libc::MAP_ANONYMOUS as u64 | fixed;
                t.sys(
                    "mmap of shared anonymous memory",
                    libc::SYS_mmap,
                    [m.start, len, prot(m), flags, u64::MAX, 0],
                )?;
            }
            MapKind::File if m.ghost.is_some() => {
                let inode = m.ghost.unwrap();
                let fd = *ghosts.get(&inode).ok_or_else(|| {
                    EngineError::Failed(format!(
                        "mapping {:#x}: its unlinked file is not in the image",
                        m.start
                    ))
                })?;
                let share = if m.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                t.sys(
                    "mmap of an unlinked file",
                    libc::SYS_mmap,
                    [m.start, len, prot(m), share | fixed, fd, m.offset],
                )?;
            }
            MapKind::File => {
                let path = m.path.as_deref().unwrap_or("");
                let oflags = if m.shared && m.write {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                };
                // A library has four or five mappings of one file: opened once.
                let fd = match open_files.get(&(path, oflags)) {
                    Some(&fd) => fd,
                    None => {
                        let p = t.put_path(path)?;
                        let fd = t.sys(
                            &format!("open of the mapped file {path}"),
                            libc::SYS_openat,
                            [
                                libc::AT_FDCWD as u64,
                                p,
                                (oflags | libc::O_CLOEXEC) as u64,
                                0,
                                0,
                                0,
                            ],
                        )?;
                        open_files.insert((path, oflags), fd);
                        fd
                    }
                };
                let share = if m.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                t.queue(
                    format!("mmap of {path}"),
                    libc::SYS_mmap,
                    [m.start, len, prot(m), share | fixed, fd, m.offset],
                )?;
            }
        }
        // Before the pages are written: with `hugepage` they fault in as huge pages.
        advise(t, m)?;
    }
    for fd in open_files.into_values() {
        t.queue("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    }
    // Everything is in place before a page is written.
    t.flush()
}

/// Filling fresh private anonymous memory of a stopped process through a userfaultfd
/// (UFFDIO_COPY): the kernel allocates each page and copies into it, where a write through
/// /proc/PID/mem faults the page in, clears it, then copies (2 GiB: ~0.36 s against ~0.65 s
/// on two CPUs here). Dropping it unregisters the memory, so later faults are ordinary ones.
pub struct EagerFill {
    uffd: ferry_sys::uffd::LazyUffd,
    ranges: Vec<(u64, u64)>,
    placed: std::sync::atomic::AtomicU64,
}

/// Below this many bytes of eligible pages, the userfaultfd's setup costs more than it saves.
const EAGER_FILL_MIN: u64 = 16 << 20;

impl EagerFill {
    /// Register the mappings of `maps` (in address order) that can be filled this way
    /// (private anonymous memory without transparent huge pages, which UFFDIO_COPY would
    /// split) and that `blocks` write into, if what they write there is worth it.
    pub fn new(
        f: &mut ferry_sys::freeze::Frozen,
        maps: &[MappingImage],
        blocks: &[ferry_image::BlockIndex],
    ) -> Result<Option<EagerFill>> {
        let eligible: Vec<(u64, u64)> = maps
            .iter()
            .filter(|m| {
                lazy_eligible(m) && m.thp_kb == 0 && !m.advice.iter().any(|a| a == "hugepage")
            })
            .map(|m| (m.start, m.end))
            .collect();
        let mut bytes = vec![0u64; eligible.len()];
        for b in blocks {
            if let Some(i) = range_of(&eligible, b.vaddr) {
                bytes[i] += b.data_len;
            }
        }
        if bytes.iter().sum::<u64>() < EAGER_FILL_MIN {
            return Ok(None);
        }
        let ranges: Vec<(u64, u64)> = eligible
            .into_iter()
            .zip(bytes)
            .filter(|&(_, n)| n > 0)
            .map(|(r, _)| r)
            .collect();
        let uffd = ferry_sys::uffd::LazyUffd::new_plain(f)?;
        for &(s, e) in &ranges {
            uffd.register(s, e)?;
        }
        Ok(Some(EagerFill {
            uffd,
            ranges,
            placed: Default::default(),
        }))
    }

    /// Bytes placed so far.
    pub fn placed(&self) -> u64 {
        self.placed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Place `data` at `vaddr` as far as it goes: the bytes placed (all of them, or up to a
    /// page present already or an address outside the registered memory).
    fn put(&self, vaddr: u64, data: &[u8]) -> usize {
        use ferry_sys::uffd::Fill;
        let end = vaddr + data.len() as u64;
        if range_of(&self.ranges, vaddr).is_none_or(|i| end > self.ranges[i].1) {
            return 0;
        }
        let mut n = 0;
        for _ in 0..3 {
            match self.uffd.copy(vaddr, data) {
                Ok(Fill::Done) => n = data.len(),
                Ok(Fill::Exists(k)) => n = k as usize & !(PAGE_SIZE - 1),
                Ok(Fill::Again) => continue,
                Ok(Fill::Gone) | Err(_) => {}
            }
            break;
        }
        self.placed
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }
}

/// The index of the range of `ranges` (sorted, not overlapping) that holds `a`.
fn range_of(ranges: &[(u64, u64)], a: u64) -> Option<usize> {
    let i = ranges.partition_point(|&(s, _)| s <= a).checked_sub(1)?;
    (a < ranges[i].1).then_some(i)
}

/// The page blocks of an image, verified, and the mapped file they are in.
pub struct Pages {
    pub map: std::sync::Arc<ferry_sys::mem::MappedFile>,
    pub index: Vec<ferry_image::BlockIndex>,
}

/// Write the page blocks `range` (one process's) back into process `pid`, except those at
/// addresses `skip` names (filled lazily). Two writers take blocks
/// straight from the mapped pages.fimg (no copy of ours), check each against the CRC verified before any process existed
/// (so a file changed since fails the restore), and write them through /proc/PID/mem, which
/// writes read-only and PROT_NONE mappings too. First touch of the new pages dominates, so both
/// cores populate them. `on_progress` is told the bytes
/// written so far, now and then. Returns the pages written.
pub fn restore_pages(
    pid: i32,
    pages: &Pages,
    range: std::ops::Range<usize>,
    skip: &(dyn Fn(u64) -> bool + Sync),
    fill: Option<&EagerFill>,
    on_progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let file = pages.map.bytes();
    let blocks: Vec<&ferry_image::BlockIndex> = pages.index[range]
        .iter()
        .filter(|b| !skip(b.vaddr))
        .collect();
    let n: u64 = blocks.iter().map(|b| b.data_len / PAGE_SIZE as u64).sum();
    if blocks.is_empty() {
        return Ok(0);
    }
    let blocks = &blocks;
    let path = format!("/proc/{pid}/mem");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| EngineError::Failed(format!("opening {path}: {e}")))?;
    let mem = &mem;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let (next, done, failed) = (&next, &done, &failed);
    // A few MiB (the final pages of a live migration) are written here: two writer threads
    // and the 1 ms naps of the progress loop would cost more than the writing.
    let small = n * (PAGE_SIZE as u64) < 8 << 20;
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..if small { 1 } else { 2 })
            .map(|_| {
                s.spawn(move || -> Result<()> {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(b) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        let at = b.data_offset as usize;
                        let r = file
                            .get(at..at + b.data_len as usize)
                            .ok_or_else(|| {
                                EngineError::Failed(format!(
                                    "pages.fimg is shorter than it was verified: {} bytes at \
                                     offset {at} are missing",
                                    b.data_len
                                ))
                            })
                            .and_then(|buf| {
                                if b.matches(buf) {
                                    Ok(buf)
                                } else {
                                    Err(EngineError::Failed(format!(
                                        "pages.fimg changed since it was verified: the block at \
                                         offset {} (pages at {:#x}) no longer matches its CRC",
                                        b.data_offset, b.vaddr
                                    )))
                                }
                            })
                            .and_then(|buf| {
                                // What the userfaultfd could not place goes through
                                // /proc/PID/mem.
                                let at = fill.map_or(0, |f| f.put(b.vaddr, buf));
                                let (buf, vaddr) = (&buf[at..], b.vaddr + at as u64);
                                if buf.is_empty() {
                                    return Ok(());
                                }
                                mem.write_all_at(buf, vaddr).map_err(|e| {
                                    EngineError::Failed(format!(
                                        "writing {} bytes at {:#x} of the restored process {pid}: {e}",
                                        buf.len(),
                                        vaddr
                                    ))
                                })
                            });
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return r;
                        }
                        done.fetch_add(b.data_len, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        // Short naps: a small process must not wait for a long one.
        let mut naps = 0u32;
        while writers.iter().any(|w| !w.is_finished()) {
            if small {
                // Joined below; a handful of pages takes less than a nap.
                break;
            }
            naps += 1;
            if naps.is_multiple_of(20) {
                on_progress(done.load(Ordering::Relaxed));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        on_progress(done.load(Ordering::Relaxed));
        for w in writers {
            w.join()
                .map_err(|_| EngineError::Failed("page writer panicked".into()))??;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::{push_lazy, Delta, LAZY_GAP};

    #[test]
    fn dirty_runs_of_a_mapping_are_found_and_clipped() {
        let d = Delta {
            tracked: vec![(0x1000, 0x20000)],
            dirty: vec![
                (0x1000, 0x3000),
                (0x5000, 0x6000),
                (0x8000, 0xa000),
                (0xf000, 0x11000),
            ],
            ..Default::default()
        };
        assert_eq!(
            d.dirty_in(0x2000, 0x9000),
            vec![(0x2000, 0x3000), (0x5000, 0x6000), (0x8000, 0x9000)]
        );
        assert_eq!(d.dirty_in(0x3000, 0x5000), vec![]);
        assert_eq!(d.dirty_in(0x10000, 0x20000), vec![(0x10000, 0x11000)]);
        assert_eq!(d.dirty_in(0x0, 0x1000), vec![]);
        assert_eq!(d.dirty_in(0x0, 0x100000).len(), 4);
    }

    #[test]
    fn eager_pages_are_cut_out_of_lazy_runs() {
        let d = Delta {
            lazy: true,
            eager: vec![0x1000, 0x5000, 0x6000, 0x9000, 0x20000],
            ..Default::default()
        };
        let (lazy, eager) = d.split_eager(&[(0x0, 0x8000), (0x9000, 0xa000), (0x10000, 0x12000)]);
        assert_eq!(
            lazy,
            vec![
                (0x0, 0x1000),
                (0x2000, 0x5000),
                (0x7000, 0x8000),
                (0x10000, 0x12000)
            ]
        );
        // Neighbouring eager pages are read as one run.
        assert_eq!(
            eager,
            vec![(0x1000, 0x2000), (0x5000, 0x7000), (0x9000, 0xa000)]
        );
        let none = Delta::default();
        assert_eq!(none.split_eager(&[(0x0, 0x8000)]).0, vec![(0x0, 0x8000)]);
    }

    #[test]
    fn lazy_runs_closer_than_a_fetch_are_joined() {
        let mut runs = Vec::new();
        push_lazy(&mut runs, 0x10000, 0x1000);
        push_lazy(&mut runs, 0x11000, 0x1000); // touching
        push_lazy(&mut runs, 0x13000, 0x2000); // 8 KiB apart
        push_lazy(&mut runs, 0x15000 + LAZY_GAP - 0x1000, 0x1000); // just under 64 KiB apart
        assert_eq!(runs, vec![(0x10000, 0x15000 + LAZY_GAP)]);
        push_lazy(&mut runs, 0x15000 + 2 * LAZY_GAP, 0x1000); // 64 KiB apart: a run of its own
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1], (0x15000 + 2 * LAZY_GAP, 0x16000 + 2 * LAZY_GAP));
    }

    #[test]
    fn range_of_finds_the_range_holding_an_address() {
        let r = [(0x1000, 0x3000), (0x5000, 0x6000)];
        assert_eq!(super::range_of(&r, 0x1000), Some(0));
        assert_eq!(super::range_of(&r, 0x2fff), Some(0));
        assert_eq!(super::range_of(&r, 0x3000), None);
        assert_eq!(super::range_of(&r, 0x5800), Some(1));
        assert_eq!(super::range_of(&r, 0x800), None);
        assert_eq!(super::range_of(&r, 0x7000), None);
        assert_eq!(super::range_of(&[], 0x7000), None);
    }
}
