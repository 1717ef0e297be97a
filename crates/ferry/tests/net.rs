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
    let port = free_port(0);
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
    // Between dump and restore the kernel answers nothing: a line sent now is not reset but
    // waits for the restored server, and a new connection is neither refused nor accepted.
    let tables = Command::new("nft")
        .args(["list", "table", "inet", &format!("ferry_{pid}")])
        .output()
        .unwrap();
    assert!(tables.status.success(), "no traffic block while dumped");
    conn.write_all(b"hello 3\n").unwrap();
    let early = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .expect_err("a connection was accepted while the server was dumped");
    assert_eq!(early.kind(), std::io::ErrorKind::TimedOut, "{early}");
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
    assert_eq!(read_line(&mut rd), "GOT hello 3");
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

/// A port below the kernel's ephemeral range (32768 and up, where an outgoing connection of
/// anything else on the machine may hold it), free when asked.
fn free_port(seed: u16) -> u16 {
    let base = 10000 + (std::process::id() % 10000) as u16 + seed * 7;
    (0..50)
        .map(|i| base + i * 211 % 12000)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("no free port")
}

/// Wait for a TCP port to accept connections.
fn wait_port(port: u16) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < end, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(port: u16, path: &str) -> (BufReader<TcpStream>, usize) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut r = BufReader::new(c);
    let mut len = 0;
    loop {
        let l = read_line(&mut r);
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if l.starts_with("HTTP/") {
            assert!(l.contains(" 200 "), "{l}");
        }
    }
    (r, len)
}

/// `python3 -m http.server` in the middle of a long download is dumped, killed and restored:
/// the download continues on the same connection and its bytes match the file.
#[test]
fn python_http_server_download_continues_across_restore() {
    let dir = tmpdir("http");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let data: Vec<u8> = (0..48u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(www.join("big.bin"), &data).unwrap();
    let port = free_port(1);
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .arg("--directory")
    .arg(&www);
    let out = dir.join("out.txt");
    let mut child = start_cmd(cmd, &out);
    let pid = child.id();
    wait_port(port);
    let (mut r, len) = http_get(port, "/big.bin");
    assert_eq!(len, data.len());
    let mut got = vec![0u8; len];
    // Read a part, then stop reading: the server blocks with the rest unsent.
    r.read_exact(&mut got[..4 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_gone(pid);
    restore_detached(&img, &[]);
    r.read_exact(&mut got[4 << 20..])
        .expect("the rest of the download");
    assert!(got == data, "the downloaded bytes differ from the file");
    // And it serves new requests.
    let (mut r2, len2) = http_get(port, "/big.bin");
    let mut again = vec![0u8; len2];
    r2.read_exact(&mut again).unwrap();
    assert!(again == data);
    kill(pid, "KILL");
    let _ = std::fs::remove_dir_all(&dir);
}

/// nginx, a master with two workers sharing one listening socket (and socketpair channels
/// between them), keeps serving after a dump and restore of the whole tree.
#[test]
fn nginx_master_and_workers_keep_serving() {
    let dir = tmpdir("nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), b"hello from nginx\n").unwrap();
    let port = free_port(2);
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
             http {{ access_log {d}/access.log; client_body_temp_path {d}; proxy_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {w}; }} }}\n",
            d = dir.display(),
            w = www.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf).args(["-p"]).arg(&dir);
    let out = dir.join("out.txt");
    let mut child = start_cmd(cmd, &out);
    let pid = child.id();
    wait_port(port);
    let get = || {
        let (mut r, len) = http_get(port, "/index.html");
        let mut b = String::new();
        r.read_to_string(&mut b).unwrap();
        assert_eq!((len, b.as_str()), (17, "hello from nginx\n"));
    };
    for _ in 0..4 {
        get();
    }
    let img = dir.join("img");
    let d = dump_ok(pid, &img);
    assert_eq!(d["processes"], 3, "master and two workers");
    child.wait().unwrap();
    wait_gone(pid);
    let r = restore_detached(&img, &[]);
    assert_eq!(r["processes"], 3);
    for _ in 0..20 {
        get();
    }
    // Both workers are still there, children of the master.
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    assert_eq!(kids.split_whitespace().count(), 2, "workers: {kids}");
    kill(pid, "QUIT");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(pid),
        "nginx did not quit on SIGQUIT after the restore"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn python(code: &str, out: &std::path::Path) -> std::process::Child {
    let mut c = Command::new("python3");
    c.args(["-c", code]);
    let child = start_cmd(c, out);
    wait_for(out, "ready");
    child
}

fn running(pid: u32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = s.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    matches!(state, Some('S') | Some('R'))
}

/// Unsupported objects stop the dump with an error naming the process, fd and type; the
/// process runs on untouched and its traffic is not left blocked. A restore whose address
/// cannot be bound fails clearly and leaves nothing running.
#[test]
fn unsupported_sockets_and_unbindable_addresses_fail_clearly() {
    let dir = tmpdir("netbad");
    let port = free_port(3);
    // A TCP listener (blocked during the dump) and then a netlink socket (refused).
    let out = dir.join("netlink.txt");
    let code = format!(
        "import socket,time\nl=socket.socket(); l.bind(('127.0.0.1',{port})); l.listen()\n\
         n=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nprint('ready', n.fileno(), flush=True)\n\
         while True:\n  c,_=l.accept(); c.sendall(b'hi'); c.close()\n"
    );
    let mut p = python(&code, &out);
    let nfd: String = wait_for(&out, "ready")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let e = dump_err(p.id(), &dir.join("img1"));
    assert!(
        e.contains(&format!("process {}", p.id()))
            && e.contains(&format!("fd {nfd}"))
            && e.contains("netlink"),
        "{e}"
    );
    assert!(running(p.id()));
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(&format!("ferry_{}", p.id())));
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut hi = String::new();
    c.read_to_string(&mut hi).unwrap();
    assert_eq!(hi, "hi", "the listener works after the failed dump");
    p.kill().unwrap();
    p.wait().unwrap();

    // A Unix socket connected to a listener outside the tree.
    let path = dir.join("outside.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let out = dir.join("unix.txt");
    let code = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX); s.connect('{}')\nprint('ready', flush=True)\ntime.sleep(100)\n",
        path.display()
    );
    let mut p = python(&code, &out);
    let _accepted = l.accept().unwrap();
    let e = dump_err(p.id(), &dir.join("img2"));
    assert!(e.contains("outside the dumped tree"), "{e}");
    assert!(running(p.id()));
    p.kill().unwrap();
    p.wait().unwrap();

    // A terminal.
    let out = dir.join("pty.txt");
    let mut p = python(
        "import os,time\nm,s=os.openpty()\nprint('ready', flush=True)\ntime.sleep(100)\n",
        &out,
    );
    let e = dump_err(p.id(), &dir.join("img3"));
    assert!(e.contains("a terminal"), "{e}");
    assert!(running(p.id()));
    p.kill().unwrap();
    p.wait().unwrap();

    // A listener on an address of another namespace: restored outside it, bind fails.
    let net = NetPair::new("x");
    let out = dir.join("ns.txt");
    let mut c = NetPair::cmd(&net.server, "python3");
    c.args([
        "-c",
        &format!(
            "import socket,time\nl=socket.socket(); l.bind(('{}',{port})); l.listen()\nprint('ready', flush=True)\ntime.sleep(100)\n",
            net.server_ip
        ),
    ]);
    let mut p = start_cmd(c, &out);
    wait_for(&out, "ready");
    let pid = p.id();
    let img = dir.join("img4");
    dump_ok(pid, &img);
    p.wait().unwrap();
    wait_gone(pid);
    let r = ferry(&["restore", "--images", img.to_str().unwrap(), "--detach"]);
    assert_eq!(r.status.code(), Some(2));
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains(&net.server_ip) && e.contains("bind"), "{e}");
    assert!(!alive(pid), "a failed restore left process {pid}");
    // In its namespace it comes back.
    restore_detached(&img, &["--netns", &NetPair::path(&net.server)]);
    assert!(running(pid));
    kill(pid, "KILL");
    wait_gone(pid);
    // And in a fresh one, made by the restore, which holds its address.
    let fresh = format!("ffresh{}", std::process::id());
    restore_detached(&img, &["--netns", &format!("new:{fresh}")]);
    assert!(running(pid));
    let c = NetPair::connect(&fresh, &format!("{}:{port}", net.server_ip));
    drop(c);
    kill(pid, "KILL");
    let _ = Command::new("ip").args(["netns", "del", &fresh]).status();
    let _ = std::fs::remove_dir_all(&dir);
}

/// UDP over IPv6 (bound, and connected), a seqpacket pair with messages queued, a file in
/// flight on a Unix socket (SCM_RIGHTS, with its offset), and the UTS and IPC namespaces the
/// tree made (with its host name) survive.
#[test]
fn udp6_seqpacket_and_uts_namespace_survive() {
    let dir = tmpdir("udp6");
    let port = free_port(4);
    let flight = dir.join("flight.txt");
    let flight = flight.display();
    let code = format!(
        r#"import socket, signal, time
P = {port}
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.bind(('::1', P))
u6c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6c.connect(('::1', P))
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.send(b'one'); a.send(b'two-two')
import os
fa, fb = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
f = open('{flight}', 'w+'); f.write('inflight-data'); f.flush(); f.seek(3)
socket.send_fds(fa, [b'with-fd'], [f.fileno()])
f.close()
def check(*_):
    try:
        msg, fds, _, _ = socket.recv_fds(fb, 100, 2)
        assert msg == b'with-fd' and len(fds) == 1, 'file in flight'
        assert os.lseek(fds[0], 0, os.SEEK_CUR) == 3, 'offset of the file in flight'
        assert os.pread(fds[0], 8, 0) == b'inflight', 'content of the file in flight'
        assert b.recv(100) == b'one', 'first message'
        assert b.recv(100) == b'two-two', 'second message'
        u6c.send(b'six')
        assert u6.recv(10) == b'six', 'udp6'
        assert u6c.getpeername()[:2] == ('::1', P), 'udp6 peer'
        assert socket.gethostname() == 'ferry-uts', 'host name'
        print('PASS', flush=True)
    except Exception as e:
        print('FAIL', repr(e), flush=True)
signal.signal(signal.SIGUSR1, check)
print('ready', flush=True)
while True:
    time.sleep(1)
"#
    );
    let mut c = Command::new("unshare");
    c.args(["--uts", "--ipc", "--mount", "--", "sh", "-c"])
        .arg("hostname ferry-uts && exec python3 -c \"$0\"")
        .arg(&code);
    let out = dir.join("out.txt");
    let mut p = start_cmd(c, &out);
    wait_for(&out, "ready");
    let pid = p.id();
    let img = dir.join("img");
    dump_ok(pid, &img);
    p.wait().unwrap();
    wait_gone(pid);
    restore_detached(&img, &[]);
    let uts = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/uts")).unwrap();
    assert_ne!(
        uts(&pid.to_string()),
        uts("self"),
        "no UTS namespace of its own"
    );
    let mnt = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        mnt(&pid.to_string()),
        mnt("self"),
        "no mount namespace of its own"
    );
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");
    kill(pid, "KILL");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files in flight on a Unix socket, not received before the dump: pipe ends (with their
/// buffered bytes; one the only reference left, one the same open file description as an
/// fd the process kept, both ends of another) and Unix sockets (one end of a socketpair
/// whose other end the process kept, both ends of another, each with bytes queued). After
/// the restore the process receives them and data flows through every one; what Ferry held
/// during the restore is closed (the pipes reach end of file). An eventfd in flight is
/// refused, naming the process and fd, and the process runs on.
#[test]
fn pipes_and_unix_sockets_in_flight_survive() {
    let dir = tmpdir("flight");
    let bin = build(&dir, "flightfds");
    let out = dir.join("out.txt");
    let mut child = start_cmd(Command::new(&bin), &out);
    let pid = child.id();
    wait_for(&out, "ready");
    let img = dir.join("img");
    dump_ok(pid, &img);
    child.wait().unwrap();
    wait_gone(pid);
    let show = ferry(&["image", "show", img.to_str().unwrap(), "--json"]);
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    // The carrier pair and both pairs in flight are in the image.
    let socks = v["processes"][0]["sockets"].as_array().unwrap();
    assert_eq!(socks.len(), 6, "{socks:?}");
    restore_detached(&img, &[]);
    kill(pid, "USR1");
    let s = wait_for(&out, "PASS");
    assert!(!s.contains("FAIL"), "{s}");

    // Refused: an eventfd in flight.
    let out = dir.join("ev.txt");
    let mut c = Command::new(&bin);
    c.arg("eventfd");
    let mut child = start_cmd(c, &out);
    wait_for(&out, "ready");
    let pid = child.id();
    let e = dump_err(pid, &dir.join("img2"));
    let ran_on = running(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        e.contains(&format!("process {pid}")) && e.contains("fd 4") && e.contains("eventfd"),
        "{e}"
    );
    assert!(ran_on, "the process did not run on after the refused dump");
    let _ = std::fs::remove_dir_all(&dir);
}
