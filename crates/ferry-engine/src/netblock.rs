//! Blocking a dumped tree's TCP traffic with nftables between the freeze and the restore, so
//! that the kernel answers nothing (no RST) to peers while the sockets are gone, and new
//! connection attempts wait (their SYNs are dropped and retried) instead of being refused.
//!
//! One table, `inet ferry_<root pid>`, in each network namespace that holds a socket of the
//! tree. The dump lifts it when the tree keeps running (failure, `--leave-running`); after a
//! kill it stays until the restore, which lifts it once the connections are live again.

use crate::sockets::DumpState;
use crate::{EngineError, Result};
use ferry_sys::nft::{self, Expr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

/// The rules for one network namespace.
pub struct Block {
    /// The namespace, held open: it outlives a killed tree.
    ns: std::fs::File,
    ns_ino: u64,
    /// Rules of the input chain (listeners' SYNs).
    input: Vec<Vec<Expr>>,
    /// Established connections as (local address, peer address, local port, peer port),
    /// IPv4 (v4-mapped included) and IPv6: matched through one set per family, which holds
    /// both directions of each.
    conns4: Vec<(Ipv4Addr, Ipv4Addr, u16, u16)>,
    conns6: Vec<(Ipv6Addr, Ipv6Addr, u16, u16)>,
    pub applied: bool,
}

pub fn table_name(root: i32) -> String {
    format!("ferry_{root}")
}

fn parse(a: &str) -> Result<SocketAddr> {
    a.parse()
        .map_err(|_| EngineError::Failed(format!("odd socket address {a:?}")))
}

/// `meta nfproto` is `fam` (ipv4 or ipv6).
fn family(fam: u8) -> [Expr; 2] {
    [
        Expr::Meta {
            key: nft::META_NFPROTO,
            dreg: nft::REG32_00,
        },
        Expr::Eq {
            sreg: nft::REG32_00,
            data: vec![fam],
        },
    ]
}

/// `meta l4proto tcp`.
fn tcp() -> [Expr; 2] {
    [
        Expr::Meta {
            key: nft::META_L4PROTO,
            dreg: nft::REG32_00,
        },
        Expr::Eq {
            sreg: nft::REG32_00,
            data: vec![libc::IPPROTO_TCP as u8],
        },
    ]
}

fn load(base: u32, offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg,
    }
}

/// The destination address is `ip`, v4-mapped v6 addresses matched as the IPv4 they are on
/// the wire; nothing when `ip` is unspecified.
fn match_daddr(ip: IpAddr) -> Vec<Expr> {
    if ip.is_unspecified() {
        return Vec::new();
    }
    let (fam, offset, bytes) = match ip {
        IpAddr::V4(v) => (nft::NFPROTO_IPV4, 16, v.octets().to_vec()),
        IpAddr::V6(v) => match v.to_ipv4_mapped() {
            Some(v4) => (nft::NFPROTO_IPV4, 16, v4.octets().to_vec()),
            None => (nft::NFPROTO_IPV6, 24, v.octets().to_vec()),
        },
    };
    let mut r = family(fam).to_vec();
    r.push(load(
        nft::NETWORK_HEADER,
        offset,
        bytes.len() as u32,
        nft::REG32_00,
    ));
    r.push(Expr::Eq {
        sreg: nft::REG32_00,
        data: bytes,
    });
    r
}

fn block_of(st: &mut DumpState, pid: i32) -> Result<&mut Block> {
    let path = format!("/proc/{pid}/ns/net");
    let (_, ino) = ferry_sys::net::ns_id(&path)?;
    if let Some(i) = st.blocks.iter().position(|b| b.ns_ino == ino) {
        return Ok(&mut st.blocks[i]);
    }
    let ns = std::fs::File::open(&path)
        .map_err(|e| EngineError::Failed(format!("opening {path}: {e}")))?;
    st.blocks.push(Block {
        ns,
        ns_ino: ino,
        input: Vec::new(),
        conns4: Vec::new(),
        conns6: Vec::new(),
        applied: false,
    });
    Ok(st.blocks.last_mut().unwrap())
}

/// Block an established connection both ways.
pub fn add_conn(st: &mut DumpState, pid: i32, local: &str, peer: &str) -> Result<()> {
    let (l, p) = (parse(local)?, parse(peer)?);
    let b = block_of(st, pid)?;
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    };
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    };
    match (v4(l.ip()), v4(p.ip())) {
        (Some(a), Some(c)) => b.conns4.push((a, c, l.port(), p.port())),
        _ => b.conns6.push((v6(l.ip()), v6(p.ip()), l.port(), p.port())),
    }
    Ok(())
}

/// Drop new connection attempts to a listener: clients retry their SYN later.
pub fn add_listener(st: &mut DumpState, pid: i32, local: &str) -> Result<()> {
    let l = parse(local)?;
    let b = block_of(st, pid)?;
    let mut r = match_daddr(l.ip());
    r.extend(tcp());
    r.push(load(nft::TRANSPORT_HEADER, 2, 2, nft::REG32_00));
    r.push(Expr::Eq {
        sreg: nft::REG32_00,
        data: l.port().to_be_bytes().to_vec(),
    });
    // tcp flags & (syn | ack) == syn
    r.push(load(nft::TRANSPORT_HEADER, 13, 1, nft::REG32_00));
    r.push(Expr::Bitwise {
        sreg: nft::REG32_00,
        dreg: nft::REG32_00,
        mask: vec![0x12],
        xor: vec![0],
    });
    r.push(Expr::Eq {
        sreg: nft::REG32_00,
        data: vec![0x02],
    });
    r.push(Expr::Drop);
    b.input.push(r);
    Ok(())
}

/// A set key: both addresses, then both ports, each port padded to 4 bytes as nftables
/// keeps it in its registers.
fn key(a: &[u8], b: &[u8], pa: u16, pb: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 * a.len() + 8);
    k.extend_from_slice(a);
    k.extend_from_slice(b);
    k.extend_from_slice(&pa.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k.extend_from_slice(&pb.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// The set keys of connections (local, peer, local port, peer port): each in both
/// directions, as a packet in or out shows it.
fn both_ways(conns: impl Iterator<Item = (Vec<u8>, Vec<u8>, u16, u16)>) -> Vec<Vec<u8>> {
    conns
        .flat_map(|(l, p, lp, pp)| [key(&p, &l, pp, lp), key(&l, &p, lp, pp)])
        .collect()
}

/// `ip saddr . ip daddr . tcp sport . tcp dport @set drop` (or ip6), for a set of
/// `alen`-byte addresses.
fn conn_rule(fam: u8, alen: u32, set: &str, set_id: u32) -> Vec<Expr> {
    let off = if fam == nft::NFPROTO_IPV4 { 12 } else { 8 };
    let r0 = nft::REG32_00;
    let mut r = family(fam).to_vec();
    r.extend(tcp());
    r.push(load(nft::NETWORK_HEADER, off, alen, r0));
    r.push(load(nft::NETWORK_HEADER, off + alen, alen, r0 + alen / 4));
    r.push(load(nft::TRANSPORT_HEADER, 0, 2, r0 + 2 * alen / 4));
    r.push(load(nft::TRANSPORT_HEADER, 2, 2, r0 + 2 * alen / 4 + 1));
    r.push(Expr::Lookup {
        set: set.into(),
        set_id,
        sreg: r0,
    });
    r.push(Expr::Drop);
    r
}

/// The transaction that installs a block: a table with an input and an output chain ahead of
/// everything else (priority -400), listeners' rules, and the connections' sets.
fn batch(b: &Block, table: &str) -> nft::Batch {
    let mut t = nft::Batch::new();
    t.add_table(table);
    t.add_base_chain(table, "input", nft::HOOK_INPUT, -400);
    t.add_base_chain(table, "output", nft::HOOK_OUTPUT, -400);
    for r in &b.input {
        t.add_rule(table, "input", r);
    }
    let concat =
        |a: u32| ((a << 6 | a) << 6 | nft::TYPE_INET_SERVICE) << 6 | nft::TYPE_INET_SERVICE;
    let keys4 = both_ways(
        b.conns4
            .iter()
            .map(|(l, p, lp, pp)| (l.octets().to_vec(), p.octets().to_vec(), *lp, *pp)),
    );
    let keys6 = both_ways(
        b.conns6
            .iter()
            .map(|(l, p, lp, pp)| (l.octets().to_vec(), p.octets().to_vec(), *lp, *pp)),
    );
    for (id, fam, alen, ty, name, keys) in [
        (1, nft::NFPROTO_IPV4, 4, nft::TYPE_IPADDR, "conns4", keys4),
        (2, nft::NFPROTO_IPV6, 16, nft::TYPE_IP6ADDR, "conns6", keys6),
    ] {
        if keys.is_empty() {
            continue;
        }
        t.add_set(table, name, id, concat(ty), keys[0].len() as u32);
        t.add_set_keys(table, name, id, &keys);
        for chain in ["input", "output"] {
            t.add_rule(table, chain, &conn_rule(fam, alen, name, id));
        }
    }
    t
}

/// Run `f` in the namespace held by `ns`.
fn in_ns<R: Send>(ns: &std::fs::File, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
    let mut out = None;
    ferry_sys::net::in_ns(&path, libc::CLONE_NEWNET, || {
        out = Some(f());
        Ok(())
    })?;
    out.unwrap_or_else(|| Err(EngineError::Failed("entering a network namespace".into())))
}

/// Install every block (one transaction per namespace).
pub fn apply(blocks: &mut [Block], table: &str) -> Result<()> {
    for b in blocks
        .iter_mut()
        .filter(|b| !b.input.is_empty() || !b.conns4.is_empty() || !b.conns6.is_empty())
    {
        let t = batch(b, table);
        in_ns(&b.ns, || {
            ferry_sys::timeline::mark(|| "netblock: in netns".into());
            Ok(t.commit(&format!(
                "blocking the tree's TCP traffic (table inet {table})"
            ))?)
        })?;
        b.applied = true;
    }
    Ok(())
}

/// Open a block at once: an `accept` rule put first in both chains takes effect in
/// microseconds, where removing anything from nf_tables waits for an RCU grace period (10-20
/// ms here). The table itself is deleted afterwards, in the background (`finish_lifts`).
fn open(table: &str) -> Result<()> {
    let mut t = nft::Batch::new();
    for chain in ["input", "output"] {
        t.insert_rule(table, chain, &[Expr::Accept]);
    }
    Ok(t.commit(&format!(
        "lifting the block of the tree's TCP traffic (table inet {table})"
    ))?)
}

/// Deletions of opened blocks still under way.
static PENDING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Delete `table` on a thread of its own in the namespace `ns` (None: the caller's).
fn delete_later(ns: Option<std::fs::File>, table: &str) {
    let table = table.to_string();
    // A new thread starts in its creator's network namespace; `ns` moves it elsewhere.
    let h = std::thread::spawn(move || {
        if let Some(ns) = ns {
            let path = format!("/proc/self/fd/{}", ns.as_raw_fd());
            if ferry_sys::net::enter_netns(&path).is_err() {
                return;
            }
        }
        let _ = nft::delete_table(&table);
    });
    PENDING.lock().unwrap().push(h);
}

/// Wait until every opened block's table is deleted: before the process exits.
pub fn finish_lifts() {
    let hs = std::mem::take(&mut *PENDING.lock().unwrap());
    for h in hs {
        let _ = h.join();
    }
}

/// Remove the blocks installed by `apply`.
pub fn lift(blocks: &mut [Block], table: &str) {
    for b in blocks.iter_mut().filter(|b| b.applied) {
        if in_ns(&b.ns, || open(table)).is_ok() {
            b.applied = false;
            delete_later(b.ns.try_clone().ok(), table);
        }
    }
}

/// At restore: remove a block left by the dump in the current network namespace, if any.
/// Straight in this thread's namespace: this is part of the downtime, so it only opens the
/// block; the table goes in the background.
pub fn lift_here(table: &str) -> Result<bool> {
    if !nft::table_exists(table)? {
        return Ok(false);
    }
    open(table)?;
    delete_later(None, table);
    Ok(true)
}
