//! Real programs from Debian: filters fed through stdin (python3, zstd, openssl) and
//! redis-server driven over a Unix socket. They are scanned while blocked waiting for input.
//!
//! glibc resolves its own ifuncs for the CPU it starts on, and that cannot be forced under
//! qemu; OpenSSL's dispatch can (`OPENSSL_ia32cap`), and is set to this host's CPUID.

use crate::run::{qemu_cmd, run_limited};
use crate::{Running, Workload};
use anyhow::{bail, Context, Result};
use ferry_cpu::CpuProfile;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn which(name: &str) -> Option<String> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// OPENSSL_ia32cap value that makes OpenSSL choose what it chose on this host.
fn openssl_caps() -> String {
    let p = CpuProfile::host().ok();
    let get = |l: u32, s: u32| {
        p.as_ref().and_then(|p| {
            p.leaves
                .iter()
                .find(|x| x.leaf == l && x.subleaf == s)
                .copied()
        })
    };
    let (l1, l7) = (get(1, 0), get(7, 0));
    let w0 = l1.map(|l| l.edx as u64 | (l.ecx as u64) << 32).unwrap_or(0);
    let w1 = l7.map(|l| l.ebx as u64 | (l.ecx as u64) << 32).unwrap_or(0);
    format!("{w0:#x}:{w1:#x}")
}

fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{} bytes fnv {h:016x}", data.len())
}

/// Deterministic, compressible input.
fn input(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    let mut x: u32 = 12345;
    while v.len() < size {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        let w =
            ["alpha", "beta", "gamma", "delta", "ferry", "migrate", "cpu"][(x >> 16) as usize % 7];
        v.extend_from_slice(format!("{w} {} ", (x >> 8) % 1000).as_bytes());
        if x.is_multiple_of(11) {
            v.push(b'\n');
        }
    }
    v.truncate(size);
    v
}

/// A program that reads all of stdin and writes a result.
struct Filter {
    name: String,
    prog: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    input: Vec<u8>,
}

/// Is some thread of `pid` blocked in read(0, ...)?
fn blocked_in_read(pid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    dir.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_to_string(e.path().join("syscall"))
            .map(|s| s.starts_with("0 0x0 "))
            .unwrap_or(false)
    })
}

impl Workload for Filter {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn start(&self) -> Result<Running> {
        let mut child = Command::new(&self.prog)
            .args(&self.args)
            .envs(self.env.iter().map(|(a, b)| (a, b)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.prog))?;
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut v = Vec::new();
            let mut o = out;
            let _ = o.read_to_end(&mut v);
            v
        });
        // The reader runs first: a streaming filter blocks when its output is not drained.
        let half = self.input.len() / 2;
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(&self.input[..half])?;
        // Wait until it has eaten the first half and waits for more.
        let end = Instant::now() + Duration::from_secs(30);
        while !blocked_in_read(child.id()) {
            if Instant::now() > end {
                let _ = child.kill();
                bail!("{}: never blocked reading its input", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Running {
            name: self.name.clone(),
            dispatch: "none".into(),
            child,
            rx: None,
            extra: Some(Box::new(reader)),
        })
    }

    fn finish(&self, mut r: Running) -> Result<String> {
        let half = self.input.len() / 2;
        {
            let mut sin = r.child.stdin.take().unwrap();
            sin.write_all(&self.input[half..])?;
        }
        let status = r.child.wait()?;
        let reader = r
            .extra
            .take()
            .unwrap()
            .downcast::<std::thread::JoinHandle<Vec<u8>>>()
            .map_err(|_| anyhow::anyhow!("internal: reader"))?;
        let out = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("{}: native run failed: {status}", self.name);
        }
        Ok(fnv(&out))
    }

    fn truth(
        &self,
        qemu: &str,
        model: &str,
        _dispatch: &str,
    ) -> Result<std::result::Result<String, String>> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut c = qemu_cmd(qemu, model, &self.prog, &args);
        c.envs(self.env.iter().map(|(a, b)| (a, b)));
        Ok(run_limited(c, Some(&self.input), Duration::from_secs(300))?.map(|o| fnv(&o)))
    }
}

/// redis-server on a Unix socket, driven by redis-cli.
struct Redis {
    server: String,
    cli: String,
    dir: PathBuf,
}

const REDIS_SCRIPT: &str = "SET a 1\nINCRBY a 41\nGET a\nRPUSH l x y z\nLRANGE l 0 -1\nSADD s p q r p\nSCARD s\nZADD z 1 one 2 two 3 three\nZRANGE z 0 -1 WITHSCORES\nHSET h f1 v1 f2 v2\nHGETALL h\nSET big 0\nDEBUG DIGEST-VALUE a\nSTRLEN a\nAPPEND a 123456789\nGETRANGE a 0 4\nBITCOUNT a\nPFADD hll a b c d e f g\nPFCOUNT hll\nDBSIZE\n";

impl Redis {
    fn start_on(&self, sock: &Path, under: Option<(&str, &str)>) -> Result<std::process::Child> {
        let _ = std::fs::remove_file(sock);
        let args = [
            "--port",
            "0",
            "--unixsocket",
            &sock.display().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &self.dir.display().to_string(),
            "--loglevel",
            "warning",
        ];
        let mut c = match under {
            Some((q, m)) => qemu_cmd(q, m, &self.server, &args),
            None => {
                let mut c = Command::new(&self.server);
                c.args(args);
                c
            }
        };
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                return Ok(child);
            }
            if let Some(s) = child.try_wait()? {
                bail!("redis-server exited at start: {s}");
            }
            if Instant::now() > end {
                let _ = child.kill();
                bail!("redis-server did not open {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn drive(&self, sock: &Path) -> Result<std::result::Result<String, String>> {
        let mut c = Command::new(&self.cli);
        c.arg("-s").arg(sock);
        let r = run_limited(c, Some(REDIS_SCRIPT.as_bytes()), Duration::from_secs(120))?;
        let _ = Command::new(&self.cli)
            .arg("-s")
            .arg(sock)
            .args(["SHUTDOWN", "NOSAVE"])
            .output();
        Ok(r.map(|o| String::from_utf8_lossy(&o).replace('\n', " | ")))
    }
}

impl Workload for Redis {
    fn name(&self) -> String {
        "redis-server".into()
    }

    fn start(&self) -> Result<Running> {
        let sock = self.dir.join("native.sock");
        let child = self.start_on(&sock, None)?;
        Ok(Running {
            name: self.name(),
            dispatch: "none".into(),
            child,
            rx: None,
            extra: Some(Box::new(sock)),
        })
    }

    fn finish(&self, mut r: Running) -> Result<String> {
        let sock = *r
            .extra
            .take()
            .unwrap()
            .downcast::<PathBuf>()
            .map_err(|_| anyhow::anyhow!("internal"))?;
        let out = self.drive(&sock)?;
        let _ = r.child.wait();
        out.map_err(|e| anyhow::anyhow!("redis-cli against the native server: {e}"))
    }

    fn truth(
        &self,
        qemu: &str,
        model: &str,
        _dispatch: &str,
    ) -> Result<std::result::Result<String, String>> {
        let sock = self.dir.join(format!("{model}.sock"));
        let mut child = match self.start_on(&sock, Some((qemu, model))) {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("{e}"))),
        };
        let r = self.drive(&sock)?;
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if Instant::now() > end {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(match (r, status) {
            (Ok(_), Some(s)) if !s.success() => Err(format!("redis-server under qemu: {s}")),
            (r, _) => r,
        })
    }
}

pub fn workloads(dir: &Path) -> Result<Vec<Box<dyn Workload>>> {
    std::fs::create_dir_all(dir)?;
    let mut v: Vec<Box<dyn Workload>> = Vec::new();
    let caps = openssl_caps();
    if let Some(p) = which("python3")
        .filter(|p| !p.contains("pyenv"))
        .or_else(|| {
            Path::new("/usr/bin/python3")
                .is_file()
                .then(|| "/usr/bin/python3".to_string())
        })
    {
        v.push(Box::new(Filter {
            name: "python3".into(),
            prog: p,
            args: vec![
                "-c".into(),
                "import sys,hashlib,zlib,json\nd=sys.stdin.buffer.read()\nprint(hashlib.sha256(d).hexdigest(), len(zlib.compress(d,6)), sum(x*x for x in range(100000)), json.dumps(sorted(set(d.split()))[:5], default=str))".into(),
            ],
            env: vec![("OPENSSL_ia32cap".into(), caps.clone())],
            input: input(256 << 10),
        }));
    }
    if let Some(p) = which("zstd") {
        v.push(Box::new(Filter {
            name: "zstd".into(),
            prog: p,
            args: vec!["-3".into(), "-c".into(), "-T1".into()],
            env: vec![],
            input: input(1 << 20),
        }));
    }
    if let Some(p) = which("openssl") {
        v.push(Box::new(Filter {
            name: "openssl".into(),
            prog: p,
            args: "enc -aes-128-cbc -K 000102030405060708090a0b0c0d0e0f -iv 0f0e0d0c0b0a09080706050403020100".split(' ').map(String::from).collect(),
            env: vec![("OPENSSL_ia32cap".into(), caps)],
            input: input(1 << 20),
        }));
    }
    if let (Some(server), Some(cli)) = (which("redis-server"), which("redis-cli")) {
        v.push(Box::new(Redis {
            server,
            cli,
            dir: dir.to_path_buf(),
        }));
    }
    if v.len() < 4 {
        eprintln!("eval: some real programs are not installed (python3, zstd, openssl, redis-server): evaluating {} of 4", v.len());
    }
    Ok(v)
}
