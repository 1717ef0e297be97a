//! Every signal disposition of a process (its `sighand_struct`), read by a BPF `iter/task`
//! program in one pass. The other way, an rt_sigaction injected into the stopped process for
//! each of the 62 signals, is 62 ptrace round trips (about a millisecond while the process is
//! frozen for a migration).
//!
//! The program copies the kernel's table of `k_sigaction`s as it is; the offsets to reach it,
//! and the layout of each entry, come from the kernel's BTF. Where BPF is not available,
//! `sigactions` says so and the caller injects the syscalls.

use crate::error::{Error, Result};
use crate::freeze::KSigaction;
use crate::vmaflags::{insn, load_iter_prog, read_iter, Btf, KIND_FUNC, KIND_STRUCT};
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

/// Signals in the kernel's table (`_NSIG`).
const NSIG: usize = 64;
/// Bytes copied per helper call (a stack buffer; the stack has 512).
const CHUNK: usize = 256;

/// Where each field of one table entry lies, and the entry's size.
#[derive(Debug, Clone, Copy)]
struct Entry {
    size: usize,
    handler: usize,
    flags: usize,
    restorer: usize,
    mask: usize,
}

struct Prog {
    fd: OwnedFd,
    entry: Entry,
}

/// Load the program now, so that the first read of a frozen process does not pay for it.
pub fn prepare() -> Result<()> {
    program().map(|_| ())
}

fn program() -> Result<&'static Prog> {
    static PROG: OnceLock<std::result::Result<Prog, String>> = OnceLock::new();
    crate::vmaflags::loaded_once(&PROG, "signal dispositions", load)
}

/// The disposition of signals 1 to 64 of process `pid`, in order.
pub fn sigactions(pid: i32) -> Result<Vec<KSigaction>> {
    let p = program()?;
    let raw = read_iter(&p.fd, pid, "signal-dispositions")?;
    let e = p.entry;
    let table = NSIG * e.size;
    // One table per thread visited; they share it.
    let t = raw.get(..table).ok_or_else(|| {
        Error::Parse(format!(
            "the signal-dispositions iterator gave {} bytes for process {pid}, not {table}",
            raw.len()
        ))
    })?;
    let word = |at: usize| u64::from_ne_bytes(t[at..at + 8].try_into().unwrap());
    Ok((0..NSIG)
        .map(|i| {
            let b = i * e.size;
            KSigaction {
                handler: word(b + e.handler),
                flags: word(b + e.flags),
                restorer: word(b + e.restorer),
                mask: word(b + e.mask),
            }
        })
        .collect())
}

fn load() -> std::result::Result<Prog, String> {
    crate::vmaflags::with_kernel_btf(load_with)
}

fn load_with(t: &Btf) -> std::result::Result<Prog, String> {
    let func = t
        .find(KIND_FUNC, "bpf_iter_task")
        .ok_or("the kernel's BTF has no bpf_iter_task (no task iterator)")?;
    let member = |s: &str, m: &str| t.member_bytes(s, m);
    let ksa = t
        .find(KIND_STRUCT, "k_sigaction")
        .ok_or("the kernel's BTF has no struct k_sigaction")?;
    let sa = member("k_sigaction", "sa")?;
    let entry = Entry {
        size: t.size_of(ksa).ok_or("k_sigaction has no size")? as usize,
        handler: sa + member("sigaction", "sa_handler")?,
        flags: sa + member("sigaction", "sa_flags")?,
        restorer: sa + member("sigaction", "sa_restorer")?,
        mask: sa + member("sigaction", "sa_mask")?,
    };
    if entry.size < 32
        || [entry.handler, entry.flags, entry.restorer, entry.mask]
            .iter()
            .any(|&o| o + 8 > entry.size)
    {
        return Err(format!("unexpected k_sigaction layout {entry:?}"));
    }
    let off16 = |v: usize| i16::try_from(v).map_err(|_| format!("offset {v} is too large"));
    let ctx_meta = off16(member("bpf_iter__task", "meta")?)?;
    let ctx_task = off16(member("bpf_iter__task", "task")?)?;
    let meta_seq = off16(member("bpf_iter_meta", "seq")?)?;
    let task_sighand = off16(member("task_struct", "sighand")?)?;
    let action = member("sighand_struct", "action")?;

    use crate::vmaflags::op::*;
    const PROBE_READ_KERNEL: i32 = 113;
    let table = NSIG * entry.size;
    let mut prog: Vec<[u8; 8]> = vec![
        insn(MOV_X, 6, 1, 0, 0),             // r6 = ctx
        insn(LDX_DW, 7, 6, ctx_task, 0),     // r7 = ctx->task
        insn(JEQ_K, 7, 0, 0, 0),             // no task (the end): done (patched)
        insn(LDX_DW, 8, 6, ctx_meta, 0),     // r8 = ctx->meta
        insn(LDX_DW, 8, 8, meta_seq, 0),     // r8 = meta->seq
        insn(LDX_DW, 9, 7, task_sighand, 0), // r9 = task->sighand
        insn(JEQ_K, 9, 0, 0, 0),             // none (exiting): done (patched)
    ];
    let mut done = 0;
    while done < table {
        let n = CHUNK.min(table - done) as i32;
        let from = i32::try_from(action + done).map_err(|_| "table offset too large")?;
        prog.extend([
            // bpf_probe_read_kernel(fp - CHUNK, n, sighand + action + done)
            insn(MOV_X, 1, 10, 0, 0),
            insn(ADD_K, 1, 0, 0, -(CHUNK as i32)),
            insn(MOV_K, 2, 0, 0, n),
            insn(MOV_X, 3, 9, 0, 0),
            insn(ADD_K, 3, 0, 0, from),
            insn(CALL, 0, 0, 0, PROBE_READ_KERNEL),
            // A failed read would give zeroes, not the table: stop instead.
            insn(JEQ_K, 0, 0, 1, 0),
            insn(JA, 0, 0, 0, 0), // to the end (patched)
            // bpf_seq_write(seq, fp - CHUNK, n)
            insn(MOV_X, 1, 8, 0, 0),
            insn(MOV_X, 2, 10, 0, 0),
            insn(ADD_K, 2, 0, 0, -(CHUNK as i32)),
            insn(MOV_K, 3, 0, 0, n),
            insn(CALL, 0, 0, 0, crate::vmaflags::BPF_FUNC_SEQ_WRITE),
        ]);
        done += n as usize;
    }
    let end = prog.len();
    prog.push(insn(MOV_K, 0, 0, 0, 0)); // return 0
    prog.push(insn(EXIT, 0, 0, 0, 0));
    // Jumps to `end`: offsets count from the next instruction.
    for (i, ins) in prog.iter_mut().enumerate().take(end) {
        let (code, dst, off) = (ins[0], ins[1] & 0xf, i16::from_ne_bytes([ins[2], ins[3]]));
        let to_end = i16::try_from(end - i - 1).map_err(|_| "program too long")?;
        if (code == JEQ_K && dst != 0 && off == 0) || (code == JA && off == 0) {
            ins[2..4].copy_from_slice(&to_end.to_ne_bytes());
        }
    }
    let fd = load_iter_prog(&prog, b"fsighand", func)?;
    Ok(Prog { fd, entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn on_usr2(_: i32) {}

    #[test]
    fn reads_the_dispositions_of_this_process() {
        // SAFETY: installing a handler that does nothing, and ignoring SIGWINCH.
        unsafe {
            libc::signal(libc::SIGUSR2, on_usr2 as *const () as usize);
            libc::signal(libc::SIGWINCH, libc::SIG_IGN);
        }
        let v = match sigactions(std::process::id() as i32) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(v.len(), 64);
        assert_eq!(
            v[libc::SIGUSR2 as usize - 1].handler,
            on_usr2 as *const () as usize as u64
        );
        assert_eq!(v[libc::SIGWINCH as usize - 1].handler, libc::SIG_IGN as u64);
        // As rt_sigaction reports it, flags included (SIGHUP is whatever we inherited: nohup
        // ignores it).
        for sig in [libc::SIGUSR2, libc::SIGWINCH, libc::SIGSEGV, libc::SIGHUP] {
            // SAFETY: reading the current action into a zeroed struct.
            let old = unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old);
                old
            };
            let k = v[sig as usize - 1];
            assert_eq!(k.handler, old.sa_sigaction as u64, "signal {sig}");
            assert_eq!(k.flags, old.sa_flags as u64, "signal {sig}");
        }
    }
}
