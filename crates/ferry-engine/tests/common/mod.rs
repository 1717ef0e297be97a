//! A python3 fixture driven line by line over its stdin and stdout.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct Py {
    pub child: Child,
    pub pid: i32,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Py {
    pub fn start(code: &str) -> Py {
        let mut child = Command::new("python3")
            .args(["-c", code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        Py {
            pid: child.id() as i32,
            child,
            stdin,
            out,
        }
    }

    /// The next line it prints, trimmed.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// Let it go on past its next `sys.stdin.readline()`.
    pub fn go(&mut self) {
        writeln!(self.stdin.as_mut().unwrap()).unwrap();
    }

    /// Let it go on and expect it to end well.
    pub fn finish(mut self) {
        self.go();
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}
