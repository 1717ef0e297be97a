//! An address space to scan: code regions with their bytes, the modules they belong to, and a
//! way to read any other memory (GOT slots, data). Built from a running process or laid out
//! from ELF files on disk; the scanner does not know which.

use crate::elfinfo::ElfInfo;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Module {
    /// Short name for reports (file name, `[anon]`, `[vdso]`).
    pub name: String,
    pub path: Option<String>,
    /// Load bias: runtime address minus ELF virtual address.
    pub bias: u64,
    pub elf: Option<Arc<ElfInfo>>,
    /// Anonymous executable memory (JIT code): scanned whole.
    pub anon: bool,
    /// Kernel-provided code (vDSO): replaced by the destination's own on restore.
    pub kernel: bool,
}

#[derive(Debug, Clone)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub module: usize,
    pub bytes: Vec<u8>,
}

/// Reads memory of the scanned space. Returns the number of bytes read (short at holes).
pub trait Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize;
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        (self.read(addr, &mut b) == 8).then(|| u64::from_le_bytes(b))
    }
}

pub struct Space {
    pub modules: Vec<Module>,
    /// Executable regions, sorted by start.
    pub regions: Vec<Region>,
    pub mem: Box<dyn Memory>,
}

impl Space {
    pub fn new(modules: Vec<Module>, mut regions: Vec<Region>, mem: Box<dyn Memory>) -> Space {
        regions.sort_by_key(|r| r.start);
        Space {
            modules,
            regions,
            mem,
        }
    }

    pub fn region_of(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.start <= addr);
        if i == 0 {
            return None;
        }
        (addr < self.regions[i - 1].end).then_some(i - 1)
    }

    pub fn code_bounds(&self) -> (u64, u64) {
        match (self.regions.first(), self.regions.last()) {
            (Some(a), Some(b)) => (a.start, b.end),
            _ => (0, 0),
        }
    }

    /// The module holding a code address.
    pub fn module_of(&self, addr: u64) -> Option<&Module> {
        self.region_of(addr)
            .map(|i| &self.modules[self.regions[i].module])
    }
}
