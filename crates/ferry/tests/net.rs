//! End-to-end tests of servers across `ferry dump` / `ferry restore`: TCP connections restored
//! with TCP repair while a peer outside the tree keeps its end, listeners, UDP, Unix sockets.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("read a line from the server");
    s.trim_end().to_string()
}

/// A server with a full send queue (blocked in write), unread bytes in its receive queue, a
/// listener, UDP and Unix sockets is dumped and killed, then restored: the peer's connection
/// carries on with no byte lost or duplicated, and every socket works.
#[test]
fn tcp_connection_with_queues_in_flight_and_other_sockets_survive() {
    let dir = tmpdir("tcp");
    let bin = build(&dir, "netserver");
    let out = dir.join("out.txt");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut cmd = Command::new(&bin);
    cmd.arg(port.to_string());
    let mut child = start_cmd(cmd, &out);
    let pid = child.id();
    wait_for(&out, "ready");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"BIG\n").unwrap();
    wait_for(&out, "writing");
    // Let the server fill its send queue and block; then queue lines it has not read.
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(b"hello 1\nhello 2\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let img = dir.join("img");
    let d = dump_ok(pid, &img);
    child.wait().unwrap();
    assert_eq!(d["left"], "killed");
    // The image holds the connection with bytes in both queues.
    let show = ferry(&["image", "show", img.to_str().unwrap(), "--json"]);
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let socks = v["processes"][0]["sockets"].as_array().expect("sockets");
    let est = socks
        .iter()
        .find(|s| s["state"] == "established")
        .expect("an established socket");
    assert!(est["send_queue"].as_u64().unwrap() > 0, "{est}");
    assert_eq!(est["recv_queue"].as_u64().unwrap(), 16, "{est}");

    wait_gone(pid);
    let r = restore_detached(&img, &[]);
    assert_eq!(r["pid"].as_u64().unwrap() as u32, pid);

    // All 4 MiB arrive, in order, once.
    let mut big = vec![0u8; 4 << 20];
    conn.read_exact(&mut big)
        .expect("the 4 MiB after the restore");
    for (i, b) in big.iter().enumerate() {
        assert_eq!(*b, (i % 251) as u8, "byte {i} of the stream");
    }
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    assert_eq!(read_line(&mut rd), "GOT hello 1");
    assert_eq!(read_line(&mut rd), "GOT hello 2");
    conn.write_all(b"CHECK\n").unwrap();
    assert_eq!(
        read_line(&mut rd),
        "PASS",
        "{}",
        std::fs::read_to_string(&out).unwrap()
    );
    // The listener accepts new connections.
    conn.write_all(b"ACCEPT\n").unwrap();
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hi = String::new();
    second.read_to_string(&mut hi).unwrap();
    assert_eq!(hi, "HI 2\n");
    assert_eq!(read_line(&mut rd), "ACCEPTED 2");
    // Nothing was left blocked.
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&format!("ferry_{pid}")),
        "the traffic block was not lifted"
    );
    conn.write_all(b"QUIT\n").unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(std::time::Instant::now() < end, "server did not quit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An event loop (epoll over a timerfd, a signalfd, inotify with watch descriptors 1 and 3,
/// an eventfd) keeps every registration, its timer period, its watches and its signals.
#[test]
fn epoll_timerfd_signalfd_and_inotify_survive() {
    let dir = tmpdir("evloop");
    let bin = build(&dir, "evloop");
    let watched = dir.join("watched");
    std::fs::create_dir_all(watched.join("sub")).unwrap();
    let out = dir.join("out.txt");
    let mut cmd = Command::new(&bin);
    cmd.arg(&watched);
    let mut child = start_cmd(cmd, &out);
    let pid = child.id();
    assert!(wait_for(&out, "ready").contains("ready wd 1 3"));
    std::fs::write(watched.join("before"), b"x").unwrap();
    wait_for(&out, "saw before");
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_gone(pid);
    restore_detached(&img, &[]);
    kill(pid, "USR2");
    std::fs::write(watched.join("sub/after"), b"y").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS rate");
    assert!(!s.contains("FAIL"), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}
