//! mm fields: code/data/brk/stack/arg/env bounds, auxv and the exe link.
//!
//! Dump reads /proc/PID/stat and auxv and asks the process for its brk; restore sets them all
//! at once with PR_SET_MM_MAP (the single-field PR_SET_MM_* options need CAP_SYS_RESOURCE).

use crate::ctx::Target;
use crate::schema::MmImage;
use crate::{EngineError, Result};
use ferry_sys::Frozen;

pub fn dump(pid: i32, frozen: &mut Frozen) -> Result<MmImage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| EngineError::Failed(format!("reading /proc/{pid}/stat: {e}")))?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // f[0] is field 3 (state).
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let tid = frozen.threads()[0].tid;
    let brk = frozen.inject_syscall(tid, libc::SYS_brk, [0; 6])? as u64;
    let auxv = ferry_sys::procfs::read_auxv(pid)?
        .into_iter()
        .flat_map(|(a, b)| [a, b])
        .chain([0, 0])
        .collect();
    Ok(MmImage {
        start_code: field(26),
        end_code: field(27),
        start_stack: field(28),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk,
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
        auxv,
    })
}

pub fn restore(t: &mut Target, mm: &MmImage, exe: &str) -> Result<()> {
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|v| v.to_le_bytes()).collect();
    let auxv_at = t.put(1024, &auxv)?;
    let p = t.put_path(exe)?;
    let exe_fd = t.sys(
        &format!("open of the executable {exe}"),
        libc::SYS_openat,
        [
            libc::AT_FDCWD as u64,
            p,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            0,
            0,
            0,
        ],
    )?;
    let mut map = Vec::with_capacity(112);
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    map.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    // The stub runs Ferry's own executable. When the process ran the same file, the link is
    // right already, and changing it would fail (EBUSY: the old file is mapped again).
    let same = {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(format!("/proc/{}/exe", t.pid));
        let b = std::fs::metadata(exe);
        matches!((a, b), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    };
    let fd_field = if same { u32::MAX } else { exe_fd as u32 };
    map.extend_from_slice(&fd_field.to_le_bytes());
    let map_at = t.put(0, &map)?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    let r = t.sys(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        [PR_SET_MM, PR_SET_MM_MAP, map_at, map.len() as u64, 0, 0],
    );
    t.sys("close", libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0])?;
    r.map(|_| ())
}
