//! The traffic block of a live migration, installed while the process runs and filled at the
//! freeze: a real python3 listener and a connection to it. While prepared, nothing is
//! blocked; once applied, the connection's packets and new SYNs are dropped; once lifted,
//! both work again and the table goes. A table that vanished in between (a firewall reload)
//! is made anew at the freeze.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

const PY: &str = r#"
import socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
print("accepted", flush=True)
while True:
    d = c.recv(100)
    if not d:
        break
    c.sendall(d)
"#;

fn table_listed(name: &str) -> bool {
    let o = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).contains(name)
}

/// An echo over `c` within `ms`: true if it came back.
fn echoes(c: &mut TcpStream, ms: u64) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).is_ok()
}

fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

#[test]
fn a_prepared_block_blocks_nothing_until_applied_and_survives_a_flush() {
    for vanished in [false, true] {
        let mut py = common::Py::start(PY);
        let port: u16 = py.line().parse().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut c = TcpStream::connect(addr).unwrap();
        assert_eq!(py.line(), "accepted");
        let table = format!("ferry_test_{}", py.pid);

        let prepared = ferry_engine::netblock::prepare(&[py.pid], &table).unwrap();
        assert!(table_listed(&table), "no table after prepare");
        assert!(echoes(&mut c, 5000), "a prepared block dropped traffic");
        if vanished {
            assert!(ferry_sys::nft::delete_table(&table).unwrap());
        }

        // The freeze: the connection and the listener go into the sets.
        let mut st = ferry_engine::sockets::DumpState::default();
        st.blocks = prepared.take();
        ferry_engine::sockets::plan_blocks(&mut st, &[py.pid]).unwrap();
        ferry_engine::netblock::apply(&mut st.blocks, &table).unwrap();
        assert!(!echoes(&mut c, 300), "the connection was not blocked");
        assert!(!connects(addr), "a new connection got through the block");

        ferry_engine::netblock::lift(&mut st.blocks, &table);
        ferry_engine::netblock::finish_lifts();
        assert!(!table_listed(&table), "the table outlived its lift");
        // The byte held back by the block is retransmitted: two echoes now.
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert!(echoes(&mut c, 5000), "traffic still blocked after the lift");
        drop(c);
        let _ = py.child.kill();
        let _ = py.child.wait();
    }
}

/// A prepared block dropped unused deletes its table.
#[test]
fn an_unused_prepared_block_leaves_no_table() {
    let mut py = common::Py::start(PY);
    let port: u16 = py.line().parse().unwrap();
    let table = format!("ferry_test_{}", py.pid);
    let prepared = ferry_engine::netblock::prepare(&[py.pid], &table).unwrap();
    assert!(table_listed(&table));
    drop(prepared);
    ferry_engine::netblock::finish_lifts();
    assert!(!table_listed(&table));
    assert!(connects(SocketAddr::from(([127, 0, 0, 1], port))));
    let _ = py.child.kill();
    let _ = py.child.wait();
}
