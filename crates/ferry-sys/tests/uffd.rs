//! Write tracking of a real, running process (python3) with userfaultfd WP_ASYNC and
//! PAGEMAP_SCAN: exactly the pages it writes are reported, and reported once.

use ferry_sys::uffd::WriteTracker;
use ferry_sys::Frozen;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const PY: &str = r#"
import ctypes, sys, mmap
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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
    // The last scan does not re-arm: it reports the same pages each time.
    writeln!(input, "7").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let seven = vec![(start + 7 * 4096, start + 8 * 4096)];
    assert_eq!(tracker.written_all_last().unwrap(), seven);
    assert_eq!(tracker.written_all_last().unwrap(), seven);
    // The same, from a thread of its own.
    let scan = tracker.last_scan().unwrap();
    assert_eq!(
        std::thread::spawn(move || scan.run())
            .join()
            .unwrap()
            .unwrap(),
        seven
    );
    tracker.stop();
    // The process runs on normally after tracking stops.
    writeln!(input, "5").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    drop(input);
    child.wait().unwrap();
}

const PY_FILE: &str = r#"
import ctypes, sys, mmap, os
path = sys.argv[1]
with open(path, 'wb') as f:
    f.write(b'x' * (1 << 20))
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, 1 << 20, access=mmap.ACCESS_COPY)
s = sum(m[i] for i in range(0, 1 << 20, 4096))
m[5 * 4096] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
for line in sys.stdin:
    for p in line.split():
        m[int(p) * 4096 + 7] = 2
    print("done", flush=True)
"#;

/// In a private file mapping only the private copies count as written: the file's own pages,
/// present because they were read, are never reported. (1 MiB: a file mapping of 2 MiB or
/// more may be mapped by huge page, which the kernel reports as written whole.)
#[test]
fn in_a_private_file_mapping_only_private_copies_are_reported() {
    let path = std::env::temp_dir().join(format!("ferry-uffd-file-{}", std::process::id()));
    let mut child = Command::new("python3")
        .args(["-c", PY_FILE])
        .arg(&path)
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
    let (start, end) = (base, base + (1 << 20));
    let page = |p: u64| (start + p * 4096, start + (p + 1) * 4096);
    let mut tracker = {
        let mut f = Frozen::freeze(pid).unwrap();
        let mut t = WriteTracker::new(&mut f).unwrap();
        t.register_file(start, end).unwrap();
        assert_eq!(t.written(start, end).unwrap(), vec![page(5)]);
        t
    };
    writeln!(input, "3 100").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    assert_eq!(
        tracker.written(start, end).unwrap(),
        vec![page(3), page(100)]
    );
    assert!(tracker.written(start, end).unwrap().is_empty());
    tracker.stop();
    drop(input);
    child.wait().unwrap();
    let _ = std::fs::remove_file(&path);
}
