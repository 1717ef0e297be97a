//! Post-copy's page connection: a second stream to the agent on which it asks for pages left
//! in the frozen source process, and the source answers from that process's memory, in the
//! order asked. Requests come from the agent's filler (faults first, then runs ahead of need);
//! filling ahead asks for the next run before it writes the current one, so a few requests
//! may be on their way at once, and the source reads while the agent writes.

use crate::api::Hello;
use crate::tls::{ClientTls, Conn, ConnReader, ConnWriter};
use crate::wire::{self, Kind, MAX_PAYLOAD};
use crate::{io, MigrateError, Result};
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the agent waits for pages before it gives up (and kills the tree it built).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

fn request(pid: i32, addr: u64, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&(pid as u32).to_le_bytes());
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b
}

fn parse_request(b: &[u8]) -> Result<(i32, u64, usize)> {
    if b.len() != 16 {
        return Err(MigrateError::Protocol(format!(
            "page request of {} bytes (want 16)",
            b.len()
        )));
    }
    let pid = u32::from_le_bytes(b[0..4].try_into().unwrap()) as i32;
    let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
    let addr = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if len == 0 || len > MAX_PAYLOAD || !len.is_multiple_of(4096) || !addr.is_multiple_of(4096) {
        return Err(MigrateError::Protocol(format!(
            "bad page request: {len} bytes at {addr:#x}"
        )));
    }
    Ok((pid, addr, len))
}

/// The source's side: serves page requests from the frozen processes, on two connections
/// (roles "pages", for runs asked ahead of need, and "faults").
pub struct PageServer {
    conns: Vec<Conn>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    pub served: Arc<AtomicU64>,
}

impl PageServer {
    /// `name` is the agent's `HOST:PORT` as dialed, checked against its certificate with `tls`.
    pub fn start(
        addr: SocketAddr,
        hello: Hello,
        timeout: Duration,
        tls: Option<&ClientTls>,
        name: &str,
    ) -> Result<PageServer> {
        let mut ps = PageServer {
            conns: Vec::new(),
            threads: Vec::new(),
            served: Arc::new(AtomicU64::new(0)),
        };
        for role in ["pages", "faults"] {
            let hello = Hello {
                role: Some(role.into()),
                ..hello.clone()
            };
            let (conn, thread) = serve(addr, hello, timeout, tls, name, ps.served.clone())?;
            ps.conns.push(conn);
            ps.threads.push(thread);
        }
        Ok(ps)
    }

    /// Stop serving (the source copy goes, or resumes); the bytes served.
    pub fn stop(mut self) -> u64 {
        for c in &self.conns {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        for c in &self.conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// One page connection to the agent, and the thread that serves it.
fn serve(
    addr: SocketAddr,
    hello: Hello,
    timeout: Duration,
    tls: Option<&ClientTls>,
    name: &str,
    n: Arc<AtomicU64>,
) -> Result<(Conn, std::thread::JoinHandle<Result<()>>)> {
    {
        let conn = TcpStream::connect_timeout(&addr, timeout)
            .map_err(io(format!("connecting the page connection to {addr}")))?;
        let _ = conn.set_nodelay(true);
        conn.set_write_timeout(Some(timeout))
            .map_err(io("socket timeout"))?;
        // The handshake must not wait forever; the agent's requests may.
        conn.set_read_timeout(Some(timeout))
            .map_err(io("socket timeout"))?;
        let conn = Conn::connect(conn, tls, name)?;
        conn.set_read_timeout(None).map_err(io("socket timeout"))?;
        let mut w = BufWriter::new(conn.writer().map_err(io("dup"))?);
        w.write_all(wire::GREETING).map_err(io("greeting"))?;
        wire::write_json(&mut w, Kind::Hello, &hello)?;
        w.flush().map_err(io("greeting"))?;
        let mut rd = BufReader::new(conn.reader().map_err(io("dup"))?);
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut buf = wire::FrameBuf::default();
            let mut data = Vec::new();
            // Each process's pagemap, opened once for all its requests.
            let mut pagemaps = std::collections::HashMap::new();
            let r = (|| -> Result<()> {
                loop {
                    match wire::read_frame(&mut rd, &mut buf) {
                        Ok(Kind::PageRequest) => {}
                        Ok(k) => {
                            return Err(MigrateError::Protocol(format!(
                                "unexpected {k:?} on the page connection"
                            )))
                        }
                        // The agent closed it (done, or gone): nothing more to serve.
                        Err(_) => return Ok(()),
                    }
                    let (pid, addr, len) = parse_request(&buf)?;
                    let end = addr + len as u64;
                    // Only the pages the process holds: the rest is zero, and stays unallocated
                    // at the destination.
                    let listed = match pagemaps.entry(pid) {
                        std::collections::hash_map::Entry::Occupied(p) => Ok(p.into_mut()),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            ferry_sys::uffd::PresentPages::open(pid).map(|p| v.insert(p))
                        }
                    }
                    .and_then(|p| p.runs(addr, end));
                    let present = listed.map_err(|e| {
                        MigrateError::Failed(format!(
                            "listing the pages at {addr:#x}-{end:#x} of process {pid}: {e}"
                        ))
                    })?;
                    let pages = len / 4096;
                    let mut map = vec![0u8; pages.div_ceil(8)];
                    data.clear();
                    for (s, e) in present {
                        for p in (s - addr) / 4096..(e - addr) / 4096 {
                            map[p as usize / 8] |= 1 << (p % 8);
                        }
                        let at = data.len();
                        data.resize(at + (e - s) as usize, 0);
                        let out = &mut data[at..];
                        if ferry_sys::mem::read_mem(pid, s, out).unwrap_or(0) != out.len() {
                            // Unreadable (PROT_NONE): through /proc/PID/mem.
                            ferry_sys::mem::read_mem_forced(pid, s, out).map_err(|e| {
                                MigrateError::Failed(format!(
                                    "reading {} bytes at {s:#x} of process {pid}: {e}",
                                    out.len()
                                ))
                            })?;
                        }
                    }
                    wire::write_frame(&mut w, Kind::PageData, &[&map, &data])?;
                    w.flush().map_err(io("sending pages"))?;
                    n.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            })();
            if let Err(e) = &r {
                // The agent hears why at once, instead of waiting out its fetch timeout.
                let _ = wire::write_json(
                    &mut w,
                    Kind::Failed,
                    &serde_json::json!({ "error": e.to_string() }),
                );
                let _ = w.flush();
            }
            r
        });
        Ok((conn, thread))
    }
}

/// Requests asked ahead that may be on their way, or here and not placed yet, at once.
const AHEAD: usize = 4;
/// Answers read while waiting for another one, kept for their fetch.
const KEPT: usize = 32;

/// A request: process, address, length.
type Key = (i32, u64, usize);

fn send_request(w: &mut BufWriter<ConnWriter>, key: Key) -> Result<()> {
    wire::write_frame(
        w,
        Kind::PageRequest,
        &[&request(key.0, key.1, key.2 as u32)],
    )?;
    w.flush().map_err(io("sending a page request"))
}

/// The frame just read, as the pages asked for: the source's Failed or anything else is an
/// error.
fn page_data(kind: Kind, buf: &wire::FrameBuf) -> Result<()> {
    match kind {
        Kind::PageData => Ok(()),
        Kind::Failed => {
            let v: serde_json::Value = wire::parse(Kind::Failed, buf)?;
            Err(MigrateError::Failed(format!(
                "the source could not serve pages: {}",
                v["error"].as_str().unwrap_or("?")
            )))
        }
        kind => Err(MigrateError::Protocol(format!(
            "{kind:?} of {} bytes instead of the pages",
            buf.len()
        ))),
    }
}

/// What the filler asked ahead, on the bulk connection, and what came back.
struct Ahead {
    rd: BufReader<ConnReader>,
    w: BufWriter<ConnWriter>,
    buf: wire::FrameBuf,
    /// Requests sent whose answers are not read yet, oldest first (answers come in order).
    asked: std::collections::VecDeque<Key>,
    /// Answers read, oldest first, until their fetch takes them.
    kept: std::collections::VecDeque<(Key, Vec<u8>)>,
    /// Why the bulk connection failed: every fetch that needs it fails so.
    failed: Option<String>,
}

impl Ahead {
    fn ask(&mut self, key: Key) -> Result<()> {
        if self.asked.contains(&key) || self.kept.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        if let Some(e) = &self.failed {
            return Err(MigrateError::Failed(e.clone()));
        }
        send_request(&mut self.w, key)?;
        self.asked.push_back(key);
        Ok(())
    }

    /// Read the next answer (waiting for it) and keep it.
    fn read_one(&mut self) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(MigrateError::Failed(e.clone()));
        }
        let r = wire::read_frame(&mut self.rd, &mut self.buf).and_then(|k| page_data(k, &self.buf));
        match (r, self.asked.pop_front()) {
            (Ok(()), Some(k)) => {
                if self.kept.len() == KEPT {
                    // Never fetched: filling went elsewhere (a fault, an event).
                    self.kept.pop_front();
                }
                self.kept.push_back((k, self.buf.take()));
                Ok(())
            }
            (r, _) => {
                let e = r
                    .err()
                    .unwrap_or_else(|| MigrateError::Protocol("an answer to no request".into()));
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// A faulting thread's pages: asked and read at once, on a connection where nothing asked
/// ahead can be in front of them.
struct Urgent {
    rd: BufReader<ConnReader>,
    w: BufWriter<ConnWriter>,
    buf: wire::FrameBuf,
}

/// The agent's side: fetches pages for the filler, on two connections: runs asked ahead of
/// need on one, read as they come while the filler waits for them and for faults at once; a
/// fault's pages on the other.
pub struct RemoteConn {
    bulk: Mutex<Ahead>,
    urgent: Mutex<Urgent>,
    conns: [Conn; 2],
    pub fetched: AtomicU64,
}

impl RemoteConn {
    /// `bulk` and `urgent`: the page connections (roles "pages" and "faults"), past Hello.
    pub fn new(
        bulk: (Conn, BufReader<ConnReader>),
        urgent: (Conn, BufReader<ConnReader>),
    ) -> Result<RemoteConn> {
        for c in [&bulk.0, &urgent.0] {
            c.set_read_timeout(Some(FETCH_TIMEOUT))
                .map_err(io("socket timeout"))?;
            c.set_write_timeout(Some(FETCH_TIMEOUT))
                .map_err(io("socket timeout"))?;
        }
        let b = Ahead {
            rd: bulk.1,
            w: BufWriter::new(bulk.0.writer().map_err(io("dup"))?),
            buf: wire::FrameBuf::default(),
            asked: Default::default(),
            kept: Default::default(),
            failed: None,
        };
        let u = Urgent {
            rd: urgent.1,
            w: BufWriter::new(urgent.0.writer().map_err(io("dup"))?),
            buf: wire::FrameBuf::default(),
        };
        Ok(RemoteConn {
            bulk: Mutex::new(b),
            urgent: Mutex::new(u),
            conns: [bulk.0, urgent.0],
            fetched: AtomicU64::new(0),
        })
    }

    fn lock_bulk(&self) -> std::sync::MutexGuard<'_, Ahead> {
        self.bulk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for RemoteConn {
    fn drop(&mut self) {
        for c in &self.conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// A PageData payload, the answer to a request for `asked` (address, length): which pages
/// the source holds (a bitmap, one bit per page from the first, in bytes), then those pages.
/// The bytes of [want, want + out.len()), a part of it, go into `out` (zeros where the source
/// holds nothing); returns the runs of that part the source does not hold.
fn parse_pages(
    payload: &[u8],
    asked: (u64, usize),
    want: u64,
    out: &mut [u8],
) -> Result<Vec<(u64, u64)>> {
    let pages = asked.1 / 4096;
    let head = pages.div_ceil(8);
    let bad = |why: String| MigrateError::Protocol(format!("bad page data: {why}"));
    let map = payload
        .get(..head)
        .ok_or_else(|| bad(format!("{} bytes, shorter than its map", payload.len())))?;
    let has = |p: usize| map[p / 8] & (1 << (p % 8)) != 0;
    let held = (0..pages).filter(|&p| has(p)).count();
    if payload.len() != head + held * 4096
        || (!pages.is_multiple_of(8) && map[head - 1] >> (pages % 8) != 0)
    {
        return Err(bad(format!(
            "{} bytes for {held} pages of {pages}",
            payload.len()
        )));
    }
    let first = (want.wrapping_sub(asked.0) / 4096) as usize;
    if want < asked.0 || first + out.len() / 4096 > pages {
        return Err(bad(format!(
            "{want:#x} is not in the answer for {:#x}",
            asked.0
        )));
    }
    // The held pages before the part come first in the data.
    let mut at = head + (0..first).filter(|&p| has(p)).count() * 4096;
    let mut absent: Vec<(u64, u64)> = Vec::new();
    for (i, page) in out.chunks_exact_mut(4096).enumerate() {
        if has(first + i) {
            page.copy_from_slice(&payload[at..at + 4096]);
            at += 4096;
        } else {
            page.fill(0);
            let a = want + i as u64 * 4096;
            match absent.last_mut() {
                Some(l) if l.1 == a => l.1 = a + 4096,
                _ => absent.push((a, a + 4096)),
            }
        }
    }
    Ok(absent)
}

impl ferry_engine::lazy::RemotePages for RemoteConn {
    fn fetch(
        &self,
        pid: i32,
        addr: u64,
        out: &mut [u8],
        urgent: bool,
    ) -> ferry_engine::Result<Vec<(u64, u64)>> {
        let want = out.len();
        let fail = |e: MigrateError| {
            ferry_engine::EngineError::Failed(format!(
                "fetching {want} bytes at {addr:#x} of process {pid} from the source: {e}"
            ))
        };
        let key = (pid, addr, want);
        // An answer read or asked for already may hold it: filling ahead asks for whole runs,
        // and a fault or a run cut by one wants part of one.
        let holds = |k: &Key| k.0 == pid && k.1 <= addr && addr + want as u64 <= k.1 + k.2 as u64;
        let mut st = self.lock_bulk();
        if urgent && !st.kept.iter().any(|(k, _)| holds(k)) {
            drop(st);
            let mut g = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
            let u = &mut *g;
            let absent = send_request(&mut u.w, key)
                .and_then(|()| wire::read_frame(&mut u.rd, &mut u.buf))
                .and_then(|k| page_data(k, &u.buf))
                .and_then(|()| parse_pages(&u.buf, (addr, want), addr, out))
                .map_err(fail)?;
            self.count(out.len(), &absent);
            return Ok(absent);
        }
        if !st.kept.iter().any(|(k, _)| holds(k)) && !st.asked.iter().any(holds) {
            st.ask(key).map_err(fail)?;
        }
        let i = loop {
            if let Some(i) = st.kept.iter().rposition(|(k, _)| holds(k)) {
                break i;
            }
            st.read_one().map_err(fail)?;
        };
        let k = st.kept[i].0;
        let absent = parse_pages(&st.kept[i].1, (k.1, k.2), addr, out).map_err(fail)?;
        if k == key {
            // All of it taken.
            st.kept.remove(i);
        }
        self.count(out.len(), &absent);
        Ok(absent)
    }

    fn prefetch(&self, pid: i32, addr: u64, len: usize) {
        let mut st = self.lock_bulk();
        // Answers not placed yet count: asking on while they wait would fill `kept` with
        // answers pushed out before their turn, to be fetched again.
        if st.asked.len() + st.kept.len() < AHEAD {
            // A request that cannot be sent fails its fetch the same way.
            let _ = st.ask((pid, addr, len));
        }
    }

    fn ready(&self, pid: i32, addr: u64, len: usize) -> bool {
        let st = self.lock_bulk();
        let end = addr + len as u64;
        st.failed.is_some()
            || st
                .kept
                .iter()
                .any(|(k, _)| k.0 == pid && k.1 <= addr && end <= k.1 + k.2 as u64)
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        let st = self.lock_bulk();
        (!st.asked.is_empty() && st.failed.is_none()).then(|| st.rd.get_ref().as_raw_fd())
    }

    fn take_in(&self) {
        let mut st = self.lock_bulk();
        // One whole answer (once it has begun to come, the rest follows at once): then the
        // filler looks at faults again.
        if !st.asked.is_empty()
            && st.failed.is_none()
            && (!st.rd.buffer().is_empty() || st.rd.get_ref().has_data())
        {
            // A failure is kept, and reported by the fetch that needs the connection.
            let _ = st.read_one();
        }
    }

    fn arrived(&self) -> Option<(i32, u64, usize)> {
        self.lock_bulk().kept.front().map(|(k, _)| *k)
    }

    fn discard(&self, pid: i32, addr: u64, len: usize) {
        self.lock_bulk()
            .kept
            .retain(|(k, _)| *k != (pid, addr, len));
    }
}

impl RemoteConn {
    fn count(&self, len: usize, absent: &[(u64, u64)]) {
        let held = len as u64 - absent.iter().map(|(a, b)| b - a).sum::<u64>();
        self.fetched.fetch_add(held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::lazy::RemotePages;
    use std::io::Read;

    /// A page server on loopback (roles "pages" and "faults") and the agent's end of its
    /// connections.
    fn page_link() -> (RemoteConn, PageServer) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hello = Hello {
            id: "m".into(),
            token: "t".into(),
            role: None,
            mode: None,
        };
        let server = std::thread::spawn(move || {
            PageServer::start(addr, hello, Duration::from_secs(5), None, "127.0.0.1").unwrap()
        });
        let mut conns = Vec::new();
        for _ in 0..2 {
            let conn = Conn::accept(l.accept().unwrap().0, None).unwrap();
            // As the agent reads them.
            let mut rd = BufReader::with_capacity(64 << 10, conn.reader().unwrap());
            let mut greeting = [0u8; 8];
            rd.read_exact(&mut greeting).unwrap();
            let mut buf = wire::FrameBuf::default();
            assert_eq!(wire::read_frame(&mut rd, &mut buf).unwrap(), Kind::Hello);
            let hello: Hello = wire::parse(Kind::Hello, &buf).unwrap();
            conns.push((hello.role.unwrap(), (conn, rd)));
        }
        let server = server.join().unwrap();
        assert_eq!(conns[0].0, "pages");
        assert_eq!(conns[1].0, "faults");
        let urgent = conns.pop().unwrap().1;
        let bulk = conns.pop().unwrap().1;
        (RemoteConn::new(bulk, urgent).unwrap(), server)
    }

    /// A source that cannot serve says why (rather than leave the fetch to time out), on
    /// either connection.
    #[test]
    fn a_page_server_that_fails_says_why() {
        for urgent in [false, true] {
            let (remote, server) = page_link();
            let mut out = vec![0u8; 4096];
            // No such process: the reason, not the fetch's read timing out.
            let e = remote
                .fetch(i32::MAX, 0x10000, &mut out, urgent)
                .unwrap_err()
                .to_string();
            assert!(e.contains("the source could not serve pages"), "{e}");
            assert!(e.contains(&i32::MAX.to_string()), "{e}");
            drop(remote);
            server.stop();
        }
    }

    /// Asked ahead, fetched in another order, or never asked: each fetch gets its own pages,
    /// served by a real page server from this process's memory over loopback.
    #[test]
    fn answers_asked_ahead_are_kept_until_fetched_in_any_order() {
        const P: usize = 4096;
        let mut mem = vec![0u8; 9 * P];
        let off = mem.as_ptr().align_offset(P);
        let base = mem.as_ptr() as u64 + off as u64;
        for p in 0..8 {
            mem[off + p * P..off + (p + 1) * P].fill(p as u8 + 1);
        }
        let (remote, server) = page_link();
        let pid = std::process::id() as i32;
        let at = |p: u64| base + p * P as u64;
        for p in [0, 2, 4] {
            remote.prefetch(pid, at(p), 2 * P);
        }
        let mut out = vec![0u8; 2 * P];
        // The last asked first (the two answers before it are kept), then the first, then one
        // never asked, then the middle one.
        for p in [4usize, 0, 6, 2] {
            out.fill(0xee);
            assert!(remote
                .fetch(pid, at(p as u64), &mut out, false)
                .unwrap()
                .is_empty());
            assert!(out[..P].iter().all(|&b| b == p as u8 + 1), "page {p}");
            assert!(out[P..].iter().all(|&b| b == p as u8 + 2), "page {}", p + 1);
        }
        assert_eq!(remote.fetched.load(Ordering::Relaxed), 8 * P as u64);
        // Parts of an answer asked ahead: the second page of four, then the rest, which are
        // served by the one answer.
        remote.prefetch(pid, at(0), 4 * P);
        let mut one = vec![0u8; P];
        assert!(remote
            .fetch(pid, at(1), &mut one, false)
            .unwrap()
            .is_empty());
        assert!(one.iter().all(|&b| b == 2));
        let mut two = vec![0u8; 2 * P];
        assert!(remote
            .fetch(pid, at(2), &mut two, false)
            .unwrap()
            .is_empty());
        assert!(two[..P].iter().all(|&b| b == 3) && two[P..].iter().all(|&b| b == 4));
        // A fault's page while runs are asked ahead: on the other connection, and what
        // was asked ahead is still there for its fetch, and ready once it came.
        remote.prefetch(pid, at(0), 2 * P);
        remote.prefetch(pid, at(4), 4 * P);
        assert!(remote.fetch(pid, at(7), &mut one, true).unwrap().is_empty());
        assert!(one.iter().all(|&b| b == 8));
        assert!(remote.wake_fd().is_some());
        let t = std::time::Instant::now();
        while !remote.ready(pid, at(5), 2 * P) {
            assert!(t.elapsed() < Duration::from_secs(5), "never ready");
            std::thread::sleep(Duration::from_millis(1));
            remote.take_in();
        }
        // Both answers are in (in order): nothing is awaited.
        assert!(remote.wake_fd().is_none());
        assert!(remote
            .fetch(pid, at(5), &mut two, false)
            .unwrap()
            .is_empty());
        assert!(two[..P].iter().all(|&b| b == 6) && two[P..].iter().all(|&b| b == 7));
        assert!(remote.fetch(pid, at(0), &mut two, true).unwrap().is_empty());
        assert!(two[..P].iter().all(|&b| b == 1) && two[P..].iter().all(|&b| b == 2));
        // Not ready before it is asked (pages 4-7 are, their answer is kept whole).
        assert!(!remote.ready(pid, at(8), P) && remote.ready(pid, at(6), P));
        drop(remote);
        assert_eq!(server.stop(), 19 * P as u64);
        drop(mem);
    }

    /// Two answers that came together are read from the socket at once: the second waits in
    /// the buffer with nothing on the socket to wake a poll, and is taken in all the same.
    #[test]
    fn an_answer_buffered_behind_another_is_taken_in() {
        const P: usize = 4096;
        let mem = vec![7u8; 3 * P];
        let base = (mem.as_ptr() as u64).next_multiple_of(P as u64);
        let (remote, server) = page_link();
        let pid = std::process::id() as i32;
        remote.prefetch(pid, base, P);
        remote.prefetch(pid, base + P as u64, P);
        let fd = remote.wake_fd().expect("answers awaited");
        std::thread::sleep(Duration::from_millis(200));
        remote.take_in();
        assert!(remote.ready(pid, base, P));
        // The case itself: the socket has nothing more, the second answer is buffered.
        // SAFETY: the descriptor is the bulk connection's, open while `remote` lives.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        assert!(
            !ferry_sys::net::readable_now(sock),
            "the answers came apart"
        );
        assert!(!remote.ready(pid, base + P as u64, P));
        remote.take_in();
        assert!(remote.ready(pid, base + P as u64, P));
        assert!(remote.wake_fd().is_none());
        drop(remote);
        assert_eq!(server.stop(), 2 * P as u64);
        drop(mem);
    }

    #[test]
    fn page_data_carries_only_the_pages_the_source_holds() {
        // Pages 0 and 2 of 3 held: map 0b101, then their bytes.
        let mut payload = vec![0b101u8];
        payload.extend([1u8; 4096]);
        payload.extend([3u8; 4096]);
        let mut out = vec![9u8; 3 * 4096];
        let absent = parse_pages(&payload, (0x10000, 3 * 4096), 0x10000, &mut out).unwrap();
        assert_eq!(absent, vec![(0x11000, 0x12000)]);
        assert!(out[..4096].iter().all(|&b| b == 1));
        assert!(out[4096..8192].iter().all(|&b| b == 0));
        assert!(out[8192..].iter().all(|&b| b == 3));
        // Hostile: too short, too long, or bits past the last page.
        for bad in [vec![0b101u8], vec![0u8; 4097], vec![0b1000u8]] {
            assert!(parse_pages(&bad, (0, 3 * 4096), 0, &mut out).is_err());
        }
        assert!(parse_pages(&[], (0, 3 * 4096), 0, &mut out).is_err());
        // A part of the answer: the last two pages.
        let mut two = vec![9u8; 2 * 4096];
        let absent = parse_pages(&payload, (0x10000, 3 * 4096), 0x11000, &mut two).unwrap();
        assert_eq!(absent, vec![(0x11000, 0x12000)]);
        assert!(two[..4096].iter().all(|&b| b == 0) && two[4096..].iter().all(|&b| b == 3));
    }
}
