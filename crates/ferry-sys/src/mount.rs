//! Mount tables and mount namespaces: `/proc/PID/mountinfo` parsing, mount(2), and running
//! code on a thread inside another process's mount namespace.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::fd::AsRawFd;

/// One line of `/proc/PID/mountinfo` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the file system.
    pub dev: String,
    /// The directory of the file system mounted here (`/` unless a bind of a part of it).
    pub root: String,
    /// The mount point, relative to the reading process's root.
    pub mount_point: String,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `nodev`, `noexec`, `relatime`, ...
    pub options: Vec<String>,
    /// Optional fields: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    pub optional: Vec<String>,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Shared with or receiving from another mount (not private).
    pub fn propagates(&self) -> bool {
        self.optional
            .iter()
            .any(|o| o.starts_with("shared:") || o.starts_with("master:"))
    }

    /// The per-mount options as MS_* flags for mount(2) (atime mode included).
    pub fn flags(&self) -> u64 {
        mount_flags(&self.options)
    }
}

/// MS_* flags for per-mount options as mountinfo prints them. An atime mode that is neither
/// `noatime` nor `relatime` is `strictatime`.
pub fn mount_flags(options: &[String]) -> u64 {
    let mut f = 0u64;
    for o in options {
        f |= match o.as_str() {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "nosymfollow" => MS_NOSYMFOLLOW,
            _ => 0,
        };
    }
    if f & (libc::MS_NOATIME | libc::MS_RELATIME) == 0 {
        f |= libc::MS_STRICTATIME;
    }
    f
}

const MS_NOSYMFOLLOW: libc::c_ulong = 256;

/// Undo mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + (c - b'0') as u32);
                if v <= 255 {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    let mut v = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || Error::Parse(format!("mountinfo: malformed line {line:?}"));
        let (head, tail) = line.split_once(" - ").ok_or_else(bad)?;
        let h: Vec<&str> = head.split(' ').collect();
        let t: Vec<&str> = tail.split(' ').collect();
        if h.len() < 6 || t.len() < 3 {
            return Err(bad());
        }
        v.push(MountInfo {
            id: h[0].parse().map_err(|_| bad())?,
            parent: h[1].parse().map_err(|_| bad())?,
            dev: h[2].to_string(),
            root: unescape(h[3]),
            mount_point: unescape(h[4]),
            options: h[5].split(',').map(str::to_string).collect(),
            optional: h[6..].iter().map(|s| s.to_string()).collect(),
            fstype: unescape(t[0]),
            source: unescape(t[1]),
            super_options: t[2].split(',').map(unescape).collect(),
        });
    }
    Ok(v)
}

/// The mount table of process `pid` ("self" for ours), paths relative to its root.
pub fn read_mountinfo(pid: &str) -> Result<Vec<MountInfo>> {
    let path = format!("/proc/{pid}/mountinfo");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    parse_mountinfo(&text)
}

fn cstr(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Parse(format!("{what} {s:?} holds a NUL byte")))
}

/// mount(2); the error names the source, mount point, type, flags and options.
pub fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> Result<()> {
    let src = source.map(|s| cstr(s, "mount source")).transpose()?;
    let tgt = cstr(target, "mount point")?;
    let ty = fstype.map(|s| cstr(s, "file system type")).transpose()?;
    let dat = data.map(|s| cstr(s, "mount options")).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            p(&src),
            tgt.as_ptr(),
            p(&ty),
            flags,
            p(&dat) as *const libc::c_void,
        )
    };
    if rc < 0 {
        return Err(Error::io(
            format!(
                "mount of {} on {target} (type {}, flags {flags:#x}, options {:?})",
                source.unwrap_or("-"),
                fstype.unwrap_or("-"),
                data.unwrap_or("")
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Run `f` on a thread inside the mount namespace of process `pid` (its root and working
/// directory become that namespace's root). The thread first stops sharing its file system
/// attributes with the rest of Ferry, which setns(CLONE_NEWNS) requires; Ferry's other
/// threads stay where they are.
pub fn in_mntns<R: Send, E: Send + From<Error>>(
    pid: i32,
    f: impl FnOnce() -> std::result::Result<R, E> + Send,
) -> std::result::Result<R, E> {
    let path = format!("/proc/{pid}/ns/mnt");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns =
                std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {path}"), e))?;
            // SAFETY: unshare takes a flag; it changes only this thread's file system
            // attributes (root, working directory, umask).
            let rc = unsafe { libc::unshare(libc::CLONE_FS) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::io("unshare(CLONE_FS)", e).into());
            }
            // SAFETY: setns takes an fd and a flag; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::io(format!("entering the mount namespace {path}"), e).into());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Parse("a mount namespace worker thread panicked".into()).into())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let t =
            "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 119 96 0:43 / /tmp/m ro,nosuid,nodev,relatime - tmpfs x rw,size=1024k,mode=700\n";
        let v = parse_mountinfo(t).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].mount_point, "/mnt 2");
        assert_eq!(v[0].root, "/mnt1");
        assert_eq!(v[0].optional, vec!["master:1"]);
        assert!(v[0].propagates());
        assert_eq!(v[0].flags(), libc::MS_NOATIME);
        assert_eq!(v[2].fstype, "tmpfs");
        assert_eq!(v[2].source, "x");
        assert!(!v[2].propagates());
        assert_eq!(
            v[2].flags(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RELATIME
        );
        assert_eq!(v[2].super_options, vec!["rw", "size=1024k", "mode=700"]);
        assert_eq!(mount_flags(&["rw".to_string()]), libc::MS_STRICTATIME);
        assert!(parse_mountinfo("garbage").is_err());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\134c\\011"), "a b\\c\t");
        assert_eq!(unescape("trail\\"), "trail\\");
        assert_eq!(unescape("\\04"), "\\04");
    }
}
