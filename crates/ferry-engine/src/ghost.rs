//! Files without a name: unlinked files and memfds. Their contents travel in the image; on
//! restore they are recreated as a memfd (or an O_TMPFILE file in the same directory) before
//! the mappings and fds that use them.

use crate::ctx::Target;
use crate::schema::{GhostFile, GHOST_MAX};
use crate::{EngineError, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;

/// Is this /proc link target a file without a name?
pub fn is_ghost(path: &str) -> bool {
    path.ends_with(" (deleted)") || path.starts_with("/memfd:")
}

/// Record the file behind `proc_path` (a /proc fd or map_files link) once; returns its inode.
pub fn dump(pid: i32, proc_path: &str, shown: &str, ghosts: &mut Vec<GhostFile>) -> Result<u64> {
    let meta = std::fs::metadata(proc_path)
        .map_err(|e| EngineError::Failed(format!("{proc_path}: {e}")))?;
    let inode = meta.ino();
    if ghosts.iter().any(|g| g.inode == inode) {
        return Ok(inode);
    }
    if meta.len() > GHOST_MAX {
        return Err(EngineError::Unsupported {
            pid,
            what: format!(
                "{shown} is an unlinked file of {} bytes (the limit is {GHOST_MAX})",
                meta.len()
            ),
        });
    }
    let mut data = Vec::new();
    std::fs::File::open(proc_path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| EngineError::Failed(format!("reading {shown} through {proc_path}: {e}")))?;
    let name = shown.trim_end_matches(" (deleted)");
    let memfd = name.starts_with("/memfd:");
    ghosts.push(GhostFile {
        inode,
        memfd,
        name: name.trim_start_matches("/memfd:").to_string(),
        size: meta.len(),
        data: crate::hexcodec::hex(&data),
    });
    Ok(inode)
}

/// Recreate every ghost file in the target, above fd `base`; returns inode -> fd.
pub fn restore(t: &mut Target, ghosts: &[GhostFile], base: u64) -> Result<HashMap<u64, u64>> {
    let mut out = HashMap::new();
    for g in ghosts {
        let fd = if g.memfd {
            let p = t.put_path(&g.name)?;
            t.sys(
                &format!("memfd_create({})", g.name),
                libc::SYS_memfd_create,
                [p, 0, 0, 0, 0, 0],
            )?
        } else {
            let dir = std::path::Path::new(&g.name)
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "/tmp".into());
            let p = t.put_path(&dir)?;
            let flags = (libc::O_TMPFILE | libc::O_RDWR) as u64;
            match t.sys(
                &format!("O_TMPFILE in {dir}"),
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, p, flags, 0o600, 0, 0],
            ) {
                Ok(fd) => fd,
                Err(_) => {
                    let p = t.put_path("ferry-ghost")?;
                    t.sys("memfd_create", libc::SYS_memfd_create, [p, 0, 0, 0, 0, 0])?
                }
            }
        };
        let data = crate::hexcodec::unhex(&g.data, "ghost file data")?;
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{}/fd/{fd}", t.pid))
                .map_err(|e| EngineError::Failed(format!("reopening the new {}: {e}", g.name)))?;
            f.write_all(&data)
                .map_err(|e| EngineError::Failed(format!("filling {}: {e}", g.name)))?;
        }
        t.sys("ftruncate", libc::SYS_ftruncate, [fd, g.size, 0, 0, 0, 0])?;
        let hi = t.sys(
            "fcntl(F_DUPFD)",
            libc::SYS_fcntl,
            [fd, libc::F_DUPFD_CLOEXEC as u64, base, 0, 0, 0],
        )?;
        t.sys("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        out.insert(g.inode, hi);
    }
    Ok(out)
}
