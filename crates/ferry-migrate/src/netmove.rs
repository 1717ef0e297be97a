//! Moving a service address with the process: the source takes it off the workload's
//! network namespace once the tree is frozen; the agent puts it on its own interface in the
//! same subnet and announces it (gratuitous ARP), so that clients' established connections
//! follow. Any failure before the process runs at the destination puts it back at the source.
//! Addresses are read and changed with rtnetlink: a few microseconds, where running `ip`
//! cost milliseconds of the downtime.

use crate::{MigrateError, Result};
use ferry_sys::net::{change_addr, in_netns, ipv4_addrs, IfAddr};
use std::net::Ipv4Addr;

fn sys(e: ferry_sys::Error) -> MigrateError {
    MigrateError::Engine(e.into())
}

fn parse(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let a = a
        .parse()
        .map_err(|_| MigrateError::Failed(format!("bad IPv4 address {cidr:?}")))?;
    let p = p
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| MigrateError::Failed(format!("bad prefix in {cidr:?}")))?;
    Ok((a, p))
}

/// An address taken off the source's namespace: `restore` puts it back.
pub struct Released {
    netns: String,
    at: IfAddr,
}

/// Take the address of `cidr` off whichever interface holds it in the namespace at `netns`.
pub fn release(netns: &str, cidr: &str) -> Result<Released> {
    let (want, _) = parse(cidr)?;
    let at = in_netns(Some(netns), || {
        let at = ipv4_addrs()?.into_iter().find(|a| a.addr == want);
        if let Some(a) = &at {
            change_addr(false, a.ifindex, a.addr, a.prefix)?;
        }
        Ok(at)
    })
    .map_err(sys)?
    .ok_or_else(|| {
        MigrateError::Failed(format!(
            "address {cidr} is not on any interface of the process's network namespace"
        ))
    })?;
    Ok(Released {
        netns: netns.to_string(),
        at,
    })
}

impl Released {
    pub fn restore(self) {
        let a = self.at;
        let _ = in_netns(Some(&self.netns), || {
            change_addr(true, a.ifindex, a.addr, a.prefix)
        });
    }
}

/// An address put on one of our interfaces: removed again on drop unless `keep`.
pub struct Claimed {
    ifindex: u32,
    addr: Ipv4Addr,
    prefix: u8,
    keep: bool,
    /// The socket the announcement went out on.
    garp: Option<std::os::fd::OwnedFd>,
}

/// Put `cidr` on our interface in its subnet (in the calling thread's namespace) and announce
/// it.
pub fn claim(cidr: &str) -> Result<Claimed> {
    let (want, prefix) = parse(cidr)?;
    let mask = |p: u8| {
        if p == 0 {
            0
        } else {
            u32::MAX << (32 - p as u32)
        }
    };
    let dev = ipv4_addrs()
        .map_err(sys)?
        .into_iter()
        .find(|a| {
            a.ifname != "lo" && {
                let m = mask(a.prefix.min(prefix));
                u32::from(a.addr) & m == u32::from(want) & m
            }
        })
        .ok_or_else(|| {
            MigrateError::Failed(format!(
                "no interface here is on the subnet of {cidr}: the address cannot move here"
            ))
        })?;
    change_addr(true, dev.ifindex, want, prefix).map_err(sys)?;
    let mut c = Claimed {
        ifindex: dev.ifindex,
        addr: want,
        prefix,
        keep: false,
        garp: None,
    };
    c.garp = Some(ferry_sys::net::send_garp(&dev.ifname, want).map_err(sys)?);
    Ok(c)
}

impl Claimed {
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        // Closed on a thread of its own: closing a packet socket takes 10-20 ms.
        if let Some(s) = self.garp.take() {
            std::thread::spawn(move || drop(s));
        }
        if !self.keep {
            let _ = change_addr(false, self.ifindex, self.addr, self.prefix);
        }
    }
}
