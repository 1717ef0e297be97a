//! Linux primitives for Ferry. Everything that touches another process lives here:
//! `/proc` parsing, ptrace freezing, register and xsave regsets, injected syscalls and
//! reading another process's memory. Higher crates never call ptrace or libc directly.

pub mod cancel;
pub mod error;
pub mod files;
pub mod freeze;
pub mod guard;
pub mod mem;
pub mod mount;
pub mod net;
pub mod nft;
pub mod procfs;
pub mod sched;
pub mod sighand;
pub mod spawn;
pub mod taskstate;
pub mod timeline;
pub mod uffd;
pub mod vmaflags;

pub use error::{Error, Result};
pub use freeze::{Frozen, FrozenThread, Regs};
pub use mem::read_mem;
pub use procfs::{MapKind, Mapping};
