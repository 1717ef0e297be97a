//! What a restore refuses: the semantic checks of an image's records and page index, run
//! before any process is created (docs/image-format.md, "What a restore refuses").
//!
//! ferry-image guarantees that an image is whole and undamaged (every byte under a CRC); it
//! cannot tell whether the records make sense. An image whose checksums are valid can still
//! be hostile or nonsensical: a mapping past the end of user space, a thread ID shared by two
//! processes, a pipe said to be held by a process outside the image, page data for memory no
//! mapping holds. Each of these would otherwise be found (or not) half-way through building
//! the tree. Every check here is cheap (linear, or n log n in the number of records), and every
//! error names the record, the field and its value.

use crate::schema::{MapKind, ProcessImage, ZombieImage, GHOST_MAX};
use crate::{EngineError, Result};
use ferry_image::{BlockIndex, PAGE_SIZE};
use std::collections::{HashMap, HashSet};

const PAGE: u64 = PAGE_SIZE as u64;
/// First address past user space (x86-64, 4-level paging: 47-bit user addresses).
pub const USER_END: u64 = 0x0000_8000_0000_0000;
/// The legacy vsyscall page: the only mapping above `USER_END` an image may hold.
pub const VSYSCALL: (u64, u64) = (0xffff_ffff_ff60_0000, 0xffff_ffff_ff60_1000);
/// Largest PID or TID (the kernel's PID_MAX_LIMIT on 64-bit).
pub const MAX_PID: i32 = 1 << 22;
/// Most processes (and, apart, zombies) in one image.
pub const MAX_PROCESSES: usize = 1 << 15;
/// Most threads of one process.
pub const MAX_THREADS: usize = 1 << 16;
/// Most mappings of one process (vm.max_map_count is 65530 by default).
pub const MAX_MAPPINGS: usize = 1 << 20;
/// fd numbers are below this (fs.nr_open by default).
pub const MAX_FD: i32 = 1 << 20;
/// Largest xsave area: the dump reads it through a buffer of this size (the largest x86
/// area today, with AMX, is 11008 bytes).
pub const MAX_XSAVE: usize = 16 << 10;
/// Smallest xsave area: the legacy region and the xsave header.
pub const MIN_XSAVE: usize = 576;
/// Registers of a thread: user_regs_struct, 27 words.
pub const REGS: usize = 27;
/// Most auxv words (the kernel keeps 52 on x86-64 today).
pub const MAX_AUXV: usize = 128;
/// A saved siginfo, bytes.
const SIGINFO: usize = 128;
/// Highest signal number.
const MAX_SIGNAL: i32 = 64;
/// Largest pipe capacity (F_SETPIPE_SZ takes an int).
const MAX_PIPE: u64 = 1 << 31;

fn refuse(what: String) -> EngineError {
    EngineError::Failed(format!("image refused: {what}"))
}

/// Check the records of an image and its page index (`ImageReader::index_pages`): `records`,
/// then `pages`.
pub fn validate(
    procs: &[ProcessImage],
    zombies: &[ZombieImage],
    blocks: &[BlockIndex],
) -> Result<()> {
    records(procs, zombies)?;
    pages(procs, blocks)
}

/// The records alone: IDs and the tree, then each process's threads, memory layout and fds.
pub fn records(procs: &[ProcessImage], zombies: &[ZombieImage]) -> Result<()> {
    tree(procs, zombies)?;
    let by_pid: HashMap<i32, usize> = procs.iter().enumerate().map(|(i, p)| (p.pid, i)).collect();
    for (i, p) in procs.iter().enumerate() {
        threads(p)?;
        mm(p)?;
        mappings(p)?;
        fds(i, p, procs, &by_pid)?;
        contents(p)?;
    }
    Ok(())
}

fn pid_ok(v: i32) -> bool {
    (1..=MAX_PID).contains(&v)
}

/// PIDs, TIDs and parents: every ID in range and used once in the whole image, each process
/// after its parent (but the first), each zombie's parent a process of the image.
fn tree(procs: &[ProcessImage], zombies: &[ZombieImage]) -> Result<()> {
    if procs.len() > MAX_PROCESSES {
        return Err(refuse(format!(
            "{} process records (at most {MAX_PROCESSES})",
            procs.len()
        )));
    }
    if zombies.len() > MAX_PROCESSES {
        return Err(refuse(format!(
            "{} zombie records (at most {MAX_PROCESSES})",
            zombies.len()
        )));
    }
    // Every ID of the image and the record it belongs to.
    let mut owner: HashMap<i32, String> = HashMap::new();
    let mut claim = |id: i32, who: String| -> Result<()> {
        match owner.get(&id) {
            Some(first) => Err(refuse(format!("{who}: ID {id} is also {first}"))),
            None => {
                owner.insert(id, who);
                Ok(())
            }
        }
    };
    for (i, p) in procs.iter().enumerate() {
        if !pid_ok(p.pid) {
            return Err(refuse(format!(
                "process record {i}: pid = {}: not between 1 and {MAX_PID}",
                p.pid
            )));
        }
        if i == 0 {
            // The root's parent is outside the image (0 for a namespace's init).
            if !(0..=MAX_PID).contains(&p.ppid) {
                return Err(refuse(format!(
                    "process {}: ppid = {}: not between 0 and {MAX_PID}",
                    p.pid, p.ppid
                )));
            }
        } else if !procs[..i].iter().any(|q| q.pid == p.ppid) {
            return Err(refuse(format!(
                "process {}: ppid = {}: no process before it in the image has that PID \
                 (parents come before their children)",
                p.pid, p.ppid
            )));
        }
        if p.threads.len() > MAX_THREADS {
            return Err(refuse(format!(
                "process {}: {} threads (at most {MAX_THREADS})",
                p.pid,
                p.threads.len()
            )));
        }
        if !p.threads.iter().any(|t| t.tid == p.pid) {
            return Err(refuse(format!(
                "process {}: no thread {} (the thread-group leader) in threads",
                p.pid, p.pid
            )));
        }
        for (k, t) in p.threads.iter().enumerate() {
            if !pid_ok(t.tid) {
                return Err(refuse(format!(
                    "process {}: threads[{k}].tid = {}: not between 1 and {MAX_PID}",
                    p.pid, t.tid
                )));
            }
            let who = if t.tid == p.pid {
                format!("process {}", p.pid)
            } else {
                format!("thread {} of process {}", t.tid, p.pid)
            };
            claim(t.tid, who)?;
        }
    }
    for (i, z) in zombies.iter().enumerate() {
        if !pid_ok(z.pid) {
            return Err(refuse(format!(
                "zombie record {i}: pid = {}: not between 1 and {MAX_PID}",
                z.pid
            )));
        }
        claim(z.pid, format!("zombie {}", z.pid))?;
        if !procs.iter().any(|p| p.pid == z.ppid) {
            return Err(refuse(format!(
                "zombie {}: ppid = {}: not a process of the image",
                z.pid, z.ppid
            )));
        }
        // A wait status: exited (code << 8) or killed (signal, 0x80 for a core dump), by a
        // signal whose default action ends the process.
        let sig = z.status & 0x7f;
        let ends = (1..=MAX_SIGNAL).contains(&sig)
            && ![
                libc::SIGCHLD,
                libc::SIGCONT,
                libc::SIGSTOP,
                libc::SIGTSTP,
                libc::SIGTTIN,
                libc::SIGTTOU,
                libc::SIGURG,
                libc::SIGWINCH,
            ]
            .contains(&sig);
        if !(0..=0xffff).contains(&z.status) || (sig != 0 && !ends) {
            return Err(refuse(format!(
                "zombie {}: status = {:#x}: not the wait status of an exit or of a killing \
                 signal",
                z.pid, z.status
            )));
        }
    }
    Ok(())
}

fn threads(p: &ProcessImage) -> Result<()> {
    let pid = p.pid;
    for (k, t) in p.threads.iter().enumerate() {
        let at = format!("process {pid}: threads[{k}] (tid {})", t.tid);
        if t.regs.len() != REGS {
            return Err(refuse(format!(
                "{at}: regs has {} values, not {REGS}",
                t.regs.len()
            )));
        }
        let bytes = t.xsave.len() / 2;
        if !t.xsave.len().is_multiple_of(2)
            || !(MIN_XSAVE..=MAX_XSAVE).contains(&bytes)
            || !bytes.is_multiple_of(8)
        {
            return Err(refuse(format!(
                "{at}: xsave is {} hex digits: not an xsave area of {MIN_XSAVE} to {MAX_XSAVE} \
                 bytes in 8-byte words",
                t.xsave.len()
            )));
        }
        if !t.xsave.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(refuse(format!("{at}: xsave is not hex")));
        }
        if let Some(r) = t.rseq {
            if r.ptr >= USER_END || !r.ptr.is_multiple_of(32) || !(32..=4096).contains(&r.size) {
                return Err(refuse(format!(
                    "{at}: rseq = (ptr {:#x}, size {}): not a 32-byte-aligned user address with \
                     a size of 32 to 4096",
                    r.ptr, r.size
                )));
            }
        }
        if let Some(j) = t.pending.iter().position(|s| s.len() != 2 * SIGINFO) {
            return Err(refuse(format!(
                "{at}: pending[{j}] is {} hex digits, not a siginfo of {SIGINFO} bytes",
                t.pending[j].len()
            )));
        }
    }
    if let Some(j) = p.shared_pending.iter().position(|s| s.len() != 2 * SIGINFO) {
        return Err(refuse(format!(
            "process {pid}: shared_pending[{j}] is {} hex digits, not a siginfo of {SIGINFO} \
             bytes",
            p.shared_pending[j].len()
        )));
    }
    if p.sigactions.len() > MAX_SIGNAL as usize {
        return Err(refuse(format!(
            "process {pid}: {} sigactions (at most {MAX_SIGNAL})",
            p.sigactions.len()
        )));
    }
    if let Some((j, a)) = p
        .sigactions
        .iter()
        .enumerate()
        .find(|(_, a)| !(1..=MAX_SIGNAL).contains(&a.signal))
    {
        return Err(refuse(format!(
            "process {pid}: sigactions[{j}].signal = {}: not between 1 and {MAX_SIGNAL}",
            a.signal
        )));
    }
    if p.itimers.len() > 3 {
        return Err(refuse(format!(
            "process {pid}: {} itimers (there are 3)",
            p.itimers.len()
        )));
    }
    Ok(())
}

/// The mm fields, as PR_SET_MM_MAP will check them.
fn mm(p: &ProcessImage) -> Result<()> {
    let m = &p.mm;
    let fields = [
        ("start_code", m.start_code),
        ("end_code", m.end_code),
        ("start_data", m.start_data),
        ("end_data", m.end_data),
        ("start_brk", m.start_brk),
        ("brk", m.brk),
        ("start_stack", m.start_stack),
        ("arg_start", m.arg_start),
        ("arg_end", m.arg_end),
        ("env_start", m.env_start),
        ("env_end", m.env_end),
    ];
    if let Some((f, v)) = fields.iter().find(|(_, v)| *v >= USER_END) {
        return Err(refuse(format!(
            "process {}: mm.{f} = {v:#x}: outside user space (at or above {USER_END:#x})",
            p.pid
        )));
    }
    for (a, b) in [(0, 1), (2, 3), (4, 5), (7, 8), (9, 10)] {
        let ((fa, va), (fb, vb)) = (fields[a], fields[b]);
        if va > vb {
            return Err(refuse(format!(
                "process {}: mm.{fa} = {va:#x} is above mm.{fb} = {vb:#x}",
                p.pid
            )));
        }
    }
    if m.auxv.len() > MAX_AUXV || !m.auxv.len().is_multiple_of(2) {
        return Err(refuse(format!(
            "process {}: mm.auxv has {} words: not pairs, at most {MAX_AUXV} words",
            p.pid,
            m.auxv.len()
        )));
    }
    Ok(())
}

/// Each mapping whole, page-aligned, in user space, and apart from every other.
fn mappings(p: &ProcessImage) -> Result<()> {
    let pid = p.pid;
    if p.mappings.len() > MAX_MAPPINGS {
        return Err(refuse(format!(
            "process {pid}: {} mappings (at most {MAX_MAPPINGS})",
            p.mappings.len()
        )));
    }
    for (k, m) in p.mappings.iter().enumerate() {
        let at = format!("process {pid}: mappings[{k}] ({:#x}-{:#x})", m.start, m.end);
        if m.kind == MapKind::Vsyscall {
            if (m.start, m.end) != VSYSCALL {
                return Err(refuse(format!(
                    "{at}: a vsyscall mapping is at {:#x}-{:#x}",
                    VSYSCALL.0, VSYSCALL.1
                )));
            }
        } else {
            if m.start >= m.end {
                return Err(refuse(format!(
                    "{at}: start = {:#x} is not below end = {:#x}",
                    m.start, m.end
                )));
            }
            if let Some((f, v)) = [("start", m.start), ("end", m.end)]
                .into_iter()
                .find(|(_, v)| !v.is_multiple_of(PAGE))
            {
                return Err(refuse(format!(
                    "{at}: {f} = {v:#x} is not aligned to {PAGE_SIZE} bytes"
                )));
            }
            if m.end > USER_END {
                return Err(refuse(format!(
                    "{at}: end = {:#x}: outside user space (above {USER_END:#x})",
                    m.end
                )));
            }
        }
        if !m.offset.is_multiple_of(PAGE) {
            return Err(refuse(format!(
                "{at}: offset = {:#x} is not aligned to {PAGE_SIZE} bytes",
                m.offset
            )));
        }
        let pages = (m.end.saturating_sub(m.start)) / PAGE;
        if m.pages_saved > pages {
            return Err(refuse(format!(
                "{at}: pages_saved = {}: the mapping has {pages} pages",
                m.pages_saved
            )));
        }
        if let Some(&(s, e)) = m
            .lazy
            .iter()
            .find(|&&(s, e)| s >= e || s < m.start || e > m.end)
        {
            return Err(refuse(format!(
                "{at}: lazy run {s:#x}-{e:#x} is not a run inside the mapping"
            )));
        }
        if let Some(g) = m.ghost.filter(|g| !p.ghosts.iter().any(|x| x.inode == *g)) {
            return Err(refuse(format!(
                "{at}: ghost = {g}: no such file in the process's ghosts"
            )));
        }
    }
    let mut order: Vec<usize> = (0..p.mappings.len()).collect();
    order.sort_unstable_by_key(|&k| p.mappings[k].start);
    for w in order.windows(2) {
        let (a, b) = (&p.mappings[w[0]], &p.mappings[w[1]]);
        if a.end > b.start {
            return Err(refuse(format!(
                "process {pid}: mappings[{}] ({:#x}-{:#x}) overlaps mappings[{}] ({:#x}-{:#x})",
                w[0], a.start, a.end, w[1], b.start, b.end
            )));
        }
    }
    Ok(())
}

/// fd numbers in range and used once; what an fd refers to (an earlier fd, a pipe held by an
/// earlier process, a saved file) exists.
fn fds(
    i: usize,
    p: &ProcessImage,
    procs: &[ProcessImage],
    by_pid: &HashMap<i32, usize>,
) -> Result<()> {
    let pid = p.pid;
    let mut seen: HashSet<i32> = HashSet::with_capacity(p.fds.len());
    for (k, f) in p.fds.iter().enumerate() {
        let at = format!("process {pid}: fds[{k}]");
        if !(0..MAX_FD).contains(&f.fd) {
            return Err(refuse(format!(
                "{at}: fd = {}: not between 0 and {}",
                f.fd,
                MAX_FD - 1
            )));
        }
        if let Some(s) = f.same_as.filter(|s| !seen.contains(s)) {
            return Err(refuse(format!(
                "{at} (fd {}): same_as = {s}: not an fd listed before it",
                f.fd
            )));
        }
        if !seen.insert(f.fd) {
            return Err(refuse(format!("{at}: fd = {}: listed twice", f.fd)));
        }
        if let Some((hp, hfd)) = f.shares {
            // Taken from that process with pidfd_getfd: it must be one of the image's,
            // restored before, and the fd one of its own naming the same file.
            let holder = by_pid.get(&hp).filter(|&&h| h < i).map(|&h| &procs[h]);
            let held =
                holder.is_some_and(|h| h.fds.iter().any(|x| x.fd == hfd && x.path == f.path));
            if !held {
                return Err(refuse(format!(
                    "{at} (fd {}): shares = ({hp}, {hfd}): not an fd of {} in a process before \
                     it in the image",
                    f.fd, f.path
                )));
            }
        }
        if let (Some(inode), Some((hp, hfd))) = (f.pipe, f.pipe_holder) {
            let holder = by_pid.get(&hp).filter(|&&h| h < i).map(|&h| &procs[h]);
            let held =
                holder.is_some_and(|h| h.fds.iter().any(|x| x.fd == hfd && x.pipe == Some(inode)));
            if !held {
                return Err(refuse(format!(
                    "{at} (fd {}): pipe_holder = ({hp}, {hfd}): not an fd of pipe {inode} in a \
                     process before it in the image",
                    f.fd
                )));
            }
        } else if let Some(inode) = f.pipe {
            if !p.pipes.iter().any(|x| x.inode == inode) {
                return Err(refuse(format!(
                    "{at} (fd {}): pipe = {inode}: not in the process's pipes",
                    f.fd
                )));
            }
        }
        if let Some(g) = f.ghost.filter(|g| !p.ghosts.iter().any(|x| x.inode == *g)) {
            return Err(refuse(format!(
                "{at} (fd {}): ghost = {g}: no such file in the process's ghosts",
                f.fd
            )));
        }
    }
    Ok(())
}

/// Contents carried in the records: within the limits the dump keeps to.
fn contents(p: &ProcessImage) -> Result<()> {
    let pid = p.pid;
    for (k, g) in p.ghosts.iter().enumerate() {
        // The file may have grown between its size and its reading, never by much.
        if g.size > GHOST_MAX || g.data.len() as u64 > 4 * GHOST_MAX {
            return Err(refuse(format!(
                "process {pid}: ghosts[{k}] (inode {}): size = {}, {} hex digits of data: \
                 above the limit of {GHOST_MAX} bytes",
                g.inode,
                g.size,
                g.data.len()
            )));
        }
    }
    for (list, what) in [(&p.pipes, "pipes"), (&p.fifos, "fifos")] {
        for (k, x) in list.iter().enumerate() {
            if x.capacity > MAX_PIPE || x.data.len() as u64 / 2 > x.capacity {
                return Err(refuse(format!(
                    "process {pid}: {what}[{k}] (inode {}): capacity = {}, {} hex digits of \
                     data: more than a pipe holds",
                    x.inode,
                    x.capacity,
                    x.data.len()
                )));
            }
        }
    }
    Ok(())
}

/// The page index against the records: the blocks of each process (in process order, as many
/// pages as its mappings' `pages_saved`) lie inside its mappings, and none are left over.
pub fn pages(procs: &[ProcessImage], blocks: &[BlockIndex]) -> Result<()> {
    if let Some((j, b)) = blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.data_len == 0 || !b.data_len.is_multiple_of(PAGE))
    {
        return Err(refuse(format!(
            "page block {j} at {:#x}: data_len = {}: not a positive multiple of {PAGE_SIZE}",
            b.vaddr, b.data_len
        )));
    }
    let mut next = 0usize;
    for p in procs {
        let budget = p
            .mappings
            .iter()
            .fold(0u64, |s, m| s.saturating_add(m.pages_saved));
        let mut ranges: Vec<(u64, u64)> = p.mappings.iter().map(|m| (m.start, m.end)).collect();
        ranges.sort_unstable();
        let mut n = 0u64;
        while n < budget {
            let Some(b) = blocks.get(next) else {
                return Err(refuse(format!(
                    "process {}: its mappings' pages_saved add up to {budget} pages, but \
                     pages.fimg ends after {n} of them",
                    p.pid
                )));
            };
            let end = b.vaddr.saturating_add(b.data_len);
            if end > USER_END || !covered(&ranges, b.vaddr, end) {
                return Err(refuse(format!(
                    "process {}: page block {next} at {:#x}-{end:#x} lies outside its saved \
                     mappings",
                    p.pid, b.vaddr
                )));
            }
            n += b.data_len / PAGE;
            next += 1;
        }
        if n != budget {
            return Err(refuse(format!(
                "process {}: its mappings' pages_saved add up to {budget} pages, but its page \
                 blocks hold {n}",
                p.pid
            )));
        }
    }
    if next < blocks.len() {
        return Err(refuse(format!(
            "pages.fimg holds {} page blocks past the pages of the last process (page block \
             {next} at {:#x})",
            blocks.len() - next,
            blocks[next].vaddr
        )));
    }
    Ok(())
}

/// Is [s, e) inside the union of `ranges` (sorted, apart from each other)?
fn covered(ranges: &[(u64, u64)], s: u64, e: u64) -> bool {
    let mut i = ranges.partition_point(|r| r.0 <= s);
    if i == 0 {
        return false;
    }
    i -= 1;
    let mut at = s;
    while at < e {
        match ranges.get(i) {
            Some(&(rs, re)) if rs <= at && at < re => at = re,
            _ => return false,
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::covered;

    #[test]
    fn covered_joins_adjacent_ranges_only() {
        let r = [(0x1000, 0x3000), (0x3000, 0x4000), (0x6000, 0x8000)];
        assert!(covered(&r, 0x1000, 0x2000));
        assert!(covered(&r, 0x2000, 0x4000));
        assert!(covered(&r, 0x6000, 0x8000));
        assert!(!covered(&r, 0x0, 0x1000));
        assert!(!covered(&r, 0x3000, 0x5000));
        assert!(!covered(&r, 0x5000, 0x6000));
        assert!(!covered(&r, 0x7000, 0x9000));
        assert!(!covered(&[], 0x1000, 0x2000));
    }
}
