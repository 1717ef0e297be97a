//! Write tracking of a real, running process (python3) with userfaultfd WP_ASYNC and
//! PAGEMAP_SCAN: exactly the pages it writes are reported, and reported once.

use ferry_sys::uffd::WriteTracker;
use ferry_sys::Frozen;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const PY: &str = r#"
import ctypes, sys, mmap
m = mmap.mmap(-1, 64 << 20)
for i in range(0, 64 << 20, 4096):
    m[i] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
for line in sys.stdin:
    for p in line.split():
        m[int(p) * 4096 + 7] = 2
    print("done", flush=True)
"#;

#[test]
fn written_pages_of_a_running_process_are_reported_exactly() {
    let mut child = Command::new("python3")
        .args(["-c", PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut input = child.stdin.take().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let base: u64 = line.trim().parse().unwrap();
    let (start, end) = (base, base + (64 << 20));

    let mut tracker = {
        let mut f = Frozen::freeze(pid).unwrap();
        let mut t = WriteTracker::new(&mut f).unwrap();
        t.register(start, end).unwrap();
        // The first scan arms every page: all were written before.
        let first: u64 = t
            .written(start, end)
            .unwrap()
            .iter()
            .map(|r| (r.1 - r.0) / 4096)
            .sum();
        assert_eq!(first, 16384, "every touched page counts as written once");
        t
    }; // resumed here
    assert!(
        tracker.written(start, end).unwrap().is_empty(),
        "nothing written yet"
    );
    let pages = [3u64, 100, 101, 9000];
    writeln!(input, "3 100 101 9000").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let got = tracker.written(start, end).unwrap();
    let want: Vec<(u64, u64)> = vec![
        (start + 3 * 4096, start + 4 * 4096),
        (start + 100 * 4096, start + 102 * 4096),
        (start + 9000 * 4096, start + 9001 * 4096),
    ];
    assert_eq!(got, want, "pages written: {pages:?}");
    // Re-armed: a second scan finds nothing.
    assert!(tracker.written(start, end).unwrap().is_empty());
    tracker.stop();
    // The process runs on normally after tracking stops.
    writeln!(input, "5").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    drop(input);
    child.wait().unwrap();
}
