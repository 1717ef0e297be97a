//! Dump and restore speed of a server: Debian's redis-server on 127.0.0.1 holding about
//! `--gib` GiB of data, with `--conns` client TCP connections held open by this process (issue
//! 4, "Speed"). The same run is made with no client connection, so that the cost of the
//! connections shows as a difference, and the restore's own socket phase is timed directly
//! (`RestoreReport::sockets_ms`). Beside them, bounds measured in the same run: process_vm_readv
//! of redis's memory, first touch of fresh anonymous memory, and the bare kernel cost of
//! creating, repairing (TCP_REPAIR bind + connect) and closing a socket. After each restore,
//! every connection must still answer PING and a few GETs must return the values written.
//! Images go to /dev/shm. Figures only: failures are counted, not asserted.
//!
//! cargo run --release -p ferry-engine --example server_bench [-- --gib 1 --conns 1000
//!     --reps 1 --json]

use ferry_engine::dump::Leave;
use ferry_engine::{dump, restore, DumpOptions, DumpReport, RestoreOptions, RestoreReport};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VALUE_LEN: usize = 16 << 10;
const PIPELINE: usize = 64;

struct Args {
    gib: f64,
    conns: usize,
    reps: usize,
    json: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        gib: 1.0,
        conns: 1000,
        reps: 1,
        json: false,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = |i: usize| {
            v.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value", v[i]))
        };
        match v[i].as_str() {
            "--gib" => a.gib = next(i).parse().expect("--gib F"),
            "--conns" => a.conns = next(i).parse().expect("--conns N"),
            "--reps" => a.reps = next(i).parse().expect("--reps N"),
            "--json" => {
                a.json = true;
                i += 1;
                continue;
            }
            o => panic!("unknown argument {o:?} (--gib F --conns N --reps N --json)"),
        }
        i += 2;
    }
    a
}

/// What to clean up whatever happens: redis processes (our children, killed and reaped),
/// image directories, and a traffic block a failed dump or restore may have left.
#[derive(Default)]
struct Guard {
    pids: Vec<i32>,
    dirs: Vec<PathBuf>,
}

impl Guard {
    fn kill(&mut self, pid: i32) {
        kill_reap(pid);
        self.pids.retain(|&p| p != pid);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.pids) {
            kill_reap(pid);
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &format!("ferry_{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn kill_reap(pid: i32) {
    // SAFETY: kill and waitpid have no memory effects beyond the status integer; `pid` is a
    // child of ours (redis as spawned, or as restored), so no other process is reaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// Let redis accept thousands of clients: soft RLIMIT_NOFILE up to the hard limit.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only `r`.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// Fds inherited from the shell (10, 251, ...) must not reach redis: mark them close-on-exec.
fn cloexec_stray_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: F_SETFD only sets a flag on the fd, if it is still open.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn status_kb(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// A minimal RESP client.

fn resp(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One reply: a status/error/integer line as is, or a bulk string's bytes.
fn read_reply(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    if line.first() == Some(&b'$') {
        let n: i64 = std::str::from_utf8(&line[1..])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("bad bulk length"))?;
        if n < 0 {
            return Ok(b"(nil)".to_vec());
        }
        let mut b = vec![0u8; n as usize + 2];
        r.read_exact(&mut b)?;
        b.truncate(n as usize);
        return Ok(b);
    }
    Ok(line)
}

/// The value of key `i`: printable bytes that differ from key to key.
fn value(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

struct Redis {
    child: Child,
    pid: i32,
    port: u16,
    rss_kb: u64,
    keys: usize,
    fill_s: f64,
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// Start redis-server on a free port of 127.0.0.1 and fill it with `bytes` of values.
fn start_redis(g: &mut Guard, dir: &Path, bytes: u64, maxclients: usize) -> Redis {
    let port = free_port();
    cloexec_stray_fds();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--daemonize", "no", "--maxclients", &maxclients.to_string()])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run redis-server (apt-get install redis-server)");
    let pid = child.id() as i32;
    g.pids.push(pid);
    let end = Instant::now() + Duration::from_secs(20);
    let s = loop {
        if let Ok(s) = connect(port) {
            break s;
        }
        assert!(
            Instant::now() < end,
            "redis-server never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    let keys = (bytes as usize).div_ceil(VALUE_LEN);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut buf = Vec::with_capacity(PIPELINE * (VALUE_LEN + 64));
    for base in (0..keys).step_by(PIPELINE) {
        buf.clear();
        let end = (base + PIPELINE).min(keys);
        for i in base..end {
            resp(
                &[b"SET", format!("k:{i}").as_bytes(), &value(i, VALUE_LEN)],
                &mut buf,
            );
        }
        w.write_all(&buf).unwrap();
        for _ in base..end {
            let rep = read_reply(&mut r).unwrap();
            assert_eq!(rep, b"+OK\r\n", "SET: {}", String::from_utf8_lossy(&rep));
        }
    }
    let fill_s = t.elapsed().as_secs_f64();
    Redis {
        child,
        pid,
        port,
        rss_kb: status_kb(pid, "VmRSS:"),
        keys,
        fill_s,
    }
}

/// PING on every connection (all sent, then all read): the number that failed.
fn ping_all(conns: &mut [TcpStream]) -> usize {
    let mut ping = Vec::new();
    resp(&[b"PING"], &mut ping);
    let mut failed = vec![false; conns.len()];
    for (c, f) in conns.iter_mut().zip(failed.iter_mut()) {
        *f = c.write_all(&ping).is_err();
    }
    for (c, f) in conns.iter_mut().zip(failed.iter_mut()) {
        if *f {
            continue;
        }
        let mut line = [0u8; 7];
        *f = !matches!(c.read_exact(&mut line), Ok(()) if &line == b"+PONG\r\n");
    }
    failed.iter().filter(|&&f| f).count()
}

/// GET a few keys, on connections spread over all of them (or a new one): wrong values.
fn check_gets(conns: &mut [TcpStream], port: u16, keys: usize) -> usize {
    let mut own = Vec::new();
    let pool: &mut [TcpStream] = if conns.is_empty() {
        own.push(connect(port).unwrap());
        &mut own
    } else {
        conns
    };
    let mut bad = 0;
    for j in 0..8usize {
        let i = (j * 7919) % keys;
        let n = pool.len();
        let c = &mut pool[(j * 131) % n];
        let mut req = Vec::new();
        resp(&[b"GET", format!("k:{i}").as_bytes()], &mut req);
        let ok = c.write_all(&req).is_ok()
            && c.try_clone()
                .ok()
                .and_then(|s| read_reply(&mut BufReader::with_capacity(1, s)).ok())
                .is_some_and(|v| v == value(i, VALUE_LEN));
        bad += usize::from(!ok);
    }
    bad
}

/// process_vm_readv of the present pages of redis's private writable anonymous mappings (the
/// runs pagemap shows, found before the clock starts), at most 4 MiB per call into one
/// buffer: (bytes, GB/s). What the dump must read, without the rest of its work.
fn pvr_bound(pid: i32) -> (u64, f64) {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let anon = f.len() < 6 || f[5] == "[heap]";
        if !(f[1].starts_with("rw") && f[1].ends_with('p') && anon) {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut ent = vec![0u8; ((end - start) / 4096 * 8) as usize];
        if pagemap.read_exact_at(&mut ent, start / 4096 * 8).is_err() {
            continue;
        }
        for (i, e) in ent.chunks_exact(8).enumerate() {
            if u64::from_ne_bytes(e.try_into().unwrap()) >> 63 == 0 {
                continue;
            }
            let a = start + i as u64 * 4096;
            match runs.last_mut() {
                Some((s, e)) if *e == a && *e - *s < 4 << 20 => *e += 4096,
                _ => runs.push((a, a + 4096)),
            }
        }
    }
    let mut buf = vec![0u8; 4 << 20];
    buf.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let t = Instant::now();
    let mut total = 0u64;
    for (start, end) in runs {
        let n = (end - start) as usize;
        if let Ok(got) = ferry_sys::mem::read_mem(pid, start, &mut buf[..n]) {
            total += got as u64;
        }
    }
    (total, total as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Seconds to touch every page of `len` bytes of fresh anonymous memory.
fn first_touch(len: usize) -> f64 {
    let t = Instant::now();
    let mut v: Vec<u8> = Vec::with_capacity(len);
    let p = v.spare_capacity_mut();
    for i in (0..len).step_by(4096) {
        p[i].write(1);
    }
    let s = t.elapsed().as_secs_f64();
    drop(v);
    s
}

fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut a = Vec::with_capacity(16);
    a.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    a.extend_from_slice(&port.to_be_bytes());
    a.extend_from_slice(&ip);
    a.extend_from_slice(&[0; 8]);
    a
}

/// The bare kernel work of rebuilding `n` connections, µs per socket: (socket + close,
/// socket + TCP_REPAIR + bind + connect + close). Closed in repair mode, they send nothing.
fn socket_bounds(n: usize) -> (f64, f64) {
    let tcp = |_: ()| ferry_sys::net::socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
    let t = Instant::now();
    let v: Vec<_> = (0..n).map(|_| tcp(())).collect();
    drop(v);
    let plain = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // A port nothing listens on: no packet goes out anyway.
    let peer = sockaddr_in([127, 0, 0, 1], free_port());
    let t = Instant::now();
    let v: Vec<_> = (0..n)
        .map(|_| {
            let s = tcp(());
            ferry_sys::net::set_repair(&s, true).unwrap();
            ferry_sys::net::bind(&s, &sockaddr_in([127, 0, 0, 1], 0)).unwrap();
            ferry_sys::net::connect(&s, &peer).unwrap();
            s
        })
        .collect();
    drop(v);
    let repaired = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    (plain, repaired)
}

/// One dump and restore of a fresh redis with `n` extra connections.
struct Run {
    conns: usize,
    rss_kb: u64,
    keys: usize,
    fill_s: f64,
    pvr_bytes: u64,
    pvr_gbs: f64,
    dump: DumpReport,
    restore: RestoreReport,
    restore_wall_ms: f64,
    ping_failed_before: usize,
    ping_failed: usize,
    get_failed: usize,
}

fn one_run(g: &mut Guard, bytes: u64, n: usize, tag: &str) -> Run {
    let dir = Path::new("/dev/shm").join(format!("ferry-sbench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    g.dirs.push(dir.clone());
    let mut redis = start_redis(g, &dir, bytes, n + 64);
    let mut conns: Vec<TcpStream> = (0..n)
        .map(|i| connect(redis.port).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let ping_failed_before = ping_all(&mut conns);
    let (pvr_bytes, pvr_gbs) = pvr_bound(redis.pid);
    let img = dir.join("img");
    let d = dump(
        redis.pid,
        &img,
        &DumpOptions {
            leave: Leave::Killed,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("dump of redis {}: {e}", redis.pid));
    // Killed by the dump: reap it so that its PID is free for the restore
    // (The dump, its tracer and our parent, may have reaped it already.)
    let _ = redis.child.wait();
    g.pids.retain(|&p| p != redis.pid);
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", redis.pid)).exists() {
        assert!(Instant::now() < end, "redis {} never went away", redis.pid);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Restored redis is a child of ours: the guard kills it.
    g.pids.push(redis.pid);
    let t = Instant::now();
    let r = restore(
        &img,
        &RestoreOptions {
            detach: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("restore of redis {}: {e}", redis.pid));
    let restore_wall_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.pid, redis.pid);
    let ping_failed = ping_all(&mut conns);
    let get_failed = check_gets(&mut conns, redis.port, redis.keys);
    drop(conns);
    g.kill(redis.pid);
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        conns: n,
        rss_kb: redis.rss_kb,
        keys: redis.keys,
        fill_s: redis.fill_s,
        pvr_bytes,
        pvr_gbs,
        dump: d,
        restore: r,
        restore_wall_ms,
        ping_failed_before,
        ping_failed,
        get_failed,
    }
}

fn run_json(r: &Run) -> Value {
    json!({
        "conns": r.conns,
        "keys": r.keys,
        "rss_mib": r.rss_kb as f64 / 1024.0,
        "fill_s": r.fill_s,
        "pvr_bytes": r.pvr_bytes,
        "pvr_gb_per_s": r.pvr_gbs,
        "dump": serde_json::to_value(&r.dump).unwrap(),
        "restore": serde_json::to_value(&r.restore).unwrap(),
        "restore_wall_ms": r.restore_wall_ms,
        "ping_failed_before_dump": r.ping_failed_before,
        "ping_failed": r.ping_failed,
        "get_failed": r.get_failed,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    let a = parse_args();
    let bytes = (a.gib * (1u64 << 30) as f64) as u64;
    let nofile = raise_nofile();
    assert!(
        a.conns + 200 < nofile as usize,
        "RLIMIT_NOFILE {nofile} is too low for {} connections",
        a.conns
    );
    let mut g = Guard::default();
    // Guest memory this VM never used costs far more on first touch (host faults): warm it
    // once so that the figures measure Ferry and the kernel.
    let t = Instant::now();
    first_touch((bytes as usize) * 3);
    eprintln!(
        "warmed {:.0} MiB of memory in {:.2} s; load average {}",
        (bytes * 3) as f64 / 1048576.0,
        t.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut runs: Vec<Run> = Vec::new();
    let mut touch = Vec::new();
    let mut sock_bounds = Vec::new();
    for rep in 0..a.reps {
        for n in [0, a.conns] {
            eprintln!("rep {rep}: redis with {n} connections");
            let r = one_run(&mut g, bytes, n, &format!("{rep}-{n}"));
            eprintln!(
                "  {} keys in {:.1} s, RSS {:.0} MiB; frozen {:.1} ms, restore {:.1} ms \
                 (sockets {} in {:.2} ms); failures: ping {} get {}",
                r.keys,
                r.fill_s,
                r.rss_kb as f64 / 1024.0,
                r.dump.frozen_ms,
                r.restore.restore_ms,
                r.restore.sockets,
                r.restore.sockets_ms,
                r.ping_failed,
                r.get_failed
            );
            runs.push(r);
        }
        touch.push(first_touch(bytes as usize));
        sock_bounds.push(socket_bounds(a.conns.max(1)));
    }
    let pick = |n: usize, f: &dyn Fn(&Run) -> f64| {
        median(runs.iter().filter(|r| r.conns == n).map(f).collect())
    };
    let nc = a.conns;
    let touch_s = median(touch.clone());
    let sock_plain = median(sock_bounds.iter().map(|b| b.0).collect());
    let sock_repair = median(sock_bounds.iter().map(|b| b.1).collect());
    let rss = pick(nc, &|r| r.rss_kb as f64 / 1024.0);
    let data_gib = bytes as f64 / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    for n in [0, nc] {
        let f = |k: &dyn Fn(&Run) -> f64| pick(n, k);
        let restore_ms = f(&|r| r.restore.restore_ms);
        let dump_gbs = f(&|r| r.dump.gb_per_s);
        let pvr = f(&|r| r.pvr_gbs);
        rows.push(json!({
            "conns": n,
            "rss_mib": f(&|r| r.rss_kb as f64 / 1024.0),
            "frozen_ms": f(&|r| r.dump.frozen_ms),
            "dump_memory_ms": f(&|r| r.dump.memory_ms),
            "dump_collect_ms": f(&|r| r.dump.collect_ms),
            "dump_gb_per_s": dump_gbs,
            "pvr_gb_per_s": pvr,
            "dump_over_pvr": dump_gbs / pvr,
            "restore_ms": restore_ms,
            "verify_ms": f(&|r| r.restore.verify_ms),
            "layout_ms": f(&|r| r.restore.layout_ms),
            "pages_ms": f(&|r| r.restore.pages_ms),
            "rest_ms": f(&|r| r.restore.rest_ms),
            "sockets": f(&|r| r.restore.sockets as f64),
            "sockets_ms": f(&|r| r.restore.sockets_ms),
            "unblock_ms": f(&|r| r.restore.unblock_ms),
            "touch_ms": touch_s * 1e3,
            "restore_over_touch": restore_ms / (touch_s * 1e3),
            "ping_failed": runs.iter().filter(|r| r.conns == n).map(|r| r.ping_failed).sum::<usize>(),
            "get_failed": runs.iter().filter(|r| r.conns == n).map(|r| r.get_failed).sum::<usize>(),
        }));
    }
    let v = |row: &Value, k: &str| row[k].as_f64().unwrap_or(f64::NAN);
    let (r0, rn) = (&rows[0], &rows[1]);
    let nf = nc.max(1) as f64;
    let diff_us = (v(rn, "restore_ms") - v(r0, "restore_ms")) * 1e3 / nf;
    let frozen_diff_us = (v(rn, "frozen_ms") - v(r0, "frozen_ms")) * 1e3 / nf;
    // Sockets timed in the restore: the N connections plus the listener(s) both runs have.
    let sock_direct_us = (v(rn, "sockets_ms") - v(r0, "sockets_ms")) * 1e3 / nf;
    let summary = json!({
        "data_gib": data_gib,
        "value_bytes": VALUE_LEN,
        "conns": nc,
        "reps": a.reps,
        "rss_mib": rss,
        "first_touch_s": touch_s,
        "socket_create_close_us": sock_plain,
        "socket_repair_bind_connect_close_us": sock_repair,
        "rows": rows,
        "per_conn_restore_us_by_difference": diff_us,
        "per_conn_restore_us_socket_phase": sock_direct_us,
        "sockets_per_s_by_difference": 1e6 / diff_us,
        "sockets_per_s_socket_phase": 1e6 / sock_direct_us,
        "per_conn_frozen_us_by_difference": frozen_diff_us,
        "conns_add_restore_ms": v(rn, "restore_ms") - v(r0, "restore_ms"),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{summary:#}");
        return;
    }
    println!(
        "redis-server, {data_gib:.2} GiB of {} KiB values, RSS {rss:.0} MiB; images on /dev/shm; \
         {} rep(s), medians",
        VALUE_LEN >> 10,
        a.reps
    );
    println!(
        "{:>6} {:>9} {:>9} {:>8} {:>8} {:>9} {:>35} {:>8} {:>8} {:>9} {:>8}",
        "conns",
        "frozen ms",
        "dump GB/s",
        "pvr GB/s",
        "dump/pvr",
        "restore ms",
        "(verify layout pages rest)",
        "socks ms",
        "touch ms",
        "rest/tch",
        "failures"
    );
    for row in &rows {
        println!(
            "{:>6} {:>9.1} {:>9.2} {:>8.2} {:>8.2} {:>9.1}  ({:>7.1} {:>6.1} {:>6.1} {:>7.1}) {:>8.2} {:>8.1} {:>9.2} {:>8}",
            row["conns"].as_u64().unwrap_or(0),
            v(row, "frozen_ms"),
            v(row, "dump_gb_per_s"),
            v(row, "pvr_gb_per_s"),
            v(row, "dump_over_pvr"),
            v(row, "restore_ms"),
            v(row, "verify_ms"),
            v(row, "layout_ms"),
            v(row, "pages_ms"),
            v(row, "rest_ms"),
            v(row, "sockets_ms"),
            v(row, "touch_ms"),
            v(row, "restore_over_touch"),
            row["ping_failed"].as_u64().unwrap_or(0) + row["get_failed"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "per connection: restore +{diff_us:.1} us ({:.0}/s) by difference of the runs, socket \
         phase {sock_direct_us:.1} us ({:.0}/s); frozen +{frozen_diff_us:.1} us",
        1e6 / diff_us,
        1e6 / sock_direct_us
    );
    println!(
        "bound per socket: socket+close {sock_plain:.2} us, socket+TCP_REPAIR+bind+connect+close \
         {sock_repair:.2} us; socket phase / bound {:.1}",
        sock_direct_us / sock_repair
    );
    println!(
        "{nc} connections add {:.1} ms to the restore and {:.1} ms to the frozen time; \
         connection check failures: {} (ping before the dump: {})",
        v(rn, "restore_ms") - v(r0, "restore_ms"),
        v(rn, "frozen_ms") - v(r0, "frozen_ms"),
        runs.iter()
            .map(|r| r.ping_failed + r.get_failed)
            .sum::<usize>(),
        runs.iter().map(|r| r.ping_failed_before).sum::<usize>(),
    );
    let _ = std::io::stdout().flush();
    drop(g);
}
