//! Hostile images: images whose checksums are all valid (re-encoded through ferry-image's own
//! writer) but whose records make no sense, or that are cut short. A restore refuses each with
//! a clear error before any process exists; the checks never panic, whatever the numbers.

mod common;
use common::*;
use ferry_image::{ImageReader, ImageWriter, PageBlock, PageHasher, PAGE_SIZE};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};
use std::io::{Cursor, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// An image decoded: its records (tag and JSON value) in order, and its page blocks.
#[derive(Clone)]
struct Decoded {
    records: Vec<(String, Value)>,
    blocks: Vec<PageBlock>,
}

impl Decoded {
    fn read(dir: &Path) -> Decoded {
        let mut r = ImageReader::open(dir).unwrap();
        let records = r
            .meta_records()
            .iter()
            .map(|m| (m.tag.clone(), m.parse::<Value>().unwrap()))
            .collect();
        let mut blocks = Vec::new();
        while let Some(b) = r.next_pages().unwrap() {
            blocks.push(b);
        }
        Decoded { records, blocks }
    }

    /// Write it through the crate's writer into two sinks (valid checksums and End summary).
    fn write(
        &self,
        meta: Box<dyn Write + Send>,
        pages: Box<dyn Write + Send>,
    ) -> Result<(), ferry_image::ImageError> {
        let mut w = ImageWriter::new(meta, pages)?;
        for (tag, v) in &self.records {
            w.meta(tag, v)?;
        }
        for b in &self.blocks {
            w.pages(b.vaddr, &b.data)?;
        }
        w.finish().map(|_| ())
    }

    fn write_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let f = |n: &str| Box::new(std::fs::File::create(dir.join(n)).unwrap());
        self.write(f("meta.fimg"), f("pages.fimg")).unwrap();
    }

    /// The process records, in order.
    fn procs(&mut self) -> Vec<&mut Value> {
        self.records
            .iter_mut()
            .filter(|(t, _)| t == "process")
            .map(|(_, v)| v)
            .collect()
    }

    fn proc(&mut self, i: usize) -> &mut Value {
        self.procs().into_iter().nth(i).unwrap()
    }

    /// Every PID and TID of the image.
    fn ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for (tag, v) in &self.records {
            match tag.as_str() {
                "process" => {
                    for t in v["threads"].as_array().unwrap() {
                        ids.push(t["tid"].as_u64().unwrap() as u32);
                    }
                }
                "zombie" => ids.push(v["pid"].as_u64().unwrap() as u32),
                _ => {}
            }
        }
        ids
    }
}

/// A Write whose bytes are kept for later.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Dump a running `tree` fixture (a parent and its child sharing memory and a pipe), which
/// the dump kills; returns the image directory's owner, the image, and the fixture's output.
fn dump_tree(tag: &str) -> (TestDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tmpdir(tag);
    let bin = build(&dir, "tree");
    let out = dir.join("out.txt");
    let mut child = start_cmd(Command::new(&bin), &out);
    wait_for(&out, "ready");
    let img = dir.join("img");
    dump_ok(child.id(), &img);
    child.wait().unwrap();
    (dir, img, out)
}

/// The index of the first mapping of `proc` that `f` accepts.
fn mapping_index(proc: &Value, f: impl Fn(&Value) -> bool) -> usize {
    proc["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .position(f)
        .expect("a mapping of that kind")
}

type Mutation = Box<dyn Fn(&mut Decoded)>;

/// Each mutation, what stderr must say, and how it is made.
fn hostile_cases(base: &Decoded) -> Vec<(&'static str, String, Mutation)> {
    let mut b = base.clone();
    let parent = b.proc(0)["pid"].as_i64().unwrap();
    let child = b.proc(1)["pid"].as_i64().unwrap();
    assert_eq!(b.proc(1)["ppid"].as_i64(), Some(parent));
    // The child's fd of the pipe whose other end the parent holds (and saved).
    let held = b.proc(1)["fds"]
        .as_array()
        .unwrap()
        .iter()
        .position(|f| !f["pipe_holder"].is_null())
        .expect("the child's end of the pipe names its holder");
    // A child's fd that is its parent's open file description (inherited).
    let shared = b.proc(1)["fds"]
        .as_array()
        .unwrap()
        .iter()
        .position(|f| !f["shares"].is_null())
        .expect("the child shares an fd with its parent");
    // A mapping with pages saved, to say it has more than it holds.
    let saved = mapping_index(b.proc(0), |m| m["pages_saved"].as_u64() > Some(0));
    let saved_pages = {
        let m = &b.proc(0)["mappings"][saved];
        (m["end"].as_u64().unwrap() - m["start"].as_u64().unwrap()) / 4096
    };
    vec![
        (
            "mapping start not below end",
            "is not below end".into(),
            Box::new(|d: &mut Decoded| {
                let m = &mut d.proc(0)["mappings"][0];
                m["end"] = m["start"].clone();
            }),
        ),
        (
            "mapping not page-aligned",
            "is not aligned to 4096 bytes".into(),
            Box::new(|d: &mut Decoded| {
                let m = &mut d.proc(0)["mappings"][0];
                m["start"] = json!(m["start"].as_u64().unwrap() + 0x10);
            }),
        ),
        (
            "overlapping mappings",
            "overlaps mappings".into(),
            Box::new(|d: &mut Decoded| {
                let ms = &mut d.proc(0)["mappings"];
                ms[1]["start"] = json!(ms[0]["end"].as_u64().unwrap() - 4096);
            }),
        ),
        (
            "mapping outside user space",
            "outside user space".into(),
            Box::new(|d: &mut Decoded| {
                let m = &mut d.proc(1)["mappings"][0];
                m["start"] = json!(0x8000_0000_0000u64);
                m["end"] = json!(0x8000_0000_2000u64);
            }),
        ),
        (
            "pages_saved above the mapping's size",
            format!(
                "pages_saved = {}: the mapping has {saved_pages} pages",
                saved_pages + 1
            ),
            Box::new(move |d: &mut Decoded| {
                d.proc(0)["mappings"][saved]["pages_saved"] = json!(saved_pages + 1);
            }),
        ),
        (
            "page block outside every mapping",
            "lies outside its saved mappings".into(),
            Box::new(|d: &mut Decoded| d.blocks[0].vaddr = 0x1000),
        ),
        (
            "pid 0",
            "pid = 0: not between 1 and".into(),
            Box::new(|d: &mut Decoded| d.proc(0)["pid"] = json!(0)),
        ),
        (
            "negative tid",
            "tid = -7: not between 1 and".into(),
            Box::new(|d: &mut Decoded| {
                let mut t = d.proc(0)["threads"][0].clone();
                t["tid"] = json!(-7);
                d.proc(0)["threads"].as_array_mut().unwrap().push(t);
            }),
        ),
        (
            "a TID used twice",
            format!("thread {parent} of process {child}: ID {parent} is also process {parent}"),
            Box::new(|d: &mut Decoded| {
                let t = d.proc(0)["threads"][0].clone();
                d.proc(1)["threads"].as_array_mut().unwrap().push(t);
            }),
        ),
        (
            "a PID used twice",
            format!("process {parent}: ID {parent} is also process {parent}"),
            Box::new(move |d: &mut Decoded| {
                let p = d.proc(1);
                p["pid"] = json!(parent);
                p["threads"][0]["tid"] = json!(parent);
            }),
        ),
        (
            "parent not in the image",
            format!("process {child}: ppid = 1: no process before it"),
            Box::new(|d: &mut Decoded| d.proc(1)["ppid"] = json!(1)),
        ),
        (
            "child before its parent",
            format!("process {parent}: ppid = "),
            Box::new(|d: &mut Decoded| d.records.swap(0, 1)),
        ),
        (
            "zombie of a process outside the image",
            "zombie 4000000: ppid = 1: not a process of the image".into(),
            Box::new(|d: &mut Decoded| {
                let z = json!({"pid": 4_000_000, "ppid": 1, "status": 0});
                d.records.push(("zombie".into(), z));
            }),
        ),
        (
            "zombie killed by a signal that kills no one",
            "zombie 4000001: status = 0x11".into(),
            Box::new(move |d: &mut Decoded| {
                let z = json!({"pid": 4_000_001, "ppid": parent, "status": libc::SIGCHLD});
                d.records.push(("zombie".into(), z));
            }),
        ),
        (
            "negative fd",
            "fds[0]: fd = -1: not between 0 and 1048575".into(),
            Box::new(|d: &mut Decoded| d.proc(0)["fds"][0]["fd"] = json!(-1)),
        ),
        (
            "fd number too large",
            "fds[0]: fd = 1048576: not between 0 and 1048575".into(),
            Box::new(|d: &mut Decoded| d.proc(0)["fds"][0]["fd"] = json!(1 << 20)),
        ),
        (
            "fd listed twice",
            "listed twice".into(),
            Box::new(|d: &mut Decoded| {
                let fds = &mut d.proc(0)["fds"];
                fds[1]["fd"] = fds[0]["fd"].clone();
                fds[1]["same_as"] = Value::Null;
            }),
        ),
        (
            "pipe said to be held by a process outside the image",
            "pipe_holder = (1, 0): not an fd of pipe".into(),
            Box::new(move |d: &mut Decoded| {
                d.proc(1)["fds"][held]["pipe_holder"] = json!([1, 0]);
            }),
        ),
        (
            "an fd said to be shared with a process outside the image",
            "shares = (1, 0): not an fd of".into(),
            Box::new(move |d: &mut Decoded| {
                d.proc(1)["fds"][shared]["shares"] = json!([1, 0]);
            }),
        ),
        (
            "xsave area larger than any",
            "xsave is 40000 hex digits".into(),
            Box::new(|d: &mut Decoded| {
                d.proc(0)["threads"][0]["xsave"] = json!("00".repeat(20000));
            }),
        ),
        (
            "registers of another size",
            "regs has 3 values, not 27".into(),
            Box::new(|d: &mut Decoded| d.proc(0)["threads"][0]["regs"] = json!([1, 2, 3])),
        ),
        (
            "seventy thousand threads",
            "70001 threads (at most 65536)".into(),
            Box::new(|d: &mut Decoded| {
                let mut t = d.proc(0)["threads"][0].clone();
                t["xsave"] = json!("");
                t["regs"] = json!([]);
                let threads = d.proc(0)["threads"].as_array_mut().unwrap();
                for k in 0..70_000 {
                    let mut t = t.clone();
                    t["tid"] = json!(1_000_000 + k);
                    threads.push(t);
                }
            }),
        ),
        (
            "auxv of a thousand words",
            "mm.auxv has 1000 words".into(),
            Box::new(|d: &mut Decoded| d.proc(0)["mm"]["auxv"] = json!(vec![0u64; 1000])),
        ),
        (
            "brk below its start",
            "is above mm.brk".into(),
            Box::new(|d: &mut Decoded| {
                let mm = &mut d.proc(0)["mm"];
                mm["start_brk"] = json!(mm["brk"].as_u64().unwrap() + 4096);
            }),
        ),
    ]
}

/// Restore `img` and require a refusal naming `want`, with none of `ids` existing after.
fn refused(name: &str, img: &Path, want: &str, ids: &[u32]) {
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    let err = String::from_utf8_lossy(&r.stderr);
    eprintln!("{name}: {err}");
    if r.status.success() {
        // Accepted and running: end it before failing.
        for id in ids {
            kill(*id, "KILL");
        }
    }
    assert_eq!(r.status.code(), Some(2), "{name}: {err}");
    assert!(err.contains(want), "{name}: expected {want:?} in: {err}");
    assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
    for id in ids {
        assert!(
            !Path::new(&format!("/proc/{id}")).exists(),
            "{name}: process {id} exists after the refused restore"
        );
    }
}

/// A real dump, re-encoded with each mutation through the image writer (every checksum
/// valid), or cut short, or with a page block of a partial page: each restore is refused
/// with exit status 2 and a message naming the record, field and value, and no process of
/// the image exists afterwards. The image re-encoded unchanged restores and runs.
#[test]
fn hostile_images_are_refused_before_any_process_exists() {
    let (dir, img, out) = dump_tree("hostile");
    let base = Decoded::read(&img);
    let ids = base.ids();
    for id in &ids {
        wait_gone(*id);
    }
    for (i, (name, want, mutate)) in hostile_cases(&base).into_iter().enumerate() {
        let mut d = base.clone();
        mutate(&mut d);
        let at = dir.join(format!("h{i}"));
        d.write_dir(&at);
        refused(name, &at, &want, &ids);
        std::fs::remove_dir_all(&at).unwrap();
    }

    // Cut short: pages.fimg loses its last bytes.
    let cut = dir.join("cut");
    base.write_dir(&cut);
    let pages = cut.join("pages.fimg");
    let n = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(n - 100)
        .unwrap();
    refused(
        "truncated pages.fimg",
        &cut,
        "truncated PageBlock payload",
        &ids,
    );

    // A page block whose data is not whole pages (the writer cannot make one: crafted here
    // from the format's description, with a valid header checksum).
    let partial = dir.join("partial");
    base.write_dir(&partial);
    let mut h = Vec::new();
    h.extend_from_slice(&2u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&(16 + 4096 + 100u64).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    let mut c = PageHasher::new();
    c.update(&h);
    h.extend_from_slice(&c.finalize().to_le_bytes());
    h.extend(std::iter::repeat_n(0u8, 16 + 4096 + 100));
    std::fs::OpenOptions::new()
        .append(true)
        .open(partial.join("pages.fimg"))
        .unwrap()
        .write_all(&h)
        .unwrap();
    refused(
        "partial page",
        &partial,
        "is not 16 + a positive multiple of 4096",
        &ids,
    );

    // Unchanged, the re-encoded image is a good one.
    let same = dir.join("same");
    base.write_dir(&same);
    let r = ferry(&["restore", "--images", same.to_str().unwrap(), "--detach"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::thread::sleep(std::time::Duration::from_millis(100));
    kill(ids[0], "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
}

/// A real image and where its numbers are.
struct Base {
    image: Decoded,
    /// JSON pointers (record index, pointer) of every number in the process and zombie
    /// records; `picked` those of IDs, addresses, sizes and fd numbers.
    numbers: Vec<(usize, String)>,
    picked: Vec<(usize, String)>,
}

fn numbers(v: &Value, at: &str, key: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Number(_) => out.push((at.to_string(), key.to_string())),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                numbers(x, &format!("{at}/{i}"), key, out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                numbers(x, &format!("{at}/{k}"), k, out);
            }
        }
        _ => {}
    }
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let (_dir, img, _) = dump_tree("hostileprop");
        let image = Decoded::read(&img);
        let keys = [
            "pid",
            "ppid",
            "tid",
            "start",
            "end",
            "pages_saved",
            "offset",
            "fd",
            "same_as",
            "pipe",
            "pipe_holder",
            "shares",
            "ghost",
            "lazy",
            "status",
            "ptr",
            "size",
            "capacity",
            "brk",
            "start_brk",
            "signal",
        ];
        let (mut all, mut picked) = (Vec::new(), Vec::new());
        for (r, (tag, v)) in image.records.iter().enumerate() {
            if tag != "process" && tag != "zombie" {
                continue;
            }
            let mut found = Vec::new();
            numbers(v, "", "", &mut found);
            for (ptr, key) in found {
                if keys.contains(&key.as_str()) {
                    picked.push((r, ptr.clone()));
                }
                all.push((r, ptr));
            }
        }
        Base {
            image,
            numbers: all,
            picked,
        }
    })
}

fn to_json(v: i128) -> Value {
    if v < 0 {
        json!(v.max(i64::MIN as i128) as i64)
    } else {
        json!(v.min(u64::MAX as i128) as u64)
    }
}

/// A new value for a number: edges of the types and of the checks, or near the old one.
fn new_number(old: &Value, how: usize, r: u64, other: &Value) -> Value {
    let o = old
        .as_i64()
        .map(i128::from)
        .or(old.as_u64().map(i128::from))
        .unwrap_or(0);
    let v: i128 = match how {
        0 => 0,
        1 => -1,
        2 => 1,
        3 => 4095,
        4 => i32::MAX as i128,
        5 => i32::MIN as i128,
        6 => u64::MAX as i128,
        7 => 0x8000_0000_0000,
        8 => 1 << 20,
        9 => (1 << 22) + 1,
        10 => o + 4096,
        11 => o - 4096,
        12 => o ^ (1 << (r % 64)),
        13 => r as i128,
        _ => return other.clone(),
    };
    to_json(v)
}

/// Apply a structural change: `what` picks it, `a` / `b` pick where, `r` is a free number.
fn reshape(d: &mut Decoded, what: usize, a: Index, b: Index, r: u64) {
    let nproc = d.procs().len();
    let p = a.index(nproc);
    let list = ["threads", "mappings", "fds"][(r % 3) as usize];
    match what {
        0 | 1 => {
            let arr = d.proc(p)[list].as_array_mut().unwrap();
            if arr.is_empty() {
                return;
            }
            let k = b.index(arr.len());
            if what == 0 {
                let x = arr[k].clone();
                arr.push(x);
            } else {
                arr.remove(k);
            }
        }
        2 => {
            let (i, j) = (a.index(d.records.len()), b.index(d.records.len()));
            d.records.swap(i, j);
        }
        3 => {
            let ppid = d.proc(p)["pid"].clone();
            let z = json!({
                "pid": (r % (5 << 20)) as i64 - 1000,
                "ppid": ppid,
                "status": (r >> 32) & 0x1ffff,
            });
            d.records.push(("zombie".into(), z));
        }
        _ if d.blocks.is_empty() => {}
        4 => {
            let k = a.index(d.blocks.len());
            let maps = d.proc(p)["mappings"].as_array().unwrap();
            let vaddr = if r.is_multiple_of(2) && !maps.is_empty() {
                maps[b.index(maps.len())]["start"].as_u64().unwrap_or(0) & !4095
            } else {
                (r & 0x0000_ffff_ffff_f000).saturating_sub(0x10000)
            };
            d.blocks[k].vaddr = vaddr;
        }
        5 => {
            d.blocks.remove(a.index(d.blocks.len()));
        }
        6 => {
            let x = d.blocks[a.index(d.blocks.len())].clone();
            d.blocks.insert(b.index(d.blocks.len()), x);
        }
        _ => {
            let k = a.index(d.blocks.len());
            d.blocks[k]
                .data
                .resize(((r % 4) as usize + 1) * PAGE_SIZE, 0);
        }
    }
}

/// What every image a restore accepts holds to (a second statement of the main checks).
fn sound(c: &ferry_engine::restore::Checked) {
    let mut ids = std::collections::HashSet::new();
    for p in &c.imgs {
        let mut maps: Vec<(u64, u64)> = Vec::new();
        for m in &p.mappings {
            if m.kind != ferry_engine::schema::MapKind::Vsyscall {
                assert!(m.start < m.end && m.end <= 1 << 47, "{p:?}");
                assert!(m.start.is_multiple_of(4096) && m.end.is_multiple_of(4096));
                maps.push((m.start, m.end));
            }
        }
        maps.sort();
        assert!(maps.windows(2).all(|w| w[0].1 <= w[1].0), "overlap");
        let mut fds = std::collections::HashSet::new();
        for f in &p.fds {
            assert!((0..(1 << 20)).contains(&f.fd) && fds.insert(f.fd));
        }
        for t in &p.threads {
            assert!(t.tid > 0 && ids.insert(t.tid));
        }
    }
    for z in &c.zombies {
        assert!(z.pid > 0 && ids.insert(z.pid));
    }
    for b in &c.index {
        assert!(b.vaddr.saturating_add(b.data_len) <= 1 << 47);
        assert!(c.imgs.iter().any(|p| p
            .mappings
            .iter()
            .any(|m| m.start <= b.vaddr && b.vaddr < m.end)));
    }
}

/// Read an image from memory through the restore's own checking path.
fn check(
    meta: Vec<u8>,
    pages: Vec<u8>,
) -> Result<ferry_engine::restore::Checked, ferry_engine::EngineError> {
    let mut r =
        ImageReader::from_buffered(Box::new(Cursor::new(meta)), Box::new(Cursor::new(pages)))?;
    ferry_engine::restore::load_checked(Path::new("(in memory)"), &mut r)
}

fn encode(d: &Decoded) -> Option<(Vec<u8>, Vec<u8>)> {
    let (m, p) = (Shared::default(), Shared::default());
    d.write(Box::new(m.clone()), Box::new(p.clone())).ok()?;
    Some((m.take(), p.take()))
}

/// The real image, re-encoded unchanged, passes the checks.
#[test]
fn a_real_image_passes_the_checks() {
    let (m, p) = encode(&base().image).unwrap();
    let c = check(m, p).unwrap();
    sound(&c);
    assert_eq!(c.imgs.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A real image's numbers (IDs, addresses, lengths, fds, anything), its lists and its page
    /// blocks changed at random, re-encoded with valid checksums: the restore's checks return
    /// (never panic), and what they accept holds to the checks' rules.
    #[test]
    fn mutated_images_never_panic_the_checks(
        changes in proptest::collection::vec(
            (any::<bool>(), any::<Index>(), 0usize..16, any::<u64>(), any::<Index>()),
            0..6,
        ),
        shapes in proptest::collection::vec(
            (0usize..8, any::<Index>(), any::<Index>(), any::<u64>()),
            0..3,
        ),
    ) {
        let b = base();
        let mut d = b.image.clone();
        for (picked, at, how, r, other) in changes {
            let pool = if picked { &b.picked } else { &b.numbers };
            let (rec, ptr) = &pool[at.index(pool.len())];
            let (orec, optr) = &b.numbers[other.index(b.numbers.len())];
            let other = b.image.records[*orec].1.pointer(optr).cloned().unwrap_or(Value::Null);
            let slot = d.records[*rec].1.pointer_mut(ptr).unwrap();
            *slot = new_number(slot, how, r, &other);
        }
        for (what, a, i, r) in shapes {
            reshape(&mut d, what, a, i, r);
        }
        if let Some((m, p)) = encode(&d) {
            if let Ok(c) = check(m, p) {
                sound(&c);
            }
        }
    }
}
