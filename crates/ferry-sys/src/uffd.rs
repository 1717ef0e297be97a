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
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
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
        self.ranges.push((start, end));
        Ok(())
    }

    /// Pages of [start, end) written since the last call (or since registration), as page
    /// ranges; they are write-protected again. Unpopulated pages count as not written.
    pub fn written(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut buf = vec![PageRegion::default(); 4096];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let n = ioctl(
                &self.pagemap,
                PAGEMAP_SCAN,
                &mut arg,
                &format!("PAGEMAP_SCAN of process {}", self.pid),
            )? as usize;
            for r in &buf[..n.min(buf.len())] {
                match out.last_mut() {
                    Some(l) if l.1 == r.start => l.1 = r.end,
                    _ => out.push((r.start, r.end)),
                }
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }

    /// Written pages over every registered range.
    pub fn written_all(&mut self) -> Result<Vec<(u64, u64)>> {
        let mut v = Vec::new();
        for (s, e) in self.ranges.clone() {
            v.extend(self.written(s, e)?);
        }
        Ok(v)
    }

    /// Stop tracking: the process's memory behaves as before (write-protection dropped).
    pub fn stop(self) {
        for &(start, end) in &self.ranges {
            let mut r = [start, end - start];
            let _ = ioctl(&self.uffd, UFFDIO_UNREGISTER, &mut r, "UFFDIO_UNREGISTER");
        }
    }
}
