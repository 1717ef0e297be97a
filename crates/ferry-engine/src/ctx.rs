//! Helpers shared by the dump and restore halves: injected syscalls with errors that say what
//! failed, and a scratch area in the target for syscall arguments.

use crate::{EngineError, Result};
use ferry_sys::Frozen;

/// A process under our control during a restore: the stub being rebuilt.
pub struct Target {
    pub pid: i32,
    pub frozen: Frozen,
    /// Our area in the target (`AREA` bytes): `syscall; int3` at its start, scratch space
    /// after, and from `BATCH_OFFSET` the batch runner and its table.
    pub page: u64,
    /// Syscalls queued for the next batch.
    pub queued: Vec<Queued>,
    /// Bytes of the batch data area taken by what the queued syscalls point to.
    pub staged: u64,
}

/// A syscall waiting for the next batch.
pub struct Queued {
    what: String,
    nr: i64,
    args: [u64; 6],
    /// The result it must return (an fd number foretold), when that matters.
    expect: Option<u64>,
}

pub const SCRATCH_OFFSET: u64 = 64;
/// Size of our area in the target.
pub const AREA: u64 = 32768;
const BATCH_OFFSET: u64 = 4096;
const TABLE_OFFSET: u64 = BATCH_OFFSET + 64;
/// Arguments that queued syscalls point to.
const DATA_OFFSET: u64 = 16384;
/// Entries per batch, the terminating one included.
const TABLE_LEN: usize = ((DATA_OFFSET - TABLE_OFFSET) / 64) as usize;

impl Target {
    /// A process held by `frozen`, with no area of ours in it yet (`restore::prepare` maps it).
    pub fn new(pid: i32, frozen: Frozen) -> Target {
        Target {
            pid,
            frozen,
            page: 0,
            queued: Vec::new(),
            staged: 0,
        }
    }

    /// Inject a syscall in the main thread; a negative result becomes an error naming `what`.
    pub fn sys(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.sys_in(self.pid, what, nr, args)
    }

    /// Inject a syscall in thread `tid`.
    pub fn sys_in(&mut self, tid: i32, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        // In order: what was queued runs first.
        self.flush()?;
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

    /// Queue a syscall whose result is only checked: queued ones run together, in one stop of
    /// the target (`flush`, or before the next `sys`). Only after `install_batch_code`.
    pub fn queue(&mut self, what: impl Into<String>, nr: i64, args: [u64; 6]) -> Result<()> {
        self.queue_expect(what, nr, args, None)
    }

    /// `queue`, for a call whose result is known in advance and must be that (the lowest free
    /// fd number, which the kernel always hands out): later calls can use it before it runs.
    pub fn queue_expect(
        &mut self,
        what: impl Into<String>,
        nr: i64,
        args: [u64; 6],
        expect: Option<u64>,
    ) -> Result<()> {
        self.queued.push(Queued {
            what: what.into(),
            nr,
            args,
            expect,
        });
        if self.queued.len() == TABLE_LEN - 1 {
            self.flush()?;
        }
        Ok(())
    }

    /// Put data for queued syscalls after what is already staged for them, without running
    /// anything unless the area is full; its address.
    pub fn stage(&mut self, data: &[u8]) -> Result<u64> {
        let len = (data.len() as u64).next_multiple_of(8);
        if len > AREA - DATA_OFFSET {
            return Err(EngineError::Failed("batch data area overflow".into()));
        }
        if DATA_OFFSET + self.staged + len > AREA {
            self.flush()?;
        }
        let at = self.page + DATA_OFFSET + self.staged;
        ferry_sys::mem::write_mem(self.pid, at, data)?;
        self.staged += len;
        Ok(at)
    }

    /// Put data for queued syscalls into the target (what was queued before runs first, as
    /// it may point to the same place); its address.
    pub fn put_batch_data(&mut self, data: &[u8]) -> Result<u64> {
        self.flush()?;
        self.stage(data)
    }

    /// Put the batch runner into our area (once, after the area is mapped).
    pub fn install_batch_code(&self) -> Result<()> {
        ferry_sys::mem::write_mem(
            self.pid,
            self.page + BATCH_OFFSET,
            &ferry_sys::freeze::BATCH_CODE,
        )?;
        Ok(())
    }

    /// Run the queued syscalls in the main thread; the first that fails stops the batch and
    /// becomes the error.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_in(self.pid)
    }

    /// `flush`, in thread `tid`: for calls that act on the calling thread.
    pub fn flush_in(&mut self, tid: i32) -> Result<()> {
        // What was staged is used by the calls run now (or by none): the area is free after.
        self.staged = 0;
        if self.queued.is_empty() {
            return Ok(());
        }
        let calls = std::mem::take(&mut self.queued);
        let mut table = Vec::with_capacity((calls.len() + 1) * 64);
        for Queued { nr, args, .. } in &calls {
            table.extend_from_slice(&nr.to_ne_bytes());
            for a in args {
                table.extend_from_slice(&a.to_ne_bytes());
            }
            // The result, written by the runner: a marker for "did not run".
            table.extend_from_slice(&i64::MIN.to_ne_bytes());
        }
        table.extend_from_slice(&(-1i64).to_ne_bytes());
        table.resize(table.len() + 56, 0);
        let at = self.page + TABLE_OFFSET;
        ferry_sys::mem::write_mem(self.pid, at, &table)?;
        self.frozen.run_batch(tid, self.page + BATCH_OFFSET, at)?;
        let mut out = vec![0u8; calls.len() * 64];
        if ferry_sys::mem::read_mem(self.pid, at, &mut out)? != out.len() {
            return Err(EngineError::Failed(format!(
                "reading the results of a batch of syscalls in process {}",
                self.pid
            )));
        }
        for (i, Queued { what, expect, .. }) in calls.iter().enumerate() {
            let rc = i64::from_ne_bytes(out[i * 64 + 56..i * 64 + 64].try_into().unwrap());
            if rc == i64::MIN {
                return Err(EngineError::Failed(format!(
                    "{what} in the restored process {}: the batch stopped before it",
                    self.pid
                )));
            }
            if rc < 0 && rc > -4096 {
                return Err(EngineError::Failed(format!(
                    "{what} in the restored process {}: {}",
                    self.pid,
                    std::io::Error::from_raw_os_error(-rc as i32)
                )));
            }
            if let Some(e) = expect.filter(|&e| e as i64 != rc) {
                return Err(EngineError::Failed(format!(
                    "{what} in the restored process {}: gave {rc} where {e} was foretold",
                    self.pid
                )));
            }
        }
        Ok(())
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

    /// A NUL-terminated path staged for queued syscalls (`stage`).
    pub fn stage_path(&mut self, path: &str) -> Result<u64> {
        let mut b = path.as_bytes().to_vec();
        b.push(0);
        self.stage(&b)
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
