//! A dump that takes its smaps from before the freeze (live migration does, to keep the page
//! walk out of the downtime) must notice when a mapping's flags changed in between: here a
//! real python3 advises MADV_DONTFORK on a whole file mapping after the hint was read.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

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
    let mut child = Command::new("python3")
        .args(["-c", PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let stale = hint(pid);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "advised");

    // The stale hint still has every mapping: the dump uses it, the check refuses it.
    let held = dump_with(pid, &stale);
    let err = held
        .check_smaps()
        .expect_err("changed flags went unnoticed");
    assert!(err.to_string().contains("changed its flags"), "{err}");
    held.resume();

    // A hint read after the change passes.
    let held = dump_with(pid, &hint(pid));
    held.check_smaps().unwrap();
    held.resume();

    // Resumed: the process goes on and ends normally.
    writeln!(stdin).unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
}
