//! A guardian for processes whose memory Ferry is still filling (lazy restore, post-copy).
//!
//! If Ferry died while a process waits for pages, the kernel would close its userfaultfd and
//! the process would run on with zero pages where its data should be. The guardian is a tiny
//! forked process that holds a copy of every such userfaultfd (so faults keep waiting instead
//! of reading zeros) and the PIDs behind them; when Ferry's end of their socket closes without
//! a "done", it kills those processes. It does nothing but raw system calls, as a child
//! forked from a threaded process must.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const MAX_PIDS: usize = 4096;

pub struct Guardian {
    sock: OwnedFd,
    pid: i32,
    done: bool,
}

/// A guardian forked ahead of need (`prepare`).
static SPARE: std::sync::Mutex<Option<Guardian>> = std::sync::Mutex::new(None);

/// Forks a guardian now for the next `Guardian::spawn` to take: a fork copies the page tables
/// of the whole process (about a millisecond in an agent), better paid before a migration's
/// frozen phase than in it. Best effort.
pub fn prepare() {
    let mut spare = SPARE.lock().unwrap();
    if spare.is_none() {
        *spare = Guardian::fork_new().ok();
    }
}

impl Guardian {
    /// A guardian: the one `prepare` made, or a new one.
    pub fn spawn() -> Result<Guardian> {
        if let Some(g) = SPARE.lock().unwrap().take() {
            return Ok(g);
        }
        Guardian::fork_new()
    }

    fn fork_new() -> Result<Guardian> {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair writes two fds into `sv`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(Error::io(
                "socketpair for the guardian",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: both fds were just created and are ours.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        // Allocated before the fork: the child must not allocate.
        let mut pids = vec![0i32; MAX_PIDS];
        // SAFETY: the child runs only async-signal-safe system calls on memory it owns (its
        // copy of `pids` and locals) and leaves with _exit.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(Error::io(
                "fork of the guardian",
                std::io::Error::last_os_error(),
            ));
        }
        if child == 0 {
            guard_loop(theirs.as_raw_fd(), &mut pids);
        }
        drop(theirs);
        Ok(Guardian {
            sock: ours,
            pid: child,
            done: false,
        })
    }

    /// Watch `pid`, holding a copy of `fd` (its userfaultfd) until the end.
    pub fn watch(&self, pid: i32, fd: Option<i32>) -> Result<()> {
        let msg = pid.to_ne_bytes();
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let mut cbuf = [0u64; 4];
        // SAFETY: an all-zero msghdr is valid; the fields set below point at live locals.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if let Some(fd) = fd {
            mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: CMSG_SPACE is arithmetic.
            mh.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
            // SAFETY: msg_control holds CMSG_SPACE(4) bytes, room for one header and an fd.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
            }
        }
        // SAFETY: `mh` describes valid buffers for the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(Error::io(
                format!("telling the guardian to watch process {pid}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Every page is in place: the guardian lets go and leaves.
    pub fn done(mut self) {
        self.done = true;
        let m = [0u8; 1];
        // SAFETY: sending one byte from a local buffer.
        unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                m.as_ptr() as *const libc::c_void,
                1,
                libc::MSG_NOSIGNAL,
            );
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Without "done", closing our end makes the guardian kill what it watches.
        let _ = self.done;
        // SAFETY: closing our end, then reaping the guardian (our child).
        unsafe {
            libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, 0);
        }
    }
}

/// The guardian's whole life (in the forked child).
fn guard_loop(sock: i32, pids: &mut [i32]) -> ! {
    // SAFETY: raw system calls on the child's own fds and memory.
    unsafe {
        // Keep nothing of the parent's but our socket (its listeners must die with it).
        libc::dup2(sock, 3);
        libc::syscall(libc::SYS_close_range, 0u32, 2u32, 0u32);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let sock = 3;
        let mut n = 0usize;
        let mut done = false;
        loop {
            let mut msg = [0u8; 4];
            let mut iov = libc::iovec {
                iov_base: msg.as_mut_ptr() as *mut libc::c_void,
                iov_len: 4,
            };
            let mut cbuf = [0u64; 4];
            let mut mh: libc::msghdr = std::mem::zeroed();
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            mh.msg_controllen = std::mem::size_of_val(&cbuf);
            let got = libc::recvmsg(sock, &mut mh, 0);
            if got < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if got <= 0 {
                break;
            }
            if got == 1 {
                done = true;
                break;
            }
            // The received fd (if any) stays open in this process: that is the point.
            if got == 4 && n < pids.len() {
                pids[n] = i32::from_ne_bytes(msg);
                n += 1;
            }
        }
        if !done {
            for &p in &pids[..n] {
                libc::kill(p, libc::SIGKILL);
            }
        }
        libc::_exit(0);
    }
}
