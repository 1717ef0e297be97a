//! Every kind of damage is found, and named with its file and offset.

mod common;

use common::*;
use ferry_image::*;

fn one_line(e: &ImageError) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
}

fn assert_names(e: &ImageError, file: ImageFile, offset: u64) {
    one_line(e);
    assert_eq!(e.file(), Some(file), "{e}");
    assert_eq!(e.offset(), Some(offset), "{e}");
    let s = e.to_string();
    assert!(s.starts_with(&format!("{file}: offset {offset}: ")), "{s}");
}

/// (start, end of header, end of record) of each record.
fn spans(stream: &[u8]) -> Vec<(usize, usize, usize)> {
    let starts = record_starts(stream);
    let mut out = Vec::new();
    for (i, &s) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(stream.len());
        out.push((s, s + 24, end));
    }
    out
}

#[test]
fn every_byte_flip_in_meta_is_found_and_classified() {
    let img = small_image();
    let spans = spans(&img.meta);
    for pos in 0..img.meta.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut meta = img.meta.clone();
            meta[pos] ^= x;
            let e = open(&meta, &img.pages)
                .err()
                .unwrap_or_else(|| panic!("flip {x:#x} at {pos} not found"));
            one_line(&e);
            assert_eq!(e.file(), Some(ImageFile::Meta), "{e}");
            if pos < 8 {
                assert!(
                    matches!(e, ImageError::BadMagic { offset: 0, .. }),
                    "{pos}: {e}"
                );
            } else if pos < 12 {
                assert!(
                    matches!(e, ImageError::UnsupportedVersion { offset: 8, .. }),
                    "{pos}: {e}"
                );
            } else if pos < 20 {
                assert!(
                    matches!(e, ImageError::HeaderCrc { offset: 0, .. }),
                    "{pos}: {e}"
                );
            } else {
                let &(start, hdr_end, _) = spans.iter().find(|s| s.0 <= pos && pos < s.2).unwrap();
                if pos < hdr_end {
                    assert!(
                        matches!(e, ImageError::HeaderCrc { offset, .. } if offset == start as u64),
                        "{pos}: {e}"
                    );
                } else {
                    assert!(
                        matches!(e, ImageError::PayloadCrc { offset, .. } if offset == start as u64),
                        "{pos}: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_byte_flip_in_pages_is_found_and_classified() {
    let img = small_image();
    let spans = spans(&img.pages);
    for pos in 0..img.pages.len() {
        let mut pages = img.pages.clone();
        pages[pos] ^= 0x10;
        let e = verify(&img.meta, &pages)
            .err()
            .unwrap_or_else(|| panic!("flip at {pos} not found"));
        one_line(&e);
        assert_eq!(e.file(), Some(ImageFile::Pages), "{e}");
        if pos < 8 {
            assert!(matches!(e, ImageError::BadMagic { .. }), "{pos}: {e}");
        } else if pos < 12 {
            assert!(
                matches!(e, ImageError::UnsupportedVersion { .. }),
                "{pos}: {e}"
            );
        } else if pos < 20 {
            assert!(matches!(e, ImageError::HeaderCrc { .. }), "{pos}: {e}");
        } else {
            let &(start, hdr_end, _) = spans.iter().find(|s| s.0 <= pos && pos < s.2).unwrap();
            let want = if pos < hdr_end { "header" } else { "payload" };
            match e {
                ImageError::HeaderCrc { offset, .. } if want == "header" => {
                    assert_eq!(offset, start as u64)
                }
                ImageError::PayloadCrc { offset, .. } if want == "payload" => {
                    assert_eq!(offset, start as u64)
                }
                e => panic!("{pos}: expected a {want} checksum error, got {e}"),
            }
        }
        // next_pages finds the same damage.
        let mut r = match open(&img.meta, &pages) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let mut failed = false;
        loop {
            match r.next_pages() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "next_pages missed the flip at {pos}");
    }
}

#[test]
fn meta_truncated_at_every_offset_is_refused() {
    let img = small_image();
    let starts = record_starts(&img.meta);
    for len in 0..img.meta.len() {
        let e = open(&img.meta[..len], &img.pages)
            .err()
            .unwrap_or_else(|| panic!("truncation at {len} accepted"));
        one_line(&e);
        assert_eq!(e.file(), Some(ImageFile::Meta));
        if len < 20 {
            assert!(
                matches!(
                    e,
                    ImageError::Truncated {
                        offset: 0,
                        what: "file header",
                        ..
                    }
                ),
                "{len}: {e}"
            );
        } else if len == 20 || starts.contains(&len) {
            assert!(
                matches!(e, ImageError::MissingEnd { offset, .. } if offset == len as u64),
                "{len}: {e}"
            );
            assert!(e.to_string().contains("never committed"), "{e}");
        } else {
            assert!(matches!(e, ImageError::Truncated { .. }), "{len}: {e}");
        }
    }
}

#[test]
fn pages_truncated_at_every_offset_are_refused() {
    let img = small_image();
    let starts = record_starts(&img.pages);
    for len in 0..img.pages.len() {
        let pages = &img.pages[..len];
        let e = verify(&img.meta, pages)
            .err()
            .unwrap_or_else(|| panic!("truncation at {len} accepted"));
        one_line(&e);
        assert_eq!(e.file(), Some(ImageFile::Pages));
        if len < 20 {
            assert!(
                matches!(e, ImageError::Truncated { offset: 0, .. }),
                "{len}: {e}"
            );
        } else if len == 20 || starts.contains(&len) {
            assert!(
                matches!(e, ImageError::SummaryMismatch { .. }),
                "{len}: {e}"
            );
        } else {
            assert!(matches!(e, ImageError::Truncated { .. }), "{len}: {e}");
        }
        assert!(read_all(&img.meta, pages).is_err(), "{len}");
    }
}

#[test]
fn unsupported_versions_are_refused_before_anything_else() {
    let img = small_image();
    for v in [0u32, 2, 0xffff_ffff] {
        let mut meta = file_header(b"FERRYMET", v, 0);
        meta.extend_from_slice(&img.meta[20..]);
        let e = open(&meta, &img.pages).err().unwrap();
        assert!(
            matches!(e, ImageError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
        assert_names(&e, ImageFile::Meta, 8);
        assert!(
            e.to_string()
                .contains(&format!("unsupported format version {v}")),
            "{e}"
        );

        let mut pages = file_header(b"FERRYPAG", v, 0);
        pages.extend_from_slice(&img.pages[20..]);
        let e = open(&img.meta, &pages).err().unwrap();
        assert!(matches!(e, ImageError::UnsupportedVersion { .. }), "{e}");
        assert_names(&e, ImageFile::Pages, 8);
    }
}

#[test]
fn wrong_magic_is_refused() {
    let img = small_image();
    // The two files swapped.
    let e = open(&img.pages, &img.meta).err().unwrap();
    assert!(matches!(e, ImageError::BadMagic { .. }), "{e}");
    assert_names(&e, ImageFile::Meta, 0);
    assert!(e.to_string().contains("\"FERRYPAG\""), "{e}");
    // Something else entirely, even a short one.
    for junk in [
        &b"\x7fELF\x02\x01\x01\x00rest of an ELF file"[..],
        b"{}",
        b"\x00",
    ] {
        let e = open(junk, &img.pages).err().unwrap();
        assert!(matches!(e, ImageError::BadMagic { .. }), "{e}");
    }
    let e = open(&img.meta, b"FERRYMET and more bytes").err().unwrap();
    assert!(matches!(e, ImageError::BadMagic { .. }), "{e}");
    assert_names(&e, ImageFile::Pages, 0);
    // Empty files are truncated headers.
    let e = open(b"", &img.pages).err().unwrap();
    assert!(matches!(e, ImageError::Truncated { found: 0, .. }), "{e}");
}

#[test]
fn unknown_flags_are_refused() {
    let img = small_image();
    let mut meta = file_header(b"FERRYMET", 1, 4);
    meta.extend_from_slice(&img.meta[20..]);
    let e = open(&meta, &img.pages).err().unwrap();
    assert!(
        matches!(e, ImageError::UnsupportedFlags { flags: 4, .. }),
        "{e}"
    );

    let mut meta = meta_header();
    meta.extend(record_with(1, 1, 9, &meta_payload(b"x", b"[1,2]")));
    let e = open(&meta, &img.pages).err().unwrap();
    assert!(
        matches!(e, ImageError::UnsupportedFlags { flags: 1, .. }),
        "{e}"
    );
    assert_names(&e, ImageFile::Meta, 20);
}

#[test]
fn missing_end_means_never_committed() {
    let (m, p) = (SharedBuf::default(), SharedBuf::default());
    {
        let mut w = ImageWriter::new(Box::new(m.clone()), Box::new(p.clone())).unwrap();
        w.meta("process", &1).unwrap();
        w.pages(0, &pattern(1, 0)).unwrap();
        // Dropped without finish(): an interrupted dump.
    }
    let meta = m.take();
    let e = open(&meta, &p.take()).err().unwrap();
    assert!(matches!(e, ImageError::MissingEnd { .. }), "{e}");
    assert_names(&e, ImageFile::Meta, meta.len() as u64);

    // The same from a directory.
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut w = ImageWriter::create(tmp.path()).unwrap();
        w.meta("process", &1).unwrap();
    }
    let e = ImageReader::open(tmp.path()).err().unwrap();
    assert!(matches!(e, ImageError::MissingEnd { .. }), "{e}");
}

#[test]
fn trailing_data_after_end_is_refused() {
    let img = small_image();
    let n = img.meta.len() as u64;
    let mut extras: Vec<Vec<u8>> = vec![vec![0], b"garbage".to_vec()];
    // A second, valid End record, and a valid Meta record after End.
    extras.push(record(3, &end_payload(&img.summary)));
    extras.push(record(1, &meta_payload(b"late", b"1")));
    for extra in extras {
        let mut meta = img.meta.clone();
        meta.extend_from_slice(&extra);
        let e = open(&meta, &img.pages).err().unwrap();
        assert!(matches!(e, ImageError::TrailingData { .. }), "{e}");
        assert_names(&e, ImageFile::Meta, n);
    }
}

#[test]
fn extra_data_in_pages_is_refused() {
    let img = small_image();
    // A valid extra block: refused by the summary before its payload is read.
    let mut pages = img.pages.clone();
    pages.extend(record(2, &block_payload(0x9000, 1, 0, &pattern(1, 7))));
    let e = verify(&img.meta, &pages).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::SummaryMismatch {
                what: "number of page blocks",
                expected: 3,
                found: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_names(&e, ImageFile::Pages, img.pages.len() as u64);
    // Garbage shorter than a header.
    let mut pages = img.pages.clone();
    pages.extend_from_slice(b"junk");
    let e = verify(&img.meta, &pages).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::Truncated {
                what: "record header",
                ..
            }
        ),
        "{e}"
    );
    // Garbage as long as a header.
    let mut pages = img.pages.clone();
    pages.extend_from_slice(&[0xAB; 40]);
    let e = verify(&img.meta, &pages).err().unwrap();
    assert!(matches!(e, ImageError::HeaderCrc { .. }), "{e}");
}

#[test]
fn page_totals_must_match_the_summary() {
    let img = small_image();
    let starts = record_starts(&img.pages);
    // The last block missing.
    let e = verify(&img.meta, &img.pages[..starts[2]]).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::SummaryMismatch {
                what: "number of page blocks",
                expected: 3,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("End summary"), "{e}");
    // Block 0 and block 2 (one page each) swapped: same counts, wrong order.
    let b0 = &img.pages[starts[0]..starts[1]];
    let b1 = &img.pages[starts[1]..starts[2]];
    let b2 = &img.pages[starts[2]..];
    let swapped = [&img.pages[..20], b2, b1, b0].concat();
    let e = verify(&img.meta, &swapped).err().unwrap();
    assert!(matches!(e, ImageError::PagesCrcMismatch { .. }), "{e}");
    assert_names(&e, ImageFile::Pages, img.pages.len() as u64);
    // The pages of another dump of the same shape.
    let other = write_image(|w| {
        w.pages(0x1000, &pattern(1, 1)).unwrap();
        w.pages(0x7fff_0000_0000, &pattern(2, 2)).unwrap();
        w.pages(0x5000, &pattern(1, 4)).unwrap();
    });
    let e = verify(&img.meta, &other.pages).err().unwrap();
    assert!(matches!(e, ImageError::PagesCrcMismatch { .. }), "{e}");
    // One block with more pages than the summary allows.
    let blocks = vec![block_payload(0, 1, 0, &pattern(1, 0))];
    let (meta, _) = craft(&[], &blocks);
    let (_, pages) = craft(&[], &[block_payload(0, 2, 0, &pattern(2, 0))]);
    let e = verify(&meta, &pages).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::SummaryMismatch {
                what: "number of pages",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_and_misplaced_kinds_are_refused() {
    let img = small_image();
    for kind in [0u32, 4, 7, 0xffff_ffff] {
        let mut meta = meta_header();
        meta.extend(record(kind, b"{}"));
        let e = open(&meta, &img.pages).err().unwrap();
        assert!(
            matches!(e, ImageError::UnknownKind { kind: k, .. } if k == kind),
            "{e}"
        );
        assert_names(&e, ImageFile::Meta, 20);
        let mut pages = pages_header();
        pages.extend(record(kind, b"{}"));
        let e = verify(&img.meta, &pages).err().unwrap();
        assert!(matches!(e, ImageError::UnknownKind { .. }), "{e}");
        assert_names(&e, ImageFile::Pages, 20);
    }
    // A page block in meta.fimg.
    let mut meta = meta_header();
    meta.extend(record(2, &block_payload(0, 1, 0, &pattern(1, 0))));
    let e = open(&meta, &img.pages).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::UnexpectedKind {
                kind: "PageBlock",
                ..
            }
        ),
        "{e}"
    );
    // Meta and End records in pages.fimg.
    for (kind, name) in [(1u32, "Meta"), (3, "End")] {
        let mut pages = pages_header();
        pages.extend(record(kind, &meta_payload(b"x", b"1")));
        let e = verify(&img.meta, &pages).err().unwrap();
        assert!(
            matches!(e, ImageError::UnexpectedKind { kind: k, .. } if k == name),
            "{e}"
        );
        assert!(e.to_string().contains("not allowed in pages.fimg"), "{e}");
    }
}

#[test]
fn hostile_lengths_are_refused_without_allocating() {
    let img = small_image();
    // Meta record lengths above the limit; the header is valid, the payload absent.
    for len in [MAX_META_PAYLOAD + 1, u64::MAX] {
        let mut meta = meta_header();
        meta.extend(record_with(1, 0, len, b""));
        let e = open(&meta, &img.pages).err().unwrap();
        assert!(
            matches!(e, ImageError::TooLarge { len: l, limit: MAX_META_PAYLOAD, .. } if l == len),
            "{e}"
        );
        assert_names(&e, ImageFile::Meta, 20);
    }
    // Exactly at the limit but only a few bytes present: truncated, and quickly.
    let mut meta = meta_header();
    meta.extend(record_with(1, 0, MAX_META_PAYLOAD, b"\x01\x00x"));
    let e = open(&meta, &img.pages).err().unwrap();
    assert!(matches!(e, ImageError::Truncated { found: 3, .. }), "{e}");
    // End payload above its limit.
    let mut meta = meta_header();
    meta.extend(record_with(3, 0, MAX_END_PAYLOAD + 1, b""));
    let e = open(&meta, &img.pages).err().unwrap();
    assert!(
        matches!(
            e,
            ImageError::TooLarge {
                what: "End payload",
                ..
            }
        ),
        "{e}"
    );
    // Page blocks above the limit.
    for len in [MAX_PAGE_BLOCK_PAYLOAD + 4096, u64::MAX] {
        let mut pages = pages_header();
        pages.extend(record_with(2, 0, len, b""));
        let e = verify(&img.meta, &pages).err().unwrap();
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    limit: MAX_PAGE_BLOCK_PAYLOAD,
                    ..
                }
            ),
            "{e}"
        );
        assert_names(&e, ImageFile::Pages, 20);
    }
    // A page block length that is not 16 + pages.
    for len in [0u64, 16, 17, 16 + 4095, 16 + 4097] {
        let mut pages = pages_header();
        pages.extend(record_with(2, 0, len, b""));
        let e = verify(&img.meta, &pages).err().unwrap();
        assert!(
            matches!(
                e,
                ImageError::Malformed {
                    what: "page block",
                    ..
                }
            ),
            "{len}: {e}"
        );
    }
}

#[test]
fn bad_page_block_fields_are_refused() {
    let one = pattern(1, 0);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (block_payload(0x1234, 1, 0, &one), "unaligned"),
        (block_payload(0xffff_ffff_ffff_f000, 1, 0, &one), "overflow"),
        (block_payload(0x1000, 2, 0, &one), "count"),
        (block_payload(0x1000, 0, 0, &one), "count"),
        (block_payload(0x1000, 1, 5, &one), "reserved"),
    ];
    for (payload, what) in cases {
        let (meta, pages) = craft(&[], std::slice::from_ref(&payload));
        let e = verify(&meta, &pages).err().unwrap();
        assert_names(&e, ImageFile::Pages, 20);
        match what {
            "unaligned" => assert!(
                matches!(e, ImageError::UnalignedVaddr { vaddr: 0x1234, .. }),
                "{e}"
            ),
            "overflow" => assert!(matches!(e, ImageError::AddressOverflow { .. }), "{e}"),
            "count" => assert!(e.to_string().contains("page count"), "{e}"),
            _ => assert!(e.to_string().contains("reserved field"), "{e}"),
        }
    }
    // The highest storable page is fine.
    let (meta, pages) = craft(&[], &[block_payload(0xffff_ffff_ffff_e000, 1, 0, &one)]);
    verify(&meta, &pages).unwrap();
}

#[test]
fn bad_meta_payloads_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 0], "cannot hold a tag"),
        (meta_payload(b"", b"1"), "tag length 0"),
        (
            [&300u16.to_le_bytes()[..], &[b'a'; 300], b"1"].concat(),
            "tag length 300",
        ),
        (
            [&9u16.to_le_bytes()[..], b"abc"].concat(),
            "longer than the payload",
        ),
        (meta_payload(b"\xff\xfe", b"1"), "not UTF-8"),
        (meta_payload(b"process", b"{\"pid\":"), "not valid JSON"),
        (meta_payload(b"process", b""), "not valid JSON"),
        (meta_payload(b"process", b"1 2"), "not valid JSON"),
    ];
    for (payload, msg) in cases {
        let (meta, pages) = craft(&[payload], &[]);
        let e = open(&meta, &pages).err().unwrap();
        assert!(
            matches!(
                e,
                ImageError::Malformed {
                    what: "Meta record",
                    ..
                }
            ),
            "{e}"
        );
        assert_names(&e, ImageFile::Meta, 20);
        assert!(e.to_string().contains(msg), "{e} lacks {msg}");
    }
}

#[test]
fn bad_end_summaries_are_refused() {
    let good = Summary {
        meta_records: 0,
        page_blocks: 1,
        pages: 2,
        page_bytes: 8192,
        pages_crc: 7,
    };
    let with = |f: &dyn Fn(&mut Summary)| {
        let mut s = good.clone();
        f(&mut s);
        serde_json::to_vec(&s).unwrap()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "malformed End summary"),
        (br#"{"meta_records":0}"#.to_vec(), "missing field"),
        (
            br#"{"meta_records":0,"page_blocks":0,"pages":0,"page_bytes":0,"pages_crc":0,"x":1}"#
                .to_vec(),
            "unknown field",
        ),
        (
            with(&|s| s.page_bytes = 4096),
            "page_bytes 4096 is not pages 2",
        ),
        (with(&|s| s.pages = u64::MAX), "page_bytes"),
        (with(&|s| s.page_blocks = 3), "cannot fill"),
        (
            with(&|s| s.meta_records = 1),
            "number of Meta records is 0 but the End summary",
        ),
    ];
    for (end, msg) in cases {
        let mut meta = meta_header();
        meta.extend(record(3, &end));
        let e = open(&meta, &pages_header()).err().unwrap();
        assert_names(&e, ImageFile::Meta, 20);
        assert!(e.to_string().contains(msg), "{e} lacks {msg}");
    }
}

#[test]
fn error_messages_read_well() {
    let img = small_image();
    let mut pages = img.pages.clone();
    let at = record_starts(&pages)[1] + 24 + 100;
    pages[at] ^= 1;
    let e = verify(&img.meta, &pages).err().unwrap();
    let s = e.to_string();
    assert!(
        s.starts_with(
            "pages.fimg: offset 4156: PageBlock record payload checksum mismatch (stored 0x"
        ),
        "{s}"
    );
}
