//! File descriptors: regular files (path, flags, offset, O_APPEND), directories, character
//! devices such as /dev/null, pipes with their buffered bytes, and fds that share one open
//! file description (kcmp). Other kinds stop the dump with an error naming the fd.

use crate::ctx::Target;
use crate::schema::{FdImage, PipeImage};
use crate::{EngineError, Result};
use std::os::unix::fs::MetadataExt;

/// Pipes and FIFOs already held by processes dumped before.
#[derive(Debug, Default)]
pub struct Seen {
    /// (inode, pid, fd)
    pub pipes: Vec<(u64, i32, i32)>,
    /// (device, inode)
    pub fifos: Vec<(u64, u64)>,
    /// Fds named by a path: (path, pid, fd), to find descriptions shared across processes.
    pub files: Vec<(String, i32, i32)>,
}

/// The fds of a process, the pipes and the FIFOs whose data it carries, its sockets.
pub type Dumped = (
    Vec<FdImage>,
    Vec<PipeImage>,
    Vec<PipeImage>,
    Vec<crate::sockets::SocketImage>,
);

/// Everything about the fds of process `pid`.
pub fn dump(
    pid: i32,
    seen: &mut Seen,
    ghosts: &mut Vec<crate::schema::GhostFile>,
    socks: &mut crate::sockets::DumpState,
    tree: &[i32],
) -> Result<Dumped> {
    let known = &mut seen.pipes;
    let dir = format!("/proc/{pid}/fd");
    let rd =
        std::fs::read_dir(&dir).map_err(|e| EngineError::Failed(format!("reading {dir}: {e}")))?;
    let mut fds: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    let mut out: Vec<FdImage> = Vec::new();
    let mut pipes: Vec<PipeImage> = Vec::new();
    let mut sockets = Vec::new();
    let mut fifos: Vec<PipeImage> = Vec::new();
    // In a mount namespace of its own: the mounts of it, to tell the fds opened elsewhere.
    let own_mounts: Option<Vec<u32>> = if crate::namespaces::own_mntns(pid)? {
        Some(
            ferry_sys::mount::read_mountinfo(&pid.to_string())?
                .iter()
                .map(|m| m.id)
                .collect(),
        )
    } else {
        None
    };
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
        let mut img = FdImage {
            fd,
            path: path.clone(),
            same_as: None,
            shares: None,
            pipe: None,
            pipe_holder: None,
            ghost: None,
            fifo: None,
            eventfd: None,
            socket: None,
            timerfd: None,
            signalfd: None,
            inotify: None,
            epoll: None,
            flags,
            pos,
            size: 0,
            mode: 0,
            outside_mntns: false,
        };
        // Shares a description with an earlier fd: only the link is needed. Only fds naming
        // the same object can (kcmp for each pair would be quadratic in the fd count).
        let mut shared = None;
        for prev in out.iter().filter(|p| p.same_as.is_none() && p.path == path) {
            if ferry_sys::files::same_file(pid, prev.fd, fd)? {
                shared = Some(prev.fd);
                break;
            }
        }
        if let Some(p) = shared {
            img.same_as = Some(p);
            out.push(img);
            continue;
        }
        // Shares a description with an fd of a process dumped before (a parent's, inherited).
        if path.starts_with('/') {
            let mut across = None;
            for (_, hp, hfd) in seen
                .files
                .iter()
                .filter(|(p, hp, _)| *p == path && *hp != pid)
            {
                if ferry_sys::files::same_file_across(*hp, *hfd, pid, fd)? {
                    across = Some((*hp, *hfd));
                    break;
                }
            }
            if across.is_some() {
                img.shares = across;
                out.push(img);
                continue;
            }
            seen.files.push((path.clone(), pid, fd));
        }
        if let Some(inode) = path
            .strip_prefix("pipe:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            let inode: u64 = inode
                .parse()
                .map_err(|_| unsupported("a pipe with an odd name"))?;
            if let Some(&(_, hp, hfd)) = known.iter().find(|k| k.0 == inode && k.1 != pid) {
                img.pipe_holder = Some((hp, hfd));
            } else if !pipes.iter().any(|p| p.inode == inode) {
                known.push((inode, pid, fd));
                let (data, capacity) = ferry_sys::files::pipe_peek(pid, fd)?;
                pipes.push(PipeImage {
                    inode,
                    capacity: capacity as u64,
                    data: crate::hexcodec::hex(&data),
                });
            }
            img.pipe = Some(inode);
            out.push(img);
            continue;
        }
        if let Some(inode) = path
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
        {
            if let Some(s) = crate::sockets::dump(socks, pid, fd, inode, flags, tree)? {
                sockets.push(s);
            }
            // Unix sockets found in flight in its queue, held by no process of the tree.
            sockets.append(&mut socks.flight_socks);
            img.socket = Some(inode);
            out.push(img);
            continue;
        }
        match path.as_str() {
            "anon_inode:[timerfd]" => img.timerfd = Some(crate::evfds::dump_timerfd(&info)),
            "anon_inode:[signalfd]" => img.signalfd = Some(crate::evfds::dump_signalfd(&info)),
            "anon_inode:inotify" => img.inotify = Some(crate::evfds::dump_inotify(pid, fd, &info)?),
            "anon_inode:[eventpoll]" => img.epoll = Some(crate::evfds::dump_epoll(pid, fd, &info)?),
            _ => {}
        }
        if !img.by_path() {
            out.push(img);
            continue;
        }
        if path == "anon_inode:[eventfd]" {
            // The kernel prints the counter in hex.
            let count = u64::from_str_radix(&get("eventfd-count:"), 16).unwrap_or(0);
            let sem = get("eventfd-semaphore:") == "1";
            img.eventfd = Some((count, sem));
            out.push(img);
            continue;
        }
        if !path.starts_with('/') {
            let kind = match path.as_str() {
                "anon_inode:[io_uring]" => "an io_uring instance".to_string(),
                "anon_inode:[pidfd]" => "a pidfd".to_string(),
                "anon_inode:[fanotify]" => "a fanotify instance".to_string(),
                "anon_inode:[perf_event]" => "a perf event".to_string(),
                "anon_inode:bpf-map" | "anon_inode:bpf-prog" => "a BPF object".to_string(),
                p => format!(
                    "an object of kind {}",
                    p.split(':').next().unwrap_or("unknown")
                ),
            };
            return Err(unsupported(&kind));
        }
        if crate::ghost::is_ghost(&path) {
            img.ghost = Some(crate::ghost::dump(
                pid,
                &format!("{dir}/{fd}"),
                &path,
                ghosts,
            )?);
            out.push(img);
            continue;
        }
        // Through /proc: the path may lie in a mount namespace of the process's own.
        let meta = std::fs::metadata(format!("{dir}/{fd}"))
            .map_err(|e| EngineError::Failed(format!("process {pid} fd {fd}: {path}: {e}")))?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        // A terminal cannot be reopened as it was: its controlling-terminal role, its line
        // settings and its other end belong to someone else.
        if ft.is_char_device()
            && (path.starts_with("/dev/pts/")
                || path == "/dev/ptmx"
                || path == "/dev/tty"
                || path.starts_with("/dev/tty")
                || path.starts_with("/dev/console"))
        {
            return Err(unsupported(
                "a terminal; run the workload with its standard streams redirected (for \
                 example under nohup or setsid with files or pipes) to move it",
            ));
        }
        if ft.is_fifo() {
            // Its buffered bytes are saved once, by the first process of the tree holding it.
            let key = (meta.dev(), meta.ino());
            if !seen.fifos.contains(&key) {
                seen.fifos.push(key);
                let (data, capacity) = ferry_sys::files::pipe_peek(pid, fd)?;
                fifos.push(PipeImage {
                    inode: meta.ino(),
                    capacity: capacity as u64,
                    data: crate::hexcodec::hex(&data),
                });
            }
            img.fifo = Some(meta.ino());
            img.mode = meta.mode();
            out.push(img);
            continue;
        }
        if !(ft.is_file() || ft.is_dir() || ft.is_char_device()) {
            return Err(unsupported(
                "neither a regular file, a directory, a FIFO nor a character device",
            ));
        }
        img.size = meta.len();
        img.mode = meta.mode();
        if let Some(ids) = &own_mounts {
            let mnt: Option<u32> = get("mnt_id:").parse().ok();
            img.outside_mntns = mnt.is_some_and(|m| !ids.contains(&m));
        }
        out.push(img);
    }
    Ok((out, pipes, fifos, sockets))
}

/// Check that the files are still what they were, before anything is created.
/// `allow_changed`: accept regular files whose size or permissions changed since the dump.
/// `mounts`: where files on the mounts the tree made are now (files on a tmpfs the restore
/// recreates from the image are not checked).
pub fn check(
    fds: &[FdImage],
    allow_changed: bool,
    mounts: &crate::namespaces::MountView,
) -> Result<()> {
    for f in fds.iter().filter(|f| f.by_path()) {
        let here = if f.outside_mntns {
            Some(f.path.clone())
        } else {
            mounts.host_path(&f.path)
        };
        let Some(here) = here else {
            continue;
        };
        let m = std::fs::metadata(&here).map_err(|e| {
            EngineError::Failed(format!("fd {}: {} cannot be reopened: {e}", f.fd, f.path))
        })?;
        if m.mode() & libc::S_IFMT != f.mode & libc::S_IFMT {
            return Err(EngineError::Failed(format!(
                "fd {}: {} changed type since the dump",
                f.fd, f.path
            )));
        }
        if m.is_file() && !allow_changed && (m.len() != f.size || m.mode() != f.mode) {
            return Err(EngineError::Failed(format!(
                "fd {}: {} changed since the dump (size {} now, {} then; mode {:o} now, {:o} then); \
                 restore with --allow-changed-files to accept it",
                f.fd,
                f.path,
                m.len(),
                f.size,
                m.mode() & 0o7777,
                f.mode & 0o7777
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

fn cloexec(f: &FdImage) -> u64 {
    if f.flags & libc::O_CLOEXEC as u32 != 0 {
        libc::O_CLOEXEC as u64
    } else {
        0
    }
}

/// The restored process's fd table as the queued calls will leave it. The kernel hands out the
/// lowest free fd number (at or above a floor for F_DUPFD), so the number every call will
/// return is known before it runs: calls that use it are queued behind it, and the whole
/// table is rebuilt in a few stops of the target instead of one per call (each stop costs
/// more than the call). A number that differs fails the restore (`queue_expect`).
struct FdPlan<'a> {
    t: &'a mut Target,
    used: std::collections::BTreeSet<u64>,
}

impl<'a> FdPlan<'a> {
    fn new(t: &'a mut Target) -> Result<Self> {
        // What earlier steps queued may open or close fds.
        t.flush()?;
        let dir = format!("/proc/{}/fd", t.pid);
        let used = std::fs::read_dir(&dir)
            .map_err(|e| EngineError::Failed(format!("reading {dir}: {e}")))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        Ok(FdPlan { t, used })
    }

    /// The number the next call that makes an fd (at or above `floor`) will get; taken.
    fn take(&mut self, floor: u64) -> u64 {
        let fd = lowest_free(&self.used, floor);
        self.used.insert(fd);
        fd
    }

    /// A call that makes one new fd; its number.
    fn create(&mut self, what: String, nr: i64, args: [u64; 6]) -> Result<u64> {
        let fd = self.take(0);
        self.t.queue_expect(what, nr, args, Some(fd))?;
        Ok(fd)
    }

    fn path(&mut self, path: &str) -> Result<u64> {
        self.t.stage_path(path)
    }

    fn dup_to(&mut self, what: String, src: u64, target: u64, flags: u64) -> Result<()> {
        self.t
            .queue(what, libc::SYS_dup3, [src, target, flags, 0, 0, 0])?;
        self.used.insert(target);
        Ok(())
    }

    fn close(&mut self, fd: u64) -> Result<()> {
        self.t
            .queue("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        self.used.remove(&fd);
        Ok(())
    }

    /// Move a temporary fd above every saved fd number, so it cannot be clobbered.
    fn move_high(&mut self, fd: u64, base: u64) -> Result<u64> {
        let hi = self.take(base);
        self.t.queue_expect(
            "fcntl(F_DUPFD)",
            libc::SYS_fcntl,
            [fd, libc::F_DUPFD_CLOEXEC as u64, base, 0, 0, 0],
            Some(hi),
        )?;
        self.close(fd)?;
        Ok(hi)
    }

    /// Put a freshly made fd at the saved number `f.fd` (dup3 with its close-on-exec flag).
    fn move_to(&mut self, fd: u64, f: &FdImage) -> Result<()> {
        if fd != f.fd as u64 {
            self.dup_to(format!("dup3 to fd {}", f.fd), fd, f.fd as u64, cloexec(f))?;
            self.close(fd)?;
        }
        Ok(())
    }

    /// O_NONBLOCK and O_APPEND live in the open file description: set them on fd `f.fd`.
    fn set_status_flags(&mut self, f: &FdImage) -> Result<()> {
        let fl = f.flags & (libc::O_NONBLOCK | libc::O_APPEND) as u32;
        let args = [f.fd as u64, libc::F_SETFL as u64, fl as u64, 0, 0, 0];
        self.t.queue(
            format!("fcntl(F_SETFL) of fd {}", f.fd),
            libc::SYS_fcntl,
            args,
        )
    }

    fn lseek(&mut self, fd: u64, pos: u64) -> Result<()> {
        self.t.queue(
            format!("lseek on fd {fd}"),
            libc::SYS_lseek,
            [fd, pos, libc::SEEK_SET as u64, 0, 0, 0],
        )
    }

    /// Write `data` into the pipe or FIFO behind the process's fd `fd` from here, through
    /// /proc: what is queued runs first, so the fd exists with its capacity set.
    fn refill(&mut self, fd: u64, data: &[u8], what: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        self.t.flush()?;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{}/fd/{fd}", self.t.pid))
            .and_then(|mut w| w.write_all(data))
            .map_err(|e| {
                EngineError::Failed(format!("refilling {what} with {} bytes: {e}", data.len()))
            })
    }
}

/// The fd number the kernel hands out next: the lowest free one at or above `floor`.
fn lowest_free(used: &std::collections::BTreeSet<u64>, floor: u64) -> u64 {
    let mut n = floor;
    for &u in used.range(floor..) {
        if u != n {
            break;
        }
        n += 1;
    }
    n
}

/// A FIFO reopened by its path. A read-write fd of ours on it is opened first, so that opening
/// either end does not wait for the other; the FIFO's saved bytes are written back through it.
/// It stays open until every fd of the process is in place.
fn restore_fifo(
    p: &mut FdPlan,
    f: &FdImage,
    inode: u64,
    fifos: &[PipeImage],
    holders: &mut Vec<(u64, u64)>,
    base: u64,
) -> Result<()> {
    if !holders.iter().any(|h| h.0 == inode) {
        let at = p.path(&f.path)?;
        let fd = p.create(
            format!("open of the FIFO {} for fd {}", f.path, f.fd),
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                at,
                (libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )?;
        let fd = p.move_high(fd, base)?;
        holders.push((inode, fd));
        if let Some(saved) = fifos.iter().find(|s| s.inode == inode) {
            p.t.queue(
                format!("fcntl(F_SETPIPE_SZ) of the FIFO {}", f.path),
                libc::SYS_fcntl,
                [fd, libc::F_SETPIPE_SZ as u64, saved.capacity, 0, 0, 0],
            )?;
            let data = crate::hexcodec::unhex(&saved.data, "FIFO data")?;
            if !data.is_empty() {
                p.refill(fd, &data, &format!("the FIFO {} of fd {}", f.path, f.fd))?;
            }
        }
    }
    let at = p.path(&f.path)?;
    let flags = f.flags & !((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32);
    let fd = p.create(
        format!("open of the FIFO {} for fd {}", f.path, f.fd),
        libc::SYS_openat,
        [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
    )?;
    p.move_to(fd, f)
}

/// Reopen every fd. `ghosts`: inode -> fd of the recreated unlinked files (closed here once
/// dup'ed where they belong).
pub fn restore(
    t: &mut Target,
    fds: &[FdImage],
    pipes: &[PipeImage],
    fifos: &[PipeImage],
    ghosts: &std::collections::HashMap<u64, u64>,
    built: &crate::sockets::Built,
) -> Result<()> {
    let base = fds.iter().map(|f| f.fd as u64 + 1).max().unwrap_or(0);
    let mut p = FdPlan::new(t)?;
    // A pidfd on Ferry, for the target to take the objects built here (pidfd_getfd).
    let mut ferry_pidfd: Option<u64> = None;
    let mut made: Vec<(u64, u64, u64)> = Vec::new(); // (inode, read end, write end), high fds
    let mut fifo_holders: Vec<(u64, u64)> = Vec::new(); // (inode, read-write fd), high fds
    for f in fds {
        let target = f.fd as u64;
        if let Some(src) = f.same_as {
            p.dup_to(
                format!("dup3 of fd {src} to fd {}", f.fd),
                src as u64,
                target,
                cloexec(f),
            )?;
            continue;
        }
        if let Some((hp, hfd)) = f.shares {
            // Taken from the process restored before that holds it: the same description.
            let pidfd = p.create(
                format!("pidfd_open of process {hp}"),
                libc::SYS_pidfd_open,
                [hp as u64, 0, 0, 0, 0, 0],
            )?;
            let fd = p.create(
                format!("pidfd_getfd of fd {hfd} of process {hp}"),
                libc::SYS_pidfd_getfd,
                [pidfd, hfd as u64, 0, 0, 0, 0],
            )?;
            p.close(pidfd)?;
            p.move_to(fd, f)?;
            // pidfd_getfd sets close-on-exec; the fd's own flag is what was saved.
            let fl = if cloexec(f) != 0 { libc::FD_CLOEXEC } else { 0 };
            p.t.queue(
                format!("fcntl(F_SETFD) of fd {}", f.fd),
                libc::SYS_fcntl,
                [target, libc::F_SETFD as u64, fl as u64, 0, 0, 0],
            )?;
            continue;
        }
        // Objects rebuilt here, in Ferry, and handed over.
        let made_here = if let Some(w) = &f.inotify {
            Some(crate::evfds::build_inotify(w, f.flags)?)
        } else if let Some(tf) = &f.timerfd {
            Some(crate::evfds::build_timerfd(tf, f.flags)?)
        } else if let Some(mask) = f.signalfd {
            Some(crate::evfds::build_signalfd(mask, f.flags)?)
        } else {
            None
        };
        // A pipe that is also in flight on a Unix socket was made in Ferry: its end is
        // taken from there, so that the end in flight and this fd stay one pipe.
        let built_pipe = f
            .pipe
            .and_then(|inode| built.pipes.get(&inode))
            .map(|(r, w)| {
                if f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                    w
                } else {
                    r
                }
            });
        if f.socket.is_some() || made_here.is_some() || built_pipe.is_some() {
            let s = match (&made_here, f.socket, built_pipe) {
                (Some(m), _, _) => m,
                (None, Some(inode), _) => built.socks.get(&inode).ok_or_else(|| {
                    EngineError::Failed(format!("fd {}: socket:[{inode}] was not rebuilt", f.fd))
                })?,
                (None, None, Some(p)) => p,
                _ => unreachable!(),
            };
            let pidfd = match ferry_pidfd {
                Some(fd) => fd,
                None => {
                    let me = std::process::id() as u64;
                    let fd = p.create(
                        "pidfd_open of ferry".into(),
                        libc::SYS_pidfd_open,
                        [me, 0, 0, 0, 0, 0],
                    )?;
                    let fd = p.move_high(fd, base)?;
                    ferry_pidfd = Some(fd);
                    fd
                }
            };
            use std::os::fd::AsRawFd;
            let got = p.create(
                format!("pidfd_getfd for fd {} ({})", f.fd, f.path),
                libc::SYS_pidfd_getfd,
                [pidfd, s.as_raw_fd() as u64, 0, 0, 0, 0],
            )?;
            p.move_to(got, f)?;
            if built_pipe.is_some() {
                p.set_status_flags(f)?;
            }
            // `made_here` is closed on our side when dropped: the target must have its copy.
            if made_here.is_some() {
                p.t.flush()?;
            }
            continue;
        }
        if f.epoll.is_some() {
            let cloexec = (f.flags & libc::O_CLOEXEC as u32) as u64;
            let e = p.create(
                format!("epoll_create1 for fd {}", f.fd),
                libc::SYS_epoll_create1,
                [cloexec, 0, 0, 0, 0, 0],
            )?;
            p.move_to(e, f)?;
            continue;
        }
        if let Some((count, sem)) = f.eventfd {
            // The counter can exceed eventfd2's 32-bit initial value: write the rest.
            let mut flags = f.flags & (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32;
            if sem {
                flags |= libc::EFD_SEMAPHORE as u32;
            }
            let init = count.min(u32::MAX as u64);
            let fd = p.create(
                format!("eventfd2 for fd {}", f.fd),
                libc::SYS_eventfd2,
                [init, flags as u64, 0, 0, 0, 0],
            )?;
            if count > init {
                let at = p.t.stage(&(count - init).to_le_bytes())?;
                p.t.queue(
                    "write to the eventfd",
                    libc::SYS_write,
                    [fd, at, 8, 0, 0, 0],
                )?;
            }
            p.move_to(fd, f)?;
            continue;
        }
        if let Some(inode) = f.ghost {
            let src = *ghosts.get(&inode).ok_or_else(|| {
                EngineError::Failed(format!(
                    "fd {}: its unlinked file is not in the image",
                    f.fd
                ))
            })?;
            p.dup_to(format!("dup3 to fd {}", f.fd), src, target, cloexec(f))?;
            p.lseek(target, f.pos)?;
            p.set_status_flags(f)?;
            continue;
        }
        if let Some(inode) = f.fifo {
            restore_fifo(&mut p, f, inode, fifos, &mut fifo_holders, base)?;
            continue;
        }
        if let (Some(_), Some((hp, hfd))) = (f.pipe, f.pipe_holder) {
            // The pipe lives in a process restored before: open its other end through /proc.
            let path = format!("/proc/{hp}/fd/{hfd}");
            let at = p.path(&path)?;
            let mode = f.flags & libc::O_ACCMODE as u32;
            let fd = p.create(
                format!("open of {path}"),
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, at, mode as u64, 0, 0, 0],
            )?;
            p.move_to(fd, f)?;
            p.set_status_flags(f)?;
            continue;
        }
        if let Some(inode) = f.pipe {
            if !made.iter().any(|m| m.0 == inode) {
                let saved = pipes.iter().find(|s| s.inode == inode).ok_or_else(|| {
                    EngineError::Failed(format!("fd {}: pipe {inode} is not in the image", f.fd))
                })?;
                // pipe2 makes two fds, the read end first: both foretold. It returns 0, so
                // each end's access mode is checked in their place.
                let (r, w) = (p.take(0), p.take(0));
                let at = p.t.stage(&[0u8; 8])?;
                p.t.queue("pipe2", libc::SYS_pipe2, [at, 0, 0, 0, 0, 0])?;
                for (fd, mode) in [(r, libc::O_RDONLY), (w, libc::O_WRONLY)] {
                    p.t.queue_expect(
                        format!("fcntl(F_GETFL) of the new pipe's fd {fd}"),
                        libc::SYS_fcntl,
                        [fd, libc::F_GETFL as u64, 0, 0, 0, 0],
                        Some(mode as u64),
                    )?;
                }
                let r = p.move_high(r, base)?;
                let w = p.move_high(w, base)?;
                p.t.queue(
                    "fcntl(F_SETPIPE_SZ)",
                    libc::SYS_fcntl,
                    [w, libc::F_SETPIPE_SZ as u64, saved.capacity, 0, 0, 0],
                )?;
                let data = crate::hexcodec::unhex(&saved.data, "pipe data")?;
                if !data.is_empty() {
                    // Refill from outside through the restored process's own write end.
                    p.refill(w, &data, &format!("pipe {inode}"))?;
                }
                made.push((inode, r, w));
            }
            let &(_, r, w) = made.iter().find(|m| m.0 == inode).unwrap();
            let write_end = f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
            let src = if write_end { w } else { r };
            p.dup_to(format!("dup3 to fd {}", f.fd), src, target, cloexec(f))?;
            // O_NONBLOCK and friends live in the description.
            p.set_status_flags(f)?;
            continue;
        }
        let at = if f.outside_mntns {
            // Through Ferry's mount namespace, where it was opened.
            p.path(&format!("/proc/{}/root{}", std::process::id(), f.path))?
        } else {
            p.path(&f.path)?
        };
        let flags = f.flags & !((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32);
        let fd = p.create(
            format!("open of {} for fd {}", f.path, f.fd),
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
        )?;
        if f.pos != 0 {
            p.lseek(fd, f.pos)?;
        }
        p.move_to(fd, f)?;
    }
    // Epoll sets last: what they watch exists now.
    for f in fds.iter().filter(|f| f.same_as.is_none()) {
        if let Some(items) = &f.epoll {
            crate::evfds::fill_epoll(p.t, f.fd, items)?;
        }
    }
    for &fd in ghosts
        .values()
        .chain(ferry_pidfd.iter())
        .chain(fifo_holders.iter().map(|h| &h.1))
    {
        p.close(fd)?;
    }
    for (_, r, w) in made {
        for fd in [r, w] {
            if !fds.iter().any(|f| f.fd as u64 == fd) {
                p.close(fd)?;
            }
        }
    }
    p.t.flush()
}

#[cfg(test)]
mod tests {
    use super::lowest_free;
    use std::collections::BTreeSet;

    /// The kernel's rule for every call that makes an fd; a restore whose calls got other
    /// numbers fails (`queue_expect`), which the engine tests' fd kinds would show.
    #[test]
    fn the_fd_foretold_is_the_lowest_free_one() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        assert_eq!(lowest_free(&set(&[]), 0), 0);
        assert_eq!(lowest_free(&set(&[0, 1, 2, 4]), 0), 3);
        assert_eq!(lowest_free(&set(&[0, 1, 2, 4]), 4), 5);
        assert_eq!(lowest_free(&set(&[0, 1, 2, 9]), 7), 7);
        assert_eq!(lowest_free(&set(&[1, 2]), 0), 0);
    }
}
