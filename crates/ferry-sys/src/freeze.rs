//! Freezing a process with ptrace: seize and interrupt every thread, read registers and the
//! xsave area, inject single syscalls, and resume everything when done (also on error and
//! on panic, through `Drop`).

use crate::error::{Error, Result};
use crate::mem::read_mem;
use crate::procfs::{check_inspectable, list_threads, read_maps, MapKind};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

pub type Regs = libc::user_regs_struct;

/// `NT_X86_XSTATE`: the regset holding the whole xsave area in standard (non-compacted) form.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Large enough for every xsave layout in use today (AMX tile data is 8 KiB).
const XSAVE_BUF: usize = 16 * 1024;
/// Offset of XSTATE_BV in the xsave header.
pub const XSTATE_BV_OFFSET: usize = 512;

#[derive(Debug, Clone)]
pub struct FrozenThread {
    pub tid: i32,
    pub regs: Regs,
}

/// A process whose threads are all in ptrace stops. Dropping it detaches every thread, which
/// lets the process run on exactly as before.
pub struct Frozen {
    pid: i32,
    threads: Vec<FrozenThread>,
    /// Signals that arrived while we held a thread; handed back on detach.
    /// Raw signal numbers: real-time signals have no `Signal` value.
    pending: Vec<(i32, i32)>,
    syscall_insn: Option<u64>,
    /// PTRACE_O_EXITKILL: the process dies if we do (a process being built by a restore).
    exit_kill: bool,
}

fn pt_err(what: &'static str, tid: i32) -> impl FnOnce(Errno) -> Error {
    move |source| Error::Ptrace { what, tid, source }
}

/// x86-64 code that runs a table of syscalls, 64 bytes each (nr, six arguments, result), from
/// the address in rbx, until an entry whose nr is -1 or a call that fails, then traps (int3).
pub const BATCH_CODE: [u8; 54] = [
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x48, 0x83, 0xf8, 0xff, // cmp rax, -1
    0x74, 0x2c, // je done
    0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
    0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
    0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
    0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
    0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
    0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
    0x0f, 0x05, // syscall
    0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
    0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
    0x73, 0x06, // jae done
    0x48, 0x83, 0xc3, 0x40, // add rbx, 64
    0xeb, 0xcb, // jmp to the start
    0xcc, // done: int3
];

/// Syscalls injected by this process so far: each costs two context switches of the target.
static INJECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn injected_syscalls() -> u64 {
    INJECTED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Frozen {
    /// Seize and stop every thread of `pid`, rescanning until no new thread appears.
    pub fn freeze(pid: i32) -> Result<Frozen> {
        Self::freeze_with(pid, false)
    }

    /// Like `freeze`, for a process that must not outlive us while we hold it: if Ferry dies
    /// (killed, or a crash), the kernel kills it (PTRACE_O_EXITKILL), so that a restore cut
    /// short leaves nothing half-built running. Threads adopted later get the same option.
    pub fn freeze_owned(pid: i32) -> Result<Frozen> {
        Self::freeze_with(pid, true)
    }

    /// From now on the process dies if we do (PTRACE_O_EXITKILL on every thread): for a tree
    /// that runs on elsewhere, so that it can never come back here, however Ferry ends.
    pub fn bind_to_us(&mut self) -> Result<()> {
        for t in &self.threads {
            ptrace::setoptions(Pid::from_raw(t.tid), ptrace::Options::PTRACE_O_EXITKILL)
                .map_err(pt_err("ptrace setoptions (EXITKILL)", t.tid))?;
        }
        self.exit_kill = true;
        Ok(())
    }

    fn freeze_with(pid: i32, exit_kill: bool) -> Result<Frozen> {
        check_inspectable(pid)?;
        let mut f = Frozen {
            pid,
            threads: Vec::new(),
            pending: Vec::new(),
            syscall_insn: None,
            exit_kill,
        };
        loop {
            let tids = list_threads(pid)?;
            let mut added = false;
            for tid in tids {
                if f.threads.iter().any(|t| t.tid == tid) {
                    continue;
                }
                if let Some(t) = f.seize_one(tid)? {
                    f.threads.push(t);
                    added = true;
                }
            }
            if !added {
                break;
            }
        }
        if f.threads.is_empty() {
            return Err(Error::NoSuchProcess(pid));
        }
        Ok(f)
    }

    /// Returns None when the thread vanished before it could be stopped.
    fn seize_one(&mut self, tid: i32) -> Result<Option<FrozenThread>> {
        let p = Pid::from_raw(tid);
        let opts = if self.exit_kill {
            ptrace::Options::PTRACE_O_EXITKILL
        } else {
            ptrace::Options::empty()
        };
        match ptrace::seize(p, opts) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(None),
            Err(Errno::EPERM) => {
                let st = crate::procfs::read_status(self.pid)?;
                if st.tracer_pid != 0 {
                    return Err(Error::AlreadyTraced {
                        pid: self.pid,
                        tracer: st.tracer_pid,
                    });
                }
                return Err(Error::Permission {
                    pid: self.pid,
                    what: format!("ptrace seize of thread {tid} refused"),
                });
            }
            Err(e) => return Err(pt_err("ptrace seize", tid)(e)),
        }
        match ptrace::interrupt(p) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(None),
            Err(e) => {
                let _ = ptrace::detach(p, None);
                return Err(pt_err("ptrace interrupt", tid)(e));
            }
        }
        loop {
            match wait_raw(tid) {
                Ok(Stop::Event(ev)) if ev == libc::PTRACE_EVENT_STOP => break,
                Ok(Stop::Signal(sig)) => {
                    // A signal raced with the interrupt (real-time ones too): let it be
                    // delivered, the interrupt stop stays pending and follows.
                    cont_raw(tid, sig).map_err(pt_err("ptrace cont", tid))?;
                }
                Ok(Stop::Gone) | Err(Errno::ECHILD) => return Ok(None),
                Ok(Stop::Event(_)) => {
                    cont_raw(tid, 0).map_err(pt_err("ptrace cont", tid))?;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(pt_err("waitpid", tid)(e)),
            }
        }
        let regs = ptrace::getregs(p).map_err(pt_err("ptrace getregs", tid))?;
        Ok(Some(FrozenThread { tid, regs }))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Seize and stop a thread created after the freeze (a thread a restore just made).
    pub fn adopt_thread(&mut self, tid: i32) -> Result<()> {
        match self.seize_one(tid)? {
            Some(t) => {
                self.threads.push(t);
                Ok(())
            }
            None => Err(Error::Parse(format!(
                "thread {tid} vanished before it could be seized"
            ))),
        }
    }

    /// The clear-child-tid address of a thread (prctl PR_GET_TID_ADDRESS run in that thread).
    pub fn tid_address(&mut self, tid: i32) -> Result<u64> {
        let rsp = self
            .threads
            .iter()
            .find(|t| t.tid == tid)
            .map(|t| t.regs.rsp)
            .ok_or_else(|| Error::Parse(format!("thread {tid} is not frozen")))?;
        let scratch = (rsp - 128 - 64) & !15;
        const PR_GET_TID_ADDRESS: u64 = 40;
        let rc = self.inject_syscall(
            tid,
            libc::SYS_prctl,
            [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0],
        )?;
        if rc < 0 {
            return Err(Error::io(
                format!("injected prctl(PR_GET_TID_ADDRESS) in thread {tid}"),
                std::io::Error::from_raw_os_error(-rc as i32),
            ));
        }
        let mut b = [0u8; 8];
        read_mem(self.pid, scratch, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    pub fn threads(&self) -> &[FrozenThread] {
        &self.threads
    }

    /// The thread's whole xsave area (standard format), as PTRACE_GETREGSET returns it.
    pub fn xstate(&self, tid: i32) -> Result<Vec<u8>> {
        get_xstate(tid)
    }

    /// Kill the process (a half-built restore) and forget its threads.
    pub fn kill(mut self) {
        // SAFETY: kill(2) has no memory effects.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        self.threads.clear();
    }

    /// Kill the process and collect every thread's exit as its tracer, so that the process
    /// is left a zombie for its real parent to reap.
    pub fn kill_and_release(mut self) {
        // SAFETY: kill(2) has no memory effects.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        // The leader's exit is reported only once every other thread is collected.
        let pid = self.pid;
        self.threads.sort_by_key(|t| t.tid == pid);
        for t in self.threads.drain(..) {
            let mut st = 0;
            // SAFETY: waitpid writes only `st`. ECHILD (already collected) is fine.
            unsafe {
                libc::waitpid(t.tid, &mut st, libc::__WALL);
            }
        }
    }

    /// Run one syscall in the context of thread `tid` and return its raw result (a negative
    /// errno on failure). The thread's registers are restored afterwards.
    pub fn inject_syscall(&mut self, tid: i32, nr: i64, args: [u64; 6]) -> Result<i64> {
        INJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let insn = self.syscall_insn()?;
        let p = Pid::from_raw(tid);
        let saved = ptrace::getregs(p).map_err(pt_err("ptrace getregs", tid))?;
        let mut r = saved;
        r.rip = insn;
        r.rax = nr as u64;
        // orig_rax = -1 keeps the kernel from treating this as a syscall to restart.
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        ptrace::setregs(p, r).map_err(pt_err("ptrace setregs", tid))?;
        let result = self.step_over(p, insn);
        // Restore whatever happened.
        let restore = ptrace::setregs(p, saved).map_err(pt_err("ptrace setregs", tid));
        let out = result?;
        restore?;
        Ok(out)
    }

    /// Run `BATCH_CODE`, placed at `code` in the target, over the table of syscalls at `table`
    /// in thread `tid`: one stop for the whole batch instead of two context switches per call.
    /// The registers are put back afterwards. The results are in the table.
    pub fn run_batch(&mut self, tid: i32, code: u64, table: u64) -> Result<()> {
        INJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = Pid::from_raw(tid);
        let saved = ptrace::getregs(p).map_err(pt_err("ptrace getregs", tid))?;
        let mut r = saved;
        r.rip = code;
        r.rbx = table;
        r.orig_rax = u64::MAX;
        ptrace::setregs(p, r).map_err(pt_err("ptrace setregs", tid))?;
        let result = (|| -> Result<()> {
            let mut sig = 0;
            loop {
                cont_raw(tid, sig).map_err(pt_err("ptrace cont", tid))?;
                sig = 0;
                match wait_raw(tid) {
                    Ok(Stop::Signal(libc::SIGTRAP)) => {
                        let now = ptrace::getregs(p).map_err(pt_err("ptrace getregs", tid))?;
                        if now.rip == code + BATCH_CODE.len() as u64 {
                            return Ok(());
                        }
                        return Err(Error::Parse(format!(
                            "a batch of injected syscalls in thread {tid} stopped at {:#x}, not                              at its end",
                            now.rip
                        )));
                    }
                    // Delivered later, when the tree runs.
                    Ok(Stop::Signal(s)) => self.pending.push((tid, s)),
                    Ok(Stop::Event(_)) => {}
                    Ok(Stop::Gone) => return Err(Error::NoSuchProcess(self.pid)),
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(pt_err("waitpid", tid)(e)),
                }
            }
        })();
        let restore = ptrace::setregs(p, saved).map_err(pt_err("ptrace setregs", tid));
        result?;
        restore
    }

    fn step_over(&mut self, p: Pid, insn: u64) -> Result<i64> {
        let tid = p.as_raw();
        for _ in 0..16 {
            ptrace::step(p, None).map_err(pt_err("ptrace singlestep", tid))?;
            loop {
                match wait_raw(tid) {
                    Ok(Stop::Signal(sig)) => {
                        if sig != libc::SIGTRAP {
                            self.pending.push((tid, sig));
                        }
                        break;
                    }
                    Ok(Stop::Event(_)) => break,
                    Ok(Stop::Gone) => return Err(Error::NoSuchProcess(self.pid)),
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(pt_err("waitpid", tid)(e)),
                }
            }
            let now = ptrace::getregs(p).map_err(pt_err("ptrace getregs", tid))?;
            if now.rip == insn + 2 {
                return Ok(now.rax as i64);
            }
        }
        Err(Error::Parse(format!(
            "injected syscall in thread {tid} did not complete"
        )))
    }

    /// Address of a `syscall` instruction in the target: the vDSO always has one.
    fn syscall_insn(&mut self) -> Result<u64> {
        if let Some(a) = self.syscall_insn {
            return Ok(a);
        }
        let maps = read_maps(self.pid)?;
        let mut cands: Vec<_> = maps
            .iter()
            .filter(|m| m.exec && m.read)
            .filter(|m| m.len() <= 64 << 20)
            .collect();
        // vDSO first, then any other code.
        cands.sort_by_key(|m| m.kind != MapKind::Vdso);
        for m in cands {
            let mut buf = vec![0u8; m.len() as usize];
            let n = read_mem(self.pid, m.start, &mut buf)?;
            if let Some(i) = buf[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                let a = m.start + i as u64;
                self.syscall_insn = Some(a);
                return Ok(a);
            }
        }
        Err(Error::Parse(format!(
            "process {}: no syscall instruction found in its code",
            self.pid
        )))
    }

    /// Use this address (which must hold `syscall`) for injected syscalls from now on.
    pub fn set_syscall_insn(&mut self, addr: u64) {
        self.syscall_insn = Some(addr);
    }

    pub fn set_regs(&mut self, tid: i32, regs: Regs) -> Result<()> {
        ptrace::setregs(Pid::from_raw(tid), regs).map_err(pt_err("ptrace setregs", tid))?;
        if let Some(t) = self.threads.iter_mut().find(|t| t.tid == tid) {
            t.regs = regs;
        }
        Ok(())
    }

    pub fn set_xstate(&self, tid: i32, xsave: &[u8]) -> Result<()> {
        let mut buf = xsave.to_vec();
        regset(
            libc::PTRACE_SETREGSET,
            tid,
            "PTRACE_SETREGSET NT_X86_XSTATE",
            &mut buf,
        )?;
        Ok(())
    }

    /// The thread's blocked-signal mask.
    pub fn sigmask(&self, tid: i32) -> Result<u64> {
        let mut b = [0u8; 8];
        ptrace_sized(PTRACE_GETSIGMASK, tid, "PTRACE_GETSIGMASK", &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    pub fn set_sigmask(&self, tid: i32, mask: u64) -> Result<()> {
        let mut b = mask.to_ne_bytes();
        ptrace_sized(PTRACE_SETSIGMASK, tid, "PTRACE_SETSIGMASK", &mut b)
    }

    /// The thread's rseq registration, if any.
    pub fn rseq(&self, tid: i32) -> Result<Option<RseqConfig>> {
        let mut c = [0u8; 24];
        ptrace_sized(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            "PTRACE_GET_RSEQ_CONFIGURATION",
            &mut c,
        )?;
        let ptr = u64::from_ne_bytes(c[0..8].try_into().unwrap());
        let size = u32::from_ne_bytes(c[8..12].try_into().unwrap());
        let signature = u32::from_ne_bytes(c[12..16].try_into().unwrap());
        Ok((ptr != 0).then_some(RseqConfig {
            ptr,
            size,
            signature,
        }))
    }

    /// Signals pending for thread `tid` (or, with `shared`, for the whole process), as raw
    /// 128-byte siginfo records, read without dequeuing them (PTRACE_PEEKSIGINFO).
    pub fn pending_siginfo(&self, tid: i32, shared: bool) -> Result<Vec<[u8; 128]>> {
        #[repr(C)]
        struct PeekArgs {
            off: u64,
            flags: u32,
            nr: i32,
        }
        const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
        const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
        let mut out = Vec::new();
        loop {
            let args = PeekArgs {
                off: out.len() as u64,
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: 32,
            };
            let mut buf = vec![[0u8; 128]; 32];
            // SAFETY: the kernel writes at most `nr` (32) siginfo records of 128 bytes into
            // `buf`, which holds 32; `args` is read only.
            let rc = unsafe {
                libc::ptrace(
                    PTRACE_PEEKSIGINFO,
                    tid,
                    &args as *const PeekArgs as *mut libc::c_void,
                    buf.as_mut_ptr() as *mut libc::c_void,
                )
            };
            if rc < 0 {
                return Err(pt_err("PTRACE_PEEKSIGINFO", tid)(Errno::last()));
            }
            let n = rc as usize;
            out.extend_from_slice(&buf[..n]);
            if n < 32 {
                return Ok(out);
            }
        }
    }

    /// Scratch address below thread `tid`'s red zone, for injected syscalls' outputs.
    pub fn scratch_of(&self, tid: i32) -> Result<u64> {
        self.threads
            .iter()
            .find(|t| t.tid == tid)
            .map(|t| (t.regs.rsp - 128 - 256) & !15)
            .ok_or_else(|| Error::Parse(format!("thread {tid} is not frozen")))
    }

    /// Detach from every thread: the process runs on.
    pub fn resume(mut self) {
        self.detach_all();
    }

    fn detach_all(&mut self) {
        for t in self.threads.drain(..) {
            let sig = self
                .pending
                .iter()
                .position(|(tid, _)| *tid == t.tid)
                .map(|i| self.pending.remove(i).1)
                .unwrap_or(0);
            // SAFETY: PTRACE_DETACH takes integers; `sig` is handed back to the thread.
            unsafe {
                libc::ptrace(libc::PTRACE_DETACH, t.tid, 0, sig as libc::c_long);
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// What a traced thread stopped for (raw: nix cannot name real-time signals).
enum Stop {
    /// Exited or killed.
    Gone,
    /// A ptrace event stop (PTRACE_EVENT_*).
    Event(i32),
    /// Signal-delivery stop, with the signal number.
    Signal(i32),
}

fn wait_raw(tid: i32) -> std::result::Result<Stop, Errno> {
    let mut st = 0;
    // SAFETY: waitpid writes only `st`.
    let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL) };
    if r < 0 {
        return Err(Errno::last());
    }
    if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
        return Ok(Stop::Gone);
    }
    let event = (st >> 16) & 0xff;
    if event != 0 {
        return Ok(Stop::Event(event));
    }
    Ok(Stop::Signal(libc::WSTOPSIG(st)))
}

fn cont_raw(tid: i32, sig: i32) -> std::result::Result<(), Errno> {
    // SAFETY: PTRACE_CONT takes integers.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0, sig as libc::c_long) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// PTRACE_GETREGSET(NT_X86_XSTATE) on a stopped, traced thread.
fn get_xstate(tid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSAVE_BUF];
    let n = regset(
        libc::PTRACE_GETREGSET,
        tid,
        "PTRACE_GETREGSET NT_X86_XSTATE",
        &mut buf,
    )?;
    buf.truncate(n);
    Ok(buf)
}

/// PTRACE_GETREGSET or PTRACE_SETREGSET of the xsave area through `buf`; returns the number
/// of bytes the kernel transferred.
fn regset(req: libc::c_uint, tid: i32, what: &'static str, buf: &mut [u8]) -> Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, valid and exclusively borrowed for the whole call; the
    // kernel reads or writes at most iov_len bytes and updates iov_len.
    let rc = unsafe {
        libc::ptrace(
            req,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec as *mut libc::c_void,
        )
    };
    if rc < 0 {
        return Err(pt_err(what, tid)(Errno::last()));
    }
    Ok(iov.iov_len)
}

/// A ptrace request whose `addr` is the size of the buffer `data` points to
/// (GETSIGMASK, SETSIGMASK, GET_RSEQ_CONFIGURATION).
fn ptrace_sized(req: libc::c_uint, tid: i32, what: &'static str, buf: &mut [u8]) -> Result<()> {
    // SAFETY: `buf` is valid and exclusively borrowed for the call, and the kernel touches at
    // most `addr` = buf.len() bytes of it.
    let rc = unsafe {
        libc::ptrace(
            req,
            tid,
            buf.len() as *mut libc::c_void,
            buf.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if rc < 0 {
        return Err(pt_err(what, tid)(Errno::last()));
    }
    Ok(())
}

/// XSTATE_BV of an xsave area: the state components that hold non-initial values.
pub fn xstate_bv(xsave: &[u8]) -> Option<u64> {
    xsave
        .get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    pub ptr: u64,
    pub size: u32,
    pub signature: u32,
}

/// Kernel `struct sigaction` as rt_sigaction returns it on x86-64.
#[derive(Debug, Clone, Copy, Default)]
pub struct KSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl Frozen {
    /// Read signal `sig`'s disposition with an injected rt_sigaction. Uses a scratch area
    /// below the thread's red zone, which the program cannot be relying on.
    pub fn sigaction(&mut self, sig: i32) -> Result<KSigaction> {
        let t = self.threads[0].clone();
        let scratch = (t.regs.rsp - 128 - 64) & !15;
        self.sigaction_at(sig, scratch)
    }

    /// Like `sigaction`, with an explicit scratch address of 32 writable bytes.
    pub fn sigaction_at(&mut self, sig: i32, scratch: u64) -> Result<KSigaction> {
        let t = self.threads[0].clone();
        let rc = self.inject_syscall(
            t.tid,
            libc::SYS_rt_sigaction,
            [sig as u64, 0, scratch, 8, 0, 0],
        )?;
        if rc < 0 {
            return Err(Error::io(
                format!("injected rt_sigaction({sig}) in process {}", self.pid),
                std::io::Error::from_raw_os_error(-rc as i32),
            ));
        }
        let mut b = [0u8; 32];
        if read_mem(self.pid, scratch, &mut b)? != 32 {
            return Err(Error::Parse("could not read rt_sigaction result".into()));
        }
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(KSigaction {
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        })
    }
}
