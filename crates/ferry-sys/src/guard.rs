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
    /// What the child uses of our memory: dropped after it is reaped.
    _child: Box<Child>,
}

const CHILD_STACK: usize = 64 << 10;

struct Child {
    sock: i32,
    pids: Box<[i32]>,
    stack: Stack,
}

/// An anonymous mapping for a child's stack.
struct Stack {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone.
unsafe impl Send for Stack {}

impl Stack {
    fn new(len: usize) -> Result<Stack> {
        // SAFETY: a new private anonymous mapping at an address the kernel chooses.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping the guardian's stack",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Stack { ptr, len })
    }

    fn top(&self) -> *mut libc::c_void {
        (self.ptr as usize + self.len) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, which nothing uses any more.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
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
        // The child shares our memory (CLONE_VM): a fork would copy the page tables of the
        // whole process, and every page we wrote afterwards would be copied again on its first
        // write (a millisecond and more, in an agent's frozen phase). Its stack, its PID list
        // and its arguments are ours, freed only once it is reaped; it makes raw system calls
        // only (no libc: it shares our thread's TLS, errno included).
        let mut child = Box::new(Child {
            sock: theirs.as_raw_fd(),
            pids: vec![0i32; MAX_PIDS].into_boxed_slice(),
            stack: Stack::new(CHILD_STACK)?,
        });
        let top = child.stack.top();
        let arg = &mut *child as *mut Child as *mut libc::c_void;
        // The child starts with every signal blocked (it inherits this thread's mask): none of
        // our handlers may run on its stack before it blocks them itself.
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
        let mut old = SigSet::empty();
        let _ = pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        // SAFETY: the child runs `guardian_main` on its own stack (`top`, 16-byte aligned, of
        // a live mapping), reading only `*arg`, both owned by the Guardian and freed only after
        // the child is reaped; SIGCHLD makes it a child we can wait for.
        let pid = unsafe { libc::clone(guardian_main, top, libc::CLONE_VM | libc::SIGCHLD, arg) };
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        if pid < 0 {
            return Err(Error::io(
                "clone of the guardian",
                std::io::Error::last_os_error(),
            ));
        }
        drop(theirs);
        Ok(Guardian {
            sock: ours,
            pid,
            done: false,
            _child: child,
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

/// A system call without libc (which would set errno in the TLS the child shares with the
/// thread that made it). Returns the kernel's result: negative is -errno.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_syscall(n: libc::c_long, a: [usize; 4]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes a system call and arguments valid for it; the kernel
    // clobbers only rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn raw_syscall(n: libc::c_long, a: [usize; 4]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes a system call and arguments valid for it.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") n,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            options(nostack)
        );
    }
    ret
}

/// The guardian's whole life, in the child that shares our memory (`Guardian::spawn`).
extern "C" fn guardian_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the Child that the parent keeps alive until this process is reaped;
    // only raw system calls are made, on this process's own fd table, its own stack, and
    // the PID list lent to it.
    unsafe {
        // Every signal blocked: a handler of the parent's would run here, on our memory (only
        // SIGKILL and SIGSTOP, which cannot be blocked, reach this process).
        let all: u64 = !0;
        raw_syscall(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &all as *const u64 as usize,
                0,
                8,
            ],
        );
        let child = &mut *(arg as *mut Child);
        let (pids, cap) = (child.pids.as_mut_ptr(), child.pids.len());
        // Keep nothing of the parent's fds but our socket (its listeners must die with it).
        let mut sock = child.sock;
        if sock != 3 {
            raw_syscall(libc::SYS_dup3, [sock as usize, 3, 0, 0]);
            sock = 3;
        }
        raw_syscall(libc::SYS_close_range, [0, 2, 0, 0]);
        raw_syscall(libc::SYS_close_range, [4, u32::MAX as usize, 0, 0]);
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
            let got = raw_syscall(
                libc::SYS_recvmsg,
                [sock as usize, &mut mh as *mut libc::msghdr as usize, 0, 0],
            );
            if got == -(libc::EINTR as isize) {
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
            if got == 4 && n < cap {
                *pids.add(n) = i32::from_ne_bytes(msg);
                n += 1;
            }
        }
        if !done {
            for k in 0..n {
                raw_syscall(
                    libc::SYS_kill,
                    [*pids.add(k) as usize, libc::SIGKILL as usize, 0, 0],
                );
            }
        }
        raw_syscall(libc::SYS_exit, [0, 0, 0, 0]);
    }
    0
}
