//! Sockets: TCP (listening, and established through TCP repair mode with both queues), UDP,
//! and Unix sockets (stream, datagram, seqpacket; pairs inside the tree, bound names, queued
//! data).
//!
//! Both halves work on a duplicate of the socket in Ferry's own process: at dump the target's
//! fd is taken with pidfd_getfd; at restore the socket is built here, in the target network
//! namespace, and handed to the restored process (an injected pidfd_getfd on Ferry). Options
//! and repair state thus need no injected syscalls.

use crate::hexcodec::{hex, unhex};
use crate::{EngineError, Result};
use ferry_sys::net::{self, RepairWindow};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

/// A socket, saved by the first process of the tree that holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketImage {
    pub inode: u64,
    /// AF_INET, AF_INET6 or AF_UNIX.
    pub family: i32,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub ty: i32,
    pub protocol: i32,
    /// "listen", "established", "bound", "unbound" (TCP/UDP) or "connected" (UDP, Unix).
    pub state: String,
    /// Address: "1.2.3.4:80", "[::1]:80" for IP; hex of the name for Unix.
    #[serde(default)]
    pub local: String,
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub backlog: i32,
    /// Integer socket options: (level, option, value).
    #[serde(default)]
    pub opts: Vec<(i32, i32, i32)>,
    /// SO_LINGER (onoff, seconds) when enabled.
    #[serde(default)]
    pub linger: Option<(i32, i32)>,
    /// O_NONBLOCK and friends (the open file description's status flags).
    #[serde(default)]
    pub status_flags: u32,
    #[serde(default)]
    pub tcp: Option<TcpState>,
    /// Unix: the inode of the peer when it is a socket of the tree.
    #[serde(default)]
    pub unix_peer: Option<u64>,
    /// Unix: queued messages for this socket to read, hex, in order (one per datagram; a
    /// stream socket has one).
    #[serde(default)]
    pub queue: Vec<String>,
    /// Unix: files passed with each queued message (SCM_RIGHTS), in the same order as
    /// `queue`; empty when none carries any.
    #[serde(default)]
    pub queue_fds: Vec<Vec<FlightFile>>,
}

/// A file in flight on a Unix socket: sent by one process, not received yet. A regular file
/// or directory (reopened by its path), a pipe end, or a Unix socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlightFile {
    /// A regular file or directory: its path (empty for a pipe or socket).
    #[serde(default)]
    pub path: String,
    /// open(2) flags as fdinfo reports them.
    pub flags: u32,
    #[serde(default)]
    pub pos: u64,
    /// A pipe end: the pipe's inode (the end is `flags`' access mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipe: Option<u64>,
    /// On the first reference to a pipe in the queues of the image: its capacity and the
    /// bytes buffered in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipe_data: Option<crate::schema::PipeImage>,
    /// A pipe end that is the same open file description as an fd of the tree (kcmp): both
    /// get one description again. Otherwise the end in flight gets a description of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// A Unix socket: its inode, described in `sockets` of a process of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<u64>,
}

/// An established TCP connection's repair state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpState {
    /// Next sequence number to queue on the send side (write_seq).
    pub send_seq: u32,
    /// Next sequence number expected from the peer (rcv_nxt).
    pub recv_seq: u32,
    /// Sent but not acknowledged, hex.
    pub sent: String,
    /// Queued but not sent yet, hex.
    pub unsent: String,
    /// Received, not read by the process yet, hex.
    pub recv: String,
    pub mss: u32,
    /// tcpi_options: timestamps 1, SACK 2, window scaling 4.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    /// snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

const STATE_NAMES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// Options carried as integers, for every socket of a family (level, option).
fn int_opts(family: i32, ty: i32) -> Vec<(i32, i32)> {
    use libc::*;
    let mut v = vec![
        (SOL_SOCKET, SO_REUSEADDR),
        (SOL_SOCKET, SO_REUSEPORT),
        (SOL_SOCKET, SO_KEEPALIVE),
        (SOL_SOCKET, SO_BROADCAST),
        (SOL_SOCKET, SO_OOBINLINE),
        (SOL_SOCKET, SO_PRIORITY),
        (SOL_SOCKET, SO_MARK),
        (SOL_SOCKET, SO_RCVLOWAT),
        (SOL_SOCKET, SO_PASSCRED),
        (SOL_SOCKET, SO_SNDBUF),
        (SOL_SOCKET, SO_RCVBUF),
    ];
    if family == AF_INET6 {
        v.push((IPPROTO_IPV6, IPV6_V6ONLY));
    }
    if family != AF_UNIX && ty == SOCK_STREAM {
        v.extend([
            (IPPROTO_TCP, TCP_NODELAY),
            (IPPROTO_TCP, TCP_CORK),
            (IPPROTO_TCP, TCP_KEEPIDLE),
            (IPPROTO_TCP, TCP_KEEPINTVL),
            (IPPROTO_TCP, TCP_KEEPCNT),
            (IPPROTO_TCP, TCP_USER_TIMEOUT),
            (IPPROTO_TCP, TCP_DEFER_ACCEPT),
        ]);
    }
    v
}

fn ip_addr_string(raw: &[u8]) -> Option<String> {
    if raw.len() < 2 {
        return None;
    }
    let fam = u16::from_ne_bytes([raw[0], raw[1]]) as i32;
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match fam {
        libc::AF_INET if raw.len() >= 8 => {
            let ip = std::net::Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]);
            Some(SocketAddrV4::new(ip, port(raw)).to_string())
        }
        libc::AF_INET6 if raw.len() >= 28 => {
            let ip: [u8; 16] = raw[8..24].try_into().ok()?;
            let flow = u32::from_be_bytes(raw[4..8].try_into().ok()?);
            let scope = u32::from_ne_bytes(raw[24..28].try_into().ok()?);
            Some(SocketAddrV6::new(ip.into(), port(raw), flow, scope).to_string())
        }
        _ => None,
    }
}

fn raw_ip_addr(s: &str) -> Result<Vec<u8>> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| EngineError::Failed(format!("bad socket address in the image: {s:?}")))?;
    let mut v;
    match a {
        SocketAddr::V4(a) => {
            v = vec![0u8; 16];
            v[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            v[2..4].copy_from_slice(&a.port().to_be_bytes());
            v[4..8].copy_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            v = vec![0u8; 28];
            v[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            v[2..4].copy_from_slice(&a.port().to_be_bytes());
            v[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            v[8..24].copy_from_slice(&a.ip().octets());
            v[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
    Ok(v)
}

fn port_of(s: &str) -> u16 {
    s.parse::<SocketAddr>().map(|a| a.port()).unwrap_or(0)
}

/// Unix socket name bytes (sun_path, or a leading NUL for abstract) of a raw sockaddr_un.
fn unix_name(raw: &[u8]) -> Vec<u8> {
    if raw.len() <= 2 {
        return Vec::new();
    }
    let p = &raw[2..];
    if p[0] == 0 {
        p.to_vec()
    } else {
        p.split(|&c| c == 0).next().unwrap_or(&[]).to_vec()
    }
}

fn raw_unix_addr(name: &[u8]) -> Vec<u8> {
    let mut v = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    v.extend_from_slice(name);
    if name.first() != Some(&0) {
        v.push(0);
    }
    v
}

/// Everything the dump learns about the sockets of a tree, and what it must undo.
#[derive(Default)]
pub struct DumpState {
    /// Sockets seen so far: inode -> pid that holds the full record.
    pub seen: HashMap<u64, i32>,
    /// TCP sockets in repair mode, kept open here: on failure they leave repair mode; after
    /// a kill they are closed still in repair mode, which sends nothing to the peer.
    pub repaired: Vec<OwnedFd>,
    /// Unix diag of each network namespace (keyed by its inode).
    unix: HashMap<u64, Vec<net::UnixDiag>>,
    /// Connections and listeners to block, per network namespace (/proc/PID/ns/net).
    pub blocks: Vec<crate::netblock::Block>,
    /// Unix sockets found in flight (SCM_RIGHTS) and not held by the tree, described while
    /// dumping the current process: they go with its sockets.
    pub flight_socks: Vec<SocketImage>,
    /// Pipes in flight whose buffered bytes are already saved.
    flight_pipes: std::collections::HashSet<u64>,
    /// Unix sockets whose peer was not found in the tree when they were dumped: the peer
    /// must be found in flight by the end of the dump (`check_peers`).
    pending_peers: Vec<(u64, EngineError)>,
}

impl DumpState {
    /// Leave repair mode on every socket (the process keeps running).
    pub fn release(&mut self) {
        for s in self.repaired.drain(..) {
            let _ = net::set_repair(&s, false);
        }
    }
}

fn unix_diag_of(st: &mut DumpState, pid: i32) -> Result<&Vec<net::UnixDiag>> {
    let ns = format!("/proc/{pid}/ns/net");
    let (_, ino) = net::ns_id(&ns)?;
    if let std::collections::hash_map::Entry::Vacant(e) = st.unix.entry(ino) {
        let own = net::ns_id("/proc/self/ns/net")?.1 == ino;
        e.insert(net::in_netns(
            if own { None } else { Some(&ns) },
            net::unix_diag,
        )?);
    }
    Ok(&st.unix[&ino])
}

/// Dump socket `inode` held by `pid` as `fd`. Returns None when an earlier process of the
/// tree already saved it.
pub fn dump(
    st: &mut DumpState,
    pid: i32,
    fd: i32,
    inode: u64,
    flags: u32,
    tree: &[i32],
) -> Result<Option<SocketImage>> {
    if st.seen.contains_key(&inode) {
        return Ok(None);
    }
    st.seen.insert(inode, pid);
    let s = net::take_fd(pid, fd)?;
    dump_socket(st, pid, &format!("fd {fd}"), &s, inode, flags, tree).map(Some)
}

/// Describe socket `inode` (`s` is a copy of it in Ferry); `at` says where the process holds
/// it, for errors.
fn dump_socket(
    st: &mut DumpState,
    pid: i32,
    at: &str,
    s: &OwnedFd,
    inode: u64,
    flags: u32,
    tree: &[i32],
) -> Result<SocketImage> {
    let unsupported = |what: String| EngineError::Unsupported {
        pid,
        what: format!("{at} (socket:[{inode}]): {what}"),
    };
    let family = net::get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let ty = net::get_int(s, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = net::get_int(s, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let mut img = SocketImage {
        inode,
        family,
        ty,
        protocol,
        state: String::new(),
        local: String::new(),
        peer: String::new(),
        backlog: 0,
        opts: Vec::new(),
        linger: None,
        status_flags: flags & (libc::O_NONBLOCK as u32),
        tcp: None,
        unix_peer: None,
        queue: Vec::new(),
        queue_fds: Vec::new(),
    };
    for (level, opt) in int_opts(family, ty) {
        if let Ok(v) = net::get_int(s, level, opt) {
            img.opts.push((level, opt, v));
        }
    }
    let mut lg = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    if net::getsockopt_raw(s, libc::SOL_SOCKET, libc::SO_LINGER, &mut lg).is_ok() && lg.l_onoff != 0
    {
        img.linger = Some((lg.l_onoff, lg.l_linger));
    }
    match family {
        libc::AF_INET | libc::AF_INET6 => {
            img.local = ip_addr_string(&net::sockname(s)?).unwrap_or_default();
            img.peer = ip_addr_string(&net::peername(s)?).unwrap_or_default();
            match (ty, protocol) {
                (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
                    let ti = net::tcp_info(s)?;
                    match ti.tcpi_state {
                        1 => {
                            img.state = "established".into();
                            img.tcp = Some(dump_tcp(st, s, &ti).map_err(|e| {
                                unsupported(format!("reading its TCP repair state: {e}"))
                            })?);
                        }
                        10 => {
                            img.state = "listen".into();
                            // For a listener, tcpi_sacked is the backlog given to listen().
                            img.backlog = ti.tcpi_sacked as i32;
                            if ti.tcpi_unacked > 0 {
                                return Err(unsupported(format!(
                                    "the listening socket on {} has {} connection(s) waiting \
                                     to be accepted, which cannot be carried",
                                    img.local, ti.tcpi_unacked
                                )));
                            }
                        }
                        7 => {
                            img.state = if port_of(&img.local) != 0 {
                                "bound".into()
                            } else {
                                "unbound".into()
                            }
                        }
                        s => {
                            return Err(unsupported(format!(
                                "a TCP socket in state {} ({} -> {}), which this version \
                                 cannot carry",
                                STATE_NAMES.get(s as usize).unwrap_or(&"?"),
                                img.local,
                                img.peer
                            )))
                        }
                    }
                }
                (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
                    img.state = if !img.peer.is_empty() {
                        "connected".into()
                    } else if port_of(&img.local) != 0 {
                        "bound".into()
                    } else {
                        "unbound".into()
                    };
                }
                _ => {
                    return Err(unsupported(format!(
                        "an IP socket of type {ty} protocol {protocol}, which this version \
                         cannot carry"
                    )))
                }
            }
        }
        libc::AF_UNIX => dump_unix(st, pid, at, s, &mut img, tree).map_err(|e| match e {
            EngineError::Failed(m) => unsupported(m),
            e => e,
        })?,
        f => {
            return Err(unsupported(format!(
                "a socket of family {f} ({}), which this version cannot carry",
                match f {
                    libc::AF_NETLINK => "netlink",
                    libc::AF_PACKET => "packet",
                    _ => "unknown",
                }
            )))
        }
    }
    Ok(img)
}

/// At the end of a dump: every Unix socket whose peer was not held by the tree must have
/// found it in flight; otherwise its peer is outside the tree.
pub fn check_peers(st: &mut DumpState) -> Result<()> {
    for (peer, err) in std::mem::take(&mut st.pending_peers) {
        if !st.seen.contains_key(&peer) {
            return Err(err);
        }
    }
    Ok(())
}

/// Before anything is read: list the TCP connections and listeners of the tree and block
/// their traffic, so that the queues read afterwards are final.
pub fn plan_blocks(st: &mut DumpState, tree: &[i32]) -> Result<()> {
    for &pid in tree {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let is_sock = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:["))
                .unwrap_or(false);
            if !is_sock {
                continue;
            }
            let s = net::take_fd(pid, fd)?;
            let family = net::get_int(&s, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
            let proto = net::get_int(&s, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
            if !(family == libc::AF_INET || family == libc::AF_INET6) || proto != libc::IPPROTO_TCP
            {
                continue;
            }
            let local = ip_addr_string(&net::sockname(&s)?).unwrap_or_default();
            match net::tcp_info(&s)?.tcpi_state {
                1 => {
                    let peer = ip_addr_string(&net::peername(&s)?).unwrap_or_default();
                    crate::netblock::add_conn(st, pid, &local, &peer)?;
                }
                10 => crate::netblock::add_listener(st, pid, &local)?,
                _ => {}
            }
        }
    }
    Ok(())
}

fn dump_tcp(st: &mut DumpState, s: &OwnedFd, ti: &libc::tcp_info) -> Result<TcpState> {
    net::set_repair(s, true)?;
    let dup = s
        .try_clone()
        .map_err(|e| EngineError::Failed(e.to_string()))?;
    st.repaired.push(dup);
    net::set_repair_queue(s, net::TCP_RECV_QUEUE)?;
    let recv_seq = net::get_int(s, libc::IPPROTO_TCP, net::TCP_QUEUE_SEQ)? as u32;
    let inq = net::inq(s)?;
    let recv = net::peek_queue(s, inq)?;
    net::set_repair_queue(s, net::TCP_SEND_QUEUE)?;
    let send_seq = net::get_int(s, libc::IPPROTO_TCP, net::TCP_QUEUE_SEQ)? as u32;
    let outq = net::outq(s)?;
    let unsent_n = net::outq_unsent(s)?.min(outq);
    let all = net::peek_queue(s, outq)?;
    if all.len() != outq || recv.len() != inq {
        return Err(EngineError::Failed(format!(
            "queues read short ({} of {outq} sent bytes, {} of {inq} received)",
            all.len(),
            recv.len()
        )));
    }
    let (sent, unsent) = all.split_at(outq - unsent_n);
    let mss = net::get_int(s, libc::IPPROTO_TCP, libc::TCP_MAXSEG)? as u32;
    let timestamp = net::get_int(s, libc::IPPROTO_TCP, net::TCP_TIMESTAMP)? as u32;
    let mut w = RepairWindow::default();
    net::getsockopt_raw(s, libc::IPPROTO_TCP, net::TCP_REPAIR_WINDOW, &mut w)?;
    Ok(TcpState {
        send_seq,
        recv_seq,
        sent: hex(sent),
        unsent: hex(unsent),
        recv: hex(&recv),
        mss,
        options: ti.tcpi_options,
        snd_wscale: ti.tcpi_snd_rcv_wscale & 0xf,
        rcv_wscale: ti.tcpi_snd_rcv_wscale >> 4,
        timestamp,
        window: [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup],
    })
}

fn dump_unix(
    st: &mut DumpState,
    pid: i32,
    at: &str,
    s: &OwnedFd,
    img: &mut SocketImage,
    tree: &[i32],
) -> Result<()> {
    let name = unix_name(&net::sockname(s)?);
    img.local = hex(&name);
    let diag = unix_diag_of(st, pid)?
        .iter()
        .find(|d| d.ino == img.inode)
        .cloned()
        .unwrap_or_default();
    // TCP_LISTEN is 10 for Unix sockets too; 1 is connected.
    if diag.state == 10 {
        img.state = "listen".into();
        img.backlog = 128;
        if diag.pending > 0 {
            return Err(EngineError::Failed(format!(
                "the listening Unix socket {} has {} connection(s) waiting to be accepted, \
                 which cannot be carried",
                String::from_utf8_lossy(&name),
                diag.pending
            )));
        }
        return Ok(());
    }
    if diag.peer != 0 {
        // The peer must be a socket of the tree, or in flight (SCM_RIGHTS) in a queue of
        // the tree, which may be found later in the dump.
        let held =
            st.seen.contains_key(&diag.peer) || tree.iter().any(|&p| holds_socket(p, diag.peer));
        if !held {
            let err = EngineError::Unsupported {
                pid,
                what: format!(
                    "{at} (socket:[{}]): a Unix socket connected to socket:[{}] outside the \
                     dumped tree{}",
                    img.inode,
                    diag.peer,
                    match unix_diag_of(st, pid)?.iter().find(|d| d.ino == diag.peer) {
                        Some(d) if !d.name.is_empty() =>
                            format!(" (bound to {})", String::from_utf8_lossy(&d.name)),
                        _ => String::new(),
                    }
                ),
            };
            st.pending_peers.push((diag.peer, err));
        }
        img.unix_peer = Some(diag.peer);
        img.state = "connected".into();
    } else if !name.is_empty() {
        img.state = "bound".into();
    } else if diag.state == 1 {
        return Err(EngineError::Failed(
            "a Unix socket whose peer has closed, which this version cannot carry".into(),
        ));
    } else {
        img.state = "unbound".into();
    }
    let at = format!("{at} (socket:[{}])", img.inode);
    (img.queue, img.queue_fds) = peek_unix_queue(st, pid, tree, &at, s, img.ty)?;
    Ok(())
}

fn holds_socket(pid: i32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .map(|l| l.to_string_lossy() == want)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// The messages queued for reading on a Unix socket, without consuming them (SO_PEEK_OFF
/// walks the queue), with the files in flight (SCM_RIGHTS) each carries. `at` names the
/// socket for errors.
type Queue = (Vec<String>, Vec<Vec<FlightFile>>);

fn peek_unix_queue(
    st: &mut DumpState,
    pid: i32,
    tree: &[i32],
    at: &str,
    s: &OwnedFd,
    ty: i32,
) -> Result<Queue> {
    net::set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let mut out = Vec::new();
    let mut out_fds: Vec<Vec<FlightFile>> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let r = (|| -> Result<()> {
        let mut stream = Vec::new();
        loop {
            let (n, raw) = peek_msg(s, &mut buf)?;
            let Some(n) = n else { break };
            let mut fds = Vec::new();
            for fd in raw {
                fds.push(flight_file(st, pid, tree, at, fd)?);
            }
            if ty == libc::SOCK_STREAM && n == 0 {
                break;
            }
            // Stream bytes merge into one message, except around passed files, which
            // travel with the bytes they were sent with.
            if ty == libc::SOCK_STREAM && fds.is_empty() {
                stream.extend_from_slice(&buf[..n]);
                continue;
            }
            if !stream.is_empty() {
                out.push(hex(&std::mem::take(&mut stream)));
                out_fds.push(Vec::new());
            }
            out.push(hex(&buf[..n]));
            out_fds.push(fds);
        }
        if !stream.is_empty() {
            out.push(hex(&stream));
            out_fds.push(Vec::new());
        }
        Ok(())
    })();
    let _ = net::set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1);
    r?;
    if out_fds.iter().all(|f| f.is_empty()) {
        out_fds.clear();
    }
    Ok((out, out_fds))
}

/// Does any fd of the tree hold the open file description `fd` of ours (named `link`)?
fn shared_with_tree(tree: &[i32], fd: i32, link: &str) -> Result<bool> {
    let me = std::process::id() as i32;
    for &p in tree {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(theirs) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let same_object = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy() == link)
                .unwrap_or(false);
            if same_object && ferry_sys::files::same_file_across(me, fd, p, theirs)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Describe a file that arrived with a peek of the queue of socket `at` (now an fd of ours),
/// then close it. A Unix socket in flight that the tree does not hold is described whole
/// (into `st.flight_socks`); a pipe's buffered bytes are read once.
fn flight_file(
    st: &mut DumpState,
    pid: i32,
    tree: &[i32],
    at: &str,
    owned: OwnedFd,
) -> Result<FlightFile> {
    let fd = owned.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    let get = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut f = FlightFile {
        path: String::new(),
        flags: u32::from_str_radix(&get("flags:"), 8).unwrap_or(0) & !(libc::O_CLOEXEC as u32),
        pos: 0,
        pipe: None,
        pipe_data: None,
        shared: false,
        socket: None,
    };
    let inode_of = |prefix: &str| {
        link.strip_prefix(prefix)
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
    };
    if let Some(inode) = inode_of("pipe:[") {
        f.pipe = Some(inode);
        f.shared = shared_with_tree(tree, fd, &link)?;
        if st.flight_pipes.insert(inode) {
            let (data, capacity) = ferry_sys::files::pipe_peek(std::process::id() as i32, fd)?;
            f.pipe_data = Some(crate::schema::PipeImage {
                inode,
                capacity: capacity as u64,
                data: hex(&data),
            });
        }
        return Ok(f);
    }
    if let Some(inode) = inode_of("socket:[") {
        f.socket = Some(inode);
        // Held by the tree: saved with its holder (before or after this).
        if !st.seen.contains_key(&inode) && !tree.iter().any(|&p| holds_socket(p, inode)) {
            let family = net::get_int(&owned, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
            if family != libc::AF_UNIX {
                return Err(EngineError::Failed(format!(
                    "an {} socket (socket:[{inode}]) in flight (SCM_RIGHTS), which this version \
                     cannot carry (Unix sockets in flight it can)",
                    family_name(family)
                )));
            }
            st.seen.insert(inode, pid);
            let within = format!("the socket in flight on {at}");
            let img = dump_socket(st, pid, &within, &owned, inode, f.flags, tree)?;
            st.flight_socks.push(img);
        }
        return Ok(f);
    }
    let regular = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map(|m| m.is_file() || m.is_dir())
        .unwrap_or(false);
    if !regular || !link.starts_with('/') || link.ends_with(" (deleted)") {
        return Err(EngineError::Failed(format!(
            "a Unix socket with {link} in flight (SCM_RIGHTS); this version carries regular \
             files, directories, pipes and Unix sockets in flight"
        )));
    }
    f.path = link;
    f.pos = get("pos:").parse().unwrap_or(0);
    Ok(f)
}

/// One MSG_PEEK recvmsg: (bytes, or None when the queue is empty; copies of the files that
/// came along, ours now).
fn peek_msg(s: &OwnedFd, buf: &mut [u8]) -> Result<(Option<usize>, Vec<OwnedFd>)> {
    let mut cbuf = [0u8; 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    m.msg_controllen = cbuf.len();
    // SAFETY: m points to valid buffers for the call's duration.
    let rc = unsafe {
        libc::recvmsg(
            s.as_raw_fd(),
            &mut m,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((None, Vec::new()));
        }
        return Err(EngineError::Failed(format!("peeking a Unix socket: {e}")));
    }
    // Fds that came with the peek are ours now: each is described, then closed.
    let mut raw = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let p = libc::CMSG_DATA(c) as *const i32;
                for i in 0..n {
                    raw.push(*p.add(i));
                }
            }
            c = libc::CMSG_NXTHDR(&m, c);
        }
    }
    let files: Vec<OwnedFd> = raw
        .into_iter()
        // SAFETY: each fd was just installed in our process by recvmsg and nothing else
        // owns it.
        .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        .collect();
    if m.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(EngineError::Failed(
            "a Unix socket message carries more files in flight than Ferry can read".into(),
        ));
    }
    Ok((Some(rc as usize), files))
}

/// Send one queued message, with its files when it carried some: files opened here, pipes
/// and sockets built before (`b`).
fn send_queued(b: &Built, s: &OwnedFd, data: &[u8], files: &[FlightFile]) -> Result<()> {
    if files.is_empty() {
        return Ok(net::send_all(s, data, libc::MSG_DONTWAIT)?);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut opened: Vec<OwnedFd> = Vec::new();
    let mut fds: Vec<i32> = Vec::new();
    for f in files {
        if let Some(inode) = f.socket {
            let s = b.socks.get(&inode).ok_or_else(|| {
                EngineError::Failed(format!("the Unix socket:[{inode}] in flight was not built"))
            })?;
            fds.push(s.as_raw_fd());
            continue;
        }
        if let Some(inode) = f.pipe {
            let (r, w) = b.pipes.get(&inode).ok_or_else(|| {
                EngineError::Failed(format!("the pipe:[{inode}] in flight was not built"))
            })?;
            let write = f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
            let end = if write { w } else { r };
            if f.shared {
                fds.push(end.as_raw_fd());
                continue;
            }
            // A description of its own, through /proc: both ends are held here, so the open
            // does not wait for the other end.
            let own = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_CLOEXEC | (f.flags & libc::O_NONBLOCK as u32) as i32)
                .open(format!("/proc/self/fd/{}", end.as_raw_fd()))
                .map_err(|e| {
                    EngineError::Failed(format!("reopening the pipe:[{inode}] in flight: {e}"))
                })?;
            fds.push(own.as_raw_fd());
            opened.push(own.into());
            continue;
        }
        let flags = f.flags & !((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32);
        let file = std::fs::OpenOptions::new()
            .read(flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32)
            .write(flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
            .custom_flags((flags & !(libc::O_ACCMODE as u32)) as i32)
            .open(&f.path)
            .map_err(|e| {
                EngineError::Failed(format!("reopening {} (in flight on a socket): {e}", f.path))
            })?;
        use std::io::Seek;
        let mut file = file;
        let _ = file.seek(std::io::SeekFrom::Start(f.pos));
        fds.push(file.as_raw_fd());
        opened.push(file.into());
    }
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    m.msg_controllen = space;
    // SAFETY: the control buffer has room for one SCM_RIGHTS header and the fds; the
    // message's buffers live for the call.
    let rc = unsafe {
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        libc::sendmsg(s.as_raw_fd(), &m, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if rc < 0 || rc as usize != data.len() {
        return Err(EngineError::Failed(format!(
            "re-queueing a message with files in flight: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Sockets rebuilt in Ferry's process, by inode, until they are handed to their processes.
#[derive(Default)]
pub struct Built {
    pub socks: HashMap<u64, OwnedFd>,
    /// Pipes in flight in Unix socket queues, made here by inode: (read end, write end).
    /// The tree's own fds on these pipes take their ends from here too.
    pub pipes: HashMap<u64, (OwnedFd, OwnedFd)>,
    /// TCP sockets still in repair mode, with the unsent bytes to queue once they leave it.
    pub repairing: Vec<(u64, Vec<u8>)>,
}

impl Built {
    /// Make the repaired connections live: leave repair mode, queue what was not sent yet.
    pub fn go_live(&mut self) -> Result<()> {
        for (inode, unsent) in self.repairing.drain(..) {
            let s = &self.socks[&inode];
            net::set_repair(s, false)?;
            if !unsent.is_empty() {
                with_room(s, unsent.len(), 0, || {
                    net::send_all(s, &unsent, libc::MSG_DONTWAIT)
                })?;
            }
        }
        Ok(())
    }
}

/// Build socket `img` (and its Unix peer, from `all`) here, in the current network namespace.
pub fn build(b: &mut Built, img: &SocketImage, all: &[&SocketImage]) -> Result<()> {
    if b.socks.contains_key(&img.inode) {
        return Ok(());
    }
    let what = |e: ferry_sys::Error| {
        EngineError::Failed(format!(
            "socket:[{}] ({} {} {} -> {}): {e}",
            img.inode,
            family_name(img.family),
            img.state,
            img.local,
            img.peer
        ))
    };
    if img.family == libc::AF_UNIX {
        return build_unix(b, img, all).map_err(|e| match e {
            EngineError::Sys(e) => what(e),
            e => e,
        });
    }
    let s = net::socket(img.family, img.ty, img.protocol).map_err(what)?;
    let r = (|| -> ferry_sys::Result<()> {
        set_opts(&s, img)?;
        match (img.state.as_str(), &img.tcp) {
            ("established", Some(t)) => restore_tcp(b, &s, img, t)?,
            ("listen", _) => {
                net::bind(&s, &raw(&img.local)?)?;
                net::listen(&s, img.backlog.max(1))?;
            }
            ("bound", _) => net::bind(&s, &raw(&img.local)?)?,
            ("connected", _) => {
                if port_of(&img.local) != 0 {
                    net::bind(&s, &raw(&img.local)?)?;
                }
                net::connect(&s, &raw(&img.peer)?)?;
            }
            _ => {}
        }
        net::set_status_flags(&s, img.status_flags as i32)
    })();
    r.map_err(what)?;
    b.socks.insert(img.inode, s);
    Ok(())
}

fn raw(s: &str) -> ferry_sys::Result<Vec<u8>> {
    raw_ip_addr(s).map_err(|e| ferry_sys::Error::Parse(e.to_string()))
}

fn family_name(f: i32) -> &'static str {
    match f {
        libc::AF_INET => "IPv4",
        libc::AF_INET6 => "IPv6",
        libc::AF_UNIX => "Unix",
        _ => "?",
    }
}

fn set_opts(s: &OwnedFd, img: &SocketImage) -> ferry_sys::Result<()> {
    for &(level, opt, v) in &img.opts {
        // Only what differs from a fresh socket, so that defaults stay kernel-managed.
        if net::get_int(s, level, opt).ok() != Some(v) {
            set_opt(s, level, opt, v)?;
        }
    }
    if let Some((on, secs)) = img.linger {
        let lg = libc::linger {
            l_onoff: on,
            l_linger: secs,
        };
        net::setsockopt_raw(s, libc::SOL_SOCKET, libc::SO_LINGER, &[lg])?;
    }
    Ok(())
}

/// Set one saved option. Buffer sizes read back doubled: set half, forced past the sysctl
/// limits (as root) like the original may have been.
fn set_opt(s: &OwnedFd, level: i32, opt: i32, v: i32) -> ferry_sys::Result<()> {
    match (level, opt) {
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => net::set_int(s, level, libc::SO_SNDBUFFORCE, v / 2),
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => net::set_int(s, level, libc::SO_RCVBUFFORCE, v / 2),
        _ => net::set_int(s, level, opt, v),
    }
}

/// Run `f` with buffers large enough for `snd` and `rcv` queued bytes, then put the buffer
/// sizes back (queued data is never dropped by shrinking them).
fn with_room(
    s: &OwnedFd,
    snd: usize,
    rcv: usize,
    f: impl FnOnce() -> ferry_sys::Result<()>,
) -> ferry_sys::Result<()> {
    let sol = libc::SOL_SOCKET;
    let mut undo = Vec::new();
    for (len, opt, force) in [
        (snd, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
        (rcv, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
    ] {
        let cur = net::get_int(s, sol, opt)?;
        // The kernel counts overhead per packet; leave generous room.
        let need = (len * 4 + (256 << 10)).min(i32::MAX as usize / 2) as i32;
        if len > 0 && cur < need {
            net::set_int(s, sol, force, need / 2)?;
            undo.push((force, cur / 2));
        }
    }
    let r = f();
    for (force, v) in undo {
        net::set_int(s, sol, force, v)?;
    }
    r
}

fn restore_tcp(
    b: &mut Built,
    s: &OwnedFd,
    img: &SocketImage,
    t: &TcpState,
) -> ferry_sys::Result<()> {
    let bytes =
        |h: &str| unhex(h, "TCP queue").map_err(|e| ferry_sys::Error::Parse(format!("{e}")));
    let (sent, unsent, recv) = (bytes(&t.sent)?, bytes(&t.unsent)?, bytes(&t.recv)?);
    let tcp = libc::IPPROTO_TCP;
    net::set_repair(s, true)?;
    net::set_repair_queue(s, net::TCP_RECV_QUEUE)?;
    net::set_int(
        s,
        tcp,
        net::TCP_QUEUE_SEQ,
        t.recv_seq.wrapping_sub(recv.len() as u32) as i32,
    )?;
    net::set_repair_queue(s, net::TCP_SEND_QUEUE)?;
    let outq = (sent.len() + unsent.len()) as u32;
    net::set_int(
        s,
        tcp,
        net::TCP_QUEUE_SEQ,
        t.send_seq.wrapping_sub(outq) as i32,
    )?;
    net::bind(s, &raw(&img.local)?)?;
    net::connect(s, &raw(&img.peer)?)?;
    let mut opts: Vec<[u32; 2]> = vec![[net::TCPOPT_MSS, t.mss]];
    if t.options & net::TCPI_OPT_WSCALE != 0 {
        opts.push([
            net::TCPOPT_WINDOW,
            t.snd_wscale as u32 | (t.rcv_wscale as u32) << 16,
        ]);
    }
    if t.options & net::TCPI_OPT_SACK != 0 {
        opts.push([net::TCPOPT_SACK_PERM, 0]);
    }
    if t.options & net::TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([net::TCPOPT_TIMESTAMP, 0]);
    }
    net::setsockopt_raw(s, tcp, net::TCP_REPAIR_OPTIONS, &opts)?;
    if t.options & net::TCPI_OPT_TIMESTAMPS != 0 {
        net::set_int(s, tcp, net::TCP_TIMESTAMP, t.timestamp as i32)?;
    }
    // Sent-unacknowledged bytes go back as already sent; the kernel retransmits them if the
    // peer never got them. Unsent bytes are queued normally once repair mode ends.
    with_room(s, sent.len(), recv.len(), || {
        net::set_repair_queue(s, net::TCP_SEND_QUEUE)?;
        if !sent.is_empty() {
            net::send_all(s, &sent, 0)?;
        }
        net::set_repair_queue(s, net::TCP_RECV_QUEUE)?;
        if !recv.is_empty() {
            net::send_all(s, &recv, 0)?;
        }
        Ok(())
    })?;
    let [snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup] = t.window;
    let w = RepairWindow {
        snd_wl1,
        snd_wnd,
        max_window,
        rcv_wnd,
        rcv_wup,
    };
    net::setsockopt_raw(s, tcp, net::TCP_REPAIR_WINDOW, &[w])?;
    b.repairing.push((img.inode, unsent));
    Ok(())
}

fn build_unix(b: &mut Built, img: &SocketImage, all: &[&SocketImage]) -> Result<()> {
    let name = unhex(&img.local, "Unix socket name")?;
    match img.state.as_str() {
        "connected" => {
            let peer_ino = img.unix_peer.unwrap_or(0);
            let peer = all.iter().find(|p| p.inode == peer_ino).ok_or_else(|| {
                EngineError::Failed(format!(
                    "Unix socket:[{}]: its peer socket:[{peer_ino}] is not in the image",
                    img.inode
                ))
            })?;
            let (a, p) = net::socketpair(img.ty)?;
            b.socks.insert(img.inode, a);
            b.socks.insert(peer.inode, p);
            // What travels in the queues exists before it is sent (this pair included).
            build_flights(b, &img.queue_fds, all)?;
            build_flights(b, &peer.queue_fds, all)?;
            // Each side's queue is written from the other side.
            fill(b, peer.inode, &img.queue, &img.queue_fds)?;
            fill(b, img.inode, &peer.queue, &peer.queue_fds)?;
            for i in [img, *peer] {
                let s = &b.socks[&i.inode];
                let _ = set_opts(s, i);
                net::set_status_flags(s, i.status_flags as i32)?;
            }
        }
        st => {
            let s = net::socket(libc::AF_UNIX, img.ty, 0)?;
            set_opts(&s, img)?;
            if !name.is_empty() {
                if name[0] != 0 {
                    // A stale socket file of the dumped process would make bind fail.
                    let path = String::from_utf8_lossy(&name).to_string();
                    use std::os::unix::fs::FileTypeExt;
                    if std::fs::symlink_metadata(&path)
                        .map(|m| m.file_type().is_socket())
                        .unwrap_or(false)
                    {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                net::bind(&s, &raw_unix_addr(&name))?;
            }
            if st == "listen" {
                net::listen(&s, img.backlog.max(1))?;
            } else if !img.queue.is_empty() {
                return Err(EngineError::Failed(format!(
                    "Unix socket:[{}] has queued data but no peer to send it from",
                    img.inode
                )));
            }
            net::set_status_flags(&s, img.status_flags as i32)?;
            b.socks.insert(img.inode, s);
        }
    }
    Ok(())
}

/// Send `queue` with its files in flight from socket `from` (built already).
fn fill(b: &Built, from: u64, queue: &[String], files: &[Vec<FlightFile>]) -> Result<()> {
    let s = &b.socks[&from];
    for (i, m) in queue.iter().enumerate() {
        let data = unhex(m, "Unix socket queue")?;
        send_queued(
            b,
            s,
            &data,
            files.get(i).map(|v| v.as_slice()).unwrap_or(&[]),
        )?;
    }
    Ok(())
}

/// Build the sockets and pipes in flight in `files` that do not exist yet.
fn build_flights(b: &mut Built, files: &[Vec<FlightFile>], all: &[&SocketImage]) -> Result<()> {
    for f in files.iter().flatten() {
        if let Some(inode) = f.socket.filter(|i| !b.socks.contains_key(i)) {
            let s = all.iter().find(|s| s.inode == inode).ok_or_else(|| {
                EngineError::Failed(format!(
                    "the Unix socket:[{inode}] in flight is not in the image"
                ))
            })?;
            build(b, s, all)?;
        }
        if let Some(inode) = f.pipe.filter(|i| !b.pipes.contains_key(i)) {
            let saved = all
                .iter()
                .flat_map(|s| s.queue_fds.iter().flatten())
                .find_map(|g| g.pipe_data.as_ref().filter(|d| d.inode == inode))
                .ok_or_else(|| {
                    EngineError::Failed(format!(
                        "the pipe:[{inode}] in flight has no saved contents in the image"
                    ))
                })?;
            let data = unhex(&saved.data, "pipe data")?;
            let ends =
                ferry_sys::files::pipe_with(saved.capacity as usize, &data).map_err(|e| {
                    EngineError::Failed(format!("rebuilding the pipe:[{inode}] in flight: {e}"))
                })?;
            b.pipes.insert(inode, ends);
        }
    }
    Ok(())
}

impl SocketImage {
    /// A short view for inspectors: addresses and queue sizes instead of queue contents.
    pub fn summary(&self) -> serde_json::Value {
        let name = |h: &str| {
            String::from_utf8_lossy(&unhex(h, "name").unwrap_or_default())
                .replace('\0', "@")
                .to_string()
        };
        let (local, peer) = if self.family == libc::AF_UNIX {
            (
                name(&self.local),
                self.unix_peer
                    .map(|p| format!("socket:[{p}]"))
                    .unwrap_or_default(),
            )
        } else {
            (self.local.clone(), self.peer.clone())
        };
        let qlen = |h: &str| h.len() / 2;
        let (send_queue, unsent, recv_queue) = match &self.tcp {
            Some(t) => (
                qlen(&t.sent) + qlen(&t.unsent),
                qlen(&t.unsent),
                qlen(&t.recv),
            ),
            None => (0, 0, self.queue.iter().map(|q| qlen(q)).sum()),
        };
        serde_json::json!({
            "inode": self.inode,
            "family": family_name(self.family),
            "type": match self.ty { libc::SOCK_STREAM => "stream", libc::SOCK_DGRAM => "dgram",
                libc::SOCK_SEQPACKET => "seqpacket", _ => "?" },
            "state": self.state,
            "local": local,
            "peer": peer,
            "send_queue": send_queue,
            "unsent": unsent,
            "recv_queue": recv_queue,
            "messages": self.queue.len(),
        })
    }
}
