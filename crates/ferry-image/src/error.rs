//! Errors. Every message is one line and names the file and the byte offset it is about.

use std::fmt;
use std::path::PathBuf;

/// Which stream of an image an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFile {
    Meta,
    Pages,
}

impl ImageFile {
    /// The file name inside an image directory.
    pub fn name(self) -> &'static str {
        match self {
            ImageFile::Meta => crate::META_FILE,
            ImageFile::Pages => crate::PAGES_FILE,
        }
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong writing or reading an image.
///
/// Offsets are byte offsets from the start of the file (stream) named by `file`; for records
/// they are the offset of the record header.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Creating, opening or syncing a file or directory failed.
    #[error("{path}: {what}: {source}")]
    Fs {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `ImageWriter::create` on a directory that already holds image files.
    #[error("{path}: already exists: the directory holds an image already")]
    AlreadyExists { path: PathBuf },
    /// Reading or writing a stream failed.
    #[error("{file}: offset {offset}: I/O error while {what}: {source}")]
    Io {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the magic of its kind.
    #[error("{file}: offset {offset}: bad magic \"{found}\", expected \"{expected}\": not a Ferry {file} file")]
    BadMagic {
        file: ImageFile,
        offset: u64,
        found: String,
        expected: String,
    },
    /// The file header names a format version this reader does not know.
    #[error("{file}: offset {offset}: unsupported format version {version} (this Ferry reads version {supported} only)", supported = crate::FORMAT_VERSION)]
    UnsupportedVersion {
        file: ImageFile,
        offset: u64,
        version: u32,
    },
    /// Flags that version 1 does not define are set.
    #[error(
        "{file}: offset {offset}: unsupported {what} flags {flags:#x} (must be 0 in version 1)"
    )]
    UnsupportedFlags {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        flags: u32,
    },
    /// The CRC-32 of a file header or a record header does not match.
    #[error("{file}: offset {offset}: {what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    /// The CRC-32 of a record payload does not match.
    #[error("{file}: offset {offset}: {kind} record payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadCrc {
        file: ImageFile,
        offset: u64,
        kind: &'static str,
        stored: u32,
        computed: u32,
    },
    /// The stream ended inside a header or a payload.
    #[error("{file}: offset {offset}: truncated {what}: {found} of {expected} bytes present")]
    Truncated {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// A record kind this version does not define.
    #[error("{file}: offset {offset}: unknown record kind {kind}")]
    UnknownKind {
        file: ImageFile,
        offset: u64,
        kind: u32,
    },
    /// A known record kind in the wrong file (a page block in meta.fimg, for example).
    #[error("{file}: offset {offset}: {kind} record is not allowed in {file}")]
    UnexpectedKind {
        file: ImageFile,
        offset: u64,
        kind: &'static str,
    },
    /// A length above its limit.
    #[error("{file}: offset {offset}: {what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        len: u64,
        limit: u64,
    },
    /// A page block whose address is not page-aligned.
    #[error("{file}: offset {offset}: page block address {vaddr:#x} is not page-aligned")]
    UnalignedVaddr {
        file: ImageFile,
        offset: u64,
        vaddr: u64,
    },
    /// A page block that would end past the end of the address space.
    #[error("{file}: offset {offset}: page block at {vaddr:#x} of {len} bytes runs past the end of the address space")]
    AddressOverflow {
        file: ImageFile,
        offset: u64,
        vaddr: u64,
        len: u64,
    },
    /// A payload whose fields are inconsistent or invalid.
    #[error("{file}: offset {offset}: malformed {what}: {reason}")]
    Malformed {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        reason: String,
    },
    /// Bytes after the End record of meta.fimg.
    #[error("{file}: offset {offset}: trailing data after the End record")]
    TrailingData { file: ImageFile, offset: u64 },
    /// meta.fimg ends at a record boundary without an End record.
    #[error("{file}: offset {offset}: end of file without an End record: the image was never committed (interrupted dump?)")]
    MissingEnd { file: ImageFile, offset: u64 },
    /// A total of pages.fimg (or the Meta record count) differs from the End summary.
    #[error("{file}: offset {offset}: {what} is {found} but the End summary in meta.fimg says {expected}")]
    SummaryMismatch {
        file: ImageFile,
        offset: u64,
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// The page blocks are not those the End summary was written for (reordered, swapped or
    /// from another dump).
    #[error("{file}: offset {offset}: pages checksum {found:#010x} differs from {expected:#010x} in the End summary of meta.fimg: the page blocks are not those of this image")]
    PagesCrcMismatch {
        file: ImageFile,
        offset: u64,
        expected: u32,
        found: u32,
    },
    /// A Meta record's JSON does not deserialize into the requested type.
    #[error("meta.fimg: offset {offset}: meta record \"{tag}\" does not match the expected schema: {source}")]
    MetaJson {
        offset: u64,
        tag: String,
        #[source]
        source: serde_json::Error,
    },
    /// `ImageReader::find_one` found no record or several.
    #[error("meta.fimg: {found} meta records tagged \"{tag}\", expected exactly one")]
    MetaCount { tag: String, found: usize },
    /// A value given to `ImageWriter::meta` cannot be encoded as JSON.
    #[error("{file}: offset {offset}: meta record \"{tag}\" cannot be encoded as JSON: {source}")]
    Encode {
        file: ImageFile,
        offset: u64,
        tag: String,
        #[source]
        source: serde_json::Error,
    },
    /// An invalid argument to the writer (a bad tag, an unaligned address, a partial page).
    #[error("{file}: offset {offset}: invalid argument: {reason}")]
    InvalidInput {
        file: ImageFile,
        offset: u64,
        reason: String,
    },
    /// The writer or reader failed before and its stream position is unknown.
    #[error("{file}: offset {offset}: unusable after an earlier error at this offset")]
    Poisoned { file: ImageFile, offset: u64 },
}

impl ImageError {
    /// The stream the error is about, when it is about one.
    pub fn file(&self) -> Option<ImageFile> {
        use ImageError::*;
        match self {
            Fs { .. } | AlreadyExists { .. } => None,
            MetaJson { .. } | MetaCount { .. } => Some(ImageFile::Meta),
            Io { file, .. }
            | BadMagic { file, .. }
            | UnsupportedVersion { file, .. }
            | UnsupportedFlags { file, .. }
            | HeaderCrc { file, .. }
            | PayloadCrc { file, .. }
            | Truncated { file, .. }
            | UnknownKind { file, .. }
            | UnexpectedKind { file, .. }
            | TooLarge { file, .. }
            | UnalignedVaddr { file, .. }
            | AddressOverflow { file, .. }
            | Malformed { file, .. }
            | TrailingData { file, .. }
            | MissingEnd { file, .. }
            | SummaryMismatch { file, .. }
            | PagesCrcMismatch { file, .. }
            | Encode { file, .. }
            | InvalidInput { file, .. }
            | Poisoned { file, .. } => Some(*file),
        }
    }

    /// The byte offset the error is about, when it is about one.
    pub fn offset(&self) -> Option<u64> {
        use ImageError::*;
        match self {
            Fs { .. } | AlreadyExists { .. } | MetaCount { .. } => None,
            MetaJson { offset, .. }
            | Io { offset, .. }
            | BadMagic { offset, .. }
            | UnsupportedVersion { offset, .. }
            | UnsupportedFlags { offset, .. }
            | HeaderCrc { offset, .. }
            | PayloadCrc { offset, .. }
            | Truncated { offset, .. }
            | UnknownKind { offset, .. }
            | UnexpectedKind { offset, .. }
            | TooLarge { offset, .. }
            | UnalignedVaddr { offset, .. }
            | AddressOverflow { offset, .. }
            | Malformed { offset, .. }
            | TrailingData { offset, .. }
            | MissingEnd { offset, .. }
            | SummaryMismatch { offset, .. }
            | PagesCrcMismatch { offset, .. }
            | Encode { offset, .. }
            | InvalidInput { offset, .. }
            | Poisoned { offset, .. } => Some(*offset),
        }
    }
}
