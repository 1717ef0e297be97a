//! Byte layout shared by the writer and the reader (see docs/image-format.md).

use crate::{KIND_END, KIND_META, KIND_PAGE_BLOCK};

/// magic[8] version u32 flags u32 crc u32.
pub(crate) const FILE_HEADER_LEN: usize = 20;
/// kind u32 flags u32 len u64 payload_crc u32 header_crc u32.
pub(crate) const RECORD_HEADER_LEN: usize = 24;

/// Size of the buffers between the codec and the underlying streams.
pub(crate) const IO_BUFFER: usize = 1 << 20;
/// Payloads are read and checksummed in pieces of this size, so a hostile length never
/// allocates more than what the stream really holds (plus this).
pub(crate) const READ_CHUNK: usize = 1 << 20;

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

pub(crate) fn encode_file_header(magic: [u8; 8]) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[0..8].copy_from_slice(&magic);
    h[8..12].copy_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    let c = crc(&h[0..16]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    h
}

pub(crate) fn encode_record_header(
    kind: u32,
    len: u64,
    payload_crc: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&0u32.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h[16..20].copy_from_slice(&payload_crc.to_le_bytes());
    let c = crc(&h[0..20]);
    h[20..24].copy_from_slice(&c.to_le_bytes());
    h
}

/// The fixed part of a page block payload.
pub(crate) fn encode_block_prefix(vaddr: u64, count: u32) -> [u8; crate::PAGE_BLOCK_PREFIX] {
    let mut p = [0u8; crate::PAGE_BLOCK_PREFIX];
    p[0..8].copy_from_slice(&vaddr.to_le_bytes());
    p[8..12].copy_from_slice(&count.to_le_bytes());
    // p[12..16]: reserved, 0.
    p
}

pub(crate) fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_META => "Meta",
        KIND_PAGE_BLOCK => "PageBlock",
        KIND_END => "End",
        _ => "unknown",
    }
}

/// Printable form of a magic that was found instead of the expected one.
pub(crate) fn show_bytes(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}
