//! Dump and restore speed: a process with N MiB of dirtied anonymous memory, images on tmpfs
//! (/dev/shm). Prints frozen time, dump GB/s and restore time beside the process_vm_readv and
//! first-touch bounds measured in the same run. Figures only, no assertions.
//!
//! cargo run --release -p ferry-engine --example dump_bench [MiB ...]   (default 256 1024 2048)

use ferry_engine::dump::Leave;
use ferry_engine::{dump, restore, DumpOptions, RestoreOptions};
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

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect::<Vec<_>>();
    let sizes = if sizes.is_empty() {
        vec![256, 1024, 2048]
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
        "{:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9}",
        "MiB",
        "memory ms",
        "verify ms",
        "frozen ms",
        "dump GB/s",
        "pvr GB/s",
        "dump/pvr",
        "restore s",
        "1st-touch s",
        "ratio"
    );
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
        let img = std::path::Path::new("/dev/shm")
            .join(format!("ferry-bench-{}-{mib}", std::process::id()));
        let _ = std::fs::remove_dir_all(&img);
        let d = dump(
            pid,
            &img,
            &DumpOptions {
                leave: Leave::Killed,
                ..Default::default()
            },
        )
        .unwrap();
        c.wait().unwrap();
        let t = Instant::now();
        let r = restore(
            &img,
            &RestoreOptions {
                detach: true,
                ..Default::default()
            },
        )
        .unwrap();
        let rs = t.elapsed().as_secs_f64();
        // SAFETY-free cleanup through the kill command.
        let _ = Command::new("kill")
            .arg("-9")
            .arg(r.pid.to_string())
            .status();
        let touch = first_touch_bound((mib << 20) as usize);
        println!(
            "{mib:>6} {:>10.1} {:>10.1} {:>9.1} {:>9.2} {:>9.2} {:>10.2} {:>9.3} {:>11.3} {:>9.2}",
            d.memory_ms,
            d.verify_ms,
            d.frozen_ms,
            d.gb_per_s,
            pvr,
            d.gb_per_s / pvr,
            rs,
            touch,
            rs / touch
        );
        let _ = std::fs::remove_dir_all(&img);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
