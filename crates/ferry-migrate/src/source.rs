//! `ferry migrate`: the source side. Compatibility gate against the destination's CPU
//! profile, then (pre-copy) rounds of memory while the process runs, then the frozen final
//! dump streamed to the agent, then the handshake: the agent rebuilds the tree and holds it
//! stopped (Ready); only then is the source copy killed and the agent told to let it run
//! (Go). Any failure before that point resumes the source copy, untouched.

use crate::api::*;
use crate::tls;
use crate::wire::{self, FramedSink, Kind};
use crate::{io, MigrateError, Result};
use serde::Serialize;
use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A final copy this small crosses in well under a millisecond: no round more is worth it.
const SMALL_FINAL: u64 = 256 << 10;

/// A round of `bytes` (after one of `prev`) fits the downtime already: is one more worth it?
/// The final copy carries what is written during the last round, and a round of a few MiB
/// takes several ms: while rounds still shrink by a third, a few more short ones (at most
/// three, `short` made so far) leave less for the freeze.
fn one_more_short_round(bytes: u64, prev: u64, short: u32) -> bool {
    (bytes as f64) < 0.67 * prev as f64 && bytes > SMALL_FINAL && short < 3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Freeze, copy everything, restore.
    Stop,
    /// Copy memory in rounds while the process runs, then freeze and copy the rest.
    Precopy,
    /// Freeze, copy everything but private anonymous memory, run on the destination at once;
    /// that memory follows on demand from the frozen source.
    Postcopy,
    /// Pre-copy rounds, then post-copy for what is still dirty.
    Hybrid,
}

impl Mode {
    /// As the agent's API and the page stream name it (the serde name).
    fn name(self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub pid: i32,
    /// The destination agent: `http://HOST:PORT`, or `https://HOST:PORT` with `tls`.
    pub to: String,
    pub token: Option<String>,
    pub mode: Mode,
    pub max_downtime_ms: f64,
    /// Migrate even when the destination's CPU looks unable to run the process.
    pub force: bool,
    pub max_rounds: u32,
    /// IPv4 addresses (CIDR) that move with the process: taken off its network namespace at
    /// the freeze, put on the destination's interface in the same subnet.
    pub move_addresses: Vec<String>,
    /// Longest wait for the destination on the page stream (a write that cannot proceed, a
    /// reply that does not come): past it the migration fails and the process runs on here.
    pub io_timeout: Duration,
    /// When pre-copy stops converging, slow the tree down (a CPU cgroup quota) and go on.
    pub throttle: bool,
    /// TLS for the API and the page stream, trusting this CA; None: plain.
    pub tls: Option<tls::ClientTls>,
    /// A migration the agent prepared ahead (`prepare`): its id.
    pub prepared: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub bytes: u64,
    /// 4 KiB pages sent in the round (with the zero pages that replace discarded ones).
    pub pages: u64,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub pid: i32,
    pub destination: String,
    pub migration: String,
    pub mode: Mode,
    pub verdict: String,
    pub rounds: Vec<RoundReport>,
    /// Bytes of the final, frozen phase (metadata and the pages still to send).
    pub final_bytes: u64,
    pub bytes_sent: u64,
    /// The tree's resident memory when the migration began (VmRSS summed over its
    /// processes): what the total time compares with, over the link's bandwidth.
    pub resident_bytes: u64,
    /// From the freeze on the source to the process running on the destination.
    pub downtime_ms: f64,
    pub total_ms: f64,
    /// Parts of `total_ms` before memory moves: the compatibility gate (reading the
    /// process's code), and everything from the start until the first round began (the gate,
    /// the agent's API, the connection, the layout, write tracking set up).
    pub gate_ms: f64,
    pub setup_ms: f64,
    pub restored_pid: i32,
    /// After the process ran on the destination: filling its memory there (post-copy pages
    /// from here, or pre-copied pages held there), until nothing was missing.
    pub fill_ms: Option<f64>,
    /// Post-copy: bytes the destination fetched from the frozen source.
    pub postcopy_bytes: u64,
    /// Hybrid: what the destination still had to fill from the pages the rounds brought when
    /// nothing was left to fetch here and it let this source go (`fill_ms` ends there).
    #[serde(default)]
    pub fill_left_bytes: u64,
    /// Faults the destination answered while filling (threads that waited for a page).
    pub faults: u64,
    /// Of those, the ones answered before the process ran: fetches inside the downtime.
    #[serde(default)]
    pub frozen_faults: u64,
    /// How long a faulting thread waited for its page, on average and at most (ms).
    #[serde(default)]
    pub mean_fault_ms: f64,
    #[serde(default)]
    pub max_fault_ms: f64,
    /// Where the downtime went.
    pub phases: DowntimePhases,
    /// The destination's restore report (its phases: verify, layout, pages, rest, sockets).
    pub restore: serde_json::Value,
    pub notes: Vec<String>,
    /// With `FERRY_TIMELINE` set: this side's marks of the final phase, on the monotonic
    /// clock (ms) that the agent's marks (`restore.agent.timeline`) share.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<(String, f64)>,
}

/// The downtime, phase by phase (ms).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimePhases {
    /// Checking the smaps read before the freeze against the frozen tree's, while the
    /// destination rebuilds (part of `to_ready_ms`).
    pub check_smaps_ms: f64,
    /// Freezing the tree.
    pub freeze_ms: f64,
    /// The frozen dump streamed to the agent (state, and the pages that travel frozen).
    pub dump_ms: f64,
    /// Parts of `dump_ms`: reading the non-memory state, and the memory (for pre-copy, the
    /// written pages; for post-copy, listing the pages left behind).
    pub collect_ms: f64,
    pub memory_ms: f64,
    /// The frozen dump step by step (ms, and `<step>_syscalls` injected).
    pub dump_steps: ferry_engine::timing::Steps,
    /// From the end of the dump until the agent's Ready: moving addresses, the agent
    /// rebuilding the tree.
    pub to_ready_ms: f64,
    /// Taking moved addresses off the source (part of `to_ready_ms`).
    pub release_ms: f64,
    /// Closing the final image (its last records; part of `to_ready_ms`).
    pub finish_ms: f64,
    /// From the end of the dump until Commit was sent (part of `to_ready_ms`).
    pub commit_sent_ms: f64,
    /// From Go until Done: killing nothing (post-copy) or the source copy, the tree resuming.
    pub go_to_done_ms: f64,
    /// From Done until the destination said its memory is whole (Filled): not downtime,
    /// part of the total.
    pub done_to_filled_ms: f64,
}

/// What progress to show while migrating: (phase, bytes so far, round).
/// What a migration under way reports, many times a second.
pub struct Progress<'a> {
    /// "pre-copy" or "final".
    pub phase: &'a str,
    pub bytes_sent: u64,
    pub round: u32,
    /// How fast the process wrote new pages during the last round (what the next round
    /// carries over that round's time), MB/s; from the second round on.
    pub dirty_mb_s: Option<f64>,
}

pub type ProgressFn<'a> = dyn Fn(&Progress) + 'a;

struct Http {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Http {
    fn new(o: &MigrateOptions) -> Http {
        let cfg = ureq::Agent::config_builder()
            .timeout_global(Some(o.io_timeout))
            .tls_config(tls::ureq_config(o.tls.as_ref()))
            .build();
        Http {
            base: o.to.trim_end_matches('/').to_string(),
            token: o.token.clone(),
            agent: cfg.into(),
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| {
            MigrateError::Failed(format!("GET {}{path}: {}", self.base, tls::explain(&e)))
        })?;
        resp.body_mut()
            .read_json()
            .map_err(|e| MigrateError::Failed(format!("GET {}{path}: {e}", self.base)))
    }

    /// Best effort (a cancel on the way out).
    fn delete(&self, path: &str) {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let _ = req.call();
    }

    fn post<T: serde::de::DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .map_err(|e| {
                MigrateError::Failed(format!("POST {}{path}: {}", self.base, tls::explain(&e)))
            })?;
        let status = resp.status().as_u16();
        if status >= 400 {
            // The agent's own words: {"error": "..."}.
            let v: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
            let msg = format!(
                "{} refused POST {path} ({status}): {}",
                self.base,
                v["error"].as_str().unwrap_or("no reason given")
            );
            return Err(if status == 409 {
                MigrateError::Incompatible(msg)
            } else {
                MigrateError::Failed(msg)
            });
        }
        resp.body_mut()
            .read_json()
            .map_err(|e| MigrateError::Failed(format!("POST {}{path}: {e}", self.base)))
    }
}

/// Refuse a destination whose CPU cannot run the process (unless forced); returns the
/// verdict's name.
/// The compatibility gate: Ok((verdict, a note when the code was not scanned)).
fn gate(
    pid: i32,
    target: &ferry_cpu::profile::CpuProfile,
    force: bool,
) -> Result<(String, Option<String>)> {
    let source = ferry_cpu::profile::CpuProfile::host().ok();
    // Whatever runs here runs there: no scan could change the verdict (`check_ferry` says
    // compatible whatever it finds), and reading all of the process's memory for it takes
    // ~0.3 s per GiB.
    if let Some(s) = source
        .as_ref()
        .filter(|s| ferry_cpu::check::offers_all_of(target, s))
    {
        return Ok((
            "compatible".into(),
            Some(format!(
                "compatible without a scan of the code: {} offers every CPU feature and state \
                 component of this host ({})",
                target.name, s.name
            )),
        ));
    }
    let scan = ferry_cpu::process::scan_process(pid, ferry_cpu::scan::Mode::Paths)
        .map_err(|e| MigrateError::Failed(format!("scanning process {pid}: {e}")))?;
    let v = ferry_cpu::check::check_ferry(
        &scan.result.features,
        &scan.result.unknown,
        Some(scan.xstate_in_use),
        target,
        source.as_ref(),
    );
    let name = format!("{:?}", v.verdict).to_lowercase();
    if v.verdict == ferry_cpu::check::Outcome::Compatible {
        return Ok((name, None));
    }
    let mut why: Vec<String> = v
        .missing
        .iter()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
        .collect();
    why.extend(v.reasons.iter().cloned());
    if !v.xsave.ok {
        why.push(v.xsave.detail.clone());
    }
    if !force {
        return Err(MigrateError::Incompatible(format!(
            "process {pid} is {name} with the destination CPU ({}): {}; nothing was frozen \
             (use --force to migrate anyway)",
            target.name,
            why.join("; ")
        )));
    }
    let note = format!(
        "moved with --force past the gate's verdict, {name} with the destination CPU ({}): {}",
        target.name,
        why.join("; ")
    );
    Ok((name, Some(note)))
}

/// The agent closed the connection (it ended, or it dropped the migration, killing what it
/// built), as opposed to a reset, a timeout or a damaged frame.
fn is_eof(e: &MigrateError) -> bool {
    matches!(e, MigrateError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::UnexpectedEof)
}

fn data_addr(to: &str, port: u16) -> Result<String> {
    let host = to
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':').map(|(h, _)| h.to_string()))
        .ok_or_else(|| {
            MigrateError::Failed(format!("bad agent address {to:?} (want http://HOST:PORT)"))
        })?;
    Ok(format!("{host}:{port}"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Resident memory of the tree rooted at `pid`, bytes.
fn tree_rss(pid: i32) -> u64 {
    ferry_engine::precopy::tree_of(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Ask the agent to get ready for a migration of `o.pid`: it checks the process's CPU needs
/// against its own CPU and reserves room for its memory. Nothing is frozen. Returns the
/// migration for `MigrateOptions::prepared`.
pub fn prepare(o: &MigrateOptions) -> Result<Created> {
    ferry_sys::procfs::check_inspectable(o.pid).map_err(ferry_engine::EngineError::from)?;
    tls::check_address(&o.to, o.tls.as_ref())?;
    let http = Http::new(o);
    let host: HostInfo = http.get("/v1/host")?;
    same_protocol(&host, &o.to)?;
    // Our own gate first: the same verdict, before asking anything of the agent.
    gate(o.pid, &host.profile, o.force)?;
    let scan = ferry_cpu::process::scan_process(o.pid, ferry_cpu::scan::Mode::Paths)
        .map_err(|e| MigrateError::Failed(format!("scanning process {}: {e}", o.pid)))?;
    let mut created: Created = http.post(
        "/v1/prepare",
        &Prepare {
            pid: o.pid,
            mode: o.mode.name(),
            source: hostname(),
            memory_bytes: tree_rss(o.pid),
            scan: scan.result,
            xstate_in_use: scan.xstate_in_use,
            source_profile: ferry_cpu::profile::CpuProfile::host().ok(),
            force: o.force,
            namespaces: ferry_engine::namespaces::dump(o.pid)
                .ok()
                .filter(|n| n.mounts.is_empty()),
        },
    )?;
    // Ready once the memory reserved for it is resident (or could not be).
    let end = Instant::now() + Duration::from_secs(600);
    while created
        .prepared
        .as_ref()
        .is_some_and(|p| p.memory == "reserving")
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
        if let Err(e) = stop_asked() {
            // Nothing is frozen: the reservation goes too.
            http.delete(&format!("/v1/migrations/{}", created.id));
            return Err(e);
        }
        let m: MigrationInfo = http.get(&format!("/v1/migrations/{}", created.id))?;
        created.prepared = m.prepared;
    }
    Ok(created)
}

pub fn migrate(o: &MigrateOptions, progress: &ProgressFn) -> Result<MigrateReport> {
    let mut id = None;
    match migrate_inner(o, progress, &mut id) {
        Ok(r) => Ok(r),
        Err(e @ MigrateError::Incompatible(_)) => Err(e),
        Err(e) => {
            // What the agent recorded, if it can still say.
            let http = Http::new(o);
            let theirs = id
                .and_then(|id: String| {
                    http.get::<MigrationInfo>(&format!("/v1/migrations/{id}"))
                        .ok()
                })
                .and_then(|m| m.error)
                .map(|d| format!(" (the destination says: {d})"))
                .unwrap_or_default();
            let here = if std::path::Path::new(&format!("/proc/{}", o.pid)).exists() {
                ", it runs on here"
            } else {
                ""
            };
            Err(MigrateError::Failed(format!(
                "migration of process {} failed{here}: {e}{theirs}",
                o.pid
            )))
        }
    }
}

fn migrate_inner(
    o: &MigrateOptions,
    progress: &ProgressFn,
    id_out: &mut Option<String>,
) -> Result<MigrateReport> {
    let t0 = Instant::now();
    ferry_sys::procfs::check_inspectable(o.pid).map_err(ferry_engine::EngineError::from)?;
    let resident_bytes = tree_rss(o.pid);
    tls::check_address(&o.to, o.tls.as_ref())?;
    let http = Http::new(o);
    let host: HostInfo = http.get("/v1/host")?;
    same_protocol(&host, &o.to)?;
    let tg0 = Instant::now();
    let (verdict, gate_note) = gate(o.pid, &host.profile, o.force)?;
    let gate_ms = tg0.elapsed().as_secs_f64() * 1e3;
    let mut setup_ms = 0.0;
    let created: Created = match &o.prepared {
        Some(id) => {
            let m: MigrationInfo = http.get(&format!("/v1/migrations/{id}"))?;
            if m.state != "prepared" || m.pid != o.pid {
                return Err(MigrateError::Failed(format!(
                    "migration {id} on {} is not a prepared migration of process {} (it is {} \
                     for process {})",
                    o.to, o.pid, m.state, m.pid
                )));
            }
            Created {
                id: id.clone(),
                data_port: host.data_port,
                prepared: m.prepared,
            }
        }
        None => http.post(
            "/v1/migrations",
            &NewMigration {
                pid: o.pid,
                mode: o.mode.name(),
                source: hostname(),
            },
        )?,
    };
    *id_out = Some(created.id.clone());
    let addr = data_addr(&o.to, created.data_port)?;
    let sa: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(io(format!("resolving {addr}")))?
        .next()
        .ok_or_else(|| MigrateError::Failed(format!("no address for {addr}")))?;
    let conn = TcpStream::connect_timeout(&sa, o.io_timeout)
        .map_err(io(format!("connecting to {addr}")))?;
    let _ = conn.set_nodelay(true);
    // A dead link must not hold the process, frozen or not: every wait is bounded. Waits
    // longer than the timeout (a rebuild, post-copy's fill) end as soon as the agent's host
    // stops answering, not when they run out.
    ferry_sys::net::fail_on_silent_peer(&conn, o.io_timeout)
        .map_err(|e| MigrateError::Failed(format!("setting up {addr}: {e}")))?;
    conn.set_write_timeout(Some(o.io_timeout))
        .map_err(io("socket timeout"))?;
    conn.set_read_timeout(Some(o.io_timeout))
        .map_err(io("socket timeout"))?;
    let conn = tls::Conn::connect(conn, o.tls.as_ref(), &addr)?;
    let mut rd = std::io::BufReader::new(conn.reader().map_err(io("dup"))?);
    let wr = conn.writer().map_err(io("dup"))?;
    let w = Arc::new(Mutex::new(BufWriter::with_capacity(1 << 20, wr)));
    {
        let mut g = w.lock().unwrap();
        g.write_all(wire::GREETING).map_err(io("greeting"))?;
        wire::write_json(
            &mut *g,
            Kind::Hello,
            &Hello {
                id: created.id.clone(),
                token: o.token.clone().unwrap_or_default(),
                role: None,
                mode: Some(o.mode.name()),
            },
        )?;
    }
    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut notes: Vec<String> = gate_note.into_iter().collect();
    let mut sent = 0u64;
    // Shared by the dump's two callbacks (the last scan at the freeze, the deltas after).
    let tracking = std::cell::RefCell::new(None);
    let mut _throttle_guard: Option<crate::throttle::Throttle> = None;
    let mut latest_hint: Option<ferry_engine::SmapsHint> = None;
    // A read of smaps still under way (one at a time).
    let mut hint_job: Option<std::thread::JoinHandle<ferry_engine::SmapsHint>> = None;
    // What the final dump needs, ready now rather than paid for while frozen.
    if let Err(e) = ferry_engine::dump::prepare_for_freeze() {
        notes.push(format!(
            "mapping flags come from smaps while the process is frozen (about 18 ms per GiB \
             mapped), not from BPF: {e}"
        ));
    }
    let post = matches!(o.mode, Mode::Postcopy | Mode::Hybrid);
    // The traffic block's table goes in now, its sets empty: the freeze only fills them.
    let table = ferry_engine::netblock::table_name(o.pid);
    let netblock =
        match ferry_engine::netblock::prepare(&ferry_engine::precopy::tree_of(o.pid), &table) {
            Ok(p) => Some(p),
            Err(e) => {
                notes.push(format!(
                    "the block of the process's TCP traffic is made while it is frozen: {e}"
                ));
                None
            }
        };
    if o.mode != Mode::Stop {
        // The layout goes first, so that the destination creates the process while memory
        // crosses; the smaps read for it serves the final dump as well.
        let no_warm = std::env::var_os("FERRY_NO_WARM").is_some();
        let mut tries = 0;
        let (h, preview) = loop {
            let h = smaps_hint(o.pid);
            let preview = match h.get(&o.pid) {
                _ if no_warm => Err("FERRY_NO_WARM is set".into()),
                Some(sm) => ferry_engine::warm::preview(o.pid, sm),
                None => Err(format!("process {} has no smaps", o.pid)),
            };
            tries += 1;
            // A process that mapped or unmapped while its smaps were read gets a second and
            // a third try.
            if preview.is_err() && !no_warm && tries < 3 && !hint_current(o.pid, &h) {
                continue;
            }
            break (h, preview);
        };
        match preview {
            Ok(l) => {
                let mut g = w.lock().unwrap();
                wire::write_json(&mut *g, Kind::Layout, &l)?;
            }
            Err(why) => notes.push(format!(
                "the destination builds the process only after the freeze: {why}"
            )),
        }
        latest_hint = Some(h);
    }
    // Post-copy too makes one round, of the private file mappings only (not filled lazily,
    // they would otherwise cross while frozen, ~1 MB for Redis); its acknowledgement also
    // says that the agent has built the process from the layout.
    if o.mode != Mode::Stop {
        let mut tr = if o.mode == Mode::Postcopy {
            ferry_engine::precopy::Tracking::start_files(o.pid)?
        } else {
            ferry_engine::precopy::Tracking::start(o.pid)?
        };
        let max_rounds = if o.mode == Mode::Postcopy {
            1
        } else {
            o.max_rounds
        };
        let mut bw = 0.0f64; // bytes per ms, measured on the first round
        let mut prev = u64::MAX;
        let mut growing = 0;
        let mut throttled: Option<crate::throttle::Throttle> = None;
        let mut tightened = false;
        let mut base_spent = 0u64;
        let mut short_rounds = 0;
        let mut dirty_mb_s: Option<f64> = None;
        for round in 0..max_rounds {
            // Asked to stop (Ctrl-C): nothing is frozen yet; the process runs on.
            stop_asked()?;
            let tr0 = Instant::now();
            if round == 0 {
                setup_ms = (tr0 - t0).as_secs_f64() * 1e3;
            }
            // smaps for the final dump, read beside the round (not after it, when every ms
            // of reading is a ms more for the process to dirty pages before the freeze).
            let pid = o.pid;
            // Read again only when the layout changed: a read walks every page table, and
            // one still running at the freeze would hold the mmap lock that the dump's brk
            // query waits for.
            if round > 0
                && hint_job.is_none()
                && !latest_hint.as_ref().is_some_and(|h| hint_current(pid, h))
            {
                hint_job = Some(std::thread::spawn(move || smaps_hint(pid)));
            }
            let bytes = {
                let mut g = w.lock().unwrap();
                let mut batch = wire::PageBatch::default();
                let n = tr.round(&mut |pid, addr, data| {
                    // Within a long round too.
                    ferry_sys::cancel::check()?;
                    batch.add(&mut *g, pid, addr, data).map_err(|e| {
                        ferry_engine::EngineError::Failed(format!("sending pages: {e}"))
                    })?;
                    sent += data.len() as u64 + 16;
                    progress(&Progress {
                        phase: "pre-copy",
                        bytes_sent: sent,
                        round,
                        dirty_mb_s,
                    });
                    Ok(())
                })?;
                batch.flush(&mut *g)?;
                n
            };
            {
                let mut g = w.lock().unwrap();
                wire::write_json(
                    &mut *g,
                    Kind::Round,
                    &serde_json::json!({ "round": round, "bytes": bytes }),
                )?;
                g.flush().map_err(io("sending pages"))?;
            }
            // The agent has stored the round: no backlog of it is left to pay for while the
            // process is frozen, and the round's time is the real transfer time.
            round_ack(&mut rd)?;
            // A read that outlasts the round is not waited for: every ms here is a ms more
            // of writes for the final copy. An older hint serves as well while the layout
            // stays the same (the dump checks that it covers every mapping).
            if hint_job.as_ref().is_some_and(|j| j.is_finished()) {
                if let Some(h) = hint_job.take().and_then(|j| j.join().ok()) {
                    latest_hint = Some(h);
                }
            }
            let ms = tr0.elapsed().as_secs_f64() * 1e3;
            if round == 0 {
                bw = bytes as f64 / ms.max(0.001);
            }
            if let Some(last) = rounds.last() {
                dirty_mb_s = Some(bytes as f64 / last.ms.max(0.001) / 1e3);
            }
            rounds.push(RoundReport {
                round,
                bytes,
                pages: bytes.div_ceil(4096),
                ms,
            });
            // Stop when what is left fits the downtime at the measured rate, or stops shrinking.
            if bw > 0.0 && bytes as f64 / bw <= o.max_downtime_ms && round > 0 {
                if !one_more_short_round(bytes, prev, short_rounds) {
                    break;
                }
                short_rounds += 1;
                prev = bytes;
                continue;
            }
            // Not shrinking by a tenth any more, twice in a row, or three times the memory
            // sent already: more rounds would not help.
            let first = rounds.first().map(|r| r.bytes).unwrap_or(bytes);
            let spent: u64 = rounds.iter().map(|r| r.bytes).sum::<u64>() - base_spent;
            if (bytes as f64) < 0.9 * prev as f64 && spent < 3 * first.max(1) {
                growing = 0;
            } else {
                growing += 1;
                // Hybrid does not throttle: post-copy takes what does not converge.
                if (growing >= 2 || spent >= 3 * first.max(1))
                    && throttled.is_none()
                    && o.throttle
                    && o.mode == Mode::Precopy
                {
                    // Slow the writer down and try again.
                    match crate::throttle::Throttle::start(&tr.pids(), 10) {
                        Ok(t) => {
                            notes.push(format!(
                                "the dirty rate outran the link after {} rounds: the process \
                                 was throttled to 10% of a CPU until the end of the migration",
                                round + 1
                            ));
                            throttled = Some(t);
                            growing = 0;
                            base_spent += spent;
                            prev = u64::MAX;
                            continue;
                        }
                        Err(e) => notes.push(format!("could not throttle the process: {e}")),
                    }
                }
                // Still outrunning the link at 10%: once more, at 2%.
                if (growing >= 2 || spent >= 3 * first.max(1)) && !tightened {
                    if let Some(t) = throttled.as_ref() {
                        tightened = true;
                        if t.set(2).is_ok() {
                            notes.push(format!(
                                "still ahead of the link after {} rounds: the throttle was \
                                 tightened to 2% of a CPU",
                                round + 1
                            ));
                            growing = 0;
                            base_spent += spent;
                            prev = u64::MAX;
                            continue;
                        }
                    }
                }
                if growing >= 2 || spent >= 3 * first.max(1) {
                    notes.push(format!(
                        "the dirty rate kept up with the link after {} rounds: the final copy \
                         carries {} bytes",
                        round + 1,
                        bytes
                    ));
                    break;
                }
            }
            prev = bytes;
        }
        *tracking.borrow_mut() = Some(tr);
        // Kept until the migration ends; dropping it puts the threads back.
        _throttle_guard = throttled;
    }

    // Post-copy: the agent will ask for pages on a connection of their own.
    let mut pages_server = if post {
        Some(crate::postcopy::PageServer::start(
            sa,
            Hello {
                id: created.id.clone(),
                token: o.token.clone().unwrap_or_default(),
                role: Some("pages".into()),
                mode: None,
            },
            o.io_timeout,
            o.tls.as_ref(),
            &addr,
        )?)
    } else {
        None
    };
    // The final phase: frozen from here until the agent says Done.
    // Frames of 256 KiB: the final image crosses while its pages are read, and what is
    // left to send after the last read is small. The sinks gather the frames: the image
    // writer passes everything straight to them.
    const FRAME: usize = 256 << 10;
    let sink = |k| Box::new(FramedSink::new(w.clone(), k, FRAME)) as Box<dyn Write + Send>;
    let mut iw = ferry_image::ImageWriter::to_buffering_sinks(
        sink(Kind::ImageMeta),
        sink(Kind::ImagePages),
    )?;
    let tracked: Arc<Mutex<Vec<PrecopyRecord>>> = Arc::default();
    // The rounds' marks are not wanted.
    ferry_sys::timeline::take();
    ferry_sys::timeline::mark(|| "rounds done".into());
    let mut delta_fn = |pid: i32,
                        smaps: &[ferry_sys::procfs::SmapsEntry]|
     -> ferry_engine::Result<Option<ferry_engine::memory::Delta>> {
        let d = match tracking.borrow_mut().as_mut() {
            Some(tr) => tr.delta(pid, smaps)?,
            None => None,
        };
        let d = match (d, post) {
            (Some(d), true) => Some(ferry_engine::memory::Delta { lazy: true, ..d }),
            (None, true) => Some(ferry_engine::memory::Delta {
                lazy: true,
                ..Default::default()
            }),
            (d, false) => d,
        };
        if let Some(d) = d.as_ref().filter(|d| !d.tracked.is_empty()) {
            tracked.lock().unwrap().push(PrecopyRecord {
                pid,
                tracked: d.tracked.clone(),
            });
        }
        Ok(d)
    };
    let progress_final = ferry_engine::Progress::default();
    // smaps costs ~18 ms per GiB mapped: read it while the tree still runs, and check it
    // against the frozen tree's while the destination rebuilds.
    // No hint yet: the one being read is still better than reading smaps while frozen.
    if latest_hint.is_none() {
        latest_hint = hint_job.take().and_then(|j| j.join().ok());
    }
    let hint = match latest_hint {
        Some(h) => Some(h),
        None => (o.mode != Mode::Stop).then(|| smaps_hint(o.pid)),
    };
    ferry_sys::timeline::mark(|| "smaps hint".into());
    if let Some(t) = &_throttle_guard {
        t.lift();
    }
    let td = Instant::now();
    // The last scan of written pages runs beside the collection (a page-table walk, ~1-2 ms
    // per GiB).
    let mut on_frozen = || {
        if let Some(t) = tracking.borrow_mut().as_mut() {
            t.start_last_scans();
        }
    };
    let (mut held, stats) = ferry_engine::dump_into(
        o.pid,
        &mut iw,
        &progress_final,
        if o.mode != Mode::Stop {
            Some(&mut delta_fn)
        } else {
            None
        },
        hint.as_ref(),
        Some(&mut on_frozen),
        netblock,
    )?;
    // From here any error drops `held`, which resumes the source copy.
    let mut phases = DowntimePhases {
        freeze_ms: stats.freeze_ms,
        dump_ms: td.elapsed().as_secs_f64() * 1e3 - stats.freeze_ms,
        collect_ms: stats.collect_ms,
        memory_ms: stats.memory_ms,
        dump_steps: stats.steps.clone(),
        ..Default::default()
    };
    let tc = Instant::now();
    ferry_sys::timeline::mark(|| "dumped".into());
    let mut restore_report = serde_json::Value::Null;
    let mut released = Vec::new();
    let fin = (|| -> Result<i32> {
        let tf = Instant::now();
        // The addresses leave while the image's last frames go out (each release waits on
        // the kernel for up to a millisecond or so).
        let ns = format!("/proc/{}/ns/net", o.pid);
        let addrs = o.move_addresses.clone();
        let releasing = (!addrs.is_empty()).then(|| {
            std::thread::spawn(move || {
                let tr = Instant::now();
                let mut got = Vec::new();
                let mut err = None;
                for a in &addrs {
                    match crate::netmove::release(&ns, a) {
                        Ok(r) => got.push(r),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                (got, err, tr.elapsed().as_secs_f64() * 1e3)
            })
        });
        let summary = iw.finish();
        phases.finish_ms = tf.elapsed().as_secs_f64() * 1e3;
        if let Some(h) = releasing {
            let (got, err, ms) = h.join().map_err(|_| {
                MigrateError::Failed("the thread releasing the addresses panicked".into())
            })?;
            // Put back on failure, like any other released address.
            released.extend(got);
            phases.release_ms = ms;
            if let Some(e) = err {
                return Err(e);
            }
        }
        let summary = summary?;
        {
            let mut g = w.lock().unwrap();
            wire::write_json(
                &mut *g,
                Kind::Commit,
                &serde_json::json!({
                    "addresses": o.move_addresses,
                    "precopy": *tracked.lock().unwrap(),
                }),
            )?;
            g.flush().map_err(io("sending the image"))?;
        }
        phases.commit_sent_ms = tc.elapsed().as_secs_f64() * 1e3;
        ferry_sys::timeline::mark(|| "commit sent".into());
        sent += summary.page_bytes;
        progress(&Progress {
            phase: "final",
            bytes_sent: sent,
            round: rounds.len() as u32,
            dirty_mb_s: None,
        });
        let mut buf = wire::FrameBuf::default();
        rd.get_ref()
            .set_read_timeout(Some(o.io_timeout.max(Duration::from_secs(120))))
            .map_err(io("socket timeout"))?;
        let answer = wire::read_frame(&mut rd, &mut buf);
        ferry_sys::timeline::mark(|| "answer".into());
        // The smaps the image used are still the frozen tree's: checked on a thread since
        // the dump's collection; only what is left of it is waited for here.
        let tk = Instant::now();
        held.check_smaps()?;
        phases.check_smaps_ms = tk.elapsed().as_secs_f64() * 1e3;
        match answer? {
            Kind::Ready => {
                let v: serde_json::Value = wire::parse(Kind::Ready, &buf)?;
                restore_report = v["restore"].clone();
                if let Some(a) = v.get("agent") {
                    restore_report["agent"] = a.clone();
                }
                // The last point to stop at (Ctrl-C): without Go the destination drops its
                // copy, and ours resumes.
                stop_asked()?;
                Ok(v["pid"].as_i64().unwrap_or(0) as i32)
            }
            Kind::Failed => Err(agent_failed(
                &buf,
                "the destination could not rebuild the process",
            )?),
            k => Err(MigrateError::Protocol(format!(
                "unexpected {k:?} from the agent"
            ))),
        }
    })();
    let restored_pid = match fin {
        Ok(p) => p,
        Err(e) => {
            for r in released {
                r.restore();
            }
            held.resume();
            return Err(e);
        }
    };
    // The rebuilt tree waits, stopped, on the destination: ours goes, then it runs there.
    // Post-copy keeps ours, frozen, to serve the pages the destination still lacks.
    let final_bytes = sent - rounds.iter().map(|r| r.bytes).sum::<u64>();
    let frozen_at = Instant::now() - Duration::from_secs_f64(held.frozen_ms() / 1e3);
    let mut held = Some(held);
    if !post {
        // Bound to die with us before Go: it can never run here again. Killing it (a large
        // process takes tens of ms to exit) waits until it runs at the destination.
        if let Some(h) = held.as_mut() {
            if let Err(e) = h.doom() {
                for r in released {
                    r.restore();
                }
                if let Some(h) = held.take() {
                    h.resume();
                }
                return Err(e.into());
            }
        }
    }
    phases.to_ready_ms = tc.elapsed().as_secs_f64() * 1e3;
    ferry_sys::timeline::mark(|| "doomed".into());
    let tg = Instant::now();
    let done = (|| -> Result<()> {
        let mut g = w.lock().unwrap();
        wire::write_frame(&mut *g, Kind::Go, &[])?;
        g.flush().map_err(io("sending Go"))?;
        drop(g);
        let mut buf = wire::FrameBuf::default();
        match wire::read_frame(&mut rd, &mut buf)? {
            Kind::Done => Ok(()),
            k => Err(MigrateError::Protocol(format!("expected Done, got {k:?}"))),
        }
    })();
    let downtime_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
    let t_done = t0.elapsed().as_secs_f64() * 1e3;
    ferry_sys::timeline::mark(|| "done".into());
    let timeline = ferry_sys::timeline::take();
    phases.go_to_done_ms = tg.elapsed().as_secs_f64() * 1e3;
    // What the destination says once its memory is whole (lazily filled modes).
    let mut read_filled = || -> Result<ferry_engine::lazy::FillReport> {
        // Filling takes as long as the memory takes to cross, at worst: 10 minutes, or the
        // resident memory at 20 MB/s for a larger process (a silent link is found out
        // sooner, by the connection's keepalive probes).
        let fill_limit =
            Duration::from_secs(600).max(Duration::from_secs(resident_bytes / 20_000_000));
        rd.get_ref()
            .set_read_timeout(Some(o.io_timeout.max(fill_limit)))
            .map_err(io("socket timeout"))?;
        let mut buf = wire::FrameBuf::default();
        match wire::read_frame(&mut rd, &mut buf)? {
            Kind::Filled => wire::parse(Kind::Filled, &buf),
            Kind::Failed => Err(agent_failed(&buf, "the destination failed")?),
            k => Err(MigrateError::Protocol(format!(
                "expected Filled, got {k:?}"
            ))),
        }
    };
    let mut fill = None;
    let mut postcopy_bytes = 0;
    if post {
        // Filled is confirmed before our copy goes: an agent that hears nothing back kills
        // its copy (we may have resumed ours), and a confirmation that cannot be sent means
        // ours resumes, once the agent has surely given up.
        let confirm = |rep: ferry_engine::lazy::FillReport| -> Result<_> {
            let mut g = w.lock().unwrap();
            wire::write_frame(&mut *g, Kind::Released, &[])?;
            g.flush().map_err(io("confirming Filled"))?;
            Ok(rep)
        };
        match done.and_then(|_| read_filled()).and_then(confirm) {
            Ok(rep) => {
                fill = Some(rep);
                if let Some(h) = held.take() {
                    h.kill_moved();
                }
                if let Some(t) = tracking.borrow_mut().take() {
                    t.stop();
                }
                postcopy_bytes = pages_server.take().map(|p| p.stop()).unwrap_or(0);
                // The agent's word that it kept its copy. Ours is gone either way (never two
                // copies); without that word the process may be lost (Released lost on the
                // way: the agent killed its copy), and the report must not say it moved.
                let kept = (|| -> Result<()> {
                    rd.get_ref()
                        .set_read_timeout(Some(
                            crate::postcopy::FETCH_TIMEOUT + Duration::from_secs(2),
                        ))
                        .map_err(io("socket timeout"))?;
                    let mut buf = wire::FrameBuf::default();
                    match wire::read_frame(&mut rd, &mut buf)? {
                        Kind::Kept => Ok(()),
                        k => Err(MigrateError::Protocol(format!("expected Kept, got {k:?}"))),
                    }
                })();
                if let Err(e) = kept {
                    return Err(MigrateError::Failed(format!(
                        "the source copy of process {} is gone and the destination did not \
                         confirm it kept its own ({e}); check migration {} on {}",
                        o.pid, created.id, o.to
                    )));
                }
            }
            Err(e) => {
                // The destination's copy cannot run on without our pages, nor past Filled
                // without our Released. Serving stops first: a fetch in flight fails, and
                // any Filled still to come is sent now at the latest. Unless the agent said
                // it failed, or closed the connection (it, or its guardian, killed its copy
                // first), wait until it has surely killed its copy.
                if let Some(p) = pages_server.take() {
                    p.stop();
                }
                if !matches!(e, MigrateError::AgentFailed(_)) && !is_eof(&e) {
                    std::thread::sleep(crate::postcopy::FETCH_TIMEOUT + Duration::from_secs(2));
                }
                for r in released {
                    r.restore();
                }
                if let Some(t) = tracking.borrow_mut().take() {
                    t.stop();
                }
                if let Some(h) = held.take() {
                    h.resume();
                }
                return Err(MigrateError::Failed(format!(
                    "post-copy lost the destination ({e}): the process resumed here as it was \
                     at the freeze; what it did on the destination since is lost"
                )));
            }
        }
    } else {
        if let Err(e) = done {
            // Ask the agent what became of it. Our copy is still whole (frozen, bound to die
            // with us): if the destination says its copy is gone, ours runs on. An agent that
            // still holds its copy ("ready": Go never reached it) drops it when its wait for
            // Go ends, and an agent out of reach may come back (a link that flapped): ask
            // until the answer is final or that wait is surely over.
            let deadline = Instant::now() + crate::agent::GO_WAIT + Duration::from_secs(10);
            let st: Result<MigrationInfo> = loop {
                let st: Result<MigrationInfo> = http.get(&format!("/v1/migrations/{}", created.id));
                let pending = match &st {
                    Ok(m) => m.state == "ready" || m.state == "restoring",
                    Err(_) => true,
                };
                if !pending || Instant::now() >= deadline {
                    break st;
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            match st {
                Ok(m) if m.state == "running" || m.state == "exited" => {
                    if let Some(h) = held.take() {
                        h.kill_moved();
                    }
                }
                Ok(m) if m.state == "failed" || m.state == "cancelled" => {
                    for r in released {
                        r.restore();
                    }
                    if let Some(t) = tracking.borrow_mut().take() {
                        t.stop();
                    }
                    if let Some(h) = held.take() {
                        h.resume();
                    }
                    return Err(MigrateError::Failed(format!(
                        "the destination dropped its copy after Go ({e}; it says {}: {})",
                        m.state,
                        m.error.unwrap_or_default()
                    )));
                }
                _ => {
                    // Unknown: never two copies. Ours goes.
                    if let Some(h) = held.take() {
                        h.kill_moved();
                    }
                    return Err(MigrateError::Failed(format!(
                        "the source copy of process {} is gone and the destination did not \
                         confirm it runs there ({e}); check migration {} on {}",
                        o.pid, created.id, o.to
                    )));
                }
            }
        }
        if o.mode == Mode::Precopy {
            match read_filled() {
                Ok(r) => fill = Some(r),
                Err(e) => notes.push(format!(
                    "the destination did not report its memory filled: {e}"
                )),
            }
        }
    }
    // Memory is whole at the destination: the migration is done. The source copy's exit
    // (freeing its memory: ~0.1-0.2 s per GiB here) comes after.
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    phases.done_to_filled_ms = total_ms - t_done;
    if !post {
        // It runs at the destination: ours goes now, outside the downtime.
        if let Some(h) = held.take() {
            h.kill_moved();
        }
        if let Some(t) = tracking.borrow_mut().take() {
            t.stop();
        }
    }
    Ok(MigrateReport {
        pid: o.pid,
        destination: o.to.clone(),
        migration: created.id,
        mode: o.mode,
        verdict,
        rounds,
        final_bytes,
        bytes_sent: sent,
        resident_bytes,
        downtime_ms,
        total_ms,
        gate_ms,
        setup_ms,
        restored_pid,
        fill_ms: fill.as_ref().map(|f| f.fill_ms),
        postcopy_bytes,
        fill_left_bytes: fill.as_ref().map(|f| f.local_left_bytes).unwrap_or(0),
        faults: fill.as_ref().map(|f| f.faults).unwrap_or(0),
        frozen_faults: fill.as_ref().map(|f| f.frozen_faults).unwrap_or(0),
        mean_fault_ms: fill.as_ref().map(|f| f.mean_fault_ms).unwrap_or(0.0),
        max_fault_ms: fill.as_ref().map(|f| f.max_fault_ms).unwrap_or(0.0),
        phases,
        restore: restore_report,
        notes,
        timeline,
    })
}

/// Err once SIGINT, SIGTERM or SIGHUP asked `ferry migrate` to stop
/// (`ferry_sys::cancel`); checked only where stopping leaves the process running here.
fn stop_asked() -> Result<()> {
    ferry_sys::cancel::check().map_err(|e| MigrateError::Engine(e.into()))
}

/// Refuse an agent that speaks another page-stream protocol (another Ferry version), before
/// anything is frozen or sent.
fn same_protocol(host: &HostInfo, to: &str) -> Result<()> {
    if host.protocol != wire::PROTOCOL {
        return Err(MigrateError::Failed(format!(
            "the agent at {to} (Ferry {}) speaks page-stream protocol {}, this Ferry ({}) \
             speaks {}: run the same Ferry version on both hosts",
            host.version,
            host.protocol,
            env!("CARGO_PKG_VERSION"),
            wire::PROTOCOL
        )));
    }
    Ok(())
}

/// Waits for the agent's RoundAck.
fn round_ack(rd: &mut impl std::io::BufRead) -> Result<()> {
    let mut ack = wire::FrameBuf::default();
    match wire::read_frame(rd, &mut ack)? {
        Kind::RoundAck => Ok(()),
        Kind::Failed => Err(agent_failed(&ack, "the destination failed")?),
        k => Err(MigrateError::Protocol(format!(
            "expected RoundAck, got {k:?}"
        ))),
    }
}

/// The error an agent's Failed frame (`buf`) reports, after `what`.
fn agent_failed(buf: &[u8], what: &str) -> Result<MigrateError> {
    let v: serde_json::Value = wire::parse(Kind::Failed, buf)?;
    Ok(MigrateError::AgentFailed(format!(
        "{what}: {}",
        v["error"].as_str().unwrap_or("?")
    )))
}

/// smaps of `root` and its descendants, read now.
/// The hint still has the tree's processes and each one's mappings (boundaries); flags are
/// checked at the freeze (`check_smaps`).
fn hint_current(root: i32, h: &ferry_engine::SmapsHint) -> bool {
    let mut seen = 0;
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let Some(s) = h.get(&p) else {
            return false;
        };
        let Ok(m) = ferry_sys::procfs::read_maps(p) else {
            return false;
        };
        if m.len() != s.len()
            || m.iter()
                .zip(s)
                .any(|(a, b)| a.start != b.start || a.end != b.end)
        {
            return false;
        }
        seen += 1;
        todo.extend(ferry_sys::procfs::children(p));
    }
    seen == h.len()
}

fn smaps_hint(root: i32) -> ferry_engine::SmapsHint {
    let mut h = ferry_engine::SmapsHint::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if h.contains_key(&p) {
            continue;
        }
        if let Ok(s) = ferry_sys::procfs::read_smaps(p) {
            h.insert(p, s);
        }
        todo.extend(ferry_sys::procfs::children(p));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::one_more_short_round;

    #[test]
    fn short_rounds_go_on_while_they_shrink_by_a_third() {
        const MIB: u64 = 1 << 20;
        // Redis written flat out: 21 -> 3 -> 0.9 -> 0.6 MiB.
        assert!(one_more_short_round(3 * MIB, 21 * MIB, 0));
        assert!(one_more_short_round(MIB, 3 * MIB, 1));
        // Not a third smaller: the rounds have found their level.
        assert!(!one_more_short_round(7 * MIB / 10, MIB, 2));
        // Small enough to send frozen.
        assert!(!one_more_short_round(200 << 10, MIB, 0));
        // Three made already.
        assert!(!one_more_short_round(MIB, 3 * MIB, 3));
        // Round 0 was all of memory; nothing written since.
        assert!(!one_more_short_round(0, 1 << 30, 0));
    }
}
