//! Ctrl-C, SIGTERM and SIGHUP as a request to stop at the next safe point. Their default
//! action would end Ferry anywhere: with a process frozen and its traffic blocked, in the
//! middle of a syscall injected into it, or with its copy bound to die with Ferry while the
//! destination waits for Go. Once `install` has run, they only set a flag that long
//! operations check (`check`) where stopping leaves everything as it was.

use crate::{Error, Result};
use std::sync::atomic::{AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);
/// A daemon's stop request (`install_drain`): what it does with it is its own policy, and the
/// operations it runs meanwhile (`check`) go on.
static DRAIN: AtomicI32 = AtomicI32::new(0);
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    // An atomic swap is async-signal-safe.
    if REQUESTED.swap(sig, Ordering::SeqCst) == 0 {
        const SAY: &[u8] = b"ferry: stopping at the next point where the process is left whole\n";
        // SAFETY: write(2) is async-signal-safe; SAY is a static buffer of that length.
        unsafe {
            libc::write(2, SAY.as_ptr().cast(), SAY.len());
        }
    }
}

fn set(handler: libc::sighandler_t) -> Result<()> {
    for sig in SIGNALS {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only
        // swaps an atomic and writes to stderr. SA_RESTART: most interrupted calls carry on
        // and the flag is seen at the next check; poll, and socket reads with a timeout,
        // still return EINTR (std's read_exact and write_all retry; `nft` loops on it).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::io("sigaction", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

extern "C" fn on_drain_signal(sig: libc::c_int) {
    // An atomic store is async-signal-safe.
    DRAIN.store(sig, Ordering::SeqCst);
}

/// For a daemon (`ferry agent`): SIGINT, SIGTERM and SIGHUP set `drain_requested`, and
/// leave `check` passing, so that the work under way finishes.
pub fn install_drain() -> Result<()> {
    set(on_drain_signal as *const () as libc::sighandler_t)
}

/// The signal that asked a daemon to stop, if one did.
pub fn drain_requested() -> Option<i32> {
    match DRAIN.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// From now on SIGINT, SIGTERM and SIGHUP ask to stop instead of ending the process.
pub fn install() -> Result<()> {
    set(on_signal as *const () as libc::sighandler_t)?;
    INSTALLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// The default actions again (for what follows the operation, e.g. waiting for a restored
/// process, where Ctrl-C should end Ferry as usual). Nothing if `install` never ran.
pub fn uninstall() -> Result<()> {
    if INSTALLED.swap(false, Ordering::SeqCst) {
        set(libc::SIG_DFL)?;
    }
    Ok(())
}

/// The signal that asked to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Err(Interrupted) once a stop was asked for.
pub fn check() -> Result<()> {
    match requested() {
        None => Ok(()),
        Some(sig) => Err(Error::Interrupted(signal_name(sig))),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_sets_the_flag_instead_of_ending_the_process() {
        install().unwrap();
        assert!(check().is_ok());
        // SAFETY: raise sends a signal to this thread; the handler only stores a flag.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
        assert_eq!(requested(), Some(libc::SIGTERM));
        let e = check().unwrap_err().to_string();
        assert!(e.contains("SIGTERM"), "{e}");
        REQUESTED.store(0, Ordering::SeqCst);
        uninstall().unwrap();
    }
}
