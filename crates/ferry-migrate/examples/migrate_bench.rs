//! Live-migration benchmark: a process rewriting its memory at a set rate is moved to an
//! agent on this machine (in a PID namespace of its own), by stop-and-copy and by pre-copy,
//! for several sizes and dirty rates. Prints downtime, total time, rounds and bytes beside
//! the loopback TCP bandwidth measured in the same run, and beside the least work any
//! migration does with that memory (read out of a process, sent over loopback, written into
//! fresh memory), also measured in the same run.
//!
//! `cargo build --release && cargo run --release -p ferry-migrate --example migrate_bench
//! [-- SIZE_MIB ...]` (default 256 1024). `FERRY_BENCH_MODES` and `FERRY_BENCH_RATES` pick
//! modes and rates (comma-separated), `FERRY_BENCH_JSON=FILE` appends each report to FILE,
//! `FERRY_BENCH_PREPARE=1` prepares each migration first (`ferry migrate --prepare-only`).
//! Needs musl-gcc (the workload is the tests'
//! `dirtier` fixture) and the `ferry` binary in target/release.

use ferry_migrate::source::{migrate, MigrateOptions, Mode};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";

fn loopback_gbps() -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let total = 2usize << 30;
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < total {
            n += s.read(&mut buf).unwrap();
        }
    });
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let buf = vec![1u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..total >> 20 {
        c.write_all(&buf).unwrap();
    }
    h.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The least work any live migration does with `mib` MiB of memory, timed on this machine
/// now: read it out of a process (process_vm_readv), send it over loopback TCP, and write it
/// into fresh memory on the far side, on two threads as a source and its agent do. Returns
/// GB/s. On this VM the fresh memory, not the link, sets the pace.
fn pipeline_gbps(mib: usize) -> f64 {
    let total = mib << 20;
    let src = vec![1u8; total];
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Zeroed by the kernel on first touch, not by the allocator: fresh memory.
        let mut dst = vec![0u8; total];
        for chunk in dst.chunks_mut(1 << 20) {
            s.read_exact(chunk).unwrap();
        }
        dst
    });
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let me = std::process::id() as i32;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for at in (0..total).step_by(1 << 20) {
        let n = ferry_sys::mem::read_mem(me, src.as_ptr() as u64 + at as u64, &mut buf).unwrap();
        c.write_all(&buf[..n]).unwrap();
    }
    let dst = h.join().unwrap();
    let gbps = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    assert!(dst[total - 1] == 1);
    gbps
}

struct Agent {
    unshare: Child,
    port: u16,
}

impl Agent {
    fn start(ferry: &Path, dir: &Path, port: u16) -> Agent {
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(ferry)
            .args([
                "agent",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token-file",
            ])
            .arg(dir.join("token"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "agent did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { unshare, port }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let p = self.unshare.id();
        if let Some(init) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<i32>().ok())
            })
        {
            // SAFETY: kill(2) has no memory effects. The agent is PID 1 of its namespace.
            unsafe {
                libc::kill(init, libc::SIGKILL);
            }
        }
        let _ = self.unshare.wait();
    }
}

/// Whether `what` is in the comma-separated list of environment variable `var` (all when
/// it is unset): `FERRY_BENCH_MODES=precopy,postcopy`, `FERRY_BENCH_RATES=idle,max`.
fn wanted(var: &str, what: &str) -> bool {
    std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == what))
}

fn main() {
    let sizes: Vec<u64> = {
        let v: Vec<u64> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if v.is_empty() {
            vec![256, 1024]
        } else {
            v
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ferry = root.join("target/release/ferry");
    assert!(ferry.exists(), "build ferry first: cargo build --release");
    // tmpfs, as an agent's state directory should be (see docs/api.md).
    let dir = std::path::Path::new("/dev/shm")
        .join(format!("ferry-migrate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("dirtier");
    let st = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(root.join("crates/ferry/tests/fixtures/dirtier.c"))
        .status()
        .expect("musl-gcc");
    assert!(st.success());
    // This kind of VM pays seconds per GiB the first time the guest touches memory it never
    // used (host-side faults, ~0.3 GB/s): the destination's copy of a 4 GiB process would
    // measure that, not Ferry. Warm 3x the largest size once (source, destination, spare).
    let warm = (sizes.iter().max().copied().unwrap_or(0) as usize * 3) << 20;
    let t = Instant::now();
    {
        let mut v: Vec<u8> = Vec::with_capacity(warm);
        let p = v.as_mut_ptr();
        for i in (0..warm).step_by(4096) {
            // SAFETY: `i` is inside the capacity just allocated; a volatile write is one the
            // compiler cannot drop, and u8 has no invalid values.
            unsafe { p.add(i).write_volatile(1) };
        }
    }
    println!(
        "warmed {} MiB of guest memory in {:.2} s",
        warm >> 20,
        t.elapsed().as_secs_f64()
    );
    let bw = loopback_gbps();
    println!("loopback TCP, one stream: {bw:.2} GB/s (measured now)");
    println!(
        "{:>6} {:>8} {:>9} {:>7} {:>12} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10}",
        "MiB",
        "dirty",
        "mode",
        "rounds",
        "downtime ms",
        "total ms",
        "gate ms",
        "sent MiB",
        "final MiB",
        "post MiB",
        "fill ms",
        "total/bound",
        "total/pipe"
    );
    let mut port = 46000 + (std::process::id() % 1000) as u16 * 4;
    // The writer's pace: a pause between groups of 16 page writes in microseconds (0: as
    // fast as it can), or rN for N MB/s of page writes.
    for &mib in &sizes {
        let pipe = pipeline_gbps(mib as usize);
        println!(
            "{mib} MiB read from a process, sent over loopback and written into fresh memory: \
             {pipe:.2} GB/s (measured now; total/pipe is the total over that time)"
        );
        for (rate, pause) in [
            ("idle", "10000000"),
            ("50MB/s", "r50"),
            ("200MB/s", "r200"),
            ("800MB/s", "r800"),
            ("max", "0"),
        ] {
            if !wanted("FERRY_BENCH_RATES", rate) {
                continue;
            }
            for mode in [Mode::Stop, Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
                if !wanted("FERRY_BENCH_MODES", &format!("{mode:?}").to_lowercase()) {
                    continue;
                }
                port += 4;
                let agent = Agent::start(&ferry, &dir, port);
                let mut w = Command::new(&bin)
                    .args([&mib.to_string(), pause])
                    .stdout(Stdio::piped())
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap();
                let mut line = [0u8; 6];
                w.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                let mut o = MigrateOptions {
                    pid: w.id() as i32,
                    to: format!("http://127.0.0.1:{}", agent.port),
                    token: Some(TOKEN.into()),
                    mode,
                    max_downtime_ms: 10.0,
                    force: false,
                    max_rounds: 30,
                    move_addresses: vec![],
                    io_timeout: Duration::from_secs(30),
                    throttle: true,
                    tls: None,
                    prepared: None,
                };
                // Prepared ahead, as a planned move would be: the destination's memory for
                // pre-copy is made resident before the migration starts (not timed).
                if std::env::var_os("FERRY_BENCH_PREPARE").is_some() {
                    match ferry_migrate::source::prepare(&o) {
                        Ok(c) => o.prepared = Some(c.id),
                        Err(e) => println!("{mib:>6} {rate:>8} {mode:?}: preparing failed: {e}"),
                    }
                }
                match migrate(&o, &|_| {}) {
                    Ok(r) => {
                        if let Ok(path) = std::env::var("FERRY_BENCH_JSON") {
                            use std::io::Write;
                            let mut f = std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(path)
                                .unwrap();
                            writeln!(f, "{}", serde_json::to_string(&r).unwrap()).unwrap();
                        }
                        let bound_ms = (mib << 20) as f64 / (bw * 1e9) * 1e3;
                        println!(
                            "{:>6} {:>8} {:>9} {:>7} {:>12.1} {:>9.0} {:>8.0} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>11.2} {:>10.2}",
                            mib,
                            rate,
                            format!("{mode:?}").to_lowercase(),
                            r.rounds.len(),
                            r.downtime_ms,
                            r.total_ms,
                            r.gate_ms,
                            (r.bytes_sent + r.postcopy_bytes) as f64 / 1048576.0,
                            r.final_bytes as f64 / 1048576.0,
                            r.postcopy_bytes as f64 / 1048576.0,
                            r.fill_ms.unwrap_or(0.0),
                            r.total_ms / bound_ms,
                            r.total_ms / ((mib << 20) as f64 / (pipe * 1e9) * 1e3)
                        );
                    }
                    Err(e) => println!("{mib:>6} {rate:>8} {mode:?}: failed: {e}"),
                }
                let _ = w.kill();
                let _ = w.wait();
                drop(agent);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
