//! The synthetic corpus: C programs (sources embedded in Ferry) built at run time, each with a
//! dispatch decision that can be forced (see corpus/ferry.h for the protocol).

use crate::run::{line_reader, qemu_cmd, run_limited, wait_line};
use crate::{Running, Workload};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

macro_rules! files {
    ($($f:literal),* $(,)?) => { &[$(($f, include_str!(concat!("../corpus/", $f)))),*] };
}

const FILES: &[(&str, &str)] = files!(
    "manifest.txt",
    "ferry.h",
    "dot.h",
    "kernel.c",
    "fnptr.c",
    "ifunc.c",
    "target_clones.c",
    "dlopen_avx2.c",
    "avx2lib.c",
    "jit_avx2.c",
    "avx512_never.c",
    "thread_avx.c",
    "sighandler_avx.c",
    "lzcnt0.c",
    "dead_avx512.c",
);

pub struct Entry {
    pub name: String,
    /// CPU features the native run cannot do without (manifest `needs=`).
    pub needs: Vec<String>,
    pub bin: PathBuf,
    pub dir: PathBuf,
}

fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(())
}

/// Write the sources out and compile every manifest entry.
pub fn build(dir: &Path) -> Result<Vec<Box<dyn Workload>>> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in FILES {
        std::fs::write(dir.join(name), text)?;
    }
    let manifest = FILES[0].1;
    let mut out: Vec<Box<dyn Workload>> = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.splitn(5, '|').collect();
        if f.len() < 4 {
            bail!("corpus manifest: malformed line {line:?}");
        }
        let (name, compiler, cflags, sources) = (f[0], f[1], f[2], f[3]);
        let extra = f.get(4).copied().unwrap_or("");
        let needs: Vec<String> = extra
            .split(';')
            .filter_map(|s| s.strip_prefix("needs="))
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        for item in extra.split(';').filter(|s| !s.is_empty()) {
            if let Some(lib) = item.strip_prefix("lib=") {
                let mut p = lib.splitn(3, ':');
                let (lout, lsrc, lflags) = (
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                );
                let mut c = Command::new("gcc");
                c.current_dir(dir)
                    .args(lflags.split_whitespace())
                    .arg("-o")
                    .arg(lout)
                    .arg(lsrc);
                sh(&mut c, &format!("building {lout} for {name}"))?;
            }
        }
        let mut c = match compiler {
            "musl" => {
                let mut c = Command::new("musl-gcc");
                c.arg("-static");
                c
            }
            "glibc-static" => {
                let mut c = Command::new("gcc");
                c.arg("-static");
                c
            }
            "glibc" => Command::new("gcc"),
            other => bail!("corpus manifest: {name}: unknown compiler {other:?}"),
        };
        c.current_dir(dir)
            .args(cflags.split_whitespace())
            .arg("-o")
            .arg(name)
            .args(sources.split_whitespace());
        if compiler == "glibc" {
            c.arg("-ldl");
        }
        sh(
            &mut c,
            &format!("building corpus program {name} (needs gcc and musl-tools)"),
        )?;
        out.push(Box::new(Entry {
            name: name.to_string(),
            needs,
            bin: dir.join(name),
            dir: dir.to_path_buf(),
        }));
    }
    Ok(out)
}

impl Workload for Entry {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn needs(&self) -> Vec<String> {
        self.needs.clone()
    }

    fn start(&self) -> Result<Running> {
        let mut child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .env("FERRY_LIBDIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let rx = line_reader(&mut child)?;
        let ready = wait_line(&rx, "ready", &self.name, Duration::from_secs(20))?;
        let dispatch = ready
            .split_once("dispatch=")
            .map(|(_, d)| d.trim().to_string())
            .unwrap_or_default();
        Ok(Running {
            name: self.name.clone(),
            dispatch,
            child,
            rx: Some(rx),
            extra: None,
        })
    }

    fn finish(&self, mut r: Running) -> Result<String> {
        nix_kill(r.child.id() as i32, libc::SIGUSR1);
        let rx = r.rx.take().unwrap();
        let line = wait_line(&rx, "result=", &r.name, Duration::from_secs(30));
        let status = r.child.wait()?;
        let line = line?;
        if !status.success() {
            bail!("{}: native run failed: {status}", r.name);
        }
        Ok(line)
    }

    fn truth(
        &self,
        qemu: &str,
        model: &str,
        dispatch: &str,
    ) -> Result<std::result::Result<String, String>> {
        let mut c = qemu_cmd(qemu, model, &self.bin.display().to_string(), &[]);
        c.current_dir(&self.dir)
            .env("FERRY_LIBDIR", &self.dir)
            .env("FERRY_FORCE", dispatch)
            .env("FERRY_NOWAIT", "1");
        Ok(run_limited(c, None, Duration::from_secs(120))?.map(|out| {
            String::from_utf8_lossy(&out)
                .lines()
                .find(|l| l.starts_with("result="))
                .unwrap_or("")
                .to_string()
        }))
    }
}

pub fn nix_kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}
