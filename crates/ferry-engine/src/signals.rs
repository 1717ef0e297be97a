//! Signal dispositions: every signal with a handler or ignored, read and set with injected
//! rt_sigaction. (Blocked masks travel with each thread's registers.)

use crate::ctx::Target;
use crate::schema::SigactionImage;
use crate::Result;
use ferry_sys::Frozen;

pub fn dump(frozen: &mut Frozen) -> Result<Vec<SigactionImage>> {
    let mut out = Vec::new();
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let a = frozen.sigaction(sig)?;
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
    for a in all {
        let mut b = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let at = t.put(2048, &b)?;
        t.sys(
            &format!("rt_sigaction({})", a.signal),
            libc::SYS_rt_sigaction,
            [a.signal as u64, at, 0, 8, 0, 0],
        )?;
    }
    Ok(())
}
