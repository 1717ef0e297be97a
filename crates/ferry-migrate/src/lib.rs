//! Live migration. An agent runs on every host: it publishes the host's CPU profile, receives
//! migrations and rebuilds them (HTTP/JSON control API, plus a separate checksummed stream
//! for memory and the image). `migrate` is the source side: compatibility gate, pre-copy
//! rounds with write tracking, the final frozen dump streamed to the agent, and a handshake
//! so that the process ends up running on exactly one host.

pub mod agent;
pub mod api;
pub mod netmove;
pub mod postcopy;
pub mod source;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod wire;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Engine(#[from] ferry_engine::EngineError),
    #[error(transparent)]
    Image(#[from] ferry_image::ImageError),
    #[error("{0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The destination's CPU cannot run the process; the verdict holds the evidence.
    #[error("refused: {0}")]
    Incompatible(String),
    #[error("{0}")]
    Failed(String),
    /// The agent said it failed (a Failed frame): it dropped what it built first.
    #[error("{0}")]
    AgentFailed(String),
}

pub type Result<T> = std::result::Result<T, MigrateError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}
