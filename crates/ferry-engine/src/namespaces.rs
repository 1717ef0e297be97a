//! Namespaces the dumped tree made for itself. The network namespace is chosen by the caller
//! at restore (`--netns`); UTS (with its host and domain names) and IPC namespaces are
//! recreated around the restored tree. A tree in a mount namespace of its own is restored in
//! Ferry's, with the paths it saw: this is recorded and reported.

use crate::ctx::Target;
use crate::{EngineError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Namespaces {
    /// Host and domain name of the tree's own UTS namespace.
    #[serde(default)]
    pub uts: Option<(String, String)>,
    /// The tree had an IPC namespace of its own (System V objects are not carried).
    #[serde(default)]
    pub ipc: bool,
    /// The tree had a network namespace of its own (its inode, for the record).
    #[serde(default)]
    pub net: Option<u64>,
    /// The tree had a mount namespace of its own.
    #[serde(default)]
    pub mnt: bool,
}

fn own(pid: i32, kind: &str) -> Result<Option<u64>> {
    let theirs = ferry_sys::net::ns_id(&format!("/proc/{pid}/ns/{kind}"))?;
    let ours = ferry_sys::net::ns_id(&format!("/proc/self/ns/{kind}"))?;
    Ok((theirs != ours).then_some(theirs.1))
}

pub fn dump(pid: i32) -> Result<Namespaces> {
    let mut ns = Namespaces::default();
    if own(pid, "uts")?.is_some() {
        let read = |f: &str| {
            std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| ferry_sys::Error::Parse(format!("reading {f}: {e}")))
        };
        ns.uts = Some(ferry_sys::net::in_ns(
            &format!("/proc/{pid}/ns/uts"),
            libc::CLONE_NEWUTS,
            || {
                Ok((
                    read("/proc/sys/kernel/hostname")?,
                    read("/proc/sys/kernel/domainname")?,
                ))
            },
        )?);
    }
    ns.ipc = own(pid, "ipc")?.is_some();
    ns.net = own(pid, "net")?;
    ns.mnt = own(pid, "mnt")?.is_some();
    Ok(ns)
}

/// In the root stub, before it forks anything: new UTS and IPC namespaces as saved, and a
/// mount namespace of its own (a copy of Ferry's: the mounts the tree made privately are not
/// carried) when it had one.
pub fn restore(t: &mut Target, ns: &Namespaces) -> Result<()> {
    let mut flags = 0;
    if ns.mnt {
        flags |= libc::CLONE_NEWNS;
    }
    if ns.uts.is_some() {
        flags |= libc::CLONE_NEWUTS;
    }
    if ns.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if flags == 0 {
        return Ok(());
    }
    t.sys(
        "unshare of UTS/IPC/mount namespaces",
        libc::SYS_unshare,
        [flags as u64, 0, 0, 0, 0, 0],
    )?;
    if let Some((host, domain)) = &ns.uts {
        for (name, nr, what) in [
            (host, libc::SYS_sethostname, "sethostname"),
            (domain, libc::SYS_setdomainname, "setdomainname"),
        ] {
            if name.len() > 64 {
                return Err(EngineError::Failed(format!(
                    "{what}: name too long: {name}"
                )));
            }
            let at = t.put_path(name)?;
            t.sys(what, nr, [at, name.len() as u64, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}

/// Every member of the tree must share the root's namespaces: one set is carried.
pub fn check_tree(pids: &[i32]) -> Result<()> {
    for &p in &pids[1..] {
        for kind in ["uts", "ipc", "net", "mnt", "pid", "user"] {
            let a = ferry_sys::net::ns_id(&format!("/proc/{}/ns/{kind}", pids[0]))?;
            let b = ferry_sys::net::ns_id(&format!("/proc/{p}/ns/{kind}"))?;
            if a != b {
                return Err(EngineError::Unsupported {
                    pid: p,
                    what: format!(
                        "it is in another {kind} namespace than the root of the tree {}; \
                         this version carries one set of namespaces per tree",
                        pids[0]
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `--netns new:NAME`: a fresh, named network namespace (/run/netns/NAME) for a restore, with
/// loopback up holding every address the tree's IP sockets are bound to (as host routes),
/// so that they bind; the caller wires it to the world (veth, routes). Returns its
/// path. Fails if the name is taken.
pub fn fresh_netns(name: &str, imgs: &[crate::schema::ProcessImage]) -> Result<String> {
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| EngineError::Failed(format!("running ip (install iproute2): {e}")))?;
        if !out.status.success() {
            return Err(EngineError::Failed(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    if name.is_empty() || name.contains('/') {
        return Err(EngineError::Failed(format!("bad namespace name {name:?}")));
    }
    ip(&["netns", "add", name])?;
    let r = (|| -> Result<()> {
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        let mut addrs: Vec<std::net::IpAddr> = imgs
            .iter()
            .flat_map(|i| i.sockets.iter())
            .filter(|s| s.family == libc::AF_INET || s.family == libc::AF_INET6)
            .filter_map(|s| s.local.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .map(|ip| match ip {
                std::net::IpAddr::V6(v) => {
                    v.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip)
                }
                v => v,
            })
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Ok(());
        }
        for a in addrs {
            let cidr = match a {
                std::net::IpAddr::V4(v) => format!("{v}/32"),
                std::net::IpAddr::V6(v) => format!("{v}/128"),
            };
            let mut args = vec!["-n", name, "addr", "add", cidr.as_str(), "dev", "lo"];
            if a.is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = ip(&["netns", "del", name]);
        return Err(e);
    }
    Ok(format!("/run/netns/{name}"))
}
