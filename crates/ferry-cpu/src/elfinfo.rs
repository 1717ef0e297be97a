//! What the scanner needs from an ELF file: loadable segments, function bounds (.eh_frame FDEs
//! and symbols), init/fini arrays, dynamic symbols and relocations, and the PLT.

use gimli::UnwindSection;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use std::collections::HashMap;

pub const R_X86_64_64: u32 = 1;
pub const R_X86_64_GLOB_DAT: u32 = 6;
pub const R_X86_64_JUMP_SLOT: u32 = 7;
pub const R_X86_64_RELATIVE: u32 = 8;
pub const R_X86_64_IRELATIVE: u32 = 37;

#[derive(Debug, Clone)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
    pub write: bool,
}

#[derive(Debug, Clone)]
pub struct DynSym {
    pub name: String,
    pub value: u64,
    pub size: u64,
    pub ifunc: bool,
    pub func: bool,
    pub defined: bool,
}

#[derive(Debug, Clone)]
pub struct Reloc {
    pub offset: u64,
    pub rtype: u32,
    /// Index into `dynsyms` (0: none).
    pub sym: usize,
    pub addend: i64,
    /// True for `.rela.plt` entries (the PLT stub's `push N` indexes these).
    pub plt: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ElfInfo {
    pub pie_or_shared: bool,
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// Function ranges (start, end), sorted, not overlapping: FDEs first, then symbols for
    /// code no FDE covers.
    pub functions: Vec<(u64, u64)>,
    /// Exported function names (for `--binary` roots).
    pub exports: Vec<(String, u64)>,
    pub init_arrays: Vec<(u64, u64)>,
    pub init_funcs: Vec<u64>,
    pub dynsyms: Vec<DynSym>,
    pub dynsym_by_name: HashMap<String, usize>,
    pub relocs: Vec<Reloc>,
    /// Address ranges of .plt, .plt.sec and .plt.got.
    pub plt_ranges: Vec<(u64, u64)>,
    pub needed: Vec<String>,
    pub runpath: Vec<String>,
}

impl ElfInfo {
    pub fn parse(data: &[u8]) -> Result<ElfInfo, String> {
        let obj = object::File::parse(data).map_err(|e| format!("not a valid ELF file: {e}"))?;
        if obj.architecture() != object::Architecture::X86_64 {
            return Err(format!(
                "an ELF file for {:?}, not x86-64",
                obj.architecture()
            ));
        }
        let mut info = ElfInfo {
            pie_or_shared: obj.kind() == object::ObjectKind::Dynamic,
            entry: obj.entry(),
            ..Default::default()
        };
        if let object::File::Elf64(ref elf) = obj {
            use object::read::elf::ProgramHeader;
            let e = elf.endian();
            for ph in elf.elf_program_headers() {
                if ph.p_type(e) == object::elf::PT_LOAD {
                    info.segments.push(Segment {
                        vaddr: ph.p_vaddr(e),
                        memsz: ph.p_memsz(e),
                        offset: ph.p_offset(e),
                        filesz: ph.p_filesz(e),
                        exec: ph.p_flags(e).0 & object::elf::PF_X.0 != 0,
                        write: ph.p_flags(e).0 & object::elf::PF_W.0 != 0,
                    });
                }
            }
        } else {
            return Err("not a 64-bit ELF file".into());
        }
        // Function bounds from .eh_frame.
        let mut fdes = Vec::new();
        if let Some(sec) = obj.section_by_name(".eh_frame") {
            if let Ok(bytes) = sec.data() {
                let eh = gimli::EhFrame::new(bytes, gimli::LittleEndian);
                let mut bases = gimli::BaseAddresses::default().set_eh_frame(sec.address());
                if let Some(t) = obj.section_by_name(".text") {
                    bases = bases.set_text(t.address());
                }
                if let Some(g) = obj.section_by_name(".got") {
                    bases = bases.set_got(g.address());
                }
                let mut entries = eh.entries(&bases);
                while let Ok(Some(entry)) = entries.next() {
                    if let gimli::CieOrFde::Fde(partial) = entry {
                        if let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) {
                            if fde.len() > 0 {
                                fdes.push((
                                    fde.initial_address(),
                                    fde.initial_address() + fde.len(),
                                ));
                            }
                        }
                    }
                }
            }
        }
        fdes.sort_unstable();
        fdes.dedup();
        let mut syms: Vec<(u64, u64)> = Vec::new();
        for s in obj.symbols().chain(obj.dynamic_symbols()) {
            if s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0 {
                syms.push((s.address(), s.size()));
            }
        }
        syms.sort_unstable();
        syms.dedup();
        info.functions = merge_functions(&fdes, &syms, &info.segments);
        // Dynamic symbols and exports.
        info.dynsyms.push(DynSym {
            name: String::new(),
            value: 0,
            size: 0,
            ifunc: false,
            func: false,
            defined: false,
        });
        if let Some(table) = obj.dynamic_symbol_table() {
            use object::ObjectSymbolTable;
            let mut all: Vec<_> = table.symbols().collect();
            all.sort_by_key(|s| s.index().0);
            for s in all {
                let idx = s.index().0;
                while info.dynsyms.len() < idx {
                    info.dynsyms.push(info.dynsyms[0].clone());
                }
                let ifunc = matches!(
                    s.flags(),
                    object::SymbolFlags::Elf { st_info, .. } if st_info.st_type() == object::elf::STT_GNU_IFUNC
                );
                let name = s.name().unwrap_or("").to_string();
                let d = DynSym {
                    name: name.clone(),
                    value: s.address(),
                    size: s.size(),
                    ifunc,
                    func: s.kind() == SymbolKind::Text || ifunc,
                    defined: s.is_definition() || (ifunc && s.address() != 0),
                };
                if d.defined && d.func && !name.is_empty() {
                    info.exports.push((name.clone(), d.value));
                }
                if d.defined {
                    info.dynsym_by_name
                        .entry(name)
                        .or_insert(info.dynsyms.len());
                }
                info.dynsyms.push(d);
            }
        }
        // Relocations, read raw from every RELA section.
        for sec in obj.sections() {
            let name = sec.name().unwrap_or("");
            if !name.starts_with(".rela") {
                continue;
            }
            let Ok(bytes) = sec.data() else { continue };
            let plt = name == ".rela.plt";
            for c in bytes.chunks_exact(24) {
                let offset = u64::from_le_bytes(c[0..8].try_into().unwrap());
                let rinfo = u64::from_le_bytes(c[8..16].try_into().unwrap());
                let addend = i64::from_le_bytes(c[16..24].try_into().unwrap());
                info.relocs.push(Reloc {
                    offset,
                    rtype: (rinfo & 0xffff_ffff) as u32,
                    sym: (rinfo >> 32) as usize,
                    addend,
                    plt,
                });
            }
        }
        for n in [".plt", ".plt.sec", ".plt.got", ".iplt"] {
            if let Some(s) = obj.section_by_name(n) {
                if s.size() > 0 {
                    info.plt_ranges.push((s.address(), s.address() + s.size()));
                }
            }
        }
        for n in [
            ".init_array",
            ".fini_array",
            ".preinit_array",
            ".ctors",
            ".dtors",
        ] {
            if let Some(s) = obj.section_by_name(n) {
                if s.size() > 0 {
                    info.init_arrays.push((s.address(), s.size()));
                }
            }
        }
        for n in ["_init", "_fini"] {
            if let Some(s) = obj
                .symbols()
                .chain(obj.dynamic_symbols())
                .find(|s| s.name() == Ok(n))
            {
                info.init_funcs.push(s.address());
            }
        }
        if let Some(s) = obj.section_by_name(".init") {
            info.init_funcs.push(s.address());
        }
        if let Some(s) = obj.section_by_name(".fini") {
            info.init_funcs.push(s.address());
        }
        if let object::File::Elf64(ref elf) = obj {
            read_dynamic(elf, &mut info);
        }
        Ok(info)
    }

    /// The lowest loaded virtual address, page-aligned: what a load bias is measured from.
    pub fn base_vaddr(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr).min().unwrap_or(0) & !0xfff
    }

    /// Is `vaddr` inside the file-backed part of an executable segment?
    pub fn in_file_code(&self, vaddr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| s.exec && vaddr >= s.vaddr && vaddr < s.vaddr + s.filesz)
    }

    pub fn in_plt(&self, vaddr: u64) -> bool {
        self.plt_ranges
            .iter()
            .any(|&(s, e)| vaddr >= s && vaddr < e)
    }

    /// The function range holding `vaddr`, if any.
    pub fn function_at(&self, vaddr: u64) -> Option<(u64, u64)> {
        let i = self.functions.partition_point(|&(s, _)| s <= vaddr);
        if i == 0 {
            return None;
        }
        let (s, e) = self.functions[i - 1];
        (vaddr < e).then_some((s, e))
    }
}

fn merge_functions(fdes: &[(u64, u64)], syms: &[(u64, u64)], segs: &[Segment]) -> Vec<(u64, u64)> {
    let in_exec = |a: u64| {
        segs.iter()
            .any(|s| s.exec && a >= s.vaddr && a < s.vaddr + s.memsz)
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in fdes {
        if !in_exec(s) {
            continue;
        }
        match out.last_mut() {
            // Overlapping FDEs: keep them as one range.
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    let covered = |a: u64, v: &[(u64, u64)]| {
        let i = v.partition_point(|&(s, _)| s <= a);
        i > 0 && a < v[i - 1].1
    };
    let mut extra = Vec::new();
    for (k, &(s, size)) in syms.iter().enumerate() {
        if !in_exec(s) || covered(s, &out) {
            continue;
        }
        let next_fde = out[out.partition_point(|&(fs, _)| fs <= s)..]
            .first()
            .map(|f| f.0)
            .unwrap_or(u64::MAX);
        let next_sym = syms[k + 1..]
            .iter()
            .find(|x| x.0 > s)
            .map(|x| x.0)
            .unwrap_or(u64::MAX);
        let seg_end = segs
            .iter()
            .find(|g| g.exec && s >= g.vaddr && s < g.vaddr + g.memsz)
            .map(|g| g.vaddr + g.memsz)
            .unwrap_or(s);
        let end = if size > 0 {
            s + size
        } else {
            next_sym.min(seg_end)
        };
        let end = end.min(next_fde).min(seg_end);
        if end > s {
            extra.push((s, end));
        }
    }
    out.extend(extra);
    out.sort_unstable();
    // Remove overlaps introduced by symbols (aliases, nested symbols).
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (s, e) in out {
        match merged.last_mut() {
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn read_dynamic(elf: &object::read::elf::ElfFile64, info: &mut ElfInfo) {
    use object::read::elf::{Dyn, FileHeader};
    let e = elf.endian();
    let data = elf.data();
    let Ok(sections) = elf.elf_header().sections(e, data) else {
        return;
    };
    let Ok(Some((dyns, link))) = sections.dynamic(e, data) else {
        return;
    };
    let Ok(strings) = sections.strings(e, data, link) else {
        return;
    };
    for d in dyns {
        let tag = d.d_tag(e);
        if tag == object::elf::DT_NEEDED
            || tag == object::elf::DT_RUNPATH
            || tag == object::elf::DT_RPATH
        {
            if let Ok(s) = d.string(e, strings) {
                let s = String::from_utf8_lossy(s).into_owned();
                if tag == object::elf::DT_NEEDED {
                    info.needed.push(s);
                } else {
                    info.runpath.extend(s.split(':').map(String::from));
                }
            }
        }
    }
}
