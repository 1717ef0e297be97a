//! Blocking a dumped tree's TCP traffic with nftables between the freeze and the restore, so
//! that the kernel answers nothing (no RST) to peers while the sockets are gone, and new
//! connection attempts wait (their SYNs are dropped and retried) instead of being refused.
//!
//! One table, `inet ferry_<root pid>`, in each network namespace that holds a socket of the
//! tree. The dump lifts it when the tree keeps running (failure, `--leave-running`); after a
//! kill it stays until the restore, which lifts it once the connections are live again.

use crate::sockets::DumpState;
use crate::{EngineError, Result};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// The rules for one network namespace.
pub struct Block {
    /// The namespace, held open: it outlives a killed tree.
    ns: std::fs::File,
    ns_ino: u64,
    input: Vec<String>,
    output: Vec<String>,
    /// Established connections as (local address, peer address, local port, peer port),
    /// IPv4 (v4-mapped included) and IPv6: matched through one set per family and direction.
    conns4: Vec<(String, String, u16, u16)>,
    conns6: Vec<(String, String, u16, u16)>,
    pub applied: bool,
}

pub fn table_name(root: i32) -> String {
    format!("ferry_{root}")
}

fn parse(a: &str) -> Result<SocketAddr> {
    a.parse()
        .map_err(|_| EngineError::Failed(format!("odd socket address {a:?}")))
}

/// `ip saddr X` / `ip6 saddr X`, with v4-mapped v6 addresses as the IPv4 they are on the wire.
fn match_ip(dir: &str, ip: IpAddr) -> Option<String> {
    if ip.is_unspecified() {
        return None;
    }
    Some(match ip {
        IpAddr::V4(v) => format!("ip {dir} {v}"),
        IpAddr::V6(v) => match v.to_ipv4_mapped() {
            Some(v4) => format!("ip {dir} {v4}"),
            None => format!("ip6 {dir} {v}"),
        },
    })
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
        output: Vec::new(),
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
    match (v4(l.ip()), v4(p.ip())) {
        (Some(a), Some(c)) => b
            .conns4
            .push((a.to_string(), c.to_string(), l.port(), p.port())),
        _ => b
            .conns6
            .push((l.ip().to_string(), p.ip().to_string(), l.port(), p.port())),
    }
    Ok(())
}

/// Drop new connection attempts to a listener: clients retry their SYN later.
pub fn add_listener(st: &mut DumpState, pid: i32, local: &str) -> Result<()> {
    let l = parse(local)?;
    let b = block_of(st, pid)?;
    let mut r: Vec<String> = Vec::new();
    r.extend(match_ip("daddr", l.ip()));
    r.push(format!(
        "tcp dport {} tcp flags & (syn | ack) == syn drop",
        l.port()
    ));
    b.input.push(r.join(" "));
    Ok(())
}

/// Run an nft script inside the namespace held by `ns`.
fn nft(ns: &std::fs::File, script: &str) -> Result<()> {
    let path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
    let mut child = Command::new("nsenter")
        .arg(format!("--net={path}"))
        .args(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EngineError::Failed(format!("running nsenter/nft (install nftables): {e}")))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .map_err(|e| EngineError::Failed(format!("writing to nft: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| EngineError::Failed(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(EngineError::Failed(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Install every block (one nft transaction per namespace).
pub fn apply(blocks: &mut [Block], table: &str) -> Result<()> {
    for b in blocks.iter_mut().filter(|b| {
        !b.input.is_empty() || !b.output.is_empty() || !b.conns4.is_empty() || !b.conns6.is_empty()
    }) {
        // One rule per family and direction, matching a set of connections: nft handles
        // thousands of them in one transaction.
        let mut input = b.input.clone();
        let mut output = b.output.clone();
        for (fam, conns) in [("ip", &b.conns4), ("ip6", &b.conns6)] {
            if conns.is_empty() {
                continue;
            }
            let rule = |incoming: bool| {
                let elems: Vec<String> = conns
                    .iter()
                    .map(|(l, p, lp, pp)| {
                        if incoming {
                            format!("{p} . {l} . {pp} . {lp}")
                        } else {
                            format!("{l} . {p} . {lp} . {pp}")
                        }
                    })
                    .collect();
                format!(
                    "{fam} saddr . {fam} daddr . tcp sport . tcp dport {{ {} }} drop",
                    elems.join(", ")
                )
            };
            input.push(rule(true));
            output.push(rule(false));
        }
        let mut s = format!(
            "table inet {table} {{\n chain input {{ type filter hook input priority -400; policy accept;\n"
        );
        for r in &input {
            s += &format!("  {r}\n");
        }
        s += " }\n chain output { type filter hook output priority -400; policy accept;\n";
        for r in &output {
            s += &format!("  {r}\n");
        }
        s += " }\n}\n";
        nft(&b.ns, &s)
            .map_err(|e| EngineError::Failed(format!("blocking the tree's TCP traffic: {e}")))?;
        b.applied = true;
    }
    Ok(())
}

/// Remove the blocks installed by `apply`.
pub fn lift(blocks: &mut [Block], table: &str) {
    for b in blocks.iter_mut().filter(|b| b.applied) {
        if nft(&b.ns, &format!("delete table inet {table}\n")).is_ok() {
            b.applied = false;
        }
    }
}

/// At restore: remove a block left by the dump in the current network namespace, if any.
/// One `nft` run, straight in this thread's namespace (a child forked here is in it too):
/// this is part of the downtime.
pub fn lift_here(table: &str) -> Result<bool> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", table])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| EngineError::Failed(format!("running nft (install nftables): {e}")))?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") {
        return Ok(false);
    }
    Err(EngineError::Failed(format!(
        "nft delete table inet {table}: {}",
        err.trim()
    )))
}
