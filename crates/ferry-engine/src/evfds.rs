//! Event-loop fds: epoll sets (every registered fd with its events and data), timerfds
//! (clock, time left, period, expirations not read), signalfds (mask) and inotify instances
//! (watches by path and mask, with their watch descriptors). All are read from
//! /proc/PID/fdinfo. Timerfds, signalfds and inotify instances are rebuilt in Ferry and handed
//! over; epoll sets are rebuilt inside the process, once all its fds exist.

use crate::ctx::Target;
use crate::{EngineError, Result};
use ferry_sys::net;
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpollItem {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimerFd {
    pub clock: i32,
    /// Expirations not read yet.
    pub ticks: u64,
    /// Time to the next expiration (sec, nsec), relative.
    pub value: (i64, i64),
    pub interval: (i64, i64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
}

fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn pair(v: &str) -> (i64, i64) {
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let mut it = v.split(',').map(|x| x.trim().parse::<i64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// `key:value` tokens of one fdinfo line.
fn tokens(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|t| t.split_once(':'))
}

pub fn dump_timerfd(info: &str) -> TimerFd {
    let interval = pair(field(info, "it_interval:").unwrap_or("(0, 0)"));
    let mut value = pair(field(info, "it_value:").unwrap_or("(0, 0)"));
    let ticks = field(info, "ticks:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // A periodic timer that fired and was not read yet shows no time left: it is forwarded
    // on the next read. Re-arm it one period ahead, keeping the unread expirations.
    if value == (0, 0) && interval != (0, 0) {
        value = interval;
    }
    TimerFd {
        clock: field(info, "clockid:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        ticks,
        value,
        interval,
    }
}

pub fn dump_signalfd(info: &str) -> u64 {
    field(info, "sigmask:")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0)
}

/// The registered fds of an epoll set; each must still be open in the process under the
/// number it was registered with.
pub fn dump_epoll(pid: i32, fd: i32, info: &str) -> Result<Vec<EpollItem>> {
    let mut items = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("tfd:")) {
        // "tfd: N events: X data: Y pos:.. ino:.. sdev:.." (events and data in hex).
        let w: Vec<&str> = l.split_whitespace().collect();
        let get = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
        let tfd: i32 = get("tfd:").and_then(|v| v.parse().ok()).unwrap_or(-1);
        let events = get("events:")
            .and_then(|v| u32::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        let data = get("data:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        let ino = tokens(l)
            .find(|(k, _)| *k == "ino")
            .and_then(|(_, v)| u64::from_str_radix(v, 16).ok());
        let here = std::fs::metadata(format!("/proc/{pid}/fd/{tfd}")).ok();
        use std::os::unix::fs::MetadataExt;
        if here.map(|m| Some(m.ino())) != Some(ino) {
            return Err(EngineError::Unsupported {
                pid,
                what: format!(
                    "epoll fd {fd} watches a file registered as fd {tfd}, which is closed or \
                     reused now; this version cannot carry it"
                ),
            });
        }
        items.push(EpollItem {
            fd: tfd,
            events,
            data,
        });
    }
    Ok(items)
}

/// The mount point (in the process's view) of the filesystem with device `sdev` (kernel
/// dev_t: major << 20 | minor).
fn mount_of(pid: i32, sdev: u64) -> Option<String> {
    let (maj, min) = (sdev >> 20, sdev & 0xfffff);
    let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    mi.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.get(2) == Some(&format!("{maj}:{min}").as_str()))
            .then(|| format!("/proc/{pid}/root{}", w.get(4).unwrap_or(&"/")))
    })
}

pub fn dump_inotify(pid: i32, fd: i32, info: &str) -> Result<Vec<InotifyWatch>> {
    let mut out = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("inotify ")) {
        let t: std::collections::HashMap<&str, &str> = tokens(l).collect();
        let hex = |k: &str| t.get(k).and_then(|v| u64::from_str_radix(v, 16).ok());
        let wd: i32 = t.get("wd").and_then(|v| v.parse().ok()).unwrap_or(-1);
        let mask = hex("mask").unwrap_or(0) as u32;
        let sdev = hex("sdev").unwrap_or(0);
        let htype: i32 = t
            .get("fhandle-type")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let handle: Vec<u8> = t
            .get("f_handle")
            .map(|h| {
                (0..h.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
                    .collect()
            })
            .unwrap_or_default();
        let path = mount_of(pid, sdev)
            .and_then(|m| net::path_of_handle(&m, htype, &handle).ok())
            .ok_or_else(|| EngineError::Unsupported {
                pid,
                what: format!(
                    "inotify fd {fd}: watch {wd} is on a file that cannot be found by its \
                     handle (deleted?)"
                ),
            })?;
        out.push(InotifyWatch { wd, mask, path });
    }
    Ok(out)
}

pub fn build_timerfd(t: &TimerFd, flags: u32) -> Result<OwnedFd> {
    let fl = (flags & libc::O_NONBLOCK as u32) as i32;
    let fd = net::timerfd(t.clock, fl, t.interval, t.value)?;
    if t.ticks > 0 {
        net::timerfd_set_ticks(&fd, t.ticks)?;
    }
    Ok(fd)
}

pub fn build_signalfd(mask: u64, flags: u32) -> Result<OwnedFd> {
    Ok(net::signalfd(
        mask,
        (flags & libc::O_NONBLOCK as u32) as i32,
    )?)
}

/// An inotify instance with the same watches under the same watch descriptors: descriptors
/// are handed out in increasing order, so watches are added (and dropped) until each lands
/// on its number.
pub fn build_inotify(watches: &[InotifyWatch], flags: u32) -> Result<OwnedFd> {
    let fd = net::inotify((flags & libc::O_NONBLOCK as u32) as i32)?;
    let mut ws: Vec<&InotifyWatch> = watches.iter().collect();
    ws.sort_by_key(|w| w.wd);
    for w in ws {
        let mut tries = 0;
        loop {
            let got = net::inotify_add_watch(&fd, &w.path, w.mask)?;
            if got == w.wd {
                break;
            }
            if got > w.wd || tries > 100_000 {
                return Err(EngineError::Failed(format!(
                    "inotify watch on {} came back as {got}, not {}",
                    w.path, w.wd
                )));
            }
            net::inotify_rm_watch(&fd, got)?;
            tries += 1;
        }
    }
    Ok(fd)
}

/// Register the saved items; every fd of the process exists by now. The calls are queued,
/// the events staged in the batch data area: the caller runs them with what else it queued.
pub fn fill_epoll(t: &mut Target, fd: i32, items: &[EpollItem]) -> Result<()> {
    // struct epoll_event is packed on x86-64: u32 events, u64 data.
    const EV: usize = 12;
    for part in items.chunks(1024) {
        let mut evs = Vec::with_capacity(part.len() * EV);
        for it in part {
            evs.extend_from_slice(&it.events.to_le_bytes());
            evs.extend_from_slice(&it.data.to_le_bytes());
        }
        let base = t.stage(&evs)?;
        for (i, it) in part.iter().enumerate() {
            t.queue(
                format!("epoll_ctl(ADD) of fd {} to epoll fd {fd}", it.fd),
                libc::SYS_epoll_ctl,
                [
                    fd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    it.fd as u64,
                    base + (i * EV) as u64,
                    0,
                    0,
                ],
            )?;
        }
    }
    Ok(())
}
