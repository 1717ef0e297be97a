//! Helpers shared by the end-to-end test files: running ferry, building and starting fixtures
//! with a clean fd table, waiting for their output.
#![allow(dead_code)]

use std::fs::OpenOptions;
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

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Build fixture `name` (tests/fixtures/NAME.c) as a static musl binary in `dir`.
pub fn build(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new("musl-gcc")
        .args(["-static", "-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(format!("{FIXTURES}/{name}.c"))
        .status()
        .expect("musl-gcc");
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

/// Dump `pid` (killing it) into `img`; the dump must succeed. Returns ferry's JSON report.
pub fn dump_ok(pid: u32, img: &Path) -> serde_json::Value {
    let d = ferry(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--images",
        img.to_str().unwrap(),
        "--json",
    ]);
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
        let (x, y) = ((id >> 8) % 200 + 20, id % 250 + 1);
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
