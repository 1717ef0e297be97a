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
    /// Time the process was stopped.
    pub frozen_ms: f64,
    /// Time to read the memory and write it into the image.
    pub memory_ms: f64,
    /// Time to sync the image and read it back whole.
    pub verify_ms: f64,
    pub total_ms: f64,
    /// Page bytes over memory_ms.
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
    let mut threads = regs::dump(&mut frozen)?;
    for th in threads.iter_mut() {
        (th.sigaltstack, th.pending) = signals::dump_thread(&mut frozen, th.tid)?;
    }
    let (shared_pending, itimers) = signals::dump_process(&mut frozen)?;
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
    let (fds, pipes) = files::dump(pid)?;
    let mm = mm::dump(pid, &mut frozen)?;
    let sigactions = signals::dump(&mut frozen)?;
    let exe = procfs::read_exe(pid)?.display().to_string();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    let mut w = ImageWriter::create(dir)?;
    let tm = Instant::now();
    let collected = memory::dump(pid, &maps, &mut w).and_then(|(mappings, _)| {
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
            pipes: pipes.clone(),
            shared_pending: shared_pending.clone(),
            itimers: itimers.clone(),
        };
        w.meta(TAG_PROCESS, &img)?;
        Ok(())
    });
    if let Err(e) = collected {
        // Leave no half-written image behind; `frozen` resumes the process on drop.
        drop(w);
        let _ = std::fs::remove_dir_all(dir);
        return Err(e);
    }
    let memory_ms = tm.elapsed().as_secs_f64() * 1e3;
    // A process that keeps running needs nothing more from us: let it go before the image is
    // synced and verified.
    let mut frozen = Some(frozen);
    let mut frozen_ms = 0.0;
    if opts.leave == Leave::Running {
        if let Some(f) = frozen.take() {
            f.resume();
        }
        frozen_ms = tf.elapsed().as_secs_f64() * 1e3;
    }
    // The process is killed only after the image is synced and reads back whole.
    let tv = Instant::now();
    let finished = w.finish().map_err(crate::EngineError::from).and_then(|s| {
        ImageReader::open(dir)?
            .verify_pages()
            .map(|_| s)
            .map_err(Into::into)
    });
    let summary = match finished {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    let verify_ms = tv.elapsed().as_secs_f64() * 1e3;
    let left = match (opts.leave, frozen.take()) {
        (Leave::Killed, Some(f)) => {
            f.kill();
            "killed"
        }
        (Leave::Stopped, Some(f)) => {
            // SAFETY: kill(2) has no memory effects; SIGSTOP takes effect at the detach.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            f.resume();
            "stopped"
        }
        _ => "running",
    };
    if frozen_ms == 0.0 {
        frozen_ms = tf.elapsed().as_secs_f64() * 1e3;
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(DumpReport {
        pid,
        threads: threads.len(),
        mappings: maps.len(),
        pages: summary.pages,
        bytes: summary.page_bytes,
        frozen_ms,
        memory_ms,
        verify_ms,
        total_ms: total * 1e3,
        gb_per_s: summary.page_bytes as f64 / (memory_ms / 1e3).max(1e-9) / 1e9,
        left: left.into(),
    })
}
