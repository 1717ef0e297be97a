//! Sockets and other kernel objects seen from outside: taking another process's fd
//! (pidfd_getfd), entering a network namespace, socket options, and TCP repair mode.
//!
//! The engine inspects and rebuilds sockets in its own process, on a duplicate of the
//! target's fd (same open file description), so that no socket option needs an injected
//! syscall.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// Constants the libc crate lacks (include/uapi/linux/tcp.h, sockios.h, timerfd.h).
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_REPAIR_WINDOW: i32 = 29;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;
pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = libc::FIONREAD;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `_IOW('T', 0, u64)`: set the expiration count of a timerfd (CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

fn last(what: impl Into<String>) -> Error {
    Error::io(what, std::io::Error::last_os_error())
}

fn check(rc: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long> {
    if rc < 0 {
        Err(last(what()))
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_long, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    let fd = check(rc, what)? as RawFd;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Err(Error::NoSuchProcess(pid));
    }
    owned(rc, || format!("pidfd_open of process {pid}"))
}

/// A duplicate, in this process, of fd `fd` of process `pid`: the same open file description.
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes integers and returns a new fd (close-on-exec).
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    owned(rc, || format!("pidfd_getfd of fd {fd} of process {pid}"))
}

/// Move the calling thread into the network namespace at `path` (a /proc/PID/ns/net or a
/// bind mount such as /run/netns/NAME). Sockets it creates afterwards live there, and so do
/// children it forks.
pub fn enter_netns(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {path}"), e))?;
    // SAFETY: setns takes an fd and a flag; it changes only this thread's namespaces.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    check(rc as libc::c_long, || {
        format!("entering network namespace {path}")
    })?;
    Ok(())
}

/// Give the calling thread a new, empty network namespace.
pub fn new_netns() -> Result<()> {
    // SAFETY: unshare takes a flag and changes only this thread's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    check(rc as libc::c_long, || "creating a network namespace".into())?;
    Ok(())
}

/// The identity (device, inode) of a namespace file.
pub fn ns_id(path: &str) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io(format!("stat of {path}"), e))?;
    Ok((m.dev(), m.ino()))
}

/// getsockopt into a plain-old-data value; returns the length the kernel wrote.
pub fn getsockopt_raw<T: Copy>(fd: &OwnedFd, level: i32, opt: i32, val: &mut T) -> Result<usize> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a valid, writable T of `len` bytes; T is plain data (Copy).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            val as *mut T as *mut libc::c_void,
            &mut len,
        )
    };
    check(rc as libc::c_long, || {
        format!("getsockopt(level {level}, option {opt})")
    })?;
    Ok(len as usize)
}

/// setsockopt from a plain-old-data value or a slice of them.
pub fn setsockopt_raw<T: Copy>(
    fd: impl std::os::fd::AsFd,
    level: i32,
    opt: i32,
    val: &[T],
) -> Result<()> {
    let len = std::mem::size_of_val(val) as libc::socklen_t;
    // SAFETY: `val` is a readable slice of `len` bytes of plain data.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            val.as_ptr() as *const libc::c_void,
            len,
        )
    };
    check(rc as libc::c_long, || {
        format!("setsockopt(level {level}, option {opt})")
    })?;
    Ok(())
}

pub fn get_int(fd: &OwnedFd, level: i32, opt: i32) -> Result<i32> {
    let mut v = 0i32;
    getsockopt_raw(fd, level, opt, &mut v)?;
    Ok(v)
}

pub fn set_int(fd: impl std::os::fd::AsFd, level: i32, opt: i32, v: i32) -> Result<()> {
    setsockopt_raw(fd, level, opt, &[v])
}

/// Whether `fd` can be read from without waiting (data, or the peer's end of stream).
pub fn readable_now(fd: impl std::os::fd::AsFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Make a TCP connection fail when its peer stops answering for `within`, even while this
/// side only waits to read: keepalive probes every second once it is idle for a second, and
/// TCP_USER_TIMEOUT ends it when data or probes go unacknowledged that long. A peer that is
/// alive but slow (a long restore) still answers the probes, so it is not cut off.
pub fn fail_on_silent_peer(fd: impl std::os::fd::AsFd, within: std::time::Duration) -> Result<()> {
    let fd = fd.as_fd();
    let secs = within.as_secs().clamp(1, i32::MAX as u64) as i32;
    set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, secs)?;
    let ms = within.as_millis().clamp(1000, i32::MAX as u128) as i32;
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// The kernel's TCP_INFO for a TCP socket.
pub fn tcp_info(fd: &OwnedFd) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut ti)?;
    Ok(ti)
}

/// A raw socket address (sockaddr_storage bytes, length).
pub type RawAddr = Vec<u8>;

fn name_of(fd: &OwnedFd, peer: bool) -> Result<RawAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = &mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr;
    // SAFETY: `p` points to a writable sockaddr_storage of `len` bytes.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if peer && e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(Vec::new());
        }
        return Err(Error::io(
            if peer { "getpeername" } else { "getsockname" },
            e,
        ));
    }
    // SAFETY: ss is plain bytes; we copy the `len` bytes the kernel filled.
    let bytes = unsafe {
        std::slice::from_raw_parts(&ss as *const _ as *const u8, (len as usize).min(128))
    };
    Ok(bytes.to_vec())
}

/// The socket's own address (empty when unbound... the kernel returns the family alone).
pub fn sockname(fd: &OwnedFd) -> Result<RawAddr> {
    name_of(fd, false)
}

/// The connected peer's address, or empty when not connected.
pub fn peername(fd: &OwnedFd) -> Result<RawAddr> {
    name_of(fd, true)
}

fn with_addr<R>(addr: &[u8], f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> R) -> R {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = addr
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copying n ≤ sizeof(ss) bytes into ss.
    unsafe {
        std::ptr::copy_nonoverlapping(addr.as_ptr(), &mut ss as *mut _ as *mut u8, n);
    }
    f(
        &ss as *const _ as *const libc::sockaddr,
        n as libc::socklen_t,
    )
}

pub fn bind(fd: &OwnedFd, addr: &[u8]) -> Result<()> {
    // SAFETY: the address buffer is valid for the call.
    let rc = with_addr(addr, |p, l| unsafe { libc::bind(fd.as_raw_fd(), p, l) });
    check(rc as libc::c_long, || "bind".into())?;
    Ok(())
}

/// connect(2); in TCP repair mode this sets the peer without sending anything.
pub fn connect(fd: &OwnedFd, addr: &[u8]) -> Result<()> {
    // SAFETY: the address buffer is valid for the call.
    let rc = with_addr(addr, |p, l| unsafe { libc::connect(fd.as_raw_fd(), p, l) });
    check(rc as libc::c_long, || "connect".into())?;
    Ok(())
}

pub fn listen(fd: &OwnedFd, backlog: i32) -> Result<()> {
    // SAFETY: listen takes integers.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    check(rc as libc::c_long, || "listen".into())?;
    Ok(())
}

pub fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new fd.
    let rc = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    owned(rc as libc::c_long, || {
        format!("socket(domain {domain}, type {ty})")
    })
}

/// A connected pair of Unix sockets.
pub fn socketpair(ty: i32) -> Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0 as RawFd; 2];
    // SAFETY: sv is a writable array of two ints.
    let rc =
        unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) };
    check(rc as libc::c_long, || "socketpair".into())?;
    // SAFETY: the kernel returned two fresh fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong, what: &str) -> Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) };
    check(rc as libc::c_long, || what.to_string())?;
    Ok(v)
}

/// Bytes queued for reading (SIOCINQ).
pub fn inq(fd: &OwnedFd) -> Result<usize> {
    Ok(ioctl_int(fd, SIOCINQ, "SIOCINQ")? as usize)
}

/// Bytes in the send queue, sent-unacknowledged and unsent (SIOCOUTQ).
pub fn outq(fd: &OwnedFd) -> Result<usize> {
    Ok(ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")? as usize)
}

/// Bytes in the send queue not sent yet (SIOCOUTQNSD).
pub fn outq_unsent(fd: &OwnedFd) -> Result<usize> {
    Ok(ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")? as usize)
}

/// recv with flags into `buf`; returns the byte count.
pub fn recv(fd: &OwnedFd, buf: &mut [u8], flags: i32) -> Result<usize> {
    // SAFETY: buf is writable for its length.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            flags,
        )
    };
    Ok(check(rc as libc::c_long, || "recv".into())? as usize)
}

/// send the whole buffer (looping on short writes).
pub fn send_all(fd: &OwnedFd, mut buf: &[u8], flags: i32) -> Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is readable for its length.
        let rc = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        let n = check(rc as libc::c_long, || "send".into())? as usize;
        buf = &buf[n..];
    }
    Ok(())
}

/// struct tcp_repair_window.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

pub fn set_repair(fd: &OwnedFd, on: bool) -> Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, on as i32)
}

/// Choose the queue (TCP_RECV_QUEUE or TCP_SEND_QUEUE) that repair-mode reads, writes and
/// TCP_QUEUE_SEQ apply to.
pub fn set_repair_queue(fd: &OwnedFd, q: i32) -> Result<()> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, q)
}

/// Read the whole selected queue without consuming it (repair mode, MSG_PEEK).
pub fn peek_queue(fd: &OwnedFd, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let n = recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)?;
    buf.truncate(n);
    Ok(buf)
}

/// Set a timerfd's count of expirations not read yet.
pub fn timerfd_set_ticks(fd: &OwnedFd, ticks: u64) -> Result<()> {
    // SAFETY: the ioctl reads one u64.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) };
    check(rc as libc::c_long, || "TFD_IOC_SET_TICKS".into())?;
    Ok(())
}

/// A timerfd with its settings (relative it_value).
pub fn timerfd(clock: i32, flags: i32, interval: (i64, i64), value: (i64, i64)) -> Result<OwnedFd> {
    // SAFETY: timerfd_create takes integers and returns a new fd.
    let rc = unsafe { libc::timerfd_create(clock, flags | libc::TFD_CLOEXEC) };
    let fd = owned(rc as libc::c_long, || {
        format!("timerfd_create(clock {clock})")
    })?;
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: interval.0,
            tv_nsec: interval.1,
        },
        it_value: libc::timespec {
            tv_sec: value.0,
            tv_nsec: value.1,
        },
    };
    // SAFETY: spec is a valid itimerspec; the old value is not requested.
    let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    check(rc as libc::c_long, || "timerfd_settime".into())?;
    Ok(fd)
}

/// A signalfd for the signals of `mask` (bit n-1 for signal n).
pub fn signalfd(mask: u64, flags: i32) -> Result<OwnedFd> {
    // The kernel's sigset is 8 bytes; pass it raw through the syscall.
    // SAFETY: signalfd4 reads `8` bytes at &mask and returns a new fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &mask as *const u64,
            8usize,
            flags | libc::SFD_CLOEXEC,
        )
    };
    owned(rc, || "signalfd".into())
}

/// An inotify instance.
pub fn inotify(flags: i32) -> Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags and returns a new fd.
    let rc = unsafe { libc::inotify_init1(flags | libc::IN_CLOEXEC) };
    owned(rc as libc::c_long, || "inotify_init1".into())
}

pub fn inotify_add_watch(fd: &OwnedFd, path: &str, mask: u32) -> Result<i32> {
    let c = std::ffi::CString::new(path).map_err(|_| Error::Parse(format!("odd path {path}")))?;
    // SAFETY: c is a valid C string for the call.
    let rc = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    Ok(check(rc as libc::c_long, || {
        format!("inotify_add_watch on {path}")
    })? as i32)
}

pub fn inotify_rm_watch(fd: &OwnedFd, wd: i32) -> Result<()> {
    // SAFETY: integers only.
    let rc = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    check(rc as libc::c_long, || "inotify_rm_watch".into())?;
    Ok(())
}

/// The path of a file named by a handle (open_by_handle_at on the mount of `mount_fd_path`),
/// as the kernel prints it.
pub fn path_of_handle(mount_path: &str, htype: i32, handle: &[u8]) -> Result<String> {
    let m = std::fs::File::open(mount_path)
        .map_err(|e| Error::io(format!("opening {mount_path}"), e))?;
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&htype.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: buf holds a struct file_handle (bytes, type, then the handle bytes).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            m.as_raw_fd(),
            buf.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    let f = owned(rc, || "open_by_handle_at".into())?;
    let p = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| Error::io("reading the handle's path", e))?;
    Ok(p.display().to_string())
}

/// fcntl(F_SETFL) on our duplicate: status flags live in the shared open file description.
pub fn set_status_flags(fd: &OwnedFd, flags: i32) -> Result<()> {
    // SAFETY: integers only.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) };
    check(rc as libc::c_long, || "fcntl(F_SETFL)".into())?;
    Ok(())
}

/// Run `f` on a thread that entered the namespace at `path` (of kind `nstype`, a CLONE_NEW*
/// flag): reads of /proc/sys there see that namespace.
pub fn in_ns<R: Send>(path: &str, nstype: i32, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd =
                std::fs::File::open(path).map_err(|e| Error::io(format!("opening {path}"), e))?;
            // SAFETY: setns takes an fd and a flag; it changes only this thread's namespaces.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), nstype) };
            check(rc as libc::c_long, || format!("entering namespace {path}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Parse("a namespace worker thread panicked".into())))
    })
}

/// Run `f` on a thread inside the network namespace at `netns` (None: ours), so that the
/// sockets it creates or the netlink dumps it makes belong there.
pub fn in_netns<R: Send>(netns: Option<&str>, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    match netns {
        None => f(),
        Some(path) => std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(path)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Parse("a netns worker thread panicked".into())))
        }),
    }
}

/// One Unix socket as sock_diag reports it.
#[derive(Debug, Clone, Default)]
pub struct UnixDiag {
    pub ino: u64,
    pub ty: u8,
    pub state: u8,
    /// Inode of the connected peer, 0 when none.
    pub peer: u64,
    /// Bound name: a path, or `@name` for the abstract namespace; empty when unbound.
    pub name: Vec<u8>,
    /// For a listener: sockets waiting to be accepted.
    pub pending: u32,
    /// Bytes (stream) or messages queued for reading.
    pub rqueue: u32,
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// Every Unix socket of the calling thread's network namespace (NETLINK_SOCK_DIAG).
pub fn unix_diag() -> Result<Vec<UnixDiag>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    // UDIAG_SHOW_NAME | PEER | ICONS | RQLEN.
    const SHOW: u32 = 1 | 4 | 8 | 0x10;
    // SAFETY: socket takes integers and returns a new fd.
    let rc = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    let nl = owned(rc as libc::c_long, || "netlink socket".into())?;
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&SHOW.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
    send_all(&nl, &req, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = recv(&nl, &mut buf, 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = rd_u32(&buf, off) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                return Err(Error::Parse("sock_diag: malformed netlink message".into()));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let e = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    return Err(Error::io(
                        "sock_diag of Unix sockets",
                        std::io::Error::from_raw_os_error(-e),
                    ));
                }
                _ => {}
            }
            let m = &buf[off + 16..off + len];
            if m.len() >= 16 {
                let mut d = UnixDiag {
                    ty: m[1],
                    state: m[2],
                    ino: rd_u32(m, 4) as u64,
                    ..Default::default()
                };
                let mut a = 16;
                while a + 4 <= m.len() {
                    let alen = u16::from_ne_bytes([m[a], m[a + 1]]) as usize;
                    let aty = u16::from_ne_bytes([m[a + 2], m[a + 3]]);
                    if alen < 4 || a + alen > m.len() {
                        break;
                    }
                    let v = &m[a + 4..a + alen];
                    match aty {
                        0 => {
                            d.name = if v.first() == Some(&0) {
                                let mut n = b"@".to_vec();
                                n.extend_from_slice(&v[1..]);
                                n
                            } else {
                                v.split(|&c| c == 0).next().unwrap_or(&[]).to_vec()
                            }
                        }
                        2 if v.len() >= 4 => d.peer = rd_u32(v, 0) as u64,
                        3 => d.pending = (v.len() / 4) as u32,
                        4 if v.len() >= 8 => d.rqueue = rd_u32(v, 0),
                        _ => {}
                    }
                    a += (alen + 3) & !3;
                }
                out.push(d);
            }
            off += (len + 3) & !3;
        }
    }
}

/// Announce that `ip` is now at this host's `ifname` (a gratuitous ARP request, sent three
/// times), so that neighbours on the link update their caches at once. In the calling
/// thread's network namespace. Returns the packet socket: closing one waits for an RCU grace
/// period (10-20 ms here), so the caller closes it when no one is waiting.
pub fn send_garp(ifname: &str, ip: std::net::Ipv4Addr) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| Error::Parse(format!("odd interface name {ifname}")))?;
    // SAFETY: if_nametoindex reads a C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(last(format!("interface {ifname}")));
    }
    let s = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        (libc::ETH_P_ARP as u16).to_be() as i32,
    )?;
    // SAFETY: ifreq is plain data; all-zero is valid before we fill the name.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *c as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
    check(rc as libc::c_long, || {
        format!("hardware address of {ifname}")
    })?;
    // SAFETY: after SIOCGIFHWADDR the union holds a sockaddr with the MAC in sa_data.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mac: Vec<u8> = hw[..6].iter().map(|&b| b as u8).collect();
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    // SAFETY: sockaddr_ll is plain data; all-zero is valid before we fill it.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for _ in 0..3 {
        // SAFETY: f and `to` are valid for the call.
        let rc = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        check(rc as libc::c_long, || format!("gratuitous ARP on {ifname}"))?;
    }
    Ok(s)
}

/// An IPv4 address on an interface (rtnetlink), in the calling thread's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifindex: u32,
    pub ifname: String,
    pub addr: std::net::Ipv4Addr,
    pub prefix: u8,
}

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

fn rtnl() -> Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new fd.
    let rc = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    owned(rc as libc::c_long, || "rtnetlink socket".into())
}

/// An RTM_*ADDR message for `addr/prefix` on `ifindex` (AF_INET, universe scope).
fn addr_msg(ty: u16, flags: u16, ifindex: u32, addr: std::net::Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    m.extend_from_slice(&[libc::AF_INET as u8, prefix, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    // IFA_LOCAL and IFA_ADDRESS, 8 bytes each.
    for attr in [2u16, 1u16] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(&addr.octets());
    }
    m
}

/// Every IPv4 address of the calling thread's network namespace.
pub fn ipv4_addrs() -> Result<Vec<IfAddr>> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    let nl = rtnl()?;
    let mut req = Vec::with_capacity(24);
    req.extend_from_slice(&24u32.to_ne_bytes());
    req.extend_from_slice(&RTM_GETADDR.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0]);
    send_all(&nl, &req, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = recv(&nl, &mut buf, 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = rd_u32(&buf, off) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                return Err(Error::Parse("rtnetlink: malformed message".into()));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let e = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    return Err(Error::io(
                        "listing addresses (rtnetlink)",
                        std::io::Error::from_raw_os_error(-e),
                    ));
                }
                RTM_NEWADDR => {
                    let m = &buf[off + 16..off + len];
                    if m.len() >= 8 && m[0] == libc::AF_INET as u8 {
                        let prefix = m[1];
                        let ifindex = rd_u32(m, 4);
                        let (mut local, mut address) = (None, None);
                        let mut a = 8;
                        while a + 4 <= m.len() {
                            let alen = u16::from_ne_bytes([m[a], m[a + 1]]) as usize;
                            let aty = u16::from_ne_bytes([m[a + 2], m[a + 3]]);
                            if alen < 4 || a + alen > m.len() {
                                break;
                            }
                            let v = &m[a + 4..a + alen];
                            if v.len() == 4 {
                                let ip = std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]);
                                match aty {
                                    1 => address = Some(ip),
                                    2 => local = Some(ip),
                                    _ => {}
                                }
                            }
                            a += (alen + 3) & !3;
                        }
                        if let Some(addr) = local.or(address) {
                            let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
                            // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes.
                            let p = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
                            let ifname = if p.is_null() {
                                String::new()
                            } else {
                                // SAFETY: on success the buffer holds a NUL-terminated name.
                                unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                                    .to_string_lossy()
                                    .into_owned()
                            };
                            out.push(IfAddr {
                                ifindex,
                                ifname,
                                addr,
                                prefix,
                            });
                        }
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Add (or delete) `addr/prefix` on interface `ifindex`, in the calling thread's network
/// namespace, and wait for the kernel's answer.
pub fn change_addr(add: bool, ifindex: u32, addr: std::net::Ipv4Addr, prefix: u8) -> Result<()> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    let nl = rtnl()?;
    let (ty, flags) = if add {
        (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    };
    send_all(&nl, &addr_msg(ty, flags, ifindex, addr, prefix), 0)?;
    let mut buf = vec![0u8; 8192];
    let n = recv(&nl, &mut buf, 0)?;
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let e = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
        if e == 0 {
            return Ok(());
        }
        return Err(Error::io(
            format!(
                "{} address {addr}/{prefix} on interface {ifindex}",
                if add { "adding" } else { "deleting" }
            ),
            std::io::Error::from_raw_os_error(-e),
        ));
    }
    Err(Error::Parse("rtnetlink: no acknowledgement".into()))
}

/// Send `sig` to the process behind `pidfd`: unlike kill(2), never to a later process that
/// took its PID once it was reaped (then it fails with ESRCH).
pub fn pidfd_kill(pidfd: &OwnedFd, sig: i32) -> Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we own, a signal number and no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(crate::Error::io(
            "pidfd_send_signal",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
