//! Registers: general registers with fs/gs base, the whole xsave area, the blocked-signal mask
//! and the rseq registration of each thread.

use crate::ctx::Target;

use crate::schema::{RseqImage, ThreadImage};
use crate::{EngineError, Result};
use ferry_sys::{Frozen, Regs};

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

fn to_vec(r: &Regs) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

fn from_vec(v: &[u64]) -> Result<Regs> {
    if v.len() != 27 {
        return Err(EngineError::Failed(format!(
            "a thread image has {} registers, not 27",
            v.len()
        )));
    }
    Ok(Regs {
        r15: v[0],
        r14: v[1],
        r13: v[2],
        r12: v[3],
        rbp: v[4],
        rbx: v[5],
        r11: v[6],
        r10: v[7],
        r9: v[8],
        r8: v[9],
        rax: v[10],
        rcx: v[11],
        rdx: v[12],
        rsi: v[13],
        rdi: v[14],
        orig_rax: v[15],
        rip: v[16],
        cs: v[17],
        eflags: v[18],
        rsp: v[19],
        ss: v[20],
        fs_base: v[21],
        gs_base: v[22],
        ds: v[23],
        es: v[24],
        fs: v[25],
        gs: v[26],
    })
}

/// A thread stopped inside an interrupted syscall must redo it when it runs again.
fn restart_fixup(r: &mut Regs) {
    if (r.orig_rax as i64) < 0 {
        return;
    }
    match -(r.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => r.rax = (-libc::EINTR) as u64,
        _ => {}
    }
}

/// `known`: the threads' state read by BPF (`taskstate`), where it could be; the others'
/// clear-child-tid address is read by an injected prctl.
pub fn dump(
    frozen: &mut Frozen,
    known: &std::collections::HashMap<i32, ferry_sys::taskstate::TaskState>,
) -> Result<Vec<ThreadImage>> {
    let mut out = Vec::new();
    let pid = frozen.pid();
    for t in frozen.threads().to_vec() {
        let clear_tid = match known.get(&t.tid) {
            Some(k) => k.clear_tid,
            None => frozen.tid_address(t.tid)?,
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", t.tid))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        let mut r = t.regs;
        restart_fixup(&mut r);
        out.push(ThreadImage {
            tid: t.tid,
            regs: to_vec(&r),
            xsave: crate::hexcodec::hex(&frozen.xstate(t.tid)?),
            sigmask: frozen.sigmask(t.tid)?,
            rseq: frozen.rseq(t.tid)?.map(|c| RseqImage {
                ptr: c.ptr,
                size: c.size,
                signature: c.signature,
            }),
            clear_tid,
            name,
            sigaltstack: None,
            pending: Vec::new(),
        });
    }
    Ok(out)
}

/// The pages a thread touches first when it runs again, page-aligned and sorted: the stack
/// around its stack pointer (returning pops upward, a call pushes below), its thread block
/// and TLS around fs_base (stack canaries are read there), its rseq area (the kernel writes
/// it at registration, before the thread runs) and its clear-child-tid word. Post-copy reads
/// them with the tree frozen rather than fetching each from the source on a fault.
pub fn first_touched(th: &ThreadImage) -> Vec<u64> {
    const PAGE: u64 = ferry_image::PAGE_SIZE as u64;
    let mut at = Vec::new();
    if let Ok(r) = from_vec(&th.regs) {
        at.extend(
            [
                r.rsp.checked_sub(PAGE),
                Some(r.rsp),
                r.rsp.checked_add(PAGE),
            ]
            .into_iter()
            .flatten(),
        );
        if r.fs_base != 0 {
            at.extend(
                [r.fs_base.checked_sub(PAGE), Some(r.fs_base)]
                    .into_iter()
                    .flatten(),
            );
        }
    }
    at.extend(th.rseq.map(|r| r.ptr));
    if th.clear_tid != 0 {
        at.push(th.clear_tid);
    }
    // Values the program set (a stack pointer, a clear-child-tid address) can be anything:
    // only user-space addresses count, far from the top of the address space.
    const USER_END: u64 = 1 << 57;
    let mut pages: Vec<u64> = at
        .into_iter()
        .filter(|&a| a < USER_END)
        .map(|a| a & !(PAGE - 1))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// Set a thread's state. Syscalls injected afterwards keep these registers (injection saves
/// and restores them).
pub fn restore(t: &mut Target, th: &ThreadImage) -> Result<()> {
    let tid = th.tid;
    // The thread's own calls, queued after what was queued for it before (its sigaltstack),
    // run together in it: one stop instead of one per call.
    if let Some(r) = th.rseq {
        let args = [r.ptr, r.size as u64, 0, r.signature as u64, 0, 0];
        t.queue("rseq registration", libc::SYS_rseq, args)?;
    }
    let args = [th.clear_tid, 0, 0, 0, 0, 0];
    t.queue("set_tid_address", libc::SYS_set_tid_address, args)?;
    if !th.name.is_empty() {
        let p = t.put_path(&th.name)?;
        let args = [libc::PR_SET_NAME as u64, p, 0, 0, 0, 0];
        t.queue("prctl(PR_SET_NAME)", libc::SYS_prctl, args)?;
    }
    t.flush_in(tid)?;
    ferry_sys::timeline::mark(|| format!("thread {tid}: calls"));
    t.frozen.set_sigmask(tid, th.sigmask)?;
    t.frozen
        .set_xstate(tid, &crate::hexcodec::unhex(&th.xsave, "xsave area")?)?;
    let mut regs = from_vec(&th.regs)?;
    // The restart was resolved at dump time; the kernel must not restart anything again.
    regs.orig_rax = u64::MAX;
    t.frozen.set_regs(tid, regs)?;
    ferry_sys::timeline::mark(|| format!("thread {tid}: registers"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(rsp: u64, fs_base: u64, rseq: Option<u64>, clear_tid: u64) -> ThreadImage {
        let mut regs = vec![0u64; 27];
        regs[19] = rsp;
        regs[21] = fs_base;
        ThreadImage {
            tid: 1,
            regs,
            xsave: String::new(),
            sigmask: 0,
            rseq: rseq.map(|ptr| RseqImage {
                ptr,
                size: 32,
                signature: 0,
            }),
            clear_tid,
            name: String::new(),
            sigaltstack: None,
            pending: Vec::new(),
        }
    }

    #[test]
    fn first_touched_pages_are_the_stack_top_thread_block_and_rseq_area() {
        let t = thread(
            0x7f00_0000_1a30,
            0x7f00_0010_06c0,
            Some(0x7f00_0010_0fe0),
            0x7f00_0010_09d0,
        );
        assert_eq!(
            first_touched(&t),
            vec![
                0x7f00_0000_0000,
                0x7f00_0000_1000,
                0x7f00_0000_2000,
                0x7f00_000f_f000,
                0x7f00_0010_0000
            ]
        );
        // Whatever the program put in its registers, only user-space pages come out.
        let odd = thread(u64::MAX - 8, 0, None, u64::MAX);
        assert_eq!(first_touched(&odd), Vec::<u64>::new());
    }
}
