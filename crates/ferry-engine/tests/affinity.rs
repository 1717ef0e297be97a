//! The dump runs its ptrace round trips with the tree held on one CPU: each thread of the
//! process gets its own CPU mask back, whatever it was, before it runs again. Here a real
//! python3 keeps its main thread on CPU 0 and a second thread on the last CPU.

mod common;

const PY: &str = r#"
import os, sys, threading
last = max(os.sched_getaffinity(0))
ev = threading.Event()
def worker():
    os.sched_setaffinity(0, {last})
    ev.set()
    sys.stdin.readline()
t = threading.Thread(target=worker)
t.start()
ev.wait()
os.sched_setaffinity(0, {0})
print("ready", flush=True)
t.join()
"#;

fn masks(pid: i32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = ferry_sys::procfs::list_threads(pid)
        .unwrap()
        .into_iter()
        .map(|tid| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            let l = st
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            (tid, l)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_thread_gets_its_own_cpu_mask_back_after_a_dump() {
    let mut py = common::Py::start(PY);
    let pid = py.pid;
    assert_eq!(py.line(), "ready");
    let before = masks(pid);
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(before[0].1, "0");
    for _ in 0..3 {
        let mut w =
            ferry_image::ImageWriter::new(Box::new(std::io::sink()), Box::new(std::io::sink()))
                .unwrap();
        let (held, _) = ferry_engine::dump_into(
            pid,
            &mut w,
            &ferry_engine::Progress::default(),
            None,
            None,
            None,
            None,
        )
        .unwrap();
        held.resume();
        assert_eq!(masks(pid), before);
    }
    py.finish();
}
