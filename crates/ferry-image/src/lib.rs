//! Ferry's checkpoint image format.
//!
//! An image is a directory with two streams, so that metadata travels apart from page data:
//!
//! - `meta.fimg`: file header, metadata records (tagged JSON values), then an End record whose
//!   summary commits the whole image. An image without End was never finished.
//! - `pages.fimg`: file header, then page blocks (a page-aligned address and raw pages).
//!
//! Both are written and read strictly sequentially (no seeking), so the same code can run over
//! a socket. Every header and payload carries a CRC-32; every length is checked against a limit
//! before anything is allocated for it. The byte layout is in `docs/image-format.md`.
//!
//! ```no_run
//! # use ferry_image::*;
//! # fn main() -> Result<(), ImageError> {
//! let dir = std::path::Path::new("/tmp/img");
//! let mut w = ImageWriter::create(dir)?;
//! w.meta("process", &serde_json::json!({"pid": 42}))?;
//! w.pages(0x7f00_0000_0000, &[0u8; 2 * PAGE_SIZE])?;
//! let summary = w.finish()?;
//!
//! let mut r = ImageReader::open(dir)?;
//! let procs: Vec<serde_json::Value> = r.find("process")?;
//! while let Some(block) = r.next_pages()? {
//!     // block.vaddr, block.data
//! }
//! # Ok(()) }
//! ```

mod error;
mod format;
mod reader;
mod writer;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The checksum state of a block's page data, for `ImageWriter::pages_hashed`.
pub use crc32fast::Hasher as PageHasher;
pub use error::{ImageError, ImageFile};
pub use reader::{check_blocks, ImageReader};
pub use writer::ImageWriter;

/// The only format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of one page in `pages.fimg`.
pub const PAGE_SIZE: usize = 4096;

/// Name of the metadata stream inside an image directory.
pub const META_FILE: &str = "meta.fimg";
/// Name of the page stream inside an image directory.
pub const PAGES_FILE: &str = "pages.fimg";

/// Magic of `meta.fimg`.
pub const META_MAGIC: [u8; 8] = *b"FERRYMET";
/// Magic of `pages.fimg`.
pub const PAGES_MAGIC: [u8; 8] = *b"FERRYPAG";

/// Record kind: a metadata record (meta.fimg only).
pub const KIND_META: u32 = 1;
/// Record kind: a page block (pages.fimg only).
pub const KIND_PAGE_BLOCK: u32 = 2;
/// Record kind: the End record that commits the image (meta.fimg only, last).
pub const KIND_END: u32 = 3;

/// Largest payload of a Meta record (tag length, tag and JSON): 64 MiB.
pub const MAX_META_PAYLOAD: u64 = 64 << 20;
/// Largest tag of a Meta record, in bytes. Tags are never empty.
pub const MAX_TAG_LEN: usize = 255;
/// Largest total of Meta payloads in one image, which the reader keeps in memory: 1 GiB.
pub const MAX_META_TOTAL: u64 = 1 << 30;
/// Largest payload of the End record: 64 KiB.
pub const MAX_END_PAYLOAD: u64 = 64 << 10;
/// Most pages in one page block (64 MiB of data). [`ImageWriter::pages`] splits longer runs.
pub const MAX_BLOCK_PAGES: u32 = 16384;
/// Size of the fixed part of a page block payload (vaddr u64, count u32, reserved u32).
pub const PAGE_BLOCK_PREFIX: usize = 16;
/// Largest payload of a page block.
pub const MAX_PAGE_BLOCK_PAYLOAD: u64 =
    PAGE_BLOCK_PREFIX as u64 + MAX_BLOCK_PAGES as u64 * PAGE_SIZE as u64;

/// Totals of an image, stored as JSON in the End record and checked against `pages.fimg` by the
/// reader.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Number of Meta records in `meta.fimg` (the End record is not counted).
    pub meta_records: u64,
    /// Number of page blocks in `pages.fimg`.
    pub page_blocks: u64,
    /// Number of pages in all page blocks.
    pub pages: u64,
    /// `pages * 4096`.
    pub page_bytes: u64,
    /// CRC-32 over the payload CRCs of all page blocks in order, each as 4 little-endian bytes
    /// (0 for an image without pages). Ties the page stream to this meta stream.
    pub pages_crc: u32,
}

/// One metadata record: a tag saying what it describes and a JSON value whose schema belongs
/// to the tag's owner (ferry-engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRecord {
    pub tag: String,
    pub json: Vec<u8>,
    /// Byte offset of the record in `meta.fimg` (for error messages).
    pub offset: u64,
}

impl MetaRecord {
    /// Deserialize the JSON value.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ImageError> {
        serde_json::from_slice(&self.json).map_err(|source| ImageError::MetaJson {
            offset: self.offset,
            tag: self.tag.clone(),
            source,
        })
    }
}

/// Where the data of one verified page block lies in `pages.fimg`
/// ([`ImageReader::verify_pages_indexed`]): a reader of the file can then take any block
/// straight from it, in any order and on several threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIndex {
    pub vaddr: u64,
    /// Offset of the first data byte from the start of pages.fimg.
    pub data_offset: u64,
    pub data_len: u64,
    /// The block's payload CRC as verified.
    pub payload_crc: u32,
}

impl BlockIndex {
    /// Do `data` (read again from the file) still match the block that was verified?
    pub fn matches(&self, data: &[u8]) -> bool {
        data.len() as u64 == self.data_len && self.crc_of(data) == self.payload_crc
    }

    /// The payload CRC of a block of this address holding `data`.
    pub fn crc_of(&self, data: &[u8]) -> u32 {
        let count = (data.len() / PAGE_SIZE) as u32;
        let mut h = crc32fast::Hasher::new();
        h.update(&format::encode_block_prefix(self.vaddr, count));
        h.update(data);
        h.finalize()
    }
}

/// A run of consecutive pages starting at `vaddr` (page-aligned); `data.len()` is a non-zero
/// multiple of [`PAGE_SIZE`] and at most [`MAX_BLOCK_PAGES`] pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBlock {
    pub vaddr: u64,
    pub data: Vec<u8>,
}

impl PageBlock {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }

    /// First address past the block.
    pub fn end(&self) -> u64 {
        self.vaddr + self.data.len() as u64
    }
}
