//! Benchmark of `ferry cpu` scans: decode throughput beside the bare decoder's, and the time of
//! `paths` and `full` scans of a running redis-server and python3. Prints figures (medians of
//! several runs) and ratios; asserts nothing.
//!
//! cargo run --release -p ferry-cpu --example scan_bench

use ferry_cpu::binary::scan_binary;
use ferry_cpu::process::scan_process;
use ferry_cpu::scan::Mode;
use iced_x86::{Decoder, DecoderOptions, Instruction};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut ts = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        ts.push(t.elapsed().as_secs_f64());
    }
    (median(ts), last.unwrap())
}

fn main() {
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    // Bound: iced's decoder alone over libc's code.
    let data = std::fs::read(libc).unwrap();
    let info = ferry_cpu::elfinfo::ElfInfo::parse(&data).unwrap();
    let seg = info.segments.iter().find(|s| s.exec).unwrap();
    let code = &data[seg.offset as usize..(seg.offset + seg.filesz) as usize];
    let (t_bare, n) = time(5, || {
        let mut d = Decoder::with_ip(64, code, seg.vaddr, DecoderOptions::NONE);
        let mut i = Instruction::default();
        let mut n = 0u64;
        while d.can_decode() {
            d.decode_out(&mut i);
            n += 1;
        }
        n
    });
    let (t_full, s) = time(5, || {
        scan_binary(std::path::Path::new(libc), Mode::Full).unwrap()
    });
    let bare = code.len() as f64 / t_bare / 1e6;
    let ours = s.result.stats.code_bytes_decoded as f64 / t_full / 1e6;
    println!(
        "decode: libc text {} KiB, {n} instructions",
        code.len() / 1024
    );
    println!("  bare iced decode        {bare:8.1} MB/s  (bound)");
    println!(
        "  ferry full scan         {ours:8.1} MB/s  ({:.2} of the bound; includes ELF parsing, features, evidence)",
        ours / bare
    );

    let mut targets: Vec<(&str, std::process::Child)> = Vec::new();
    if let Ok(c) = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(std::env::temp_dir().join(format!("ferry-bench-{}.sock", std::process::id())))
        .stdout(Stdio::null())
        .spawn()
    {
        targets.push(("redis-server", c));
    }
    if let Ok(c) = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json,hashlib,zlib,time,threading; time.sleep(3600)",
        ])
        .spawn()
    {
        targets.push(("python3", c));
    }
    std::thread::sleep(Duration::from_millis(700));
    println!("scans of running processes (median of 7):");
    for (name, c) in &mut targets {
        let pid = c.id() as i32;
        for mode in [Mode::Paths, Mode::Full] {
            let (t, s) = time(7, || scan_process(pid, mode).unwrap());
            println!(
                "  {name:<13} {:<5} {:7.1} ms  frozen {:6.2} ms  {:>7} insns  {:>6} KiB code  {:>6} KiB data scanned  {} features",
                format!("{mode:?}").to_lowercase(),
                t * 1e3,
                s.frozen_ms,
                s.result.stats.instructions,
                s.result.stats.code_bytes_decoded / 1024,
                s.result.stats.data_bytes_scanned / 1024,
                s.result.features.len()
            );
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
