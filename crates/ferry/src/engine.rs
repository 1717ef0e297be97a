//! `ferry dump`, `ferry restore` and `ferry image show`.

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::dump::Leave;
use ferry_engine::{DumpOptions, Phase, Progress, RestoreOptions};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct DumpArgs {
    /// The process to dump.
    #[arg(long)]
    pid: i32,
    /// Directory for the image (created; must not hold an image already).
    #[arg(long)]
    images: PathBuf,
    /// Resume the process after the dump instead of killing it.
    #[arg(long, conflicts_with = "leave_stopped")]
    leave_running: bool,
    /// Leave the process stopped (SIGSTOP) after the dump.
    #[arg(long)]
    leave_stopped: bool,
    #[arg(long)]
    json: bool,
    /// No progress on stderr (a bar is drawn only when stderr is a terminal anyway).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Directory holding the image.
    #[arg(long)]
    images: PathBuf,
    /// Return once the process runs, instead of waiting for it and passing on its exit status.
    #[arg(long)]
    detach: bool,
    /// Let the tree run at once and fill its private memory on demand (userfaultfd), the
    /// rest in the background; ferry stays until every page is in place.
    #[arg(long)]
    lazy: bool,
    /// Accept open regular files whose size or mode changed since the dump.
    #[arg(long)]
    allow_changed_files: bool,
    /// Restore into this network namespace: a file such as /run/netns/NAME or
    /// /proc/PID/ns/net, or `new:NAME` for a fresh one made now (/run/netns/NAME, loopback up,
    /// the tree's addresses on it). The restored sockets take their
    /// saved addresses there.
    #[arg(long, value_name = "NSFILE")]
    netns: Option<String>,
    /// Restore inside a new PID namespace (and a mount namespace with its own /proc), where
    /// the saved PIDs are free even if they are taken here. Ferry stays as the namespace's
    /// init, reaping orphans, until the restored root exits.
    #[arg(long)]
    pidns: bool,
    #[arg(long)]
    json: bool,
    /// No progress on stderr (a bar is drawn only when stderr is a terminal anyway).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct ImageShowArgs {
    /// Directory holding the image.
    dir: PathBuf,
    /// Also read and check every page block.
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    json: bool,
}

/// A progress bar on stderr when it is a terminal and not `quiet`; it clears itself when the
/// phase completes, so nothing of it remains beside the process's own output.
fn progress_bar(quiet: bool) -> (Option<indicatif::ProgressBar>, Progress) {
    if quiet || !std::io::stderr().is_terminal() {
        return (None, Progress::default());
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>6} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let b = bar.clone();
    let progress = Progress::new(move |phase, done, total| {
        b.set_message(match phase {
            Phase::Memory => "memory",
            Phase::Pages => "pages",
        });
        b.set_length(total);
        b.set_position(done);
        if done >= total && phase == Phase::Pages {
            b.finish_and_clear();
        }
    });
    (Some(bar), progress)
}

pub fn dump(a: DumpArgs) -> Result<u8> {
    let leave = if a.leave_running {
        Leave::Running
    } else if a.leave_stopped {
        Leave::Stopped
    } else {
        Leave::Killed
    };
    if !a.quiet {
        eprintln!(
            "ferry: dumping process {} into {}",
            a.pid,
            a.images.display()
        );
    }
    let (bar, progress) = progress_bar(a.quiet);
    let r = ferry_engine::dump(a.pid, &a.images, &DumpOptions { leave, progress });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "dumped process {} and {} descendant(s): {} thread(s), {} mappings, {} pages ({:.1} MiB) in {:.1} ms, frozen {:.1} ms ({:.2} GB/s); process {}",
            r.pid,
            r.processes - 1,
            r.threads,
            r.mappings,
            r.pages,
            r.bytes as f64 / 1048576.0,
            r.total_ms,
            r.frozen_ms,
            r.gb_per_s,
            r.left
        );
    }
    Ok(0)
}

/// Set in the environment of the `ferry restore` that runs as init of a new PID namespace.
const PIDNS_INIT: &str = "FERRY_PIDNS_INIT";

/// `restore --pidns`: run the restore again as PID 1 of a new PID namespace (unshare), which
/// reports on one JSON line and then stays as the namespace's init.
fn restore_in_pidns(a: &RestoreArgs) -> Result<u8> {
    use std::io::BufRead;
    let me = std::env::current_exe()?;
    let mut c = std::process::Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc"])
        .arg(me)
        .args(["restore", "--quiet", "--images"])
        .arg(&a.images)
        .env(PIDNS_INIT, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Piped too: a detached init must not hold our caller's stderr open.
        .stderr(std::process::Stdio::piped());
    if a.allow_changed_files {
        c.arg("--allow-changed-files");
    }
    if let Some(ns) = &a.netns {
        c.args(["--netns", ns]);
    }
    if a.detach {
        // It outlives us: its own session, away from our terminal's signals.
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = c.spawn().context("running unshare (util-linux)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let mut errors = child.stderr.take().unwrap();
    let r: ferry_engine::RestoreReport = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(_) => {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut errors, &mut text);
            let st = child.wait()?;
            anyhow::bail!(
                "in a new PID namespace: {} (exit status {})",
                text.trim().trim_start_matches("ferry: error: "),
                st.code().unwrap_or(2)
            );
        }
    };
    if !a.detach {
        // Relay what it says from now on.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut errors, &mut std::io::stderr());
        });
    } else {
        drop(errors);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if a.detach {
        println!("{} (in a new PID namespace)", restored_line(&r));
    } else if !a.quiet {
        eprintln!("ferry: {} (in a new PID namespace)", restored_line(&r));
    }
    if a.detach {
        return Ok(0);
    }
    let st = child.wait()?;
    Ok(st.code().unwrap_or(128 + 9).clamp(0, 255) as u8)
}

/// As init of the new namespace: reap everything; leave with the root's status.
fn pidns_init(root: i32) -> ! {
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes only `st`.
        let p = unsafe { libc::waitpid(-1, &mut st, 0) };
        if p == root || p < 0 {
            let code = if p < 0 {
                0
            } else if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            };
            ferry_engine::netblock::finish_lifts();
            std::process::exit(code);
        }
    }
}

pub fn restore(a: RestoreArgs) -> Result<u8> {
    let init = std::env::var_os(PIDNS_INIT).is_some();
    if a.pidns && !init {
        return restore_in_pidns(&a);
    }
    if init {
        // We are PID 1 of a fresh namespace: restore detached, report on one line, then
        // stay to reap.
        let r = ferry_engine::restore(
            &a.images,
            &RestoreOptions {
                detach: true,
                allow_changed_files: a.allow_changed_files,
                netns: a.netns.clone(),
                lazy: a.lazy,
                ..Default::default()
            },
        )?;
        println!("{}", serde_json::to_string(&r)?);
        use std::io::Write;
        std::io::stdout().flush()?;
        pidns_init(r.pid);
    }
    let r = ferry_engine::restore(
        &a.images,
        &RestoreOptions {
            detach: a.detach,
            allow_changed_files: a.allow_changed_files,
            netns: a.netns.clone(),
            progress: progress_bar(a.quiet).1,
            lazy: a.lazy,
            ..Default::default()
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if a.detach {
        println!("{}", restored_line(&r));
    } else if !a.quiet {
        eprintln!("ferry: {}", restored_line(&r));
    }
    // Without --detach, pass on the restored process's exit status.
    Ok(r.exit_status.map(|s| s.clamp(0, 255) as u8).unwrap_or(0))
}

fn restored_line(r: &ferry_engine::RestoreReport) -> String {
    let lazy = match &r.fill {
        Some(f) => format!(
            "; {:.1} MiB filled lazily in {:.1} ms after it ran ({} faults, longest wait {:.2} ms)",
            f.bytes as f64 / 1048576.0,
            f.fill_ms,
            f.faults,
            f.max_fault_ms
        ),
        None => String::new(),
    };
    format!(
        "restored process {} ({} pages, {:.1} MiB) in {:.1} ms: verify {:.1} ms, layout {:.1} ms, \
         pages {:.1} ms ({:.2} GB/s), rest {:.1} ms{}",
        r.pid,
        r.pages,
        r.bytes as f64 / 1048576.0,
        r.restore_ms,
        r.verify_ms,
        r.layout_ms,
        r.pages_ms,
        r.gb_per_s,
        r.rest_ms,
        lazy
    )
}

pub fn image_show(a: ImageShowArgs) -> Result<u8> {
    let r = ferry_image::ImageReader::open(&a.dir)?;
    let summary = r.summary().clone();
    let procs: Vec<ferry_engine::schema::ProcessImage> =
        r.find(ferry_engine::schema::TAG_PROCESS)?;
    let zombies: Vec<ferry_engine::schema::ZombieImage> =
        r.find(ferry_engine::schema::TAG_ZOMBIE)?;
    let verified = if a.verify {
        let mut r = ferry_image::ImageReader::open(&a.dir)?;
        Some(r.verify_pages()?)
    } else {
        None
    };
    if a.json {
        // Sockets as summaries: their queue contents would drown the rest.
        let mut pv = serde_json::to_value(&procs)?;
        for (v, p) in pv.as_array_mut().into_iter().flatten().zip(&procs) {
            v["sockets"] = p.sockets.iter().map(|s| s.summary()).collect();
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "summary": summary, "processes": pv, "zombies": zombies,
                "pages_verified": verified.is_some(),
            }))?
        );
        return Ok(0);
    }
    println!(
        "image {}: {} metadata record(s), {} page block(s), {} pages ({:.1} MiB){}",
        a.dir.display(),
        summary.meta_records,
        summary.page_blocks,
        summary.pages,
        summary.page_bytes as f64 / 1048576.0,
        if verified.is_some() {
            ", pages verified"
        } else {
            ""
        }
    );
    for p in &procs {
        println!(
            "process {} ({}) ppid {} exe {} cwd {}{}",
            p.pid,
            p.comm,
            p.ppid,
            p.exe,
            p.cwd,
            p.root
                .as_ref()
                .map(|r| format!(" root {r}"))
                .unwrap_or_default()
        );
        for t in &p.threads {
            println!(
                "  thread {} rip {:#x} rsp {:#x} sigmask {:#x}",
                t.tid, t.regs[16], t.regs[19], t.sigmask
            );
        }
        println!("  mappings:");
        for m in &p.mappings {
            println!(
                "    {:#014x}-{:#014x} {}{}{}{} {:<11} {:>7} pages saved  {}{}",
                m.start,
                m.end,
                if m.read { 'r' } else { '-' },
                if m.write { 'w' } else { '-' },
                if m.exec { 'x' } else { '-' },
                if m.shared { 's' } else { 'p' },
                format!("{:?}", m.kind).to_lowercase(),
                m.pages_saved,
                m.path.as_deref().unwrap_or(""),
                if m.advice.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", m.advice.join(","))
                }
            );
        }
        println!("  fds:");
        for f in &p.fds {
            println!(
                "    {:>3} {} flags {:o} pos {}",
                f.fd, f.path, f.flags, f.pos
            );
        }
        if !p.sockets.is_empty() {
            println!("  sockets:");
            for s in &p.sockets {
                let v = s.summary();
                println!(
                    "    socket:[{}] {} {} {} {} -> {}  queued: send {} (unsent {}), receive {}",
                    v["inode"],
                    v["family"].as_str().unwrap_or(""),
                    v["type"].as_str().unwrap_or(""),
                    v["state"].as_str().unwrap_or(""),
                    v["local"].as_str().unwrap_or(""),
                    v["peer"].as_str().unwrap_or(""),
                    v["send_queue"],
                    v["unsent"],
                    v["recv_queue"]
                );
            }
        }
        if !p.namespaces.mounts.is_empty() {
            println!("  mounts made in its own mount namespace:");
            for m in &p.namespaces.mounts {
                use ferry_engine::namespaces::TmpfsKind;
                let files: u64 = m
                    .files
                    .iter()
                    .filter(|f| f.kind == TmpfsKind::File)
                    .map(|f| f.data.len() as u64 / 2)
                    .sum();
                println!(
                    "    {:<9} {}{}{}{}",
                    m.kind.name(),
                    m.target,
                    if m.source.is_empty() {
                        String::new()
                    } else {
                        format!(" from {}", m.source)
                    },
                    if m.data.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", m.data)
                    },
                    if m.files.is_empty() {
                        String::new()
                    } else {
                        format!(", {} files, {files} bytes", m.files.len())
                    }
                );
            }
        }
        println!("  signal dispositions: {}", p.sigactions.len());
    }
    for z in &zombies {
        println!(
            "zombie {} (child of {}), wait status {:#x}",
            z.pid, z.ppid, z.status
        );
    }
    Ok(0)
}
