//! Per-thread state that a dump otherwise reads with a syscall injected into each stopped
//! thread: its clear-child-tid address (prctl PR_GET_TID_ADDRESS) and its alternate signal
//! stack (sigaltstack). A BPF `iter/task` program reads both for every thread of a process
//! in one pass, with offsets from the kernel's BTF. Where BPF is not available, `threads`
//! says so and the caller injects the syscalls.

use crate::error::{Error, Result};
use crate::vmaflags::{insn, load_iter_prog, read_iter, Btf, KIND_FUNC};
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

/// One thread, as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskState {
    pub tid: i32,
    pub clear_tid: u64,
    /// The alternate stack as sigaltstack reports it (without SS_ONSTACK): base, flags
    /// (SS_DISABLE when there is none, SS_AUTODISARM), size.
    pub altstack: (u64, u32, u64),
}

/// Bytes of one record: tid, clear_tid, sas_ss_sp, sas_ss_size, sas_ss_flags (8 each).
const RECORD: usize = 40;

/// Load the program now, so that the first read of a frozen process does not pay for it.
pub fn prepare() -> Result<()> {
    program().map(|_| ())
}

fn program() -> Result<&'static OwnedFd> {
    static PROG: OnceLock<std::result::Result<OwnedFd, String>> = OnceLock::new();
    crate::vmaflags::loaded_once(&PROG, "thread state", || {
        crate::vmaflags::with_kernel_btf(load)
    })
}

/// Every thread of process `pid`.
pub fn threads(pid: i32) -> Result<Vec<TaskState>> {
    let raw = read_iter(program()?, pid, "thread-state")?;
    if raw.len() % RECORD != 0 {
        return Err(Error::Parse(format!(
            "the thread-state iterator gave {} bytes for process {pid}",
            raw.len()
        )));
    }
    Ok(parse(&raw))
}

fn parse(raw: &[u8]) -> Vec<TaskState> {
    raw.chunks_exact(RECORD)
        .map(|r| {
            let w = |i: usize| u64::from_ne_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
            let (sp, size, flags) = (w(2), w(3), w(4) as u32);
            // As sigaltstack reports it: SS_DISABLE when no stack is set.
            let flags = if size == 0 {
                flags | libc::SS_DISABLE as u32
            } else {
                flags
            };
            TaskState {
                tid: w(0) as u32 as i32,
                clear_tid: w(1),
                altstack: (sp, flags & !(libc::SS_ONSTACK as u32), size),
            }
        })
        .collect()
}

fn load(t: &Btf) -> std::result::Result<OwnedFd, String> {
    let func = t
        .find(KIND_FUNC, "bpf_iter_task")
        .ok_or("the kernel's BTF has no bpf_iter_task (no task iterator)")?;
    let off16 = |v: usize| i16::try_from(v).map_err(|_| format!("offset {v} is too large"));
    let m = |s: &str, f: &str| t.member_bytes(s, f).and_then(off16);
    let ctx_meta = m("bpf_iter__task", "meta")?;
    let ctx_task = m("bpf_iter__task", "task")?;
    let meta_seq = m("bpf_iter_meta", "seq")?;
    let pid = m("task_struct", "pid")?;
    let clear = m("task_struct", "clear_child_tid")?;
    let sp = m("task_struct", "sas_ss_sp")?;
    let size = m("task_struct", "sas_ss_size")?;
    let flags = m("task_struct", "sas_ss_flags")?;

    use crate::vmaflags::op::*;
    let r = -(RECORD as i16);
    let prog: Vec<[u8; 8]> = vec![
        insn(MOV_X, 6, 1, 0, 0),             // r6 = ctx
        insn(LDX_DW, 7, 6, ctx_task, 0),     // r7 = ctx->task
        insn(JEQ_K, 7, 0, 17, 0),            // no task (the end): done
        insn(LDX_DW, 8, 6, ctx_meta, 0),     // r8 = ctx->meta
        insn(LDX_DW, 8, 8, meta_seq, 0),     // r8 = meta->seq
        insn(LDX_W, 1, 7, pid, 0),           // the record on the stack: tid,
        insn(STX_DW, 10, 1, r, 0),           //
        insn(LDX_DW, 1, 7, clear, 0),        // clear_child_tid,
        insn(STX_DW, 10, 1, r + 8, 0),       //
        insn(LDX_DW, 1, 7, sp, 0),           // sas_ss_sp,
        insn(STX_DW, 10, 1, r + 16, 0),      //
        insn(LDX_DW, 1, 7, size, 0),         // sas_ss_size,
        insn(STX_DW, 10, 1, r + 24, 0),      //
        insn(LDX_W, 1, 7, flags, 0),         // sas_ss_flags
        insn(STX_DW, 10, 1, r + 32, 0),      //
        insn(MOV_X, 1, 8, 0, 0),             // bpf_seq_write(seq, fp - RECORD, RECORD)
        insn(MOV_X, 2, 10, 0, 0),            //
        insn(ADD_K, 2, 0, 0, r as i32),      //
        insn(MOV_K, 3, 0, 0, RECORD as i32), //
        insn(CALL, 0, 0, 0, crate::vmaflags::BPF_FUNC_SEQ_WRITE),
        insn(MOV_K, 0, 0, 0, 0), // return 0
        insn(EXIT, 0, 0, 0, 0),
    ];
    load_iter_prog(&prog, b"ftaskst", func)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> i32 {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as i32 }
    }

    #[test]
    fn reads_what_the_syscalls_report_for_each_thread() {
        // A thread with an alternate stack of its own, parked until the check is done.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let stack = vec![0u8; 64 << 10];
            let ss = libc::stack_t {
                ss_sp: stack.as_ptr() as *mut libc::c_void,
                ss_flags: 0,
                ss_size: stack.len(),
            };
            // SAFETY: the stack lives until this thread ends, after the check.
            unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
            let mut tidp: *mut i32 = std::ptr::null_mut();
            // SAFETY: PR_GET_TID_ADDRESS writes one pointer into `tidp`.
            unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut tidp as *mut *mut i32) };
            tx.send((gettid(), tidp as u64, stack.as_ptr() as u64))
                .unwrap();
            done_rx.recv().unwrap();
            drop(stack);
        });
        let (tid, clear, sp) = rx.recv().unwrap();
        let got = match threads(std::process::id() as i32) {
            Ok(v) => v,
            Err(e) => {
                done_tx.send(()).unwrap();
                panic!("{e}");
            }
        };
        done_tx.send(()).unwrap();
        h.join().unwrap();
        let t = got
            .iter()
            .find(|t| t.tid == tid)
            .expect("the thread is listed");
        assert_eq!(t.clear_tid, clear);
        assert_eq!(t.altstack, (sp, 0, 64 << 10));
        // This thread: whatever Rust's runtime set up, as sigaltstack reports it.
        // SAFETY: an all-zero stack_t is valid; sigaltstack writes the current one into it.
        let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
        // SAFETY: reading this thread's alternate stack.
        unsafe { libc::sigaltstack(std::ptr::null(), &mut cur) };
        let me = got
            .iter()
            .find(|t| t.tid == gettid())
            .expect("this thread is listed");
        let want = (
            cur.ss_sp as u64,
            cur.ss_flags as u32 & !(libc::SS_ONSTACK as u32),
            cur.ss_size as u64,
        );
        assert_eq!(me.altstack, want);
    }

    #[test]
    fn records_are_parsed_as_sigaltstack_reports_them() {
        let mut raw = Vec::new();
        for v in [7u64, 0x1000, 0, 0, 0, 8, 0x2000, 0x7000, 4096, 1u64 << 31] {
            raw.extend_from_slice(&v.to_ne_bytes());
        }
        let p = parse(&raw);
        assert_eq!(p[0].altstack, (0, libc::SS_DISABLE as u32, 0));
        assert_eq!((p[1].tid, p[1].clear_tid), (8, 0x2000));
        assert_eq!(p[1].altstack, (0x7000, 1 << 31, 4096));
    }
}
