//! Acceptance: Debian's redis-server in its own network namespace, with 200,000 keys and a
//! client in another namespace writing continuously over one TCP connection, is dumped,
//! killed and restored. Every key is there, the client's connection carries on, and no write
//! acknowledged before the freeze is lost.

mod common;
use common::*;
use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

struct Redis {
    pid: u32,
    child: std::process::Child,
}

fn start_redis(net: &NetPair, dir: &std::path::Path) -> Redis {
    let mut c = NetPair::cmd(&net.server, "redis-server");
    c.args([
        "--bind",
        &net.server_ip,
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--dir",
    ])
    .arg(dir)
    .current_dir(dir);
    let child = start_cmd(c, &dir.join("redis.log"));
    let pid = child.id();
    wait_for(&dir.join("redis.log"), "Ready to accept connections");
    Redis { pid, child }
}

#[test]
fn redis_in_its_namespace_keeps_keys_and_its_client_connection() {
    let dir = tmpdir("redis");
    let net = NetPair::new("r");
    let mut redis = start_redis(&net, &dir);
    let addr = format!("{}:6379", net.server_ip);

    // 200,000 keys, pipelined.
    let loader = NetPair::connect(&net.client, &addr);
    let mut lr = BufReader::new(loader.try_clone().unwrap());
    let mut lw = loader;
    const KEYS: usize = 200_000;
    for base in (0..KEYS).step_by(10_000) {
        let mut buf = Vec::new();
        for i in base..base + 10_000 {
            buf.extend(cmd(&["SET", &format!("key:{i}"), &format!("value-{i}")]));
        }
        lw.write_all(&buf).unwrap();
        for _ in 0..10_000 {
            assert_eq!(reply(&mut lr).unwrap(), Reply::Status("OK".into()));
        }
    }

    // A client writing continuously over one connection; `acked` is the last write
    // acknowledged.
    let conn = NetPair::connect(&net.client, &addr);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let writer = Writer::start(&conn);
    writer.wait_acked(200);

    let img = dir.join("img");
    let d = dump_ok(redis.pid, &img);
    let acked_at_freeze = writer.acked();
    redis.child.wait().unwrap();
    wait_gone(redis.pid);
    eprintln!(
        "redis dump: frozen {} ms, {} pages, {} writes acknowledged",
        d["frozen_ms"], d["pages"], acked_at_freeze
    );
    let r = restore_detached(&img, &["--netns", &NetPair::path(&net.server)]);
    assert_eq!(r["pid"].as_u64().unwrap() as u32, redis.pid);
    eprintln!("redis restore: {} ms", r["restore_ms"]);
    // The same connection goes on.
    writer.wait_acked(acked_at_freeze + 1000);
    let last = writer.finish();

    // Every key loaded and every write acknowledged is there, over the writer's connection.
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let n = check_keys(
        &mut r,
        &mut w,
        (0..KEYS).map(|i| (format!("key:{i}"), format!("value-{i}"))),
    );
    let m = check_keys(
        &mut r,
        &mut w,
        (0..=last).map(|i| (format!("w:{i}"), i.to_string())),
    );
    w.write_all(&cmd(&["DBSIZE"])).unwrap();
    assert_eq!(reply(&mut r).unwrap(), Reply::Int((n + m) as i64));
    kill(redis.pid, "KILL");
    let _ = std::fs::remove_dir_all(&dir);
}

/// redis-benchmark (10 connections from another namespace) runs across a dump and restore of
/// the server and reports no error.
#[test]
fn redis_benchmark_across_dump_and_restore_reports_no_errors() {
    let dir = tmpdir("redisbench");
    let net = NetPair::new("b");
    let mut redis = start_redis(&net, &dir);
    let log = dir.join("bench.log");
    let mut b = NetPair::cmd(&net.client, "redis-benchmark");
    b.args([
        "-h",
        &net.server_ip,
        "-p",
        "6379",
        "-c",
        "10",
        "-n",
        "400000",
    ])
    .args(["-t", "set,get", "-q"]);
    let mut bench = start_cmd(b, &log);
    // Let it run, then move the server underneath it.
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        bench.try_wait().unwrap().is_none(),
        "benchmark ended too early"
    );
    let img = dir.join("img");
    dump_ok(redis.pid, &img);
    redis.child.wait().unwrap();
    wait_gone(redis.pid);
    restore_detached(&img, &["--netns", &NetPair::path(&net.server)]);
    let t = Instant::now();
    let st = bench.wait().unwrap();
    eprintln!("benchmark finished {:?} after the restore", t.elapsed());
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "redis-benchmark failed: {out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    for t in ["SET", "GET"] {
        assert!(out.contains(&format!("{t}: ")), "no {t} result: {out}");
    }
    kill(redis.pid, "KILL");
    let _ = std::fs::remove_dir_all(&dir);
}
