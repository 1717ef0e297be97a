//! The flags of every mapping of a process (the kernel's `vm_flags`), read in microseconds by a
//! BPF `iter/task_vma` program. `/proc/PID/smaps` shows the same flags (VmFlags) but walks
//! every page table to print the counters beside them: about 18 ms per GiB mapped.
//!
//! The program is a dozen instructions written here; the offsets it reads are looked up in
//! the kernel's own BTF (`/sys/kernel/btf/vmlinux`), and it is loaded once per process. Where
//! BPF is not available (no BTF, no privilege, an older kernel), `vma_flags` says so and the
//! caller falls back to smaps.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// One mapping: [start, end) and its `vm_flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaFlags {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

/// Bits of `vm_flags` (include/linux/mm.h; unchanged for many releases).
pub mod bits {
    pub const READ: u64 = 0x1;
    pub const WRITE: u64 = 0x2;
    pub const EXEC: u64 = 0x4;
    pub const SHARED: u64 = 0x8;
    pub const UFFD_MISSING: u64 = 0x200;
    pub const UFFD_WP: u64 = 0x1000;
    pub const DONTCOPY: u64 = 0x2_0000;
    pub const HUGETLB: u64 = 0x40_0000;
    pub const WIPEONFORK: u64 = 0x200_0000;
    pub const DONTDUMP: u64 = 0x400_0000;
    pub const HUGEPAGE: u64 = 0x2000_0000;
    pub const NOHUGEPAGE: u64 = 0x4000_0000;
    pub const MERGEABLE: u64 = 0x8000_0000;
}

/// The flags of every mapping of process `pid` (as this process's PID namespace numbers it),
/// in address order.
pub fn vma_flags(pid: i32) -> Result<Vec<VmaFlags>> {
    let raw = read_iter(program()?, pid, "mapping-flags")?;
    let mut out: Vec<VmaFlags> = raw
        .chunks_exact(24)
        .map(|c| VmaFlags {
            start: u64::from_ne_bytes(c[0..8].try_into().unwrap()),
            end: u64::from_ne_bytes(c[8..16].try_into().unwrap()),
            flags: u64::from_ne_bytes(c[16..24].try_into().unwrap()),
        })
        .collect();
    // Every thread of the process may be visited with the same memory.
    out.sort_by_key(|v| (v.start, v.end));
    out.dedup();
    if out.is_empty() && crate::procfs::read_maps(pid).is_ok_and(|m| !m.is_empty()) {
        return Err(Error::Parse(format!(
            "the mapping-flags iterator saw no mapping of process {pid}"
        )));
    }
    Ok(out)
}

/// Attach iterator program `prog` to process `pid` and read all it writes. `what` names the
/// iterator in errors.
pub(crate) fn read_iter(prog: &OwnedFd, pid: i32, what: &str) -> Result<Vec<u8>> {
    let mut info = [0u32; 4];
    info[1] = pid as u32; // union bpf_iter_link_info.task.pid
    let mut link = [0u8; 32];
    put32(&mut link, 0, prog.as_raw_fd() as u32);
    put32(&mut link, 8, BPF_TRACE_ITER);
    put64(&mut link, 16, info.as_ptr() as u64);
    put32(&mut link, 24, std::mem::size_of_val(&info) as u32);
    let link = bpf(BPF_LINK_CREATE, &mut link)
        .map_err(|e| Error::io(format!("attaching the {what} iterator to process {pid}"), e))?;
    let mut it = [0u8; 8];
    put32(&mut it, 0, link.as_raw_fd() as u32);
    let iter = bpf(BPF_ITER_CREATE, &mut it)
        .map_err(|e| Error::io(format!("opening the {what} iterator of process {pid}"), e))?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: reading into a buffer we own, of the length given.
        let n = unsafe {
            libc::read(
                iter.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        match n {
            0 => break,
            n if n > 0 => raw.extend_from_slice(&buf[..n as usize]),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(
                    format!("reading the {what} iterator of process {pid}"),
                    e,
                ));
            }
        }
    }
    Ok(raw)
}

/// Off: callers use smaps (for tests of that path; FERRY_NO_BPF in the environment does the
/// same).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Load the program now (parsing BTF and verifying take a few ms), so that the first
/// `vma_flags` of a frozen process does not pay for it. An error says why BPF cannot serve.
pub fn prepare() -> Result<()> {
    program().map(|_| ())
}

/// Whether BPF readers may be used (`set_enabled`, FERRY_NO_BPF).
pub(crate) fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed) && std::env::var_os("FERRY_NO_BPF").is_none()
}

fn program() -> Result<&'static OwnedFd> {
    static PROG: OnceLock<std::result::Result<OwnedFd, String>> = OnceLock::new();
    loaded_once(&PROG, "mapping flags", load)
}

/// A BPF program of this process, loaded by `load` the first time (a failure is kept too):
/// `what` is what it reads, for the errors.
pub(crate) fn loaded_once<T>(
    cell: &'static OnceLock<std::result::Result<T, String>>,
    what: &str,
    load: impl FnOnce() -> std::result::Result<T, String>,
) -> Result<&'static T> {
    if !enabled() {
        return Err(Error::Parse(format!(
            "reading {what} with BPF is turned off (FERRY_NO_BPF)"
        )));
    }
    cell.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Parse(format!("reading {what} with BPF: {e}")))
}

pub(crate) const BPF_PROG_LOAD: i32 = 5;
const BPF_LINK_CREATE: i32 = 28;
const BPF_ITER_CREATE: i32 = 33;
pub(crate) const BPF_PROG_TYPE_TRACING: u32 = 26;
pub(crate) const BPF_TRACE_ITER: u32 = 28;
pub(crate) const BPF_FUNC_SEQ_WRITE: i32 = 127;

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The bpf(2) system call with `attr` (a `union bpf_attr` prefix); its result is a new fd.
pub(crate) fn bpf(cmd: i32, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a buffer of the length passed; the kernel reads (and for some commands
    // writes) only within it, and reads memory that its fields point to, which the callers
    // keep alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF instruction opcodes used by the iterator programs.
pub(crate) mod op {
    pub const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
    pub const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    pub const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    pub const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    pub const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    pub const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    pub const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    pub const JA: u8 = 0x05; // BPF_JMP | BPF_JA
    pub const CALL: u8 = 0x85;
    pub const EXIT: u8 = 0x95;
}

/// One eBPF instruction.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | (dst & 0xf);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

/// The offsets the program reads, from the kernel's BTF.
#[derive(Debug)]
struct Layout {
    attach_btf_id: u32,
    ctx_meta: i16,
    ctx_vma: i16,
    meta_seq: i16,
    vm_start: i16,
    vm_end: i16,
    vm_flags: i16,
}

thread_local! {
    /// While `prepare_all` runs: the kernel's BTF, parsed by the first loader that needs it
    /// (Some(None) until then), for the others to use.
    static KEPT_BTF: std::cell::RefCell<Option<Option<std::rc::Rc<Btf>>>> = const { std::cell::RefCell::new(None) };
}

/// `f` of the running kernel's BTF (`/sys/kernel/btf/vmlinux`): the one `prepare_all` keeps
/// (parsed on first use), or one read and parsed for the call.
pub(crate) fn with_kernel_btf<R>(
    f: impl FnOnce(&Btf) -> std::result::Result<R, String>,
) -> std::result::Result<R, String> {
    let kept = KEPT_BTF.with(|k| match &mut *k.borrow_mut() {
        None => None,
        Some(Some(b)) => Some(Ok(b.clone())),
        Some(slot) => Some(Btf::kernel().map(|b| slot.insert(std::rc::Rc::new(b)).clone())),
    });
    match kept {
        Some(b) => f(&*b?),
        None => f(&Btf::kernel()?),
    }
}

/// Load every BPF reader of this crate now (mapping flags, signal dispositions, thread
/// state), so that the first read of a frozen process does not pay for it. The kernel's BTF
/// is parsed once for those not loaded yet (each parse takes ~5 ms), and not at all when
/// every one is. The error is that of the mapping flags' reader, which callers report; the
/// other two fall back quietly.
pub fn prepare_all() -> Result<()> {
    KEPT_BTF.with(|k| *k.borrow_mut() = Some(None));
    let _ = crate::sighand::prepare();
    let _ = crate::taskstate::prepare();
    let r = prepare();
    KEPT_BTF.with(|k| k.borrow_mut().take());
    r
}

fn load() -> std::result::Result<OwnedFd, String> {
    let l = with_kernel_btf(layout)?;
    use op::*;
    let prog: Vec<[u8; 8]> = vec![
        insn(MOV_X, 6, 1, 0, 0),           // r6 = ctx
        insn(LDX_DW, 7, 6, l.ctx_vma, 0),  // r7 = ctx->vma
        insn(JEQ_K, 7, 0, 13, 0),          // no vma (the end): done
        insn(LDX_DW, 8, 6, l.ctx_meta, 0), // r8 = ctx->meta
        insn(LDX_DW, 8, 8, l.meta_seq, 0), // r8 = meta->seq
        insn(LDX_DW, 1, 7, l.vm_start, 0), // the record on the stack: start,
        insn(STX_DW, 10, 1, -24, 0),       //
        insn(LDX_DW, 1, 7, l.vm_end, 0),   // end,
        insn(STX_DW, 10, 1, -16, 0),       //
        insn(LDX_DW, 1, 7, l.vm_flags, 0), // flags
        insn(STX_DW, 10, 1, -8, 0),        //
        insn(MOV_X, 1, 8, 0, 0),           // bpf_seq_write(seq, fp - 24, 24)
        insn(MOV_X, 2, 10, 0, 0),          //
        insn(ADD_K, 2, 0, 0, -24),         //
        insn(MOV_K, 3, 0, 0, 24),          //
        insn(CALL, 0, 0, 0, BPF_FUNC_SEQ_WRITE),
        insn(MOV_K, 0, 0, 0, 0), // return 0
        insn(EXIT, 0, 0, 0, 0),
    ];
    load_iter_prog(&prog, b"fvmaflg", l.attach_btf_id)
}

/// Load iterator program `prog` (a tracing program attached to the iterator function whose
/// BTF id is `attach_btf_id`), named `name` (at most 15 bytes).
pub(crate) fn load_iter_prog(
    prog: &[[u8; 8]],
    name: &[u8],
    attach_btf_id: u32,
) -> std::result::Result<OwnedFd, String> {
    let code: Vec<u8> = prog.concat();
    let license = b"GPL\0";
    let mut log = vec![0u8; 256 << 10];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_TRACING);
    put32(&mut attr, 4, prog.len() as u32);
    put64(&mut attr, 8, code.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log_level
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name[..n]); // prog_name
    put32(&mut attr, 68, BPF_TRACE_ITER); // expected_attach_type
    put32(&mut attr, 108, attach_btf_id);
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end]);
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        format!("loading the iterator program: {e} ({})", last.join(" / "))
    })
}

/// Where the program's fields lie, from the kernel's BTF.
fn layout(t: &Btf) -> std::result::Result<Layout, String> {
    let func = t
        .find(KIND_FUNC, "bpf_iter_task_vma")
        .ok_or("the kernel's BTF has no bpf_iter_task_vma (no task_vma iterator)")?;
    let member = |s: &str, m: &str| -> std::result::Result<i16, String> {
        i16::try_from(t.member_bytes(s, m)?).map_err(|_| format!("{s}.{m} lies too far in"))
    };
    Ok(Layout {
        attach_btf_id: func,
        ctx_meta: member("bpf_iter__task_vma", "meta")?,
        ctx_vma: member("bpf_iter__task_vma", "vma")?,
        meta_seq: member("bpf_iter_meta", "seq")?,
        vm_start: member("vm_area_struct", "vm_start")?,
        vm_end: member("vm_area_struct", "vm_end")?,
        vm_flags: member("vm_area_struct", "vm_flags")?,
    })
}

pub(crate) const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
pub(crate) const KIND_FUNC: u32 = 12;

/// The bytes of a BTF blob: mapped where the kernel allows it (6.16 and later map
/// `/sys/kernel/btf/vmlinux`, no 5 MB copy), read otherwise.
enum BtfBytes {
    Mapped(crate::mem::MappedFile),
    Read(Vec<u8>),
}

impl BtfBytes {
    fn get(&self) -> &[u8] {
        match self {
            BtfBytes::Mapped(m) => m.bytes(),
            BtfBytes::Read(v) => v,
        }
    }
}

/// Just enough of a BTF reader: each type's kind, name and, for structs and unions, members.
pub(crate) struct Btf {
    bytes: BtfBytes,
    strings: std::ops::Range<usize>,
    /// Per type id (from 1): (kind, name offset, kind_flag, size or type, where what follows
    /// lies in `bytes`).
    types: Vec<(u32, u32, bool, u32, std::ops::Range<usize>)>,
}

impl Btf {
    /// The running kernel's BTF.
    pub(crate) fn kernel() -> std::result::Result<Btf, String> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let bytes = match crate::mem::MappedFile::open(std::path::Path::new(PATH)) {
            Ok(m) => BtfBytes::Mapped(m),
            Err(_) => {
                BtfBytes::Read(std::fs::read(PATH).map_err(|e| format!("reading {PATH}: {e}"))?)
            }
        };
        Btf::parse(bytes)
    }

    fn parse(bytes: BtfBytes) -> std::result::Result<Btf, String> {
        let b = bytes.get();
        let u32_at = |o: usize| -> std::result::Result<u32, String> {
            b.get(o..o + 4)
                .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
                .ok_or_else(|| "BTF is truncated".to_string())
        };
        if b.len() < 24 || b[0..2] != [0x9f, 0xeb] {
            return Err("BTF has no valid header".into());
        }
        let hdr = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |o: usize, l: usize| {
            let r = hdr + o..hdr + o + l;
            b.get(r.clone())
                .map(|_| r)
                .ok_or_else(|| "BTF section out of bounds".to_string())
        };
        let types_r = section(type_off, type_len)?;
        let types_b = &b[types_r.clone()];
        let strings = section(str_off, str_len)?;
        let mut types = Vec::new();
        let mut at = 0usize;
        while at + 12 <= types_b.len() {
            let word = |o: usize| u32::from_le_bytes(types_b[o..o + 4].try_into().unwrap());
            let (name, info, size_or_type) = (word(at), word(at + 4), word(at + 8));
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
            if at + 12 + extra > types_b.len() {
                return Err("BTF type section is truncated".to_string());
            }
            let body = types_r.start + at + 12..types_r.start + at + 12 + extra;
            types.push((kind, name, info >> 31 == 1, size_or_type, body));
            at += 12 + extra;
        }
        Ok(Btf {
            bytes,
            strings,
            types,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let strings = &self.bytes.get()[self.strings.clone()];
        let s = strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    /// The id of the type of `kind` named `name`.
    pub(crate) fn find(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|&(k, n, _, _, _)| k == kind && self.name(n) == name.as_bytes())
            .map(|i| i as u32 + 1)
    }

    /// The bit offset of member `name` of struct or union `id`, looking into anonymous
    /// members (a field inside an unnamed union).
    pub(crate) fn member_offset(&self, id: u32, name: &str) -> Option<u32> {
        let (kind, _, kflag, _, body) = self.types.get(id.checked_sub(1)? as usize)?.clone();
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        for m in self.bytes.get()[body].chunks_exact(12) {
            let word = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().unwrap());
            let (mname, mtype, moff) = (word(0), word(4), word(8));
            let off = if kflag { moff & 0xff_ffff } else { moff };
            if self.name(mname) == name.as_bytes() {
                return Some(off);
            }
            if mname == 0 {
                if let Some(inner) = self.member_offset(self.resolve(mtype), name) {
                    return Some(off + inner);
                }
            }
        }
        None
    }

    /// The byte offset of member `m` of struct `s`, or why there is none.
    pub(crate) fn member_bytes(&self, s: &str, m: &str) -> std::result::Result<usize, String> {
        let id = self
            .find(KIND_STRUCT, s)
            .ok_or(format!("the kernel's BTF has no struct {s}"))?;
        let bits = self
            .member_offset(id, m)
            .ok_or(format!("struct {s} has no member {m} in the kernel's BTF"))?;
        Ok(bits as usize / 8)
    }

    /// The size in bytes of struct or union `id`.
    pub(crate) fn size_of(&self, id: u32) -> Option<u32> {
        let (kind, size) = self
            .types
            .get(id.checked_sub(1)? as usize)
            .map(|t| (t.0, t.3))?;
        (kind == KIND_STRUCT || kind == KIND_UNION).then_some(size)
    }

    /// Through typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get((id as usize).wrapping_sub(1)) {
                Some(&(8..=11 | 18, _, _, next, _)) => id = next,
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_flags_of_this_process() {
        let len = 1 << 20;
        // SAFETY: a new anonymous mapping at an address the kernel picks; madvise on it.
        let p = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            libc::madvise(p, len, libc::MADV_DONTFORK);
            p as u64
        };
        let v = match vma_flags(std::process::id() as i32) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        let m = v
            .iter()
            .find(|m| m.start <= p && p < m.end)
            .expect("the new mapping is listed");
        assert_ne!(m.flags & bits::DONTCOPY, 0, "{m:?}");
        assert_eq!(m.flags & bits::WRITE, 0, "{m:?}");
        assert_ne!(m.flags & bits::READ, 0, "{m:?}");
        // The same mappings as /proc/self/maps.
        let maps = crate::procfs::read_maps(std::process::id() as i32).unwrap();
        let missing: Vec<_> = maps
            .iter()
            .filter(|x| x.kind != crate::procfs::MapKind::Vsyscall)
            .filter(|x| !v.iter().any(|m| m.start == x.start && m.end == x.end))
            .collect();
        assert!(missing.is_empty(), "{missing:?}\n{v:x?}");
        // SAFETY: unmapping what we mapped above.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }
}
