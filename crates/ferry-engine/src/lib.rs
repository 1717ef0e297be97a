//! Ferry's checkpoint/restore engine.
//!
//! Dump: freeze with ptrace, read state from /proc, regsets, process_vm_readv and syscalls
//! injected into the stopped target, stream it into an image. Restore: fork an empty stub
//! with the saved PID, and rebuild the process into it from outside with injected syscalls and
//! ptrace, then let it run.
//!
//! Each kind of state is one module with its dump and restore halves side by side.

pub mod attrs;
pub mod ctx;
pub mod evfds;
pub mod files;
pub mod ghost;
pub mod hexcodec;
pub mod lazy;
pub mod memory;
pub mod mm;
pub mod namespaces;
pub mod netblock;
pub mod precopy;
pub mod progress;
pub mod regs;
pub mod schema;
pub mod signals;
pub mod sockets;
pub mod timing;
pub mod warm;

pub mod dump;
pub mod restore;

pub use dump::{dump, dump_into, DumpOptions, DumpReport, DumpStats, Held, SmapsHint};
pub use progress::{Phase, Progress};
pub use restore::{
    restore, restore_held, restore_held_with, BasePages, RestoreOptions, RestoreReport, Restored,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Sys(#[from] ferry_sys::Error),
    #[error(transparent)]
    Image(#[from] ferry_image::ImageError),
    #[error("process {pid}: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
