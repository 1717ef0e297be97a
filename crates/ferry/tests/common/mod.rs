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
