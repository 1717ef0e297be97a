//! Helpers shared by the end-to-end test files: running ferry, building and starting fixtures
//! with a clean fd table, waiting for their output.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

pub fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

/// A test's scratch directory. Removed when the test passes (images of a GiB add up over
/// many runs); kept when it fails, so that what it left can be looked at.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Whatever a test mounted below (a small tmpfs to fill) goes too, failed or not.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if Path::new(m).starts_with(&self.0) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tmpdir(tag: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("ferry-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}

/// Build fixture `name` (tests/fixtures/NAME.c) as a static musl binary in `dir`.
pub fn build(dir: &Path, name: &str) -> PathBuf {
    compile(dir, name, "musl-gcc", &["-static"])
}

/// A fixture built against glibc (dynamically linked), for what musl does not do (rseq).
pub fn build_glibc(dir: &Path, name: &str) -> PathBuf {
    compile(dir, name, "gcc", &[])
}

fn compile(dir: &Path, name: &str, cc: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new(cc)
        .args(flags)
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(format!("{FIXTURES}/{name}.c"))
        .status()
        .expect(cc);
    assert!(st.success());
    out
}

pub fn wait_for(path: &Path, needle: &str) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "{needle:?} never appeared in {}: {s:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fds inherited from whatever started the tests (shells leak some) must not reach fixtures.
pub fn close_stray_fds() {
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() {
            if fd > 2 {
                // SAFETY: F_SETFD only sets a flag on the fd, if it is open.
                unsafe {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// Start `cmd` with stdout and stderr appended to `out`, stdin /dev/null.
pub fn start_cmd(mut cmd: Command, out: &Path) -> Child {
    close_stray_fds();
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap()
}

/// `ferry dump --pid PID --images IMG EXTRA...`.
pub fn dump_with(pid: u32, img: &Path, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let mut args = vec!["dump", "--pid", &pid, "--images", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    ferry(&args)
}

/// Dump `pid` into `img`; the dump must fail (exit 2) and leave no image. Returns ferry's
/// error output.
pub fn dump_err(pid: u32, img: &Path) -> String {
    let d = dump_with(pid, img, &[]);
    assert_eq!(d.status.code(), Some(2), "dump should fail");
    assert!(
        !img.join("meta.fimg").exists(),
        "a failed dump left an image"
    );
    String::from_utf8_lossy(&d.stderr).to_string()
}

/// Dump `pid` (killing it) into `img`; the dump must succeed. Returns ferry's JSON report.
pub fn dump_ok(pid: u32, img: &Path) -> serde_json::Value {
    let d = dump_with(pid, img, &["--json"]);
    assert!(
        d.status.success(),
        "dump of {pid}: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    serde_json::from_slice(&d.stdout).expect("dump --json")
}

/// Restore `img` detached (extra arguments appended); the restore must succeed.
pub fn restore_detached(img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "restore",
        "--images",
        img.to_str().unwrap(),
        "--detach",
        "--json",
    ];
    args.extend_from_slice(extra);
    let r = ferry(&args);
    assert!(
        r.status.success(),
        "restore of {}: {}",
        img.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    serde_json::from_slice(&r.stdout).expect("restore --json")
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false)
}

/// Wait until no process holds `pid` (a killed, reaped process can take a moment).
pub fn wait_gone(pid: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < end, "process {pid} never went away");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn kill(pid: u32, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// Two network namespaces joined by a veth pair: the "server" side holds 10.X.Y.1/24, the
/// "client" side 10.X.Y.2/24. Removed on drop.
pub struct NetPair {
    pub server: String,
    pub client: String,
    pub server_ip: String,
    pub client_ip: String,
}

impl NetPair {
    pub fn new(tag: &str) -> NetPair {
        let id = std::process::id();
        let (x, y) = subnet(id, tag);
        let server = format!("fs{tag}{id}");
        let client = format!("fc{tag}{id}");
        let (va, vc) = (
            format!("va{tag}{}", id % 100000),
            format!("vc{tag}{}", id % 100000),
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &server])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &client])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &server]);
        ip(&["netns", "add", &client]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vc]);
        ip(&["link", "set", &va, "netns", &server]);
        ip(&["link", "set", &vc, "netns", &client]);
        let server_ip = format!("10.{x}.{y}.1");
        let client_ip = format!("10.{x}.{y}.2");
        for (ns, dev, addr) in [(&server, &va, &server_ip), (&client, &vc, &client_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        NetPair {
            server,
            client,
            server_ip,
            client_ip,
        }
    }

    pub fn path(ns: &str) -> String {
        format!("/run/netns/{ns}")
    }

    /// A command run inside namespace `ns` (network only: nsenter --net).
    pub fn cmd(ns: &str, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::path(ns))).arg(prog);
        c
    }

    /// A TCP connection made from inside namespace `ns`.
    pub fn connect(ns: &str, addr: &str) -> std::net::TcpStream {
        let path = Self::path(ns);
        let addr = addr.to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this short-lived thread only; the socket keeps the namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {path}");
            std::net::TcpStream::connect(addr.as_str()).expect("connect")
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// A small Redis (RESP) client for the server tests.

pub fn cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

#[derive(Debug, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Reply>),
}

pub fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    let (kind, rest) = line.trim_end().split_at(1);
    Ok(match kind {
        "+" => Reply::Status(rest.into()),
        "-" => Reply::Error(rest.into()),
        ":" => Reply::Int(rest.parse().unwrap()),
        "$" => {
            let n: i64 = rest.parse().unwrap();
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Reply::Bulk(Some(String::from_utf8(b).unwrap()))
            }
        }
        "*" => {
            let n: usize = rest.parse().unwrap();
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(reply(r)?);
            }
            Reply::Array(v)
        }
        k => panic!("unexpected reply kind {k:?}"),
    })
}

/// MGET `keys` in batches; each must hold the value `want(key index)`.
pub fn check_keys(
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    keys: impl Iterator<Item = (String, String)>,
) -> usize {
    let all: Vec<(String, String)> = keys.collect();
    for chunk in all.chunks(5000) {
        let mut args = vec!["MGET"];
        args.extend(chunk.iter().map(|(k, _)| k.as_str()));
        w.write_all(&cmd(&args)).unwrap();
        let Reply::Array(vals) = reply(r).unwrap() else {
            panic!("MGET reply")
        };
        for ((k, want), got) in chunk.iter().zip(vals) {
            assert_eq!(got, Reply::Bulk(Some(want.clone())), "key {k}");
        }
    }
    all.len()
}

/// The X and Y of a test's 10.X.Y.0/24: the tests of one binary run side by side in one
/// process, so the tag tells them apart (two bridges with one subnet in this namespace would
/// route one test's traffic into the other's).
fn subnet(id: u32, tag: &str) -> (u32, u32) {
    let h = tag
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    (((id >> 8) + h) % 200 + 20, id % 250 + 1)
}

/// Hosts on one link: network namespaces joined by veth pairs to a bridge (which holds
/// 10.X.Y.254, so that this namespace reaches them). Host `i` has 10.X.Y.(i+1). Removed on
/// drop.
pub struct Lan {
    tag: String,
    pub bridge: String,
    pub hosts: Vec<String>,
    pub net: String,
}

impl Lan {
    pub fn new(tag: &str, n: usize) -> Lan {
        let id = std::process::id();
        let (x, y) = subnet(id, tag);
        let net = format!("10.{x}.{y}");
        let bridge = format!("fb{tag}{}", id % 100000);
        let _ = Command::new("ip")
            .args(["link", "del", &bridge])
            .stderr(Stdio::null())
            .status();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{net}.254/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut hosts = Vec::new();
        for i in 0..n {
            let ns = format!("fl{tag}{i}{id}");
            let (outer, inner) = (
                format!("v{tag}{i}{}", id % 10000),
                format!("e{tag}{i}{}", id % 10000),
            );
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "master", &bridge]);
            ip(&["link", "set", &outer, "up"]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{net}.{}/24", i + 1),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            hosts.push(ns);
        }
        Lan {
            tag: tag.to_string(),
            bridge,
            hosts,
            net,
        }
    }

    /// Add an address to host `i`'s link.
    pub fn add_address(&self, i: usize, cidr: &str) {
        let dev = format!("e{}{i}{}", self.tag, std::process::id() % 10000);
        ip(&["-n", &self.hosts[i], "addr", "add", cidr, "dev", &dev]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A client writing `SET w:N N` continuously over one connection, counting acknowledgements.
pub struct Writer {
    acked: std::sync::Arc<std::sync::atomic::AtomicI64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Result<(), String>>,
}

impl Writer {
    pub fn start(conn: &TcpStream) -> Writer {
        use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
        let acked = std::sync::Arc::new(AtomicI64::new(-1));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (a, st) = (acked.clone(), stop.clone());
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let handle = std::thread::spawn(move || -> Result<(), String> {
            let mut n = 0i64;
            while !st.load(Ordering::Relaxed) {
                w.write_all(&cmd(&["SET", &format!("w:{n}"), &n.to_string()]))
                    .map_err(|e| format!("write {n}: {e}"))?;
                match reply(&mut r).map_err(|e| format!("reply to write {n}: {e}"))? {
                    Reply::Status(s) if s == "OK" => a.store(n, Ordering::SeqCst),
                    other => return Err(format!("write {n}: {other:?}")),
                }
                n += 1;
            }
            Ok(())
        });
        Writer {
            acked,
            stop,
            handle,
        }
    }

    /// The last write acknowledged (-1: none yet).
    pub fn acked(&self) -> i64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until write `at_least` is acknowledged.
    pub fn wait_acked(&self, at_least: i64) {
        let end = Instant::now() + Duration::from_secs(60);
        while self.acked() < at_least {
            assert!(Instant::now() < end, "writes stalled at {}", self.acked());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop; the connection must have carried every write without error. Returns the last
    /// write acknowledged.
    pub fn finish(self) -> i64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = self.acked;
        self.handle
            .join()
            .unwrap()
            .expect("the writer's connection");
        acked.load(std::sync::atomic::Ordering::SeqCst)
    }
}
