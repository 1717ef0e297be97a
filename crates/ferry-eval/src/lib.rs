//! Evaluation of Ferry's CPU verdicts against real CPUs emulated by qemu.
//!
//! For every workload (a corpus of C programs built at run time, plus real Debian programs)
//! the workload is started natively on this host, scanned while it waits at its "ready"
//! point, and judged against every qemu CPU model by three predictors: Ferry `paths`, Ferry
//! `full` and the CRIU policy. The ground truth runs the workload's work phase under
//! `qemu-x86_64 -cpu MODEL` with the source's dispatch decision forced (`FERRY_FORCE`): a
//! SIGILL or a different output means incompatible. Register state that the destination
//! cannot hold (XSTATE_BV outside its XCR0) is also incompatible: the kernel refuses to load
//! it into a restored thread.

mod corpus;
mod models;
mod real;
mod run;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_cpu::check::{check_criu, check_ferry, Outcome};
use ferry_cpu::process::{scan_process, ProcessScan};
use ferry_cpu::scan::Mode;
use ferry_cpu::CpuProfile;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Only these qemu models (comma-separated); default: every model of the gating matrix.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Only these workloads (comma-separated corpus entries or real programs).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip the real Debian programs (python3, redis-server, zstd, openssl).
    #[arg(long)]
    pub no_real: bool,
    /// Keep build products and destination profiles in this directory.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// One workload's verdicts and truth on one destination.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub workload: String,
    pub dispatch: String,
    pub model: String,
    pub truth: Outcome,
    pub truth_detail: String,
    pub paths: Outcome,
    pub full: Outcome,
    pub criu: Outcome,
    pub paths_missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Score {
    pub pairs: u32,
    pub truly_compatible: u32,
    pub predicted_compatible: u32,
    pub true_positives: u32,
    pub false_positives: u32,
    /// None when nothing was predicted compatible.
    pub precision: Option<f64>,
    /// None when nothing is truly compatible.
    pub recall: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub workload: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub host: String,
    pub models: Vec<String>,
    pub workloads: Vec<String>,
    /// Workloads this host cannot run natively, and why: they have no reference here.
    pub skipped: Vec<Skipped>,
    pub pairs: Vec<Pair>,
    /// predictor -> destination (or "overall") -> score
    pub scores: BTreeMap<String, BTreeMap<String, Score>>,
    pub seconds: f64,
    pub truth_rule: String,
}

/// A workload prepared for evaluation: running natively at its ready point.
pub(crate) struct Running {
    pub name: String,
    pub dispatch: String,
    pub child: std::process::Child,
    pub rx: Option<std::sync::mpsc::Receiver<String>>,
    /// Workload-specific state (a socket path, a feeder thread, ...).
    pub extra: Option<Box<dyn std::any::Any>>,
}

pub(crate) trait Workload {
    fn name(&self) -> String;
    /// CPU features the native run needs (its output is the reference): without them on
    /// this host the workload is skipped.
    fn needs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Start natively and return at the ready point.
    fn start(&self) -> Result<Running>;
    /// Let the native run finish its work phase; return its output (the reference).
    fn finish(&self, r: Running) -> Result<String>;
    /// Run the work phase under qemu with the given dispatch forced; return the output, or
    /// Err(description) for a crash.
    fn truth(
        &self,
        qemu: &str,
        model: &str,
        dispatch: &str,
    ) -> Result<std::result::Result<String, String>>;
}

pub fn run(a: EvalArgs) -> Result<u8> {
    let t0 = Instant::now();
    let report = evaluate(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    eprintln!("eval: {:.1} s", t0.elapsed().as_secs_f64());
    Ok(0)
}

pub fn evaluate(a: &EvalArgs) -> Result<Report> {
    let t0 = Instant::now();
    let qemu = run::find_qemu().context(
        "qemu-x86_64 is needed as the destination CPU: install Debian's qemu-user-static",
    )?;
    let work = match &a.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!("ferry-eval-{}-{n}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&work)?;
    let host = CpuProfile::host()?;
    let mut models = models::destination_profiles()?;
    if !a.models.is_empty() {
        for m in &a.models {
            if !models.iter().any(|p| &p.name == m) {
                bail!("unknown model {m:?}");
            }
        }
        models.retain(|p| a.models.contains(&p.name));
    }
    for p in &models {
        std::fs::write(
            work.join(format!("{}.json", p.name)),
            serde_json::to_string_pretty(p)?,
        )?;
    }
    let mut workloads: Vec<Box<dyn Workload>> = corpus::build(&work.join("corpus"))?;
    if !a.no_real {
        workloads.extend(real::workloads(&work.join("real"))?);
    }
    if !a.only.is_empty() {
        workloads.retain(|w| a.only.contains(&w.name()));
    }
    let mut skipped = Vec::new();
    workloads.retain(|w| {
        let lacking: Vec<String> = w.needs().into_iter().filter(|f| !host.has(f)).collect();
        if lacking.is_empty() {
            return true;
        }
        let reason = format!(
            "this host lacks {} (the native run is the reference)",
            lacking.join(", ")
        );
        eprintln!("eval: {} skipped: {reason}", w.name());
        skipped.push(Skipped {
            workload: w.name(),
            reason,
        });
        false
    });
    let mut pairs = Vec::new();
    for w in &workloads {
        eprintln!("eval: {}", w.name());
        let r = w.start()?;
        let pid = r.child.id() as i32;
        let dispatch = r.dispatch.clone();
        let scans: Result<(ProcessScan, ProcessScan)> = (|| {
            Ok((
                scan_process(pid, Mode::Paths)?,
                scan_process(pid, Mode::Full)?,
            ))
        })();
        let reference = w.finish(r)?;
        let (paths, full) = scans.with_context(|| format!("scanning {}", w.name()))?;
        for m in &models {
            let vp = check_ferry(
                &paths.result.features,
                &paths.result.unknown,
                Some(paths.xstate_in_use),
                m,
                Some(&host),
            );
            let vf = check_ferry(
                &full.result.features,
                &full.result.unknown,
                Some(full.xstate_in_use),
                m,
                Some(&host),
            );
            let vc = check_criu(&host, m);
            let (truth, detail) = match w.truth(&qemu, &m.name, &dispatch)? {
                Err(crash) => (Outcome::Incompatible, crash),
                Ok(out) if out != reference => (
                    Outcome::Incompatible,
                    format!(
                        "different output: {:?} instead of {:?}",
                        clip(&out),
                        clip(&reference)
                    ),
                ),
                Ok(_) => {
                    let lacking = paths.xstate_in_use & !m.xsave.xcr0;
                    if lacking != 0 {
                        (
                            Outcome::Incompatible,
                            format!("ran, but register state {lacking:#x} in use cannot be restored there"),
                        )
                    } else {
                        (Outcome::Compatible, "same output".into())
                    }
                }
            };
            pairs.push(Pair {
                workload: w.name(),
                dispatch: dispatch.clone(),
                model: m.name.clone(),
                truth,
                truth_detail: detail,
                paths: vp.verdict,
                full: vf.verdict,
                criu: vc.verdict,
                paths_missing: vp.missing.iter().map(|x| x.feature.clone()).collect(),
            });
        }
    }
    let mut scores: BTreeMap<String, BTreeMap<String, Score>> = BTreeMap::new();
    for (pred, get) in [
        ("paths", (|p: &Pair| p.paths) as fn(&Pair) -> Outcome),
        ("full", |p: &Pair| p.full),
        ("criu", |p: &Pair| p.criu),
    ] {
        let per = scores.entry(pred.to_string()).or_default();
        for p in &pairs {
            for key in [p.model.clone(), "overall".to_string()] {
                let s = per.entry(key).or_default();
                s.pairs += 1;
                let t = p.truth == Outcome::Compatible;
                let v = get(p) == Outcome::Compatible;
                s.truly_compatible += t as u32;
                s.predicted_compatible += v as u32;
                s.true_positives += (t && v) as u32;
                s.false_positives += (!t && v) as u32;
            }
        }
        for s in per.values_mut() {
            s.precision = (s.predicted_compatible > 0)
                .then(|| s.true_positives as f64 / s.predicted_compatible as f64);
            s.recall = (s.truly_compatible > 0)
                .then(|| s.true_positives as f64 / s.truly_compatible as f64);
        }
    }
    if a.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(Report {
        host: host.name.clone(),
        models: models.iter().map(|m| m.name.clone()).collect(),
        workloads: workloads.iter().map(|w| w.name()).collect(),
        skipped,
        pairs,
        scores,
        seconds: t0.elapsed().as_secs_f64(),
        truth_rule: "compatible iff the work phase, run under qemu-x86_64 -cpu MODEL with the source's dispatch forced, exits 0 with the native output, and every register-state component the source threads hold in use is enabled in the model's XCR0".into(),
    })
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

fn print_report(r: &Report) {
    let short = |o: Outcome| match o {
        Outcome::Compatible => "C",
        Outcome::Incompatible => "x",
        Outcome::Unknown => "?",
    };
    println!("Verdicts per workload and destination: truth/paths/full/criu (C compatible, x incompatible, ? unknown)");
    print!("{:<16}", "");
    for m in &r.models {
        print!(" {:>9}", m.chars().take(9).collect::<String>());
    }
    println!();
    for w in &r.workloads {
        print!("{:<16}", w.chars().take(16).collect::<String>());
        for m in &r.models {
            let p = r.pairs.iter().find(|p| &p.workload == w && &p.model == m);
            match p {
                Some(p) => print!(
                    " {:>9}",
                    format!(
                        "{}/{}/{}/{}",
                        short(p.truth),
                        short(p.paths),
                        short(p.full),
                        short(p.criu)
                    )
                ),
                None => print!(" {:>9}", ""),
            }
        }
        println!();
    }
    println!();
    println!(
        "{:<24} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>7}",
        "predictor / destination", "pairs", "truth+", "pred+", "TP", "FP", "precision", "recall"
    );
    for (pred, per) in &r.scores {
        let mut keys: Vec<&String> = per.keys().filter(|k| *k != "overall").collect();
        keys.push(per.keys().find(|k| *k == "overall").unwrap());
        for k in keys {
            let s = &per[k];
            println!(
                "{:<24} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>7}",
                format!("{pred} {k}"),
                s.pairs,
                s.truly_compatible,
                s.predicted_compatible,
                s.true_positives,
                s.false_positives,
                fmt_ratio(s.precision),
                fmt_ratio(s.recall)
            );
        }
    }
    for sk in &r.skipped {
        println!("skipped {}: {}", sk.workload, sk.reason);
    }
    println!("truth: {}", r.truth_rule);
}
