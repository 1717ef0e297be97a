//! A dump that takes its smaps from before the freeze (live migration does, to keep the page
//! walk out of the downtime) must not carry flags that changed in between: here a real
//! python3 advises MADV_DONTFORK on a whole file mapping after the hint was read. With BPF
//! the dump takes the frozen process's own flags (the image has the advice); without it, the
//! check against the frozen process's smaps refuses the image.

mod common;

const PY: &str = r#"
import mmap, sys, tempfile
f = tempfile.TemporaryFile()
f.write(b"x" * 65536)
f.flush()
m = mmap.mmap(f.fileno(), 65536)
print("ready", flush=True)
sys.stdin.readline()
m.madvise(mmap.MADV_DONTFORK)
print("advised", flush=True)
sys.stdin.readline()
"#;

fn hint(pid: i32) -> ferry_engine::SmapsHint {
    let mut h = ferry_engine::SmapsHint::new();
    h.insert(pid, ferry_sys::procfs::read_smaps(pid).unwrap());
    h
}

/// Dump with hint `h` into `dir`; the held tree and the advice of every mapping in the image.
fn dump_with(
    pid: i32,
    h: &ferry_engine::SmapsHint,
    dir: &std::path::Path,
) -> (ferry_engine::Held, Vec<Vec<String>>) {
    let _ = std::fs::remove_dir_all(dir);
    let mut w = ferry_image::ImageWriter::create(dir).unwrap();
    let (held, _) = ferry_engine::dump_into(
        pid,
        &mut w,
        &ferry_engine::Progress::default(),
        None,
        Some(h),
        None,
        None,
    )
    .unwrap();
    w.finish().unwrap();
    let r = ferry_image::ImageReader::open(dir).unwrap();
    let procs: Vec<ferry_engine::schema::ProcessImage> =
        r.find(ferry_engine::schema::TAG_PROCESS).unwrap();
    let advice = procs[0].mappings.iter().map(|m| m.advice.clone()).collect();
    (held, advice)
}

#[test]
fn flags_changed_after_the_smaps_hint_are_caught() {
    let mut py = common::Py::start(PY);
    let pid = py.pid;
    assert_eq!(py.line(), "ready");
    let stale = hint(pid);
    py.go();
    assert_eq!(py.line(), "advised");

    let dir = std::env::temp_dir().join(format!("ferry-smaps-hint-{pid}"));
    let dontfork = |advice: &[Vec<String>]| {
        advice
            .iter()
            .filter(|a| a.contains(&"dontfork".to_string()))
            .count()
    };

    // With BPF: the stale hint serves only for huge page counts; the flags are the frozen
    // process's own, so the image has the new advice and nothing needs refusing.
    ferry_sys::vmaflags::set_enabled(true);
    let (mut held, with_bpf) = dump_with(pid, &stale, &dir);
    held.check_smaps().unwrap();
    held.resume();
    let (mut held, fresh) = dump_with(pid, &hint(pid), &dir);
    held.check_smaps().unwrap();
    held.resume();
    assert!(dontfork(&fresh) >= 1, "{fresh:?}");
    assert_eq!(dontfork(&with_bpf), dontfork(&fresh), "{with_bpf:?}");

    // Without: the stale hint still has every mapping, the dump uses it, the check refuses
    // it.
    ferry_sys::vmaflags::set_enabled(false);
    let (mut held, _) = dump_with(pid, &stale, &dir);
    let err = held
        .check_smaps()
        .expect_err("changed flags went unnoticed");
    assert!(err.to_string().contains("changed its flags"), "{err}");
    held.resume();

    // A hint read after the change passes.
    let (mut held, _) = dump_with(pid, &hint(pid), &dir);
    held.check_smaps().unwrap();
    held.resume();
    ferry_sys::vmaflags::set_enabled(true);
    let _ = std::fs::remove_dir_all(&dir);

    // Resumed: the process goes on and ends normally.
    py.finish();
}
