//! File descriptors: regular files (path, flags, offset, O_APPEND), directories and character
//! devices such as /dev/null. Other kinds stop the dump with an error naming the fd.

use crate::ctx::Target;
use crate::schema::FdImage;
use crate::{EngineError, Result};
use std::os::unix::fs::MetadataExt;

pub fn dump(pid: i32) -> Result<Vec<FdImage>> {
    let dir = format!("/proc/{pid}/fd");
    let rd =
        std::fs::read_dir(&dir).map_err(|e| EngineError::Failed(format!("reading {dir}: {e}")))?;
    let mut fds: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    let mut out = Vec::new();
    for fd in fds {
        let link = std::fs::read_link(format!("{dir}/{fd}"))
            .map_err(|e| EngineError::Failed(format!("process {pid} fd {fd}: {e}")))?;
        let path = link.display().to_string();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = u32::from_str_radix(&get("flags:"), 8).unwrap_or(0);
        let pos = get("pos:").parse().unwrap_or(0);
        let unsupported = |what: &str| EngineError::Unsupported {
            pid,
            what: format!("fd {fd} is {what} ({path}), which this version cannot dump"),
        };
        if !path.starts_with('/') {
            let kind = path
                .split(':')
                .next()
                .unwrap_or("an unknown object")
                .to_string();
            return Err(unsupported(&format!("a {kind}")));
        }
        if path.ends_with(" (deleted)") {
            return Err(unsupported("an unlinked file"));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| EngineError::Failed(format!("process {pid} fd {fd}: {path}: {e}")))?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !(ft.is_file() || ft.is_dir() || ft.is_char_device()) {
            return Err(unsupported(
                "neither a regular file, a directory nor a character device",
            ));
        }
        out.push(FdImage {
            fd,
            path,
            flags,
            pos,
            size: meta.len(),
            mode: meta.mode(),
        });
    }
    Ok(out)
}

/// Check that the files are still what they were, before anything is created.
pub fn check(fds: &[FdImage]) -> Result<()> {
    for f in fds {
        let m = std::fs::metadata(&f.path).map_err(|e| {
            EngineError::Failed(format!("fd {}: {} cannot be reopened: {e}", f.fd, f.path))
        })?;
        if m.mode() & libc::S_IFMT != f.mode & libc::S_IFMT {
            return Err(EngineError::Failed(format!(
                "fd {}: {} changed type since the dump",
                f.fd, f.path
            )));
        }
        if m.is_file() && m.len() < f.pos && f.flags & libc::O_APPEND as u32 == 0 {
            return Err(EngineError::Failed(format!(
                "fd {}: {} is now shorter ({} bytes) than the saved offset {}",
                f.fd,
                f.path,
                m.len(),
                f.pos
            )));
        }
    }
    Ok(())
}

pub fn restore(t: &mut Target, fds: &[FdImage]) -> Result<()> {
    // The stub inherited the restorer's fds: none of them belongs to the process.
    t.sys(
        "close_range",
        libc::SYS_close_range,
        [0, u32::MAX as u64, 0, 0, 0, 0],
    )?;
    for f in fds {
        let p = t.put_path(&f.path)?;
        let flags = f.flags & !((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32);
        let fd = t.sys(
            &format!("open of {} for fd {}", f.path, f.fd),
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, p, flags as u64, 0, 0, 0],
        )?;
        if f.pos != 0 {
            t.sys(
                &format!("lseek on fd {}", f.fd),
                libc::SYS_lseek,
                [fd, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
            )?;
        }
        if fd != f.fd as u64 {
            let cloexec = if f.flags & libc::O_CLOEXEC as u32 != 0 {
                libc::O_CLOEXEC
            } else {
                0
            };
            t.sys(
                &format!("dup3 to fd {}", f.fd),
                libc::SYS_dup3,
                [fd, f.fd as u64, cloexec as u64, 0, 0, 0],
            )?;
            t.sys("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}
