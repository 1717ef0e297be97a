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
