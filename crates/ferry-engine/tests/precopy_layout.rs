//! Pre-copy keeps up with a process whose layout changes while it is tracked: a mapping made
//! after tracking began, and a tracked mapping replaced in place (munmap, then mmap at the
//! same address), are both sent by the next round, so what the receiver holds is the
//! process's memory. A real python3 process does both.

mod common;

use std::collections::HashMap;

const PY: &str = r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
N = 4 << 20
a = libc.mmap(None, N, 3, 0x22, -1, 0)
c = libc.mmap(None, N, 3, 0x22, -1, 0)
ctypes.memset(a, 1, N)
ctypes.memset(c, 1, N)
print(a, c, flush=True)
sys.stdin.readline()
b = libc.mmap(None, N, 3, 0x22, -1, 0)
ctypes.memset(b, 2, N)
ctypes.memset(a, 5, 4096)
libc.munmap(c, N)
assert libc.mmap(c, N, 3, 0x22 | 0x10, -1, 0) == c
ctypes.memset(c, 3, N)
print(b, flush=True)
sys.stdin.readline()
"#;

const N: u64 = 4 << 20;

fn round(tr: &mut ferry_engine::precopy::Tracking, held: &mut HashMap<u64, Vec<u8>>) -> u64 {
    tr.round(&mut |_, addr, data| {
        for (i, p) in data.chunks(4096).enumerate() {
            held.insert(addr + i as u64 * 4096, p.to_vec());
        }
        Ok(())
    })
    .unwrap()
}

fn assert_held(pid: i32, held: &HashMap<u64, Vec<u8>>, start: u64, fill: u8, what: &str) {
    let mut now = vec![0u8; N as usize];
    assert_eq!(
        ferry_sys::mem::read_mem(pid, start, &mut now).unwrap(),
        N as usize
    );
    for (i, page) in now.chunks(4096).enumerate() {
        let a = start + i as u64 * 4096;
        let h = held
            .get(&a)
            .unwrap_or_else(|| panic!("{what}: page {a:#x} never sent"));
        assert!(h == page, "{what}: page {a:#x} is stale");
    }
    assert!(now[4096..].iter().all(|&b| b == fill), "{what}: fixture");
}

#[test]
fn mappings_made_or_replaced_during_precopy_are_sent() {
    let mut py = common::Py::start(PY);
    let pid = py.pid;
    let v: Vec<u64> = py
        .line()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (a, c) = (v[0], v[1]);

    let mut tr = ferry_engine::precopy::Tracking::start(pid).unwrap();
    let mut held = HashMap::new();
    assert!(round(&mut tr, &mut held) >= 2 * N);

    py.go();
    let b: u64 = py.line().parse().unwrap();
    round(&mut tr, &mut held);

    assert_held(pid, &held, a, 1, "the tracked mapping written again");
    assert_eq!(held[&a][0], 5);
    assert_held(pid, &held, b, 2, "the mapping made during pre-copy");
    assert_held(pid, &held, c, 3, "the mapping replaced in place");

    tr.stop();
    py.finish();
}
