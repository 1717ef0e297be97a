//! Tracking the writes of a running process without soft-dirty: a userfaultfd created inside
//! the target (injected syscall), taken with pidfd_getfd, registered for asynchronous
//! write-protection (WP_ASYNC), and read back with PAGEMAP_SCAN, which returns the pages
//! written since the last scan and write-protects them again in the same call.

use crate::error::{Error, Result};
use crate::freeze::Frozen;
use std::os::fd::{AsRawFd, OwnedFd};

// include/uapi/linux/userfaultfd.h and fs.h; the libc crate lacks them.
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// What a scan of written pages reads.
struct Scan<'a> {
    pid: i32,
    pagemap: &'a std::fs::File,
    files: &'a [(u64, u64)],
}

impl Scan<'_> {
    fn written(
        &self,
        buf: &mut [PageRegion],
        start: u64,
        end: u64,
        rearm: bool,
    ) -> Result<Vec<(u64, u64)>> {
        // In a private file mapping the file's own pages are never written (a write copies
        // them) and are not ours to send.
        let file = self.files.iter().any(|&(a, b)| a <= start && end <= b);
        let not_file = if file { PAGE_IS_FILE } else { 0 };
        scan_runs(self.pagemap, self.pid, buf, start, end, |at| PmScanArg {
            flags: if rearm {
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
            } else {
                0
            },
            start: at,
            category_inverted: not_file,
            category_mask: PAGE_IS_WRITTEN | not_file,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        })
    }
}

/// A tracker's last scan of written pages, owned, for a thread of its own.
pub struct LastScan {
    pid: i32,
    pagemap: std::fs::File,
    ranges: Vec<(u64, u64)>,
    files: Vec<(u64, u64)>,
}

impl LastScan {
    /// `WriteTracker::written_all_last`: 3 GiB or more in parts on every CPU, as
    /// `written_all` does (a process written all over leaves a walk of ~15 ms per 4 GiB).
    pub fn run(&self) -> Result<Vec<(u64, u64)>> {
        let scan = Scan {
            pid: self.pid,
            pagemap: &self.pagemap,
            files: &self.files,
        };
        // Below that the collection, which runs beside it on one CPU, loses more to the
        // second thread than the scan gains (Redis, 1.5 GiB: +0.5 ms to the collection).
        scan_in_parts_over(&self.ranges, 3 << 30, |s, e| {
            REGIONS.with_borrow_mut(|buf| scan.written(buf, s, e, false))
        })
    }
}

std::thread_local! {
    /// Each thread's buffer for PAGEMAP_SCAN's output: a tracker scans a hundred ranges or
    /// more while the process is frozen, and a fresh 96 KiB per range cost a millisecond.
    static REGIONS: std::cell::RefCell<Vec<PageRegion>> =
        std::cell::RefCell::new(vec![PageRegion::default(); 4096]);
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<i64> {
    // SAFETY: `arg` is the request's argument structure, valid and writable for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if rc < 0 {
        return Err(Error::io(what.to_string(), std::io::Error::last_os_error()));
    }
    Ok(rc as i64)
}

/// Write tracking of one process's memory.
pub struct WriteTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: std::fs::File,
    /// Registered ranges (start, end).
    ranges: Vec<(u64, u64)>,
    /// Those of them that map a file privately.
    files: Vec<(u64, u64)>,
}

impl WriteTracker {
    /// Create the userfaultfd inside frozen process `f` and take it. Nothing is tracked until
    /// ranges are registered.
    pub fn new(f: &mut Frozen) -> Result<WriteTracker> {
        let pid = f.pid();
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = f.inject_syscall(pid, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        if fd < 0 {
            return Err(Error::io(
                format!("userfaultfd in process {pid}"),
                std::io::Error::from_raw_os_error(-fd as i32),
            ));
        }
        let taken = crate::net::take_fd(pid, fd as i32);
        // The target must not keep it, whatever happened.
        f.inject_syscall(pid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        let uffd = taken?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api, "UFFDIO_API (WP_ASYNC)")?;
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| Error::io(format!("opening /proc/{pid}/pagemap"), e))?;
        Ok(WriteTracker {
            pid,
            uffd,
            pagemap,
            ranges: Vec::new(),
            files: Vec::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Track writes to [start, end) (page aligned, one private anonymous mapping or part).
    /// Its pages are armed by the next `written` scan.
    pub fn register(&mut self, start: u64, end: u64) -> Result<()> {
        let mut r = UffdioRegister {
            start,
            len: end - start,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(
            &self.uffd,
            UFFDIO_REGISTER,
            &mut r,
            &format!(
                "UFFDIO_REGISTER of {start:#x}-{end:#x} in process {}",
                self.pid
            ),
        )?;
        if !self.ranges.contains(&(start, end)) {
            self.ranges.push((start, end));
        }
        Ok(())
    }

    /// `register` for a private file mapping: only its private copies of the file's pages
    /// count as written (an anonymous range is not told apart this way: that costs a page
    /// lookup for every page scanned).
    pub fn register_file(&mut self, start: u64, end: u64) -> Result<()> {
        self.register(start, end)?;
        if !self.files.contains(&(start, end)) {
            self.files.push((start, end));
        }
        Ok(())
    }

    /// Start over on exactly `maps` (ranges of the current layout): each is registered (those
    /// the kernel refuses are left out) and un-protected, so the next scan reports every
    /// present page. For when a scan failed: it may have re-armed pages it never reported.
    pub fn reset_to(&mut self, maps: &[(u64, u64, bool)]) {
        self.ranges.clear();
        self.files.clear();
        for &(start, end, file) in maps {
            let r = if file {
                self.register_file(start, end)
            } else {
                self.register(start, end)
            };
            if r.is_err() {
                continue;
            }
            // struct uffdio_writeprotect: range, mode 0 (not protected).
            let mut wp = [start, end - start, 0u64];
            if ioctl(
                &self.uffd,
                UFFDIO_WRITEPROTECT,
                &mut wp,
                "UFFDIO_WRITEPROTECT",
            )
            .is_err()
            {
                self.ranges.retain(|&r| r != (start, end));
                self.files.retain(|&r| r != (start, end));
            }
        }
    }

    /// Whether [start, end) lies within a range registered before.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= start && end <= e)
    }

    /// Pages of [start, end) written since the last call (or since registration), as page
    /// ranges; they are write-protected again. Unpopulated pages count as not written.
    pub fn written(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        self.scan_written(start, end, true)
    }

    fn scan_written(&self, start: u64, end: u64, rearm: bool) -> Result<Vec<(u64, u64)>> {
        let scan = Scan {
            pid: self.pid,
            pagemap: &self.pagemap,
            files: &self.files,
        };
        REGIONS.with_borrow_mut(|buf| scan.written(buf, start, end, rearm))
    }

    /// The last scan (`written_all_last`), to run on a thread of its own while the process
    /// stays frozen.
    pub fn last_scan(&self) -> Result<LastScan> {
        Ok(LastScan {
            pid: self.pid,
            pagemap: self
                .pagemap
                .try_clone()
                .map_err(|e| Error::io("duplicating a pagemap fd", e))?,
            ranges: self.ranges.clone(),
            files: self.files.clone(),
        })
    }

    /// Written pages over every registered range, in address order. A large set of ranges is
    /// scanned in parts on every CPU (a walk costs ~1-4 ms per GiB, and the final one runs
    /// while the process is frozen).
    pub fn written_all(&mut self) -> Result<Vec<(u64, u64)>> {
        let me = &*self;
        scan_in_parts(&self.ranges, |s, e| me.scan_written(s, e, true))
    }

    /// `written_all` for the last time, with the process frozen: nothing is write-protected
    /// again, which spares a page-table update and TLB flush for every page written. A range
    /// no longer registered (replaced in place) shows every present page as written.
    pub fn written_all_last(&self) -> Result<Vec<(u64, u64)>> {
        scan_in_parts(&self.ranges, |s, e| self.scan_written(s, e, false))
    }

    /// Stop tracking: the process's memory behaves as before (write-protection dropped).
    pub fn stop(self) {
        for &(start, end) in &self.ranges {
            let mut r = [start, end - start];
            let _ = ioctl(&self.uffd, UFFDIO_UNREGISTER, &mut r, "UFFDIO_UNREGISTER");
        }
    }
}

// Missing-page mode (post-copy and lazy restore).
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// What a missing-page userfaultfd reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread waits for the page at this address.
    Fault(u64),
    /// The process forked: the child's memory is reported on this new userfaultfd.
    Fork(OwnedFdRaw),
    /// mremap moved [from, from+len) to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// madvise(DONTNEED/REMOVE) or munmap dropped [start, end): it reads as zero (or is gone).
    Remove { start: u64, end: u64 },
}

/// A raw fd number handed over by the kernel (a fork event); `LazyUffd::from_fork` owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedFdRaw(pub i32);

/// Outcome of filling pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// All `len` bytes are in place.
    Done,
    /// Only this many bytes went in: the next page is present already.
    Exists(u64),
    /// The address space changes (an event waits to be read): read events, then retry.
    Again,
    /// The range is no longer registered (unmapped), or the process is gone.
    Gone,
}

/// A userfaultfd of one process in missing mode: its registered memory is empty until Ferry
/// fills it, page by page on demand or ahead of need.
pub struct LazyUffd {
    pid: i32,
    uffd: OwnedFd,
}

impl LazyUffd {
    /// Create the userfaultfd inside frozen process `f` (injected) and take it, with the events
    /// that keep a filler right: fork, mremap, madvise-remove and munmap.
    pub fn new(f: &mut Frozen) -> Result<LazyUffd> {
        Self::create(
            f,
            UFFD_FEATURE_EVENT_FORK
                | UFFD_FEATURE_EVENT_REMAP
                | UFFD_FEATURE_EVENT_REMOVE
                | UFFD_FEATURE_EVENT_UNMAP,
        )
    }

    /// Without events: for filling memory of a process that stays stopped until the
    /// userfaultfd is dropped (which unregisters everything it registered).
    pub fn new_plain(f: &mut Frozen) -> Result<LazyUffd> {
        Self::create(f, 0)
    }

    fn create(f: &mut Frozen, features: u64) -> Result<LazyUffd> {
        let pid = f.pid();
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = f.inject_syscall(pid, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        if fd < 0 {
            return Err(Error::io(
                format!("userfaultfd in process {pid}"),
                std::io::Error::from_raw_os_error(-fd as i32),
            ));
        }
        let taken = crate::net::take_fd(pid, fd as i32);
        f.inject_syscall(pid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        let uffd = taken?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api, "UFFDIO_API (missing mode)")?;
        Ok(LazyUffd { pid, uffd })
    }

    /// The userfaultfd of a forked child (from a `Fork` event); its API is set already.
    pub fn from_fork(fd: OwnedFdRaw, child_of: i32) -> LazyUffd {
        use std::os::fd::FromRawFd;
        // SAFETY: the kernel installed this fd in our table for us when the event was read;
        // nothing else owns it.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd.0) };
        // Non-blocking like its parent's, so a read never hangs the filler.
        // SAFETY: fcntl on an fd we own.
        unsafe {
            let fl = libc::fcntl(fd.0, libc::F_GETFL);
            libc::fcntl(fd.0, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd.0, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        LazyUffd {
            pid: child_of,
            uffd,
        }
    }

    /// The process this userfaultfd was made for (for a fork child: its parent).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn raw(&self) -> i32 {
        self.uffd.as_raw_fd()
    }

    /// Report missing pages of [start, end) (page aligned, private anonymous memory).
    pub fn register(&self, start: u64, end: u64) -> Result<()> {
        let mut r = UffdioRegister {
            start,
            len: end - start,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(
            &self.uffd,
            UFFDIO_REGISTER,
            &mut r,
            &format!(
                "UFFDIO_REGISTER (missing) of {start:#x}-{end:#x} in process {}",
                self.pid
            ),
        )?;
        Ok(())
    }

    /// Stop reporting [start, end): before it is unmapped while nothing reads the events (an
    /// unmap of registered memory waits until its event is read).
    pub fn unregister(&self, start: u64, end: u64) -> Result<()> {
        let mut r = [start, end - start];
        ioctl(
            &self.uffd,
            UFFDIO_UNREGISTER,
            &mut r,
            &format!(
                "UFFDIO_UNREGISTER of {start:#x}-{end:#x} in process {}",
                self.pid
            ),
        )?;
        Ok(())
    }

    /// Wait up to `timeout_ms` for an event or a fault to read; whether one is there.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
    }

    /// Events waiting now (none when there are none: the fd is non-blocking).
    pub fn events(&self) -> Result<Vec<UffdEvent>> {
        let mut buf = [0u8; 32 * 16];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe {
            libc::read(
                self.uffd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(Vec::new());
            }
            return Err(Error::io(
                format!("reading the userfaultfd of process {}", self.pid),
                e,
            ));
        }
        let u64_at = |m: &[u8], o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().unwrap());
        let mut out = Vec::new();
        for m in buf[..n as usize].chunks_exact(32) {
            // struct uffd_msg: event (u8), 7 reserved bytes, then the argument union.
            match m[0] {
                UFFD_EVENT_PAGEFAULT => out.push(UffdEvent::Fault(u64_at(m, 16))),
                UFFD_EVENT_FORK => out.push(UffdEvent::Fork(OwnedFdRaw(i32::from_ne_bytes(
                    m[8..12].try_into().unwrap(),
                )))),
                UFFD_EVENT_REMAP => out.push(UffdEvent::Remap {
                    from: u64_at(m, 8),
                    to: u64_at(m, 16),
                    len: u64_at(m, 24),
                }),
                UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => out.push(UffdEvent::Remove {
                    start: u64_at(m, 8),
                    end: u64_at(m, 16),
                }),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Fill missing pages at `dst` with `data` (page multiple) and wake threads waiting there.
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<Fill> {
        let mut c = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `c` is a valid uffdio_copy; the kernel reads `len` bytes at `src`, which
        // `data` holds for the call.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c) };
        self.outcome(rc, c.copy, dst, "UFFDIO_COPY")
    }

    /// Map the zero page at `dst` (one page) and wake threads waiting there.
    pub fn zero(&self, dst: u64, len: u64) -> Result<Fill> {
        let mut z = UffdioZeropage {
            start: dst,
            len,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `z` is a valid uffdio_zeropage for the call.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        self.outcome(rc, z.zeropage, dst, "UFFDIO_ZEROPAGE")
    }

    fn outcome(&self, rc: i32, done: i64, dst: u64, what: &str) -> Result<Fill> {
        if rc >= 0 {
            return Ok(Fill::Done);
        }
        let err = std::io::Error::last_os_error();
        let code = err.raw_os_error().unwrap_or(0);
        match code {
            libc::EEXIST => Ok(Fill::Exists(done.max(0) as u64)),
            libc::EAGAIN => Ok(Fill::Again),
            libc::ENOENT | libc::ESRCH | libc::EFAULT => Ok(Fill::Gone),
            _ => Err(Error::io(
                format!("{what} at {dst:#x} in process {}", self.pid),
                err,
            )),
        }
    }
}

impl AsRawFd for LazyUffd {
    fn as_raw_fd(&self) -> i32 {
        self.uffd.as_raw_fd()
    }
}

const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// Runs [start, end) of the pages of [start, end) of process `pid` that hold data (present
/// or swapped, not the shared zero page): one PAGEMAP_SCAN call per 4096 runs, where reading
/// the pagemap costs 8 bytes per page.
pub fn present_runs(pid: i32, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    // A page-table walk costs ~4 ms per GiB: a large range is split across the CPUs (the
    // walks share the mmap lock for reading).
    let p = PresentPages::open(pid)?;
    scan_in_parts(&[(start, end)], |s, e| p.runs(s, e))
}

/// A process's pagemap kept open, for many small listings of the pages that hold data
/// (post-copy's page server answers each request with one).
pub struct PresentPages {
    pid: i32,
    pagemap: std::fs::File,
}

impl PresentPages {
    pub fn open(pid: i32) -> Result<PresentPages> {
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| Error::io(format!("opening /proc/{pid}/pagemap"), e))?;
        Ok(PresentPages { pid, pagemap })
    }

    /// `present_runs` of [start, end), on this thread.
    pub fn runs(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        REGIONS.with_borrow_mut(|buf| present_runs_into(&self.pagemap, self.pid, buf, start, end))
    }
}

/// `scan` over `ranges` (in address order), in one part per CPU when they are large: the
/// runs found, in address order, touching ones joined.
fn scan_in_parts(
    ranges: &[(u64, u64)],
    scan: impl Fn(u64, u64) -> Result<Vec<(u64, u64)>> + Sync,
) -> Result<Vec<(u64, u64)>> {
    scan_in_parts_over(ranges, 512 << 20, scan)
}

/// `scan_in_parts`, split only when the ranges add up to `min` bytes or more.
fn scan_in_parts_over(
    ranges: &[(u64, u64)],
    min: u64,
    scan: impl Fn(u64, u64) -> Result<Vec<(u64, u64)>> + Sync,
) -> Result<Vec<(u64, u64)>> {
    let scan_part = |part: &[(u64, u64)]| -> Result<Vec<(u64, u64)>> {
        let mut v = Vec::new();
        for &(s, e) in part {
            v.extend(scan(s, e)?);
        }
        Ok(v)
    };
    let parts = split_ranges(ranges, min);
    let found = if parts.len() < 2 {
        vec![scan_part(ranges)?]
    } else {
        std::thread::scope(|sc| {
            let jobs: Vec<_> = parts
                .iter()
                .map(|part| sc.spawn(|| scan_part(part)))
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(Error::Parse("a page-table scan thread panicked".into()))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in found.into_iter().flatten() {
        match out.last_mut() {
            Some(l) if l.1 == s => l.1 = e,
            _ => out.push((s, e)),
        }
    }
    Ok(out)
}

/// `ranges` (in address order) cut into one part per CPU of about equal size, in order,
/// when they add up to `min` bytes or more; one part otherwise.
fn split_ranges(ranges: &[(u64, u64)], min: u64) -> Vec<Vec<(u64, u64)>> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    if total < min || cpus < 2 {
        return vec![ranges.to_vec()];
    }
    let share = (total / cpus).next_multiple_of(2 << 20);
    let mut parts: Vec<Vec<(u64, u64)>> = vec![Vec::new()];
    let mut room = share;
    for &(mut s, e) in ranges {
        while s < e {
            let take = (e - s).min(room);
            parts.last_mut().unwrap().push((s, s + take));
            s += take;
            room -= take;
            if room == 0 {
                parts.push(Vec::new());
                room = share;
            }
        }
    }
    parts.retain(|p| !p.is_empty());
    parts
}

fn present_runs_into(
    pagemap: &std::fs::File,
    pid: i32,
    buf: &mut [PageRegion],
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>> {
    scan_runs(pagemap, pid, buf, start, end, |at| PmScanArg {
        start: at,
        category_inverted: PAGE_IS_PFNZERO,
        category_mask: PAGE_IS_PFNZERO,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        ..Default::default()
    })
}

/// PAGEMAP_SCAN of [start, end) with the arguments `arg(at)` gives for each call (from `at`;
/// the size, end and output vector are set here), until the walk is done: the matching page
/// runs, touching ones joined.
fn scan_runs(
    pagemap: &std::fs::File,
    pid: i32,
    buf: &mut [PageRegion],
    start: u64,
    end: u64,
    arg: impl Fn(u64) -> PmScanArg,
) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        let mut a = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            end,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            ..arg(at)
        };
        let n = ioctl(
            pagemap,
            PAGEMAP_SCAN,
            &mut a,
            &format!("PAGEMAP_SCAN of process {pid}"),
        )? as usize;
        for r in &buf[..n.min(buf.len())] {
            match out.last_mut() {
                Some(l) if l.1 == r.start => l.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if a.walk_end <= at {
            break;
        }
        at = a.walk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_range_is_listed_in_parts_and_joined_across_the_seams() {
        let len: usize = 1 << 30;
        // SAFETY: a new private anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // Single pages, and a run across the middle, where the split falls.
        let mut touched: Vec<u64> = vec![0, 5, 4096, 100_000, 262_143];
        touched.extend(131_000..131_200);
        for &page in &touched {
            // SAFETY: inside the mapping made above.
            unsafe { *((base + page * 4096) as *mut u8) = 1 };
        }
        let pid = std::process::id() as i32;
        let whole = PresentPages::open(pid)
            .unwrap()
            .runs(base, base + len as u64)
            .unwrap();
        let split = present_runs(pid, base, base + len as u64).unwrap();
        assert_eq!(split, whole);
        let pages: u64 = split.iter().map(|(s, e)| (e - s) / 4096).sum();
        assert_eq!(pages, touched.len() as u64, "{split:x?}");
        assert!(split.contains(&(base + 131_000 * 4096, base + 131_200 * 4096)));
        // Parts cover the ranges exactly, in order.
        let ranges = [(0u64, 300 << 20), (1 << 30, (1 << 30) + (700 << 20))];
        let parts = split_ranges(&ranges, 512 << 20);
        assert!(parts.len() >= 2, "{parts:x?}");
        let flat: Vec<(u64, u64)> = parts.concat();
        assert_eq!(flat.iter().map(|(s, e)| e - s).sum::<u64>(), 1000 << 20);
        assert!(flat.windows(2).all(|w| w[0].1 <= w[1].0), "{flat:x?}");
        assert_eq!(split_ranges(&[(0, 4096)], 512 << 20), vec![vec![(0, 4096)]]);
        assert_eq!(split_ranges(&ranges, 64 << 30).len(), 1);
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len) };
    }
}
