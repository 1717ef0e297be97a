//! Reading an image: the whole meta stream eagerly, the page stream block by block.
//!
//! Every length is checked against its limit before anything is allocated for it, and payloads
//! are read in 1 MiB pieces, so a hostile length costs at most what the stream really holds.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use serde::de::{DeserializeOwned, IgnoredAny};

use crate::format::{
    crc, kind_name, le32, le64, show_bytes, FILE_HEADER_LEN, IO_BUFFER, READ_CHUNK,
    RECORD_HEADER_LEN,
};
use crate::{
    ImageError, ImageFile, MetaRecord, PageBlock, Summary, FORMAT_VERSION, KIND_END, KIND_META,
    KIND_PAGE_BLOCK, MAX_BLOCK_PAGES, MAX_END_PAYLOAD, MAX_META_PAYLOAD, MAX_META_TOTAL,
    MAX_PAGE_BLOCK_PAYLOAD, MAX_TAG_LEN, META_FILE, META_MAGIC, PAGES_FILE, PAGES_MAGIC,
    PAGE_BLOCK_PREFIX, PAGE_SIZE,
};

/// A record header that passed its checksum.
struct Rec {
    offset: u64,
    kind: u32,
    len: u64,
    crc: u32,
}

/// One input stream and its position.
struct In {
    r: Box<dyn BufRead + Send>,
    offset: u64,
    file: ImageFile,
}

impl In {
    fn buffered(r: Box<dyn BufRead + Send>, file: ImageFile) -> Self {
        In { r, offset: 0, file }
    }

    /// Read until `buf` is full or the stream ends; returns the number of bytes read.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<usize, ImageError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                // A Read that claims more than it was given is broken; do not trust it.
                Ok(k) => n += k.min(buf.len() - n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ImageError::Io {
                        file: self.file,
                        offset: self.offset + n as u64,
                        what,
                        source,
                    })
                }
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn read_file_header(&mut self, magic: &[u8; 8]) -> Result<(), ImageError> {
        let file = self.file;
        let mut h = [0u8; FILE_HEADER_LEN];
        let n = self.fill(&mut h, "reading the file header")?;
        let m = n.min(magic.len());
        if h[..m] != magic[..m] {
            return Err(ImageError::BadMagic {
                file,
                offset: 0,
                found: show_bytes(&h[..m]),
                expected: show_bytes(magic),
            });
        }
        if n < FILE_HEADER_LEN {
            return Err(ImageError::Truncated {
                file,
                offset: 0,
                what: "file header",
                expected: FILE_HEADER_LEN as u64,
                found: n as u64,
            });
        }
        // The version is checked before the checksum: magic and version keep their place in
        // every version, so a later version is reported as such even if its header differs.
        let version = le32(&h, 8);
        if version != FORMAT_VERSION {
            return Err(ImageError::UnsupportedVersion {
                file,
                offset: 8,
                version,
            });
        }
        let stored = le32(&h, 16);
        let computed = crc(&h[..16]);
        if stored != computed {
            return Err(ImageError::HeaderCrc {
                file,
                offset: 0,
                what: "file header",
                stored,
                computed,
            });
        }
        let flags = le32(&h, 12);
        if flags != 0 {
            return Err(ImageError::UnsupportedFlags {
                file,
                offset: 12,
                what: "file header",
                flags,
            });
        }
        Ok(())
    }

    /// The next record header, or None at a clean end of stream.
    fn read_record_header(&mut self) -> Result<Option<Rec>, ImageError> {
        let file = self.file;
        let offset = self.offset;
        let mut h = [0u8; RECORD_HEADER_LEN];
        let n = self.fill(&mut h, "reading a record header")?;
        if n == 0 {
            return Ok(None);
        }
        if n < RECORD_HEADER_LEN {
            return Err(ImageError::Truncated {
                file,
                offset,
                what: "record header",
                expected: RECORD_HEADER_LEN as u64,
                found: n as u64,
            });
        }
        let stored = le32(&h, 20);
        let computed = crc(&h[..20]);
        if stored != computed {
            return Err(ImageError::HeaderCrc {
                file,
                offset,
                what: "record header",
                stored,
                computed,
            });
        }
        let flags = le32(&h, 4);
        if flags != 0 {
            return Err(ImageError::UnsupportedFlags {
                file,
                offset,
                what: "record header",
                flags,
            });
        }
        let kind = le32(&h, 0);
        if !matches!(kind, KIND_META | KIND_PAGE_BLOCK | KIND_END) {
            return Err(ImageError::UnknownKind { file, offset, kind });
        }
        Ok(Some(Rec {
            offset,
            kind,
            len: le64(&h, 8),
            crc: le32(&h, 16),
        }))
    }

    fn truncated_payload(&self, rec: &Rec, found: u64) -> ImageError {
        ImageError::Truncated {
            file: self.file,
            offset: rec.offset,
            what: match rec.kind {
                KIND_META => "Meta payload",
                KIND_PAGE_BLOCK => "PageBlock payload",
                _ => "End payload",
            },
            expected: rec.len,
            found,
        }
    }

    /// Read `len` payload bytes (`done` were read before) into `out`, feeding `h`. `out` grows
    /// a piece at a time, so only bytes that are really there get memory.
    fn payload_keep(
        &mut self,
        rec: &Rec,
        done: u64,
        len: u64,
        h: &mut crc32fast::Hasher,
        out: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        out.clear();
        while (out.len() as u64) < len {
            let at = out.len();
            let want = (len - at as u64).min(READ_CHUNK as u64) as usize;
            out.resize(at + want, 0);
            let n = self.fill(&mut out[at..], "reading a payload")?;
            h.update(&out[at..at + n]);
            if n < want {
                out.truncate(at + n);
                return Err(self.truncated_payload(rec, done + out.len() as u64));
            }
        }
        Ok(())
    }

    /// Pass over `len` payload bytes, feeding `h` only, straight from the stream's buffer (for
    /// a stream that is memory already, such as a mapped file, nothing is copied).
    fn payload_skip(
        &mut self,
        rec: &Rec,
        done: u64,
        len: u64,
        mut h: Option<&mut crc32fast::Hasher>,
    ) -> Result<(), ImageError> {
        let mut got = 0u64;
        while got < len {
            let avail = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ImageError::Io {
                        file: self.file,
                        offset: self.offset,
                        what: "reading a payload",
                        source,
                    })
                }
            };
            if avail.is_empty() {
                return Err(self.truncated_payload(rec, done + got));
            }
            let n = avail.len().min((len - got) as usize);
            if let Some(h) = h.as_deref_mut() {
                h.update(&avail[..n]);
            }
            self.r.consume(n);
            self.offset += n as u64;
            got += n as u64;
        }
        Ok(())
    }

    fn check_crc(&self, rec: &Rec, computed: u32) -> Result<(), ImageError> {
        if rec.crc != computed {
            return Err(ImageError::PayloadCrc {
                file: self.file,
                offset: rec.offset,
                kind: kind_name(rec.kind),
                stored: rec.crc,
                computed,
            });
        }
        Ok(())
    }

    fn too_large(&self, rec: &Rec, what: &'static str, len: u64, limit: u64) -> ImageError {
        ImageError::TooLarge {
            file: self.file,
            offset: rec.offset,
            what,
            len,
            limit,
        }
    }

    fn malformed(&self, rec: &Rec, what: &'static str, reason: String) -> ImageError {
        ImageError::Malformed {
            file: self.file,
            offset: rec.offset,
            what,
            reason,
        }
    }
}

/// Read and verify the whole meta stream: header, records, End, nothing after End.
fn read_meta(m: &mut In) -> Result<(Vec<MetaRecord>, Summary), ImageError> {
    m.read_file_header(&META_MAGIC)?;
    let mut records = Vec::new();
    let mut total = 0u64;
    loop {
        let Some(rec) = m.read_record_header()? else {
            return Err(ImageError::MissingEnd {
                file: m.file,
                offset: m.offset,
            });
        };
        match rec.kind {
            KIND_META => {
                records.push(read_meta_record(m, &rec, total)?);
                total += rec.len;
            }
            KIND_END => {
                let summary = read_end(m, &rec, records.len() as u64)?;
                let mut one = [0u8; 1];
                if m.fill(&mut one, "checking for data after the End record")? != 0 {
                    return Err(ImageError::TrailingData {
                        file: m.file,
                        offset: m.offset - 1,
                    });
                }
                return Ok((records, summary));
            }
            _ => {
                return Err(ImageError::UnexpectedKind {
                    file: m.file,
                    offset: rec.offset,
                    kind: kind_name(rec.kind),
                })
            }
        }
    }
}

fn read_meta_record(m: &mut In, rec: &Rec, total: u64) -> Result<MetaRecord, ImageError> {
    if rec.len > MAX_META_PAYLOAD {
        return Err(m.too_large(rec, "Meta payload", rec.len, MAX_META_PAYLOAD));
    }
    if total + rec.len > MAX_META_TOTAL {
        return Err(m.too_large(rec, "metadata in total", total + rec.len, MAX_META_TOTAL));
    }
    if rec.len < 3 {
        return Err(m.malformed(
            rec,
            "Meta record",
            format!("payload of {} bytes cannot hold a tag", rec.len),
        ));
    }
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    m.payload_keep(rec, 0, rec.len, &mut h, &mut buf)?;
    m.check_crc(rec, h.finalize())?;
    let tag_len = u16::from_le_bytes([buf[0], buf[1]]) as usize;
    if tag_len == 0 || tag_len > MAX_TAG_LEN {
        return Err(m.malformed(
            rec,
            "Meta record",
            format!("tag length {tag_len} is not between 1 and {MAX_TAG_LEN}"),
        ));
    }
    let json_at = 2 + tag_len;
    if json_at > buf.len() {
        return Err(m.malformed(
            rec,
            "Meta record",
            format!(
                "tag of {tag_len} bytes is longer than the payload of {} bytes",
                buf.len()
            ),
        ));
    }
    let tag = match std::str::from_utf8(&buf[2..json_at]) {
        Ok(t) => t.to_string(),
        Err(e) => return Err(m.malformed(rec, "Meta record", format!("tag is not UTF-8: {e}"))),
    };
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(&buf[json_at..]) {
        return Err(m.malformed(
            rec,
            "Meta record",
            format!("value of \"{tag}\" is not valid JSON: {e}"),
        ));
    }
    buf.drain(..json_at);
    Ok(MetaRecord {
        tag,
        json: buf,
        offset: rec.offset,
    })
}

fn read_end(m: &mut In, rec: &Rec, meta_records: u64) -> Result<Summary, ImageError> {
    if rec.len > MAX_END_PAYLOAD {
        return Err(m.too_large(rec, "End payload", rec.len, MAX_END_PAYLOAD));
    }
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    m.payload_keep(rec, 0, rec.len, &mut h, &mut buf)?;
    m.check_crc(rec, h.finalize())?;
    let s: Summary =
        serde_json::from_slice(&buf).map_err(|e| m.malformed(rec, "End summary", e.to_string()))?;
    if s.meta_records != meta_records {
        return Err(ImageError::SummaryMismatch {
            file: m.file,
            offset: rec.offset,
            what: "number of Meta records",
            expected: s.meta_records,
            found: meta_records,
        });
    }
    if s.pages.checked_mul(PAGE_SIZE as u64) != Some(s.page_bytes) {
        return Err(m.malformed(
            rec,
            "End summary",
            format!(
                "page_bytes {} is not pages {} * {PAGE_SIZE}",
                s.page_bytes, s.pages
            ),
        ));
    }
    let max_pages = s.page_blocks.saturating_mul(MAX_BLOCK_PAGES as u64);
    if s.pages < s.page_blocks || s.pages > max_pages {
        return Err(m.malformed(
            rec,
            "End summary",
            format!(
                "{} pages cannot fill {} page blocks of 1 to {MAX_BLOCK_PAGES} pages",
                s.pages, s.page_blocks
            ),
        ));
    }
    Ok(s)
}

enum State {
    Reading,
    Done,
    Failed(ImageFile, u64),
}

/// Reads an image. [`open`](Self::open) / [`from_streams`](Self::from_streams) read and verify
/// the whole meta stream (every record, the End record, nothing after it) and the page file
/// header; page blocks are then read one at a time and checked against the End summary when
/// the page stream ends.
pub struct ImageReader {
    records: Vec<MetaRecord>,
    summary: Summary,
    pages: In,
    progress: Summary,
    pages_crc: crc32fast::Hasher,
    state: State,
    /// Filled by `verify_pages_indexed`.
    index: Option<Vec<crate::BlockIndex>>,
    /// Page data is not hashed here: the caller checks each indexed block ([`check_blocks`]).
    defer_crc: bool,
}

impl ImageReader {
    /// Open the image in DIR and verify its meta stream.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|source| ImageError::Fs {
                path,
                what: "opening the image file",
                source,
            })
        };
        let meta = open(META_FILE)?;
        let pages = open(PAGES_FILE)?;
        Self::from_streams(Box::new(meta), Box::new(pages))
    }

    /// Read an image from any two streams. The meta stream is read to its end first, so over
    /// live connections the page stream must be drained concurrently (see the format doc).
    pub fn from_streams(
        meta: Box<dyn Read + Send>,
        pages: Box<dyn Read + Send>,
    ) -> Result<Self, ImageError> {
        Self::from_buffered(
            Box::new(BufReader::with_capacity(IO_BUFFER, meta)),
            Box::new(BufReader::with_capacity(IO_BUFFER, pages)),
        )
    }

    /// Like [`from_streams`](Self::from_streams), for streams that buffer themselves: a page
    /// stream that is in memory already (a mapped pages.fimg, a byte slice) is then checked by
    /// `verify_pages` without being copied.
    pub fn from_buffered(
        meta: Box<dyn BufRead + Send>,
        pages: Box<dyn BufRead + Send>,
    ) -> Result<Self, ImageError> {
        let mut m = In::buffered(meta, ImageFile::Meta);
        let (records, summary) = read_meta(&mut m)?;
        let mut p = In::buffered(pages, ImageFile::Pages);
        p.read_file_header(&PAGES_MAGIC)?;
        Ok(ImageReader {
            records,
            progress: Summary {
                meta_records: summary.meta_records,
                ..Summary::default()
            },
            summary,
            pages: p,
            pages_crc: crc32fast::Hasher::new(),
            state: State::Reading,
            index: None,
            defer_crc: false,
        })
    }

    /// Every Meta record, in the order written.
    pub fn meta_records(&self) -> &[MetaRecord] {
        &self.records
    }

    /// All records tagged `tag`, deserialized, in the order written.
    pub fn find<T: DeserializeOwned>(&self, tag: &str) -> Result<Vec<T>, ImageError> {
        self.records
            .iter()
            .filter(|r| r.tag == tag)
            .map(|r| r.parse())
            .collect()
    }

    /// The single record tagged `tag`; an error if there is none or more than one.
    pub fn find_one<T: DeserializeOwned>(&self, tag: &str) -> Result<T, ImageError> {
        let mut it = self.records.iter().filter(|r| r.tag == tag);
        match (it.next(), it.next()) {
            (Some(r), None) => r.parse(),
            _ => Err(ImageError::MetaCount {
                tag: tag.to_string(),
                found: self.records.iter().filter(|r| r.tag == tag).count(),
            }),
        }
    }

    /// The End summary (verified against the meta stream; the page totals are verified when
    /// the page stream has been read to its end).
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Totals of the page blocks read so far (`meta_records` is the summary's).
    pub fn pages_progress(&self) -> Summary {
        Summary {
            pages_crc: self.pages_crc.clone().finalize(),
            ..self.progress.clone()
        }
    }

    /// The next page block, verified. None at the end of `pages.fimg`, once its totals have
    /// been checked against the End summary.
    pub fn next_pages(&mut self) -> Result<Option<PageBlock>, ImageError> {
        let mut data = Vec::new();
        Ok(self
            .next_pages_into(&mut data)?
            .map(|vaddr| PageBlock { vaddr, data }))
    }

    /// Like [`next_pages`](Self::next_pages), but into a caller's buffer (replacing its
    /// contents), so a restore loop can reuse one allocation. Returns the block's address.
    pub fn next_pages_into(&mut self, data: &mut Vec<u8>) -> Result<Option<u64>, ImageError> {
        self.step(Some(data))
    }

    /// Read and verify every remaining page block without keeping them, then check the totals
    /// against the End summary. Returns the totals of the whole page stream. This consumes the
    /// page stream: to restore afterwards, open the image again.
    pub fn verify_pages(&mut self) -> Result<Summary, ImageError> {
        while self.step(None)?.is_some() {}
        Ok(self.pages_progress())
    }

    /// Like [`verify_pages`](Self::verify_pages), and also returns where the data of every
    /// block lies in pages.fimg (offsets from its start, in stream order). Only meaningful for
    /// a reader whose page stream is the file from its beginning (`open`).
    pub fn verify_pages_indexed(
        &mut self,
    ) -> Result<(Summary, Vec<crate::BlockIndex>), ImageError> {
        self.index = Some(Vec::new());
        let s = self.verify_pages();
        let index = self.index.take().unwrap_or_default();
        s.map(|s| (s, index))
    }

    /// Like [`verify_pages_indexed`](Self::verify_pages_indexed), but the data of the page
    /// blocks is not hashed: every header, count, address and total is checked, and each
    /// block's index entry carries the CRC stored for it. Nothing in the data may be trusted
    /// until [`check_blocks`] has passed over the whole index, which it does on several
    /// threads.
    pub fn index_pages(&mut self) -> Result<(Summary, Vec<crate::BlockIndex>), ImageError> {
        self.defer_crc = true;
        let r = self.verify_pages_indexed();
        self.defer_crc = false;
        r
    }

    fn step(&mut self, keep: Option<&mut Vec<u8>>) -> Result<Option<u64>, ImageError> {
        match self.state {
            State::Reading => {}
            State::Done => return Ok(None),
            State::Failed(file, offset) => return Err(ImageError::Poisoned { file, offset }),
        }
        let r = self.read_block(keep);
        match &r {
            Ok(None) => self.state = State::Done,
            Ok(Some(_)) => {}
            Err(e) => {
                self.state = State::Failed(
                    e.file().unwrap_or(ImageFile::Pages),
                    e.offset().unwrap_or(self.pages.offset),
                )
            }
        }
        r
    }

    fn read_block(&mut self, keep: Option<&mut Vec<u8>>) -> Result<Option<u64>, ImageError> {
        let Some(rec) = self.pages.read_record_header()? else {
            self.check_totals()?;
            return Ok(None);
        };
        let p = &mut self.pages;
        if rec.kind != KIND_PAGE_BLOCK {
            return Err(ImageError::UnexpectedKind {
                file: p.file,
                offset: rec.offset,
                kind: kind_name(rec.kind),
            });
        }
        if rec.len > MAX_PAGE_BLOCK_PAYLOAD {
            return Err(p.too_large(&rec, "PageBlock payload", rec.len, MAX_PAGE_BLOCK_PAYLOAD));
        }
        let prefix_len = PAGE_BLOCK_PREFIX as u64;
        let page = PAGE_SIZE as u64;
        if rec.len < prefix_len + page || !(rec.len - prefix_len).is_multiple_of(page) {
            return Err(p.malformed(
                &rec,
                "page block",
                format!("payload length {} is not {PAGE_BLOCK_PREFIX} + a positive multiple of {PAGE_SIZE}", rec.len),
            ));
        }
        let count = (rec.len - prefix_len) / page;
        // Refuse surplus blocks before reading them.
        let s = &self.summary;
        if self.progress.page_blocks + 1 > s.page_blocks {
            return Err(ImageError::SummaryMismatch {
                file: p.file,
                offset: rec.offset,
                what: "number of page blocks",
                expected: s.page_blocks,
                found: self.progress.page_blocks + 1,
            });
        }
        if self.progress.pages + count > s.pages {
            return Err(ImageError::SummaryMismatch {
                file: p.file,
                offset: rec.offset,
                what: "number of pages",
                expected: s.pages,
                found: self.progress.pages + count,
            });
        }

        let mut h = crc32fast::Hasher::new();
        let mut prefix = [0u8; PAGE_BLOCK_PREFIX];
        let n = p.fill(&mut prefix, "reading a payload")?;
        if n < PAGE_BLOCK_PREFIX {
            return Err(p.truncated_payload(&rec, n as u64));
        }
        h.update(&prefix);
        let data_offset = p.offset;
        let data_len = rec.len - prefix_len;
        let payload_crc = match keep {
            Some(out) => {
                p.payload_keep(&rec, prefix_len, data_len, &mut h, out)?;
                h.finalize()
            }
            // Checked later by `check_blocks`, against the stored CRC.
            None if self.defer_crc => {
                p.payload_skip(&rec, prefix_len, data_len, None)?;
                rec.crc
            }
            None => {
                p.payload_skip(&rec, prefix_len, data_len, Some(&mut h))?;
                h.finalize()
            }
        };
        p.check_crc(&rec, payload_crc)?;

        let vaddr = le64(&prefix, 0);
        let stored_count = le32(&prefix, 8);
        let reserved = le32(&prefix, 12);
        if stored_count as u64 != count {
            return Err(p.malformed(
                &rec,
                "page block",
                format!(
                    "page count {stored_count} does not match the payload length {}",
                    rec.len
                ),
            ));
        }
        if reserved != 0 {
            return Err(p.malformed(
                &rec,
                "page block",
                format!("reserved field is {reserved:#x}, not 0"),
            ));
        }
        if !vaddr.is_multiple_of(page) {
            return Err(ImageError::UnalignedVaddr {
                file: p.file,
                offset: rec.offset,
                vaddr,
            });
        }
        if vaddr.checked_add(data_len).is_none() {
            return Err(ImageError::AddressOverflow {
                file: p.file,
                offset: rec.offset,
                vaddr,
                len: data_len,
            });
        }
        self.progress.page_blocks += 1;
        self.progress.pages += count;
        self.progress.page_bytes += data_len;
        self.pages_crc.update(&payload_crc.to_le_bytes());
        if let Some(ix) = &mut self.index {
            ix.push(crate::BlockIndex {
                vaddr,
                data_offset,
                data_len,
                payload_crc,
            });
        }
        Ok(Some(vaddr))
    }

    /// At the end of the page stream: every total must be the End summary's.
    fn check_totals(&self) -> Result<(), ImageError> {
        let (s, got) = (&self.summary, &self.progress);
        let file = ImageFile::Pages;
        let offset = self.pages.offset;
        for (what, expected, found) in [
            ("number of page blocks", s.page_blocks, got.page_blocks),
            ("number of pages", s.pages, got.pages),
            ("number of page bytes", s.page_bytes, got.page_bytes),
        ] {
            if expected != found {
                return Err(ImageError::SummaryMismatch {
                    file,
                    offset,
                    what,
                    expected,
                    found,
                });
            }
        }
        let found = self.pages_crc.clone().finalize();
        if found != s.pages_crc {
            return Err(ImageError::PagesCrcMismatch {
                file,
                offset,
                expected: s.pages_crc,
                found,
            });
        }
        Ok(())
    }
}

/// Check the data of every block of `index` (from [`ImageReader::index_pages`]) in `pages`
/// (the whole pages.fimg) against its CRC, on `threads` threads. The first mismatch found is
/// the error.
pub fn check_blocks(
    pages: &[u8],
    index: &[crate::BlockIndex],
    threads: usize,
) -> Result<(), ImageError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let check = |b: &crate::BlockIndex| -> Result<(), ImageError> {
        let offset = b
            .data_offset
            .saturating_sub((RECORD_HEADER_LEN + PAGE_BLOCK_PREFIX) as u64);
        let data = usize::try_from(b.data_offset)
            .ok()
            .and_then(|at| pages.get(at..at.checked_add(usize::try_from(b.data_len).ok()?)?))
            .ok_or(ImageError::Truncated {
                file: ImageFile::Pages,
                offset,
                what: "page block data",
                expected: b.data_len,
                found: 0,
            })?;
        if b.matches(data) {
            return Ok(());
        }
        Err(ImageError::PayloadCrc {
            file: ImageFile::Pages,
            offset,
            kind: kind_name(KIND_PAGE_BLOCK),
            stored: b.payload_crc,
            computed: b.crc_of(data),
        })
    };
    // A few MiB (a live migration's final image) take less than starting a thread.
    let total: u64 = index.iter().map(|b| b.data_len).sum();
    if threads <= 1 || total < 8 << 20 {
        return index.iter().try_for_each(check);
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), ImageError> {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(b) = index.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        if let Err(e) = check(b) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("block check thread panicked"))
            .collect::<Result<Vec<()>, ImageError>>()
            .map(|_| ())
    })
}
