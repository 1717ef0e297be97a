//! `ferry restore`: verify the whole image, fork a stub with the saved PID, rebuild the process
//! into it from outside, and let it run. On any failure the stub is killed: nothing half-built
//! is left running.

use crate::ctx::Target;
use crate::schema::{MappingImage, ProcessImage, TAG_PROCESS};
use crate::{files, memory, mm, regs, signals, EngineError, Result};
use ferry_image::ImageReader;
use ferry_sys::{procfs, spawn::spawn_stub, Frozen};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub detach: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    pub pages: u64,
    pub restore_ms: f64,
    /// Exit status of the restored process when not detached.
    pub exit_status: Option<i32>,
}

pub fn load(dir: &Path) -> Result<ProcessImage> {
    let r = ImageReader::open(dir)?;
    let mut procs: Vec<ProcessImage> = r.find(TAG_PROCESS)?;
    if procs.len() != 1 {
        return Err(EngineError::Failed(format!(
            "{}: the image holds {} processes; this version restores exactly one",
            dir.display(),
            procs.len()
        )));
    }
    Ok(procs.remove(0))
}

pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport> {
    let t0 = Instant::now();
    // Everything is checked before any process exists.
    let img = load(dir)?;
    ImageReader::open(dir)?.verify_pages()?;
    if !img.threads.iter().any(|t| t.tid == img.pid) {
        return Err(EngineError::Failed(format!(
            "{}: the image has no thread {} (the thread-group leader)",
            dir.display(),
            img.pid
        )));
    }
    memory::check_files(&img.mappings)?;
    files::check(&img.fds)?;
    let stub = spawn_stub(Some(img.pid))?;
    let frozen = match Frozen::freeze(stub) {
        Ok(f) => f,
        Err(e) => {
            kill_reap(stub);
            return Err(e.into());
        }
    };
    let mut t = Target {
        pid: stub,
        frozen,
        page: 0,
    };
    let pages = match build(&mut t, &img, dir) {
        Ok(p) => p,
        Err(e) => {
            let Target { frozen, .. } = t;
            frozen.kill();
            kill_reap(stub);
            return Err(EngineError::Failed(format!(
                "restore of process {} failed: {e}",
                img.pid
            )));
        }
    };
    t.frozen.resume();
    let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    let exit_status = if opts.detach {
        None
    } else {
        Some(wait_exit(stub))
    };
    Ok(RestoreReport {
        pid: stub,
        pages,
        restore_ms,
        exit_status,
    })
}

fn kill_reap(pid: i32) {
    // SAFETY: kill and waitpid have no memory effects beyond the status integer.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// Exit code, or 128 + signal, as a shell reports it.
fn wait_exit(pid: i32) -> i32 {
    let mut st = 0;
    // SAFETY: waitpid writes only `st`.
    unsafe {
        libc::waitpid(pid, &mut st, 0);
    }
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    }
}

/// Create a thread with TID `tid` in the target (injected clone3 with set_tid) and seize it.
fn create_thread(t: &mut Target, tid: i32) -> Result<()> {
    let tids = t.put(3200, &(tid as u32).to_le_bytes())?;
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let mut args = Vec::new();
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size, cgroup.
    for v in [flags, 0, 0, 0, 0, 0, 0, 0, tids, 1, 0] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let at = t.put(3072, &args)?;
    let got = t.sys(
        &format!("clone3 of thread {tid}"),
        libc::SYS_clone3,
        [at, args.len() as u64, 0, 0, 0, 0],
    )?;
    if got != tid as u64 {
        return Err(EngineError::Failed(format!(
            "thread {tid} was created as {got}"
        )));
    }
    t.frozen.adopt_thread(tid)?;
    Ok(())
}

/// A page for our `syscall; int3` that overlaps neither the stub nor the saved layout.
fn free_page(pid: i32, saved: &[MappingImage]) -> Result<u64> {
    let own = procfs::read_maps(pid)?;
    let mut a = 0x10_0000u64;
    while a < 0x7fff_0000_0000 {
        let hit = own.iter().any(|m| a + 4096 > m.start && a < m.end)
            || saved.iter().any(|m| a + 4096 > m.start && a < m.end);
        if !hit {
            return Ok(a);
        }
        a += 0x10_0000;
    }
    Err(EngineError::Failed(
        "no free page for the restorer in the address space".into(),
    ))
}

fn build(t: &mut Target, img: &ProcessImage, dir: &Path) -> Result<u64> {
    let tid = t.pid;
    // The stub's inherited rseq area is about to disappear: unregister it first.
    if let Some(r) = t.frozen.rseq(tid)? {
        t.sys(
            "rseq unregistration",
            libc::SYS_rseq,
            [r.ptr, r.size as u64, 1, r.signature as u64, 0, 0],
        )?;
    }
    let page = free_page(t.pid, &img.mappings)?;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let got = t.sys(
        "mmap of the restorer page",
        libc::SYS_mmap,
        [
            page,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            flags,
            u64::MAX,
            0,
        ],
    )?;
    if got != page {
        return Err(EngineError::Failed(format!(
            "restorer page mapped at {got:#x}, not {page:#x}"
        )));
    }
    // `syscall` for injections; threads created by an injected clone3 return after it and
    // wait in a pause loop at +16 until they are seized.
    let mut code = vec![0x0f, 0x05, 0xeb, 0x0c];
    code.resize(16, 0xcc);
    code.extend_from_slice(&[0xb8, 0x22, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7]);
    ferry_sys::mem::write_mem(t.pid, page, &code)?;
    t.frozen.set_syscall_insn(page);
    t.page = page;
    memory::restore_layout(t, &img.mappings)?;
    let mut r = ImageReader::open(dir)?;
    let pages = memory::restore_pages(t.pid, &mut r)?;
    mm::restore(t, &img.mm, &img.exe)?;
    files::restore(t, &img.fds, &img.pipes)?;
    let cwd = t.put_path(&img.cwd)?;
    t.sys(
        &format!("chdir to {}", img.cwd),
        libc::SYS_chdir,
        [cwd, 0, 0, 0, 0, 0],
    )?;
    t.sys("umask", libc::SYS_umask, [img.umask as u64, 0, 0, 0, 0, 0])?;
    let comm = t.put_path(&img.comm)?;
    t.sys(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        [libc::PR_SET_NAME as u64, comm, 0, 0, 0, 0],
    )?;
    signals::restore(t, &img.sigactions)?;
    for th in img.threads.iter().filter(|th| th.tid != img.pid) {
        create_thread(t, th.tid)?;
    }
    // The leader last.
    let mut order: Vec<_> = img.threads.iter().filter(|th| th.tid != img.pid).collect();
    order.extend(img.threads.iter().filter(|th| th.tid == img.pid));
    for th in order {
        signals::restore_thread(t, th)?;
        regs::restore(t, th)?;
    }
    signals::restore_pending(t, img.pid, &img.threads, &img.shared_pending, &img.itimers)?;
    // Last: remove our page. The syscall returns into it, but the step trap stops first.
    let p = t.page;
    t.frozen
        .inject_syscall(tid, libc::SYS_munmap, [p, 4096, 0, 0, 0, 0])?;
    Ok(pages)
}
