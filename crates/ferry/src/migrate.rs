//! `ferry agent` and `ferry migrate`.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use ferry_migrate::source::{migrate as run_migrate, MigrateOptions, Mode};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct AgentArgs {
    /// Address of the HTTP API, e.g. 0.0.0.0:7070. The page stream listens on the next port.
    #[arg(long)]
    listen: SocketAddr,
    /// File holding the shared token that requests must carry (Authorization: Bearer).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where incoming migrations are kept until they run: the whole memory of the process.
    /// A tmpfs by default; on a disk, its write-back sets the pace of every migration.
    #[arg(long, default_value = "/dev/shm/ferry")]
    state_dir: PathBuf,
    /// Port of the page stream (default: the API's port + 1).
    #[arg(long, default_value_t = 0)]
    data_port: u16,
    /// Tell sources to use this page-stream port instead (when a proxy or NAT forwards it).
    #[arg(long, default_value_t = 0)]
    advertise_data_port: u16,
    /// Publish this CPU profile instead of the host's (a `ferry cpu profile` JSON file): to
    /// stand for a smaller destination in tests.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Rebuild incoming processes in this network namespace (a /run/netns/NAME file).
    #[arg(long)]
    netns: Option<String>,
    /// Serve the API and the page stream over TLS with this PEM certificate (chain) for the
    /// host's name or address; needs --tls-key.
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Precopy,
    Postcopy,
    Hybrid,
    Stop,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The process (and its descendants) to move.
    #[arg(long)]
    pid: i32,
    /// The destination agent, http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long)]
    to: String,
    #[arg(long, value_enum, default_value = "precopy")]
    mode: ModeArg,
    /// Downtime to aim for (pre-copy stops its rounds when the rest fits).
    #[arg(long, default_value_t = 10.0)]
    max_downtime: f64,
    /// Most pre-copy rounds before the final copy.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Migrate even if the destination's CPU looks unable to run the process.
    #[arg(long)]
    force: bool,
    /// File holding the agent's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Use TLS to the agent (API and page stream), trusting only the CA certificate(s) in this
    /// PEM file; the agent address must then be https://.
    #[arg(long, value_name = "CA.pem")]
    tls_ca: Option<PathBuf>,
    /// An IPv4 address (CIDR) that moves with the process: clients' connections to it follow.
    /// Repeatable.
    #[arg(long = "move-address", value_name = "CIDR")]
    move_addresses: Vec<String>,
    /// Seconds to wait for the destination on the page stream before giving up (the process
    /// then runs on here).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Never slow the process down (by default a tree dirtying memory faster than the link
    /// is throttled with a CPU cgroup quota so that pre-copy converges).
    #[arg(long)]
    no_throttle: bool,
    /// Only prepare: the agent checks the process's CPU needs against its CPU and reserves
    /// room for its memory; nothing is frozen. Prints the migration id for --prepared.
    #[arg(long, conflicts_with = "prepared")]
    prepare_only: bool,
    /// Start the migration the agent prepared (from --prepare-only).
    #[arg(long, value_name = "ID")]
    prepared: Option<String>,
    #[arg(long)]
    json: bool,
}

fn token(f: &Option<PathBuf>) -> Result<Option<String>> {
    f.as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .with_context(|| format!("reading the token file {}", p.display()))
        })
        .transpose()
}

pub fn agent(a: AgentArgs) -> Result<u8> {
    let profile = match &a.profile {
        Some(p) => Some(ferry_cpu::profile::CpuProfile::load(p)?),
        None => None,
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(ferry_migrate::tls::ServerTls::load(c, k)?),
        _ => None,
    };
    ferry_migrate::agent::run(ferry_migrate::agent::AgentConfig {
        listen: a.listen,
        data_port: a.data_port,
        advertise_data_port: a.advertise_data_port,
        token: token(&a.token_file)?,
        state_dir: a.state_dir,
        profile,
        netns: a.netns,
        tls,
    })?;
    Ok(0)
}

pub fn migrate(a: MigrateArgs) -> Result<u8> {
    let o = MigrateOptions {
        pid: a.pid,
        to: a.to.clone(),
        token: token(&a.token_file)?,
        mode: match a.mode {
            ModeArg::Precopy => Mode::Precopy,
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid,
            ModeArg::Stop => Mode::Stop,
        },
        max_downtime_ms: a.max_downtime,
        force: a.force,
        max_rounds: a.max_rounds.max(1),
        move_addresses: a.move_addresses.clone(),
        io_timeout: std::time::Duration::from_secs_f64(a.timeout.max(0.1)),
        throttle: !a.no_throttle,
        prepared: a.prepared.clone(),
        tls: a
            .tls_ca
            .as_deref()
            .map(ferry_migrate::tls::ClientTls::load)
            .transpose()?,
    };
    if a.prepare_only {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) && !a.json {
            // Making the memory resident takes about as long as first touch of that much.
            eprintln!(
                "ferry: preparing the migration of process {} on {}: the agent checks its CPU \
                 needs and reserves room{} ...",
                a.pid,
                a.to,
                if o.mode == ferry_migrate::source::Mode::Precopy {
                    " and memory"
                } else {
                    ""
                }
            );
        }
        return match ferry_migrate::source::prepare(&o) {
            Ok(c) => {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&c)?);
                } else {
                    let p = c.prepared.unwrap_or_default();
                    println!(
                        "prepared migration {} of process {} on {}: verdict {}, {:.1} MiB \
                         reserved, memory {}{}, until unix time {}; start it with --prepared {}",
                        c.id,
                        a.pid,
                        a.to,
                        p.verdict,
                        p.reserved_bytes as f64 / 1048576.0,
                        p.memory,
                        if p.memory_bytes > 0 {
                            format!(
                                " ({:.1} MiB in {:.0} ms)",
                                p.memory_bytes as f64 / 1048576.0,
                                p.memory_ms
                            )
                        } else {
                            String::new()
                        },
                        p.expires_unix,
                        c.id
                    );
                }
                Ok(0)
            }
            Err(ferry_migrate::MigrateError::Incompatible(why)) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({ "pid": a.pid, "refused": true, "reason": why })
                    );
                } else {
                    eprintln!("ferry: preparation refused: {why}");
                }
                Ok(1)
            }
            Err(e) => Err(e.into()),
        };
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = indicatif::ProgressBar::new_spinner();
    if !tty || a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let progress = |p: &ferry_migrate::source::Progress| {
        let dirty = p
            .dirty_mb_s
            .map(|r| format!(", dirtying {r:.0} MB/s"))
            .unwrap_or_default();
        bar.set_message(format!(
            "{}: round {}, {:.1} MiB sent{dirty}",
            p.phase,
            p.round,
            p.bytes_sent as f64 / 1048576.0
        ));
        bar.tick();
    };
    let r = match run_migrate(&o, &progress) {
        Ok(r) => r,
        Err(ferry_migrate::MigrateError::Incompatible(why)) => {
            bar.finish_and_clear();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "pid": a.pid, "refused": true, "reason": why })
                );
            } else {
                eprintln!("ferry: migration refused: {why}");
            }
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    bar.finish_and_clear();
    if ferry_sys::cancel::requested().is_some() {
        eprintln!(
            "ferry: the interrupt came after the destination was told to run the process: \
             the migration was completed instead"
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "migrated process {} to {} (now PID {} there): downtime {:.1} ms, total {:.0} ms, \
             {:.1} MiB sent in {} pre-copy round(s) + {:.1} MiB frozen",
            r.pid,
            r.destination,
            r.restored_pid,
            r.downtime_ms,
            r.total_ms,
            r.bytes_sent as f64 / 1048576.0,
            r.rounds.len(),
            r.final_bytes as f64 / 1048576.0
        );
        if let Some(f) = r.fill_ms {
            if r.fill_left_bytes > 0 {
                println!(
                    "  nothing left here {:.0} ms after it ran on the destination ({} faults \
                     waited{}; {:.1} MiB fetched from here); it fills the last {:.1} MiB from \
                     the pre-copied pages it holds",
                    f,
                    r.faults,
                    fault_waits(&r),
                    r.postcopy_bytes as f64 / 1048576.0,
                    r.fill_left_bytes as f64 / 1048576.0
                );
            } else {
                println!(
                    "  memory filled on the destination {:.0} ms after it ran ({} faults \
                     waited{}; {:.1} MiB fetched from here on demand)",
                    f,
                    r.faults,
                    fault_waits(&r),
                    r.postcopy_bytes as f64 / 1048576.0
                );
            }
        }
        for rd in &r.rounds {
            println!(
                "  round {}: {:.1} MiB in {:.1} ms",
                rd.round,
                rd.bytes as f64 / 1048576.0,
                rd.ms
            );
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
    }
    Ok(0)
}

/// How long the faults waited, when there were any.
fn fault_waits(r: &ferry_migrate::source::MigrateReport) -> String {
    if r.faults == 0 {
        return String::new();
    }
    format!(
        " {:.2} ms on average, {:.1} ms at most",
        r.mean_fault_ms, r.max_fault_ms
    )
}
