//! Helpers shared by the dump and restore halves: injected syscalls with errors that say what
//! failed, and a scratch area in the target for syscall arguments.

use crate::{EngineError, Result};
use ferry_sys::Frozen;

/// A process under our control during a restore: the stub being rebuilt.
pub struct Target {
    pub pid: i32,
    pub frozen: Frozen,
    /// A page of ours in the target: `syscall; int3` at its start, scratch space after.
    pub page: u64,
}

pub const SCRATCH_OFFSET: u64 = 64;

impl Target {
    /// Inject a syscall in the main thread; a negative result becomes an error naming `what`.
    pub fn sys(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.sys_in(self.pid, what, nr, args)
    }

    /// Inject a syscall in thread `tid`.
    pub fn sys_in(&mut self, tid: i32, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let rc = self.frozen.inject_syscall(tid, nr, args)?;
        if rc < 0 && rc > -4096 {
            return Err(EngineError::Failed(format!(
                "{what} in the restored process {}: {}",
                self.pid,
                std::io::Error::from_raw_os_error(-rc as i32)
            )));
        }
        Ok(rc as u64)
    }

    /// Put bytes into the scratch area at `off` and return their address in the target.
    pub fn put(&self, off: u64, data: &[u8]) -> Result<u64> {
        let at = self.page + SCRATCH_OFFSET + off;
        if SCRATCH_OFFSET + off + data.len() as u64 > 4096 {
            return Err(EngineError::Failed("scratch area overflow".into()));
        }
        ferry_sys::mem::write_mem(self.pid, at, data)?;
        Ok(at)
    }

    /// A NUL-terminated path in the scratch area.
    pub fn put_path(&self, path: &str) -> Result<u64> {
        let mut b = path.as_bytes().to_vec();
        b.push(0);
        if b.len() > 3000 {
            return Err(EngineError::Failed(format!("path too long: {path}")));
        }
        self.put(512, &b)
    }
}
