//! Signal dispositions: every signal with a handler or ignored, read and set with injected
//! rt_sigaction. (Blocked masks travel with each thread's registers.)

use crate::ctx::Target;
use crate::schema::SigactionImage;
use crate::schema::ThreadImage;
use crate::EngineError;
use crate::Result;
use ferry_sys::Frozen;

pub fn dump(frozen: &mut Frozen) -> Result<Vec<SigactionImage>> {
    // Read with BPF in one pass where it serves; otherwise one injected rt_sigaction each.
    let table = ferry_sys::sighand::sigactions(frozen.pid()).ok();
    let mut out = Vec::new();
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let a = match &table {
            Some(t) => t[sig as usize - 1],
            None => frozen.sigaction(sig)?,
        };
        if a.handler != 0 || a.flags != 0 || a.mask != 0 {
            out.push(SigactionImage {
                signal: sig,
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            });
        }
    }
    Ok(out)
}

/// Set every disposition: the saved ones, and the default for the rest (the stub inherited the
/// restorer's, which may ignore SIGPIPE).
pub fn restore(t: &mut Target, acts: &[SigactionImage]) -> Result<()> {
    let all = (1..=64)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .map(|sig| {
            acts.iter()
                .find(|a| a.signal == sig)
                .cloned()
                .unwrap_or(SigactionImage {
                    signal: sig,
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                })
        });
    let all: Vec<SigactionImage> = all.collect();
    // Every struct sigaction at once, then every call in one batch.
    let mut b = Vec::with_capacity(32 * all.len());
    for a in &all {
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    // After whatever is staged for calls queued before (they run first, in the same stop).
    let base = t.stage(&b)?;
    for (i, a) in all.iter().enumerate() {
        t.queue(
            format!("rt_sigaction({})", a.signal),
            libc::SYS_rt_sigaction,
            [a.signal as u64, base + 32 * i as u64, 0, 8, 0, 0],
        )?;
    }
    t.flush()
}

fn inject_read(
    frozen: &mut Frozen,
    tid: i32,
    what: &str,
    nr: i64,
    args: impl Fn(u64) -> [u64; 6],
    len: usize,
) -> Result<Vec<u8>> {
    let scratch = frozen.scratch_of(tid)?;
    let rc = frozen.inject_syscall(tid, nr, args(scratch))?;
    if rc < 0 {
        return Err(EngineError::Failed(format!(
            "injected {what} in thread {tid}: {}",
            std::io::Error::from_raw_os_error(-rc as i32)
        )));
    }
    let mut b = vec![0u8; len];
    ferry_sys::mem::read_mem_forced(frozen.pid(), scratch, &mut b)?;
    Ok(b)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// A saved siginfo: 128 bytes, hex.
fn siginfo(s: &str) -> Result<Vec<u8>> {
    let b = crate::hexcodec::unhex(s, "a pending siginfo")?;
    if b.len() != 128 {
        return Err(EngineError::Failed(
            "a pending siginfo is not 128 bytes".into(),
        ));
    }
    Ok(b)
}

/// (ss_sp, ss_flags, ss_size) of an enabled alternate signal stack.
pub type AltStack = (u64, u32, u64);

/// Per thread: alternate signal stack and thread-directed pending signals.
/// `known`: the thread's alternate stack as BPF read it (`taskstate`); without it, an
/// injected sigaltstack reads it.
pub fn dump_thread(
    frozen: &mut Frozen,
    tid: i32,
    known: Option<&ferry_sys::taskstate::TaskState>,
) -> Result<(Option<AltStack>, Vec<String>)> {
    let (sp, flags, size) = match known {
        Some(k) => k.altstack,
        None => {
            let b = inject_read(
                frozen,
                tid,
                "sigaltstack",
                libc::SYS_sigaltstack,
                |s| [0, s, 0, 0, 0, 0],
                24,
            )?;
            let flags = u32::from_le_bytes(b[8..12].try_into().unwrap());
            (u64_at(&b, 0), flags, u64_at(&b, 16))
        }
    };
    let ss = (flags & libc::SS_DISABLE as u32 == 0).then_some((
        sp,
        flags & !(libc::SS_ONSTACK as u32),
        size,
    ));
    let pending = frozen
        .pending_siginfo(tid, false)?
        .iter()
        .map(|si| crate::hexcodec::hex(si))
        .collect();
    Ok((ss, pending))
}

/// POSIX timers, from /proc/PID/timers and an injected timer_gettime each.
pub fn dump_timers(frozen: &mut Frozen) -> Result<Vec<crate::schema::PosixTimer>> {
    let pid = frozen.pid();
    let text = std::fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default();
    let mut out = Vec::new();
    let mut cur: Option<crate::schema::PosixTimer> = None;
    for line in text.lines().chain(std::iter::once("ID: -1")) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "ID" => {
                if let Some(t) = cur.take() {
                    out.push(t);
                }
                let id: i32 = v.parse().unwrap_or(-1);
                if id >= 0 {
                    cur = Some(crate::schema::PosixTimer {
                        id,
                        clock: 0,
                        signo: 0,
                        sigval: 0,
                        notify: 0,
                        tid: 0,
                        spec: [0; 4],
                    });
                }
            }
            "signal" => {
                if let (Some(t), Some((s, val))) = (cur.as_mut(), v.split_once('/')) {
                    t.signo = s.parse().unwrap_or(0);
                    t.sigval = u64::from_str_radix(val.trim_start_matches("0x"), 16).unwrap_or(0);
                }
            }
            "notify" => {
                if let (Some(t), Some((kind, who))) = (cur.as_mut(), v.split_once('/')) {
                    let base = match kind {
                        "none" => 1,
                        "thread" => 2,
                        _ => 0,
                    };
                    let (which, n) = who.split_once('.').unwrap_or(("pid", "0"));
                    t.notify = base | if which == "tid" { 4 } else { 0 };
                    t.tid = n.parse().unwrap_or(0);
                }
            }
            "ClockID" => {
                if let Some(t) = cur.as_mut() {
                    t.clock = v.parse().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    for t in out.iter_mut() {
        let id = t.id as u64;
        let b = inject_read(
            frozen,
            pid,
            "timer_gettime",
            libc::SYS_timer_gettime,
            |s| [id, s, 0, 0, 0, 0],
            32,
        )?;
        t.spec = [0, 8, 16, 24].map(|i| u64_at(&b, i) as i64);
    }
    Ok(out)
}

/// Recreate POSIX timers with their IDs (PR_TIMER_CREATE_RESTORE_IDS) and time left.
pub fn restore_timers(t: &mut Target, timers: &[crate::schema::PosixTimer]) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    t.sys(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
    )?;
    for pt in timers {
        let mut sev = vec![0u8; 64];
        sev[0..8].copy_from_slice(&pt.sigval.to_le_bytes());
        sev[8..12].copy_from_slice(&pt.signo.to_le_bytes());
        sev[12..16].copy_from_slice(&pt.notify.to_le_bytes());
        sev[16..20].copy_from_slice(&pt.tid.to_le_bytes());
        let sev_at = t.put(2816, &sev)?;
        let id_at = t.put(2880, &pt.id.to_le_bytes())?;
        t.sys(
            &format!("timer_create of timer {}", pt.id),
            libc::SYS_timer_create,
            [pt.clock as u64, sev_at, id_at, 0, 0, 0],
        )?;
        let spec: Vec<u8> = pt.spec.iter().flat_map(|x| x.to_le_bytes()).collect();
        let spec_at = t.put(2896, &spec)?;
        t.sys(
            &format!("timer_settime of timer {}", pt.id),
            libc::SYS_timer_settime,
            [pt.id as u64, 0, spec_at, 0, 0, 0],
        )?;
    }
    t.sys(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// Per process: shared pending signals and interval timers.
pub fn dump_process(frozen: &mut Frozen) -> Result<(Vec<String>, Vec<[i64; 4]>)> {
    let tid = frozen.pid();
    let shared = frozen
        .pending_siginfo(tid, true)?
        .iter()
        .map(|si| crate::hexcodec::hex(si))
        .collect();
    let mut timers = Vec::new();
    for which in 0..3u64 {
        let b = inject_read(
            frozen,
            tid,
            "getitimer",
            libc::SYS_getitimer,
            |s| [which, s, 0, 0, 0, 0],
            32,
        )?;
        timers.push([0, 8, 16, 24].map(|i| u64_at(&b, i) as i64));
    }
    Ok((shared, timers))
}

/// Alternate stack of one thread. A thread that had none gets it disabled explicitly: the
/// stub inherited Ferry's own, which points to memory that is gone now, and a handler with
/// SA_ONSTACK would fault setting up its frame there.
pub fn restore_thread(t: &mut Target, th: &ThreadImage) -> Result<()> {
    let ss = th.sigaltstack.unwrap_or((0, libc::SS_DISABLE as u32, 0));
    {
        let (sp, flags, size) = ss;
        let mut b = Vec::new();
        b.extend_from_slice(&sp.to_le_bytes());
        b.extend_from_slice(&(flags as u64).to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        let at = t.put(2304, &b)?;
        // Run in the thread with the rest of its calls (`regs::restore` flushes them there).
        t.queue(
            format!("sigaltstack of thread {}", th.tid),
            libc::SYS_sigaltstack,
            [at, 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Interval timers, then pending signals, queued again with their siginfo. Done last, so
/// that nothing else is injected while they may be delivered.
pub fn restore_pending(
    t: &mut Target,
    pid: i32,
    threads: &[ThreadImage],
    shared: &[String],
    itimers: &[[i64; 4]],
) -> Result<()> {
    for (which, v) in itimers.iter().enumerate() {
        if v.iter().all(|&x| x == 0) {
            continue;
        }
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let at = t.put(2400, &b)?;
        t.sys(
            "setitimer",
            libc::SYS_setitimer,
            [which as u64, at, 0, 0, 0, 0],
        )?;
    }
    for th in threads {
        for si in &th.pending {
            let b = siginfo(si)?;
            let sig = u32::from_le_bytes(b[0..4].try_into().unwrap()) as u64;
            let at = t.put(2432, &b)?;
            t.sys_in(
                th.tid,
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                [pid as u64, th.tid as u64, sig, at, 0, 0],
            )?;
        }
    }
    for si in shared {
        let b = siginfo(si)?;
        let sig = u32::from_le_bytes(b[0..4].try_into().unwrap()) as u64;
        let at = t.put(2432, &b)?;
        t.sys(
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            [pid as u64, sig, at, 0, 0, 0],
        )?;
    }
    Ok(())
}
