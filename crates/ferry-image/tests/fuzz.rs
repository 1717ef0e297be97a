//! Property tests: the reader never panics on any input, finds every single-byte change, and
//! what is written is what is read.

mod common;

use common::*;
use ferry_image::*;
use proptest::prelude::*;

/// Read everything the reader will read; the result does not matter, only that it returns.
fn consume(meta: &[u8], pages: &[u8]) -> Result<(), ImageError> {
    let mut r = open(meta, pages)?;
    for m in r.meta_records() {
        let _ = m.parse::<serde_json::Value>();
    }
    let _ = r.find::<Vec<u64>>("process");
    while r.next_pages()?.is_some() {}
    let _ = r.next_pages();
    let _ = r.verify_pages();
    let _ = indexed(meta, pages);
    Ok(())
}

/// The restore's path: walk the headers without hashing, then check the data on threads.
fn indexed(meta: &[u8], pages: &[u8]) -> Result<(), ImageError> {
    let (_, index) = open(meta, pages)?.index_pages()?;
    ferry_image::check_blocks(pages, &index, 2)
}

fn arb_meta_payload() -> BoxedStrategy<Vec<u8>> {
    let raw = (
        proptest::collection::vec(any::<u8>(), 0..12),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(tag, json)| meta_payload(&tag, &json));
    let json = (
        "[a-z]{1,8}",
        prop_oneof![
            Just("1"),
            Just("{}"),
            Just("[1,2"),
            Just("\"s\""),
            Just("nul"),
            Just("[[[]]]")
        ],
    )
        .prop_map(|(tag, json)| meta_payload(tag.as_bytes(), json.as_bytes()));
    let tag_len = (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..20))
        .prop_map(|(l, rest)| [&l.to_le_bytes()[..], &rest].concat());
    prop_oneof![1 => raw, 3 => json, 1 => tag_len].boxed()
}

fn arb_block_payload() -> BoxedStrategy<Vec<u8>> {
    (
        any::<u64>(),
        0u32..4,
        any::<u32>(),
        0usize..3,
        0u8..8,
        any::<u8>(),
    )
        .prop_map(|(vaddr, count, reserved, pages, dice, seed)| {
            // Mostly well-formed, so that later blocks and the totals are reached.
            let vaddr = if dice == 0 {
                vaddr
            } else {
                vaddr & 0x0000_ffff_ffff_f000
            };
            let reserved = if dice == 1 { reserved } else { 0 };
            let count = if dice == 2 { count } else { pages as u32 };
            block_payload(vaddr, count, reserved, &pattern(pages, seed))
        })
        .boxed()
}

/// A record of `kind` with valid checksums (usually the right kind, payload and length): this
/// gets past the checksums and exercises the parsing behind them.
fn arb_record(kind: u32, payload: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![6 => payload, 1 => proptest::collection::vec(any::<u8>(), 0..64)];
    let kind = prop_oneof![9 => Just(kind), 1 => 0u32..6];
    (kind, payload, 0u8..8, any::<u64>()).prop_map(|(kind, payload, dice, len)| {
        let len = if dice != 0 {
            payload.len() as u64
        } else {
            len % (payload.len() as u64 + 64)
        };
        record_with(kind, 0, len, &payload)
    })
}

/// Streams of checksummed records, with an End record that usually has the right totals.
fn arb_streams() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let metas = proptest::collection::vec(arb_record(1, arb_meta_payload()), 0..4);
    let blocks = proptest::collection::vec(arb_block_payload(), 0..4);
    let bad_end = (0u64..4, 0u64..4, 0u64..8, any::<u32>()).prop_map(|(m, b, p, crc)| Summary {
        meta_records: m,
        page_blocks: b,
        pages: p,
        page_bytes: p * 4096,
        pages_crc: crc,
    });
    (
        metas,
        blocks,
        proptest::option::weighted(0.3, bad_end),
        0u8..10,
        arb_record(2, arb_block_payload()),
    )
        .prop_map(|(metas, blocks, bad_end, dice, odd_block)| {
            let mut meta = [meta_header(), metas.concat()].concat();
            let mut summary = summary_for(metas.len() as u64, &blocks);
            if let Some(s) = bad_end {
                summary = s;
            }
            if dice != 0 {
                meta.extend(record(3, &end_payload(&summary)));
            }
            let mut pages = pages_header();
            for b in &blocks {
                pages.extend(record(2, b));
            }
            if dice == 1 {
                pages.extend(odd_block);
            }
            (meta, pages)
        })
}

/// Apply byte changes, a truncation or an insertion.
#[derive(Debug, Clone)]
enum Mutation {
    Xor(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(p, x)| Mutation::Xor(p, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..32)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Remove(p, n)),
    ]
}

fn mutate(mut v: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = v.len().max(1);
        match m {
            Mutation::Xor(p, x) => {
                if !v.is_empty() {
                    v[p % n] ^= x;
                }
            }
            Mutation::Truncate(p) => v.truncate(p % n),
            Mutation::Insert(p, b) => {
                let at = p % (v.len() + 1);
                v.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(p, k) => {
                let at = p % n;
                let end = (at + k).min(v.len());
                if at < end {
                    v.drain(at..end);
                }
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(meta in proptest::collection::vec(any::<u8>(), 0..200),
                                   pages in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert!(consume(&meta, &pages).is_err());
        prop_assert!(indexed(&meta, &pages).is_err());
    }

    #[test]
    fn arbitrary_bytes_after_valid_headers_never_panic(meta in proptest::collection::vec(any::<u8>(), 0..200),
                                                       pages in proptest::collection::vec(any::<u8>(), 0..200)) {
        let m = [meta_header(), meta].concat();
        let p = [pages_header(), pages].concat();
        let _ = consume(&m, &p);
    }

    #[test]
    fn checksummed_arbitrary_records_never_panic((meta, pages) in arb_streams()) {
        let _ = consume(&meta, &pages);
    }

    #[test]
    fn mutated_images_never_panic(muts_meta in proptest::collection::vec(arb_mutation(), 0..4),
                                  muts_pages in proptest::collection::vec(arb_mutation(), 0..4)) {
        let img = small_image();
        let meta = mutate(img.meta.clone(), &muts_meta);
        let pages = mutate(img.pages.clone(), &muts_pages);
        let r = consume(&meta, &pages);
        if meta == img.meta && pages == img.pages {
            prop_assert!(r.is_ok());
        }
    }

    #[test]
    fn any_single_byte_change_is_found(in_meta in any::<bool>(), pos in any::<usize>(), x in 1u8..=255) {
        let img = small_image();
        let (mut meta, mut pages) = (img.meta.clone(), img.pages.clone());
        let v = if in_meta { &mut meta } else { &mut pages };
        let n = v.len();
        v[pos % n] ^= x;
        prop_assert!(consume(&meta, &pages).is_err());
        prop_assert!(indexed(&meta, &pages).is_err());
    }

    #[test]
    fn whatever_is_written_is_read(
        metas in proptest::collection::vec(("[a-z]{1,10}", any::<i64>(), ".{0,20}"), 0..6),
        runs in proptest::collection::vec((0u64..1 << 30, 0usize..4, any::<u8>()), 0..6),
    ) {
        let img = write_image(|w| {
            for (tag, n, s) in &metas {
                w.meta(tag, &(n, s)).unwrap();
            }
            for (page, count, seed) in &runs {
                w.pages(page * 4096, &pattern(*count, *seed)).unwrap();
            }
        });
        let (records, blocks, summary) = read_all(&img.meta, &img.pages).unwrap();
        prop_assert_eq!(&summary, &img.summary);
        prop_assert_eq!(records.len(), metas.len());
        for (r, (tag, n, s)) in records.iter().zip(&metas) {
            prop_assert_eq!(&r.tag, tag);
            prop_assert_eq!(r.parse::<(i64, String)>().unwrap(), (*n, s.clone()));
        }
        let want: Vec<PageBlock> = runs
            .iter()
            .filter(|r| r.1 > 0)
            .map(|(page, count, seed)| PageBlock { vaddr: page * 4096, data: pattern(*count, *seed) })
            .collect();
        prop_assert_eq!(blocks, want);
    }
}
