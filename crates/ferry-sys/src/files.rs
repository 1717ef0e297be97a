//! Looking at another process's file descriptors from outside.

use crate::error::{Error, Result};
use nix::fcntl::{fcntl, tee, FcntlArg, OFlag, SpliceFFlags};
use std::io::Read;
use std::os::fd::AsFd;

/// Do two fds of process `pid` share one open file description (kcmp KCMP_FILE)?
pub fn same_file(pid: i32, fd1: i32, fd2: i32) -> Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp only compares kernel objects; it reads and writes no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, fd1, fd2) };
    if rc < 0 {
        return Err(Error::io(
            format!("kcmp of fds {fd1} and {fd2} of process {pid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(rc == 0)
}

/// Is fd `fd1` of process `pid1` the same open file description as fd `fd2` of process
/// `pid2` (kcmp KCMP_FILE)?
pub fn same_file_across(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp only compares kernel objects; it reads and writes no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    if rc < 0 {
        return Err(Error::io(
            format!("kcmp of fd {fd1} of process {pid1} and fd {fd2} of process {pid2}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(rc == 0)
}

/// The bytes buffered in a pipe that process `pid` holds as `fd`, without consuming them
/// (tee into a pipe of ours), and the pipe's capacity.
pub fn pipe_peek(pid: i32, fd: i32) -> Result<(Vec<u8>, usize)> {
    let what = |s: &str| format!("{s} of pipe fd {fd} of process {pid}");
    // A new read end of the same pipe, through /proc.
    let theirs = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| Error::io(what("reopening"), e))?;
    let size = fcntl(theirs.as_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| Error::io(what("F_GETPIPE_SZ"), e.into()))? as usize;
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| Error::io(what("pipe2"), e.into()))?;
    let _ = fcntl(
        w.as_fd(),
        FcntlArg::F_SETPIPE_SZ(size.max(4096) as libc::c_int),
    );
    let mut data = Vec::new();
    match tee(
        theirs.as_fd(),
        w.as_fd(),
        size,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(n) => {
            drop(w);
            let mut f = std::fs::File::from(r);
            data.resize(n, 0);
            f.read_exact(&mut data)
                .map_err(|e| Error::io(what("reading the copy"), e))?;
        }
        Err(nix::Error::EAGAIN) => {}
        Err(e) => return Err(Error::io(what("tee"), e.into())),
    }
    Ok((data, size))
}

use std::os::unix::fs::OpenOptionsExt;

/// A new pipe of ours (close-on-exec, blocking) of `capacity` bytes holding `data`: (read
/// end, write end).
pub fn pipe_with(
    capacity: usize,
    data: &[u8],
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    // Non-blocking while it is filled: more data than room is an error, not a hang.
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| Error::io("pipe2", e.into()))?;
    if capacity > 0 {
        fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(capacity as libc::c_int))
            .map_err(|e| Error::io(format!("F_SETPIPE_SZ to {capacity}"), e.into()))?;
    }
    let mut done = 0;
    while done < data.len() {
        let n = nix::unistd::write(&w, &data[done..]).map_err(|e| {
            Error::io(
                format!("writing {} bytes into a new pipe of {capacity}", data.len()),
                e.into(),
            )
        })?;
        done += n;
    }
    for end in [&r, &w] {
        fcntl(end.as_fd(), FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(|e| Error::io("F_SETFL on a new pipe", e.into()))?;
    }
    Ok((r, w))
}

/// Allocates the first `bytes` of `f` (fallocate with FALLOC_FL_KEEP_SIZE): its size stays,
/// later writes there find their blocks or pages already allocated.
pub fn preallocate(f: &std::fs::File, bytes: u64) -> nix::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(f, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, bytes as i64)
}
