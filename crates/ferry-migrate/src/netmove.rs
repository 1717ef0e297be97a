//! Moving a service address with the process: the source takes it off the workload's
//! network namespace once the tree is frozen; the agent puts it on its own interface in the
//! same subnet and announces it (gratuitous ARP), so that clients' established connections
//! follow. Any failure before the process runs at the destination puts it back at the source.

use crate::{MigrateError, Result};
use std::process::Command;

/// `ip -o -4 addr show` in the namespace at `netns` (None: ours): (device, address/prefix).
fn addresses(netns: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let out = c
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| MigrateError::Failed(format!("running ip (install iproute2): {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet")?;
            Some((
                w.get(1)?.trim_end_matches(':').to_string(),
                w.get(i + 1)?.to_string(),
            ))
        })
        .collect())
}

fn ip(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let out = c
        .args(args)
        .output()
        .map_err(|e| MigrateError::Failed(format!("running ip: {e}")))?;
    if !out.status.success() {
        return Err(MigrateError::Failed(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn parse(cidr: &str) -> Result<(std::net::Ipv4Addr, u8)> {
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

/// An address taken off the source, to put back if the move fails.
pub struct Released {
    netns: String,
    dev: String,
    cidr: String,
}

/// Take `cidr` off the interface that holds it in the namespace at `netns`.
pub fn release(netns: &str, cidr: &str) -> Result<Released> {
    let (want, _) = parse(cidr)?;
    let (dev, have) = addresses(Some(netns))?
        .into_iter()
        .find(|(_, a)| parse(a).map(|(x, _)| x == want).unwrap_or(false))
        .ok_or_else(|| {
            MigrateError::Failed(format!(
                "address {cidr} is not on any interface of the process's network namespace"
            ))
        })?;
    ip(Some(netns), &["addr", "del", &have, "dev", &dev])?;
    Ok(Released {
        netns: netns.to_string(),
        dev,
        cidr: have,
    })
}

impl Released {
    /// Put it back (the move failed).
    pub fn restore(self) {
        let _ = ip(
            Some(&self.netns),
            &["addr", "add", &self.cidr, "dev", &self.dev],
        );
    }
}

/// An address put on one of our interfaces, removed again if the move fails.
pub struct Claimed {
    dev: String,
    cidr: String,
    keep: bool,
}

/// Put `cidr` on the interface of ours whose subnet contains it, and announce it.
pub fn claim(cidr: &str) -> Result<Claimed> {
    let (want, prefix) = parse(cidr)?;
    let mask = |p: u8| {
        if p == 0 {
            0
        } else {
            u32::MAX << (32 - p as u32)
        }
    };
    let dev = addresses(None)?
        .into_iter()
        .find(|(d, a)| {
            d != "lo"
                && parse(a)
                    .map(|(x, p)| {
                        let m = mask(p.min(prefix));
                        u32::from(x) & m == u32::from(want) & m
                    })
                    .unwrap_or(false)
        })
        .map(|(d, _)| d)
        .ok_or_else(|| {
            MigrateError::Failed(format!(
                "no interface here is on the subnet of {cidr}: the address cannot move here"
            ))
        })?;
    let full = format!("{want}/{prefix}");
    ip(None, &["addr", "add", &full, "dev", &dev])?;
    let c = Claimed {
        dev: dev.clone(),
        cidr: full,
        keep: false,
    };
    ferry_sys::net::send_garp(&dev, want).map_err(ferry_engine::EngineError::from)?;
    Ok(c)
}

impl Claimed {
    /// The process runs here now: the address stays.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ip(None, &["addr", "del", &self.cidr, "dev", &self.dev]);
        }
    }
}
