//! Per-process attributes: rlimits, personality, no_new_privs, dumpable, parent-death signal,
//! session and process group, credentials.

use crate::ctx::Target;
use crate::{EngineError, Result};
use ferry_sys::Frozen;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attrs {
    /// (resource, soft, hard), RLIM_INFINITY as u64::MAX.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub personality: u64,
    pub no_new_privs: bool,
    pub dumpable: u64,
    pub pdeathsig: u64,
    pub sid: i32,
    pub pgid: i32,
    /// real, effective, saved uids and gids, supplementary groups.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    pub groups: Vec<u32>,
}

fn limit(v: &str) -> u64 {
    if v == "unlimited" {
        u64::MAX
    } else {
        v.parse().unwrap_or(u64::MAX)
    }
}

/// Parse /proc/PID/limits: its lines follow the resource numbers.
fn parse_limits(text: &str) -> Vec<(u32, u64, u64)> {
    text.lines()
        .skip(1)
        .enumerate()
        .filter_map(|(i, l)| {
            // "Max open files            1024                 1048576              files"
            let cols: Vec<&str> = l.split_whitespace().collect();
            let n = cols.len();
            if n < 3 {
                return None;
            }
            // The unit column is absent for some resources; the two values precede it.
            let (s, h) = if cols[n - 1].parse::<u64>().is_ok() || cols[n - 1] == "unlimited" {
                (cols[n - 2], cols[n - 1])
            } else {
                (cols[n - 3], cols[n - 2])
            };
            Some((i as u32, limit(s), limit(h)))
        })
        .collect()
}

fn ids(status: &str, key: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn dump(frozen: &mut Frozen) -> Result<Attrs> {
    let pid = frozen.pid();
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map_err(|e| EngineError::Failed(format!("reading /proc/{pid}/{f}: {e}")))
    };
    let status = read("status")?;
    let stat = read("stat")?;
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let uids = ids(&status, "Uid:");
    let gids = ids(&status, "Gid:");
    let dumpable = frozen.inject_syscall(
        pid,
        libc::SYS_prctl,
        [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
    )?;
    let scratch = frozen.scratch_of(pid)?;
    frozen.inject_syscall(
        pid,
        libc::SYS_prctl,
        [libc::PR_GET_PDEATHSIG as u64, scratch, 0, 0, 0, 0],
    )?;
    let mut b = [0u8; 4];
    ferry_sys::mem::read_mem_forced(pid, scratch, &mut b)?;
    Ok(Attrs {
        rlimits: parse_limits(&read("limits")?),
        personality: u64::from_str_radix(read("personality")?.trim(), 16).unwrap_or(0),
        no_new_privs: ids(&status, "NoNewPrivs:").first() == Some(&1),
        dumpable: dumpable.max(0) as u64,
        pdeathsig: u32::from_le_bytes(b) as u64,
        pgid: f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0),
        sid: f.get(3).and_then(|v| v.parse().ok()).unwrap_or(0),
        uids: [
            uids.first().copied().unwrap_or(0),
            uids.get(1).copied().unwrap_or(0),
            uids.get(2).copied().unwrap_or(0),
        ],
        gids: [
            gids.first().copied().unwrap_or(0),
            gids.get(1).copied().unwrap_or(0),
            gids.get(2).copied().unwrap_or(0),
        ],
        groups: ids(&status, "Groups:"),
    })
}

/// Session and process group: a session leader makes its session again; group members join.
pub fn restore_session(t: &mut Target, pid: i32, a: &Attrs) -> Result<()> {
    if a.sid == pid {
        t.sys("setsid", libc::SYS_setsid, [0; 6])?;
    } else if a.pgid == pid
        || (a.pgid != 0 && std::path::Path::new(&format!("/proc/{}", a.pgid)).exists())
    {
        // Joining a group only works inside the same session; a group elsewhere is left.
        let _ = t.sys("setpgid", libc::SYS_setpgid, [0, a.pgid as u64, 0, 0, 0, 0]);
    }
    Ok(())
}

/// Everything else; credentials last, since they may drop the privileges of the process.
pub fn restore(t: &mut Target, a: &Attrs, is_root: bool) -> Result<()> {
    let stub_limits =
        std::fs::read_to_string(format!("/proc/{}/limits", t.pid)).unwrap_or_default();
    let ours = parse_limits(&stub_limits);
    for &(res, soft, hard) in &a.rlimits {
        // Most limits are what the stub has already: each call is a stop of the target.
        if ours.contains(&(res, soft, hard)) {
            continue;
        }
        let mut b = Vec::new();
        b.extend_from_slice(&soft.to_le_bytes());
        b.extend_from_slice(&hard.to_le_bytes());
        let at = t.put(2688, &b)?;
        if t.sys(
            "prlimit64",
            libc::SYS_prlimit64,
            [0, res as u64, at, 0, 0, 0],
        )
        .is_err()
        {
            // A hard limit above the restorer's own cannot be set without CAP_SYS_RESOURCE:
            // keep the current hard limit and the soft limit within it.
            let cur_hard = ours
                .iter()
                .find(|l| l.0 == res)
                .map(|l| l.2)
                .unwrap_or(hard);
            let mut b = Vec::new();
            b.extend_from_slice(&soft.min(cur_hard).to_le_bytes());
            b.extend_from_slice(&hard.min(cur_hard).to_le_bytes());
            let at = t.put(2688, &b)?;
            t.sys(
                &format!("prlimit64 of resource {res}"),
                libc::SYS_prlimit64,
                [0, res as u64, at, 0, 0, 0],
            )?;
        }
    }
    t.queue(
        "personality",
        libc::SYS_personality,
        [a.personality, 0, 0, 0, 0, 0],
    )?;
    if a.no_new_privs {
        t.queue(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        )?;
    }
    let groups: Vec<u8> = a.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    if groups.len() > 1024 {
        return Err(EngineError::Failed("too many supplementary groups".into()));
    }
    let at = t.put_batch_data(&groups)?;
    t.queue(
        "setgroups",
        libc::SYS_setgroups,
        [a.groups.len() as u64, at, 0, 0, 0, 0],
    )?;
    let [r, e, s] = a.gids;
    t.queue(
        "setresgid",
        libc::SYS_setresgid,
        [r as u64, e as u64, s as u64, 0, 0, 0],
    )?;
    let [r, e, s] = a.uids;
    t.queue(
        "setresuid",
        libc::SYS_setresuid,
        [r as u64, e as u64, s as u64, 0, 0, 0],
    )?;
    // Changing credentials clears the parent-death signal: set it after them. The root's
    // parent is the restorer, whose exit must not kill it.
    if a.pdeathsig != 0 && !is_root {
        t.queue(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            [libc::PR_SET_PDEATHSIG as u64, a.pdeathsig, 0, 0, 0, 0],
        )?;
    }
    // Changing credentials resets dumpable: set it after them.
    t.queue(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        [libc::PR_SET_DUMPABLE as u64, a.dumpable, 0, 0, 0, 0],
    )?;
    // One stop of the target for all of them, in this order.
    t.flush()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max file size             unlimited            unlimited            bytes     \n\
                    Max data size             unlimited            unlimited            bytes     \n\
                    Max stack size            8388608              unlimited            bytes     \n\
                    Max core file size        0                    unlimited            bytes     \n\
                    Max resident set          unlimited            unlimited            bytes     \n\
                    Max processes             95435                95435                processes \n\
                    Max open files            512                  20000                files     \n\
                    Max locked memory         8388608              8388608              bytes     \n\
                    Max address space         unlimited            unlimited            bytes     \n\
                    Max file locks            unlimited            unlimited            locks     \n\
                    Max pending signals       95435                95435                signals   \n\
                    Max msgqueue size         819200               819200               bytes     \n\
                    Max nice priority         0                    0                    \n\
                    Max realtime priority     0                    0                    \n\
                    Max realtime timeout      unlimited            unlimited            us        \n";
        let l = super::parse_limits(text);
        assert_eq!(l.len(), 16);
        assert_eq!(l[3], (3, 8388608, u64::MAX));
        assert_eq!(l[7], (7, 512, 20000));
        assert_eq!(l[13], (13, 0, 0));
        assert_eq!(l[15], (15, u64::MAX, u64::MAX));
    }
}
