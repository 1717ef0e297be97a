use std::io;

/// Errors of the Linux layer. Each names the process or thread it concerns, so that a
/// caller can print it as a one-line diagnosis.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    #[error("process {0} is a zombie: it has exited and holds no code or memory")]
    Zombie(i32),
    #[error(
        "process {0}'s main thread has exited (pthread_exit) while its other threads run on \
         (a zombie thread): this version cannot carry such a process"
    )]
    ZombieLeader(i32),
    #[error("process {pid} is already traced by process {tracer}; detach that tracer first")]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("permission denied on process {pid}: {what}")]
    Permission { pid: i32, what: String },
    #[error("{what} (thread {tid}): {source}")]
    Ptrace {
        what: &'static str,
        tid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
