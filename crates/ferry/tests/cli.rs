//! End-to-end tests of `ferry cpu`: real processes, real binaries, real CPU profiles.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ferry-eval/data/qemu72_user_cpu_models_cpuid_dump.txt"
);
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ferry-eval/corpus");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Build directory shared by the tests of this file.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under the target directory: a clean build starts without them, /tmp keeps none.
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("ferry-cli-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Compile a corpus program (musl, static) or a fixture (gcc) once.
fn program(name: &str) -> PathBuf {
    let out = build_dir().join(name);
    if out.exists() {
        return out;
    }
    let (cc, src, flags): (&str, String, &[&str]) = match name {
        "lzcnt0" => (
            "musl-gcc",
            format!("{CORPUS}/lzcnt0.c"),
            &["-static", "-O2"],
        ),
        "jit-avx2" => (
            "musl-gcc",
            format!("{CORPUS}/jit_avx2.c"),
            &["-static", "-O2"],
        ),
        "thread-avx" => (
            "musl-gcc",
            format!("{CORPUS}/thread_avx.c"),
            &["-static", "-O2", "-pthread"],
        ),
        "march-v3" => (
            "musl-gcc",
            format!("{CORPUS}/kernel.c"),
            &["-static", "-O3", "-march=x86-64-v3"],
        ),
        "march-v1" => (
            "musl-gcc",
            format!("{CORPUS}/kernel.c"),
            &["-static", "-O3", "-march=x86-64"],
        ),
        "sighandler-avx" => (
            "musl-gcc",
            format!("{CORPUS}/sighandler_avx.c"),
            &["-static", "-O2"],
        ),
        "unknown-jit" => ("gcc", format!("{FIXTURES}/unknown_jit.c"), &["-O2"]),
        "heapptr" => (
            "musl-gcc",
            format!("{FIXTURES}/heapptr.c"),
            &["-static", "-O2"],
        ),
        other => panic!("no recipe for {other}"),
    };
    let tmp = build_dir().join(format!(
        "{name}.tmp{}",
        std::thread::current().name().unwrap_or("").len()
    ));
    let st = Command::new(cc)
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .status()
        .expect("run compiler");
    assert!(st.success(), "building {name}");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

struct Proc {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    /// Start a program and wait for its "ready" line.
    fn start(bin: &Path) -> Proc {
        Proc::start_with(bin, &[])
    }
    fn start_with(bin: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let l = lines.next().unwrap().unwrap();
        assert!(l.starts_with("ready"), "{l}");
        Proc { child, lines }
    }
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
    /// State letter, tracer and the syscall it is blocked in, once it is blocked.
    fn state(&self) -> String {
        let pid = self.child.id();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let get = |k: &str| s.lines().find(|l| l.starts_with(k)).unwrap().to_string();
            let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
            let st = format!(
                "{} {} syscall {}",
                get("State:"),
                get("TracerPid:"),
                sc.split(' ').next().unwrap()
            );
            if st.contains("(sleeping)") || Instant::now() > end {
                return st;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// Let a corpus program run its work phase; return its result line.
    fn finish(mut self) -> String {
        unsafe_kill(self.child.id() as i32, 10);
        let l = self.lines.next().unwrap().unwrap();
        assert!(self.child.wait().unwrap().success());
        l
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn profile(model: &str) -> PathBuf {
    let p = build_dir().join(format!("{model}.json"));
    if !p.exists() {
        let o = ferry(&[
            "cpu",
            "profile",
            "--from-cpuid-dump",
            DUMP,
            "--model",
            model,
            "--json",
        ]);
        assert!(o.status.success());
        std::fs::write(&p, &o.stdout).unwrap();
    }
    p
}

fn features(scan: &Value) -> Vec<String> {
    scan["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["feature"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn host_profile_is_versioned_and_consistent() {
    let o = ferry(&["cpu", "host", "--json"]);
    assert!(o.status.success());
    let v = json_of(&o);
    assert_eq!(v["format"], "ferry-cpu-profile");
    assert_eq!(v["version"], 1);
    let usable: Vec<&str> = v["usable_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(usable.contains(&"SSE2"));
    // What /proc/cpuinfo says of AVX2 and the profile agree.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap();
    assert_eq!(
        flags.split_whitespace().any(|f| f == "avx2"),
        usable.contains(&"AVX2")
    );
    assert_eq!(
        flags.split_whitespace().any(|f| f == "avx512f"),
        usable.contains(&"AVX512F")
    );
    // A saved profile loads back as a target.
    let p = build_dir().join("host.json");
    std::fs::write(&p, &o.stdout).unwrap();
    let me = build_dir().join("march-v1");
    let _ = program("march-v1");
    let c = ferry(&[
        "cpu",
        "check",
        "--binary",
        me.to_str().unwrap(),
        "--target",
        p.to_str().unwrap(),
    ]);
    assert_eq!(
        c.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&c.stdout)
    );
}

#[test]
fn profiles_from_a_cpuid_dump_respect_max_leaf_and_xcr0() {
    let v: Value = serde_json::from_slice(&std::fs::read(profile("Haswell-v1")).unwrap()).unwrap();
    let usable: Vec<&str> = v["usable_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(usable.contains(&"AVX2") && usable.contains(&"FMA") && !usable.contains(&"AVX512F"));
    // Nehalem's max leaf is 0xb: its leaf 0xd data is stale and must be ignored.
    let n: Value = serde_json::from_slice(&std::fs::read(profile("Nehalem-v1")).unwrap()).unwrap();
    assert_eq!(n["max_basic_leaf"], 0xb);
    assert!(n["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["leaf"].as_u64().unwrap() <= 0xb || l["leaf"].as_u64().unwrap() >= 0x8000_0000));
    // XCR0 without AVX state makes AVX unusable even when CPUID has it.
    let o = ferry(&[
        "cpu",
        "profile",
        "--from-cpuid-dump",
        DUMP,
        "--model",
        "Haswell-v1",
        "--xcr0",
        "3",
        "--json",
    ]);
    let v = json_of(&o);
    let usable: Vec<&str> = v["usable_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    let cpuid: Vec<&str> = v["cpuid_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(cpuid.contains(&"AVX2") && !usable.contains(&"AVX2") && usable.contains(&"BMI2"));
}

#[test]
fn lzcnt_is_a_needed_feature_and_the_process_is_left_as_it_was() {
    let p = Proc::start(&program("lzcnt0"));
    let before = p.state();
    let o = ferry(&["cpu", "scan", "--pid", &p.pid(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_of(&o);
    let lz = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "LZCNT")
        .expect("LZCNT found");
    assert!(lz["silent"].as_str().unwrap().contains("BSR"));
    assert!(lz["example"]["instruction"]
        .as_str()
        .unwrap()
        .starts_with("lzcnt"));
    let no = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("Nehalem-v1").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(no.status.code(), Some(1));
    let nv = json_of(&no);
    assert_eq!(nv["verdict"], "incompatible");
    assert!(nv["check"]["missing"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["feature"] == "LZCNT"));
    let yes = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("Haswell-v1").to_str().unwrap(),
    ]);
    assert_eq!(
        yes.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&yes.stdout)
    );
    assert_eq!(
        p.state(),
        before,
        "the scanned process is running as before, untraced"
    );
    assert_eq!(p.finish(), "result=64063032");
}

/// The address of a symbol of a program, from its symbol table.
fn symbol(bin: &Path, name: &str) -> u64 {
    let o = Command::new("nm").arg(bin).output().expect("run nm");
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(name))
        .unwrap_or_else(|| panic!("{name} in nm's output"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

#[test]
fn a_code_pointer_found_only_deep_in_the_heap_counts() {
    // The data scan runs on several threads over pieces of memory: the one word that
    // reaches the AVX2 function lies 48 MiB into the heap, and only there.
    let bin = program("heapptr");
    let off = symbol(&bin, "avx2_fn") - symbol(&bin, "plain_fn");
    let avx2 = |p: &Proc| {
        let v = json_of(&ferry(&["cpu", "scan", "--pid", &p.pid(), "--json"]));
        assert!(v["stats"]["data_bytes_scanned"].as_u64().unwrap() > 48 << 20);
        v["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["feature"] == "AVX2")
            .map(|f| f["example"]["instruction"].as_str().unwrap().to_string())
    };
    let with = Proc::start_with(&bin, &[&off.to_string()]);
    assert!(avx2(&with).expect("AVX2 found").starts_with("vp"));
    assert_eq!(with.finish(), "result=39", "the call through the heap ran");
    let without = Proc::start_with(&bin, &["0"]);
    assert_eq!(avx2(&without), None, "no AVX2 where no word points to it");
    assert_eq!(without.finish(), "result=42");
}

#[test]
fn jit_code_in_anonymous_memory_is_scanned() {
    let p = Proc::start(&program("jit-avx2"));
    let v = json_of(&ferry(&["cpu", "scan", "--pid", &p.pid(), "--json"]));
    let avx2 = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "AVX2")
        .expect("AVX2 in JIT code");
    assert!(
        avx2["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "[anon]"),
        "{avx2}"
    );
    let c = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("SandyBridge-v1").to_str().unwrap(),
    ]);
    assert_eq!(c.status.code(), Some(1));
    p.finish();
}

#[test]
fn code_run_only_by_a_second_thread_or_a_signal_handler_is_found() {
    for name in ["thread-avx", "sighandler-avx"] {
        let p = Proc::start(&program(name));
        let v = json_of(&ferry(&["cpu", "scan", "--pid", &p.pid(), "--json"]));
        assert!(
            features(&v).contains(&"AVX2".to_string()),
            "{name}: {:?}",
            features(&v)
        );
        if name == "thread-avx" {
            assert_eq!(v["threads"].as_array().unwrap().len(), 2);
        } else {
            assert!(v["signal_handlers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["signal"] == 12));
        }
        p.finish();
    }
}

#[test]
fn undecodable_reachable_code_gives_unknown_never_compatible() {
    let p = Proc::start(&program("unknown-jit"));
    let o = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("max").to_str().unwrap(),
        "--json",
    ]);
    let v = json_of(&o);
    assert!(!v["check"]["unknown"].as_array().unwrap().is_empty(), "{v}");
    assert_ne!(v["verdict"], "compatible");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn binary_scan_follows_the_program_and_its_libraries() {
    let v3 = program("march-v3");
    let v = json_of(&ferry(&[
        "cpu",
        "scan",
        "--binary",
        v3.to_str().unwrap(),
        "--json",
    ]));
    let f = features(&v);
    assert!(
        f.contains(&"AVX2".to_string()) && f.contains(&"FMA".to_string()),
        "{f:?}"
    );
    let c = ferry(&[
        "cpu",
        "check",
        "--binary",
        v3.to_str().unwrap(),
        "--target",
        profile("IvyBridge-v1").to_str().unwrap(),
    ]);
    assert_eq!(c.status.code(), Some(1));
    let c = ferry(&[
        "cpu",
        "check",
        "--binary",
        v3.to_str().unwrap(),
        "--target",
        profile("Haswell-v1").to_str().unwrap(),
    ]);
    assert_eq!(
        c.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&c.stdout)
    );
    // A dynamic Debian program with its shared libraries.
    let v = json_of(&ferry(&[
        "cpu",
        "scan",
        "--binary",
        "/usr/bin/zstd",
        "--json",
    ]));
    let mods = v["modules"].as_array().unwrap();
    assert!(
        mods.iter().any(|m| m.as_str().unwrap().contains("libc.so")),
        "{mods:?}"
    );
    assert!(v["stats"]["instructions"].as_u64().unwrap() > 10_000);
}

#[test]
fn criu_policy_compares_hosts() {
    let p = Proc::start(&program("march-v1"));
    let o = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("Haswell-v1").to_str().unwrap(),
        "--policy",
        "criu",
        "--json",
    ]);
    let v = json_of(&o);
    assert_eq!(v["check"]["policy"], "criu");
    // CRIU refuses: this host's xsave area differs in size from Haswell's (AVX-512 hosts),
    // or its CPUID has features Haswell lacks (every AMD host: SSE4A, and more).
    assert_eq!(v["verdict"], "incompatible");
    let reasons: Vec<&str> = v["check"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let size = |p: &Value| p["xsave"]["size_enabled"].as_u64().unwrap();
    let host = json_of(&ferry(&["cpu", "host", "--json"]));
    let hsw: Value =
        serde_json::from_slice(&std::fs::read(profile("Haswell-v1")).unwrap()).unwrap();
    if size(&host) != size(&hsw) {
        assert!(
            reasons.iter().any(|r| r.contains("xsave size")),
            "{reasons:?}"
        );
    }
    // Each feature it names is in this host's CPUID and not in Haswell's.
    let has = |p: &Value, f: &Value| p["cpuid_features"].as_array().unwrap().contains(f);
    let missing = v["check"]["missing"].as_array().unwrap();
    for m in missing {
        assert!(
            has(&host, &m["feature"]) && !has(&hsw, &m["feature"]),
            "{m}"
        );
    }
    assert!(
        size(&host) != size(&hsw) || !missing.is_empty(),
        "{reasons:?}"
    );
    // Ferry looks at the workload: baseline code runs there.
    let o = ferry(&[
        "cpu",
        "check",
        "--pid",
        &p.pid(),
        "--target",
        profile("Haswell-v1").to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    p.finish();
}

fn assert_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

/// With `--json`, a command that fails also prints its error as JSON on stdout (for scripts),
/// besides the line on stderr: exit 2 either way.
#[test]
fn errors_are_json_too_when_json_is_asked() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["cpu", "scan", "--pid", "999999999"],
            "999999999 does not exist",
        ),
        (
            &["dump", "--pid", "999999999", "--images", "/nonexistent/img"],
            "999999999 does not exist",
        ),
        (
            &[
                "migrate",
                "--pid",
                "999999999",
                "--to",
                "http://127.0.0.1:1",
            ],
            "999999999 does not exist",
        ),
        (&["image", "show", "/nonexistent"], "No such file"),
        (&["restore", "--images", "/nonexistent"], "No such file"),
    ];
    for (args, needle) in cases {
        let o = ferry(&[args, &["--json"][..]].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: no JSON on stdout ({e}): {o:?}"));
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{args:?}: {v}"
        );
        assert_eq!(v["exit_code"], 2, "{v}");
        // Without --json, stdout stays empty.
        let o = ferry(args);
        assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
    }
}

#[test]
fn bad_input_gets_one_clear_line_and_exit_2() {
    let haswell = profile("Haswell-v1");
    let h = haswell.to_str().unwrap();
    // A PID that does not exist.
    assert_error(
        &ferry(&["cpu", "scan", "--pid", "999999999"]),
        "process 999999999 does not exist",
    );
    // A zombie.
    let mut z = Command::new("true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_error(
        &ferry(&["cpu", "scan", "--pid", &z.id().to_string()]),
        "zombie",
    );
    z.wait().unwrap();
    // A process already traced.
    let mut s = Command::new("sleep").arg("30").spawn().unwrap();
    let mut tracer = Command::new("gdb")
        .args([
            "-q",
            "-batch",
            "-ex",
            "shell sleep 5",
            "-p",
            &s.id().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(t) = tracer.as_mut() {
        let end = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{}/status", s.id()))
            .unwrap()
            .contains("TracerPid:\t")
            || std::fs::read_to_string(format!("/proc/{}/status", s.id()))
                .unwrap()
                .contains("TracerPid:\t0\n")
        {
            assert!(Instant::now() < end, "gdb did not attach");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_error(
            &ferry(&["cpu", "scan", "--pid", &s.id().to_string()]),
            "already traced",
        );
        let _ = t.kill();
        let _ = t.wait();
    }
    let _ = s.kill();
    let _ = s.wait();
    // Not an ELF file, and a truncated one.
    let txt = build_dir().join("not-elf");
    std::fs::write(&txt, "#!/bin/sh\necho hi\n").unwrap();
    assert_error(
        &ferry(&["cpu", "scan", "--binary", txt.to_str().unwrap()]),
        "not-elf",
    );
    let bin = std::fs::read("/usr/bin/zstd").unwrap();
    let cut = build_dir().join("truncated");
    std::fs::write(&cut, &bin[..300]).unwrap();
    assert_error(
        &ferry(&[
            "cpu",
            "check",
            "--binary",
            cut.to_str().unwrap(),
            "--target",
            h,
        ]),
        "truncated",
    );
    assert_error(
        &ferry(&["cpu", "scan", "--binary", "/nonexistent/prog"]),
        "/nonexistent/prog",
    );
    // Malformed profiles.
    let bad = build_dir().join("bad.json");
    std::fs::write(&bad, "{\"format\": \"something\"}").unwrap();
    assert_error(
        &ferry(&[
            "cpu",
            "check",
            "--binary",
            "/usr/bin/zstd",
            "--target",
            bad.to_str().unwrap(),
        ]),
        "not a Ferry CPU profile",
    );
    std::fs::write(&bad, "{ not json").unwrap();
    assert_error(
        &ferry(&[
            "cpu",
            "check",
            "--binary",
            "/usr/bin/zstd",
            "--target",
            bad.to_str().unwrap(),
        ]),
        "not valid JSON",
    );
    let mut v: Value = serde_json::from_slice(&std::fs::read(&haswell).unwrap()).unwrap();
    v["usable_features"]
        .as_array_mut()
        .unwrap()
        .push("AVX512F".into());
    std::fs::write(&bad, v.to_string()).unwrap();
    assert_error(
        &ferry(&[
            "cpu",
            "check",
            "--binary",
            "/usr/bin/zstd",
            "--target",
            bad.to_str().unwrap(),
        ]),
        "disagree",
    );
    assert_error(
        &ferry(&[
            "cpu",
            "profile",
            "--from-cpuid-dump",
            DUMP,
            "--model",
            "Pentium",
        ]),
        "not in the dump",
    );
}
