//! Scanning a running process: freeze it just long enough to read registers, xsave headers,
//! stacks and signal handlers, then build the address space from its mappings and walk it.

use crate::elfinfo::{ElfInfo, R_X86_64_IRELATIVE, R_X86_64_JUMP_SLOT};
use crate::features::xstate_component_names;
use crate::scan::{Mode, RootKind, ScanResult, Scanner};
use crate::space::{Memory, Module, Region, Space};
use ferry_sys::freeze::{xstate_bv, Frozen};
use ferry_sys::mem::read_mem_lossy;
use ferry_sys::procfs::{self, MapKind, Mapping};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Sys(#[from] ferry_sys::Error),
    #[error("{path}: {msg}")]
    Elf { path: String, msg: String },
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    pub ip: String,
    /// XSTATE_BV: state components holding non-initial values in this thread.
    pub xstate_bv: String,
    pub xstate_in_use: Vec<String>,
    #[serde(skip)]
    pub xstate_bv_raw: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalHandler {
    pub signal: i32,
    pub handler: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessScan {
    pub pid: i32,
    pub exe: String,
    pub mode: Mode,
    pub threads: Vec<ThreadState>,
    pub signal_handlers: Vec<SignalHandler>,
    /// XSTATE_BV of all threads together.
    pub xstate_in_use: u64,
    pub modules: Vec<String>,
    pub frozen_ms: f64,
    pub scan_ms: f64,
    #[serde(flatten)]
    pub result: ScanResult,
}

struct ProcessMem {
    pid: i32,
}

impl Memory for ProcessMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
        ferry_sys::mem::read_mem(self.pid, addr, buf).unwrap_or(0)
    }
}

struct Captured {
    maps: Vec<Mapping>,
    threads: Vec<ThreadState>,
    regs: Vec<ferry_sys::Regs>,
    stacks: Vec<(u64, Vec<u8>)>,
    handlers: Vec<(i32, u64, u64)>,
}

/// Everything that needs the process stopped. The process resumes when this returns, error
/// or not (Frozen's Drop detaches).
fn capture(pid: i32) -> Result<Captured, ScanError> {
    let status = procfs::check_inspectable(pid)?;
    let mut frozen = Frozen::freeze(pid)?;
    let maps = procfs::read_maps(pid)?;
    let mut threads = Vec::new();
    let mut regs = Vec::new();
    let mut stacks = Vec::new();
    for t in frozen.threads().to_vec() {
        let bv = frozen
            .xstate(t.tid)
            .ok()
            .and_then(|x| xstate_bv(&x))
            .unwrap_or(0);
        threads.push(ThreadState {
            tid: t.tid,
            ip: format!("{:#x}", t.regs.rip),
            xstate_bv: format!("{bv:#x}"),
            xstate_in_use: xstate_component_names(bv),
            xstate_bv_raw: bv,
        });
        // The live part of the stack: from below the red zone to the mapping's end.
        let sp = t.regs.rsp;
        if let Some(m) = maps.iter().find(|m| m.contains(sp) && m.read) {
            let lo = sp.saturating_sub(128).max(m.start);
            let hi = m.end.min(lo + (64 << 20));
            let mut buf = vec![0u8; (hi - lo) as usize];
            read_mem_lossy(pid, lo, &mut buf)?;
            stacks.push((lo, buf));
        }
        regs.push(t.regs);
    }
    let mut handlers = Vec::new();
    for sig in 1..=64 {
        if status.sig_caught & (1u64 << (sig - 1)) == 0 {
            continue;
        }
        let act = frozen.sigaction(sig)?;
        if act.handler > 1 {
            handlers.push((sig, act.handler, act.restorer));
        }
    }
    frozen.resume();
    Ok(Captured {
        maps,
        threads,
        regs,
        stacks,
        handlers,
    })
}

/// Build the address space of a process from its mappings.
fn build_space(pid: i32, maps: &[Mapping]) -> Result<Space, ScanError> {
    let mut modules: Vec<Module> = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    let mut elf_cache: HashMap<String, Option<Arc<ElfInfo>>> = HashMap::new();
    let mut regions = Vec::new();
    for m in maps.iter().filter(|m| m.exec) {
        let module = match &m.kind {
            MapKind::Vdso | MapKind::Vsyscall => {
                modules.push(Module {
                    name: m.name(),
                    path: None,
                    bias: 0,
                    elf: None,
                    anon: false,
                    kernel: true,
                });
                modules.len() - 1
            }
            MapKind::File { path, .. } => {
                let key = path.display().to_string();
                if let Some(&i) = by_path.get(&key) {
                    i
                } else {
                    let elf = elf_cache
                        .entry(key.clone())
                        .or_insert_with(|| {
                            let src = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                            let data = std::fs::read(&src).or_else(|_| std::fs::read(path)).ok()?;
                            ElfInfo::parse(&data).ok().map(Arc::new)
                        })
                        .clone();
                    let bias = elf.as_ref().map(|e| bias_of(e, m)).unwrap_or(0);
                    let anon = elf.is_none();
                    modules.push(Module {
                        name: m.name(),
                        path: Some(key.clone()),
                        bias,
                        elf,
                        anon,
                        kernel: false,
                    });
                    by_path.insert(key, modules.len() - 1);
                    modules.len() - 1
                }
            }
            _ => {
                modules.push(Module {
                    name: m.name(),
                    path: None,
                    bias: 0,
                    elf: None,
                    anon: true,
                    kernel: false,
                });
                modules.len() - 1
            }
        };
        if modules[module].kernel && m.kind == MapKind::Vsyscall {
            continue;
        }
        let mut bytes = vec![0u8; m.len() as usize];
        read_mem_lossy(pid, m.start, &mut bytes)?;
        regions.push(Region {
            start: m.start,
            end: m.end,
            module,
            bytes,
        });
    }
    Ok(Space::new(modules, regions, Box::new(ProcessMem { pid })))
}

/// Load bias from one mapping of the file: runtime address minus the ELF virtual address of
/// the same file offset.
fn bias_of(elf: &ElfInfo, m: &Mapping) -> u64 {
    for s in &elf.segments {
        if m.offset >= (s.offset & !0xfff) && m.offset < s.offset + s.filesz.max(1) {
            // The mapping may start before the segment (its page) or inside it (a segment
            // split by mprotect, such as RELRO).
            let vaddr = s.vaddr.wrapping_add(m.offset).wrapping_sub(s.offset);
            return m.start.wrapping_sub(vaddr);
        }
    }
    m.start.wrapping_sub(elf.base_vaddr())
}

pub fn scan_process(pid: i32, mode: Mode) -> Result<ProcessScan, ScanError> {
    let t0 = Instant::now();
    let cap = capture(pid)?;
    let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
    let exe = procfs::read_exe(pid)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let space = build_space(pid, &cap.maps)?;
    let mut sc = Scanner::new(&space);
    match mode {
        Mode::Full => sc.run_full(),
        Mode::Paths => {
            add_process_roots(pid, &cap, &space, &mut sc)?;
            sc.run_paths();
        }
    }
    let result = sc.finish();
    let xstate_in_use = cap.threads.iter().fold(0, |a, t| a | t.xstate_bv_raw);
    let mut modules: Vec<String> = space
        .modules
        .iter()
        .map(|m| m.path.clone().unwrap_or_else(|| m.name.clone()))
        .collect();
    modules.dedup();
    Ok(ProcessScan {
        pid,
        exe,
        mode,
        signal_handlers: cap
            .handlers
            .iter()
            .map(|&(s, h, _)| SignalHandler {
                signal: s,
                handler: format!("{h:#x}"),
            })
            .collect(),
        threads: cap.threads,
        xstate_in_use,
        modules,
        frozen_ms,
        scan_ms: t0.elapsed().as_secs_f64() * 1e3,
        result,
    })
}

fn add_process_roots(
    pid: i32,
    cap: &Captured,
    space: &Space,
    sc: &mut Scanner,
) -> Result<(), ScanError> {
    for r in &cap.regs {
        sc.root(r.rip, RootKind::ThreadIp, true);
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15,
        ] {
            sc.root(v, RootKind::Register, false);
        }
    }
    for (addr, bytes) in &cap.stacks {
        sc.scan_words(*addr, bytes, RootKind::StackWord);
    }
    for &(_, h, restorer) in &cap.handlers {
        sc.root(h, RootKind::SignalHandler, true);
        sc.root(restorer, RootKind::SignalHandler, true);
    }
    if let Ok(auxv) = procfs::read_auxv(pid) {
        for (t, v) in auxv {
            if t == libc::AT_ENTRY {
                sc.root(v, RootKind::ElfEntry, true);
            }
        }
    }
    let mut lazy = 0;
    for (mi, m) in space.modules.iter().enumerate() {
        let Some(elf) = &m.elf else { continue };
        for &(va, size) in &elf.init_arrays {
            for i in 0..size / 8 {
                if let Some(p) = space.mem.read_u64(m.bias + va + i * 8) {
                    sc.root(p, RootKind::InitFini, true);
                }
            }
        }
        for &f in &elf.init_funcs {
            sc.root(m.bias + f, RootKind::InitFini, true);
        }
        // Lazily bound PLT slots still point into the PLT: after migration they resolve with
        // the source's cached CPU view, so find what they will resolve to.
        for r in elf
            .relocs
            .iter()
            .filter(|r| r.plt && r.rtype == R_X86_64_JUMP_SLOT)
        {
            let Some(v) = space.mem.read_u64(m.bias + r.offset) else {
                continue;
            };
            if !elf.in_plt(v.wrapping_sub(m.bias)) {
                continue;
            }
            lazy += 1;
            let name = elf
                .dynsyms
                .get(r.sym)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            resolve_lazy(space, mi, &name, sc);
        }
    }
    if lazy > 0 {
        sc.note(format!(
            "{lazy} PLT slots are not bound yet (lazy binding): they resolve after migration with the source's cached CPU view; their targets are included"
        ));
    }
    // Code pointers in data: every readable, non-executable mapping. Copying the data out
    // of the process is most of the gate's time, so it runs on a thread per CPU; the roots
    // are added in address order, as one thread would.
    let mut pieces = Vec::new();
    for m in cap.maps.iter().filter(|m| m.read && !m.exec) {
        if matches!(
            m.kind,
            MapKind::Vvar | MapKind::VvarVclock | MapKind::Vsyscall
        ) {
            continue;
        }
        // Only pages that hold data: the others read as zero and hold no pointer.
        let runs = ferry_sys::uffd::present_runs(pid, m.start, m.end)
            .unwrap_or_else(|_| vec![(m.start, m.end)]);
        for (s, e) in runs {
            let mut a = s;
            while a < e {
                let b = e.min(a + DATA_PIECE);
                pieces.push((a, b));
                a = b;
            }
        }
    }
    let words = sc.code_words();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut found: Vec<(usize, Vec<u64>, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<(usize, Vec<u64>, u64)>, ScanError> {
                    let mut buf = vec![0u8; DATA_PIECE as usize];
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(a, b)) = pieces.get(i) else {
                            return Ok(out);
                        };
                        let n = (b - a) as usize;
                        read_mem_lossy(pid, a, &mut buf[..n])?;
                        let mut hits = Vec::new();
                        words.find(a, &buf[..n], &mut hits);
                        out.push((i, hits, n as u64));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("a data scanning thread panicked")?);
        }
        Ok::<_, ScanError>(all)
    })?;
    found.sort_unstable_by_key(|f| f.0);
    for (_, hits, bytes) in found {
        sc.data_roots(&hits, bytes, RootKind::DataPointer);
    }
    Ok(())
}

/// Data is read and scanned in pieces of at most this many bytes.
const DATA_PIECE: u64 = 1 << 20;

/// Find the definition of a lazily bound symbol, in load order, and root what the source
/// would bind it to.
fn resolve_lazy(space: &Space, from: usize, name: &str, sc: &mut Scanner) {
    let order = std::iter::once(from).chain((0..space.modules.len()).filter(|&i| i != from));
    for mi in order {
        let m = &space.modules[mi];
        let Some(elf) = &m.elf else { continue };
        let Some(&si) = elf.dynsym_by_name.get(name) else {
            continue;
        };
        let s = &elf.dynsyms[si];
        if !s.defined || !s.func {
            continue;
        }
        if s.ifunc {
            // The resolver will pick with the source's cached CPU features. If the source
            // already resolved the same ifunc elsewhere (an IRELATIVE slot with this resolver),
            // that is the variant it will pick again.
            let chosen = elf
                .relocs
                .iter()
                .filter(|r| r.rtype == R_X86_64_IRELATIVE && r.addend as u64 == s.value)
                .find_map(|r| space.mem.read_u64(m.bias + r.offset));
            match chosen {
                Some(v) => {
                    sc.note(format!(
                        "lazy PLT slot {name}: ifunc that the source resolved to {v:#x}; that variant is included"
                    ));
                    sc.root(v, RootKind::LazyPlt, true);
                }
                None => {
                    sc.note(format!(
                        "lazy PLT slot {name}: ifunc not yet resolved in the source; every variant its resolver can return is included"
                    ));
                    sc.root(m.bias + s.value, RootKind::LazyPlt, true);
                }
            }
        } else {
            sc.root(m.bias + s.value, RootKind::LazyPlt, true);
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elfinfo::Segment;

    #[test]
    fn bias_from_a_mapping_before_or_inside_its_segment() {
        let elf = ElfInfo {
            segments: vec![Segment {
                vaddr: 0x3d10,
                memsz: 0x3000,
                offset: 0x2d10,
                filesz: 0x3000,
                exec: false,
                write: true,
            }],
            ..Default::default()
        };
        let at = |start, offset| Mapping {
            start,
            end: start + 0x1000,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset,
            inode: 1,
            kind: MapKind::Anonymous,
        };
        // Loaded at bias 0x7f0000000000: the segment's page, and its second page split off.
        assert_eq!(bias_of(&elf, &at(0x7f0000003000, 0x2000)), 0x7f0000000000);
        assert_eq!(bias_of(&elf, &at(0x7f0000004000, 0x3000)), 0x7f0000000000);
    }
}
