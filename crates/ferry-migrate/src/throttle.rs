//! Slowing a tree whose memory changes faster than the link carries it, so that pre-copy
//! converges: its threads go into a CPU cgroup with a quota (cgroup v1 `cpu`, or v2
//! `cpu.max`) until the migration ends, then back where they were.

use crate::{MigrateError, Result};
use std::path::{Path, PathBuf};

pub struct Throttle {
    dir: PathBuf,
    /// (tid, the cgroup directory it came from, the file to write it back into).
    moved: Vec<(i32, PathBuf)>,
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).map_err(|e| MigrateError::Io {
        what: format!("writing {v:?} to {}", p.display()),
        source: e,
    })
}

/// The cgroup hierarchy with the CPU controller: (root, its name in /proc/PID/cgroup, v2?).
fn hierarchy() -> Option<(PathBuf, String, bool)> {
    for (root, name) in [
        ("/sys/fs/cgroup/cpu", "cpu"),
        ("/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct"),
    ] {
        if Path::new(root).join("cpu.cfs_quota_us").exists() {
            return Some((root.into(), name.into(), false));
        }
    }
    let ctl = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    ctl.split_whitespace()
        .any(|c| c == "cpu")
        .then(|| ("/sys/fs/cgroup".into(), String::new(), true))
}

impl Throttle {
    /// Put every thread of `pids` into a new cgroup limited to `percent` of one CPU.
    pub fn start(pids: &[i32], percent: u32) -> Result<Throttle> {
        let (root, name, v2) = hierarchy().ok_or_else(|| {
            MigrateError::Failed(
                "no cgroup hierarchy with the cpu controller to throttle in".into(),
            )
        })?;
        let dir = root.join(format!("ferry-throttle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| MigrateError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })?;
        let quota = (percent.max(1) * 1000).to_string();
        if v2 {
            write(&dir.join("cpu.max"), &format!("{quota} 100000"))?;
        } else {
            write(&dir.join("cpu.cfs_period_us"), "100000")?;
            write(&dir.join("cpu.cfs_quota_us"), &quota)?;
        }
        let mut t = Throttle {
            dir,
            moved: Vec::new(),
        };
        for &pid in pids {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for tid in tasks {
                let cg = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))
                    .unwrap_or_default();
                let from = cg.lines().find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
                    (ctl == name).then(|| root.join(path.trim_start_matches('/')))
                });
                let Some(from) = from else { continue };
                // v2 moves whole processes (cgroup.procs); v1 moves threads (tasks).
                let file = if v2 { "cgroup.procs" } else { "tasks" };
                if write(&t.dir.join(file), &tid.to_string()).is_ok() {
                    t.moved.push((tid, from.join(file)));
                }
                if v2 {
                    break;
                }
            }
        }
        Ok(t)
    }
}

impl Throttle {
    /// Change the limit to `percent` of one CPU.
    pub fn set(&self, percent: u32) -> Result<()> {
        let quota = (percent.max(1) * 1000).to_string();
        if self.dir.join("cpu.max").exists() {
            write(&self.dir.join("cpu.max"), &format!("{quota} 100000"))
        } else {
            write(&self.dir.join("cpu.cfs_quota_us"), &quota)
        }
    }

    /// Lift the limit (the threads stay in the cgroup until drop). Before a freeze: a thread
    /// out of quota cannot stop for ptrace until its next period, up to 100 ms later.
    pub fn lift(&self) {
        if self.dir.join("cpu.max").exists() {
            let _ = write(&self.dir.join("cpu.max"), "max 100000");
        } else {
            let _ = write(&self.dir.join("cpu.cfs_quota_us"), "-1");
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for (tid, back) in self.moved.drain(..) {
            let _ = std::fs::write(&back, tid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
