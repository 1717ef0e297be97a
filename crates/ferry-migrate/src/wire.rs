//! The page stream between a source and an agent: after an 8-byte greeting, frames of
//! `kind (u8) | 3 zero bytes | length (u32 LE) | payload | CRC32 of all before (u32 LE)`.
//! A frame whose checksum or length is wrong ends the migration (the source resumes).

use crate::{io, MigrateError, Result};
use std::io::{Read, Write};

/// The page stream's protocol, in the greeting and in `GET /v1/host`: both ends must speak
/// the same one (2: post-copy's Filled is acknowledged with Released).
pub const PROTOCOL: u32 = 3;
pub const GREETING: &[u8; 8] = b"FERRYMG3";
/// Largest payload.
pub const MAX_PAYLOAD: usize = 8 << 20;

/// The runs of a Pages frame: (pid, address, bytes).
pub fn page_runs(buf: &[u8]) -> Result<Vec<(i32, u64, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        if buf.len() - at < 16 {
            return Err(MigrateError::Protocol(
                "truncated run in a Pages frame".into(),
            ));
        }
        let pid = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as i32;
        let n = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap()) as usize;
        let addr = u64::from_le_bytes(buf[at + 8..at + 16].try_into().unwrap());
        let len = n
            .checked_mul(4096)
            .filter(|&l| l <= buf.len() - at - 16)
            .ok_or_else(|| MigrateError::Protocol("a run overflows its Pages frame".into()))?;
        if addr % 4096 != 0 {
            return Err(MigrateError::Protocol(format!(
                "unaligned page address {addr:#x}"
            )));
        }
        out.push((pid, addr, &buf[at + 16..at + 16 + len]));
        at += 16 + len;
    }
    Ok(out)
}

/// Collects page runs into Pages frames of up to 4 MiB.
pub struct PageBatch {
    buf: Vec<u8>,
}

impl Default for PageBatch {
    fn default() -> Self {
        PageBatch {
            buf: Vec::with_capacity((4 << 20) + 4096),
        }
    }
}

impl PageBatch {
    pub fn add(&mut self, w: &mut impl Write, pid: i32, addr: u64, data: &[u8]) -> Result<()> {
        // A long run goes out as a frame of its own, from where it lies: no copy.
        if data.len() >= 1 << 20 && data.len() <= 4 << 20 && data.len().is_multiple_of(4096) {
            self.flush(w)?;
            let mut head = [0u8; 16];
            head[..4].copy_from_slice(&(pid as u32).to_le_bytes());
            head[4..8].copy_from_slice(&((data.len() / 4096) as u32).to_le_bytes());
            head[8..].copy_from_slice(&addr.to_le_bytes());
            return write_frame(w, Kind::Pages, &[&head, data]);
        }
        let mut off = 0;
        while off < data.len() {
            let room = ((4 << 20) - self.buf.len().min(4 << 20)) / 4096 * 4096;
            if room < 4096 + 16 {
                self.flush(w)?;
                continue;
            }
            let take = (data.len() - off).min(room - 4096);
            let take = take - take % 4096;
            let take = if take == 0 { 4096 } else { take };
            self.buf.extend_from_slice(&(pid as u32).to_le_bytes());
            self.buf
                .extend_from_slice(&((take / 4096) as u32).to_le_bytes());
            self.buf
                .extend_from_slice(&(addr + off as u64).to_le_bytes());
            self.buf.extend_from_slice(&data[off..off + take]);
            off += take;
        }
        Ok(())
    }

    pub fn flush(&mut self, w: &mut impl Write) -> Result<()> {
        if !self.buf.is_empty() {
            write_frame(w, Kind::Pages, &[&self.buf])?;
            self.buf.clear();
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: {"id", "token"} (JSON).
    Hello = 1,
    /// Source: runs of pages of the running processes, each `pid u32 | pages u32 |
    /// address u64 | bytes`.
    Pages = 2,
    /// Source: end of a pre-copy round, {"round", "bytes"}.
    Round = 3,
    /// Source: bytes of the final image's metadata stream (meta.fimg).
    ImageMeta = 4,
    /// Source: bytes of the final image's page stream (pages.fimg).
    ImagePages = 5,
    /// Source: the image is complete; rebuild it.
    Commit = 6,
    /// Source: the source copy is gone for good; let the rebuilt tree run.
    Go = 7,
    /// Either side: give up, {"reason"}.
    Abort = 8,
    /// Agent: rebuilt and held stopped, {"pid", "restore_ms"}.
    Ready = 9,
    /// Agent: the rebuild failed (nothing of it is left), {"error"}.
    Failed = 10,
    /// Agent: the tree runs here now.
    Done = 11,
    /// Agent, post-copy (on the page connection): send `len u32` bytes of process `pid u32`
    /// at `address u64`.
    PageRequest = 12,
    /// Source, post-copy: the bytes asked for.
    PageData = 13,
    /// Agent: every page is in place (post-copy, or lazily filled pre-copy); the source copy
    /// may go. {"bytes", "fill_ms", ...}
    Filled = 14,
    /// Agent: every page of the round is stored (the source freezes only once the agent has
    /// caught up).
    RoundAck = 15,
    /// Source, before any Pages: the layout of the running process, for the agent to build
    /// it ahead of the freeze (`ferry_engine::warm::WarmLayout`, JSON).
    Layout = 16,
    /// Source, post-copy: Filled arrived, the source copy goes (without it the agent kills
    /// its copy: the source may have resumed its own).
    Released = 17,
    /// Agent, post-copy: Released arrived, the tree runs here for good (the source's report
    /// says so; without it the source cannot tell whether the agent kept its copy).
    Kept = 18,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Pages,
            3 => Round,
            4 => ImageMeta,
            5 => ImagePages,
            6 => Commit,
            7 => Go,
            8 => Abort,
            9 => Ready,
            10 => Failed,
            11 => Done,
            12 => PageRequest,
            13 => PageData,
            14 => Filled,
            15 => RoundAck,
            16 => Layout,
            17 => Released,
            18 => Kept,
            _ => return None,
        })
    }
}

/// Write one frame from payload parts.
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD {
        return Err(MigrateError::Protocol(format!(
            "frame of {len} bytes is too large"
        )));
    }
    let mut head = [0u8; 8];
    head[0] = kind as u8;
    head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    w.write_all(&head).map_err(io("sending a frame"))?;
    for p in parts {
        crc.update(p);
        w.write_all(p).map_err(io("sending a frame"))?;
    }
    w.write_all(&crc.finalize().to_le_bytes())
        .map_err(io("sending a frame"))?;
    Ok(())
}

pub fn write_json<T: serde::Serialize>(w: &mut impl Write, kind: Kind, v: &T) -> Result<()> {
    let b = serde_json::to_vec(v).map_err(|e| MigrateError::Protocol(e.to_string()))?;
    write_frame(w, kind, &[&b])
}

/// A frame's payload, in a buffer reused from frame to frame. Its bytes stay initialized
/// between frames (the buffer only grows), so a frame costs no clearing of memory.
#[derive(Default)]
pub struct FrameBuf {
    data: Vec<u8>,
    len: usize,
}

impl FrameBuf {
    /// The payload, moved out; the buffer starts again empty.
    pub fn take(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.data);
        v.truncate(std::mem::take(&mut self.len));
        v
    }
}

impl std::ops::Deref for FrameBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// What `read_frame` reads and checksums at a time: well within a core's L2 cache.
const PIECE: usize = 256 << 10;

/// Read one frame into `buf` (reused); returns its kind.
pub fn read_frame(r: &mut impl Read, buf: &mut FrameBuf) -> Result<Kind> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).map_err(io("reading a frame"))?;
    let kind = Kind::from_u8(head[0])
        .filter(|_| head[1..4] == [0, 0, 0])
        .ok_or_else(|| MigrateError::Protocol(format!("bad frame header {head:02x?}")))?;
    let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    if len > MAX_PAYLOAD {
        return Err(MigrateError::Protocol(format!(
            "frame of {len} bytes announced (at most {MAX_PAYLOAD})"
        )));
    }
    // Read straight into the buffer (a read as large as the reader's own buffer bypasses
    // it), which grows as bytes arrive, not on the peer's word: a frame that announces 8 MiB
    // and sends nothing costs nothing. Each piece is checksummed as it lands, while it is
    // still in the cache.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    buf.len = 0;
    while buf.len < len {
        let at = buf.len;
        let end = at + (len - at).min(PIECE);
        if buf.data.len() < end {
            buf.data.resize(end.max((2 * at).min(len)), 0);
        }
        r.read_exact(&mut buf.data[at..end]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                MigrateError::Protocol(format!(
                    "truncated {kind:?} frame (the stream ended within its {len} bytes)"
                ))
            } else {
                io("reading a frame")(e)
            }
        })?;
        crc.update(&buf.data[at..end]);
        buf.len = end;
    }
    let mut c = [0u8; 4];
    r.read_exact(&mut c).map_err(io("reading a frame"))?;
    if crc.finalize() != u32::from_le_bytes(c) {
        return Err(MigrateError::Protocol(format!(
            "corrupted {kind:?} frame of {len} bytes (checksum mismatch)"
        )));
    }
    Ok(kind)
}

pub fn parse<T: serde::de::DeserializeOwned>(kind: Kind, buf: &[u8]) -> Result<T> {
    serde_json::from_slice(buf)
        .map_err(|e| MigrateError::Protocol(format!("bad {kind:?} frame: {e}")))
}

/// A `Write` that frames everything written to it as `kind` frames on a shared connection:
/// the image writer's two streams travel multiplexed on the page stream.
pub struct FramedSink<W: Write> {
    pub conn: std::sync::Arc<std::sync::Mutex<W>>,
    pub kind: Kind,
    buf: Vec<u8>,
    /// A frame leaves once it holds this many bytes.
    frame: usize,
}

impl<W: Write> FramedSink<W> {
    /// Frames of `frame` bytes (the last one smaller).
    pub fn new(conn: std::sync::Arc<std::sync::Mutex<W>>, kind: Kind, frame: usize) -> Self {
        FramedSink {
            conn,
            kind,
            buf: Vec::with_capacity(frame),
            frame,
        }
    }

    fn ship(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.lock().unwrap();
        write_frame(&mut *c, self.kind, &[&self.buf])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        ferry_sys::timeline::mark(|| format!("sent {:?} {}", self.kind, self.buf.len()));
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for FramedSink<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.frame - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.frame {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.ship()?;
        self.conn.lock().unwrap().flush()
    }
}

impl<W: Write> Drop for FramedSink<W> {
    fn drop(&mut self) {
        let _ = self.ship();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Pages, &[b"abc", b"defg"]).unwrap();
        let mut buf = FrameBuf::default();
        assert_eq!(read_frame(&mut &v[..], &mut buf).unwrap(), Kind::Pages);
        assert_eq!(&buf[..], b"abcdefg");
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            assert!(read_frame(&mut &bad[..], &mut buf).is_err(), "byte {i}");
        }
        assert!(read_frame(&mut &v[..v.len() - 1], &mut buf).is_err());
    }

    /// A frame of many pieces reads back whole into a buffer used before for a smaller one; a
    /// byte changed in its last piece, or a stream cut inside it, is caught; a frame that
    /// announces more than it sends costs no more than a piece.
    #[test]
    fn large_frames_are_read_in_pieces() {
        let payload: Vec<u8> = (0..(3 << 20) + 100)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Pages, &[&payload]).unwrap();
        let mut buf = FrameBuf::default();
        let mut small = Vec::new();
        write_frame(&mut small, Kind::Round, &[b"{}"]).unwrap();
        assert_eq!(read_frame(&mut &small[..], &mut buf).unwrap(), Kind::Round);
        assert_eq!(read_frame(&mut &v[..], &mut buf).unwrap(), Kind::Pages);
        assert!(buf[..] == payload[..]);
        assert_eq!(read_frame(&mut &small[..], &mut buf).unwrap(), Kind::Round);
        assert_eq!(&buf[..], b"{}");
        let mut bad = v.clone();
        let at = bad.len() - 50;
        bad[at] ^= 1;
        let e = read_frame(&mut &bad[..], &mut buf).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let e = read_frame(&mut &v[..v.len() - 5000], &mut buf)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated Pages frame"), "{e}");
        let mut lying = v[..8].to_vec();
        lying[4..8].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        lying.extend_from_slice(&[0u8; 100]);
        let mut fresh = FrameBuf::default();
        assert!(read_frame(&mut &lying[..], &mut fresh).is_err());
        assert!(fresh.data.len() <= PIECE, "{}", fresh.data.len());
    }

    /// Hostile bytes: every parse fails cleanly or succeeds, never panics or over-allocates.
    #[test]
    fn random_input_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = FrameBuf::default();
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 && v.len() >= 8 {
                // A plausible header with a random kind and length.
                v[0] = (next() % 12) as u8;
                v[1..4].fill(0);
            }
            let _ = read_frame(&mut &v[..], &mut buf);
            let _ = page_runs(&v);
            assert!(buf.data.len() <= PIECE);
        }
        // Runs whose page count overflows or overruns the frame are refused.
        let mut v = vec![0u8; 16];
        v[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(page_runs(&v).is_err());
        let mut v = vec![0u8; 16 + 4096];
        v[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert!(page_runs(&v).is_err());
        v[4..8].copy_from_slice(&1u32.to_le_bytes());
        v[8..16].copy_from_slice(&5u64.to_le_bytes());
        assert!(page_runs(&v).is_err(), "unaligned address");
    }

    #[test]
    fn batches_carry_short_runs_together_and_long_ones_alone() {
        let mut v = Vec::new();
        let mut b = PageBatch::default();
        let long = vec![7u8; 1 << 20];
        b.add(&mut v, 3, 0x1000, &[1u8; 4096]).unwrap();
        b.add(&mut v, 3, 0x3000, &[2u8; 8192]).unwrap();
        b.add(&mut v, 4, 0x10_0000, &long).unwrap();
        b.add(&mut v, 3, 0x9000, &[5u8; 4096]).unwrap();
        b.flush(&mut v).unwrap();
        let mut r = &v[..];
        let mut frames = Vec::new();
        let mut buf = FrameBuf::default();
        while !r.is_empty() {
            assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Pages);
            frames.push(
                page_runs(&buf)
                    .unwrap()
                    .into_iter()
                    .map(|(pid, a, d)| (pid, a, d.len(), d[0]))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            frames,
            vec![
                vec![(3, 0x1000, 4096, 1), (3, 0x3000, 8192, 2)],
                vec![(4, 0x10_0000, 1 << 20, 7)],
                vec![(3, 0x9000, 4096, 5)],
            ]
        );
    }
}
