//! CPU profiles, instruction-level scans of a workload's code, and compatibility verdicts.

pub mod binary;
pub mod check;
pub mod elfinfo;
pub mod features;
#[cfg(target_arch = "x86_64")]
pub mod hostcpu;
pub mod process;
pub mod profile;

pub use profile::CpuProfile;
pub mod scan;
pub mod space;
