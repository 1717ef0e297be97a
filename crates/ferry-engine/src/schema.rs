//! The metadata records of an image (JSON values in `meta.fimg`, see docs/image-format.md).

use serde::{Deserialize, Serialize};

/// Tag of the record describing one process.
pub const TAG_PROCESS: &str = "process";
/// Tag of the record describing a zombie of the tree.
pub const TAG_ZOMBIE: &str = "zombie";

/// A child that exited and was not reaped yet: recreated so that its parent can still wait.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZombieImage {
    pub pid: i32,
    pub ppid: i32,
    /// The raw wait status (as waitpid reports it).
    pub status: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub exe: String,
    pub threads: Vec<ThreadImage>,
    pub mappings: Vec<MappingImage>,
    pub mm: MmImage,
    pub fds: Vec<FdImage>,
    pub sigactions: Vec<SigactionImage>,
    pub cwd: String,
    /// The root directory (chroot) as the dumper saw it, when it is not the dumper's `/`.
    #[serde(default)]
    pub root: Option<String>,
    pub umask: u32,
    #[serde(default)]
    pub pipes: Vec<PipeImage>,
    /// FIFOs (named pipes) first held by this process in the tree, with their buffered bytes;
    /// `inode` is the FIFO's inode on its file system.
    #[serde(default)]
    pub fifos: Vec<PipeImage>,
    /// Signals pending for the whole process: raw siginfo, hex, in queue order.
    #[serde(default)]
    pub shared_pending: Vec<String>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF: (interval sec, usec, value sec, usec).
    #[serde(default)]
    pub itimers: Vec<[i64; 4]>,
    #[serde(default)]
    pub posix_timers: Vec<PosixTimer>,
    /// Unlinked files and memfds the process holds or maps, with their contents.
    #[serde(default)]
    pub ghosts: Vec<GhostFile>,
    #[serde(default)]
    pub attrs: crate::attrs::Attrs,
    /// Sockets first held by this process (others of the tree refer to them by inode).
    #[serde(default)]
    pub sockets: Vec<crate::sockets::SocketImage>,
    /// Namespaces of its own (the root of the tree only).
    #[serde(default)]
    pub namespaces: crate::namespaces::Namespaces,
}

/// A POSIX timer (timer_create), restored with its ID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signo: i32,
    pub sigval: u64,
    /// SIGEV_SIGNAL 0, SIGEV_NONE 1, | SIGEV_THREAD_ID 4.
    pub notify: i32,
    pub tid: i32,
    /// it_interval (sec, nsec), it_value (sec, nsec): the time left when dumped.
    pub spec: [i64; 4],
}

/// A file with no name left (unlinked, or a memfd): its contents travel in the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GhostFile {
    pub inode: u64,
    pub memfd: bool,
    /// The memfd's name, or the path the file had.
    pub name: String,
    pub size: u64,
    /// Contents, hex.
    pub data: String,
}

/// Largest unlinked file or memfd whose contents a dump carries.
pub const GHOST_MAX: u64 = 16 << 20;

/// A pipe held by the process, with the bytes buffered in it at the dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipeImage {
    pub inode: u64,
    pub capacity: u64,
    /// Buffered bytes, hex.
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadImage {
    pub tid: i32,
    /// user_regs_struct in kernel order (r15 ... gs), after the syscall-restart fixup.
    pub regs: Vec<u64>,
    /// The xsave area in standard format, hex.
    pub xsave: String,
    pub sigmask: u64,
    pub rseq: Option<RseqImage>,
    /// set_tid_address / CLONE_CHILD_CLEARTID address.
    #[serde(default)]
    pub clear_tid: u64,
    #[serde(default)]
    pub name: String,
    /// sigaltstack: (ss_sp, ss_flags, ss_size); None when disabled.
    #[serde(default)]
    pub sigaltstack: Option<(u64, u32, u64)>,
    /// Signals pending for this thread: raw siginfo, hex, in queue order.
    #[serde(default)]
    pub pending: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RseqImage {
    pub ptr: u64,
    pub size: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    Anon,
    Heap,
    Stack,
    File,
    SharedAnon,
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
    /// Private anonymous hugetlbfs memory (MAP_HUGETLB): recreated with the same page size.
    Hugetlb,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MappingImage {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub kind: MapKind,
    pub path: Option<String>,
    pub offset: u64,
    /// Size and mtime of the file when dumped, to refuse a changed file at restore.
    pub file_size: Option<u64>,
    pub file_mtime: Option<i64>,
    /// Pages of this mapping stored in pages.fimg.
    pub pages_saved: u64,
    /// Post-copy: runs [start, end) of pages left in the frozen source process, fetched on
    /// demand after the restored copy runs (not in pages.fimg).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lazy: Vec<(u64, u64)>,
    /// For shared anonymous memory: the shmem inode, the same in every process sharing it.
    #[serde(default)]
    pub shmem: Option<u64>,
    /// For a mapping of an unlinked file or memfd: its inode in `ProcessImage::ghosts`.
    #[serde(default)]
    pub ghost: Option<u64>,
    /// madvise(2) advice in effect (from the smaps VmFlags), re-applied at restore:
    /// `dontfork`, `wipeonfork`, `hugepage`, `nohugepage`, `dontdump`, `mergeable`.
    #[serde(default)]
    pub advice: Vec<String>,
    /// Transparent huge pages in the mapping when dumped (smaps AnonHugePages), KiB.
    #[serde(default)]
    pub thp_kb: u64,
    /// For `Hugetlb`: the size of its huge pages, KiB.
    #[serde(default)]
    pub huge_page_kb: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MmImage {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: i32,
    /// The file's path, or `pipe:[INODE]` for a pipe.
    pub path: String,
    /// An earlier fd of the process sharing this open file description (dup'ed, or inherited
    /// together): restored with dup so that offset and flags stay shared.
    #[serde(default)]
    pub same_as: Option<i32>,
    /// The same open file description as fd `.1` of process `.0`, restored before this one
    /// (inherited from a parent, or passed): taken from it (pidfd_getfd), so that the
    /// offset and the status flags stay shared between the processes.
    #[serde(default)]
    pub shares: Option<(i32, i32)>,
    /// For a pipe end: the pipe's inode (an index into `ProcessImage::pipes`).
    #[serde(default)]
    pub pipe: Option<u64>,
    /// For a pipe first held by another process of the tree: (its pid, its fd).
    #[serde(default)]
    pub pipe_holder: Option<(i32, i32)>,
    /// For an unlinked file or memfd: its inode in `ProcessImage::ghosts`.
    #[serde(default)]
    pub ghost: Option<u64>,
    /// For a FIFO opened by its path: its inode (data in `ProcessImage::fifos` of the first
    /// process of the tree holding it).
    #[serde(default)]
    pub fifo: Option<u64>,
    /// For an eventfd: (counter, semaphore mode).
    #[serde(default)]
    pub eventfd: Option<(u64, bool)>,
    /// For a socket: its inode, in `ProcessImage::sockets` of this or an earlier process.
    #[serde(default)]
    pub socket: Option<u64>,
    #[serde(default)]
    pub timerfd: Option<crate::evfds::TimerFd>,
    /// For a signalfd: its mask.
    #[serde(default)]
    pub signalfd: Option<u64>,
    #[serde(default)]
    pub inotify: Option<Vec<crate::evfds::InotifyWatch>>,
    #[serde(default)]
    pub epoll: Option<Vec<crate::evfds::EpollItem>>,
    /// open(2) flags as /proc/PID/fdinfo reports them.
    pub flags: u32,
    pub pos: u64,
    pub size: u64,
    pub mode: u32,
    /// Opened through a mount that is not in the process's own mount namespace (before it
    /// made that namespace, say): reopened through Ferry's namespace, as the same path from
    /// `/proc/FERRY/root`, since its namespace may show another mount there (read-only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outside_mntns: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigactionImage {
    pub signal: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl FdImage {
    /// An fd reopened by its path (a regular file, directory or device), as opposed to the
    /// objects rebuilt from their saved state.
    pub fn by_path(&self) -> bool {
        self.same_as.is_none()
            && self.shares.is_none()
            && self.pipe.is_none()
            && self.ghost.is_none()
            && self.eventfd.is_none()
            && self.socket.is_none()
            && self.timerfd.is_none()
            && self.signalfd.is_none()
            && self.inotify.is_none()
            && self.epoll.is_none()
    }
}
