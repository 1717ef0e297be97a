//! Writing and reading images that are intact.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::*;
use ferry_image::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Process {
    pid: i32,
    comm: String,
    threads: Vec<u32>,
    exe: Option<String>,
}

#[test]
fn metas_and_pages_round_trip_through_streams() {
    let p1 = Process {
        pid: 7,
        comm: "redis-server".into(),
        threads: vec![7, 8, 9],
        exe: Some("/usr/bin/redis-server".into()),
    };
    let p2 = Process {
        pid: 8,
        comm: "child \"quoted\" ✓".into(),
        threads: vec![],
        exe: None,
    };
    let mut fds = BTreeMap::new();
    fds.insert(0u32, "/dev/null".to_string());
    let a = pattern(3, 9);
    let b = pattern(1, 10);
    let img = write_image(|w| {
        w.meta("process", &p1).unwrap();
        w.pages(0x40_0000, &a).unwrap();
        w.meta("fd", &fds).unwrap();
        w.meta("process", &p2).unwrap();
        w.meta("note", "a plain string").unwrap();
        w.pages(0x7ffd_1234_5000, &b).unwrap();
    });
    assert_eq!(img.summary.meta_records, 4);
    assert_eq!(img.summary.page_blocks, 2);
    assert_eq!(img.summary.pages, 4);
    assert_eq!(img.summary.page_bytes, 4 * 4096);

    let mut r = open(&img.meta, &img.pages).unwrap();
    assert_eq!(r.summary(), &img.summary);
    let tags: Vec<&str> = r.meta_records().iter().map(|m| m.tag.as_str()).collect();
    assert_eq!(tags, ["process", "fd", "process", "note"]);
    assert_eq!(r.find::<Process>("process").unwrap(), vec![p1, p2]);
    assert_eq!(r.find_one::<BTreeMap<u32, String>>("fd").unwrap(), fds);
    assert_eq!(r.find_one::<String>("note").unwrap(), "a plain string");
    assert!(r.find::<Process>("absent").unwrap().is_empty());
    // Records know where they are.
    assert_eq!(r.meta_records()[0].offset, 20);

    let b1 = r.next_pages().unwrap().unwrap();
    assert_eq!((b1.vaddr, b1.pages(), b1.end()), (0x40_0000, 3, 0x40_3000));
    assert_eq!(b1.data, a);
    let progress = r.pages_progress();
    assert_eq!((progress.page_blocks, progress.pages), (1, 3));
    let b2 = r.next_pages().unwrap().unwrap();
    assert_eq!(b2.vaddr, 0x7ffd_1234_5000);
    assert_eq!(b2.data, b);
    assert!(r.next_pages().unwrap().is_none());
    // The end stays the end.
    assert!(r.next_pages().unwrap().is_none());
    assert_eq!(r.pages_progress(), img.summary);
    assert_eq!(r.verify_pages().unwrap(), img.summary);
}

#[test]
fn directory_round_trip_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/img");
    let mut w = ImageWriter::create(&dir).unwrap();
    w.meta("process", &serde_json::json!({"pid": 1})).unwrap();
    w.pages(0x1000, &pattern(5, 1)).unwrap();
    let progress = w.progress();
    let s = w.finish().unwrap();
    assert_eq!(progress, s);
    assert!(dir.join(META_FILE).is_file());
    assert!(dir.join(PAGES_FILE).is_file());
    assert_eq!(
        std::fs::metadata(dir.join(PAGES_FILE)).unwrap().len(),
        20 + 24 + 16 + 5 * 4096
    );

    let mut r = ImageReader::open(&dir).unwrap();
    assert_eq!(r.verify_pages().unwrap(), s);
    let mut r = ImageReader::open(&dir).unwrap();
    let b = r.next_pages().unwrap().unwrap();
    assert_eq!(b.data, pattern(5, 1));
    assert!(r.next_pages().unwrap().is_none());
}

#[test]
fn create_refuses_a_directory_holding_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    ImageWriter::create(tmp.path()).unwrap().finish().unwrap();
    let e = ImageWriter::create(tmp.path()).err().unwrap();
    assert!(matches!(e, ImageError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");

    // Half an image (only one of the two files) is refused too and left alone.
    for name in [META_FILE, PAGES_FILE] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(name), b"x").unwrap();
        let e = ImageWriter::create(tmp.path()).err().unwrap();
        assert!(matches!(e, ImageError::AlreadyExists { .. }), "{e}");
        let other = if name == META_FILE {
            PAGES_FILE
        } else {
            META_FILE
        };
        assert!(!tmp.path().join(other).exists());
        assert_eq!(std::fs::read(tmp.path().join(name)).unwrap(), b"x");
    }
}

#[test]
fn open_of_a_missing_image_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let e = ImageReader::open(&tmp.path().join("nope")).err().unwrap();
    assert!(matches!(e, ImageError::Fs { .. }));
    assert!(e.to_string().contains("nope/meta.fimg"), "{e}");
}

#[test]
fn long_runs_are_split_into_blocks_of_16384_pages() {
    let n = MAX_BLOCK_PAGES as usize + 3;
    let data = pattern(n, 5);
    let img = write_image(|w| w.pages(0x10_0000_0000, &data).unwrap());
    assert_eq!(img.summary.page_blocks, 2);
    assert_eq!(img.summary.pages, n as u64);
    let (_, blocks, _) = read_all(&img.meta, &img.pages).unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].vaddr, 0x10_0000_0000);
    assert_eq!(blocks[0].pages(), MAX_BLOCK_PAGES as u64);
    assert_eq!(blocks[1].vaddr, blocks[0].end());
    assert_eq!(blocks[1].pages(), 3);
    assert_eq!([&blocks[0].data[..], &blocks[1].data[..]].concat(), data);
}

#[test]
fn empty_image_and_empty_page_runs() {
    let img = write_image(|w| w.pages(0x1000, &[]).unwrap());
    assert_eq!(img.summary, Summary::default());
    assert_eq!(img.pages.len(), 20);
    let mut r = open(&img.meta, &img.pages).unwrap();
    assert!(r.meta_records().is_empty());
    assert!(r.next_pages().unwrap().is_none());
}

#[test]
fn next_pages_into_reuses_the_callers_buffer() {
    let img = small_image();
    let mut r = open(&img.meta, &img.pages).unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while let Some(vaddr) = r.next_pages_into(&mut buf).unwrap() {
        got.push((vaddr, buf.clone()));
    }
    assert_eq!(
        got,
        vec![
            (0x1000, pattern(1, 1)),
            (0x7fff_0000_0000, pattern(2, 2)),
            (0x5000, pattern(1, 3))
        ]
    );
}

#[test]
fn verify_pages_continues_after_next_pages() {
    let img = small_image();
    let mut r = open(&img.meta, &img.pages).unwrap();
    r.next_pages().unwrap().unwrap();
    assert_eq!(r.verify_pages().unwrap(), img.summary);
    assert!(r.next_pages().unwrap().is_none());
}

#[test]
fn writer_rejects_bad_arguments_and_stays_usable() {
    let img = write_image(|w| {
        let bad = [
            w.pages(0x1001, &pattern(1, 0)).err().unwrap(),
            w.pages(0x1000, &[0u8; 4095]).err().unwrap(),
            w.pages(u64::MAX - 4095, &pattern(1, 0)).err().unwrap(),
            w.meta("", &1).err().unwrap(),
            w.meta(&"x".repeat(256), &1).err().unwrap(),
        ];
        for e in bad {
            assert!(matches!(e, ImageError::InvalidInput { .. }), "{e}");
        }
        // A block must end at or below u64::MAX: the highest page that can be stored is
        // 0xffff_ffff_ffff_e000.
        w.pages(u64::MAX - 8191, &pattern(1, 0)).unwrap();
        w.meta(&"t".repeat(255), &1).unwrap();
    });
    let (metas, blocks, _) = read_all(&img.meta, &img.pages).unwrap();
    assert_eq!(metas.len(), 1);
    assert_eq!(blocks.len(), 1);
}

#[test]
fn meta_values_that_do_not_encode_are_refused() {
    let mut map = std::collections::HashMap::new();
    map.insert(vec![1u8], 1); // JSON keys must be strings
    let img = write_image(|w| {
        let e = w.meta("bad", &map).err().unwrap();
        assert!(matches!(e, ImageError::Encode { .. }), "{e}");
    });
    assert_eq!(img.summary.meta_records, 0);
}

#[test]
fn wrong_schema_and_wrong_counts_are_errors() {
    let img = small_image();
    let r = open(&img.meta, &img.pages).unwrap();
    let e = r.find::<Process>("process").err().unwrap();
    assert!(matches!(e, ImageError::MetaJson { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("meta.fimg: offset 20: meta record \"process\""),
        "{e}"
    );
    let e = r.find_one::<serde_json::Value>("absent").err().unwrap();
    assert!(matches!(e, ImageError::MetaCount { found: 0, .. }), "{e}");

    let img = write_image(|w| {
        w.meta("x", &1).unwrap();
        w.meta("x", &2).unwrap();
    });
    let r = open(&img.meta, &img.pages).unwrap();
    assert!(matches!(
        r.find_one::<u32>("x"),
        Err(ImageError::MetaCount { found: 2, .. })
    ));
    assert_eq!(r.find::<u32>("x").unwrap(), vec![1, 2]);
}

/// The writer's bytes are exactly those of the layout in docs/image-format.md, as encoded
/// independently by the test helpers.
#[test]
fn bytes_match_the_documented_layout() {
    let data = pattern(2, 4);
    let img = write_image(|w| {
        w.meta("process", &serde_json::json!({"pid": 5})).unwrap();
        w.pages(0x3000, &data).unwrap();
    });
    let block = block_payload(0x3000, 2, 0, &data);
    let (meta, pages) = craft(
        &[meta_payload(b"process", br#"{"pid":5}"#)],
        std::slice::from_ref(&block),
    );
    assert_eq!(img.meta, meta);
    assert_eq!(img.pages, pages);
    assert_eq!(&img.meta[..8], b"FERRYMET");
    assert_eq!(&img.pages[..8], b"FERRYPAG");
    let s = img.summary;
    assert_eq!(s.pages_crc, crc(&crc(&block).to_le_bytes()));
    let end =
        String::from_utf8(img.meta[img.meta.len() - end_payload(&s).len()..].to_vec()).unwrap();
    assert_eq!(
        end,
        format!(
            r#"{{"meta_records":1,"page_blocks":1,"pages":2,"page_bytes":8192,"pages_crc":{}}}"#,
            s.pages_crc
        )
    );
}

/// A sink that fails after `left` bytes.
struct FailAfter {
    left: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_errors_name_the_file_and_poison_the_writer() {
    let mut w = ImageWriter::new(
        Box::new(SharedBuf::default()),
        Box::new(FailAfter { left: 5000 }),
    )
    .unwrap();
    // 2 MiB of pages exceed the 1 MiB buffer and reach the sink at once.
    let e = w.pages(0, &pattern(512, 0)).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::Io {
                file: ImageFile::Pages,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().starts_with("pages.fimg: offset "), "{e}");
    assert!(e.to_string().contains("disk on fire"), "{e}");
    let e = w.meta("x", &1).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::Poisoned {
                file: ImageFile::Pages,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(w.finish(), Err(ImageError::Poisoned { .. })));
}

/// A source that fails after `left` bytes.
struct ReadFailAfter {
    data: std::io::Cursor<Vec<u8>>,
    left: usize,
}

impl Read for ReadFailAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("cable unplugged"));
        }
        let n = buf.len().min(self.left);
        let n = self.data.read(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn read_errors_name_the_file_and_poison_the_reader() {
    let img = small_image();
    let meta = ReadFailAfter {
        data: std::io::Cursor::new(img.meta.clone()),
        left: 50,
    };
    let e = ImageReader::from_streams(
        Box::new(meta),
        Box::new(std::io::Cursor::new(img.pages.clone())),
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            ImageError::Io {
                file: ImageFile::Meta,
                offset: 50,
                ..
            }
        ),
        "{e}"
    );

    let pages = ReadFailAfter {
        data: std::io::Cursor::new(img.pages.clone()),
        left: 100,
    };
    let mut r = ImageReader::from_streams(
        Box::new(std::io::Cursor::new(img.meta.clone())),
        Box::new(pages),
    )
    .unwrap();
    let e = r.next_pages().err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::Io {
                file: ImageFile::Pages,
                offset: 100,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(r.next_pages(), Err(ImageError::Poisoned { .. })));
    assert!(matches!(r.verify_pages(), Err(ImageError::Poisoned { .. })));
}

#[test]
fn flush_pushes_bytes_to_the_sinks() {
    let (m, p) = (SharedBuf::default(), SharedBuf::default());
    let mut w = ImageWriter::new(Box::new(m.clone()), Box::new(p.clone())).unwrap();
    w.meta("x", &1).unwrap();
    w.pages(0, &pattern(1, 0)).unwrap();
    assert!(m.0.lock().unwrap().is_empty());
    w.flush().unwrap();
    assert_eq!(p.0.lock().unwrap().len(), 20 + 24 + 16 + 4096);
    assert_eq!(m.0.lock().unwrap().len(), 20 + 24 + 2 + 1 + 1);
}

#[test]
fn writer_and_reader_are_send() {
    fn is_send<T: Send>() {}
    is_send::<ImageWriter>();
    is_send::<ImageReader>();
}

/// The bytes of a tiny image, produced by an independent encoder (Python's zlib.crc32 and
/// struct) from docs/image-format.md. Any change to the layout breaks this test: such a change
/// needs a new FORMAT_VERSION.
const GOLDEN_META: [u8; 172] = [
    0x46, 0x45, 0x52, 0x52, 0x59, 0x4d, 0x45, 0x54, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xc2, 0x74, 0x12, 0xe0, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x13, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xa7, 0x49, 0x02, 0x2a, 0x60, 0xa3, 0x4e, 0x57, 0x07, 0x00, 0x70, 0x72,
    0x6f, 0x63, 0x65, 0x73, 0x73, 0x7b, 0x22, 0x70, 0x69, 0x64, 0x22, 0x3a, 0x34, 0x32, 0x7d, 0x03,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x55, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8a,
    0xc7, 0x2c, 0x3a, 0xdd, 0x9f, 0x9d, 0xed, 0x7b, 0x22, 0x6d, 0x65, 0x74, 0x61, 0x5f, 0x72, 0x65,
    0x63, 0x6f, 0x72, 0x64, 0x73, 0x22, 0x3a, 0x31, 0x2c, 0x22, 0x70, 0x61, 0x67, 0x65, 0x5f, 0x62,
    0x6c, 0x6f, 0x63, 0x6b, 0x73, 0x22, 0x3a, 0x31, 0x2c, 0x22, 0x70, 0x61, 0x67, 0x65, 0x73, 0x22,
    0x3a, 0x31, 0x2c, 0x22, 0x70, 0x61, 0x67, 0x65, 0x5f, 0x62, 0x79, 0x74, 0x65, 0x73, 0x22, 0x3a,
    0x34, 0x30, 0x39, 0x36, 0x2c, 0x22, 0x70, 0x61, 0x67, 0x65, 0x73, 0x5f, 0x63, 0x72, 0x63, 0x22,
    0x3a, 0x32, 0x32, 0x31, 0x34, 0x31, 0x32, 0x37, 0x37, 0x31, 0x34, 0x7d,
];

/// The first 60 bytes of the matching pages.fimg (4156 bytes; the rest is the zero page).
const GOLDEN_PAGES_HEAD: [u8; 60] = [
    0x46, 0x45, 0x52, 0x52, 0x59, 0x50, 0x41, 0x47, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xc0, 0x23, 0xd6, 0x19, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x10, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xe4, 0x7b, 0x76, 0x6b, 0x48, 0xf3, 0x49, 0xc5, 0x00, 0x10, 0x00, 0x00,
    0x00, 0x7f, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

#[test]
fn golden_image_bytes() {
    let img = write_image(|w| {
        w.meta("process", &serde_json::json!({"pid": 42})).unwrap();
        w.pages(0x7f00_0000_1000, &[0u8; 4096]).unwrap();
    });
    assert_eq!(img.meta, GOLDEN_META);
    assert_eq!(img.pages.len(), 4156);
    assert_eq!(img.pages[..60], GOLDEN_PAGES_HEAD);
    assert!(img.pages[60..].iter().all(|&b| b == 0));
    assert_eq!(img.summary.pages_crc, 2214127714);
    let mut pages = GOLDEN_PAGES_HEAD.to_vec();
    pages.resize(4156, 0);
    let (metas, blocks, _) = read_all(&GOLDEN_META, &pages).unwrap();
    assert_eq!(metas[0].tag, "process");
    assert_eq!(blocks[0].vaddr, 0x7f00_0000_1000);
}

#[test]
fn the_block_index_points_at_each_blocks_data_in_pages_fimg() {
    let a = pattern(3, 1);
    let b = pattern(2, 2);
    let img = write_image(|w| {
        w.meta("m", "x").unwrap();
        w.pages(0x40_0000, &a).unwrap();
        w.pages(0x7f00_0000_0000, &b).unwrap();
    });
    let (summary, index) = open(&img.meta, &img.pages)
        .unwrap()
        .verify_pages_indexed()
        .unwrap();
    assert_eq!(summary, img.summary);
    assert_eq!(index.len(), 2);
    for (ix, data) in index.iter().zip([&a, &b]) {
        let at = ix.data_offset as usize;
        let got = &img.pages[at..at + ix.data_len as usize];
        assert_eq!(got, &data[..]);
        assert!(ix.matches(got));
        let mut bad = got.to_vec();
        bad[4096] ^= 1;
        assert!(!ix.matches(&bad), "a changed byte is noticed");
    }
    assert_eq!(index[0].vaddr, 0x40_0000);
    assert_eq!(index[1].vaddr, 0x7f00_0000_0000);
    // A bad image gives an error, not an index.
    let mut pages = img.pages.clone();
    let n = pages.len();
    pages[n - 5] ^= 0x10;
    assert!(open(&img.meta, &pages)
        .unwrap()
        .verify_pages_indexed()
        .is_err());
}

#[test]
fn buffered_streams_verify_like_plain_ones() {
    let img = write_image(|w| {
        w.meta("m", "x").unwrap();
        w.pages(0x40_0000, &pattern(300, 3)).unwrap();
        w.pages(0x80_0000, &pattern(2, 4)).unwrap();
    });
    let buffered = |meta: &[u8], pages: &[u8]| {
        ImageReader::from_buffered(
            Box::new(std::io::Cursor::new(meta.to_vec())),
            Box::new(std::io::Cursor::new(pages.to_vec())),
        )
        .unwrap()
        .verify_pages_indexed()
    };
    let plain = open(&img.meta, &img.pages)
        .unwrap()
        .verify_pages_indexed()
        .unwrap();
    assert_eq!(buffered(&img.meta, &img.pages).unwrap(), plain);
    // The same errors, at the same offsets: a flipped byte, a truncated payload.
    let mut bad = img.pages.clone();
    bad[100_000] ^= 1;
    let e1 = buffered(&img.meta, &bad).unwrap_err().to_string();
    let e2 = open(&img.meta, &bad)
        .unwrap()
        .verify_pages()
        .unwrap_err()
        .to_string();
    assert_eq!(e1, e2);
    assert!(e1.contains("checksum mismatch"), "{e1}");
    let cut = &img.pages[..img.pages.len() - 5000];
    let e1 = buffered(&img.meta, cut).unwrap_err().to_string();
    let e2 = open(&img.meta, cut)
        .unwrap()
        .verify_pages()
        .unwrap_err()
        .to_string();
    assert_eq!(e1, e2);
    assert!(e1.contains("truncated") || e1.contains("Truncated"), "{e1}");
}

#[test]
fn an_index_without_hashing_gives_the_same_blocks_and_check_blocks_finds_a_flipped_byte() {
    let img = write_image(|w| {
        w.meta("m", "x").unwrap();
        for i in 0..40u64 {
            w.pages(
                0x40_0000 + i * 0x10_0000,
                &pattern(1 + (i as usize % 5), i as u8),
            )
            .unwrap();
        }
    });
    let full = open(&img.meta, &img.pages)
        .unwrap()
        .verify_pages_indexed()
        .unwrap();
    let quick = open(&img.meta, &img.pages).unwrap().index_pages().unwrap();
    assert_eq!(quick, full, "the stored CRCs are the verified ones");
    for threads in [1, 3] {
        ferry_image::check_blocks(&img.pages, &quick.1, threads).unwrap();
    }
    // A flipped data byte passes the header walk and fails the block check, naming the
    // block's record.
    let mut bad = img.pages.clone();
    let victim = quick.1[17];
    bad[victim.data_offset as usize + 100] ^= 0x40;
    let (_, index) = open(&img.meta, &bad).unwrap().index_pages().unwrap();
    for threads in [1, 2] {
        let e = ferry_image::check_blocks(&bad, &index, threads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(
            e.contains(&format!("offset {}", victim.data_offset - 40)),
            "{e}"
        );
    }
    // A file shorter than the index says: an error, not a panic.
    let short = &img.pages[..img.pages.len() / 2];
    assert!(ferry_image::check_blocks(short, &quick.1, 2).is_err());
    // A damaged header still fails the walk itself.
    let mut hdr = img.pages.clone();
    hdr[victim.data_offset as usize - 40 + 8] ^= 1;
    assert!(open(&img.meta, &hdr).unwrap().index_pages().is_err());
}

#[test]
fn check_blocks_on_several_threads_finds_a_flipped_byte_in_a_large_image() {
    // 12 MiB: above the size checked on the calling thread alone.
    let img = write_image(|w| {
        w.meta("m", "x").unwrap();
        for i in 0..3u64 {
            w.pages(0x4000_0000 + i * 0x40_0000, &pattern(1024, i as u8 + 7))
                .unwrap();
        }
    });
    let (_, index) = open(&img.meta, &img.pages).unwrap().index_pages().unwrap();
    ferry_image::check_blocks(&img.pages, &index, 2).unwrap();
    let mut bad = img.pages.clone();
    let last = index[2];
    bad[(last.data_offset + last.data_len - 1) as usize] ^= 1;
    let e = ferry_image::check_blocks(&bad, &index, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
}

/// Pages checksummed elsewhere (`pages_hashed`, the dump's reading thread) make the same
/// bytes as pages checksummed by the writer; a wrong checksum state is caught on reading.
#[test]
fn pages_hashed_elsewhere_write_the_same_image() {
    let a = pattern(5, 3);
    let plain = write_image(|w| w.pages(0x7f00_0000_0000, &a).unwrap());
    let hashed = write_image(|w| {
        let mut h = PageHasher::new();
        h.update(&a);
        w.pages_hashed(0x7f00_0000_0000, &a, &h).unwrap();
    });
    assert_eq!(plain.pages, hashed.pages);
    assert_eq!(plain.meta, hashed.meta);
    let wrong = write_image(|w| {
        let mut h = PageHasher::new();
        h.update(&a[4096..]);
        w.pages_hashed(0x7f00_0000_0000, &a, &h).unwrap();
    });
    assert_ne!(plain.pages, wrong.pages);
}
