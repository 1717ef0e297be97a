//! Scanning a program file without running it: the executable and its shared libraries are
//! laid out as the dynamic linker would, relocations are applied to an in-memory image, and
//! the same scanner walks it from the entry point, init/fini arrays and exports.
//!
//! ifunc symbols resolve when the program starts, for the CPU that runs it, so their
//! resolvers and variants are not counted against the target.

use crate::elfinfo::{
    ElfInfo, R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_IRELATIVE, R_X86_64_JUMP_SLOT,
    R_X86_64_RELATIVE,
};
use crate::process::ScanError;
use crate::scan::{Mode, RootKind, ScanResult, Scanner};
use crate::space::{Memory, Module, Region, Space};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryScan {
    pub binary: String,
    pub mode: Mode,
    pub modules: Vec<String>,
    pub missing_libraries: Vec<String>,
    pub scan_ms: f64,
    #[serde(flatten)]
    pub result: ScanResult,
}

struct Loaded {
    path: PathBuf,
    elf: Arc<ElfInfo>,
    data: Vec<u8>,
    bias: u64,
}

/// Memory image: each module's loaded segments with relocations applied.
struct Image {
    segs: Vec<(u64, Vec<u8>)>,
}

impl Memory for Image {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
        let i = self.segs.partition_point(|(s, _)| *s <= addr);
        if i == 0 {
            return 0;
        }
        let (s, b) = &self.segs[i - 1];
        let off = (addr - s) as usize;
        if off >= b.len() {
            return 0;
        }
        let n = buf.len().min(b.len() - off);
        buf[..n].copy_from_slice(&b[off..off + n]);
        n
    }
}

const SEARCH_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

fn find_lib(name: &str, runpath: &[String], origin: &Path) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let ld_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let dirs = runpath
        .iter()
        .map(|d| d.replace("$ORIGIN", &origin.display().to_string()))
        .chain(
            ld_path
                .split(':')
                .filter(|s| !s.is_empty())
                .map(String::from),
        )
        .chain(SEARCH_DIRS.iter().map(|s| s.to_string()));
    dirs.map(|d| Path::new(&d).join(name)).find(|p| p.is_file())
}

pub fn scan_binary(path: &Path, mode: Mode) -> Result<BinaryScan, ScanError> {
    let t0 = Instant::now();
    let data = std::fs::read(path).map_err(|e| ScanError::Elf {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let elf = ElfInfo::parse(&data).map_err(|msg| ScanError::Elf {
        path: path.display().to_string(),
        msg,
    })?;
    if elf.segments.is_empty() {
        return Err(ScanError::Elf {
            path: path.display().to_string(),
            msg: "has no loadable segments".into(),
        });
    }
    let exe_bias = if elf.pie_or_shared {
        0x5555_5555_4000
    } else {
        0
    };
    let mut loaded = vec![Loaded {
        path: path.to_path_buf(),
        elf: Arc::new(elf),
        data,
        bias: exe_bias,
    }];
    // Breadth-first over DT_NEEDED, as ld.so does.
    let mut missing = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut next_base = 0x7f00_0000_0000u64;
    let mut i = 0;
    while i < loaded.len() {
        let needed = loaded[i].elf.needed.clone();
        let runpath = loaded[i].elf.runpath.clone();
        let origin = loaded[i]
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for n in needed {
            if !seen.insert(n.clone()) {
                continue;
            }
            let Some(p) = find_lib(&n, &runpath, &origin) else {
                missing.push(n);
                continue;
            };
            let Ok(d) = std::fs::read(&p) else {
                missing.push(n);
                continue;
            };
            let Ok(e) = ElfInfo::parse(&d) else {
                missing.push(n);
                continue;
            };
            let span = e
                .segments
                .iter()
                .map(|s| s.vaddr + s.memsz)
                .max()
                .unwrap_or(0);
            loaded.push(Loaded {
                path: p,
                elf: Arc::new(e),
                data: d,
                bias: next_base,
            });
            next_base += (span + 0x20_0000) & !0xf_ffff;
        }
        i += 1;
    }
    // Lay out segments and apply relocations.
    let mut segs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut regions = Vec::new();
    let mut modules = Vec::new();
    for (mi, l) in loaded.iter().enumerate() {
        for s in &l.elf.segments {
            let mut b = vec![0u8; s.memsz as usize];
            let end = (s.offset + s.filesz).min(l.data.len() as u64) as usize;
            let start = (s.offset as usize).min(end);
            b[..end - start].copy_from_slice(&l.data[start..end]);
            if s.exec {
                regions.push(Region {
                    start: l.bias + s.vaddr,
                    end: l.bias + s.vaddr + s.memsz,
                    module: mi,
                    bytes: b.clone(),
                });
            }
            segs.push((l.bias + s.vaddr, b));
        }
        modules.push(Module {
            name: l
                .path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: Some(l.path.display().to_string()),
            bias: l.bias,
            elf: Some(l.elf.clone()),
            anon: false,
            kernel: false,
        });
    }
    segs.sort_by_key(|s| s.0);
    let mut image = Image { segs };
    let mut ifuncs = 0;
    for l in &loaded {
        for r in &l.elf.relocs {
            let value = match r.rtype {
                R_X86_64_RELATIVE => Some(l.bias.wrapping_add(r.addend as u64)),
                R_X86_64_IRELATIVE => {
                    ifuncs += 1;
                    None
                }
                R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT | R_X86_64_64 => {
                    let name = l
                        .elf
                        .dynsyms
                        .get(r.sym)
                        .map(|s| s.name.as_str())
                        .unwrap_or("");
                    lookup(&loaded, name).and_then(|(b, s)| {
                        if s.ifunc {
                            ifuncs += 1;
                            None
                        } else {
                            Some(b.wrapping_add(s.value).wrapping_add(r.addend as u64))
                        }
                    })
                }
                _ => None,
            };
            if let Some(v) = value {
                write_u64(&mut image, l.bias + r.offset, v);
            }
        }
    }
    let space = Space::new(modules, regions, Box::new(image));
    let mut sc = Scanner::new(&space);
    if ifuncs > 0 {
        sc.note(format!(
            "{ifuncs} ifunc binding(s) resolve at program start for the CPU that runs it: not counted"
        ));
    }
    match mode {
        Mode::Full => sc.run_full(),
        Mode::Paths => {
            let exe = &loaded[0];
            sc.root(exe.bias + exe.elf.entry, RootKind::ElfEntry, true);
            for (_, a) in &exe.elf.exports {
                sc.root(exe.bias + a, RootKind::Export, true);
            }
            for l in &loaded {
                for &(va, size) in &l.elf.init_arrays {
                    for k in 0..size / 8 {
                        if let Some(p) = space.mem.read_u64(l.bias + va + k * 8) {
                            sc.root(p, RootKind::InitFini, true);
                        }
                    }
                }
                for &f in &l.elf.init_funcs {
                    sc.root(l.bias + f, RootKind::InitFini, true);
                }
                for s in l.elf.segments.iter().filter(|s| !s.exec) {
                    let mut b = vec![0u8; s.memsz as usize];
                    let n = space.mem.read(l.bias + s.vaddr, &mut b);
                    sc.scan_words(l.bias + s.vaddr, &b[..n], RootKind::DataPointer);
                }
            }
            sc.run_paths();
        }
    }
    let result = sc.finish();
    Ok(BinaryScan {
        binary: path.display().to_string(),
        mode,
        modules: loaded
            .iter()
            .map(|l| l.path.display().to_string())
            .collect(),
        missing_libraries: missing,
        scan_ms: t0.elapsed().as_secs_f64() * 1e3,
        result,
    })
}

fn lookup<'a>(loaded: &'a [Loaded], name: &str) -> Option<(u64, &'a crate::elfinfo::DynSym)> {
    if name.is_empty() {
        return None;
    }
    loaded.iter().find_map(|l| {
        l.elf
            .dynsym_by_name
            .get(name)
            .map(|&i| (l.bias, &l.elf.dynsyms[i]))
            .filter(|(_, s)| s.defined)
    })
}

fn write_u64(img: &mut Image, addr: u64, v: u64) {
    let i = img.segs.partition_point(|(s, _)| *s <= addr);
    if i == 0 {
        return;
    }
    let (s, b) = &mut img.segs[i - 1];
    let off = (addr - *s) as usize;
    if off + 8 <= b.len() {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}
