//! Writing an image: records go out in order through a 1 MiB buffer per stream.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::format::{
    encode_block_prefix, encode_file_header, encode_record_header, IO_BUFFER, RECORD_HEADER_LEN,
};
use crate::{
    ImageError, ImageFile, Summary, KIND_END, KIND_META, KIND_PAGE_BLOCK, MAX_BLOCK_PAGES,
    MAX_META_PAYLOAD, MAX_META_TOTAL, MAX_TAG_LEN, META_FILE, META_MAGIC, PAGES_FILE, PAGES_MAGIC,
    PAGE_BLOCK_PREFIX, PAGE_SIZE,
};

/// Where a stream goes: a file we can fsync, or any sink.
enum Target {
    File(File),
    Stream(Box<dyn Write + Send>),
}

impl Write for Target {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Target::File(f) => f.write(buf),
            Target::Stream(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Target::File(f) => f.write_all(buf),
            Target::Stream(s) => s.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::File(f) => f.flush(),
            Target::Stream(s) => s.flush(),
        }
    }
}

/// One output stream and its position.
struct Out {
    w: BufWriter<Target>,
    offset: u64,
    file: ImageFile,
}

impl Out {
    fn new(target: Target, file: ImageFile, buffer: usize) -> Self {
        Out {
            w: BufWriter::with_capacity(buffer, target),
            offset: 0,
            file,
        }
    }

    fn put(&mut self, bytes: &[u8], what: &'static str) -> Result<(), ImageError> {
        // BufWriter copies small writes into its buffer and passes writes of at least its
        // capacity straight through, so page data is copied at most once.
        self.w
            .write_all(bytes)
            .map_err(|source| self.io(what, source))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Flush the buffer, and for a file fsync it.
    fn flush(&mut self, sync: bool) -> Result<(), ImageError> {
        self.w
            .flush()
            .map_err(|source| self.io("flushing", source))?;
        if sync {
            if let Target::File(f) = self.w.get_ref() {
                f.sync_all()
                    .map_err(|source| self.io("syncing to disk", source))?;
            }
        }
        Ok(())
    }

    fn io(&self, what: &'static str, source: io::Error) -> ImageError {
        ImageError::Io {
            file: self.file,
            offset: self.offset,
            what,
            source,
        }
    }

    fn invalid(&self, reason: String) -> ImageError {
        ImageError::InvalidInput {
            file: self.file,
            offset: self.offset,
            reason,
        }
    }
}

/// Writes an image: [`meta`](Self::meta) and [`pages`](Self::pages) in any interleaving, then
/// [`finish`](Self::finish), which writes the End record that commits the image. A writer
/// dropped without `finish` leaves an image that readers refuse ("never committed").
///
/// After an I/O error the writer refuses further calls, since the streams may hold a partial
/// record.
pub struct ImageWriter {
    meta: Out,
    pages: Out,
    /// The image directory when created by [`create`](Self::create): files and the directory
    /// are fsynced at the end.
    dir: Option<PathBuf>,
    stats: Summary,
    pages_crc: crc32fast::Hasher,
    meta_total: u64,
    failed: Option<(ImageFile, u64)>,
}

impl ImageWriter {
    /// Create DIR (and its parents if needed) with `meta.fimg` and `pages.fimg`. Fails if either
    /// file exists already.
    pub fn create(dir: &Path) -> Result<Self, ImageError> {
        std::fs::create_dir_all(dir).map_err(|source| ImageError::Fs {
            path: dir.to_path_buf(),
            what: "creating the image directory",
            source,
        })?;
        let meta_path = dir.join(META_FILE);
        let pages_path = dir.join(PAGES_FILE);
        if pages_path.exists() {
            return Err(ImageError::AlreadyExists { path: pages_path });
        }
        let meta = create_new(&meta_path)?;
        let pages = match create_new(&pages_path) {
            Ok(f) => f,
            Err(e) => {
                // Leave the directory as it was.
                let _ = std::fs::remove_file(&meta_path);
                return Err(e);
            }
        };
        let mut w = Self::with_targets(Target::File(meta), Target::File(pages), IO_BUFFER)?;
        w.dir = Some(dir.to_path_buf());
        Ok(w)
    }

    /// Write an image to any two sinks (a socket later). Nothing is fsynced.
    pub fn new(
        meta: Box<dyn Write + Send>,
        pages: Box<dyn Write + Send>,
    ) -> Result<Self, ImageError> {
        Self::with_targets(Target::Stream(meta), Target::Stream(pages), IO_BUFFER)
    }

    /// Like [`new`](Self::new), for sinks that buffer what they are given themselves (a
    /// framed network connection): every write goes straight to them, not copied into a
    /// buffer of ours first.
    pub fn to_buffering_sinks(
        meta: Box<dyn Write + Send>,
        pages: Box<dyn Write + Send>,
    ) -> Result<Self, ImageError> {
        Self::with_targets(Target::Stream(meta), Target::Stream(pages), 0)
    }

    fn with_targets(meta: Target, pages: Target, buffer: usize) -> Result<Self, ImageError> {
        let mut w = ImageWriter {
            meta: Out::new(meta, ImageFile::Meta, buffer),
            pages: Out::new(pages, ImageFile::Pages, buffer),
            dir: None,
            stats: Summary::default(),
            pages_crc: crc32fast::Hasher::new(),
            meta_total: 0,
            failed: None,
        };
        w.meta
            .put(&encode_file_header(META_MAGIC), "writing the file header")?;
        w.pages
            .put(&encode_file_header(PAGES_MAGIC), "writing the file header")?;
        Ok(w)
    }

    /// Append a metadata record: `tag` (1 to 255 bytes of UTF-8) and `value` as JSON (at most
    /// 64 MiB with the tag).
    pub fn meta<T: Serialize + ?Sized>(&mut self, tag: &str, value: &T) -> Result<(), ImageError> {
        self.usable()?;
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(self.meta.invalid(format!(
                "meta tag \"{}\" must be 1 to {MAX_TAG_LEN} bytes long, not {}",
                tag.escape_debug(),
                tag.len()
            )));
        }
        let json = serde_json::to_vec(value).map_err(|source| ImageError::Encode {
            file: ImageFile::Meta,
            offset: self.meta.offset,
            tag: tag.to_string(),
            source,
        })?;
        let len = (2 + tag.len() + json.len()) as u64;
        if len > MAX_META_PAYLOAD {
            return Err(ImageError::TooLarge {
                file: ImageFile::Meta,
                offset: self.meta.offset,
                what: "Meta payload",
                len,
                limit: MAX_META_PAYLOAD,
            });
        }
        if self.meta_total + len > MAX_META_TOTAL {
            return Err(ImageError::TooLarge {
                file: ImageFile::Meta,
                offset: self.meta.offset,
                what: "metadata in total",
                len: self.meta_total + len,
                limit: MAX_META_TOTAL,
            });
        }
        let tag_len = (tag.len() as u16).to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&tag_len);
        h.update(tag.as_bytes());
        h.update(&json);
        let header = encode_record_header(KIND_META, len, h.finalize());
        let r = self.write_meta_record(&header, &tag_len, tag.as_bytes(), &json);
        self.track(r)?;
        self.stats.meta_records += 1;
        self.meta_total += len;
        Ok(())
    }

    fn write_meta_record(
        &mut self,
        header: &[u8],
        tag_len: &[u8],
        tag: &[u8],
        json: &[u8],
    ) -> Result<(), ImageError> {
        let what = "writing a Meta record";
        self.meta.put(header, what)?;
        self.meta.put(tag_len, what)?;
        self.meta.put(tag, what)?;
        self.meta.put(json, what)
    }

    /// Append pages starting at `vaddr` (page-aligned). `data.len()` must be a multiple of
    /// 4096; runs longer than 16384 pages become several blocks. Empty data writes nothing.
    pub fn pages(&mut self, vaddr: u64, data: &[u8]) -> Result<(), ImageError> {
        self.usable()?;
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(self.pages.invalid(format!(
                "page data at {vaddr:#x} is {} bytes, not a multiple of {PAGE_SIZE}",
                data.len()
            )));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(self
                .pages
                .invalid(format!("page address {vaddr:#x} is not page-aligned")));
        }
        if vaddr.checked_add(data.len() as u64).is_none() {
            return Err(self.pages.invalid(format!(
                "pages at {vaddr:#x} of {} bytes run past the end of the address space",
                data.len()
            )));
        }
        let max = MAX_BLOCK_PAGES as usize * PAGE_SIZE;
        let mut va = vaddr;
        for chunk in data.chunks(max) {
            let r = self.write_block(va, chunk);
            self.track(r)?;
            va += chunk.len() as u64;
        }
        Ok(())
    }

    /// `pages`, for one block's worth of data (at most 16384 pages) whose checksum state
    /// (`crc32fast::Hasher` over `data` alone) was computed elsewhere, such as on the thread
    /// that read the pages: the writing thread then only writes.
    pub fn pages_hashed(
        &mut self,
        vaddr: u64,
        data: &[u8],
        data_crc: &crc32fast::Hasher,
    ) -> Result<(), ImageError> {
        if data.len() > MAX_BLOCK_PAGES as usize * PAGE_SIZE {
            return self.pages(vaddr, data);
        }
        if data.is_empty() {
            return Ok(());
        }
        self.usable()?;
        if !data.len().is_multiple_of(PAGE_SIZE) || !vaddr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(self.pages.invalid(format!(
                "page data at {vaddr:#x} ({} bytes) is not whole aligned pages",
                data.len()
            )));
        }
        let r = self.write_block_with(vaddr, data, Some(data_crc));
        self.track(r)
    }

    fn write_block(&mut self, vaddr: u64, chunk: &[u8]) -> Result<(), ImageError> {
        self.write_block_with(vaddr, chunk, None)
    }

    fn write_block_with(
        &mut self,
        vaddr: u64,
        chunk: &[u8],
        chunk_crc: Option<&crc32fast::Hasher>,
    ) -> Result<(), ImageError> {
        let count = (chunk.len() / PAGE_SIZE) as u32;
        let prefix = encode_block_prefix(vaddr, count);
        let mut h = crc32fast::Hasher::new();
        h.update(&prefix);
        match chunk_crc {
            Some(c) => h.combine(c),
            None => h.update(chunk),
        }
        let crc = h.finalize();
        let header = encode_record_header(
            KIND_PAGE_BLOCK,
            (PAGE_BLOCK_PREFIX + chunk.len()) as u64,
            crc,
        );
        let what = "writing a page block";
        self.pages.put(&header, what)?;
        self.pages.put(&prefix, what)?;
        self.pages.put(chunk, what)?;
        self.stats.page_blocks += 1;
        self.stats.pages += count as u64;
        self.stats.page_bytes += chunk.len() as u64;
        self.pages_crc.update(&crc.to_le_bytes());
        Ok(())
    }

    /// Totals of what was written so far (what the End record would say now). The engine can
    /// use `page_blocks` / `pages` to note where a process's pages start in the page stream.
    pub fn progress(&self) -> Summary {
        Summary {
            pages_crc: self.pages_crc.clone().finalize(),
            ..self.stats.clone()
        }
    }

    /// Push buffered bytes to both sinks (for a live stream; no fsync, no commit).
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.usable()?;
        let r = self
            .pages
            .flush(false)
            .and_then(|()| self.meta.flush(false));
        self.track(r)
    }

    /// Write the End record and flush. Page data is flushed (and for [`create`](Self::create)
    /// fsynced) before End is written, so a committed image never refers to pages that are not
    /// on disk; then `meta.fimg` and the directory are fsynced. Returns the summary.
    pub fn finish(mut self) -> Result<Summary, ImageError> {
        self.usable()?;
        let sync = self.dir.is_some();
        self.pages.flush(sync)?;
        let summary = self.progress();
        let json = serde_json::to_vec(&summary).map_err(|source| ImageError::Encode {
            file: ImageFile::Meta,
            offset: self.meta.offset,
            tag: "End".to_string(),
            source,
        })?;
        let header = encode_record_header(KIND_END, json.len() as u64, crate::format::crc(&json));
        debug_assert_eq!(header.len(), RECORD_HEADER_LEN);
        self.meta.put(&header, "writing the End record")?;
        self.meta.put(&json, "writing the End record")?;
        self.meta.flush(sync)?;
        if let Some(dir) = &self.dir {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| ImageError::Fs {
                    path: dir.clone(),
                    what: "syncing the image directory",
                    source,
                })?;
        }
        Ok(summary)
    }

    fn usable(&self) -> Result<(), ImageError> {
        match self.failed {
            Some((file, offset)) => Err(ImageError::Poisoned { file, offset }),
            None => Ok(()),
        }
    }

    /// Remember an I/O failure: the stream may end inside a record now.
    fn track(&mut self, r: Result<(), ImageError>) -> Result<(), ImageError> {
        if let Err(ImageError::Io { file, offset, .. }) = &r {
            self.failed = Some((*file, *offset));
        }
        r
    }
}

fn create_new(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                ImageError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                ImageError::Fs {
                    path: path.to_path_buf(),
                    what: "creating the file",
                    source,
                }
            }
        })
}
