//! `ferry cpu ...`

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferry_cpu::check::{check_criu, check_ferry, Outcome, Policy, Verdict};
use ferry_cpu::scan::{Mode, ScanResult};
use ferry_cpu::CpuProfile;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct CpuArgs {
    #[command(subcommand)]
    cmd: CpuCmd,
}

#[derive(Subcommand)]
enum CpuCmd {
    /// The CPU profile of this host: vendor, model, every CPUID feature bit, XCR0 state
    /// components and xsave sizes. Save it with `ferry cpu host --json > host.json`.
    Host {
        #[arg(long)]
        json: bool,
    },
    /// Build a profile of a host that is not here, from a raw CPUID dump.
    Profile {
        /// A dump with one line per model: `MODEL leaf.subleaf:eax,ebx,ecx,edx ...` (hex).
        #[arg(long, value_name = "FILE")]
        from_cpuid_dump: PathBuf,
        /// The model (first word of a line) to take.
        #[arg(long)]
        model: String,
        /// XCR0 of the destination OS, in hex, when known (default: every component that
        /// CPUID leaf 0xD reports as supported).
        #[arg(long, value_parser = parse_hex)]
        xcr0: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// The CPU features a workload's code needs, each with evidence.
    Scan {
        #[command(flatten)]
        what: Target,
        #[arg(long, value_enum, default_value_t = ModeArg::Paths)]
        mode: ModeArg,
        #[arg(long)]
        json: bool,
    },
    /// Can this workload run on the target CPU? Exit 0 compatible, 1 incompatible or unknown.
    Check {
        #[command(flatten)]
        what: Target,
        /// Profile of the destination (from `ferry cpu host --json` or `ferry cpu profile`).
        #[arg(long, value_name = "PROFILE.json")]
        target: PathBuf,
        /// Profile of the source host (default: this host).
        #[arg(long, value_name = "PROFILE.json")]
        source: Option<PathBuf>,
        /// `ferry`: what the workload's code uses; `criu`: CRIU's whole-host cpuinfo check.
        #[arg(long, value_enum, default_value_t = PolicyArg::Ferry)]
        policy: PolicyArg,
        #[arg(long, value_enum, default_value_t = ModeArg::Paths)]
        mode: ModeArg,
        #[arg(long)]
        json: bool,
    },
    /// Measure precision and recall of the verdicts against qemu CPU models.
    Eval(ferry_eval::EvalArgs),
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A running process (it is stopped only while its registers and stacks are read).
    #[arg(long)]
    pid: Option<i32>,
    /// A program file, scanned with its shared libraries without running it.
    #[arg(long)]
    binary: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Code reachable from the workload's execution state.
    Paths,
    /// Every executable mapping.
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Ferry,
    Criu,
}

fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("{s:?}: {e}"))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub fn run(a: CpuArgs) -> Result<u8> {
    match a.cmd {
        CpuCmd::Host { json } => {
            let p = CpuProfile::host()?;
            if json {
                print_json(&p)?;
            } else {
                print_profile(&p);
            }
            Ok(0)
        }
        CpuCmd::Profile {
            from_cpuid_dump,
            model,
            xcr0,
            json,
        } => {
            let text = std::fs::read_to_string(&from_cpuid_dump)
                .with_context(|| format!("reading {}", from_cpuid_dump.display()))?;
            let origin = format!("cpuid-dump {} model {model}", from_cpuid_dump.display());
            let p = CpuProfile::from_cpuid_dump(&text, &model, &origin, xcr0)
                .with_context(|| format!("{}", from_cpuid_dump.display()))?;
            if json {
                print_json(&p)?;
            } else {
                print_profile(&p);
            }
            Ok(0)
        }
        CpuCmd::Scan { what, mode, json } => {
            let s = scan(&what, mode)?;
            if json {
                print_json(&s.report)?;
            } else {
                print_scan(&s);
            }
            Ok(0)
        }
        CpuCmd::Check {
            what,
            target,
            source,
            policy,
            mode,
            json,
        } => {
            let target = CpuProfile::load(&target)?;
            let source = match source {
                Some(p) => CpuProfile::load(&p)?,
                None => CpuProfile::host()?,
            };
            let (v, s) = match policy {
                PolicyArg::Criu => {
                    // CRIU looks at hosts only, but the workload must still exist.
                    if let Some(pid) = what.pid {
                        ferry_sys_check_pid(pid)?;
                    }
                    (check_criu(&source, &target), None)
                }
                PolicyArg::Ferry => {
                    let s = scan(&what, mode)?;
                    let v = check_ferry(
                        &s.result.features,
                        &s.result.unknown,
                        s.xstate,
                        &target,
                        Some(&source),
                    );
                    (v, Some(s))
                }
            };
            if json {
                print_json(&json!({
                    "verdict": v.verdict,
                    "check": v,
                    "scan": s.as_ref().map(|s| &s.report),
                }))?;
            } else {
                print_verdict(&v, s.as_ref());
            }
            let _ = Policy::Ferry;
            Ok(v.verdict.exit_code() as u8)
        }
        CpuCmd::Eval(args) => ferry_eval::run(args),
    }
}

fn ferry_sys_check_pid(pid: i32) -> Result<()> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() || pid <= 0 {
        bail!("process {pid} does not exist");
    }
    Ok(())
}

struct Scanned {
    what: String,
    result: ScanResult,
    xstate: Option<u64>,
    report: serde_json::Value,
}

fn scan(what: &Target, mode: ModeArg) -> Result<Scanned> {
    let mode = match mode {
        ModeArg::Paths => Mode::Paths,
        ModeArg::Full => Mode::Full,
    };
    if let Some(pid) = what.pid {
        let s = ferry_cpu::process::scan_process(pid, mode)?;
        Ok(Scanned {
            what: format!("process {pid} ({})", s.exe),
            result: s.result.clone(),
            xstate: Some(s.xstate_in_use),
            report: serde_json::to_value(&s)?,
        })
    } else if let Some(b) = &what.binary {
        let s = ferry_cpu::binary::scan_binary(b, mode)?;
        Ok(Scanned {
            what: format!("binary {}", b.display()),
            result: s.result.clone(),
            xstate: None,
            report: serde_json::to_value(&s)?,
        })
    } else {
        bail!("give --pid or --binary")
    }
}

fn print_profile(p: &CpuProfile) {
    println!("{} ({})", p.name, p.origin);
    println!(
        "  vendor {}  family {:#x} model {:#x} stepping {}{}",
        p.vendor,
        p.family,
        p.model,
        p.stepping,
        p.model_name
            .as_ref()
            .map(|m| format!("  \"{m}\""))
            .unwrap_or_default()
    );
    println!(
        "  max leaf {:#x}, max extended leaf {:#x}",
        p.max_basic_leaf, p.max_extended_leaf
    );
    println!(
        "  XCR0 {:#x} ({}): {}",
        p.xsave.xcr0,
        p.xsave.xcr0_source,
        p.xsave.xcr0_components.join(", ")
    );
    println!(
        "  xsave sizes: enabled {} B, all supported {} B, compacted {} B",
        p.xsave.size_enabled, p.xsave.size_max, p.xsave.size_compacted
    );
    let usable: Vec<&str> = p.usable_features.iter().map(String::as_str).collect();
    println!("  usable features ({}): {}", usable.len(), usable.join(" "));
    let disabled: Vec<&str> = p
        .cpuid_features
        .iter()
        .filter(|f| !p.usable_features.contains(*f))
        .map(String::as_str)
        .collect();
    if !disabled.is_empty() {
        println!(
            "  in CPUID but state not enabled by the OS: {}",
            disabled.join(" ")
        );
    }
}

fn print_scan(s: &Scanned) {
    let r = &s.result;
    println!("{}", s.what);
    println!(
        "  decoded {} instructions in {} functions ({} KiB of code); scanned {} KiB of data and stacks",
        r.stats.instructions,
        r.stats.functions,
        r.stats.code_bytes_decoded / 1024,
        r.stats.data_bytes_scanned / 1024
    );
    println!("  {:<22} {:>8}  example", "feature", "insns");
    for f in &r.features {
        println!(
            "  {:<22} {:>8}  {} {} ({}){}",
            f.feature,
            f.instructions,
            f.example.module,
            f.example.address,
            f.example.instruction,
            if f.silent.is_some() {
                "  [silent if missing]"
            } else {
                ""
            }
        );
    }
    if !r.unknown.is_empty() {
        println!(
            "  undecodable instructions in reachable code: {}",
            r.unknown.len()
        );
        for u in r.unknown.iter().take(5) {
            println!("    {} {} bytes {}", u.module, u.address, u.bytes);
        }
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}

fn print_verdict(v: &Verdict, s: Option<&Scanned>) {
    let word = match v.verdict {
        Outcome::Compatible => "COMPATIBLE",
        Outcome::Incompatible => "INCOMPATIBLE",
        Outcome::Unknown => "UNKNOWN",
    };
    let policy = match v.policy {
        Policy::Ferry => "ferry",
        Policy::Criu => "criu",
    };
    match s {
        Some(s) => println!("{word}: {} on {} (policy {policy})", s.what, v.target),
        None => println!(
            "{word}: {} -> {} (policy {policy})",
            v.source.clone().unwrap_or_default(),
            v.target
        ),
    }
    for m in &v.missing {
        match &m.example {
            Some(e) => println!(
                "  missing {:<18} {:>6} insns, e.g. {} {} {}  -- {}{}",
                m.feature,
                m.instructions,
                e.module,
                e.address,
                e.instruction,
                m.reason,
                m.silent
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
            None => println!("  missing {:<18} -- {}", m.feature, m.reason),
        }
    }
    for m in &v.neither {
        println!(
            "  not counted {:<14} {:>6} insns  -- {}",
            m.feature, m.instructions, m.reason
        );
    }
    println!("  xsave: {}", v.xsave.detail);
    for u in v.unknown.iter().take(5) {
        println!(
            "  unknown instruction at {} {} bytes {}",
            u.module, u.address, u.bytes
        );
    }
    for r in &v.reasons {
        println!("  reason: {r}");
    }
}
