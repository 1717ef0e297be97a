//! The instruction-level scan: which CPU features a workload's code needs, with evidence.
//!
//! `paths` mode walks code from roots (thread instruction pointers, return addresses and code
//! pointers on stacks, in registers, in data and relocation tables, ELF entry and init arrays,
//! signal handlers, lazy PLT targets) and follows direct branches, PLT/GOT indirections and
//! code addresses taken by `lea`. Its unit is the function: reaching any address inside a
//! function (as bounded by .eh_frame FDEs or symbols) includes the whole function, which
//! covers jump tables, landing pads and computed gotos that cannot be resolved statically.
//! Code outside any known function is followed by recursive descent. Anonymous executable
//! memory (JIT code) is always decoded whole. `full` mode decodes every executable mapping.

use crate::features::{need_of, silent_when_missing};
use crate::space::Space;
use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Formatter, Instruction,
    IntelFormatter, Mnemonic, OpKind,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Paths,
    Full,
}

/// Why an address was taken as a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootKind {
    ThreadIp,
    Register,
    StackWord,
    ElfEntry,
    InitFini,
    SignalHandler,
    DataPointer,
    LazyPlt,
    Export,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Example {
    pub module: String,
    pub address: String,
    /// Offset in the module's file address space (ELF virtual address), when known.
    pub vaddr: Option<String>,
    pub instruction: String,
    pub bytes: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeatureUse {
    /// A feature name, or `A|B` when any one of them suffices.
    pub feature: String,
    pub instructions: u64,
    pub modules: Vec<String>,
    pub example: Example,
    /// Set for features whose absence changes results without a trap (LZCNT, TZCNT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ScanStats {
    pub code_bytes_decoded: u64,
    pub instructions: u64,
    pub functions: u64,
    pub roots: BTreeMap<String, u64>,
    pub data_bytes_scanned: u64,
    pub undecodable_outside_functions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ScanResult {
    pub features: Vec<FeatureUse>,
    /// Bytes inside reachable code that the decoder cannot decode.
    pub unknown: Vec<Example>,
    pub stats: ScanStats,
    pub notes: Vec<String>,
}

struct Stat {
    count: u64,
    modules: HashSet<usize>,
    example: Example,
}

#[derive(Clone, Copy)]
struct Work {
    addr: u64,
    strong: bool,
}

pub struct Scanner<'s> {
    space: &'s Space,
    work: Vec<Work>,
    seen_roots: HashSet<u64>,
    swept_funcs: HashSet<(usize, u64)>,
    swept_regions: HashSet<usize>,
    visited: HashSet<u64>,
    stats: BTreeMap<String, Stat>,
    unknown: Vec<Example>,
    counts: ScanStats,
    notes: Vec<String>,
    formatter: IntelFormatter,
    code: CodeWords,
}

/// Tells which words of data hold addresses of scannable code. It holds no reference to the
/// process, so several threads can scan data with it at once.
pub struct CodeWords {
    lo: u64,
    span: u64,
    /// One bit per 2 MiB of address space (modulo 128 GiB), set where code lies: most words
    /// that look like addresses (heap pointers) are turned away by one lookup.
    granules: Box<[u64; GRANULE_WORDS]>,
    /// The code regions that are not the kernel's, sorted.
    regions: Vec<(u64, u64)>,
}

impl CodeWords {
    fn new(space: &Space) -> Self {
        let (lo, hi) = space.code_bounds();
        let mut granules = Box::new([0u64; GRANULE_WORDS]);
        for r in &space.regions {
            let (first, last) = (r.start >> 21, (r.end.max(r.start + 1) - 1) >> 21);
            // Past 128 GiB of code every bit is set anyway.
            for g in first..=last.min(first + (GRANULE_WORDS as u64) * 64) {
                let (w, b) = granule(g << 21);
                granules[w] |= b;
            }
        }
        let regions = space
            .regions
            .iter()
            .filter(|r| !space.modules[r.module].kernel)
            .map(|r| (r.start, r.end))
            .collect();
        CodeWords {
            lo,
            span: hi.saturating_sub(lo),
            granules,
            regions,
        }
    }

    fn is_code(&self, v: u64) -> bool {
        let i = self.regions.partition_point(|r| r.0 <= v);
        i > 0 && v < self.regions[i - 1].1
    }

    /// Append to `out` every aligned word of `data` (at `addr`) that holds a code address.
    pub fn find(&self, addr: u64, data: &[u8], out: &mut Vec<u64>) {
        let skip = ((8 - (addr % 8)) % 8) as usize;
        if skip >= data.len() {
            return;
        }
        let (lo, span) = (self.lo, self.span);
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap());
        // Blocks of 64 words: most hold no word in the code's range, which a branch-free
        // pass tells.
        for block in data[skip..].chunks(512) {
            let any = block
                .chunks_exact(8)
                .fold(false, |acc, w| acc | (word(w).wrapping_sub(lo) < span));
            if !any {
                continue;
            }
            for w in block.chunks_exact(8) {
                let v = word(w);
                if v.wrapping_sub(lo) >= span {
                    continue;
                }
                let (gw, gb) = granule(v);
                if self.granules[gw] & gb != 0 && self.is_code(v) {
                    out.push(v);
                }
            }
        }
    }
}

const GRANULE_WORDS: usize = 1024;

fn granule(addr: u64) -> (usize, u64) {
    let g = (addr >> 21) as usize % (GRANULE_WORDS * 64);
    (g / 64, 1 << (g % 64))
}

const MAX_UNKNOWN_EXAMPLES: usize = 32;

impl<'s> Scanner<'s> {
    pub fn new(space: &'s Space) -> Self {
        Scanner {
            space,
            work: Vec::new(),
            seen_roots: HashSet::new(),
            swept_funcs: HashSet::new(),
            swept_regions: HashSet::new(),
            visited: HashSet::new(),
            stats: BTreeMap::new(),
            unknown: Vec::new(),
            counts: ScanStats::default(),
            notes: Vec::new(),
            formatter: IntelFormatter::new(),
            code: CodeWords::new(space),
        }
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Is `addr` inside scannable code (not kernel-provided)?
    pub fn is_code(&self, addr: u64) -> bool {
        self.code.is_code(addr)
    }

    /// Add a root. `strong` roots come from execution evidence or exact metadata; weak ones
    /// are words that merely look like code addresses.
    pub fn root(&mut self, addr: u64, kind: RootKind, strong: bool) {
        if !self.is_code(addr) {
            return;
        }
        *self.counts.roots.entry(kind_name(kind)).or_default() += 1;
        self.push(addr, strong);
    }

    fn push(&mut self, addr: u64, strong: bool) {
        if !self.is_code(addr) {
            return;
        }
        if self.seen_roots.insert(addr) {
            self.work.push(Work { addr, strong });
        }
    }

    /// Scan every aligned word of a buffer at `addr` for code addresses.
    pub fn scan_words(&mut self, addr: u64, data: &[u8], kind: RootKind) {
        let mut found = Vec::new();
        self.code.find(addr, data, &mut found);
        self.data_roots(&found, data.len() as u64, kind);
    }

    /// What scans data on other threads uses to find code addresses.
    pub fn code_words(&self) -> &CodeWords {
        &self.code
    }

    /// Root the code addresses found in `bytes` of data by [`CodeWords::find`].
    pub fn data_roots(&mut self, found: &[u64], bytes: u64, kind: RootKind) {
        self.counts.data_bytes_scanned += bytes;
        if !found.is_empty() {
            *self.counts.roots.entry(kind_name(kind)).or_default() += found.len() as u64;
        }
        for &v in found {
            self.push(v, false);
        }
    }

    /// Walk everything reachable from the roots given so far.
    pub fn run_paths(&mut self) {
        while let Some(w) = self.work.pop() {
            let Some(ri) = self.space.region_of(w.addr) else {
                continue;
            };
            let region = &self.space.regions[ri];
            let m = &self.space.modules[region.module];
            if m.kernel {
                continue;
            }
            if m.anon {
                if self.swept_regions.insert(ri) {
                    self.sweep(ri, region.start, region.end, true);
                }
                continue;
            }
            if let Some(elf) = &m.elf {
                let v = w.addr.wrapping_sub(m.bias);
                if !elf.in_plt(v) {
                    if let Some((s, e)) = elf.function_at(v) {
                        if self.swept_funcs.insert((region.module, s)) {
                            self.counts.functions += 1;
                            let (a, b) = (s + m.bias, (e + m.bias).min(region.end));
                            self.sweep(ri, a.max(region.start), b, true);
                        }
                        continue;
                    }
                }
            }
            self.descend(ri, w.addr, w.strong);
        }
    }

    /// `full` mode: decode every executable region; known functions one by one, the gaps
    /// between them linearly.
    pub fn run_full(&mut self) {
        for ri in 0..self.space.regions.len() {
            let region = &self.space.regions[ri];
            let m = &self.space.modules[region.module];
            if m.kernel {
                continue;
            }
            let funcs: Vec<(u64, u64)> = match &m.elf {
                Some(elf) if !m.anon => elf
                    .functions
                    .iter()
                    .map(|&(s, e)| (s + m.bias, e + m.bias))
                    .filter(|&(s, e)| e > region.start && s < region.end)
                    .collect(),
                _ => Vec::new(),
            };
            let (start, end) = (region.start, region.end);
            if funcs.is_empty() {
                self.sweep(ri, start, end, true);
                continue;
            }
            let mut at = start;
            for (s, e) in funcs {
                let (s, e) = (s.max(start), e.min(end));
                if s > at {
                    self.sweep(ri, at, s, false);
                }
                self.counts.functions += 1;
                self.sweep(ri, s, e, true);
                at = at.max(e);
            }
            if at < end {
                self.sweep(ri, at, end, false);
            }
        }
    }

    /// Linear decode of [start, end) within region `ri`. `inside_function`: undecodable
    /// bytes are unknown instructions; otherwise (padding between functions) only counted.
    fn sweep(&mut self, ri: usize, start: u64, end: u64, inside_function: bool) {
        let region = &self.space.regions[ri];
        let lo = (start - region.start) as usize;
        let hi = (end - region.start) as usize;
        let bytes = &region.bytes[lo..hi];
        let module = region.module;
        let mut dec = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        self.counts.code_bytes_decoded += bytes.len() as u64;
        while dec.can_decode() {
            dec.decode_out(&mut ins);
            if ins.code() == Code::INVALID {
                if dec.last_error() == DecoderError::NoMoreBytes {
                    // An instruction cut by the end of the range.
                    if inside_function {
                        self.record_unknown(module, &ins, bytes, start);
                    }
                    break;
                }
                if inside_function {
                    self.record_unknown(module, &ins, bytes, start);
                } else {
                    self.counts.undecodable_outside_functions += 1;
                }
                continue;
            }
            self.process(module, &ins, bytes, start, true);
        }
    }

    /// Recursive descent from `addr` until the flow leaves (ret, jmp, trap).
    fn descend(&mut self, ri: usize, addr: u64, strong: bool) {
        let region = &self.space.regions[ri];
        let module = region.module;
        let bytes = &region.bytes[..];
        let base = region.start;
        let elf = self.space.modules[module].elf.clone();
        let bias = self.space.modules[module].bias;
        let mut ip = addr;
        let mut ins = Instruction::default();
        loop {
            if ip >= region.end || !self.visited.insert(ip) {
                return;
            }
            if let Some(elf) = &elf {
                let v = ip.wrapping_sub(bias);
                if !elf.in_file_code(v) {
                    // Past the end of the file's code: page padding, not code.
                    return;
                }
                if ip != addr && !elf.in_plt(v) && elf.function_at(v).is_some() {
                    // Fell into a known function: it is swept as a unit.
                    self.push(ip, strong);
                    return;
                }
            }
            let off = (ip - base) as usize;
            let mut dec = Decoder::with_ip(64, &bytes[off..], ip, DecoderOptions::NONE);
            dec.decode_out(&mut ins);
            self.counts.code_bytes_decoded += ins.len() as u64;
            if ins.code() == Code::INVALID {
                if dec.last_error() == DecoderError::NoMoreBytes {
                    return;
                }
                if strong {
                    self.record_unknown(module, &ins, bytes, base);
                }
                return;
            }
            self.process(module, &ins, bytes, base, strong);
            match ins.flow_control() {
                FlowControl::Return
                | FlowControl::UnconditionalBranch
                | FlowControl::IndirectBranch
                | FlowControl::Exception => return,
                FlowControl::Interrupt if ins.mnemonic() != Mnemonic::Syscall => return,
                _ => {}
            }
            if ins.mnemonic() == Mnemonic::Hlt {
                return;
            }
            ip = ins.next_ip();
        }
    }

    fn process(&mut self, module: usize, ins: &Instruction, bytes: &[u8], base: u64, strong: bool) {
        self.counts.instructions += 1;
        for &f in ins.cpuid_features() {
            let need = need_of(f);
            if let Some(label) = need.label() {
                let st = self.stats.entry(label).or_insert_with(|| Stat {
                    count: 0,
                    modules: HashSet::new(),
                    example: Example {
                        module: String::new(),
                        address: String::new(),
                        vaddr: None,
                        instruction: String::new(),
                        bytes: String::new(),
                    },
                });
                if st.count == 0 {
                    let mut text = String::new();
                    self.formatter.format(ins, &mut text);
                    st.example =
                        example(self.space, module, ins.ip(), text, bytes, base, ins.len());
                }
                st.count += 1;
                st.modules.insert(module);
            }
        }
        match ins.flow_control() {
            FlowControl::ConditionalBranch
            | FlowControl::UnconditionalBranch
            | FlowControl::Call
            | FlowControl::XbeginXabortXend => {
                if matches!(
                    ins.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) {
                    self.push(ins.near_branch_target(), strong);
                }
            }
            // jmp/call through a GOT slot or a function-pointer variable: follow its value.
            FlowControl::IndirectBranch | FlowControl::IndirectCall
                if ins.is_ip_rel_memory_operand() =>
            {
                if let Some(t) = self.space.mem.read_u64(ins.ip_rel_memory_address()) {
                    self.push(t, strong);
                }
            }
            _ => {}
        }
        if ins.is_ip_rel_memory_operand() && ins.mnemonic() == Mnemonic::Lea {
            // A code address taken: a function pointer being made.
            self.push(ins.ip_rel_memory_address(), strong);
        }
        for i in 0..ins.op_count() {
            let v = match ins.op_kind(i) {
                OpKind::Immediate32to64 | OpKind::Immediate32 | OpKind::Immediate64 => {
                    ins.immediate(i)
                }
                _ => continue,
            };
            if self.is_code(v) {
                self.push(v, false);
            }
        }
    }

    fn record_unknown(&mut self, module: usize, ins: &Instruction, bytes: &[u8], base: u64) {
        if self.unknown.len() < MAX_UNKNOWN_EXAMPLES {
            let e = example(
                self.space,
                module,
                ins.ip(),
                "(undecodable)".into(),
                bytes,
                base,
                ins.len().max(1),
            );
            self.unknown.push(e);
        } else if self.unknown.len() == MAX_UNKNOWN_EXAMPLES {
            self.notes
                .push("more undecodable instructions than listed".to_string());
            self.unknown.push(Example {
                module: "...".into(),
                address: String::new(),
                vaddr: None,
                instruction: String::new(),
                bytes: String::new(),
            });
        }
    }

    pub fn finish(self) -> ScanResult {
        let space = self.space;
        let mut features: Vec<FeatureUse> = self
            .stats
            .into_iter()
            .map(|(feature, st)| {
                let mut modules: Vec<String> = st
                    .modules
                    .iter()
                    .map(|&m| space.modules[m].name.clone())
                    .collect();
                modules.sort();
                modules.dedup();
                FeatureUse {
                    silent: silent_when_missing(&feature).map(String::from),
                    feature,
                    instructions: st.count,
                    modules,
                    example: st.example,
                }
            })
            .collect();
        features.sort_by(|a, b| a.feature.cmp(&b.feature));
        ScanResult {
            features,
            unknown: self.unknown,
            stats: self.counts,
            notes: self.notes,
        }
    }
}

fn kind_name(k: RootKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn example(
    space: &Space,
    module: usize,
    ip: u64,
    text: String,
    bytes: &[u8],
    base: u64,
    len: usize,
) -> Example {
    let m = &space.modules[module];
    let off = (ip - base) as usize;
    let raw = &bytes[off..(off + len).min(bytes.len())];
    Example {
        module: m.name.clone(),
        address: format!("{ip:#x}"),
        vaddr: m
            .elf
            .as_ref()
            .map(|_| format!("{:#x}", ip.wrapping_sub(m.bias))),
        instruction: text,
        bytes: raw.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{Memory, Module, Region, Space};

    struct NoMem;
    impl Memory for NoMem {
        fn read(&self, _addr: u64, _buf: &mut [u8]) -> usize {
            0
        }
    }

    #[test]
    fn words_pointing_into_code_and_only_those_become_roots() {
        let module = |kernel| Module {
            name: "m".into(),
            path: None,
            bias: 0,
            elf: None,
            anon: true,
            kernel,
        };
        let region = |start: u64, end: u64, module| Region {
            start,
            end,
            module,
            bytes: vec![0x90; (end - start) as usize],
        };
        let space = Space::new(
            vec![module(false), module(true)],
            vec![
                region(0x5555_0000_0000, 0x5555_0000_4000, 0),
                region(0x7f00_0000_0000, 0x7f00_0000_2000, 0),
                region(0x7fff_0000_0000, 0x7fff_0000_1000, 1),
            ],
            Box::new(NoMem),
        );
        // Heap pointers between the code regions, code pointers, kernel code, small numbers,
        // the regions' edges; spread over several 64-word blocks.
        let mut words = vec![0u64; 1000];
        let mut expect = Vec::new();
        let mut x = 0x1234_5678u64;
        for (i, w) in words.iter_mut().enumerate() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *w = match i % 7 {
                0 => 0x5555_0000_0000 + (x % 0x4000),
                1 => 0x5555_0001_0000 + (x % 0x100_0000),
                2 => 0x7f00_0000_0000 + (x % 0x3000),
                3 => 0x7fff_0000_0000 + (x % 0x1000),
                4 => x % 1000,
                5 if i < 500 => 0x5555_0000_4000,
                _ => 0x7eff_ffff_f000 + (x % 0x2000),
            };
            let v = *w;
            let code = (0x5555_0000_0000..0x5555_0000_4000).contains(&v)
                || (0x7f00_0000_0000..0x7f00_0000_2000).contains(&v);
            if code {
                expect.push(v);
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut sc = Scanner::new(&space);
        sc.scan_words(0x1000, &bytes, RootKind::StackWord);
        let mut got: Vec<u64> = sc.work.iter().map(|w| w.addr).collect();
        got.sort_unstable();
        expect.sort_unstable();
        expect.dedup();
        assert!(!expect.is_empty());
        assert_eq!(got, expect);
        assert_eq!(
            sc.counts.roots.get("stack_word").copied().unwrap_or(0) as usize,
            words
                .iter()
                .filter(|&&v| (0x5555_0000_0000..0x5555_0000_4000).contains(&v)
                    || (0x7f00_0000_0000..0x7f00_0000_2000).contains(&v))
                .count()
        );
    }
}
