//! `ferry dump`, `ferry restore` and `ferry image show`.

use anyhow::Result;
use clap::Args;
use ferry_engine::dump::Leave;
use ferry_engine::{DumpOptions, RestoreOptions};
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
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Directory holding the image.
    #[arg(long)]
    images: PathBuf,
    /// Return once the process runs, instead of waiting for it and passing on its exit status.
    #[arg(long)]
    detach: bool,
    /// Accept open regular files whose size or mode changed since the dump.
    #[arg(long)]
    allow_changed_files: bool,
    /// Restore into this network namespace: a file such as /run/netns/NAME or
    /// /proc/PID/ns/net. The restored sockets take their saved addresses there.
    #[arg(long, value_name = "NSFILE")]
    netns: Option<String>,
    #[arg(long)]
    json: bool,
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

pub fn dump(a: DumpArgs) -> Result<u8> {
    let leave = if a.leave_running {
        Leave::Running
    } else if a.leave_stopped {
        Leave::Stopped
    } else {
        Leave::Killed
    };
    eprintln!(
        "ferry: dumping process {} into {}",
        a.pid,
        a.images.display()
    );
    let r = ferry_engine::dump(a.pid, &a.images, &DumpOptions { leave })?;
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

pub fn restore(a: RestoreArgs) -> Result<u8> {
    let r = ferry_engine::restore(
        &a.images,
        &RestoreOptions {
            detach: a.detach,
            allow_changed_files: a.allow_changed_files,
            netns: a.netns.clone(),
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if a.detach {
        println!(
            "restored process {} ({} pages) in {:.1} ms",
            r.pid, r.pages, r.restore_ms
        );
    } else {
        eprintln!(
            "ferry: restored process {} ({} pages) in {:.1} ms",
            r.pid, r.pages, r.restore_ms
        );
    }
    // Without --detach, pass on the restored process's exit status.
    Ok(r.exit_status.map(|s| s.clamp(0, 255) as u8).unwrap_or(0))
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
