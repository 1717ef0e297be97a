//! `ferry dump`: freeze, collect, stream, verify, then kill or resume.

use crate::schema::{ProcessImage, TAG_PROCESS};
use crate::{files, memory, mm, regs, signals, EngineError, Result};
use ferry_image::{ImageReader, ImageWriter};
use ferry_sys::{procfs, Frozen};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Kill the process once the image is complete and verified (the default).
    Killed,
    Running,
    Stopped,
}

#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub leave: Leave,
}

#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub threads: usize,
    pub mappings: usize,
    pub pages: u64,
    pub bytes: u64,
    pub frozen_ms: f64,
    pub total_ms: f64,
    pub gb_per_s: f64,
    pub left: String,
}

fn children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for tid in procfs::list_threads(pid).unwrap_or_default() {
        let s =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        v.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
    }
    v
}

pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpReport> {
    let t0 = Instant::now();
    procfs::check_inspectable(pid)?;
    if let Some(c) = children(pid).first() {
        return Err(EngineError::Unsupported {
            pid,
            what: format!("it has child process {c}: process trees are not supported yet"),
        });
    }
    let mut frozen = Frozen::freeze(pid)?;
    let tf = Instant::now();
    // Any error from here on drops `frozen`, which resumes the process untouched.
    let threads = regs::dump(&frozen)?;
    if threads.len() > 1 {
        return Err(EngineError::Unsupported {
            pid,
            what: format!(
                "it has {} threads: multi-threaded processes are not supported yet",
                threads.len()
            ),
        });
    }
    let maps = procfs::read_maps(pid)?;
    let st = procfs::read_status(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0o022);
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = files::dump(pid)?;
    let mm = mm::dump(pid, &mut frozen)?;
    let sigactions = signals::dump(&mut frozen)?;
    let exe = procfs::read_exe(pid)?.display().to_string();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    let mut w = ImageWriter::create(dir)?;
    let written = (|| -> Result<ferry_image::Summary> {
        let (mappings, pages) = memory::dump(pid, &maps, &mut w)?;
        let _ = pages;
        let img = ProcessImage {
            pid,
            ppid,
            comm: st.name.clone(),
            exe: exe.clone(),
            threads: threads.clone(),
            mappings,
            mm: mm.clone(),
            fds: fds.clone(),
            sigactions: sigactions.clone(),
            cwd: cwd.clone(),
            umask,
        };
        w.meta(TAG_PROCESS, &img)?;
        let summary = w.finish()?;
        // The process is killed only after the image is on disk and reads back whole.
        ImageReader::open(dir)?.verify_pages()?;
        Ok(summary)
    })();
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            // Leave no half-written image behind; `frozen` resumes the process on drop.
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    let left = match opts.leave {
        Leave::Killed => {
            frozen.kill();
            "killed"
        }
        Leave::Running => {
            frozen.resume();
            "running"
        }
        Leave::Stopped => {
            // SAFETY: kill(2) has no memory effects; SIGSTOP takes effect at the detach.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            frozen.resume();
            "stopped"
        }
    };
    let frozen_ms = tf.elapsed().as_secs_f64() * 1e3;
    let total = t0.elapsed().as_secs_f64();
    Ok(DumpReport {
        pid,
        threads: threads.len(),
        mappings: maps.len(),
        pages: summary.pages,
        bytes: summary.page_bytes,
        frozen_ms,
        total_ms: total * 1e3,
        gb_per_s: summary.page_bytes as f64 / (frozen_ms / 1e3).max(1e-9) / 1e9,
        left: left.into(),
    })
}
