//! Creating the empty process a restore fills in from outside.

use crate::error::{Error, Result};

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork a child that only waits (in pause), with PID `pid` when given (clone3 set_tid). The
/// caller seizes it and rebuilds it. The child never returns into Rust code.
pub fn spawn_stub(pid: Option<i32>) -> Result<i32> {
    let tids = [pid.unwrap_or(0)];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid.is_some() {
            tids.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: pid.is_some() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of this address space
    // and runs only async-signal-safe calls (pause) before it is rebuilt or killed. `args` and
    // `tids` outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if rc == 0 {
        loop {
            // SAFETY: pause is async-signal-safe and touches no memory.
            unsafe {
                libc::pause();
            }
        }
    }
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match (e.raw_os_error(), pid) {
            (Some(libc::EEXIST), Some(p)) => Error::Parse(format!(
                "PID {p} is taken by another process: free it or restore into a new PID namespace (--pidns)"
            )),
            _ => Error::io("clone3 of the restore stub", e),
        });
    }
    Ok(rc as i32)
}
