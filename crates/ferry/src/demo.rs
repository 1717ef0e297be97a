//! `ferry demo`: Ferry's main job on one machine. Two hosts and a client made of network
//! namespaces on a bridge, an agent on each host (each in a PID namespace of its own, as on
//! real hosts), a stateful service (redis-server when installed, otherwise a small built-in
//! one) written to continuously by the client over one TCP connection, moved there and back
//! with its address. Everything made is removed at the end, also on failure or Ctrl-C.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Seconds of client traffic before, between and after the two migrations.
    #[arg(long, default_value_t = 1.0)]
    pause: f64,
    /// Use the built-in service even if redis-server is installed.
    #[arg(long)]
    builtin: bool,
    /// Migration mode for every hop: precopy, postcopy, hybrid or stop.
    #[arg(long, default_value = "precopy")]
    mode: String,
    /// Migrations, alternately to host b and back to a (2: there and back).
    #[arg(long, default_value_t = 2)]
    hops: u32,
    /// Fill Redis with about this many MiB of data first (DEBUG POPULATE, 1 KiB values):
    /// the demo as a benchmark of a loaded server.
    #[arg(long, default_value_t = 0)]
    dataset_mib: u64,
    /// Prepare each migration ahead (`ferry migrate --prepare-only`, then `--prepared`): the
    /// destination checks the process and, for pre-copy, makes memory resident for it first.
    #[arg(long)]
    prepare: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ServiceArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Everything the demo made, undone on drop.
#[derive(Default)]
struct Made {
    bridge: Option<String>,
    netns: Vec<String>,
    children: Vec<Child>,
    /// PIDs to SIGKILL (agents are PID 1 of their namespaces: only SIGKILL reaches them).
    kill: Vec<u32>,
    dir: Option<std::path::PathBuf>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for &p in &self.kill {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(p as i32, libc::SIGKILL);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", b]).status();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// One reply line (and a bulk string's body).
fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    let l = l.trim_end().to_string();
    if let Some(n) = l.strip_prefix('$').and_then(|n| n.parse::<i64>().ok()) {
        if n < 0 {
            return Ok(String::new());
        }
        let mut b = vec![0u8; n as usize + 2];
        r.read_exact(&mut b)?;
        b.truncate(n as usize);
        return Ok(String::from_utf8_lossy(&b).to_string());
    }
    Ok(l)
}

fn connect_in(netns: &str, addr: &str) -> Result<TcpStream> {
    let (ns, addr) = (format!("/run/netns/{netns}"), addr.to_string());
    std::thread::spawn(move || -> Result<TcpStream> {
        ferry_sys::net::enter_netns(&ns)?;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(&addr) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > end => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// TCP bandwidth from host namespace `from` to `to_ip` in host namespace `to`: one stream of
/// `bytes`, timed until the receiver has them all. GB/s.
fn link_gbps(from: &str, to: &str, to_ip: &str, bytes: usize) -> Result<f64> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns, ip) = (format!("/run/netns/{to}"), to_ip.to_string());
    let server = std::thread::spawn(move || -> Result<()> {
        ferry_sys::net::enter_netns(&ns)?;
        let l = TcpListener::bind((ip.as_str(), 0))?;
        tx.send(l.local_addr()?.port())?;
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < bytes {
            match s.read(&mut buf)? {
                0 => bail!("the sender closed after {n} bytes"),
                k => n += k,
            }
        }
        s.write_all(b"k")?;
        Ok(())
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .context("the bandwidth test's receiver")?;
    let mut c = connect_in(from, &format!("{to_ip}:{port}"))?;
    let buf = vec![1u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..bytes >> 20 {
        c.write_all(&buf)?;
    }
    let mut k = [0u8; 1];
    c.read_exact(&mut k)?;
    let secs = t.elapsed().as_secs_f64();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("bandwidth receiver panicked"))??;
    Ok(bytes as f64 / secs / 1e9)
}

fn wait_http(addr: &str, token: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        interrupted()?;
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = write!(
                s,
                "GET /v1/host HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            let mut b = String::new();
            if s.read_to_string(&mut b).is_ok()
                && b.split("\r\n").next().unwrap_or("").contains(" 200 ")
            {
                return Ok(());
            }
        }
        if Instant::now() > end {
            bail!("the agent at {addr} did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn demo(a: DemoArgs) -> Result<u8> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    for tool in ["ip", "nsenter", "unshare"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("`{tool}` is missing: install iproute2 and util-linux");
        }
    }
    let me = std::env::current_exe()?;
    let id = std::process::id();
    let net = format!("10.{}.{}", 200 + id % 50, id % 250 + 1);
    let vip = format!("{net}.100");
    let mut made = Made::default();
    // In memory where there is a tmpfs: the agents' state directories receive the whole
    // process, and a disk's write-back would set the pace of the migration.
    let base = match std::path::Path::new("/dev/shm") {
        p if p.is_dir() => p.to_path_buf(),
        _ => std::env::temp_dir(),
    };
    let dir = base.join(format!("ferry-demo-{id}"));
    std::fs::create_dir_all(&dir)?;
    made.dir = Some(dir.clone());
    let token = format!(
        "demo-{id}-{:x}",
        Instant::now().elapsed().as_nanos() ^ 0x9e37_79b9
    );
    std::fs::write(dir.join("token"), &token)?;

    // The link: a bridge, hosts a (.1), b (.2) and a client (.3).
    let bridge = format!("fdemo{}", id % 100000);
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    made.bridge = Some(bridge.clone());
    ip(&["addr", "add", &format!("{net}.254/24"), "dev", &bridge])?;
    ip(&["link", "set", &bridge, "up"])?;
    let names = ["a", "b", "c"];
    for (i, n) in names.iter().enumerate() {
        let ns = format!("ferry-demo-{n}-{id}");
        ip(&["netns", "add", &ns])?;
        made.netns.push(ns.clone());
        let (outer, inner) = (format!("fd{n}{}", id % 100000), format!("eth-{n}"));
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &outer, "master", &bridge])?;
        ip(&["link", "set", &outer, "up"])?;
        ip(&["link", "set", &inner, "netns", &ns])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{net}.{}/24", i + 1),
            "dev",
            &inner,
        ])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    let (ns_a, ns_b, ns_c) = (
        made.netns[0].clone(),
        made.netns[1].clone(),
        made.netns[2].clone(),
    );
    ip(&[
        "-n",
        &ns_a,
        "addr",
        "add",
        &format!("{vip}/24"),
        "dev",
        "eth-a",
    ])?;
    eprintln!("ferry demo: hosts a ({net}.1), b ({net}.2) and a client ({net}.3) on bridge {bridge}; service address {vip}");

    // An agent on each host, in a PID namespace of its own.
    let mut agents = Vec::new();
    for (i, ns) in [&ns_a, &ns_b].iter().enumerate() {
        let listen = format!("{net}.{}:7070", i + 1);
        let log = std::fs::File::create(dir.join(format!("agent-{}.log", names[i])))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "--pid", "--fork", "--mount-proc"])
            .arg(&me)
            .args(["agent", "--listen", &listen, "--token-file"])
            .arg(dir.join("token"))
            .arg("--state-dir")
            .arg(dir.join(format!("state-{}", names[i])))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let unshare = child.id();
        made.children.push(child);
        wait_http(&listen, &token)?;
        let init = first_child(unshare).context("the agent's process")?;
        made.kill.push(init);
        agents.push((listen, init));
    }

    // The link the memory crosses, idle: what the total time of a migration is compared with.
    let link_idle = link_gbps(&ns_a, &ns_b, &format!("{net}.2"), 1 << 30)?;
    eprintln!("ferry demo: link from a to b: {link_idle:.2} GB/s (TCP, one stream, measured now)");

    // The service, on host a.
    let redis = !a.builtin
        && Command::new("sh")
            .args(["-c", "command -v redis-server"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let mut svc = Command::new("nsenter");
    svc.arg(format!("--net=/run/netns/{ns_a}"));
    if redis {
        svc.args([
            "redis-server",
            "--bind",
            &vip,
            "--port",
            "6379",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--protected-mode", "no", "--dir"])
        .arg(&dir);
        if a.dataset_mib > 0 {
            svc.args(["--enable-debug-command", "yes"]);
        }
    } else {
        svc.arg(&me)
            .args(["demo-service", "--listen", &format!("{vip}:6379")]);
    }
    let log = std::fs::File::create(dir.join("service.log"))?;
    let service = svc
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let spid = service.id();
    made.children.push(service);
    eprintln!(
        "ferry demo: {} runs on host a as PID {spid}",
        if redis {
            "redis-server"
        } else {
            "the built-in service"
        }
    );

    if a.dataset_mib > 0 {
        if !redis {
            bail!("--dataset-mib needs redis-server");
        }
        let t = Instant::now();
        let c = connect_in(&ns_c, &format!("{vip}:6379"))?;
        c.set_read_timeout(Some(Duration::from_secs(600)))?;
        let mut w = c.try_clone()?;
        let keys = a.dataset_mib * 1024;
        w.write_all(&resp(&[
            "DEBUG",
            "POPULATE",
            &keys.to_string(),
            "data",
            "1024",
        ]))?;
        let got = reply(&mut BufReader::new(c))?;
        if got != "+OK" {
            bail!("filling redis: {got}");
        }
        eprintln!(
            "ferry demo: {keys} keys of 1 KiB loaded in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    // The client, on its own host: one connection, writing and counting acknowledgements.
    let conn = connect_in(&ns_c, &format!("{vip}:6379"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let acked = Arc::new(AtomicI64::new(-1));
    let worst_us = Arc::new(AtomicU64::new(0));
    // When the slowest write ended, in µs since `epoch`.
    let epoch = Instant::now();
    let worst_at = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, worst_us, stop) = (acked.clone(), worst_us.clone(), stop.clone());
        let worst_at = worst_at.clone();
        let mut w = conn.try_clone()?;
        let mut r = BufReader::new(conn.try_clone()?);
        std::thread::spawn(move || -> Result<()> {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                w.write_all(&resp(&["SET", &format!("w:{n}"), &n.to_string()]))?;
                let got = reply(&mut r)?;
                if got != "+OK" {
                    bail!("write {n}: {got}");
                }
                let took = t.elapsed().as_micros() as u64;
                if worst_us.fetch_max(took, Ordering::Relaxed) < took {
                    worst_at.store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                acked.store(n, Ordering::SeqCst);
                n += 1;
            }
            Ok(())
        })
    };
    let pause = || -> Result<()> {
        let end = Instant::now() + Duration::from_secs_f64(a.pause);
        while Instant::now() < end {
            interrupted()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    pause()?;
    // The same link while the service and its client run: on this machine the link is CPU
    // (loopback through veth), which the workload shares with the migration.
    let link_busy = link_gbps(&ns_a, &ns_b, &format!("{net}.2"), 512 << 20)?;
    eprintln!(
        "ferry demo: link from a to b with the client writing: {link_busy:.2} GB/s (idle {link_idle:.2})"
    );
    pause()?;

    // There and back (and again, with --hops).
    let mut reports = Vec::new();
    let legs = [
        (&agents[1].0, Some(agents[0].1)),
        (&agents[0].0, Some(agents[1].1)),
    ];
    for hop in 0..a.hops as usize {
        let (to, mut from_ns_init) = legs[hop % 2];
        if hop == 0 {
            // The service started outside any agent's PID namespace.
            from_ns_init = None;
        }
        interrupted()?;
        let before = acked.load(Ordering::SeqCst);
        worst_us.store(0, Ordering::Relaxed);
        let migrate = || {
            let mut m = match from_ns_init {
                // From host b, `ferry migrate` runs in b's PID namespace, where the process is.
                Some(init) => {
                    let mut c = Command::new("nsenter");
                    c.args(["-t", &init.to_string(), "--pid", "--mount"])
                        .arg(&me);
                    c
                }
                None => Command::new(&me),
            };
            m.args([
                "migrate",
                "--pid",
                &spid.to_string(),
                "--to",
                &format!("http://{to}"),
            ])
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(["--json", "--mode", &a.mode]);
            m
        };
        // A `ferry migrate` run's JSON report, or why it failed.
        let report = |mut c: Command, what: &str| -> Result<serde_json::Value> {
            let out = c.output()?;
            if !out.status.success() {
                bail!(
                    "{what} {} failed: {}",
                    hop + 1,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let mut prepared = None;
        if a.prepare {
            let t = std::time::Instant::now();
            let mut c = migrate();
            c.arg("--prepare-only");
            let p = report(c, "preparing migration")?;
            // The client's slowest write while preparing, apart from the migration's.
            let stall = worst_us.swap(0, Ordering::Relaxed) as f64 / 1e3;
            eprintln!(
                "ferry demo: prepared on {to} in {:.0} ms: memory {} ({:.0} MiB); the client's \
                 slowest write meanwhile took {stall:.1} ms",
                t.elapsed().as_secs_f64() * 1e3,
                p["prepared"]["memory"].as_str().unwrap_or("?"),
                p["prepared"]["memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
            );
            prepared = Some((
                p["id"].as_str().unwrap_or_default().to_string(),
                t.elapsed().as_secs_f64() * 1e3,
                stall,
            ));
        }
        let started_us = epoch.elapsed().as_micros() as i64;
        let mut m = migrate();
        if let Some((id, _, _)) = &prepared {
            m.args(["--prepared", id]);
        }
        m.args(["--move-address", &format!("{vip}/24")]);
        let r = report(m, "migration")?;
        pause()?;
        let stall = worst_us.load(Ordering::Relaxed) as f64 / 1e3;
        // From the start of `ferry migrate` to the end of that write.
        let stall_at = (worst_at.load(Ordering::Relaxed) as i64 - started_us) as f64 / 1e3;
        // Total time over the least time the resident memory takes to cross the link.
        let total = r["total_ms"].as_f64().unwrap_or(0.0);
        let resident = r["resident_bytes"].as_f64().unwrap_or(0.0);
        let over = |gbps: f64| total / (resident / gbps / 1e6);
        // Post-copy: the service's threads waited for pages from the source.
        let faults = match r["faults"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(
                ", {n} faults waited {:.2} ms on average ({:.1} at most)",
                r["mean_fault_ms"].as_f64().unwrap_or(0.0),
                r["max_fault_ms"].as_f64().unwrap_or(0.0)
            ),
        };
        eprintln!(
            "ferry demo: moved to {to}: downtime {:.1} ms, total {total:.0} ms ({:.2}x resident {:.0} MiB over the idle link, {:.2}x over the busy one), {} round(s), {:.1} MiB{faults}; the client's slowest write took {stall:.1} ms (ending {stall_at:.0} ms after the migration began), {} writes acknowledged since",
            r["downtime_ms"].as_f64().unwrap_or(0.0),
            over(link_idle),
            resident / 1048576.0,
            over(link_busy),
            r["rounds"].as_array().map(|v| v.len()).unwrap_or(0),
            r["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
            acked.load(Ordering::SeqCst) - before
        );
        let mut hop = serde_json::json!({
            "to": to,
            "report": r,
            "total_over_bound": { "idle_link": over(link_idle), "busy_link": over(link_busy) },
            "client_worst_write_ms": stall,
            "client_worst_write_end_ms": stall_at,
        });
        if let Some((_, ms, prep_stall)) = prepared {
            hop["prepare_ms"] = ms.into();
            hop["client_worst_write_while_preparing_ms"] = prep_stall.into();
        }
        reports.push(hop);
    }
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
        .context("the client's connection")?;

    // Every acknowledged write is there, read over the same connection.
    let last = acked.load(Ordering::SeqCst);
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut lost = 0;
    for n in 0..=last {
        w.write_all(&resp(&["GET", &format!("w:{n}")]))?;
        if reply(&mut r)? != n.to_string() {
            lost += 1;
        }
    }
    let mut downs: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["report"]["downtime_ms"].as_f64())
        .collect();
    downs.sort_by(|x, y| x.total_cmp(y));
    let median = downs.get(downs.len() / 2).copied().unwrap_or(0.0);
    let summary = serde_json::json!({
        "service": if redis { "redis-server" } else { "built-in" },
        "mode": a.mode,
        "dataset_mib": a.dataset_mib,
        "downtime_median_ms": median,
        "link_gbps": { "idle": link_idle, "busy": link_busy },
        "migrations": reports,
        "writes_acknowledged": last + 1,
        "writes_lost": lost,
        "client_reconnects": 0,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "ferry demo: the service moved {} time(s) between hosts a and b ({} mode) over one client connection: {} writes acknowledged, {lost} lost, no reconnect; median downtime {median:.1} ms",
            reports.len(),
            a.mode,
            last + 1
        );
    }
    Ok(if lost == 0 { 0 } else { 1 })
}

/// The built-in service: a small in-memory key-value store speaking the part of Redis's
/// protocol the demo uses (SET, GET, PING, DBSIZE).
pub fn service(a: ServiceArgs) -> Result<u8> {
    let l = TcpListener::bind(&a.listen).with_context(|| format!("binding {}", a.listen))?;
    let store = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        String,
    >::new()));
    for c in l.incoming() {
        let c = c?;
        let store = store.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut r = BufReader::new(c.try_clone()?);
            let mut w = c;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                let n: usize = line.trim_end().trim_start_matches('*').parse().unwrap_or(0);
                let mut args = Vec::new();
                for _ in 0..n {
                    args.push(reply(&mut r)?);
                }
                let out = match args.first().map(|s| s.to_ascii_uppercase()).as_deref() {
                    Some("SET") if args.len() == 3 => {
                        store
                            .lock()
                            .unwrap()
                            .insert(args[1].clone(), args[2].clone());
                        "+OK\r\n".to_string()
                    }
                    Some("GET") if args.len() == 2 => match store.lock().unwrap().get(&args[1]) {
                        Some(v) => format!("${}\r\n{v}\r\n", v.len()),
                        None => "$-1\r\n".into(),
                    },
                    Some("PING") => "+PONG\r\n".into(),
                    Some("DBSIZE") => format!(":{}\r\n", store.lock().unwrap().len()),
                    _ => "-ERR unknown command\r\n".into(),
                };
                w.write_all(out.as_bytes())?;
            }
        });
    }
    Ok(0)
}
