//! Running workloads: natively up to their ready line, and under qemu with a time limit.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub fn find_qemu() -> Result<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    for name in ["qemu-x86_64", "qemu-x86_64-static"] {
        for dir in path.split(':') {
            let p = std::path::Path::new(dir).join(name);
            if p.is_file() {
                return Ok(p.display().to_string());
            }
        }
    }
    bail!("neither qemu-x86_64 nor qemu-x86_64-static is on PATH")
}

/// Lines of a child's stdout, read by a thread so that waits can time out.
pub fn line_reader(child: &mut Child) -> Result<Receiver<String>> {
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("stdout not piped"))?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    Ok(rx)
}

/// Wait for a line starting with `prefix`; returns it.
pub fn wait_line(
    rx: &Receiver<String>,
    prefix: &str,
    what: &str,
    limit: Duration,
) -> Result<String> {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Ok(l),
            Ok(_) => continue,
            Err(_) => bail!("{what}: no {prefix:?} line within {limit:?}"),
        }
    }
}

/// Run a command to completion with a time limit and no core dumps. Ok(stdout) when it exits
/// 0, Err(description) when it dies or fails.
pub fn run_limited(
    mut cmd: Command,
    stdin_data: Option<&[u8]>,
    limit: Duration,
) -> Result<std::result::Result<Vec<u8>, String>> {
    cmd.stdin(if stdin_data.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let Some(d) = stdin_data {
        let mut sin = child.stdin.take().unwrap();
        let d = d.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = sin.write_all(&d);
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(match status {
        None => Err(format!("timed out after {limit:?}")),
        Some(s) if s.success() => Ok(stdout),
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            let tail = String::from_utf8_lossy(&stderr);
            let tail: String = tail
                .lines()
                .rfind(|l| !l.contains("TCG doesn't support"))
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            Err(match (s.signal(), s.code()) {
                (Some(4), _) | (_, Some(132)) => "SIGILL".to_string(),
                (Some(sig), _) => format!("killed by signal {sig}"),
                (_, Some(c)) if c > 128 => format!("died with signal {}", c - 128),
                (_, Some(c)) => format!("exit status {c}: {tail}"),
                _ => "failed".to_string(),
            })
        }
    })
}

/// `qemu -cpu MODEL` with core dumps off (a guest SIGILL would otherwise leave core files).
pub fn qemu_cmd(qemu: &str, model: &str, prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -c 0; exec \"$@\"")
        .arg("sh")
        .arg(qemu)
        .arg("-cpu")
        .arg(model)
        .arg(prog)
        .args(args);
    c
}
