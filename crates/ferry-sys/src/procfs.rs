//! Small, strict parsers for the `/proc` files Ferry needs.

use crate::error::{Error, Result};
use std::fs;
use std::io;
use std::path::PathBuf;

/// What backs a mapping, as `/proc/PID/maps` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapKind {
    /// A file; `deleted` when the file was unlinked after mapping.
    File {
        path: PathBuf,
        deleted: bool,
    },
    Anonymous,
    Heap,
    /// The main thread's stack.
    Stack,
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
    /// Any other bracketed or unusual name (`[anon:...]`, `[uprobes]`, ...).
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub kind: MapKind,
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
    /// A short name for reports: the file's base name or the bracketed kind.
    pub fn name(&self) -> String {
        match &self.kind {
            MapKind::File { path, deleted } => {
                let base = path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string());
                if *deleted {
                    format!("{base} (deleted)")
                } else {
                    base
                }
            }
            MapKind::Anonymous => "[anon]".into(),
            MapKind::Heap => "[heap]".into(),
            MapKind::Stack => "[stack]".into(),
            MapKind::Vdso => "[vdso]".into(),
            MapKind::Vvar => "[vvar]".into(),
            MapKind::VvarVclock => "[vvar_vclock]".into(),
            MapKind::Vsyscall => "[vsyscall]".into(),
            MapKind::Other(s) => s.clone(),
        }
    }
    pub fn file_path(&self) -> Option<&PathBuf> {
        match &self.kind {
            MapKind::File { path, .. } => Some(path),
            _ => None,
        }
    }
}

fn read_proc(pid: i32, file: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{file}");
    fs::read_to_string(&path).map_err(|e| proc_err(pid, &path, e))
}

fn proc_err(pid: i32, path: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NoSuchProcess(pid),
        io::ErrorKind::PermissionDenied => Error::Permission {
            pid,
            what: format!("cannot read {path}"),
        },
        _ => Error::io(format!("reading {path}"), e),
    }
}

/// Parse the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_map_line)
        .collect()
}

fn parse_map_line(line: &str) -> Result<Mapping> {
    let bad = || Error::Parse(format!("malformed maps line: {line:?}"));
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(bad)?;
    let perms = it.next().ok_or_else(bad)?.as_bytes();
    let offset = it.next().ok_or_else(bad)?;
    let _dev = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?;
    let name = it.next().unwrap_or("").trim_start();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    if perms.len() < 4 {
        return Err(bad());
    }
    let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| bad());
    let kind = match name {
        "" => MapKind::Anonymous,
        "[heap]" => MapKind::Heap,
        "[stack]" => MapKind::Stack,
        "[vdso]" => MapKind::Vdso,
        "[vvar]" => MapKind::Vvar,
        "[vvar_vclock]" => MapKind::VvarVclock,
        "[vsyscall]" => MapKind::Vsyscall,
        n if n.starts_with('/') => match n.strip_suffix(" (deleted)") {
            Some(p) => MapKind::File {
                path: PathBuf::from(p),
                deleted: true,
            },
            None => MapKind::File {
                path: PathBuf::from(n),
                deleted: false,
            },
        },
        n => MapKind::Other(n.to_string()),
    };
    Ok(Mapping {
        start: hex(s)?,
        end: hex(e)?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        inode: inode.parse().map_err(|_| bad())?,
        kind,
    })
}

pub fn read_maps(pid: i32) -> Result<Vec<Mapping>> {
    parse_maps(&read_proc(pid, "maps")?)
}

/// What `/proc/PID/smaps` adds to a mapping: its VmFlags (two-letter codes such as `dc`, `wf`,
/// `hg`, `ht`), its kernel page size and its transparent huge pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmapsEntry {
    pub start: u64,
    pub end: u64,
    pub vm_flags: Vec<String>,
    pub kernel_page_kb: u64,
    pub anon_huge_kb: u64,
    /// Resident memory of the mapping (smaps Rss), KiB.
    pub rss_kb: u64,
}

/// Parse the text of `/proc/PID/smaps`.
pub fn parse_smaps(text: &str) -> Result<Vec<SmapsEntry>> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        // A mapping's header starts with its range; field lines with a capitalised name.
        if k.starts_with(|c: char| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && k.contains('-')
        {
            let m = parse_map_line(line)?;
            out.push(SmapsEntry {
                start: m.start,
                end: m.end,
                kernel_page_kb: 4,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else {
            return Err(Error::Parse(format!(
                "smaps field before any mapping: {line:?}"
            )));
        };
        let kb = || {
            v.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .map_err(|_| Error::Parse(format!("malformed smaps line: {line:?}")))
        };
        match k {
            "VmFlags" => cur.vm_flags = v.split_whitespace().map(str::to_string).collect(),
            "KernelPageSize" => cur.kernel_page_kb = kb()?,
            "AnonHugePages" => cur.anon_huge_kb = kb()?,
            "Rss" => cur.rss_kb = kb()?,
            _ => {}
        }
    }
    Ok(out)
}

pub fn read_smaps(pid: i32) -> Result<Vec<SmapsEntry>> {
    parse_smaps(&read_proc(pid, "smaps")?)
}

/// The fields of `/proc/PID/status` that Ferry acts on.
#[derive(Debug, Clone)]
pub struct Status {
    pub name: String,
    /// The state letter: R, S, D, T, t, Z, X, ...
    pub state: char,
    pub tracer_pid: i32,
    /// Signals with a handler installed (bit n-1 for signal n).
    pub sig_caught: u64,
    pub threads: u32,
}

pub fn read_status(pid: i32) -> Result<Status> {
    let text = read_proc(pid, "status")?;
    let mut st = Status {
        name: String::new(),
        state: '?',
        tracer_pid: 0,
        sig_caught: 0,
        threads: 0,
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "Name" => st.name = v.to_string(),
            "State" => st.state = v.chars().next().unwrap_or('?'),
            "TracerPid" => st.tracer_pid = v.parse().unwrap_or(0),
            "SigCgt" => st.sig_caught = u64::from_str_radix(v, 16).unwrap_or(0),
            "Threads" => st.threads = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(st)
}

/// Thread ids of a process, sorted.
pub fn list_threads(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    let dir = fs::read_dir(&path).map_err(|e| proc_err(pid, &path, e))?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The auxiliary vector as (type, value) pairs.
pub fn read_auxv(pid: i32) -> Result<Vec<(u64, u64)>> {
    let path = format!("/proc/{pid}/auxv");
    let raw = fs::read(&path).map_err(|e| proc_err(pid, &path, e))?;
    Ok(raw
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_ne_bytes(c[..8].try_into().unwrap()),
                u64::from_ne_bytes(c[8..].try_into().unwrap()),
            )
        })
        .take_while(|&(t, _)| t != 0)
        .collect())
}

pub fn read_exe(pid: i32) -> Result<PathBuf> {
    let path = format!("/proc/{pid}/exe");
    fs::read_link(&path).map_err(|e| proc_err(pid, &path, e))
}

/// Check that a process can be inspected: it exists, is not a zombie and is not traced.
pub fn check_inspectable(pid: i32) -> Result<Status> {
    if pid <= 0 {
        return Err(Error::NoSuchProcess(pid));
    }
    let st = read_status(pid)?;
    if st.state == 'Z' || st.state == 'X' {
        // The leader's state is the process's: with other threads alive, only it has gone.
        let alive = list_threads(pid).unwrap_or_default().into_iter().any(|t| {
            t != pid
                && std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with(['Z', 'X'])))
                    .unwrap_or(false)
        });
        return Err(if alive {
            Error::ZombieLeader(pid)
        } else {
            Error::Zombie(pid)
        });
    }
    if st.tracer_pid != 0 {
        return Err(Error::AlreadyTraced {
            pid,
            tracer: st.tracer_pid,
        });
    }
    Ok(st)
}

/// The children of every thread of process `pid` (from /proc/PID/task/*/children).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for tid in list_threads(pid).unwrap_or_default() {
        let p = format!("/proc/{pid}/task/{tid}/children");
        if let Ok(s) = std::fs::read_to_string(p) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "55d0c0a00000-55d0c0a21000 r-xp 00002000 fe:00 1234   /usr/bin/x y\n\
                    7ffd1000-7ffd2000 rw-p 00000000 00:00 0                  [stack]\n\
                    7f0000000000-7f0000001000 rwxs 00000000 00:01 99 /memfd:jit (deleted)\n\
                    7f0000002000-7f0000003000 ---p 00000000 00:00 0 \n";
        let m = parse_maps(text).unwrap();
        assert_eq!(m.len(), 4);
        assert!(m[0].exec && !m[0].write && !m[0].shared);
        assert_eq!(m[0].offset, 0x2000);
        assert_eq!(m[0].name(), "x y");
        assert_eq!(m[1].kind, MapKind::Stack);
        assert!(m[2].shared && m[2].exec);
        assert_eq!(m[2].name(), "memfd:jit (deleted)");
        assert_eq!(m[3].kind, MapKind::Anonymous);
        assert!(!m[3].read);
    }

    #[test]
    fn parses_smaps() {
        let text =
            "7f7e27400000-7f7e27800000 rw-p 00000000 00:11 135451     /anon_hugepage (deleted)\n\
                    Size:               4096 kB\n\
                    KernelPageSize:     2048 kB\n\
                    AnonHugePages:         0 kB\n\
                    VmFlags: rd wr mr mw me de ht \n\
                    7f7e27800000-7f7e27c00000 rw-p 00000000 00:00 0 \n\
                    KernelPageSize:        4 kB\n\
                    AnonHugePages:      4096 kB\n\
                    VmFlags: rd wr mr mw me ac hg\n";
        let s = parse_smaps(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kernel_page_kb, 2048);
        assert!(s[0].vm_flags.iter().any(|f| f == "ht"));
        assert_eq!((s[1].start, s[1].anon_huge_kb), (0x7f7e27800000, 4096));
        assert_eq!(s[1].vm_flags.last().map(String::as_str), Some("hg"));
        let me = read_smaps(std::process::id() as i32).unwrap();
        assert!(me.iter().any(|e| e.vm_flags.iter().any(|f| f == "rd")));
        assert!(parse_smaps("VmFlags: rd\n").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps("zzz r-xp").is_err());
        assert!(parse_maps("1000-2000 r 0 0:0 0").is_err());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let maps = read_maps(me).unwrap();
        assert!(maps.iter().any(|m| m.exec));
        assert!(list_threads(me).unwrap().contains(&me));
        assert!(read_auxv(me)
            .unwrap()
            .iter()
            .any(|&(t, _)| t == libc::AT_ENTRY));
        assert!(matches!(
            read_status(i32::MAX),
            Err(Error::NoSuchProcess(_))
        ));
    }
}
