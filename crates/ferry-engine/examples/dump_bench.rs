//! Dump and restore speed: a process with N MiB of dirtied anonymous memory, images on tmpfs
//! (/dev/shm). Prints frozen time, dump GB/s and restore time beside the process_vm_readv and
//! first-touch bounds measured in the same run, and the peak memory (VmHWM) of the dumping and
//! of the restoring process, each run in a child of its own so that the figure is Ferry's
//! alone. Figures only, no assertions.
//!
//! cargo run --release -p ferry-engine --example dump_bench [MiB ...]   (default 256 1024 4096)
//!
//! `FERRY_BENCH_IMAGES=DIR` puts the images (and the tmpfs bound's file) in DIR instead of
//! /dev/shm: for example a tmpfs mounted with `huge=within_size`, whose 2 MiB pages take
//! far less work to fill than /dev/shm's 4 KiB ones.

use ferry_engine::dump::Leave;
use ferry_engine::{dump, restore, DumpOptions, RestoreOptions};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

const FIXTURE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd); /* fds leaked by shells */
    size_t n = strtoull(argv[1], 0, 10) << 20;
    unsigned char *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 8) *(size_t *)(p + i) = i * 0x9e3779b97f4a7c15ull;
    printf("ready %p\n", p); fflush(stdout);
    /* Pipes cannot be dumped yet: leave the harness's pipe. */
    freopen("/dev/null", "w", stdout);
    for (;;) pause();
}
"#;

fn pvr_bound(pid: i32, addr: u64, len: u64) -> f64 {
    let mut buf = vec![0u8; 4 << 20];
    let t = Instant::now();
    let mut a = addr;
    while a < addr + len {
        let n = ferry_sys::mem::read_mem(pid, a, &mut buf).unwrap();
        a += n as u64;
    }
    len as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn first_touch_bound(len: usize) -> f64 {
    let t = Instant::now();
    let mut v: Vec<u8> = Vec::with_capacity(len);
    // Touch one byte per page of fresh memory.
    let p = v.spare_capacity_mut();
    for i in (0..len).step_by(4096) {
        p[i].write(1);
    }
    let s = t.elapsed().as_secs_f64();
    drop(v);
    s
}

/// Writing `len` bytes into a new file on tmpfs with 4 MiB writes, GB/s: the image's pages
/// need that much fresh memory, which on this VM can cost more than reading the process.
fn tmpfs_write_bound(dir: &std::path::Path, len: usize) -> f64 {
    use std::io::Write;
    let path = dir.join(format!("ferry-bench-write-{}", std::process::id()));
    let buf = vec![0x5au8; 4 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..len / buf.len() {
        f.write_all(&buf).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    len as f64 / s / 1e9
}

/// Peak resident memory of this process, KiB.
fn vmhwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `--child dump PID IMG` / `--child restore IMG`: one operation, its report and this
/// process's peak memory as one JSON line.
fn child(args: &[String]) {
    let rep = match args[0].as_str() {
        "dump" => serde_json::to_value(
            dump(
                args[1].parse().unwrap(),
                std::path::Path::new(&args[2]),
                &DumpOptions {
                    leave: Leave::Killed,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        mode => {
            let t = Instant::now();
            let r = restore(
                std::path::Path::new(&args[1]),
                &RestoreOptions {
                    detach: true,
                    // Runs at once; memory filled on demand and in the background.
                    lazy: mode == "restore-lazy",
                    ..Default::default()
                },
            )
            .unwrap();
            let mut v = serde_json::to_value(r).unwrap();
            v["wall_s"] = json!(t.elapsed().as_secs_f64());
            Ok(v)
        }
    }
    .unwrap();
    let mut rep = rep;
    rep["vmhwm_kb"] = json!(vmhwm_kb());
    println!("{rep}");
}

/// Kill a restored process and reap it (we are its subreaper).
fn kill_reap(r: &Value) {
    let pid = r["pid"].as_i64().unwrap_or(0) as i32;
    if pid <= 0 {
        return;
    }
    // SAFETY: kill and waitpid on a PID of ours; waitpid writes only `st`.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

fn run_child(args: &[&str]) -> Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "child {args:?} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(&args[1..]);
    }
    // Restored processes outlive the child that restored them: adopt them, so that once
    // killed they can be reaped and their PID is free for the next restore.
    // SAFETY: prctl with integer arguments; it changes only this process's reaping.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let sizes: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![256, 1024, 4096]
    } else {
        sizes
    };
    // This kind of VM pays ~3 s/GiB the first time the guest touches memory it never used
    // (host-side faults); warm 3x the largest size once so the figures measure Ferry.
    let warm = (sizes.iter().max().copied().unwrap_or(0) as usize * 3) << 20;
    let t = Instant::now();
    first_touch_bound(warm);
    eprintln!(
        "warmed {} MiB of guest memory in {:.2} s",
        warm >> 20,
        t.elapsed().as_secs_f64()
    );
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("dirty.c");
    std::fs::write(&src, FIXTURE).unwrap();
    let bin = dir.join("dirty");
    assert!(Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap()
        .success());
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "MiB",
        "frozen ms",
        "memory ms",
        "dump GB/s",
        "pvr GB/s",
        "shm GB/s",
        "dump/bnd",
        "restore s",
        "pages s",
        "touch s",
        "rest/tch",
        "dump HWM",
        "rest HWM"
    );
    println!(
        "(shm: writing as many bytes to a new tmpfs file; dump/bnd: dump GB/s over the lower \
         of pvr and shm)"
    );
    println!(
        "(HWM: peak resident memory of the dumping / restoring process, MiB; the restorer's \
         includes the image's pages.fimg, which it maps read-only from the page cache)"
    );
    let images = std::path::PathBuf::from(
        std::env::var("FERRY_BENCH_IMAGES").unwrap_or_else(|_| "/dev/shm".into()),
    );
    println!("(images in {})", images.display());
    for mib in sizes {
        let mut c = Command::new(&bin)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = u64::from_str_radix(line.trim().trim_start_matches("ready 0x"), 16).unwrap();
        let pvr = pvr_bound(pid, addr, mib << 20);
        let shm = tmpfs_write_bound(&images, (mib << 20) as usize);
        let img = images.join(format!("ferry-bench-{}-{mib}", std::process::id()));
        let _ = std::fs::remove_dir_all(&img);
        let d = run_child(&["dump", &pid.to_string(), img.to_str().unwrap()]);
        c.wait().unwrap();
        let r = run_child(&["restore", img.to_str().unwrap()]);
        kill_reap(&r);
        let lz = run_child(&["restore-lazy", img.to_str().unwrap()]);
        kill_reap(&lz);
        let touch = first_touch_bound((mib << 20) as usize);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let rs = f(&r, "wall_s");
        println!(
            "{mib:>6} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>8.1} {:>8.1}",
            f(&d, "frozen_ms"),
            f(&d, "memory_ms"),
            f(&d, "gb_per_s"),
            pvr,
            shm,
            f(&d, "gb_per_s") / pvr.min(shm),
            rs,
            f(&r, "pages_ms") / 1e3,
            touch,
            rs / touch,
            f(&d, "vmhwm_kb") / 1024.0,
            f(&r, "vmhwm_kb") / 1024.0,
        );
        eprintln!(
            "  restore phases (ms): verify {:.1} layout {:.1} pages {:.1} rest {:.1}",
            f(&r, "verify_ms"),
            f(&r, "layout_ms"),
            f(&r, "pages_ms"),
            f(&r, "rest_ms")
        );
        println!(
            "{mib:>6}   lazy restore: running after {:.3} s ({:.2} of the eager restore), \
             memory whole {:.3} s later ({} faults served)",
            f(&lz, "restore_ms") / 1e3,
            f(&lz, "restore_ms") / 1e3 / rs,
            lz["fill"]["fill_ms"].as_f64().unwrap_or(f64::NAN) / 1e3,
            lz["fill"]["faults"]
        );
        let _ = std::fs::remove_dir_all(&img);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
