//! A dump that takes its smaps from before the freeze (live migration does, to keep the page
//! walk out of the downtime) must notice when a mapping's flags changed in between: here a
//! real python3 advises MADV_DONTFORK on a whole file mapping after the hint was read.

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

fn dump_with(pid: i32, h: &ferry_engine::SmapsHint) -> ferry_engine::Held {
    let mut w = ferry_image::ImageWriter::new(Box::new(std::io::sink()), Box::new(std::io::sink()))
        .unwrap();
    let (held, _) = ferry_engine::dump_into(
        pid,
        &mut w,
        &ferry_engine::Progress::default(),
        None,
        Some(h),
    )
    .unwrap();
    held
}

#[test]
fn flags_changed_after_the_smaps_hint_are_caught() {
    let mut py = common::Py::start(PY);
    let pid = py.pid;
    assert_eq!(py.line(), "ready");
    let stale = hint(pid);
    py.go();
    assert_eq!(py.line(), "advised");

    // The stale hint still has every mapping: the dump uses it, the check refuses it.
    let mut held = dump_with(pid, &stale);
    let err = held
        .check_smaps()
        .expect_err("changed flags went unnoticed");
    assert!(err.to_string().contains("changed its flags"), "{err}");
    held.resume();

    // A hint read after the change passes.
    let mut held = dump_with(pid, &hint(pid));
    held.check_smaps().unwrap();
    held.resume();

    // Resumed: the process goes on and ends normally.
    py.finish();
}
