//! Test helpers: in-memory sinks, and an encoder written from docs/image-format.md (not from
//! the crate's code) to craft valid and hostile images byte by byte.
#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use ferry_image::{ImageError, ImageReader, ImageWriter, MetaRecord, PageBlock, Summary};

/// A Write whose bytes can be taken after the writer is gone.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Image {
    pub meta: Vec<u8>,
    pub pages: Vec<u8>,
    pub summary: Summary,
}

/// Write an image in memory with `f` and finish it.
pub fn write_image(f: impl FnOnce(&mut ImageWriter)) -> Image {
    let (m, p) = (SharedBuf::default(), SharedBuf::default());
    let mut w = ImageWriter::new(Box::new(m.clone()), Box::new(p.clone())).unwrap();
    f(&mut w);
    let summary = w.finish().unwrap();
    Image {
        meta: m.take(),
        pages: p.take(),
        summary,
    }
}

/// Pages whose every byte depends on the seed and the position.
pub fn pattern(pages: usize, seed: u8) -> Vec<u8> {
    (0..pages * 4096)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i / 4096) as u8)
        })
        .collect()
}

/// A small image: three metas, three page blocks (1, 2 and 1 pages).
pub fn small_image() -> Image {
    write_image(|w| {
        w.meta("process", &serde_json::json!({"pid": 42, "comm": "cat"}))
            .unwrap();
        w.meta("thread", &serde_json::json!({"tid": 42, "regs": [1, 2, 3]}))
            .unwrap();
        w.pages(0x1000, &pattern(1, 1)).unwrap();
        w.meta("fd", &serde_json::json!({"fd": 0, "path": "/dev/null"}))
            .unwrap();
        w.pages(0x7fff_0000_0000, &pattern(2, 2)).unwrap();
        w.pages(0x5000, &pattern(1, 3)).unwrap();
    })
}

pub fn open(meta: &[u8], pages: &[u8]) -> Result<ImageReader, ImageError> {
    ImageReader::from_streams(
        Box::new(Cursor::new(meta.to_vec())),
        Box::new(Cursor::new(pages.to_vec())),
    )
}

/// Open, then read every page block.
pub fn read_all(
    meta: &[u8],
    pages: &[u8],
) -> Result<(Vec<MetaRecord>, Vec<PageBlock>, Summary), ImageError> {
    let mut r = open(meta, pages)?;
    let mut blocks = Vec::new();
    while let Some(b) = r.next_pages()? {
        blocks.push(b);
    }
    Ok((r.meta_records().to_vec(), blocks, r.summary().clone()))
}

/// Open, then verify the pages.
pub fn verify(meta: &[u8], pages: &[u8]) -> Result<Summary, ImageError> {
    open(meta, pages)?.verify_pages()
}

// ---- The format, from the document ----

pub fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

pub fn file_header(magic: &[u8; 8], version: u32, flags: u32) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    let c = crc(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h
}

pub fn meta_header() -> Vec<u8> {
    file_header(b"FERRYMET", 1, 0)
}

pub fn pages_header() -> Vec<u8> {
    file_header(b"FERRYPAG", 1, 0)
}

/// A record header with a given length field (normally payload.len()) and valid checksums.
pub fn record_with(kind: u32, flags: u32, len: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&crc(payload).to_le_bytes());
    let c = crc(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn record(kind: u32, payload: &[u8]) -> Vec<u8> {
    record_with(kind, 0, payload.len() as u64, payload)
}

pub fn meta_payload(tag: &[u8], json: &[u8]) -> Vec<u8> {
    let mut p = (tag.len() as u16).to_le_bytes().to_vec();
    p.extend_from_slice(tag);
    p.extend_from_slice(json);
    p
}

pub fn block_payload(vaddr: u64, count: u32, reserved: u32, data: &[u8]) -> Vec<u8> {
    let mut p = vaddr.to_le_bytes().to_vec();
    p.extend_from_slice(&count.to_le_bytes());
    p.extend_from_slice(&reserved.to_le_bytes());
    p.extend_from_slice(data);
    p
}

pub fn end_payload(s: &Summary) -> Vec<u8> {
    serde_json::to_vec(s).unwrap()
}

/// The summary a page stream made of blocks with these payloads would have.
pub fn summary_for(meta_records: u64, block_payloads: &[Vec<u8>]) -> Summary {
    let mut h = crc32fast::Hasher::new();
    let mut pages = 0;
    for p in block_payloads {
        h.update(&crc(p).to_le_bytes());
        pages += ((p.len() - 16) / 4096) as u64;
    }
    Summary {
        meta_records,
        page_blocks: block_payloads.len() as u64,
        pages,
        page_bytes: pages * 4096,
        pages_crc: h.finalize(),
    }
}

/// A complete image from raw meta payloads and page block payloads.
pub fn craft(metas: &[Vec<u8>], blocks: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut meta = meta_header();
    for m in metas {
        meta.extend(record(1, m));
    }
    meta.extend(record(
        3,
        &end_payload(&summary_for(metas.len() as u64, blocks)),
    ));
    let mut pages = pages_header();
    for b in blocks {
        pages.extend(record(2, b));
    }
    (meta, pages)
}

/// Offsets where records start in a stream (after the 20-byte file header).
pub fn record_starts(stream: &[u8]) -> Vec<usize> {
    let mut at = 20;
    let mut out = Vec::new();
    while at + 24 <= stream.len() {
        out.push(at);
        let len = u64::from_le_bytes(stream[at + 8..at + 16].try_into().unwrap()) as usize;
        at += 24 + len;
    }
    out
}
