//! `ferry agent`: the per-host daemon. An HTTP/JSON control API (axum) and a page-stream
//! listener. Each incoming migration is received and rebuilt on its own OS thread (ptrace
//! belongs to the thread that attached); the rebuilt tree is held stopped until the source
//! says its copy is gone, and killed if that word never comes.

use crate::api::*;
use crate::store::PageStore;
use crate::tls::Conn;
use crate::wire::{self, Kind};
use crate::{io, MigrateError, Result};
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct AgentConfig {
    pub listen: SocketAddr,
    /// The page stream's port (on the API's address); 0 picks the API port + 1.
    pub data_port: u16,
    /// The page-stream port sources are told to use, when something (NAT, a proxy) forwards
    /// another port to ours; 0: our own.
    pub advertise_data_port: u16,
    pub token: Option<String>,
    pub state_dir: PathBuf,
    /// The CPU profile to publish; None: this host's.
    pub profile: Option<ferry_cpu::profile::CpuProfile>,
    /// Restore incoming trees into this network namespace.
    pub netns: Option<String>,
    /// Serve the API and the page stream over TLS with this certificate; None: plain.
    pub tls: Option<crate::tls::ServerTls>,
}

/// A page connection past its Hello, and its reader.
type PageConn = (Conn, std::io::BufReader<crate::tls::ConnReader>);

struct Shared {
    cfg: AgentConfig,
    host: HostInfo,
    migrations: Mutex<HashMap<String, MigrationInfo>>,
    next_id: AtomicU64,
    bytes_received: AtomicU64,
    started: Instant,
    /// Post-copy page connections, waiting for their migration's restore, by migration and
    /// role.
    page_conns: Mutex<HashMap<(String, String), PageConn>>,
    /// Memory being made resident, or resident, for prepared migrations.
    reservations: Mutex<HashMap<String, Reserving>>,
    /// Told to stop (SIGTERM, SIGINT, SIGHUP): no new migration, the ones under way finish.
    draining: std::sync::atomic::AtomicBool,
    /// Incoming streams not yet done (their tree runs with its memory whole, or is gone).
    busy: std::sync::atomic::AtomicUsize,
}

/// Refusal of new work while the agent stops.
fn draining(s: &Shared) -> Option<Response> {
    s.draining.load(Ordering::SeqCst).then(|| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping: it finishes the migrations under way and accepts no new one",
        )
    })
}

/// Memory reserved for a prepared migration, on its way (a thread making it resident), and
/// the PID of the stub holding it once there is one.
type Reserving = (
    std::thread::JoinHandle<Option<ferry_engine::warm::Reservation>>,
    ferry_engine::warm::StubHandle,
);

/// Let go of a reservation: its stub is killed, and its PID is free when this returns.
fn let_go((job, stub): Reserving) {
    ferry_engine::warm::Reservation::abandon(&stub);
    drop(job.join());
}

/// `let_go`, without holding up the caller.
fn release(r: Reserving) {
    std::thread::spawn(move || let_go(r));
}

/// Let go of the memory reserved for other prepared migrations of process `pid`: their stubs
/// hold the PID that this migration's process needs. They stay prepared, without it.
fn release_for_pid(s: &Shared, pid: i32) {
    let ids: Vec<String> = s
        .migrations
        .lock()
        .unwrap()
        .values()
        .filter(|m| m.pid == pid && m.state == "prepared")
        .map(|m| m.id.clone())
        .collect();
    for id in ids {
        let r = s.reservations.lock().unwrap().remove(&id);
        if let Some(r) = r {
            // Here and now: the PID must be free when this returns.
            let_go(r);
            s.update(&id, |m| {
                if let Some(p) = m.prepared.as_mut() {
                    p.memory = "none: let go for another migration of the process".into();
                    p.memory_bytes = 0;
                }
            });
        }
    }
}

impl Shared {
    fn update(&self, id: &str, f: impl FnOnce(&mut MigrationInfo)) {
        if let Some(m) = self.migrations.lock().unwrap().get_mut(id) {
            f(m);
        }
    }

    fn state(&self, id: &str) -> Option<String> {
        self.migrations
            .lock()
            .unwrap()
            .get(id)
            .map(|m| m.state.clone())
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Constant-time comparison, so that a token cannot be guessed byte by byte from timings.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn authorized(s: &Shared, h: &HeaderMap) -> bool {
    let Some(tok) = &s.cfg.token else {
        return true;
    };
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| same(v, tok))
        .unwrap_or(false)
}

fn err(code: StatusCode, msg: &str) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

type St = State<Arc<Shared>>;

async fn host(State(s): St, h: HeaderMap) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    Json(s.host.clone()).into_response()
}

async fn list(State(s): St, h: HeaderMap) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    let mut v: Vec<MigrationInfo> = s.migrations.lock().unwrap().values().cloned().collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Json(v).into_response()
}

async fn create(State(s): St, h: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    if let Some(r) = draining(&s) {
        return r;
    }
    let req: NewMigration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, &format!("bad request body: {e}")),
    };
    expire_prepared(&s);
    release_for_pid(&s, req.pid);
    let id = format!(
        "m{}-{}",
        now_unix(),
        s.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let info = MigrationInfo {
        id: id.clone(),
        state: "waiting".into(),
        pid: req.pid,
        mode: req.mode,
        source: req.source,
        created_unix: now_unix(),
        ..Default::default()
    };
    s.migrations.lock().unwrap().insert(id.clone(), info);
    (
        StatusCode::CREATED,
        Json(Created {
            id,
            data_port: s.host.data_port,
            prepared: None,
        }),
    )
        .into_response()
}

/// How long a prepared migration keeps its reservation without a stream.
const PREPARED_TTL_S: u64 = 600;

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Release reservations of prepared migrations that never started.
fn expire_prepared(s: &Shared) {
    let now = now_unix();
    let mut g = s.migrations.lock().unwrap();
    for m in g.values_mut() {
        let expired =
            m.state == "prepared" && m.prepared.as_ref().is_some_and(|p| p.expires_unix <= now);
        if expired {
            m.state = "cancelled".into();
            m.error = Some("prepared, but no stream came before it expired".into());
            let _ = std::fs::remove_dir_all(s.cfg.state_dir.join(&m.id));
            if let Some(r) = s.reservations.lock().unwrap().remove(&m.id) {
                release(r);
            }
        }
    }
}

async fn prepare(State(s): St, h: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    if let Some(r) = draining(&s) {
        return r;
    }
    let req: Prepare = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, &format!("bad request body: {e}")),
    };
    expire_prepared(&s);
    // This host's own check of the process's CPU needs.
    let v = ferry_cpu::check::check_ferry(
        &req.scan.features,
        &req.scan.unknown,
        Some(req.xstate_in_use),
        &s.host.profile,
        req.source_profile.as_ref(),
    );
    let verdict = format!("{:?}", v.verdict).to_lowercase();
    if v.verdict != ferry_cpu::check::Outcome::Compatible && !req.force {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({
                "error": format!("process {} is {verdict} with this host's CPU ({})", req.pid, s.host.profile.name),
                "verdict": v,
            })),
        )
            .into_response();
    }
    // Room for its memory: in RAM, and on disk for the page store.
    let avail = mem_available();
    if avail < req.memory_bytes {
        return err(
            StatusCode::INSUFFICIENT_STORAGE,
            &format!(
                "{} MiB of memory expected, {} MiB available here",
                req.memory_bytes >> 20,
                avail >> 20
            ),
        );
    }
    let id = format!(
        "m{}-{}",
        now_unix(),
        s.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let dir = s.cfg.state_dir.join(&id);
    let reserved = std::fs::create_dir_all(&dir)
        .map_err(io(format!("creating {}", dir.display())))
        .and_then(|_| PageStore::reserve(&dir.join("precopy.pages"), req.memory_bytes.max(4096)));
    if let Err(e) = reserved {
        let _ = std::fs::remove_dir_all(&dir);
        return err(StatusCode::INSUFFICIENT_STORAGE, &e.to_string());
    }
    // Pre-copy writes its pages straight into the process built ahead: that memory is made
    // resident now, so the migration does not wait on first touch of fresh memory.
    // Held twice until the stream comes when the state directory is a tmpfs (the page
    // store's room and the reserved memory): both must fit.
    let reserving = req.mode == "precopy"
        && std::env::var_os("FERRY_NO_RESERVE").is_none()
        && avail / 2 >= req.memory_bytes;
    let prepared = Prepared {
        verdict,
        reserved_bytes: req.memory_bytes.max(4096),
        mem_available: avail,
        expires_unix: now_unix() + PREPARED_TTL_S,
        memory: if reserving {
            "reserving".into()
        } else if req.mode == "precopy" && std::env::var_os("FERRY_NO_RESERVE").is_none() {
            format!(
                "none: {} MiB available here, not twice the {} MiB expected",
                avail >> 20,
                req.memory_bytes >> 20
            )
        } else {
            format!("none: {} does not build the process ahead", req.mode)
        },
        ..Default::default()
    };
    let info = MigrationInfo {
        id: id.clone(),
        state: "prepared".into(),
        pid: req.pid,
        mode: req.mode,
        source: req.source,
        created_unix: now_unix(),
        prepared: Some(prepared.clone()),
        ..Default::default()
    };
    s.migrations.lock().unwrap().insert(id.clone(), info);
    if reserving {
        release_for_pid(&s, req.pid);
        let (sh, mid, pid, bytes) = (s.clone(), id.clone(), req.pid, req.memory_bytes);
        let namespaces = req.namespaces.clone();
        let stub = ferry_engine::warm::StubHandle::default();
        let st = stub.clone();
        let job = std::thread::spawn(move || {
            let r = ferry_engine::warm::Reservation::reserve(pid, bytes, st, namespaces);
            sh.update(&mid, |m| {
                if let Some(p) = m.prepared.as_mut() {
                    match &r {
                        Ok(r) => {
                            p.memory = "resident".into();
                            p.memory_bytes = r.bytes();
                            p.memory_ms = r.populate_ms;
                        }
                        Err(e) => p.memory = format!("failed: {e}"),
                    }
                }
            });
            r.ok()
        });
        s.reservations
            .lock()
            .unwrap()
            .insert(id.clone(), (job, stub));
    }
    (
        StatusCode::CREATED,
        Json(Created {
            id,
            data_port: s.host.data_port,
            prepared: Some(prepared),
        }),
    )
        .into_response()
}

async fn one(State(s): St, h: HeaderMap, AxPath(id): AxPath<String>) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    match s.migrations.lock().unwrap().get(&id) {
        Some(m) => Json(m.clone()).into_response(),
        None => err(StatusCode::NOT_FOUND, &format!("no migration {id}")),
    }
}

async fn cancel(State(s): St, h: HeaderMap, AxPath(id): AxPath<String>) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    let mut g = s.migrations.lock().unwrap();
    match g.get_mut(&id) {
        None => err(StatusCode::NOT_FOUND, &format!("no migration {id}")),
        Some(m)
            if ["ready", "running", "exited", "failed", "cancelled"]
                .contains(&m.state.as_str()) =>
        {
            err(
                StatusCode::CONFLICT,
                &format!("migration {id} is {} already", m.state),
            )
        }
        Some(m) => {
            // The receiving thread sees it between frames and gives up.
            if m.state == "prepared" {
                // Nothing runs for it yet: its reservation goes now.
                let _ = std::fs::remove_dir_all(s.cfg.state_dir.join(&id));
                if let Some(r) = s.reservations.lock().unwrap().remove(&id) {
                    release(r);
                }
            }
            m.state = "cancelled".into();
            Json(m.clone()).into_response()
        }
    }
}

async fn metrics(State(s): St, h: HeaderMap) -> Response {
    if !authorized(&s, &h) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong token");
    }
    let g = s.migrations.lock().unwrap();
    let mut by_state: HashMap<&str, u64> = HashMap::new();
    for m in g.values() {
        *by_state.entry(m.state.as_str()).or_default() += 1;
    }
    let mut out = String::new();
    out += "# HELP ferry_migrations Incoming migrations by state.\n# TYPE ferry_migrations gauge\n";
    let mut states: Vec<_> = by_state.into_iter().collect();
    states.sort();
    for (st, n) in states {
        out += &format!("ferry_migrations{{state=\"{st}\"}} {n}\n");
    }
    out += "# HELP ferry_received_bytes_total Page-stream bytes received.\n# TYPE ferry_received_bytes_total counter\n";
    out += &format!(
        "ferry_received_bytes_total {}\n",
        s.bytes_received.load(Ordering::Relaxed)
    );
    out += "# HELP ferry_uptime_seconds Time since the agent started.\n# TYPE ferry_uptime_seconds gauge\n";
    out += &format!(
        "ferry_uptime_seconds {:.0}\n",
        s.started.elapsed().as_secs_f64()
    );
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Run the agent until the process is killed.
pub fn run(cfg: AgentConfig) -> Result<()> {
    let profile = match &cfg.profile {
        Some(p) => p.clone(),
        None => ferry_cpu::profile::CpuProfile::host()
            .map_err(|e| MigrateError::Failed(format!("reading this host's CPU profile: {e}")))?,
    };
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(io(format!("creating {}", cfg.state_dir.display())))?;
    let data_port = if cfg.data_port == 0 {
        cfg.listen.port() + 1
    } else {
        cfg.data_port
    };
    let data = TcpListener::bind((cfg.listen.ip(), data_port))
        .map_err(io(format!("binding the page stream to port {data_port}")))?;
    let api = TcpListener::bind(cfg.listen).map_err(io(format!("binding {}", cfg.listen)))?;
    api.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        host: HostInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: wire::PROTOCOL,
            hostname,
            data_port: if cfg.advertise_data_port != 0 {
                cfg.advertise_data_port
            } else {
                data_port
            },
            profile,
        },
        cfg,
        migrations: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        bytes_received: AtomicU64::new(0),
        started: Instant::now(),
        page_conns: Mutex::new(HashMap::new()),
        reservations: Mutex::new(HashMap::new()),
        draining: Default::default(),
        busy: Default::default(),
    });
    {
        // SIGTERM (or SIGINT, SIGHUP): finish what is under way, then exit.
        let s = shared.clone();
        std::thread::spawn(move || drain_on_signal(&s));
    }
    {
        // Prepared migrations that no stream came for let go of what they hold (room, memory,
        // the PID) when they expire, whether or not another request comes.
        let s = shared.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            expire_prepared(&s);
        });
    }
    if let Some(ns) = &shared.cfg.netns {
        // Incoming trees are rebuilt by threads spawned from here: they inherit it.
        ferry_sys::net::enter_netns(ns).map_err(ferry_engine::EngineError::from)?;
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in data.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || receive(&s, conn));
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let tls = shared.cfg.tls.clone();
    rt.block_on(async move {
        let app = Router::new()
            .route("/v1/host", get(host))
            .route("/v1/migrations", get(list).post(create))
            .route("/v1/prepare", axum::routing::post(prepare))
            .route("/v1/migrations/{id}", get(one).delete(cancel))
            .route("/metrics", get(metrics))
            .with_state(shared);
        let l = tokio::net::TcpListener::from_std(api).map_err(io("API listener"))?;
        eprintln!(
            "ferry agent: listening on {}",
            l.local_addr().map_err(io("API listener"))?
        );
        crate::tls::serve_api(l, app, tls).await
    })
}

/// Once a stop is asked for (`ferry_sys::cancel::install_drain`, by `ferry agent`): new migrations
/// are refused, those announced or prepared without a stream yet are cancelled (their room and
/// memory freed), those under way finish (10 minutes at most), then the agent exits. A tree
/// it rebuilt runs on (it is reparented), unless the agent is PID 1 of its PID namespace.
fn drain_on_signal(s: &Shared) {
    let sig = loop {
        if let Some(sig) = ferry_sys::cancel::drain_requested() {
            break sig;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    s.draining.store(true, Ordering::SeqCst);
    eprintln!(
        "ferry agent: signal {sig}: finishing {} migration(s) under way, accepting no new one",
        s.busy.load(Ordering::SeqCst)
    );
    let idle: Vec<String> = s
        .migrations
        .lock()
        .unwrap()
        .values()
        .filter(|m| m.state == "waiting" || m.state == "prepared")
        .map(|m| m.id.clone())
        .collect();
    for id in idle {
        s.update(&id, |m| {
            m.state = "cancelled".into();
            m.error = Some("the agent stopped".into());
        });
        if let Some(r) = s.reservations.lock().unwrap().remove(&id) {
            let_go(r);
        }
        let _ = std::fs::remove_dir_all(s.cfg.state_dir.join(&id));
    }
    let end = Instant::now() + Duration::from_secs(600);
    while s.busy.load(Ordering::SeqCst) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    // PID 1 of a PID namespace takes every process of it along when it exits: it stays
    // until the trees it rebuilt have ended (SIGKILL ends them all).
    if std::process::id() == 1 {
        eprintln!(
            "ferry agent: PID 1 of its namespace: staying until the processes it rebuilt end"
        );
        while others_in_namespace() {
            // Orphans are ours to reap.
            // SAFETY: waitpid writes only `st`.
            unsafe {
                let mut st = 0;
                while libc::waitpid(-1, &mut st, libc::WNOHANG) > 0 {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("ferry agent: stopped");
    std::process::exit(0);
}

/// Does any process but us, and not a zombie, run in our PID namespace? (Whatever PID
/// namespace the mounted /proc belongs to: processes are compared by their namespace.)
fn others_in_namespace() -> bool {
    let me = std::fs::read_link("/proc/self").ok();
    let ours = std::fs::read_link("/proc/self/ns/pid").ok();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                let name = e.file_name();
                let Some(p) = name.to_str().filter(|n| n.parse::<u32>().is_ok()) else {
                    return false;
                };
                Some(std::path::PathBuf::from(p)) != me
                    && std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() == ours
                    && std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .is_ok_and(|st| !st.contains(") Z "))
            })
        })
        .unwrap_or(false)
}

/// One incoming page stream, from the greeting to the rebuilt tree running (or nothing left).
fn receive(s: &Shared, conn: TcpStream) {
    let mut id = String::new();
    // Counted until its tree runs with its memory whole, or is gone.
    s.busy.fetch_add(1, Ordering::SeqCst);
    let mut busy = Some(Busy(&s.busy));
    let r = receive_inner(s, conn, &mut id, &mut busy);
    drop(busy);
    if let Err(e) = r {
        eprintln!("ferry agent: migration {id}: {e}");
        s.update(&id, |m| {
            if m.state != "cancelled" {
                m.state = "failed".into();
            }
            m.error = Some(e.to_string());
        });
    }
    if !id.is_empty() {
        let _ = std::fs::remove_dir_all(s.cfg.state_dir.join(&id));
    }
}

/// Counts one stream in `Shared::busy` until dropped.
struct Busy<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn receive_inner(
    s: &Shared,
    conn: TcpStream,
    id_out: &mut String,
    busy: &mut Option<Busy>,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io("socket timeout"))?;
    let _ = conn.set_nodelay(true);
    let mut conn = Conn::accept(conn, s.cfg.tls.as_ref())?;
    let mut greet = [0u8; 8];
    std::io::Read::read_exact(&mut conn, &mut greet).map_err(io("reading the greeting"))?;
    if &greet != wire::GREETING {
        return Err(MigrateError::Protocol("not a Ferry page stream".into()));
    }
    // Small: page data bypasses it (`read_frame` reads whole pieces), so what it holds is
    // copied once more.
    let mut rd = std::io::BufReader::with_capacity(64 << 10, conn.reader().map_err(io("dup"))?);
    let mut buf = wire::FrameBuf::default();
    if wire::read_frame(&mut rd, &mut buf)? != Kind::Hello {
        return Err(MigrateError::Protocol(
            "the stream did not start with Hello".into(),
        ));
    }
    let hello: Hello = wire::parse(Kind::Hello, &buf)?;
    if let Some(t) = &s.cfg.token {
        if !same(&hello.token, t) {
            return Err(MigrateError::Protocol(
                "wrong token on the page stream".into(),
            ));
        }
    }
    if let Some(role @ ("pages" | "faults")) = hello.role.as_deref() {
        // Post-copy's page connections: kept for the restore of the main stream, which may
        // have its Commit already (it waits for them in "restoring").
        if !matches!(
            s.state(&hello.id).as_deref(),
            Some("waiting" | "prepared" | "receiving" | "restoring")
        ) {
            return Err(MigrateError::Protocol(format!(
                "no migration {} receiving for this page connection",
                hello.id
            )));
        }
        s.page_conns
            .lock()
            .unwrap()
            .insert((hello.id.clone(), role.to_string()), (conn, rd));
        return Ok(());
    }
    if !matches!(s.state(&hello.id).as_deref(), Some("waiting" | "prepared")) {
        return Err(MigrateError::Protocol(format!(
            "no migration {} waiting for its stream",
            hello.id
        )));
    }
    let id = hello.id.clone();
    *id_out = id.clone();
    // Memory reserved when it was prepared: the process is built from it, or it goes before
    // the process is built without it (its stub holds the PID).
    let mut reserving = s.reservations.lock().unwrap().remove(&id);
    s.update(&id, |m| {
        m.state = "receiving".into();
        if let Some(mode) = &hello.mode {
            m.mode = mode.clone();
        }
    });
    let dir = s.cfg.state_dir.join(&id);
    let img = dir.join("image");
    std::fs::create_dir_all(&img).map_err(io(format!("creating {}", img.display())))?;
    // Frames arrive whole (up to 1 MiB each): written as they come, unbuffered.
    let mut meta =
        std::fs::File::create(img.join("meta.fimg")).map_err(io("creating meta.fimg"))?;
    let mut pages =
        std::fs::File::create(img.join("pages.fimg")).map_err(io("creating pages.fimg"))?;
    // The final image arrives frozen: its files' memory is allocated ahead (on tmpfs, fresh
    // pages cost several ms per MiB on a busy VM).
    let (mut reserved, mut round_bytes) = (16u64 << 20, 0u64);
    reserve(&meta, 4 << 20);
    reserve(&pages, reserved);
    let mut store = PageStore::create(&dir.join("precopy.pages"))?;
    // The process built ahead of the freeze, when the source sent its layout in time.
    let mut warm: Option<ferry_engine::warm::WarmTree> = None;
    let mut warm_note: Option<String> = None;
    let mut pages_seen = false;
    let mode = s
        .migrations
        .lock()
        .unwrap()
        .get(&id)
        .map(|m| m.mode.clone())
        .unwrap_or_default();
    // Lazily filled memory is written into the warm process with pre-copy only. Hybrid
    // leaves what was written since the last round in the source: in the warm process those
    // pages would be stale and have to be dropped while frozen (1 GiB written flat out:
    // 10857 runs, 580 ms); from the page store the filler simply takes the newer copy.
    let lazy_too = mode == "precopy";
    let commit: serde_json::Value;
    let t_commit;
    // When the final image began to arrive.
    let mut t_final: Option<Instant> = None;
    let mut last_ack: Option<Instant> = None;
    let mut prep_ms = 0.0;
    // Of the final image's arrival: time spent waiting for its frames.
    let mut final_read_ms = 0.0;
    let fail = |conn: &mut Conn, e: MigrateError| -> MigrateError {
        let _ = wire::write_json(
            conn,
            Kind::Failed,
            &serde_json::json!({ "error": e.to_string() }),
        );
        e
    };
    loop {
        if s.state(&id).as_deref() == Some("cancelled") {
            return Err(fail(
                &mut conn,
                MigrateError::Failed("cancelled on the destination".into()),
            ));
        }
        let tr = Instant::now();
        let kind = wire::read_frame(&mut rd, &mut buf)?;
        if last_ack.is_some() {
            ferry_sys::timeline::mark(|| format!("rx {kind:?} {}", buf.len()));
        }
        if t_final.is_some() {
            final_read_ms += tr.elapsed().as_secs_f64() * 1e3;
        }
        s.bytes_received
            .fetch_add(buf.len() as u64 + 12, Ordering::Relaxed);
        s.update(&id, |m| m.bytes_received += buf.len() as u64 + 12);
        if t_final.is_none() && matches!(kind, Kind::ImageMeta | Kind::ImagePages) {
            pause_point(s, "final");
        }
        let r = match kind {
            Kind::Pages => wire::page_runs(&buf).and_then(|runs| {
                pages_seen = true;
                if warm.is_none() {
                    if let Some((_, stub)) = &reserving {
                        // No process is built ahead now: its stub goes (reaped before the
                        // restore, which needs the PID), not while the source is frozen.
                        ferry_engine::warm::Reservation::abandon(stub);
                    }
                }
                round_bytes += buf.len() as u64;
                runs.into_iter().try_for_each(|(pid, addr, data)| {
                    let rest = match warm.as_mut().map(|w| w.write(pid, addr, data, lazy_too)) {
                        None => vec![(addr, addr + data.len() as u64)],
                        Some(Ok(rest)) => rest,
                        Some(Err(e)) => {
                            // Only a head start lost: the rebuild at the commit does it all,
                            // from the store, which takes back what only the warm process held.
                            let w = warm.take().unwrap();
                            let wpid = w.pid();
                            w.salvage(&mut |a, d| {
                                store
                                    .put(wpid, a, d)
                                    .map_err(|e| ferry_engine::EngineError::Failed(e.to_string()))
                            })?;
                            warm_note = Some(format!("not used: writing pages into it: {e}"));
                            vec![(addr, addr + data.len() as u64)]
                        }
                    };
                    rest.into_iter().try_for_each(|(s, e)| {
                        store.put(pid, s, &data[(s - addr) as usize..(e - addr) as usize])
                    })
                })
            }),
            Kind::Layout => {
                ferry_engine::lazy::Filler::prepare();
                // Built on this thread, the one that restores it later (it traces it).
                match wire::parse::<ferry_engine::warm::WarmLayout>(kind, &buf) {
                    Ok(_) if pages_seen || warm.is_some() => {
                        warm_note = Some("not used: its layout came after pages".into());
                    }
                    Ok(l) => match ferry_engine::warm::prebuild_with(l, {
                        // Only pre-copy writes every page straight into it; otherwise it
                        // goes (and its PID is free) before the process is built.
                        match reserving.take() {
                            Some((job, stub)) => {
                                if !lazy_too {
                                    ferry_engine::warm::Reservation::abandon(&stub);
                                }
                                job.join().ok().flatten().filter(|_| lazy_too)
                            }
                            None => None,
                        }
                    }) {
                        Ok(w) => {
                            warm_note = Some(format!("built in {:.1} ms", w.built_ms));
                            if w.moved_in > 0 {
                                warm_note = Some(format!(
                                    "built in {:.1} ms, {} MiB of its memory moved in resident \
                                     from the reservation",
                                    w.built_ms,
                                    w.moved_in >> 20
                                ));
                            }
                            warm = Some(w);
                        }
                        Err(e) => warm_note = Some(format!("not built: {e}")),
                    },
                    Err(e) => {
                        warm_note = Some(format!("not built: {e}"));
                        if let Some((_, stub)) = &reserving {
                            ferry_engine::warm::Reservation::abandon(stub);
                        }
                    }
                }
                Ok(())
            }
            Kind::Round => {
                s.update(&id, |m| m.rounds += 1);
                // The rebuild's filler needs a guardian process: forked now, not frozen.
                ferry_engine::lazy::Filler::prepare();
                // Everything of the round is stored: say so.
                last_ack = Some(Instant::now());
                // The final copy is about the size of the last round, often smaller, and
                // what crosses in a few ms: 64 MiB at most. Round 0 (all of memory) must not
                // make this allocate a GiB of fresh memory before its RoundAck.
                let want = (2 * round_bytes + (16 << 20)).min(64 << 20);
                if want > reserved {
                    reserve(&pages, want);
                    reserved = want;
                }
                round_bytes = 0;
                ferry_sys::timeline::take();
                wire::write_frame(&mut conn, Kind::RoundAck, &[])
            }
            Kind::ImageMeta => {
                t_final.get_or_insert_with(Instant::now);
                meta.write_all(&buf).map_err(io("writing meta.fimg"))
            }
            Kind::ImagePages => {
                t_final.get_or_insert_with(Instant::now);
                pages.write_all(&buf).map_err(io("writing pages.fimg"))
            }
            Kind::Abort => {
                let why: serde_json::Value = wire::parse(kind, &buf).unwrap_or_default();
                return Err(MigrateError::Failed(format!(
                    "aborted by the source: {why}"
                )));
            }
            Kind::Commit => {
                commit = wire::parse(kind, &buf).map_err(|e| fail(&mut conn, e))?;
                t_commit = Instant::now();
                break;
            }
            k => Err(MigrateError::Protocol(format!("unexpected {k:?} frame"))),
        };
        // A full state directory, a bad frame: say so, and the source resumes.
        r.map_err(|e| fail(&mut conn, e))?;
    }
    drop((meta, pages));
    pause_point(s, "commit");
    if let Some(r) = reserving.take() {
        // Never used: its stub would hold the PID the restore needs.
        let_go(r);
    }
    ferry_sys::timeline::mark(|| "flushed".into());
    s.update(&id, |m| m.state = "restoring".into());
    let flush_ms = t_commit.elapsed().as_secs_f64() * 1e3;
    // Addresses that move with the process: ours before its sockets are rebuilt. Taken on a
    // thread while the restore checks the image (each takes the kernel ~0.2-0.5 ms).
    let addrs: Vec<String> = commit["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap_or("").to_string())
        .collect();
    let claims = Arc::new(Claims::default());
    if !addrs.is_empty() {
        let c = claims.clone();
        *claims.job.lock().unwrap() = Some(std::thread::spawn(move || {
            let t = Instant::now();
            for a in &addrs {
                let got = crate::netmove::claim(a)?;
                c.got.lock().unwrap().push(got);
            }
            Ok(t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    ferry_sys::timeline::mark(|| "claiming".into());
    let restored = (|| -> Result<ferry_engine::Restored> {
        let tp = Instant::now();
        // Stored pages count only where listed: a list we cannot read fails the migration.
        let recs: Vec<PrecopyRecord> = match &commit["precopy"] {
            serde_json::Value::Null => Vec::new(),
            v => serde_json::from_value(v.clone()).map_err(|e| {
                MigrateError::Protocol(format!("bad pre-copy ranges in Commit: {e}"))
            })?,
        };
        store.set_tracked(recs.into_iter().map(|r| (r.pid, r.tracked)).collect());
        prep_ms = tp.elapsed().as_secs_f64() * 1e3;
        // Post-copy: pages left in the source come over two connections of their own.
        let remote = if mode == "postcopy" || mode == "hybrid" {
            let end = Instant::now() + Duration::from_secs(10);
            let conn = |role: &str| loop {
                let key = (id.clone(), role.to_string());
                if let Some(x) = s.page_conns.lock().unwrap().remove(&key) {
                    return Ok(x);
                }
                if Instant::now() > end {
                    return Err(MigrateError::Protocol(format!(
                        "the source never opened its page connection ({role})"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let bulk = conn("pages")?;
            let urgent = conn("faults")?;
            Some(Arc::new(crate::postcopy::RemoteConn::new(bulk, urgent)?)
                as Arc<dyn ferry_engine::lazy::RemotePages>)
        } else {
            None
        };
        let c = claims.clone();
        ferry_sys::timeline::mark(|| "prepared".into());
        let opts = ferry_engine::RestoreOptions {
            detach: true,
            // Every frame's checksum was checked on arrival.
            data_checked: true,
            before_sockets: Some(ferry_engine::restore::Hook(Arc::new(move || {
                c.wait()
                    .map_err(|e| ferry_engine::EngineError::Failed(e.to_string()))
            }))),
            base: Some(Arc::new(crate::store::Shared::new(store))),
            // Everything but stop-and-copy runs before its memory is filled in.
            lazy: mode != "stop",
            remote,
            ..Default::default()
        };
        Ok(ferry_engine::restore_held_with(&img, &opts, warm.take())?)
    })();
    // Taken (or failed) whatever became of the restore: what was taken is given back on error.
    let claimed_ok = claims.wait();
    let claimed = std::mem::take(&mut *claims.got.lock().unwrap());
    let claim_ms = *claims.ms.lock().unwrap();
    let mut restored = restored.map_err(|e| fail(&mut conn, e))?;
    claimed_ok.map_err(|e| fail(&mut conn, e))?;
    ferry_sys::timeline::mark(|| "restored".into());
    let filler = restored.take_filler();
    let (pid, ms) = (restored.report.pid, restored.report.restore_ms);
    // A cancel that came during the rebuild still wins: the rebuilt tree is dropped (killed)
    // and the source resumes.
    let mut cancelled = false;
    s.update(&id, |m| {
        if m.state == "cancelled" {
            cancelled = true;
        } else {
            m.state = "ready".into();
            m.restored_pid = Some(pid);
        }
    });
    if cancelled {
        drop(restored);
        return Err(fail(
            &mut conn,
            MigrateError::Failed("cancelled on the destination".into()),
        ));
    }
    pause_point(s, "restored");
    wire::write_json(
        &mut conn,
        Kind::Ready,
        &serde_json::json!({
            "pid": pid,
            "restore": restored.report,
            "agent": {
                "flush_ms": flush_ms,
                "final_rx_ms": t_final.map(|t| (t_commit - t).as_secs_f64() * 1e3),
                "final_read_ms": final_read_ms,
                "ack_to_final_ms": last_ack.zip(t_final).map(|(a, f)| (f - a).as_secs_f64() * 1e3),
                "claim_ms": claim_ms,
                "prep_ms": prep_ms,
                "commit_to_ready_ms": t_commit.elapsed().as_secs_f64() * 1e3,
                "warm": warm_note,
                "timeline": ferry_sys::timeline::take(),
            },
        }),
    )?;
    // The source says Go (and kills its copy once we say Done). Without Go, ours is killed
    // (on drop).
    conn.set_read_timeout(Some(GO_WAIT))
        .map_err(io("socket timeout"))?;
    match wire::read_frame(&mut rd, &mut buf)? {
        Kind::Go => {}
        k => {
            return Err(MigrateError::Protocol(format!(
                "expected Go, got {k:?}: the rebuilt tree is dropped"
            )))
        }
    }
    // The filler fills ahead of need only after Done is sent (faults are answered at once).
    let fill_ahead = restored.defer_fill_ahead();
    let report = restored.resume()?;
    for c in claimed {
        c.keep();
    }
    s.update(&id, |m| {
        m.state = "running".into();
        m.restore_ms = Some(report.restore_ms.max(ms));
    });
    let _ = wire::write_json(&mut conn, Kind::Done, &serde_json::json!({ "pid": pid }));
    if let Some(f) = fill_ahead {
        f.store(true, Ordering::Relaxed);
    }
    pause_point(s, "running");
    if let Some(mut f) = filler {
        // Once nothing is left in the source, the source is told at once (it may go: hybrid's
        // window ends there); what the rounds brought fills on from here.
        let released = if mode == "precopy" {
            None
        } else {
            f.wait_released()
        };
        // Until the source confirms that its copy goes, it may resume that copy (it never
        // heard Filled): ours must then go, or the process would run on both hosts.
        let mut unconfirmed = |conn: &mut Conn, rep: &ferry_engine::lazy::FillReport| {
            pause_point(s, "released");
            let _ = wire::write_json(conn, Kind::Filled, rep);
            let r = confirm_release(conn, &mut rd, &mut buf);
            match &r {
                Ok(()) => {
                    pause_point(s, "kept");
                    let _ = wire::write_frame(conn, Kind::Kept, &[]);
                }
                Err(_) => ferry_engine::restore::kill_tree(pid),
            }
            r
        };
        if let Some(rep) = &released {
            if let Err(e) = unconfirmed(&mut conn, rep) {
                drop(f);
                return Err(fail(&mut conn, e));
            }
        }
        match f.wait() {
            Ok(rep) => {
                if released.is_none() {
                    if mode == "precopy" {
                        let _ = wire::write_json(&mut conn, Kind::Filled, &rep);
                    } else if let Err(e) = unconfirmed(&mut conn, &rep) {
                        return Err(fail(&mut conn, e));
                    }
                }
                s.update(&id, |m| m.fill_ms = Some(rep.fill_ms));
            }
            Err(e) => {
                // The filler killed the tree: nothing of it runs here. Told before its
                // release, the source resumes its copy; after, the process is lost.
                let e = MigrateError::Failed(format!("filling the memory of the tree: {e}"));
                if released.is_some() {
                    eprintln!("ferry agent: migration {id}: {e}; the source was released already");
                    s.update(&id, |m| {
                        m.state = "failed".into();
                        m.error = Some(e.to_string());
                    });
                    return Err(e);
                }
                return Err(fail(&mut conn, e));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Done: a stopping agent need not wait for the tree to end.
    busy.take();
    // Reap the root when it ends, so that it leaves no zombie behind.
    let mut st = 0;
    // SAFETY: waitpid writes only `st`; the root is our child (its stub was forked here).
    unsafe {
        libc::waitpid(pid, &mut st, 0);
    }
    s.update(&id, |m| m.state = "exited".into());
    Ok(())
}

/// Waits for the source's Released after Filled. Anything else (silence for the page
/// fetch's own limit, a closed connection, another frame) means the source may have resumed
/// its copy: the caller kills ours. The source waits longer than this before it resumes.
fn confirm_release(
    conn: &mut Conn,
    rd: &mut std::io::BufReader<crate::tls::ConnReader>,
    buf: &mut wire::FrameBuf,
) -> Result<()> {
    conn.set_read_timeout(Some(crate::postcopy::FETCH_TIMEOUT))
        .map_err(io("socket timeout"))?;
    match wire::read_frame(rd, buf) {
        Ok(Kind::Released) => Ok(()),
        Ok(k) => Err(MigrateError::Protocol(format!(
            "expected Released, got {k:?}: the copy here was killed, the source resumes its own"
        ))),
        Err(e) => Err(MigrateError::Failed(format!(
            "the source did not confirm that its copy goes ({e}): the copy here was killed, \
             the source resumes its own"
        ))),
    }
}

/// How long a rebuilt tree is held for the source's Go before it is dropped.
pub(crate) const GO_WAIT: Duration = Duration::from_secs(30);

/// A hook for fault-injection tests: with `FERRY_AGENT_PAUSE_AT=POINT` in the agent's
/// environment, a migration that reaches POINT (`final`: the first frame of the final image,
/// the source frozen; `commit`: the whole image in, nothing rebuilt yet; `restored`: the tree
/// rebuilt and held, Ready not sent; `running`: Done sent, the process runs, post-copy's
/// Filled not sent; `released`: nothing is left to fetch from the source, Filled not sent;
/// `kept`: Released read, Kept not sent) creates `paused-POINT` in the state directory and waits
/// until that file is removed (60 s at most). A test then injects a real fault (kill -9,
/// link down) at a known point of the protocol.
fn pause_point(s: &Shared, point: &str) {
    if std::env::var("FERRY_AGENT_PAUSE_AT").ok().as_deref() != Some(point) {
        return;
    }
    let f = s.cfg.state_dir.join(format!("paused-{point}"));
    if std::fs::write(&f, b"").is_err() {
        return;
    }
    let end = Instant::now() + Duration::from_secs(60);
    while f.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&f);
}

/// Allocates `bytes` of `f` ahead of its writes, its size unchanged. Best effort: without it
/// the writes allocate as they go, and fail themselves on a full disk.
fn reserve(f: &std::fs::File, bytes: u64) {
    let _ = ferry_sys::files::preallocate(f, bytes);
}

/// Addresses being taken for a migrating tree, on a thread of their own.
#[derive(Default)]
struct Claims {
    job: Mutex<Option<std::thread::JoinHandle<Result<f64>>>>,
    got: Mutex<Vec<crate::netmove::Claimed>>,
    ms: Mutex<f64>,
}

impl Claims {
    /// Waits until every address is taken (at once if there are none, or on later calls).
    fn wait(&self) -> Result<()> {
        let Some(h) = self.job.lock().unwrap().take() else {
            return Ok(());
        };
        let ms = h.join().map_err(|_| {
            MigrateError::Failed("the thread taking the moved addresses panicked".into())
        })??;
        *self.ms.lock().unwrap() = ms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Every route the agent serves, with its methods, is in docs/openapi.yaml, and the file
    /// describes nothing the agent does not serve. Both lists are read from their sources:
    /// the router's `.route(...)` lines here, the `paths:` section there.
    #[test]
    fn the_openapi_file_lists_exactly_the_routes_served() {
        use std::collections::BTreeSet;
        const METHODS: [&str; 4] = ["get", "post", "delete", "put"];
        let mut served = BTreeSet::new();
        for line in include_str!("agent.rs").lines() {
            let Some(rest) = line.trim().strip_prefix(".route(\"") else {
                continue;
            };
            let (path, handlers) = rest.split_once('"').unwrap();
            for m in METHODS {
                // `get(h)`, `.post(h)`, `axum::routing::post(h)`.
                if handlers.contains(&format!("{m}(")) {
                    served.insert((path.to_string(), m.to_string()));
                }
            }
        }
        assert!(
            served.len() >= 5,
            "routes not found in agent.rs: {served:?}"
        );
        let mut documented = BTreeSet::new();
        let yaml = include_str!("../../../docs/openapi.yaml");
        let mut in_paths = false;
        let mut path = String::new();
        for line in yaml.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = format!("/{}", p.trim_end_matches(':'));
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
                if METHODS.contains(&m) {
                    documented.insert((path.clone(), m.to_string()));
                }
            }
        }
        assert_eq!(
            served, documented,
            "agent.rs routes vs docs/openapi.yaml paths"
        );
    }
}
