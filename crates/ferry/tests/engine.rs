//! End-to-end tests of `ferry dump` / `ferry restore` / `ferry image show` on real processes.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Start a fixture with stdout and stderr appended to `out`, stdin /dev/null.
fn start(bin: &Path, out: &Path) -> Child {
    start_cmd(Command::new(bin), out)
}

/// A fixture started and at its ready point.
struct Ready {
    dir: TestDir,
    bin: PathBuf,
    out: PathBuf,
    child: Child,
}

fn ready_fixture(tag: &str, name: &str) -> Ready {
    let dir = tmpdir(tag);
    let bin = build(&dir, name);
    let out = dir.join("out.txt");
    let child = start(&bin, &out);
    wait_for(&out, "ready");
    Ready {
        dir,
        bin,
        out,
        child,
    }
}

/// Dump (killing the process), restore with the same PID, dump the restored process again,
/// restore again: the fixture verifies its memory and registers and reports PASS.
#[test]
fn memory_registers_and_signals_survive_two_dump_restore_cycles() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("mem", "memstate");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(100));
    let img = dir.join("img1");
    let d = dump_with(pid, &img, &["--json"]);
    assert!(
        d.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    let rep: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(rep["left"], "killed");
    for k in [
        "freeze_ms",
        "collect_ms",
        "memory_ms",
        "verify_ms",
        "frozen_ms",
        "gb_per_s",
    ] {
        assert!(rep[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {rep}");
    }
    assert_eq!(
        rep["bytes"].as_u64().unwrap(),
        rep["pages"].as_u64().unwrap() * 4096
    );
    assert!(rep["pages"].as_u64().unwrap() >= 1100, "{rep}");
    child.wait().unwrap(); // reap: the PID must be free for the restore
    let show = ferry(&["image", "show", img.to_str().unwrap(), "--verify"]);
    assert!(show.status.success());
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains(&format!("process {pid}")));
    assert!(
        text.contains("heap") && text.contains("stack") && text.contains("vdso"),
        "{text}"
    );

    let r = ferry(&[
        "restore",
        "--images",
        img.to_str().unwrap(),
        "--detach",
        "--json",
    ]);
    assert!(
        r.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let rr: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(rr["pid"].as_u64().unwrap(), pid as u64, "same PID");
    // Phases with timings: they add up to the whole.
    let ms = |k: &str| {
        rr[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no {k} in the restore report: {rr}"))
    };
    let parts = ms("verify_ms") + ms("layout_ms") + ms("pages_ms") + ms("rest_ms");
    assert!((parts - ms("restore_ms")).abs() < 1.0, "{rr}");
    assert!(ms("pages_ms") > 0.0 && ms("gb_per_s") > 0.0, "{rr}");
    assert_eq!(rr["bytes"], rep["bytes"], "{rr} {rep}");
    // The 24 MiB of the large anonymous area went in through the userfaultfd.
    let by_uffd = rr["uffd_bytes"].as_u64().unwrap();
    assert!(
        (24 << 20..rr["bytes"].as_u64().unwrap()).contains(&by_uffd),
        "{rr}"
    );
    assert!(alive(pid));
    std::thread::sleep(Duration::from_millis(100));

    // Second cycle on the restored process.
    let img2 = dir.join("img2");
    let d = dump_with(pid, &img2, &[]);
    assert!(
        d.status.success(),
        "second dump: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Restored processes are children of the restorer, which has exited: init reaps them.
    let end = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < end, "PID {pid} still taken");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Restore without --detach: ferry waits and passes on the exit status.
    let code = restore_and_wait(&img2, pid, &out);
    assert_eq!(code, Some(0), "exit status passed on");
}

/// `ferry restore` of `img` without --detach; once process `pid` is back, SIGUSR1 makes the
/// fixture check itself (PASS in `out`, no FAIL). Returns ferry's exit code.
fn restore_and_wait(img: &Path, pid: u32, out: &Path) -> Option<i32> {
    let mut waiter = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--images", img.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !alive(pid) {
        assert!(Instant::now() < end, "restored process never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    kill(pid, "USR1");
    let st = waiter.wait().unwrap();
    let s = wait_for(out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    st.code()
}

#[test]
fn a_failed_dump_leaves_the_process_running_and_bad_images_are_refused() {
    let Ready {
        dir,
        bin,
        out,
        mut child,
    } = ready_fixture("bad", "memstate");
    let pid = child.id();
    // An image directory that already holds an image: the dump fails, the process runs on.
    let img = dir.join("img");
    let d = dump_with(pid, &img, &["--leave-running"]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let d2 = dump_with(pid, &img, &[]);
    assert_eq!(d2.status.code(), Some(2));
    assert!(alive(pid));
    // It still works: verification passes after a dump that resumed it.
    kill(pid, "USR1");
    assert!(child.wait().unwrap().success());
    assert!(wait_for(&out, "PASS").contains("PASS"));
    // A restore of a corrupted image fails before creating anything.
    let pages = img.join("pages.fimg");
    let mut b = std::fs::read(&pages).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x55;
    std::fs::write(&pages, &b).unwrap();
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("pages.fimg"), "{err}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || !alive(pid),
        "nothing was created"
    );
    // A process stopped by a signal: refused, and left stopped as it was.
    let mut stopped = start(&bin, &dir.join("out2.txt"));
    wait_for(&dir.join("out2.txt"), "ready");
    kill(stopped.id(), "STOP");
    std::thread::sleep(Duration::from_millis(100));
    let y = dir.join("y");
    let d = dump_with(stopped.id(), &y, &[]);
    assert_eq!(d.status.code(), Some(2));
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(err.contains("stopped by a signal"), "{err}");
    let st = std::fs::read_to_string(format!("/proc/{}/status", stopped.id())).unwrap();
    assert!(st.contains("State:\tT"), "left stopped: {st}");
    assert!(!y.exists(), "no image left behind");
    let _ = stopped.kill();
    let _ = stopped.wait();
    // A dead PID.
    let d = dump_with(999999999, &dir.join("x"), &[]);
    assert_eq!(d.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&d.stderr).contains("does not exist"));
}

/// Threads blocked in a futex, in nanosleep and in a pipe read (which gets the bytes written
/// after the restore), and one computing in AVX registers, with thread-local values and names
/// of their own: all restored with their TIDs, names and the umask, and finish correctly. A
/// signal sent to the reader alone (tgkill) while it blocks it is still pending for it, and
/// is delivered to it once it unblocks it.
#[test]
fn threads_blocked_in_syscalls_and_computing_survive() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("threads", "threads");
    let pid = child.id();
    let tids = |p: u32| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{p}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = tids(pid);
    assert_eq!(before.len(), 5);
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(tids(pid), before, "same TIDs");
    std::thread::sleep(Duration::from_millis(100));
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
}

/// `dump --leave-stopped`: the process is left stopped (SIGSTOP, no longer traced) and stays
/// so; once it is killed, its image restores and verifies.
#[test]
fn dump_leave_stopped_leaves_the_process_stopped_and_its_image_restores() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("leavestopped", "memstate");
    let pid = child.id();
    let img = dir.join("img");
    let d = dump_with(pid, &img, &["--leave-stopped", "--json"]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(rep["left"], "stopped");
    let state = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let st = stat.rsplit_once(") ").unwrap().1.chars().next().unwrap();
        (st, status.contains("TracerPid:\t0\n"))
    };
    let end = Instant::now() + Duration::from_secs(5);
    while state() != ('T', true) {
        assert!(Instant::now() < end, "not left stopped: {:?}", state());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(), ('T', true), "did not stay stopped");
    child.kill().unwrap();
    child.wait().unwrap();
    restore_and_check(&img, pid, &out);
}

/// A dump into a filesystem too small for the image (a 1 MiB tmpfs, 24 MiB of memory) fails
/// naming the problem, leaves no image, and the process runs on, untraced and intact.
#[test]
fn a_dump_into_a_full_filesystem_fails_and_the_process_runs_on() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("enospc", "memstate");
    let pid = child.id();
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    // Unmounted when `dir` is dropped, whether the test passes or not.
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "ferryfull"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs");
    let img = small.join("img");
    let err = dump_err(pid, &img);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!img.exists(), "a failed dump left an image");
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if st.contains("State:\tS") || Instant::now() > end {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        st.contains("State:\tS") && st.contains("TracerPid:\t0\n"),
        "{st}"
    );
    kill(pid, "USR1");
    assert!(child.wait().unwrap().success());
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
}

/// `restore` without `--detach` waits for the restored process and exits with its status
/// (here 3, which the fixture exits with once it has verified itself).
#[test]
fn restore_without_detach_passes_on_a_nonzero_exit_status() {
    let dir = tmpdir("exit3");
    let bin = build(&dir, "memstate");
    let out = dir.join("out.txt");
    let mut cmd = Command::new(&bin);
    cmd.arg("3");
    let mut child = start_cmd(cmd, &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    let code = restore_and_wait(&img, pid, &out);
    assert_eq!(code, Some(3), "exit status passed on");
}

/// Run `cmd` uninterrupted for the reference output; run it again, dump it mid-way (killing
/// it), restore it and let it finish: the output must be byte-identical.
fn dump_restore_matches_reference(
    tag: &str,
    prog: &str,
    args: &[&str],
    out_name: &str,
    after: Duration,
) {
    let dir = tmpdir(tag);
    let reference = dir.join(format!("{out_name}.ref"));
    let run = |out: &Path| -> Child {
        close_stray_fds();
        let f = std::fs::File::create(out).unwrap();
        Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    assert!(run(&reference).wait().unwrap().success());
    let out = dir.join(out_name);
    let mut child = run(&out);
    let pid = child.id();
    std::thread::sleep(after);
    assert!(
        child.try_wait().unwrap().is_none(),
        "{prog} finished before the dump: make its work longer"
    );
    let img = dir.join("img");
    let d = dump_with(pid, &img, &["--json"]);
    assert!(
        d.status.success(),
        "dump of {prog} ({}): {}",
        d.status,
        String::from_utf8_lossy(&d.stderr)
    );
    child.wait().unwrap();
    let r = ferry(&["restore", "--images", img.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "restore of {prog} ({}): {}",
        r.status,
        String::from_utf8_lossy(&r.stderr)
    );
    let a = std::fs::read(&reference).unwrap();
    let b = std::fs::read(&out).unwrap();
    assert!(!a.is_empty());
    assert!(
        a == b,
        "{prog}: output differs after dump and restore ({} vs {} bytes)",
        a.len(),
        b.len()
    );
}

#[test]
fn python3_mid_computation_gives_identical_output() {
    let script = "import hashlib\nh = hashlib.sha256()\nacc = 0\nfor i in range(12_000_000):\n    acc = (acc * 31 + i * i) % 1_000_000_007\n    if i % 100_000 == 0:\n        h.update(str(acc).encode())\nprint(acc, h.hexdigest())\n";
    dump_restore_matches_reference(
        "py",
        "/usr/bin/python3",
        &["-c", script],
        "py.out",
        Duration::from_millis(800),
    );
}

#[test]
fn multithreaded_xz_with_a_pipe_gives_identical_output() {
    let dir = tmpdir("xzin");
    let input = dir.join("in.txt");
    let mut text = String::new();
    let mut x: u64 = 1;
    while text.len() < 12 << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(["alpha ", "beta ", "ferry ", "cpu "][(x >> 60) as usize % 4]);
        text.push_str(&((x >> 33) % 1000).to_string());
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    dump_restore_matches_reference(
        "xz",
        "xz",
        &["-T2", "-6", "-c", input.to_str().unwrap()],
        "xz.out",
        Duration::from_millis(1500),
    );
}

/// The kernel's areas of process `pid` (`[vdso]`, `[vvar]`, `[vvar_vclock]`), as their
/// /proc/PID/maps lines' address ranges and names.
fn kernel_areas(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.ends_with("[vdso]") || l.contains("[vvar"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", w[0], w[w.len() - 1])
        })
        .collect()
}

/// A fixture that prints "ready", is dumped (killed) and restored, then checks itself after
/// SIGUSR1 and prints PASS. Its vDSO and vvar pages are back where they were (the fixtures'
/// clock_gettime goes through them).
fn fixture_survives(name: &str) {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture(name, name);
    let pid = child.id();
    let areas = kernel_areas(pid);
    assert!(areas.iter().any(|a| a.ends_with("[vdso]")), "{areas:?}");
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    // Every PID of the tree must be free again (orphans are reaped by init).
    let show: serde_json::Value =
        serde_json::from_slice(&ferry(&["image", "show", img.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    let zombies = show["zombies"].as_array().cloned().unwrap_or_default();
    for p in show["processes"]
        .as_array()
        .unwrap()
        .iter()
        .chain(zombies.iter())
    {
        let p = p["pid"].as_u64().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(Instant::now() < end, "PID {p} still taken");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(kernel_areas(pid), areas, "the vDSO moved");
    std::thread::sleep(Duration::from_millis(100));
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
}

/// Each thread's rseq registration (glibc's; musl makes none) is back in the kernel at the
/// same address, length and signature, and the kernel writes the CPU number into it again.
/// Dumped twice, to check the restored registration is itself dumped.
#[test]
fn rseq_registrations_survive() {
    let dir = tmpdir("rseq");
    let bin = build_glibc(&dir, "rseq");
    let out = dir.join("out.txt");
    let mut child = start(&bin, &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    let show = ferry(&["image", "show", img.to_str().unwrap(), "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let threads = show["processes"][0]["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2, "{show}");
    for t in threads {
        assert!(t["rseq"].is_object(), "no rseq area saved: {t}");
    }
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let img2 = dir.join("img2");
    dump_ok(pid, &img2);
    wait_gone(pid);
    restore_and_check(&img2, pid, &out);
}

/// A process whose main thread exited (pthread_exit) while another runs on: the dump refuses
/// it with a clear error, and the process runs on untouched.
#[test]
fn a_zombie_main_thread_is_refused_and_the_process_runs_on() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("zleader", "zombie_leader");
    let pid = child.id();
    let e = dump_err(pid, &dir.join("img"));
    assert!(e.contains("zombie thread"), "{e}");
    // Still ticking, and not traced.
    let ticks = |s: &str| s.matches("tick").count();
    let before = ticks(&std::fs::read_to_string(&out).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let after = ticks(&std::fs::read_to_string(&out).unwrap());
    assert!(
        after > before,
        "the process stopped ticking: {before} then {after}"
    );
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(st.contains("TracerPid:\t0\n"), "{st}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A process that never stops making threads and children (and leaving zombies) while it is
/// dumped: each dump catches a whole tree, and the restored process finds every thread and
/// child it started accounted for, with their exit statuses, and can make new ones. Three
/// times, the dump landing at a different moment each time.
#[test]
fn a_process_churning_threads_and_children_is_dumped_whole() {
    for _ in 0..3 {
        fixture_survives("churn");
    }
}

/// Queued real-time signals (process- and thread-directed, with their values, in order), an
/// alternate signal stack, an interval timer and a POSIX timer (same ID, same period) that
/// keep firing.
#[test]
fn pending_signals_sigaltstack_and_timers_survive() {
    fixture_survives("sigstate");
}

/// A parent and its forked child: same PIDs and parentage, anonymous memory still shared both
/// ways, bytes written by the child still in flight in their pipe.
#[test]
fn a_process_tree_with_shared_memory_and_a_pipe_in_flight_survives() {
    fixture_survives("tree");
}

/// Unreaped children (one exited with a code, one killed by a signal) are recreated as
/// zombies that the restored parent reaps with the right statuses.
#[test]
fn zombies_are_restored_with_their_exit_status() {
    fixture_survives("zombies");
}

/// An unlinked file (fd with offset, shared mapping) and a memfd (private mapping with changed
/// pages) come back with their contents.
#[test]
fn unlinked_files_and_memfds_survive() {
    fixture_survives("ghost");
}

/// rlimits, personality, no_new_privs, dumpable, session leadership and unprivileged
/// credentials with supplementary groups.
#[test]
fn process_attributes_and_credentials_survive() {
    fixture_survives("attrs");
}

/// A file the process has open changed after the dump: the restore refuses it, naming the
/// file, unless told to accept it.
#[test]
fn changed_files_are_refused_unless_allowed() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("changed", "memstate");
    let pid = child.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    std::fs::write(&out, "ready\nsomeone else wrote here\n").unwrap();
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("out.txt") && err.contains("changed since the dump"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nothing was created"
    );
    let r = ferry(&[
        "restore",
        "--images",
        img.to_str().unwrap(),
        "--detach",
        "--allow-changed-files",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
}

/// AVX-512 state (zmm31, the opmask k7 and a masked accumulator) of a thread caught in a busy
/// loop in user mode.
#[test]
fn avx512_registers_survive_in_a_busy_loop() {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !flags.contains(" avx512f") {
        eprintln!("this CPU has no AVX-512: the test checks nothing here");
        return;
    }
    fixture_survives("avx512");
}

/// eventfd counters, semaphore mode and non-blocking flag.
#[test]
fn eventfds_survive() {
    fixture_survives("evfd");
}

/// Regular files: an O_APPEND fd whose offset was moved back (appends still go to the end), a
/// read-write fd with its offset and a dup sharing it, a read-only close-on-exec fd.
#[test]
fn file_offsets_and_appends_survive() {
    fixture_survives("files");
}

/// Children with a parent-death signal, one of them with dropped credentials (which clear the
/// setting when they change): both still have it, under the same parent.
#[test]
fn parent_death_signals_of_children_survive() {
    fixture_survives("pdeath");
}

/// madvise advice (DONTFORK, WIPEONFORK, HUGEPAGE, NOHUGEPAGE, DONTDUMP, MERGEABLE) is back in
/// the VmFlags and acts on fork; the HUGEPAGE region's transparent huge pages are reported.
#[test]
fn madvise_advice_survives() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("madv", "madv");
    let pid = child.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    let show: serde_json::Value =
        serde_json::from_slice(&ferry(&["image", "show", img.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    let advice: Vec<String> = show["processes"][0]["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["advice"].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for a in [
        "dontfork",
        "wipeonfork",
        "hugepage",
        "nohugepage",
        "dontdump",
    ] {
        assert!(
            advice.iter().any(|x| x == a),
            "{a} not recorded: {advice:?}"
        );
    }
    let s = restore_and_check(&img, pid, &out);
    let thp = s.lines().find(|l| l.starts_with("thp")).unwrap_or("");
    eprintln!("{thp}");
    // "thp before KB after KB": the HUGEPAGE region's transparent huge pages, where the
    // kernel gives them to madvised memory, are huge pages again after the restore.
    let kb: Vec<u64> = thp
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(kb.len(), 2, "{s}");
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[never]") || kb[0] == 0 {
        eprintln!(
            "no transparent huge pages before the dump ({}): not compared",
            mode.trim()
        );
    } else {
        assert!(kb[1] >= kb[0], "huge pages lost: {thp}");
    }
}

/// Sets a sysctl for the time of a test and puts the old value back, even on failure.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> std::io::Result<Sysctl> {
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, value)?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

/// Private MAP_HUGETLB memory comes back as hugetlb memory with its data; shared hugetlb
/// memory is refused at dump with an error naming the process and the mapping, and the
/// process runs on.
#[test]
fn hugetlb_memory_survives_and_shared_hugetlb_is_refused() {
    let _pages = match Sysctl::set("/proc/sys/vm/nr_hugepages", "64") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot reserve huge pages ({e}): the test checks nothing here");
            return;
        }
    };
    let free = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse::<u64>())
        })
        .and_then(|v| v.ok())
        .unwrap_or(0);
    if free < 4 {
        eprintln!("only {free} free huge pages: the test checks nothing here");
        return;
    }
    fixture_survives("hugetlb");

    let dir = tmpdir("hugetlb-shared");
    let bin = dir.join("hugetlb-shared");
    let st = Command::new("musl-gcc")
        .args(["-static", "-O2", "-DSHARED", "-o"])
        .arg(&bin)
        .arg(format!("{FIXTURES}/hugetlb.c"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.join("out.txt");
    let mut child = start(&bin, &out);
    let text = wait_for(&out, "ready");
    let addr = text.trim().trim_start_matches("ready 0x").to_string();
    let img = dir.join("img");
    let d = dump_with(child.id(), &img, &[]);
    assert_eq!(d.status.code(), Some(2));
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        err.contains(&format!("process {}", child.id()))
            && err.contains(&addr)
            && err.contains("shared hugetlbfs"),
        "{err}"
    );
    assert!(!img.exists(), "no image left behind");
    assert!(alive(child.id()), "the process runs on");
    kill(child.id(), "USR1");
    assert!(child.wait().unwrap().success());
    assert!(wait_for(&out, "PASS").contains("PASS"));
}

/// FIFOs opened by their path: one shared by a parent (reading) and its child (writing) with
/// bytes in flight, one with both ends in one process; reopened at their paths with their
/// bytes and flags.
#[test]
fn fifos_with_bytes_in_flight_survive() {
    fixture_survives("fifo");
}

/// A process in a chroot jail, with its cwd and an open file inside: still jailed after the
/// restore, the file reopened through the host path the dump saw.
#[test]
fn a_chrooted_process_stays_in_its_jail() {
    fixture_survives("chroot");
}

/// Run `cmd` under a pseudo-terminal (util-linux `script`); returns what the terminal showed.
fn on_terminal(cmd: &str, typescript: &Path) -> std::process::ExitStatus {
    Command::new("script")
        .args(["-qec", cmd])
        .arg(typescript)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("script (util-linux)")
}

/// Progress bars on stderr when it is a terminal (memory of a dump, pages of a restore), and
/// nothing extra when it is not; `--quiet` silences stderr altogether.
#[test]
fn progress_is_shown_on_a_terminal_only() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("progress", "memstate");
    let pid = child.id();
    let ferry_bin = env!("CARGO_BIN_EXE_ferry");
    let img = dir.join("img1");
    let ts = dir.join("dump.typescript");
    let st = on_terminal(
        &format!(
            "{ferry_bin} dump --pid {pid} --images {} --leave-running",
            img.display()
        ),
        &ts,
    );
    assert!(st.success());
    let shown = String::from_utf8_lossy(&std::fs::read(&ts).unwrap()).into_owned();
    assert!(
        shown.contains("memory [") && shown.contains("dumped process"),
        "{shown}"
    );
    assert!(alive(pid));
    // Not a terminal: no bar.
    let d = dump_with(pid, &dir.join("img2"), &["--leave-running"]);
    assert!(d.status.success());
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        !err.contains("memory [") && err.lines().count() == 1,
        "{err}"
    );
    let img = dir.join("img3");
    let d = dump_with(pid, &img, &["--quiet"]);
    assert!(d.status.success());
    assert!(
        d.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&d.stderr)
    );
    child.wait().unwrap();
    // The restore waits for the process (so that the terminal outlives it).
    let ts = dir.join("restore.typescript");
    let cmd = format!("{ferry_bin} restore --images {}", img.display());
    let waiter = std::thread::spawn(move || on_terminal(&cmd, &ts).success().then_some(ts));
    let end = Instant::now() + Duration::from_secs(10);
    while !alive(pid) {
        assert!(Instant::now() < end, "restored process never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    kill(pid, "USR1");
    let ts = waiter.join().unwrap().expect("restore under a terminal");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    let shown = String::from_utf8_lossy(&std::fs::read(&ts).unwrap()).into_owned();
    assert!(
        shown.contains("pages [") && shown.contains("restored process"),
        "{shown}"
    );
}

/// The PID of the one child of `pid`.
fn only_child(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Waits (10 s at most) until none of `pids` is taken any more.
fn wait_free(pids: &[u32]) {
    for &p in pids {
        let end = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(Instant::now() < end, "PID {p} still taken");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Restore `img` detached, then ask the fixture `pid` (writing to `out`) to check itself.
/// Returns what it wrote.
fn restore_and_check(img: &Path, pid: u32, out: &Path) -> String {
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::thread::sleep(Duration::from_millis(100));
    kill(pid, "USR1");
    let s = wait_for(out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    s
}

fn traced(p: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{p}/status"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
}

/// Ctrl-C (SIGINT) during a dump, once the tree is frozen: the dump stops where the tree is
/// whole, exits 2 saying it was interrupted, leaves no image, and both processes run on
/// untraced and intact. Then SIGTERM during a restore of the tree (its child already built,
/// the parent's memory being written): nothing of it is left, and a restore afterwards works.
#[test]
fn an_interrupted_dump_or_restore_leaves_the_tree_whole_or_nothing() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("sigint", "bulk");
    let pid = child.id();
    let kid = only_child(pid);
    let img = dir.join("img");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_traced = |p: u32, what: &str| {
        let end = Instant::now() + Duration::from_secs(10);
        while !traced(p) {
            assert!(Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_micros(100));
        }
    };
    let d = run(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--images",
        img.to_str().unwrap(),
    ]);
    wait_traced(pid, "the dump never froze the process");
    kill(d.id(), "INT");
    let o = d.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("interrupted by SIGINT"), "{e}");
    assert!(!img.exists(), "an interrupted dump left an image");
    for p in [pid, kid] {
        assert!(!traced(p), "process {p} is still traced");
        let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        let state = st.rsplit_once(") ").unwrap().1.chars().next().unwrap();
        assert!(
            state == 'S' || state == 'R',
            "process {p} is left in state {state}"
        );
    }
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");

    // The same tree again, dumped whole, then a restore interrupted halfway.
    let _ = std::fs::remove_file(&out);
    drop(child.wait());
    // (Its directory lives until the end: the restored process runs its binary.)
    let Ready {
        dir: _dir2,
        out,
        mut child,
        ..
    } = ready_fixture("sigint2", "bulk");
    let pid = child.id();
    let kid = only_child(pid);
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_free(&[pid, kid]);
    let r = run(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    wait_traced(kid, "the restore never forked the child");
    kill(r.id(), "TERM");
    let o = r.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("interrupted by SIGTERM"), "{e}");
    for p in [pid, kid] {
        let end = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                Instant::now() < end,
                "process {p} of an interrupted restore is there"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    restore_and_check(&img, pid, &out);
}

/// Ferry killed in the middle of a restore (while the parent's 256 MiB are written and its
/// child waits in our pause loop): nothing of the tree is left, since every process being built
/// dies with its restorer. A full restore afterwards still works.
#[test]
fn a_restore_cut_short_leaves_nothing_running() {
    let Ready {
        dir,
        out,
        mut child,
        ..
    } = ready_fixture("cutshort", "bulk");
    let pid = child.id();
    let kid = only_child(pid);
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_free(&[pid, kid]);
    let mut restorer = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--images", img.to_str().unwrap(), "--detach"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The child's stub is forked and held (traced) before the parent's memory is filled.
    let traced = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    };
    let end = Instant::now() + Duration::from_secs(10);
    while !traced(kid) {
        assert!(Instant::now() < end, "the restore never forked the child");
        std::thread::sleep(Duration::from_micros(200));
    }
    restorer.kill().unwrap();
    restorer.wait().unwrap();
    for p in [pid, kid] {
        let end = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                Instant::now() < end,
                "process {p} of a restore cut short is still there: {}",
                std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    restore_and_check(&img, pid, &out);
}

/// `restore --lazy`: the process runs before its memory is filled, forks, drops and moves
/// memory at once, and still sees every byte it had (the filler follows fork, madvise and
/// mremap); a fork child gets its own filling.
#[test]
fn lazy_restore_fills_memory_while_the_process_uses_it() {
    let dir = tmpdir("lazy");
    let bin = build(&dir, "lazymem");
    let out = dir.join("out.txt");
    let trigger = dir.join("go");
    let mut cmd = Command::new(&bin);
    cmd.args(["256", trigger.to_str().unwrap()]);
    let mut child = start_cmd(cmd, &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let img = dir.join("img");
    let d = dump_ok(pid, &img);
    assert!(d["bytes"].as_u64().unwrap() > 256 << 20, "{d}");
    child.wait().unwrap();
    // The process checks its memory as soon as it runs again.
    std::fs::write(&trigger, b"").unwrap();
    let r = restore_detached(&img, &["--lazy", "--allow-changed-files"]);
    assert_eq!(r["pid"].as_u64().unwrap(), pid as u64, "{r}");
    // Nothing was written eagerly into private anonymous memory: the filler did it all.
    let lazy = r["lazy_bytes"].as_u64().unwrap();
    assert!(lazy > 256 << 20, "{r}");
    let fill = &r["fill"];
    assert!(fill["bytes"].as_u64().unwrap() > 200 << 20, "{r}");
    assert!(
        fill["faults"].as_u64().unwrap() >= 1,
        "the process never waited: {r}"
    );
    assert!(
        fill["forks"].as_u64().unwrap() >= 1,
        "the fork was not followed: {r}"
    );
    eprintln!("lazy restore: {r}");
    let text = wait_for(&out, "PASS");
    assert!(!text.contains("FAIL"), "{text}");
    wait_gone(pid);
}

/// Ferry killed while a lazily restored process still misses pages: the process must not run
/// on with zeros where its data was. The guardian holds its userfaultfd and kills it. The
/// restore runs under a subreaper (python3) that reaps the orphaned process and reports how
/// it ended: SIGKILL, not an exit (which is what a process reading zeros ends with here).
#[test]
fn lazy_restore_killed_midway_leaves_nothing_running() {
    let dir = tmpdir("lazykill");
    let bin = build(&dir, "lazymem");
    let out = dir.join("out.txt");
    let trigger = dir.join("go");
    let mut cmd = Command::new(&bin);
    cmd.args(["512", trigger.to_str().unwrap()]);
    let mut child = start_cmd(cmd, &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    close_stray_fds();
    let reaper = r#"
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("ferry", p.pid, flush=True)
while True:
    try:
        pid, st = os.wait()
    except ChildProcessError:
        break
    print("reaped", pid, "signal" if os.WIFSIGNALED(st) else "exit",
          os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st), flush=True)
"#;
    let log = dir.join("reaper.txt");
    let mut sub = Command::new("python3");
    sub.args([
        "-c",
        reaper,
        env!("CARGO_BIN_EXE_ferry"),
        "restore",
        "--images",
    ])
    .arg(&img)
    .args(["--detach", "--lazy", "--allow-changed-files", "--quiet"]);
    let mut sub = start_cmd(sub, &log);
    let ferry_pid: u32 = wait_for(&log, "ferry ")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // Running (its name restored, no longer traced by Ferry), memory not filled yet.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if st.contains("Name:\tlazymem") && st.contains("TracerPid:\t0\n") {
            break;
        }
        assert!(Instant::now() < end, "the restored process never ran");
        std::thread::sleep(Duration::from_micros(200));
    }
    kill(ferry_pid, "KILL");
    let text = wait_for(&log, &format!("reaped {pid} "));
    assert!(
        text.contains(&format!("reaped {pid} signal 9")),
        "the restored process was not killed: {text}"
    );
    let _ = sub.wait();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("PASS") && !text.contains("FAIL") && !text.contains("CRASH"),
        "{text}"
    );
}

/// The mounts of a process's own mount namespace, as `ferry image show --json` lists them:
/// (kind, target).
fn image_mounts(img: &Path) -> Vec<(String, String)> {
    let show = ferry(&["image", "show", img.to_str().unwrap(), "--json"]);
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    v["processes"][0]["namespaces"]["mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["kind"].as_str().unwrap().to_string(),
                m["target"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A process in a mount namespace of its own (made private) with the mounts it made there:
/// its directory bound read-only on itself (an fd opened for appending before the namespace
/// existed stays writable), a tmpfs with options and files, a read-only bind mount inside it,
/// a proc instance, /dev/shm remounted read-only; an fd on a tmpfs file and one on a file of
/// the bind mount, its cwd in the tmpfs. Dumped, killed and restored twice (the second dump finds the recreated
/// mounts again): the fixture finds everything, and none of it shows in Ferry's namespace.
#[test]
fn mounts_made_in_its_own_mount_namespace_survive() {
    let dir = tmpdir("mounts");
    let bin = build(&dir, "mounts");
    std::fs::create_dir_all(dir.join("ro-src")).unwrap();
    std::fs::write(dir.join("ro-src/hello.txt"), "bind-data").unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = dir.join("out.txt");
    let mut cmd = Command::new(&bin);
    cmd.arg(&dir);
    let mut child = start_cmd(cmd, &out);
    let pid = child.id();
    wait_for(&out, "ready");
    let m = mnt.display().to_string();
    let in_ours = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&m)
            || mnt.join("work").exists()
    };
    assert!(!in_ours(), "the fixture's mounts show in Ferry's namespace");
    let img = dir.join("img1");
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_gone(pid);
    let mounts = image_mounts(&img);
    for want in [
        ("bind", dir.display().to_string()),
        ("tmpfs", m.clone()),
        ("bind", format!("{m}/ro")),
        ("proc", format!("{m}/proc")),
        ("remount", "/dev/shm".to_string()),
    ] {
        assert!(
            mounts.contains(&(want.0.to_string(), want.1.clone())),
            "{want:?} not in {mounts:?}"
        );
    }
    assert_eq!(mounts.len(), 5, "{mounts:?}");
    let text = ferry(&["image", "show", img.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "tmpfs     {m} from ferrytmp (size=2048k,mode=751), 8 files, 25 bytes"
        )),
        "{text}"
    );
    restore_detached(&img, &[]);
    assert!(!in_ours(), "the restored mounts show in Ferry's namespace");
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let line = |mp: &str| {
        theirs
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mp))
            .unwrap_or_else(|| panic!("no mount on {mp} in {theirs}"))
            .to_string()
    };
    assert!(line(&m).contains(" - tmpfs ferrytmp "), "{}", line(&m));
    assert!(line(&format!("{m}/ro")).contains(" ro,"));
    assert!(!line(&m).contains("shared:"), "propagates: {}", line(&m));
    // Again, from the restored process: its mounts are found again as its own.
    let img2 = dir.join("img2");
    dump_ok(pid, &img2);
    wait_gone(pid);
    assert_eq!(image_mounts(&img2), mounts);
    restore_detached(&img2, &[]);
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    assert!(!in_ours());
    // Written after the restore through the fd opened outside its namespace.
    assert_eq!(
        std::fs::read_to_string(dir.join("log.txt")).unwrap(),
        "before\nafter\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mounts this version cannot carry (an overlay, a tmpfs holding more than the dump carries,
/// a Unix socket bound inside a mount of the tree's) stop the dump with an error naming the
/// process and the mount point; the process runs on, untraced, and no image is left.
#[test]
fn unsupported_mounts_are_refused_and_the_process_runs_on() {
    let dir = tmpdir("badmounts");
    for d in ["lower", "upper", "work", "ov", "big"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let p = |d: &str| dir.join(d).display().to_string();
    let sleep = "echo ready && exec sleep 1000";
    let cases = [
        (
            format!(
                "mount -t overlay ferryov -o lowerdir={},upperdir={},workdir={} {} && {sleep}",
                p("lower"),
                p("upper"),
                p("work"),
                p("ov")
            ),
            vec!["overlay".to_string(), format!("on {}", p("ov"))],
        ),
        (
            format!(
                "mount -t tmpfs -o size=64m ferrybig {} && head -c 17M /dev/zero > {}/big && \
                 {sleep}",
                p("big"),
                p("big")
            ),
            vec![format!("tmpfs on {}", p("big")), "16 MiB".to_string()],
        ),
        // A Unix socket bound inside a tmpfs of its own: rebuilt before the mount exists.
        (
            format!(
                "mount -t tmpfs ferrysock {} && exec python3 -c \"import socket,time\n\
                 s=socket.socket(socket.AF_UNIX); s.bind('{}/s.sock'); s.listen()\n\
                 print('ready', flush=True); time.sleep(1000)\"",
                p("ov"),
                p("ov")
            ),
            vec![
                format!("its name {}/s.sock", p("ov")),
                format!("tmpfs mount the tree made on {}", p("ov")),
                "fd 3".to_string(),
            ],
        ),
    ];
    for (i, (script, wants)) in cases.iter().enumerate() {
        let out = dir.join(format!("out{i}.txt"));
        let mut c = Command::new("unshare");
        c.args(["--mount", "--", "sh", "-c", script]);
        let mut child = start_cmd(c, &out);
        wait_for(&out, "ready");
        let pid = child.id();
        let img = dir.join(format!("img{i}"));
        let err = dump_err(pid, &img);
        assert!(err.contains(&format!("process {pid}")), "{err}");
        for w in wants {
            assert!(err.contains(w.as_str()), "{w:?} not in {err}");
        }
        // Just resumed, it may still be on its way back into its sleep: wait for it there.
        let end = Instant::now() + Duration::from_secs(10);
        let st = loop {
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            if st.contains("State:\tS") || Instant::now() > end {
                break st;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.contains("State:\tS"), "{st}");
        assert!(st.contains("TracerPid:\t0\n"), "{st}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
