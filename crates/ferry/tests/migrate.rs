//! Live migration between agents. Each agent runs in a PID namespace of its own (as on
//! another host, PIDs there are its own), so a process keeps its PID when it lands there while
//! its source copy still exists. A fixture keeps rewriting its memory during the move and
//! checks all of it afterwards.

mod common;
use common::*;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789";

struct Agent {
    unshare: Child,
    host: String,
    port: u16,
    url: String,
    tok: PathBuf,
    /// Its state directory (unless given in `extra`).
    state: PathBuf,
}

/// Below the kernel's ephemeral range (32768 and up): a connection to a port there that
/// nothing listens on yet can connect to itself (simultaneous open on the same port), which
/// then keeps the agent from binding it.
fn port_base() -> u16 {
    21000 + (std::process::id() % 500) as u16 * 20
}

impl Agent {
    fn start(dir: &Path, n: u16, extra: &[&str]) -> Agent {
        Self::start_in(dir, n, extra, None, "127.0.0.1")
    }

    /// An agent in network namespace `netns` (a /run/netns file), listening on `host`.
    fn start_in(dir: &Path, n: u16, extra: &[&str], netns: Option<&str>, host: &str) -> Agent {
        Self::launch(dir, n, extra, netns, host, false, &[])
    }

    /// With `kept`, the agent is not PID 1 of its namespace: a shell is, and it stays when
    /// the agent dies, so whatever the agent built dies only if the kernel kills it with the
    /// agent (PTRACE_O_EXITKILL), not with the namespace. `env` goes to the agent.
    fn launch(
        dir: &Path,
        n: u16,
        extra: &[&str],
        netns: Option<&str>,
        host: &str,
        kept: bool,
        env: &[(&str, &str)],
    ) -> Agent {
        let port = port_base() + n * 4;
        let tok = dir.join("token");
        std::fs::write(&tok, TOKEN).unwrap();
        let state = dir.join(format!("state{n}"));
        let mut c = Command::new(if netns.is_some() {
            "nsenter"
        } else {
            "unshare"
        });
        if let Some(ns) = netns {
            c.arg(format!("--net={ns}")).arg("unshare");
        }
        c.args(["--pid", "--fork", "--mount-proc"]);
        if kept {
            c.args(["sh", "-c", "\"$@\"; exec sleep 3600", "sh"]);
        }
        c.envs(env.iter().copied())
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(["agent", "--listen", &format!("{host}:{port}")])
            .arg("--token-file")
            .arg(&tok)
            .args(extra);
        if !extra.contains(&"--state-dir") {
            c.arg("--state-dir").arg(&state);
        }
        let unshare = start_cmd(c, &dir.join(format!("agent{n}.log")));
        let a = Agent {
            unshare,
            host: host.to_string(),
            port,
            url: format!("http://{host}:{port}"),
            tok,
            state,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while a.try_get("/v1/host").is_none() {
            assert!(Instant::now() < end, "agent {n} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    /// An agent on loopback under a shell that stays PID 1 of its namespace, stopped by its
    /// test hook at `point` (`FERRY_AGENT_PAUSE_AT`).
    fn held_at(dir: &Path, n: u16, point: &str) -> Agent {
        let env = [("FERRY_AGENT_PAUSE_AT", point)];
        Self::launch(dir, n, &[], None, "127.0.0.1", true, &env)
    }

    /// An agent on loopback whose advertised page-stream port is a proxy that flips the
    /// first payload byte of the first frame of `kind` on each connection.
    fn behind_corrupting_proxy(dir: &Path, n: u16, kind: u8) -> Agent {
        let proxy = port_base() + n * 4 + 3;
        let extra = ["--advertise-data-port", &proxy.to_string()];
        let a = Self::launch(dir, n, &extra, None, "127.0.0.1", true, &[]);
        corrupting_proxy_of_kind(proxy, a.port + 1, kind);
        a
    }

    /// Waits (30 s at most) until the agent, run with `FERRY_AGENT_PAUSE_AT=point`, stops
    /// there, while the migration `h` goes on; returns the file whose removal lets it go on.
    fn wait_paused(&self, point: &str, h: &std::thread::JoinHandle<Output>) -> PathBuf {
        let paused = self.state.join(format!("paused-{point}"));
        let end = Instant::now() + Duration::from_secs(30);
        while !paused.exists() {
            assert!(
                !h.is_finished(),
                "the migration ended before the agent reached {point}"
            );
            assert!(Instant::now() < end, "the agent never reached {point}");
            std::thread::sleep(Duration::from_millis(2));
        }
        paused
    }

    fn try_get(&self, path: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get_body(path)?).ok()
    }

    /// The body of `GET path`.
    fn get_body(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect((self.host.as_str(), self.port)).ok()?;
        if s.local_addr().ok() == s.peer_addr().ok() {
            return None;
        }
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body.split_once("\r\n\r\n")?.1.to_string())
    }

    fn get(&self, path: &str) -> serde_json::Value {
        self.try_get(path).expect("agent API")
    }

    /// `DELETE /v1/migrations/{id}`: the whole response.
    fn cancel(&self, id: &str) -> String {
        let mut s = TcpStream::connect((self.host.as_str(), self.port)).unwrap();
        write!(
            s,
            "DELETE /v1/migrations/{id} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// `POST path` with `body`: the status line and the body.
    fn post(&self, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect((self.host.as_str(), self.port)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The agent process (PID 1 of its namespace), seen from here: the child of `unshare`
    /// (which nsenter may have become).
    fn init_pid(&self) -> u32 {
        let kid = |p: u32| -> u32 {
            let s =
                std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
            s.split_whitespace().next().unwrap().parse().unwrap()
        };
        let first = kid(self.unshare.id());
        let comm = std::fs::read_to_string(format!("/proc/{first}/comm")).unwrap_or_default();
        if comm.trim() == "unshare" {
            return kid(first);
        }
        first
    }

    /// Our PID of the process that is `inner` in the agent's PID namespace.
    fn outer_pid(&self, inner: i64) -> u32 {
        self.find_pid(inner)
            .unwrap_or_else(|| panic!("no process {inner} in the agent's namespace"))
    }

    fn find_pid(&self, inner: i64) -> Option<u32> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init_pid())).unwrap();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() != Some(ns.clone()) {
                continue;
            }
            let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let nspid = st.lines().find(|l| l.starts_with("NSpid:")).unwrap_or("");
            if nspid.split_whitespace().last() == Some(&inner.to_string()) {
                return Some(p);
            }
        }
        None
    }

    /// The agent of a `kept` namespace (the shell's child), seen from here.
    fn agent_pid(&self) -> u32 {
        let sh = self.init_pid();
        let s = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
        s.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// SIGKILL to the agent of a `kept` namespace alone; returns once it is gone.
    fn kill_agent_only(&self) {
        let p = self.agent_pid();
        kill(p, "KILL");
        let end = Instant::now() + Duration::from_secs(10);
        while self.init_holds(p) {
            assert!(Instant::now() < end, "agent {p} did not die");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether our process `p` is still a child of the namespace's shell, not a zombie.
    fn init_holds(&self, p: u32) -> bool {
        let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        !st.is_empty() && !st.contains(") Z ")
    }

    /// The process that is `inner` in the agent's namespace, unless gone or a zombie, and
    /// its state letter (R, S: running; t: held under ptrace).
    fn live_process(&self, inner: i64) -> Option<(u32, char)> {
        let p = self.find_pid(inner)?;
        let st = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let state = st.rsplit_once(") ")?.1.chars().next()?;
        (state != 'Z' && state != 'X').then_some((p, state))
    }

    /// Waits (10 s at most) until nothing is left of process `inner` at the destination.
    fn wait_gone(&self, inner: i64, what: &str) {
        let end = Instant::now() + Duration::from_secs(10);
        while let Some((p, state)) = self.live_process(inner) {
            assert!(
                Instant::now() < end,
                "{what}: process {p} is still at the destination ({state})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let init = self.init_pid();
        kill(init, "KILL");
        let _ = self.unshare.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.unshare.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

fn migrate(pid: u32, a: &Agent, extra: &[&str]) -> Output {
    migrate_with_env(pid, a, extra, &[])
}

/// The arguments of `ferry migrate` of `pid` to `a`, then `extra`.
fn migrate_args(pid: u32, a: &Agent, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "migrate".to_string(),
        "--pid".into(),
        pid.to_string(),
        "--to".into(),
        a.url.clone(),
        "--token-file".into(),
        a.tok.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `ferry migrate --json` with variables `env` set in its environment.
fn migrate_with_env(pid: u32, a: &Agent, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(migrate_args(pid, a, &[&["--json"], extra].concat()))
        .envs(env.iter().copied())
        .output()
        .expect("run ferry")
}

/// `ferry migrate` of `pid` to `a` on a thread of its own, for a test that acts meanwhile.
fn migrate_in_background(pid: u32, a: &Agent, extra: &[&str]) -> std::thread::JoinHandle<Output> {
    let args = migrate_args(pid, a, extra);
    std::thread::spawn(move || ferry(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>()))
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON: {} / {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Ask the fixture (our PID `pid`) to check its memory; wait for its `n`th verdict.
fn check_pass(pid: u32, out: &Path, n: usize) {
    kill(pid, "USR1");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(out).unwrap_or_default();
        assert!(!s.contains("FAIL"), "{s}");
        if s.matches("PASS").count() >= n {
            return;
        }
        assert!(Instant::now() < end, "no verdict {n}: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A prepared migration whose reserved memory went to another migration of its process.
fn let_go(m: &serde_json::Value) -> bool {
    m["prepared"]["memory"]
        .as_str()
        .is_some_and(|s| s.starts_with("none: let go"))
}

fn running(pid: u32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let state = s.lines().find(|l| l.starts_with("State:")).unwrap_or("");
    let tracer = s
        .lines()
        .find(|l| l.starts_with("TracerPid:"))
        .unwrap_or("");
    (state.contains('S') || state.contains('R')) && tracer.ends_with("\t0")
}

fn start_dirtier(dir: &Path, mib: &str, pause_us: &str) -> (Child, PathBuf) {
    let bin = build(dir, "dirtier");
    let out = dir.join("dirtier.out");
    // A fresh output: a "ready" or "PASS" of an earlier dirtier of the test must not count.
    let _ = std::fs::remove_file(&out);
    let mut c = Command::new(bin);
    c.args([mib, pause_us]);
    // Its private file mapping's written pages are what a warm destination takes in at once.
    c.arg(dir.join("dirtier.map"));
    let child = start_cmd(c, &out);
    wait_for(&out, "ready");
    (child, out)
}

/// Pre-copy to one agent while the fixture keeps writing, then stop-and-copy from there to
/// another: the memory is intact each time, and the process keeps its PID.
#[test]
fn precopy_then_stop_and_copy_keep_memory_intact() {
    let dir = tmpdir("migrate");
    let a1 = Agent::start(&dir, 1, &[]);
    let a2 = Agent::start(&dir, 2, &[]);
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));
    let o = migrate(pid, &a1, &["--mode", "precopy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    eprintln!(
        "pre-copy: downtime {} ms, total {} ms, rounds {}",
        r["downtime_ms"],
        r["total_ms"],
        r["rounds"].as_array().unwrap().len()
    );
    assert_eq!(r["restored_pid"].as_i64(), Some(pid as i64));
    assert!(!r["rounds"].as_array().unwrap().is_empty());
    // Both agents run on this CPU: whatever runs here runs there, so the gate said
    // compatible without reading the process's memory.
    assert_eq!(r["verdict"], "compatible", "{r}");
    assert!(
        r["notes"].to_string().contains("compatible without a scan"),
        "{r}"
    );
    // The destination built the process while memory crossed, and the rebuild used it.
    assert!(
        r["restore"]["agent"]["warm"]
            .as_str()
            .is_some_and(|w| w.starts_with("built in")),
        "{r}"
    );
    assert_eq!(r["restore"]["warm"], "used", "{r}");
    // Pre-copied pages went straight into it: after it ran, only the final copy's pages
    // were left to fill, not the 64 MiB the rounds sent.
    let sent: u64 = r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["bytes"].as_u64().unwrap())
        .sum();
    let left = r["restore"]["lazy_bytes"].as_u64().unwrap();
    assert!(sent >= 64 << 20, "{r}");
    let pages: u64 = r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(pages * 4096, sent, "{r}");
    assert!(left < 8 << 20, "{left} bytes left to fill: {r}");
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        // The frozen process's mapping flags came from BPF, not from smaps.
        assert!(!r["notes"].to_string().contains("smaps"), "{r}");
        assert!(
            r["phases"]["dump_steps"]["vma_flags"].as_f64().is_some(),
            "{r}"
        );
    }
    // The source copy is gone; the process runs in the first agent's namespace.
    child.wait().unwrap();
    let m = a1.get("/v1/migrations");
    assert_eq!(m[0]["state"], "running", "{m}");
    let p1 = a1.outer_pid(pid as i64);
    check_pass(p1, &out, 1);

    // From there to the second agent, stop-and-copy, run from inside the first namespace.
    let o = Command::new("nsenter")
        .args(["-t", &a1.init_pid().to_string(), "--pid", "--mount"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "migrate",
            "--pid",
            &pid.to_string(),
            "--to",
            &a2.url,
            "--mode",
            "stop",
        ])
        .arg("--token-file")
        .arg(&a2.tok)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert!(r["rounds"].as_array().unwrap().is_empty());
    let p2 = a2.outer_pid(pid as i64);
    assert!(!alive(p1), "the first copy still runs");
    check_pass(p2, &out, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without BPF (FERRY_NO_BPF), the mapping flags come from smaps; without a warm destination
/// (FERRY_NO_WARM), the process is built only after the freeze: the report says both, and
/// the process moves intact.
#[test]
fn without_bpf_the_flags_come_from_smaps_and_the_process_moves_intact() {
    let dir = tmpdir("nobpf");
    let a1 = Agent::start(&dir, 28, &[]);
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));
    let o = migrate_with_env(
        pid,
        &a1,
        &["--mode", "precopy"],
        &[("FERRY_NO_BPF", "1"), ("FERRY_NO_WARM", "1")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert!(
        r["notes"]
            .to_string()
            .contains("mapping flags come from smaps"),
        "{r}"
    );
    assert!(
        r["notes"]
            .to_string()
            .contains("builds the process only after the freeze: FERRY_NO_WARM"),
        "{r}"
    );
    assert!(r["restore"]["warm"].is_null(), "{r}");
    child.wait().unwrap();
    check_pass(a1.outer_pid(pid as i64), &out, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process whose layout changes while its memory crosses. Mappings that grew or appeared
/// are made again in the process built ahead, which is used; a mapping it cannot hold (shared
/// memory, made once the source has sent the layout) makes the agent drop it and build the
/// tree after the freeze. Either way every page, the new mappings' too, reads back.
#[test]
fn a_layout_changed_during_precopy_is_remade_or_rebuilt_after_the_freeze() {
    let dir = tmpdir("warmmiss");
    let a1 = Agent::start(&dir, 29, &[]);
    let bin = build(&dir, "dirtier");
    // Pre-copied pages are held by the warm process alone: when it is dropped, they are
    // read back out of it first.
    for (grow, warm, also) in [
        ("1", "used, ", "made again"),
        ("shared", "not used: mapping ", "MiB read back"),
    ] {
        let out = dir.join(format!("dirtier-{grow}.out"));
        let mut c = Command::new(&bin);
        c.args(["128", "1000"])
            .arg(dir.join(format!("dirtier-{grow}.map")));
        c.env("DIRTIER_GROW", grow);
        let mut child = start_cmd(c, &out);
        wait_for(&out, "ready");
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        let h = migrate_in_background(pid, &a1, &["--json"]);
        if grow == "shared" {
            // The layout has left once the agent has bytes: the shared mapping comes after.
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                let m = a1.try_get("/v1/migrations").unwrap_or_default();
                let now = m.as_array().into_iter().flatten().any(|x| {
                    x["state"] == "receiving" && x["bytes_received"].as_u64().unwrap_or(0) > 0
                });
                if now {
                    break;
                }
                assert!(Instant::now() < end, "migration never started: {m}");
                std::thread::sleep(Duration::from_millis(1));
            }
            kill(pid, "USR2");
        }
        let o = h.join().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = json(&o);
        assert!(
            r["restore"]["agent"]["warm"]
                .as_str()
                .is_some_and(|w| w.starts_with("built in")),
            "{r}"
        );
        assert!(
            r["restore"]["warm"]
                .as_str()
                .is_some_and(|w| w.starts_with(warm) && w.contains(also)),
            "DIRTIER_GROW={grow}: {}",
            r["restore"]["warm"]
        );
        child.wait().unwrap();
        check_pass(a1.outer_pid(pid as i64), &out, 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process in UTS, IPC and mount namespaces of its own (a container's, without mounts of
/// its own) is still built ahead at the destination, in new namespaces made then, during
/// pre-copy (or when the migration is prepared), not while it is frozen: the restore finds
/// them made. A mount made at the destination after that makes the warm process unfit. Each
/// time it runs there with its host name, in namespaces apart from the agent's, its memory
/// intact.
#[test]
fn a_process_in_namespaces_of_its_own_is_built_ahead_in_them() {
    let dir = tmpdir("warmns");
    let a = Agent::start(&dir, 63, &[]);
    // Stops with the whole image in, before the rebuild.
    let b = Agent::launch(
        &dir,
        67,
        &[],
        None,
        "127.0.0.1",
        false,
        &[("FERRY_AGENT_PAUSE_AT", "commit")],
    );
    let bin = build(&dir, "dirtier");
    // The host name the process set in its own UTS namespace, and whether its namespaces
    // are apart from the agent's, seen from process `p` at the destination.
    let check_ns = |p: u32, agent: &Agent| {
        let host = Command::new("nsenter")
            .args(["-t", &p.to_string(), "--uts", "hostname"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&host.stdout).trim(),
            "ferry-warm-ns"
        );
        for ns in ["uts", "ipc", "mnt"] {
            let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
            assert_ne!(of(p), of(agent.init_pid()), "{ns}: the agent's namespace");
        }
    };
    // Unprepared: made with the warm process at the start of the stream. Prepared: made
    // around the stub that reserves its memory, when it is prepared. A mount made at the
    // destination after the warm process's mount namespace was copied: it is not used,
    // and the rebuild makes the namespaces at the commit.
    for case in ["unprepared", "prepared", "mount"] {
        let to = if case == "mount" { &b } else { &a };
        let out = dir.join(format!("dirtier-{case}.out"));
        let mut c = Command::new("unshare");
        c.args([
            "--uts",
            "--ipc",
            "--mount",
            "--propagation",
            "private",
            "--",
        ])
        .args(["sh", "-c", "hostname ferry-warm-ns && exec \"$0\" \"$@\""])
        .arg(&bin)
        .args(["64", "1000"])
        .arg(dir.join(format!("dirtier-{case}.map")));
        let mut child = start_cmd(c, &out);
        wait_for(&out, "ready");
        let pid = child.id();
        let mut extra = vec![];
        let id;
        if case == "prepared" {
            let p = migrate(pid, to, &["--prepare-only", "--mode", "precopy"]);
            assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
            let p = json(&p);
            assert_eq!(p["prepared"]["memory"], "resident", "{p}");
            // The stub holding the PID and the memory is in its namespaces already.
            check_ns(to.outer_pid(pid as i64), to);
            id = p["id"].as_str().unwrap().to_string();
            extra = vec!["--prepared", &id];
        }
        let o = if case == "mount" {
            let args = migrate_args(pid, to, &["--json"]);
            let h = std::thread::spawn(move || {
                ferry(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            });
            let paused = to.wait_paused("commit", &h);
            let st = Command::new("nsenter")
                .args(["-t", &to.init_pid().to_string(), "--mount"])
                .args(["mount", "-t", "tmpfs", "ferry-late", "/mnt"])
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::remove_file(paused).unwrap();
            h.join().unwrap()
        } else {
            migrate(pid, to, &extra)
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = json(&o);
        assert!(
            r["restore"]["agent"]["warm"]
                .as_str()
                .is_some_and(|w| w.starts_with("built in")),
            "{r}"
        );
        let steps = &r["restore"]["steps"];
        eprintln!(
            "{case}: at the commit, namespaces {} ms",
            steps["namespaces"]
        );
        if case == "mount" {
            assert!(
                r["restore"]["warm"]
                    .as_str()
                    .is_some_and(|w| w.contains("the mounts here changed")),
                "{r}"
            );
            assert!(
                steps["namespaces_syscalls"].as_f64().unwrap() > 0.0,
                "{steps}"
            );
        } else {
            assert_eq!(r["restore"]["warm"], "used", "{r}");
            // The restore made no namespace: they were made ahead.
            assert_eq!(steps["namespaces_syscalls"], 0.0, "{steps}");
        }
        child.wait().unwrap();
        let moved = to.outer_pid(pid as i64);
        check_ns(moved, to);
        if case == "mount" {
            // Its mount namespace, made at the commit, has the mount made before it.
            let mounts = std::fs::read_to_string(format!("/proc/{moved}/mountinfo")).unwrap();
            assert!(mounts.contains("ferry-late"), "{mounts}");
        }
        check_pass(moved, &out, 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(o.status.success(), "openssl {args:?}: {o:?}");
}

/// A CA (`NAME-ca.pem`) and, when `ip` is given, a certificate it signed for that address
/// (`NAME.pem`, key `NAME.key`).
fn make_pki(dir: &Path, name: &str, ip: Option<&str>) {
    let ca = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509", "-days", "2", "-subj", "/CN=ferry test CA"];
    a.extend(ec);
    a.extend(["-keyout", &ca.0, "-out", &ca.1]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    a.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &a);
    let Some(ip) = ip else { return };
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let mut a = vec![
        "req",
        "-subj",
        "/CN=ferry agent",
        "-keyout",
        &key,
        "-out",
        &csr,
    ];
    a.extend(ec);
    openssl(dir, &a);
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), format!("subjectAltName=IP:{ip}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca.1,
            "-CAkey",
            &ca.0,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// GET `path` from a TLS agent, trusting `ca`.
fn tls_get(a: &Agent, ca: &Path, path: &str) -> serde_json::Value {
    let tls = ferry_migrate::tls::ClientTls::load(ca).unwrap();
    let addr = format!("{}:{}", a.host, a.port);
    let s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = ferry_migrate::tls::Conn::connect(s, Some(&tls), &addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    // The end of the answer may come without a TLS close_notify: the bytes count.
    let _ = c.read_to_end(&mut body);
    let body = String::from_utf8_lossy(&body);
    let (_, json) = body.split_once("\r\n\r\n").expect("an HTTP answer");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// An agent on another host serving its API and page stream over TLS (certificate for its
/// address, and a token): a source without the right CA, or speaking plain HTTP, is refused
/// with a clear reason and the process runs on at the source; with `--tls-ca` and https:// it
/// moves, its memory intact.
#[test]
fn tls_agent_accepts_only_sources_that_trust_its_ca() {
    let dir = tmpdir("migrate-tls");
    let lan = Lan::new("t", 2);
    let ip = format!("{}.2", lan.net);
    make_pki(&dir, "agent", Some(&ip));
    make_pki(&dir, "other", None);
    let (cert, key) = (dir.join("agent.pem"), dir.join("agent.key"));
    // (Agent::start_in sees it up when it answers plain HTTP, here with a 426 and JSON.)
    let agent = Agent::start_in(
        &dir,
        11,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        Some(&NetPair::path(&lan.hosts[1])),
        &ip,
    );
    let https = format!("https://{ip}:{}", agent.port);
    let ca = dir.join("agent-ca.pem");
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    let run = |to: &str, ca: Option<&Path>, extra: &[&str]| {
        let mut a = vec![
            "migrate".to_string(),
            "--pid".into(),
            pid.to_string(),
            "--to".into(),
            to.to_string(),
            "--token-file".into(),
            agent.tok.display().to_string(),
            "--json".into(),
        ];
        if let Some(ca) = ca {
            a.extend(["--tls-ca".into(), ca.display().to_string()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        ferry(&a)
    };
    let mut verdicts = 0;
    for (to, ca, why) in [
        (
            https.as_str(),
            Some(dir.join("other-ca.pem")),
            "not signed by the CA given with --tls-ca",
        ),
        (agent.url.as_str(), None, "serves its API over TLS only"),
        (https.as_str(), None, "no CA to check its certificate"),
    ] {
        let o = run(to, ca.as_deref(), &[]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{to}: {e}");
        assert!(e.contains(why) && e.contains("runs on here"), "{to}: {e}");
        assert!(running(pid), "{to}: the process must run on at the source");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
    }
    assert_eq!(
        tls_get(&agent, &ca, "/v1/migrations"),
        serde_json::json!([])
    );
    let log = std::fs::read_to_string(dir.join("agent11.log")).unwrap();
    assert!(log.contains("TLS on the API and the page stream"), "{log}");

    // Hybrid: pre-copy rounds on the page stream, then post-copy's page connection, both TLS.
    let o = run(&https, Some(&ca), &["--mode", "hybrid"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert_eq!(r["restored_pid"].as_i64(), Some(pid as i64), "{r}");
    assert!(!r["rounds"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["fill_ms"].as_f64().is_some(), "{r}");
    eprintln!("hybrid over TLS: {r}");
    assert!(r["postcopy_bytes"].as_u64().unwrap() > 0, "{r}");
    child.wait().unwrap();
    let m = tls_get(&agent, &ca, "/v1/migrations");
    assert_eq!(m[0]["state"], "running", "{m}");
    assert_eq!(m[0]["restored_pid"].as_i64(), Some(pid as i64), "{m}");
    assert!(
        m[0]["rounds"].as_u64().unwrap() >= 1,
        "pre-copy rounds: {m}"
    );
    check_pass(agent.outer_pid(pid as i64), &out, verdicts + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination whose CPU lacks a feature the process uses is refused before anything is
/// frozen: exit 1, the evidence, the process untouched, nothing announced to the agent. With
/// --force it moves, and the report notes the verdict it overrode.
#[test]
fn an_incompatible_destination_is_refused_before_the_freeze() {
    let dir = tmpdir("migrate-gate");
    let prof = ferry(&[
        "cpu",
        "profile",
        "--from-cpuid-dump",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ferry-eval/data/qemu72_user_cpu_models_cpuid_dump.txt"
        ),
        "--model",
        "Haswell-v1",
        "--json",
    ]);
    assert!(prof.status.success());
    let pf = dir.join("haswell.json");
    std::fs::write(&pf, &prof.stdout).unwrap();
    let a = Agent::start(&dir, 3, &["--profile", pf.to_str().unwrap()]);
    // A workload using a feature this host has and Haswell lacks: AVX-512 where the host has
    // it, SHA-NI otherwise (every x86-64-v3 AMD host, and Intel since Ice Lake).
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let (fixture, feature) = if has("avx512f") {
        ("avx512", "AVX512")
    } else if has("sha_ni") {
        ("sha", "SHA")
    } else {
        eprintln!("skipped: this host has neither AVX-512 nor SHA-NI, which Haswell lacks");
        return;
    };
    let bin = build(&dir, fixture);
    let out = dir.join("avx.out");
    let mut child = start_cmd(Command::new(bin), &out);
    wait_for(&out, "ready");
    let o = migrate(child.id(), &a, &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v = json(&o);
    assert_eq!(v["refused"], true);
    let why = v["reason"].as_str().unwrap();
    assert!(why.contains(feature), "{why}");
    assert!(running(child.id()));
    assert_eq!(a.get("/v1/migrations"), serde_json::json!([]));
    // --force overrides the gate (here the destination is this very CPU, so it runs), and
    // the report says what was overridden.
    let pid = child.id();
    let o = migrate(pid, &a, &["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert_eq!(r["verdict"], "incompatible", "{r}");
    let notes = r["notes"].to_string();
    assert!(notes.contains("--force") && notes.contains(feature), "{r}");
    child.wait().unwrap();
    let (moved, state) = a
        .live_process(pid as i64)
        .expect("the process runs at the destination");
    assert!(state == 'S' || state == 'R', "{moved}: {state}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `DELETE` of a migration under way (pre-copy): the source resumes the process as it was,
/// the agent removes what it built, and its `/metrics` count the migration as cancelled.
#[test]
fn a_migration_cancelled_during_precopy_leaves_the_process_at_the_source() {
    let dir = tmpdir("migrate-cancel");
    let a = Agent::start(&dir, 48, &[]);
    let (mut child, out) = start_dirtier(&dir, "256", "1000");
    let pid = child.id();
    let h = migrate_in_background(pid, &a, &[]);
    let end = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let m = a.try_get("/v1/migrations").unwrap_or_default();
        if m[0]["state"] == "receiving" && m[0]["bytes_received"].as_u64().unwrap_or(0) > 0 {
            break m[0]["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < end, "migration never started: {m}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let answer = a.cancel(&id);
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    let o = h.join().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cancelled"), "{e}");
    assert!(running(pid), "after the cancel");
    check_pass(pid, &out, 1);
    a.wait_gone(pid as i64, "after the cancel");
    let m = a.get("/v1/migrations");
    assert_eq!(m[0]["state"], "cancelled", "{m}");
    let metrics = a.get_body("/metrics").unwrap();
    assert!(
        metrics.contains("ferry_migrations{state=\"cancelled\"} 1"),
        "{metrics}"
    );
    let received: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_received_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(received > 0, "{metrics}");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process tree moves whole: a parent and its child sharing anonymous memory, with bytes in
/// flight in a pipe between them, by pre-copy and by post-copy. At the destination the child
/// is still the parent's child, the memory still shared both ways, the bytes still in the
/// pipe (the fixture checks, and its parent prints PASS).
#[test]
fn a_process_tree_moves_with_its_shared_memory_and_pipe() {
    let dir = tmpdir("migrate-tree");
    for (i, mode) in ["precopy", "postcopy"].into_iter().enumerate() {
        let a = Agent::start(&dir, 49 + i as u16, &[]);
        let bin = build(&dir, "tree");
        let out = dir.join(format!("tree-{mode}.out"));
        let mut child = start_cmd(Command::new(bin), &out);
        wait_for(&out, "ready");
        let pid = child.id();
        let o = migrate(pid, &a, &["--mode", mode]);
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r = json(&o);
        assert_eq!(r["restore"]["processes"], 2, "{mode}: {r}");
        child.wait().unwrap();
        let parent = a.outer_pid(pid as i64);
        kill(parent, "USR1");
        let s = wait_for(&out, "PASS");
        assert!(!s.contains("FAIL"), "{mode}: {s}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process tree (a parent and its child sharing memory) cut off in hybrid's post-copy
/// window, once the destination has every page from the source, before Filled arrives:
/// without the source's Released the destination kills the whole tree (each process stopped,
/// then killed), before the source resumes its own. The tree runs on at the source, intact.
#[test]
fn a_tree_cut_off_in_the_postcopy_window_is_killed_whole_at_the_destination() {
    let dir = tmpdir("migrate-treecut");
    let cut = CutLink::new("x");
    let a = cut.held_agent(&dir, 69, "released");
    let bin = build(&dir, "tree");
    let out = dir.join("tree.out");
    let mut child = start_cmd(Command::new(bin), &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let kid: i64 = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let h = migrate_in_background(pid, &a, &["--mode", "hybrid", "--timeout", "3"]);
    let paused = a.wait_paused("released", &h);
    for p in [pid as i64, kid] {
        assert!(
            a.live_process(p).is_some(),
            "process {p} does not run at the destination"
        );
    }
    cut.link("down");
    std::fs::remove_file(&paused).unwrap();
    let o = h.join().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    for p in [pid as i64, kid] {
        assert_eq!(a.live_process(p), None, "process {p} runs at both hosts");
    }
    assert!(running(pid), "the source's parent did not resume");
    assert!(running(kid as u32), "the source's child did not resume");
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    cut.link("up");
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent told to stop (SIGTERM) while it holds a migration's whole image: it refuses new
/// migrations (503) and cancels one announced without a stream, finishes the migration
/// under way (the process runs there, intact), then exits by itself; the process it rebuilt
/// runs on after it (the agent is not PID 1 of its namespace here). An agent that is PID 1
/// of its namespace stays until the process it rebuilt has ended.
#[test]
fn an_agent_told_to_stop_finishes_the_migration_under_way() {
    let dir = tmpdir("migrate-drain");
    let a = Agent::held_at(&dir, 70, "commit");
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    // Announced, no stream yet.
    let idle = a.post("/v1/migrations", r#"{"pid": 1, "mode": "precopy"}"#);
    assert!(
        idle.starts_with("HTTP/1.1 201") || idle.starts_with("HTTP/1.0 201"),
        "{idle}"
    );
    let h = migrate_in_background(pid, &a, &[]);
    let paused = a.wait_paused("commit", &h);
    let agent = a.agent_pid();
    kill(agent, "TERM");
    // Refused while it stops; the idle announcement is cancelled.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a.post("/v1/migrations", r#"{"pid": 2, "mode": "precopy"}"#);
        if r.contains(" 503 ") {
            assert!(r.contains("stopping"), "{r}");
            break;
        }
        assert!(Instant::now() < end, "never refused: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = a.get("/v1/migrations");
    let states: Vec<&str> = m
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"cancelled"), "{m}");
    assert!(
        a.init_holds(agent),
        "the agent did not wait for the migration"
    );
    std::fs::remove_file(&paused).unwrap();
    let o = h.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while a.init_holds(agent) {
        assert!(
            Instant::now() < end,
            "the agent did not exit after the migration"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = a.outer_pid(pid as i64);
    check_pass(moved, &out, 1);

    // An agent that is PID 1 of its PID namespace would take the processes it rebuilt along
    // when it exits: told to stop, it stays until they have ended.
    let mut b = Agent::start(&dir, 71, &[]);
    let (mut child, out) = start_dirtier(&dir, "16", "1000");
    let pid = child.id();
    let o = migrate(pid, &b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait().unwrap();
    let moved = b.outer_pid(pid as i64);
    kill(b.init_pid(), "TERM");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        b.unshare.try_wait().unwrap().is_none(),
        "the agent (PID 1) exited while the process it rebuilt ran"
    );
    check_pass(moved, &out, 1);
    kill(moved, "KILL");
    let end = Instant::now() + Duration::from_secs(10);
    while b.unshare.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the agent did not exit once alone");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A byte flipped on the way: forwards the page stream, corrupting one byte after `at`.
fn corrupting_proxy(listen: u16, to: u16, at: usize) {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = 0usize;
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= at && at < seen + n {
                buf[at - seen] ^= 0x20;
            }
            seen += n;
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// Forwards `listen` to `to`, flipping the first payload byte of the first frame of `kind`
/// (the page stream's framing: an 8-byte greeting, then `kind | 0 0 0 | len u32 | payload |
/// crc u32`), on each connection (post-copy opens a second one, for pages).
fn corrupting_proxy_of_kind(listen: u16, to: u16, kind: u8) {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        for a in l.incoming() {
            let Ok(a) = a else { return };
            std::thread::spawn(move || corrupt_frames_of_kind(a, to, kind));
        }
    });
}

fn corrupt_frames_of_kind(a: TcpStream, to: u16, kind: u8) {
    let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b2, &mut a2);
        // The agent hung up: so does the proxy, as the agent's own socket would.
        let _ = a2.shutdown(std::net::Shutdown::Both);
    });
    let mut r = BufReader::new(a);
    let mut pass = |n: usize, flip: bool| -> Option<Vec<u8>> {
        let mut v = vec![0u8; n];
        r.read_exact(&mut v).ok()?;
        if flip && n > 0 {
            v[0] ^= 0x01;
        }
        b.write_all(&v).ok()?;
        Some(v)
    };
    if pass(8, false).is_none() {
        return;
    }
    let mut done = false;
    while let Some(head) = pass(8, false) {
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let flip = !done && head[0] == kind;
        done |= flip;
        if pass(len, flip).is_none() || pass(4, false).is_none() {
            return;
        }
    }
}

/// Two hosts on a bridge (`Lan`), the second one's link to be taken down and up again.
struct CutLink {
    lan: Lan,
    dev: String,
}

impl CutLink {
    fn new(tag: &str) -> CutLink {
        CutLink {
            lan: Lan::new(tag, 2),
            dev: format!("e{tag}1{}", std::process::id() % 10000),
        }
    }

    /// An agent on the second host under a shell that stays PID 1 of its namespace, stopped
    /// by its test hook at `point`.
    fn held_agent(&self, dir: &Path, n: u16, point: &str) -> Agent {
        Agent::launch(
            dir,
            n,
            &[],
            Some(&NetPair::path(&self.lan.hosts[1])),
            &format!("{}.2", self.lan.net),
            true,
            &[("FERRY_AGENT_PAUSE_AT", point)],
        )
    }

    /// `ip link set DEV up|down` on the second host.
    fn link(&self, state: &str) {
        let st = Command::new("ip")
            .args(["-n", &self.lan.hosts[1], "link", "set", &self.dev, state])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Faults while the source is frozen, at three points: the final copy under way (`final`),
/// the whole image in but nothing rebuilt (`commit`), the tree rebuilt and held before Ready
/// (`restored`). The agent, stopped there by its test hook, is killed with SIGKILL while not
/// PID 1 of its namespace (so only PTRACE_O_EXITKILL can take what it built with it), or its
/// link goes down; or a byte of the final image is corrupted on the way. Each time the
/// process runs on at the source, intact, and nothing of it runs at the destination.
#[test]
fn faults_while_frozen_leave_the_process_on_exactly_one_host() {
    let dir = tmpdir("migrate-frozen");
    let cut = CutLink::new("z");
    let link = |state: &str| cut.link(state);
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    let mut verdicts = 0;
    let cases = [
        ("final", "kill"),
        ("commit", "kill"),
        ("restored", "kill"),
        ("final", "link"),
        ("commit", "link"),
        ("restored", "link"),
        ("final", "corrupt"),
    ];
    for (i, &(point, fault)) in cases.iter().enumerate() {
        let n = 40 + i as u16;
        let what = format!("{fault} at {point}");
        let a = if fault == "corrupt" {
            Agent::behind_corrupting_proxy(&dir, n, 4)
        } else {
            cut.held_agent(&dir, n, point)
        };
        let t = Instant::now();
        let h = migrate_in_background(pid, &a, &["--timeout", "3"]);
        let paused = a.state.join(format!("paused-{point}"));
        if fault != "corrupt" {
            a.wait_paused(point, &h);
            // Frozen at the source, its copy built or being built at the destination.
            assert!(!running(pid), "{what}: the source copy is not frozen");
        }
        match fault {
            "kill" => a.kill_agent_only(),
            "link" => {
                link("down");
                let _ = std::fs::remove_file(&paused);
            }
            _ => {}
        }
        let o = h.join().unwrap();
        eprintln!("{what}: the source gave up after {:?}", t.elapsed());
        // A silent agent is found out within about --timeout, also while the source waits
        // for a rebuild (whose own limit is 120 s).
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: gave up only after {:?}",
            t.elapsed()
        );
        assert_eq!(
            o.status.code(),
            Some(2),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(running(pid), "{what}: the source copy does not run");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
        if fault == "link" {
            // Cut off, the agent holds what it built until its waits run out (60 s for a
            // frame, 30 s for Go): held under ptrace, never running.
            if let Some((p, state)) = a.live_process(pid as i64) {
                assert_eq!(
                    state, 't',
                    "{what}: process {p} at the destination is not held"
                );
            }
            link("up");
            // A cut-off agent that dies takes its held copy with it.
            a.kill_agent_only();
        }
        // Killed, the agent's builds die with it; alive, it removes them itself.
        a.wait_gone(pid as i64, &what);
        eprintln!(
            "{what}: the process runs at the source only ({:?})",
            t.elapsed()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `size` (mount's `size=`) at DIR/small, unmounted on drop: a state directory
/// with no room.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        let small = dir.join("small");
        std::fs::create_dir_all(&small).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(st.success());
        SmallFs(small)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Each failure leaves the process running on exactly one host, intact: a full state
/// directory on the destination, a corrupted stream, the destination agent killed during
/// pre-copy.
#[test]
fn failures_leave_the_process_running_at_the_source() {
    let dir = tmpdir("migrate-fail");
    let (mut child, out) = start_dirtier(&dir, "128", "1000");
    let pid = child.id();
    let mut verdicts = 0;

    // A state directory with no room: the agent fails while receiving. Pre-copied pages go
    // into the warm process, not to disk: the final image is what does not fit.
    let small = SmallFs::mount(&dir, "64k");
    {
        let a = Agent::start(&dir, 4, &["--state-dir", small.0.to_str().unwrap()]);
        let o = migrate(pid, &a, &[]);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("runs on here") || e.contains("space"), "{e}");
        assert!(running(pid), "after a full state directory");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
        let m = a.get("/v1/migrations");
        assert_eq!(m[0]["state"], "failed", "{m}");
    }
    drop(small);

    // A corrupted byte in the stream.
    {
        let proxy = port_base() + 19;
        let a = Agent::start(&dir, 5, &["--advertise-data-port", &proxy.to_string()]);
        corrupting_proxy(proxy, a.port + 1, 3 << 20);
        let o = migrate(pid, &a, &[]);
        assert_eq!(o.status.code(), Some(2));
        assert!(running(pid), "after a corrupted stream");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
        let m = a.get("/v1/migrations");
        assert_eq!(m[0]["state"], "failed", "{m}");
        let err = m[0]["error"].as_str().unwrap_or("");
        assert!(err.contains("checksum") || err.contains("frame"), "{err}");
    }

    // The destination agent killed during pre-copy.
    {
        let mut a = Agent::start(&dir, 6, &[]);
        let h = migrate_in_background(pid, &a, &[]);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let m = a.try_get("/v1/migrations").unwrap_or_default();
            if m[0]["state"] == "receiving" && m[0]["bytes_received"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            assert!(Instant::now() < end, "migration never started: {m}");
            std::thread::sleep(Duration::from_millis(1));
        }
        a.kill();
        let o = h.join().unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(running(pid), "after the agent died");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis moves to another host with its service address while a client on a third host
/// writes over one TCP connection: the connection carries on, no acknowledged write is lost.
#[test]
fn redis_moves_with_its_address_and_its_client_connection() {
    redis_moves("precopy", "m", 7);
}

/// The same with post-copy: Redis answers on the destination before its memory is there.
#[test]
fn redis_moves_with_postcopy() {
    redis_moves("postcopy", "p", 23);
}

#[test]
fn redis_moves_with_hybrid() {
    redis_moves("hybrid", "h", 24);
}

#[test]
fn redis_moves_with_stop_and_copy() {
    redis_moves("stop", "s", 25);
}

fn redis_moves(mode: &str, tag: &str, agent_n: u16) {
    let dir = tmpdir(&format!("migrate-redis-{mode}"));
    let lan = Lan::new(tag, 3);
    let (a_ns, b_ns, c_ns) = (&lan.hosts[0], &lan.hosts[1], &lan.hosts[2]);
    let vip = format!("{}.100", lan.net);
    lan.add_address(0, &format!("{vip}/24"));
    let mut rc = NetPair::cmd(a_ns, "redis-server");
    rc.args([
        "--bind",
        &vip,
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
    .arg(&dir)
    .current_dir(&dir);
    let mut redis = start_cmd(rc, &dir.join("redis.log"));
    wait_for(&dir.join("redis.log"), "Ready to accept connections");
    let pid = redis.id();
    let agent = Agent::start_in(
        &dir,
        agent_n,
        &[],
        Some(&NetPair::path(b_ns)),
        &format!("{}.2", lan.net),
    );
    let addr = format!("{vip}:6379");
    let loader = NetPair::connect(c_ns, &addr);
    let mut lr = BufReader::new(loader.try_clone().unwrap());
    let mut lw = loader;
    const KEYS: usize = 50_000;
    let mut buf = Vec::new();
    for i in 0..KEYS {
        buf.extend(cmd(&["SET", &format!("key:{i}"), &format!("value-{i}")]));
    }
    lw.write_all(&buf).unwrap();
    for _ in 0..KEYS {
        assert_eq!(reply(&mut lr).unwrap(), Reply::Status("OK".into()));
    }
    let conn = NetPair::connect(c_ns, &addr);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let writer = Writer::start(&conn);
    writer.wait_acked(200);
    let o = migrate(
        pid,
        &agent,
        &["--move-address", &format!("{vip}/24"), "--mode", mode],
    );
    assert!(
        o.status.success(),
        "{:?}: {} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let r = json(&o);
    eprintln!(
        "redis migration ({mode}): downtime {} ms, total {} ms, fill {} ms, rounds {}",
        r["downtime_ms"],
        r["total_ms"],
        r["fill_ms"],
        r["rounds"].as_array().unwrap().len()
    );
    eprintln!("  phases {} restore {}", r["phases"], r["restore"]);
    if mode == "postcopy" || mode == "hybrid" {
        // The pages the restore itself touches in lazily filled memory (each thread's rseq
        // area at the top of its stack, which the kernel writes at registration) came in the
        // final image: no page was fetched from the source while the process was down.
        assert_eq!(r["frozen_faults"].as_u64(), Some(0), "{r}");
    }
    redis.wait().unwrap();
    writer.wait_acked(writer.acked() + 1000);
    let last = writer.finish();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let n = check_keys(
        &mut r,
        &mut w,
        (0..KEYS).map(|i| (format!("key:{i}"), format!("value-{i}"))),
    );
    let m = check_keys(
        &mut r,
        &mut w,
        (0..=last).map(|i| (format!("w:{i}"), i.to_string())),
    );
    w.write_all(&cmd(&["DBSIZE"])).unwrap();
    assert_eq!(reply(&mut r).unwrap(), Reply::Int((n + m) as i64));
    // It runs on the second host now.
    assert_eq!(agent.get("/v1/migrations")[0]["state"], "running");
    // The block of its traffic, installed on the first host before the freeze, is gone.
    for ns in [a_ns, b_ns] {
        let t = NetPair::cmd(ns, "nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        assert!(t.status.success());
        let t = String::from_utf8_lossy(&t.stdout);
        assert!(!t.contains(&format!("ferry_{pid}")), "{ns}: {t}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ferry demo`, the README's main job: a service moved to another host and back with its
/// address while a client writes over one connection; nothing lost, nothing left behind.
#[test]
fn the_demo_moves_a_service_there_and_back_and_cleans_up() {
    for extra in [&["--builtin"][..], &[][..]] {
        let mut args = vec!["demo", "--pause", "0.3", "--json"];
        args.extend_from_slice(extra);
        let o = ferry(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = json(&o);
        assert_eq!(v["writes_lost"], 0, "{v}");
        assert!(v["writes_acknowledged"].as_i64().unwrap() > 100, "{v}");
        assert_eq!(v["migrations"].as_array().unwrap().len(), 2);
        // The link was measured, and each total compared with the resident memory over it.
        for k in ["idle", "busy"] {
            assert!(v["link_gbps"][k].as_f64().is_some_and(|g| g > 0.01), "{v}");
        }
        for m in v["migrations"].as_array().unwrap() {
            let resident = m["report"]["resident_bytes"].as_u64().unwrap();
            assert!(resident > 1 << 20, "{m}");
            let total = m["report"]["total_ms"].as_f64().unwrap();
            let bound_ms = resident as f64 / v["link_gbps"]["idle"].as_f64().unwrap() / 1e6;
            let over = m["total_over_bound"]["idle_link"].as_f64().unwrap();
            assert!(
                (over - total / bound_ms).abs() < 1e-6 * over.max(1.0),
                "{m}"
            );
        }
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&ns.stdout).contains("ferry-demo"),
            "the demo left namespaces behind"
        );
    }
}

/// Hostile input never crashes an agent: junk on the page stream, a frame announcing a huge
/// length, a wrong token, bad JSON, unknown migrations. It keeps serving afterwards.
#[test]
fn hostile_input_never_crashes_the_agent() {
    let dir = tmpdir("migrate-hostile");
    let a = Agent::start(&dir, 8, &[]);
    let data = a.port + 1;
    let send = |bytes: &[u8]| {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", data)) {
            let _ = s.write_all(bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    };
    send(b"GET / HTTP/1.0\r\n\r\n");
    send(&[0xff; 4096]);
    let mut huge = ferry_migrate::wire::GREETING.to_vec();
    huge.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]);
    send(&huge);
    let mut hello = ferry_migrate::wire::GREETING.to_vec();
    let body = br#"{"id":"nope","token":"wrong"}"#;
    hello.extend_from_slice(&[1, 0, 0, 0]);
    hello.extend_from_slice(&(body.len() as u32).to_le_bytes());
    hello.extend_from_slice(body);
    hello.extend_from_slice(&[0, 0, 0, 0]);
    send(&hello);
    let http = |req: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let status = |r: &str| r.split_whitespace().nth(1).unwrap_or("").to_string();
    assert_eq!(status(&http("GET /v1/host HTTP/1.0\r\n\r\n")), "401");
    assert_eq!(
        status(&http(
            "GET /v1/host HTTP/1.0\r\nAuthorization: Bearer wrong-token-0123456789\r\n\r\n"
        )),
        "401"
    );
    let bad = format!(
        "POST /v1/migrations HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{{bad}}"
    );
    assert_eq!(status(&http(&bad)), "400");
    let unknown =
        format!("GET /v1/migrations/zzz HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    assert_eq!(status(&http(&unknown)), "404");
    // Still alive and serving.
    assert_eq!(a.get("/v1/host")["version"], env!("CARGO_PKG_VERSION"));
    assert!(a.get("/v1/migrations").as_array().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ferry restore --pidns`: the image restores with its PID inside a new PID namespace while
/// the original process still runs with that PID here.
#[test]
fn restore_into_a_new_pid_namespace_while_the_pid_is_taken() {
    let dir = tmpdir("pidns");
    let (mut child, out) = start_dirtier(&dir, "16", "1000");
    let pid = child.id();
    let img = dir.join("img");
    let d = dump_with(pid, &img, &["--leave-running"]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    // Without --pidns the PID is taken.
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--pidns"));
    let r = ferry(&[
        "restore",
        "--images",
        img.to_str().unwrap(),
        "--pidns",
        "--detach",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v = json(&r);
    assert_eq!(v["pid"].as_u64(), Some(pid as u64));
    // Find the copy: PID `pid` inside another namespace.
    let mine = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let copy = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|p| {
            let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let nspid = st.lines().find(|l| l.starts_with("NSpid:")).unwrap_or("");
            std::fs::read_link(format!("/proc/{p}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&mine)
                && nspid.split_whitespace().last() == Some(&pid.to_string())
                && st.contains("dirtier")
        })
        .expect("the restored copy");
    check_pass(copy, &out, 1);
    assert!(running(pid), "the original runs on");
    // Its namespace's init is the restoring ferry: killing it ends the copy.
    let ppid: u32 = std::fs::read_to_string(format!("/proc/{copy}/stat"))
        .unwrap()
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kill(ppid, "KILL");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The link to the destination goes down during pre-copy: the migration gives up after its
/// timeout and the process runs on at the source, intact.
#[test]
fn a_link_down_during_precopy_leaves_the_process_at_the_source() {
    let dir = tmpdir("migrate-link");
    let lan = Lan::new("k", 2);
    let agent = Agent::start_in(
        &dir,
        9,
        &[],
        Some(&NetPair::path(&lan.hosts[1])),
        &format!("{}.2", lan.net),
    );
    let (mut child, out) = start_dirtier(&dir, "256", "1000");
    let pid = child.id();
    let h = migrate_in_background(pid, &agent, &["--timeout", "3"]);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let m = agent.try_get("/v1/migrations").unwrap_or_default();
        if m[0]["bytes_received"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < end, "migration never started: {m}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let dev = format!("ek1{}", std::process::id() % 10000);
    let st = Command::new("ip")
        .args(["-n", &lan.hosts[1], "link", "set", &dev, "down"])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let o = h.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "gave up only after {:?}",
        t.elapsed()
    );
    assert!(running(pid), "after the link went down");
    check_pass(pid, &out, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process rewriting memory faster than the link carries it is throttled (a CPU cgroup
/// quota) so that pre-copy converges; afterwards it is intact where it landed.
#[test]
fn a_writer_faster_than_the_link_is_throttled_and_converges() {
    let dir = tmpdir("migrate-throttle");
    let a = Agent::start(&dir, 10, &[]);
    let (mut child, out) = start_dirtier(&dir, "128", "0");
    let pid = child.id();
    let o = migrate(pid, &a, &["--max-downtime", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    let notes = r["notes"].to_string();
    assert!(notes.contains("throttled"), "{r}");
    eprintln!(
        "throttled pre-copy: {} rounds, final {} bytes, downtime {} ms",
        r["rounds"].as_array().unwrap().len(),
        r["final_bytes"],
        r["downtime_ms"]
    );
    assert!(
        r["final_bytes"].as_u64().unwrap() < 64 << 20,
        "the final copy still carries half the memory: {r}"
    );
    child.wait().unwrap();
    check_pass(a.outer_pid(pid as i64), &out, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Post-copy to one agent, then hybrid from there to another, while the fixture keeps
/// writing: it runs on the destination before its memory is there, the rest follows from the
/// frozen source on demand, and the memory is intact each time.
#[test]
fn postcopy_and_hybrid_keep_memory_intact() {
    let dir = tmpdir("migrate-post");
    let a1 = Agent::start(&dir, 21, &[]);
    let a2 = Agent::start(&dir, 22, &[]);
    let (mut child, out) = start_dirtier(&dir, "128", "1000");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));
    let o = migrate(pid, &a1, &["--mode", "postcopy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    eprintln!("post-copy: {r}");
    assert_eq!(r["restored_pid"].as_i64(), Some(pid as i64));
    // One round ahead of the freeze, of the private file mappings only (the fixture's
    // written file mapping and the libraries' data), not of its 128 MiB of anonymous memory.
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{r}");
    let round0 = rounds[0]["bytes"].as_u64().unwrap();
    assert!(round0 > 0 && round0 < 8 << 20, "{r}");
    // The memory crossed after the process ran: the final copy carried little of it.
    assert!(r["postcopy_bytes"].as_u64().unwrap() >= 128 << 20, "{r}");
    assert!(r["final_bytes"].as_u64().unwrap() < 32 << 20, "{r}");
    assert!(r["fill_ms"].as_f64().is_some(), "{r}");
    // Each page crossed about once: answers asked ahead are placed wherever filling went
    // meanwhile, not fetched again.
    let resident = r["resident_bytes"].as_u64().unwrap();
    assert!(
        r["postcopy_bytes"].as_u64().unwrap() <= resident + resident / 10,
        "{r}"
    );
    // The writer's faults waited, and that wait is told.
    if r["faults"].as_u64().unwrap() > 0 {
        let (mean, max) = (
            r["mean_fault_ms"].as_f64().unwrap(),
            r["max_fault_ms"].as_f64().unwrap(),
        );
        assert!(mean > 0.0 && mean <= max, "{r}");
    }
    child.wait().unwrap();
    let p1 = a1.outer_pid(pid as i64);
    check_pass(p1, &out, 1);

    let o = Command::new("nsenter")
        .args(["-t", &a1.init_pid().to_string(), "--pid", "--mount"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(["migrate", "--pid", &pid.to_string(), "--to", &a2.url])
        .args(["--mode", "hybrid", "--token-file"])
        .arg(&a2.tok)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    eprintln!("hybrid: {r}");
    assert!(!r["rounds"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["fill_ms"].as_f64().is_some(), "{r}");
    // The source was let go once nothing was left in it, while the destination still filled
    // the pages the rounds brought from its own copy; it tells when the memory was whole.
    assert!(r["fill_left_bytes"].as_u64().unwrap() > 0, "{r}");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let m = a2.try_get("/v1/migrations").unwrap_or_default();
        if m[0]["fill_ms"].as_f64().is_some() {
            assert_eq!(m[0]["state"], "running", "{m}");
            break;
        }
        assert!(Instant::now() < end, "never filled: {m}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let p2 = a2.outer_pid(pid as i64);
    assert!(!alive(p1), "the first copy still runs");
    check_pass(p2, &out, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The destination agent killed during post-copy, after the process ran there: the source
/// still holds the frozen copy, resumes it, and its memory is intact; the destination's copy
/// dies with its agent (the guardian, or the agent's PID namespace).
#[test]
fn the_destination_killed_during_postcopy_leaves_the_process_at_the_source() {
    let dir = tmpdir("migrate-postkill");
    let mut a = Agent::start(&dir, 26, &[]);
    let (mut child, out) = start_dirtier(&dir, "512", "1000");
    let pid = child.id();
    let h = migrate_in_background(pid, &a, &["--mode", "postcopy"]);
    // Running on the destination, its memory still crossing.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let m = a.try_get("/v1/migrations").unwrap_or_default();
        if m[0]["state"] == "running" {
            break;
        }
        assert!(Instant::now() < end, "never ran on the destination: {m}");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.kill();
    let o = h.join().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("post-copy lost the destination"), "{e}");
    assert!(running(pid), "the source copy did not resume");
    check_pass(pid, &out, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hybrid's post-copy window: the process runs at the destination, its last pages still at
/// the source, when the destination agent is killed (not PID 1 of its namespace: the
/// guardian must kill the tree, not the namespace). The source resumes its frozen copy, and
/// nothing of the process is left at the destination.
#[test]
fn the_destination_killed_during_hybrid_postcopy_leaves_the_process_at_the_source() {
    let dir = tmpdir("migrate-hybridkill");
    let a = Agent::held_at(&dir, 51, "running");
    let (mut child, out) = start_dirtier(&dir, "128", "1000");
    let pid = child.id();
    let h = migrate_in_background(pid, &a, &["--mode", "hybrid"]);
    a.wait_paused("running", &h);
    let (moved, state) = a
        .live_process(pid as i64)
        .expect("the process runs at the destination");
    assert!(state == 'S' || state == 'R', "{moved}: {state}");
    assert!(!running(pid), "the source copy is not frozen");
    a.kill_agent_only();
    let o = h.join().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("post-copy lost the destination"), "{e}");
    assert!(running(pid), "the source copy did not resume");
    check_pass(pid, &out, 1);
    a.wait_gone(pid as i64, "after the agent died");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Faults in post-copy's window, the process running at the destination while the source
/// holds its frozen copy:
/// - hybrid, the link cut just after the destination has every page it needed from the
///   source, before Filled can reach the source (the agent's test hook stops it there). The
///   source never hears Filled and resumes its copy; the destination, never hearing the
///   source's Released, must kill its own first, or the process would run on both hosts;
/// - post-copy, a byte of the first page data the source sends corrupted on the way;
/// - hybrid into a state directory too small for the rounds' pages.
///
/// Each time the process runs on at the source, intact, and nothing of it at the destination.
/// Last, the link cut just after the destination read Released, before its Kept arrives:
/// the source copy is gone, the process runs on at the destination, and the source says it
/// could not confirm that (exit 2).
#[test]
fn faults_in_the_postcopy_window_leave_the_process_on_exactly_one_host() {
    let dir = tmpdir("migrate-window");
    let cut = CutLink::new("w");
    let link = |state: &str| cut.link(state);
    let (mut child, out) = start_dirtier(&dir, "64", "1000");
    let pid = child.id();
    let mut verdicts = 0;

    // The link cut once the destination no longer needs the source.
    {
        let a = cut.held_agent(&dir, 60, "released");
        let t = Instant::now();
        let h = migrate_in_background(pid, &a, &["--mode", "hybrid", "--timeout", "3"]);
        let paused = a.wait_paused("released", &h);
        let (moved, state) = a
            .live_process(pid as i64)
            .expect("the process runs at the destination");
        assert!(state == 'S' || state == 'R', "{moved}: {state}");
        assert!(!running(pid), "the source copy is not frozen");
        link("down");
        std::fs::remove_file(&paused).unwrap();
        let o = h.join().unwrap();
        eprintln!(
            "link cut before Filled: the source resumed after {:?}",
            t.elapsed()
        );
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("post-copy lost the destination"), "{e}");
        // The destination gave its copy up before the source resumed its own.
        assert_eq!(
            a.live_process(pid as i64),
            None,
            "the process runs at both hosts"
        );
        assert!(running(pid), "the source copy did not resume");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
        link("up");
        let m = a.get("/v1/migrations");
        assert_eq!(m[0]["state"], "failed", "{m}");
        let err = m[0]["error"].as_str().unwrap_or("");
        assert!(err.contains("did not confirm"), "{err}");
    }

    // A corrupted page on its way to the running destination.
    {
        let a = Agent::behind_corrupting_proxy(&dir, 61, 13);
        let o = migrate(pid, &a, &["--mode", "postcopy", "--timeout", "3"]);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert!(running(pid), "the source copy did not resume");
        verdicts += 1;
        check_pass(pid, &out, verdicts);
        a.wait_gone(pid as i64, "after a corrupted page");
        let m = a.get("/v1/migrations");
        assert_eq!(m[0]["state"], "failed", "{m}");
        let err = m[0]["error"].as_str().unwrap_or("");
        assert!(err.contains("checksum"), "{err}");
    }

    // Hybrid's rounds into a state directory with no room for them.
    {
        let small = SmallFs::mount(&dir, "4m");
        {
            let a = Agent::start(&dir, 62, &["--state-dir", small.0.to_str().unwrap()]);
            let o = migrate(pid, &a, &["--mode", "hybrid"]);
            assert_eq!(o.status.code(), Some(2), "{o:?}");
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains("space"), "{e}");
            assert!(running(pid), "after a full state directory");
            verdicts += 1;
            check_pass(pid, &out, verdicts);
            a.wait_gone(pid as i64, "after a full state directory");
        }
        drop(small);
    }

    // The link cut after Released, before Kept: the process runs at the destination only.
    {
        let a = cut.held_agent(&dir, 68, "kept");
        let h = migrate_in_background(pid, &a, &["--mode", "hybrid", "--timeout", "3"]);
        let paused = a.wait_paused("kept", &h);
        link("down");
        std::fs::remove_file(&paused).unwrap();
        let o = h.join().unwrap();
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("did not confirm it kept its own"), "{e}");
        link("up");
        // Killed at the source (our child: reaped here).
        child.wait().unwrap();
        let (moved, state) = a
            .live_process(pid as i64)
            .expect("the process runs at the destination");
        assert!(state == 'S' || state == 'R', "{moved}: {state}");
        // Intact there (it writes its verdicts to the same file).
        verdicts += 1;
        check_pass(moved, &out, verdicts);
        a.kill_agent_only();
        let _ = Command::new("kill")
            .args(["-9", &moved.to_string()])
            .status();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `ferry migrate` interrupted: Ctrl-C (SIGINT) during pre-copy, and SIGTERM while the process
/// is frozen and the destination holds its whole image. Each time `ferry migrate` stops where
/// the process is left whole: it exits 2 saying so, the process runs on at the source with
/// its memory intact and no fd of ours left in it, and nothing of it is left at the
/// destination. Without the handling, SIGTERM while frozen ended `ferry migrate` with the
/// process detached but its migration state left behind, and between Ready and Go with the
/// source copy bound to die with it.
#[test]
fn an_interrupted_migration_leaves_the_process_running_at_the_source() {
    let dir = tmpdir("migrate-sigint");
    let (mut child, out) = start_dirtier(&dir, "256", "1000");
    let pid = child.id();
    let fds = fd_count(pid);
    let spawn = |a: &Agent| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(migrate_args(pid, a, &["--timeout", "5"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for (n, sig, point) in [(64u16, "INT", None), (65, "TERM", Some("commit"))] {
        let env: Vec<(&str, &str)> = point
            .map(|p| ("FERRY_AGENT_PAUSE_AT", p))
            .into_iter()
            .collect();
        let a = Agent::launch(&dir, n, &[], None, "127.0.0.1", true, &env);
        let m = spawn(&a);
        let end = Instant::now() + Duration::from_secs(30);
        match point {
            None => loop {
                // Pre-copy under way.
                let st = a.try_get("/v1/migrations").unwrap_or_default();
                if st[0]["bytes_received"].as_u64().unwrap_or(0) > 0 {
                    break;
                }
                assert!(Instant::now() < end, "pre-copy never started: {st}");
                std::thread::sleep(Duration::from_millis(1));
            },
            Some(p) => {
                let paused = a.state.join(format!("paused-{p}"));
                while !paused.exists() {
                    assert!(Instant::now() < end, "the agent never reached {p}");
                    std::thread::sleep(Duration::from_millis(2));
                }
                assert!(!running(pid), "the source copy is not frozen");
            }
        }
        kill(m.id(), sig);
        if let Some(p) = point {
            // Frozen, it waits for the destination's answer, then stops before Go.
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_file(a.state.join(format!("paused-{p}")));
        }
        let o = m.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "SIG{sig}: {e}");
        assert!(e.contains(&format!("interrupted by SIG{sig}")), "{e}");
        assert!(e.contains("runs on here"), "{e}");
        assert!(
            running(pid),
            "SIG{sig}: the process does not run at the source"
        );
        assert_eq!(
            fd_count(pid),
            fds,
            "SIG{sig}: an fd was left in the process"
        );
        let verdicts = if point.is_none() { 1 } else { 2 };
        check_pass(pid, &out, verdicts);
        a.wait_gone(pid as i64, &format!("after SIG{sig}"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent of another Ferry version, whose page-stream protocol is not ours (one that
/// predates the field says none), is refused before anything is frozen or sent: exit 2,
/// both versions named, the process untouched.
#[test]
fn an_agent_speaking_another_protocol_is_refused_before_the_freeze() {
    let dir = tmpdir("migrate-proto");
    let a = Agent::start(&dir, 66, &[]);
    let (mut child, out) = start_dirtier(&dir, "16", "1000");
    let pid = child.id();
    let mut host = a.get("/v1/host");
    assert_eq!(host["protocol"], ferry_migrate::wire::PROTOCOL, "{host}");
    for old in [Some(1), None] {
        match old {
            Some(p) => host["protocol"] = p.into(),
            None => {
                host.as_object_mut().unwrap().remove("protocol");
            }
        }
        // An "agent" that answers every request with that host information.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let body = host.to_string();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut req = [0u8; 4096];
                let _ = c.read(&mut req);
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let o = ferry(&[
            "migrate",
            "--pid",
            &pid.to_string(),
            "--to",
            &format!("http://127.0.0.1:{port}"),
            "--token-file",
            a.tok.to_str().unwrap(),
        ]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{e}");
        let theirs = old.unwrap_or(0);
        assert!(
            e.contains(&format!("speaks page-stream protocol {theirs}"))
                && e.contains(&format!("speaks {}", ferry_migrate::wire::PROTOCOL)),
            "{e}"
        );
        assert!(running(pid), "the process was touched");
    }
    check_pass(pid, &out, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pre-copy migration prepared ahead: the agent makes memory resident for the process (a
/// stub holding its PID and the memory), and the process built at the destination takes that
/// memory in (moved, not copied) before the pages arrive. Its memory is intact after, its
/// resident size at the destination is about the source's (the pages moved in but never
/// written are few), and a cancelled reservation lets go of the PID and the memory.
#[test]
fn a_prepared_precopy_migration_moves_reserved_memory_in() {
    let dir = tmpdir("migrate-resv");
    let a = Agent::start(&dir, 28, &[]);
    let (mut child, out) = start_dirtier(&dir, "96", "1000");
    let pid = child.id();
    let rss = |p: u32| -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        st.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse::<u64>()
            .unwrap()
            << 10
    };
    let prep = || {
        let o = migrate(pid, &a, &["--prepare-only", "--mode", "precopy"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json(&o)
    };
    // The stub that holds the reservation runs in the agent's PID namespace with the PID.
    let stub_of = || a.find_pid(pid as i64);
    let p = prep();
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(p["prepared"]["memory"], "resident", "{p}");
    let src_rss = rss(pid);
    let held = p["prepared"]["memory_bytes"].as_u64().unwrap();
    assert!(held >= 96 << 20, "{p}");
    let stub = stub_of().expect("a stub holds the reserved memory");
    assert!(
        rss(stub) >= 96 << 20,
        "the reserved memory is resident: {}",
        rss(stub)
    );
    assert!(running(pid), "preparing froze nothing");
    // Cancelled: the stub goes, and with it the memory and the PID.
    let body = a.cancel(&id);
    assert!(body.contains("cancelled"), "{body}");
    let end = Instant::now() + Duration::from_secs(10);
    while stub_of().is_some() {
        assert!(
            Instant::now() < end,
            "the cancelled reservation's stub is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Prepared twice: the first lets its memory (and the PID) go to the second.
    let first = prep()["id"].as_str().unwrap().to_string();
    let p = prep();
    assert_eq!(p["prepared"]["memory"], "resident", "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    let m = a.get(&format!("/v1/migrations/{first}"));
    assert!(let_go(&m), "{m}");
    let o = migrate(pid, &a, &["--prepared", &id, "--mode", "precopy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    let warm = r["restore"]["agent"]["warm"].as_str().unwrap_or("");
    assert!(
        warm.contains("moved in resident from the reservation"),
        "{r}"
    );
    assert_eq!(r["restore"]["warm"], "used", "{r}");
    child.wait().unwrap();
    let p1 = a.outer_pid(pid as i64);
    check_pass(p1, &out, 1);
    let dst_rss = rss(p1);
    eprintln!(
        "resident: source {} MiB, destination {} MiB",
        src_rss >> 20,
        dst_rss >> 20
    );
    assert!(
        dst_rss <= src_rss + src_rss / 4 + (8 << 20),
        "destination resident {dst_rss} against {src_rss} at the source"
    );
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Memory reserved for a prepared migration holds the process's PID at the destination: a
/// migration of the same process announced without `--prepared` takes the PID back from it
/// (the prepared one stays, without its memory) and moves the process intact.
#[test]
fn an_unprepared_migration_takes_the_pid_back_from_a_reservation() {
    let dir = tmpdir("migrate-resv2");
    let a = Agent::start(&dir, 29, &[]);
    let (mut child, out) = start_dirtier(&dir, "32", "1000");
    let pid = child.id();
    let o = migrate(pid, &a, &["--prepare-only", "--mode", "precopy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = json(&o);
    assert_eq!(p["prepared"]["memory"], "resident", "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    assert!(a.find_pid(pid as i64).is_some(), "a stub holds the PID");
    let o = migrate(pid, &a, &["--mode", "precopy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert_ne!(r["migration"], id.as_str(), "{r}");
    child.wait().unwrap();
    check_pass(a.outer_pid(pid as i64), &out, 1);
    let m = a.get(&format!("/v1/migrations/{id}"));
    assert_eq!(m["state"], "prepared", "{m}");
    assert!(let_go(&m), "{m}");
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A migration prepared ahead: the agent gives its own CPU verdict and reserves disk for the
/// memory (the page store is allocated), a reservation too large for its state directory is
/// refused with the reason, a cancelled one frees its room, and the prepared migration then
/// runs as usual with the memory intact.
#[test]
fn a_prepared_migration_reserves_room_and_then_runs() {
    let dir = tmpdir("migrate-prep");
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    let a = Agent::start(&dir, 27, &["--state-dir", small.to_str().unwrap()]);
    // Too big for a 96 MiB state directory: refused, nothing frozen.
    let (mut big, big_out) = start_dirtier(&dir, "128", "1000");
    let o = migrate(big.id(), &a, &["--prepare-only"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("507") && e.contains("reserving"), "{e}");
    assert!(running(big.id()));
    check_pass(big.id(), &big_out, 1);
    big.kill().unwrap();
    big.wait().unwrap();

    let (mut child, out) = start_dirtier(&dir, "32", "1000");
    let pid = child.id();
    let prep = |extra: &[&str]| {
        let mut args = vec!["--prepare-only"];
        args.extend_from_slice(extra);
        let o = migrate(pid, &a, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json(&o)
    };
    let p = prep(&[]);
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(p["prepared"]["verdict"], "compatible", "{p}");
    let reserved = p["prepared"]["reserved_bytes"].as_u64().unwrap();
    assert!(reserved >= 32 << 20, "{p}");
    let store = small.join(&id).join("precopy.pages");
    let allocated = std::fs::metadata(&store).unwrap().len();
    assert!(allocated >= reserved, "{allocated} < {reserved}");
    let m = a.get(&format!("/v1/migrations/{id}"));
    assert_eq!(m["state"], "prepared", "{m}");
    assert!(running(pid), "preparing froze nothing");

    // Cancelled: the room is free again.
    let body = a.cancel(&id);
    assert!(body.contains("cancelled"), "{body}");
    assert!(!store.exists(), "the reservation was kept");

    // Prepared again, then migrated.
    let id = prep(&[])["id"].as_str().unwrap().to_string();
    let o = migrate(pid, &a, &["--prepared", &id, "--mode", "hybrid"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["migration"], id.as_str());
    child.wait().unwrap();
    check_pass(a.outer_pid(pid as i64), &out, 1);
    drop(a);
    let _ = Command::new("umount").arg(&small).status();
    let _ = std::fs::remove_dir_all(&dir);
}
