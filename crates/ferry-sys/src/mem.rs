//! Reading another process's memory.

use crate::error::{Error, Result};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use std::io::IoSliceMut;

/// Read `buf.len()` bytes at `addr` of process `pid` with process_vm_readv. Returns the number
/// of bytes read, which is short when the range runs into unmapped or unreadable memory.
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let remote = [RemoteIoVec {
            base: (addr + done as u64) as usize,
            len: buf.len() - done,
        }];
        let mut local = [IoSliceMut::new(&mut buf[done..])];
        match process_vm_readv(Pid::from_raw(pid), &mut local, &remote) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(nix::Error::EFAULT) | Err(nix::Error::EIO) => break,
            Err(nix::Error::ESRCH) => return Err(Error::NoSuchProcess(pid)),
            Err(e) => {
                return Err(Error::io(
                    format!("process_vm_readv of process {pid} at {addr:#x}"),
                    e.into(),
                ))
            }
        }
    }
    Ok(done)
}

/// Read scattered runs of process `pid` into `buf`, one after another, with as few
/// process_vm_readv calls as the kernel allows (1024 runs each). Returns the bytes read: less
/// than asked when some run could not be read whole (the caller then reads run by run).
pub fn read_mem_runs(pid: i32, runs: &[(u64, usize)], buf: &mut [u8]) -> Result<usize> {
    let mut done = 0usize;
    for group in runs.chunks(1024) {
        let want: usize = group.iter().map(|r| r.1).sum();
        let remote: Vec<RemoteIoVec> = group
            .iter()
            .map(|&(a, len)| RemoteIoVec {
                base: a as usize,
                len,
            })
            .collect();
        let mut local = [IoSliceMut::new(&mut buf[done..done + want])];
        match process_vm_readv(Pid::from_raw(pid), &mut local, &remote) {
            Ok(n) if n == want => done += n,
            Ok(n) => return Ok(done + n),
            Err(nix::Error::EFAULT) | Err(nix::Error::EIO) => return Ok(done),
            Err(nix::Error::ESRCH) => return Err(Error::NoSuchProcess(pid)),
            Err(e) => {
                return Err(Error::io(
                    format!("process_vm_readv of process {pid} ({} runs)", group.len()),
                    e.into(),
                ))
            }
        }
    }
    Ok(done)
}

/// Write scattered runs `(address, bytes)` into process `pid`, with as few
/// process_vm_writev calls as the kernel allows (1024 runs each); a group it refuses (a
/// read-only mapping) is written run by run through /proc/PID/mem.
pub fn write_mem_runs(pid: i32, runs: &[(u64, &[u8])]) -> Result<()> {
    use nix::sys::uio::process_vm_writev;
    use std::io::IoSlice;
    for group in runs.chunks(1024) {
        let want: usize = group.iter().map(|r| r.1.len()).sum();
        let remote: Vec<RemoteIoVec> = group
            .iter()
            .map(|&(a, d)| RemoteIoVec {
                base: a as usize,
                len: d.len(),
            })
            .collect();
        let local: Vec<IoSlice> = group.iter().map(|r| IoSlice::new(r.1)).collect();
        match process_vm_writev(Pid::from_raw(pid), &local, &remote) {
            Ok(n) if n == want => {}
            Ok(_) | Err(nix::Error::EFAULT) => {
                for &(a, d) in group {
                    write_mem(pid, a, d)?;
                }
            }
            Err(nix::Error::ESRCH) => return Err(Error::NoSuchProcess(pid)),
            Err(e) => {
                return Err(Error::io(
                    format!("process_vm_writev of process {pid} ({} runs)", group.len()),
                    e.into(),
                ))
            }
        }
    }
    Ok(())
}

/// Write `data` at `addr` of process `pid` with process_vm_writev, which is about twice as
/// fast as /proc/PID/mem but writes only writable memory. Returns the bytes written: short
/// where the range meets memory it cannot write (the caller writes the rest another way).
pub fn write_mem_vm(pid: i32, addr: u64, data: &[u8]) -> Result<usize> {
    use nix::sys::uio::process_vm_writev;
    use std::io::IoSlice;
    let mut done = 0usize;
    while done < data.len() {
        let remote = [RemoteIoVec {
            base: (addr + done as u64) as usize,
            len: data.len() - done,
        }];
        match process_vm_writev(Pid::from_raw(pid), &[IoSlice::new(&data[done..])], &remote) {
            Ok(0) | Err(nix::Error::EFAULT) | Err(nix::Error::EIO) => break,
            Ok(n) => done += n,
            Err(nix::Error::ESRCH) => return Err(Error::NoSuchProcess(pid)),
            Err(e) => {
                return Err(Error::io(
                    format!("process_vm_writev of process {pid} at {addr:#x}"),
                    e.into(),
                ))
            }
        }
    }
    Ok(done)
}

/// Is every byte of `data` zero? Checked 64 bytes at a time: a byte at a time (what
/// `iter().all` compiles to, as it may stop early) manages under 2 GB/s, a third of the
/// speed at which pages are read out of a process.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().expect("8 bytes"));
    blocks.all(|b| b.chunks_exact(8).fold(0, |acc, w| acc | word(w)) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// Read a range that may contain unreadable pages: unreadable 4 KiB pages are left zeroed and
/// reported in the returned count of missing pages.
pub fn read_mem_lossy(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize> {
    let mut off = 0usize;
    let mut missing = 0;
    while off < buf.len() {
        let n = read_mem(pid, addr + off as u64, &mut buf[off..])?;
        off += n;
        if off < buf.len() {
            // Skip the page that failed.
            let page_end = ((addr + off as u64) | 0xfff) + 1;
            let skip = ((page_end - (addr + off as u64)) as usize).min(buf.len() - off);
            buf[off..off + skip].fill(0);
            off += skip;
            missing += 1;
        }
    }
    Ok(missing)
}

/// Write into another process's memory through /proc/PID/mem, which also writes read-only
/// private mappings (the kernel breaks COW for a ptracer).
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {path}"), e))?;
    f.write_all_at(data, addr).map_err(|e| {
        Error::io(
            format!("writing {} bytes at {addr:#x} of process {pid}", data.len()),
            e,
        )
    })
}

/// Read through /proc/PID/mem, which also reads PROT_NONE mappings.
pub fn read_mem_forced(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {path}"), e))?;
    f.read_exact_at(buf, addr).map_err(|e| {
        Error::io(
            format!("reading {} bytes at {addr:#x} of process {pid}", buf.len()),
            e,
        )
    })
}

/// Page flags from /proc/PID/pagemap for `count` pages from `addr`.
pub fn pagemap(pid: i32, addr: u64, count: usize) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/pagemap");
    let f = std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {path}"), e))?;
    let mut raw = vec![0u8; count * 8];
    f.read_exact_at(&mut raw, (addr / 4096) * 8)
        .map_err(|e| Error::io(format!("reading {path}"), e))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

/// The parts [start, end) of shared memory mapping [start, end) (file offset `offset`) of
/// process `pid` whose pages exist in the memory object itself, found with SEEK_DATA and
/// SEEK_HOLE on its /proc/PID/map_files entry. A page another process wrote is there even
/// where this process never touched it, so its own page table (pagemap) does not show it.
pub fn shared_data_runs(pid: i32, start: u64, end: u64, offset: u64) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let f = std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {path}"), e))?;
    let stop = (offset + (end - start)) as i64;
    let mut pos = offset as i64;
    let mut out = Vec::new();
    while pos < stop {
        let data = match lseek(&f, pos, Whence::SeekData) {
            Ok(d) => d,
            // No data after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => {
                return Err(Error::io(
                    format!("SEEK_DATA in {path}"),
                    std::io::Error::from(e),
                ))
            }
        };
        if data >= stop {
            break;
        }
        let hole = lseek(&f, data, Whence::SeekHole)
            .map_err(|e| Error::io(format!("SEEK_HOLE in {path}"), std::io::Error::from(e)))?
            .min(stop);
        let page = |o: i64| start + ((o as u64 - offset) & !4095);
        out.push((page(data), page(hole + 4095)));
        pos = hole;
    }
    Ok(out)
}

/// A file mapped read-only into this process (the pages of an image), read without copying.
/// The file must not shrink while it is mapped: the kernel answers a read past its new end
/// with SIGBUS.
pub struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; sharing `&[u8]` views of it
// between threads is as safe as sharing any immutable slice.
unsafe impl Send for MappedFile {}
// SAFETY: as above, nothing writes through the mapping.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    pub fn open(path: &std::path::Path) -> Result<MappedFile> {
        use std::os::fd::AsRawFd;
        let what = |s: &str| format!("{s} {}", path.display());
        let f = std::fs::File::open(path).map_err(|e| Error::io(what("opening"), e))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io(what("reading the size of"), e))?
            .len() as usize;
        if len == 0 {
            return Err(Error::io(
                what("mapping"),
                std::io::Error::other("the file is empty"),
            ));
        }
        // SAFETY: a new read-only private mapping of an open file, at an address the kernel
        // chooses; it touches no existing memory. The fd may be closed afterwards.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(what("mapping"), std::io::Error::last_os_error()));
        }
        Ok(MappedFile { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a readable mapping of `len` bytes that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// A `BufRead` over a shared mapped file, from its start: its buffer is the mapping itself.
pub struct MappedReader {
    pub map: std::sync::Arc<MappedFile>,
    pub pos: usize,
}

impl std::io::Read for MappedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let src = &self.map.bytes()[self.pos..];
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::BufRead for MappedReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        Ok(&self.map.bytes()[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.map.len);
    }
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_any_nonzero_byte() {
        let mut page = vec![0u8; 4096 + 13];
        assert!(is_zero(&page));
        assert!(is_zero(&[]));
        for i in [0, 7, 63, 64, 4095, 4096, 4108] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            assert!(is_zero(&page[..i]), "before byte {i}");
            page[i] = 0;
        }
    }

    #[test]
    fn maps_a_file() {
        use std::io::{BufRead, Read};
        let dir = std::env::temp_dir().join(format!("ferry-map-{}", std::process::id()));
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 3) as u8).collect();
        std::fs::write(&dir, &data).unwrap();
        let m = std::sync::Arc::new(MappedFile::open(&dir).unwrap());
        assert_eq!(m.bytes(), &data[..]);
        let mut r = MappedReader { map: m, pos: 0 };
        let mut head = [0u8; 10];
        r.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..10]);
        assert_eq!(r.fill_buf().unwrap(), &data[10..]);
        r.consume(20000);
        assert!(r.fill_buf().unwrap().is_empty());
        std::fs::write(&dir, b"").unwrap();
        assert!(MappedFile::open(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn reads_own_memory() {
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
        let mut out = vec![0u8; data.len()];
        let n = read_mem(std::process::id() as i32, data.as_ptr() as u64, &mut out).unwrap();
        assert_eq!(n, data.len());
        assert_eq!(out, data);
        let mut small = [0u8; 8];
        assert_eq!(
            read_mem(std::process::id() as i32, 8, &mut small).unwrap(),
            0
        );
    }
}
