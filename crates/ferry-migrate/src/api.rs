//! Types of the agent's HTTP/JSON API (docs/api.md).

use serde::{Deserialize, Serialize};

/// `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub version: String,
    /// The page stream's protocol (`wire::PROTOCOL`); 0 from agents older than the field.
    #[serde(default)]
    pub protocol: u32,
    pub hostname: String,
    /// Port of the page stream, on the same address as the API.
    pub data_port: u16,
    /// The host's CPU profile (`ferry cpu profile` format).
    pub profile: ferry_cpu::profile::CpuProfile,
}

/// `POST /v1/migrations`: a source announces an incoming migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewMigration {
    pub pid: i32,
    pub mode: String,
    #[serde(default)]
    pub source: String,
}

/// A migration as the agent sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub id: String,
    /// waiting, receiving, restoring, ready, running, exited, failed, cancelled.
    pub state: String,
    /// The process's PID on the source.
    pub pid: i32,
    pub mode: String,
    pub source: String,
    /// The root PID here, once rebuilt.
    pub restored_pid: Option<i32>,
    pub rounds: u32,
    pub bytes_received: u64,
    pub restore_ms: Option<f64>,
    /// Lazily filled modes: from the process running here until its memory was whole, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_ms: Option<f64>,
    pub error: Option<String>,
    pub created_unix: u64,
    /// For a migration prepared ahead (`POST /v1/prepare`): what was checked and reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<Prepared>,
}

/// `POST /v1/prepare`: a source announces a migration it expects to start soon. The agent
/// checks the process's CPU needs against its own CPU, and reserves room for its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepare {
    pub pid: i32,
    pub mode: String,
    #[serde(default)]
    pub source: String,
    /// Resident memory of the tree, bytes: the room to reserve.
    pub memory_bytes: u64,
    /// The process's code scan (`ferry cpu scan`), checked here against this host.
    pub scan: ferry_cpu::scan::ScanResult,
    pub xstate_in_use: u64,
    /// The source host's profile (a process compatible with a subset of ours is compatible).
    pub source_profile: Option<ferry_cpu::profile::CpuProfile>,
    /// Accept an incompatible or unknown verdict.
    #[serde(default)]
    pub force: bool,
    /// The UTS, IPC and mount namespaces the process made for itself (none of its own
    /// mounts): the agent makes them ahead, around the stub that reserves its memory.
    #[serde(default)]
    pub namespaces: Option<ferry_engine::namespaces::Namespaces>,
}

/// What a prepared migration holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Prepared {
    /// The agent's own verdict on the process's CPU needs.
    pub verdict: String,
    /// Disk reserved in the state directory (allocated to the migration's page store).
    pub reserved_bytes: u64,
    /// MemAvailable when prepared.
    pub mem_available: u64,
    /// The reservation is released when no stream arrives by then.
    pub expires_unix: u64,
    /// Memory made resident ahead for the process (pre-copy only): `reserving`, `resident`,
    /// `failed: why`, or `none: why`. The warm process is built from it.
    #[serde(default)]
    pub memory: String,
    /// Bytes of it resident.
    #[serde(default)]
    pub memory_bytes: u64,
    /// How long making it resident took.
    #[serde(default)]
    pub memory_ms: f64,
}

/// Reply to `POST /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub id: String,
    pub data_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<Prepared>,
}

/// The first frame on the page stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub id: String,
    pub token: String,
    /// "pages": the second connection of a post-copy migration, on which the agent asks for
    /// the pages left in the frozen source process. Absent: the main stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The main stream's mode ("precopy", "postcopy", "hybrid", "stop"): it overrides the one
    /// given when the migration was prepared, which may differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// In the Commit frame: memory of process `pid` the agent holds from pre-copy rounds and that
/// is still valid at the freeze.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrecopyRecord {
    pub pid: i32,
    pub tracked: Vec<(u64, u64)>,
}
