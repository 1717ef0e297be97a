//! TLS (rustls with the `ring` provider) for both of an agent's listeners: the HTTP/JSON API
//! and the page stream. The agent loads a certificate and its key (`ServerTls`); a source
//! trusts one CA file (`ClientTls`) and checks that the agent's certificate is made out to the
//! host name or address it dials.
//!
//! `Conn` is one page-stream connection, plain or TLS. A rustls stream cannot be cloned like a
//! `TcpStream`, so `Conn` hands out a reader and a writer that share the TLS state behind a
//! mutex. A reader waiting for the peer does not hold that mutex (it waits on the socket
//! itself, bounded by the socket's read timeout), so a writer on another thread is never held
//! up by a read.

use crate::{io, MigrateError, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| MigrateError::Failed(format!("reading {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(MigrateError::Failed(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The agent's side: its certificate (with any intermediates) and private key.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    cert: PathBuf,
}

impl ServerTls {
    /// Load a PEM certificate chain and its PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls> {
        let chain = certs(cert, "the TLS certificate")?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            MigrateError::Failed(format!("reading the TLS key {}: {e}", key.display()))
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| MigrateError::Failed(format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                MigrateError::Failed(format!(
                    "the TLS certificate {} and key {} do not make a usable pair: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
        let mut config = config;
        // No session resumption: tickets would only be bytes a source never reads (and
        // unread bytes at close turn into a reset that can cut off what we sent last).
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            config: Arc::new(config),
            cert: cert.to_path_buf(),
        })
    }

    /// The certificate file, for messages.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

/// The source's side: the CA that signed the agents' certificates.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    roots: ureq::tls::RootCerts,
}

impl ClientTls {
    /// Trust the PEM certificates in `ca` (and nothing else).
    pub fn load(ca: &Path) -> Result<ClientTls> {
        let certs = certs(ca, "the CA file")?;
        let mut store = RootCertStore::empty();
        for c in &certs {
            store.add(c.clone()).map_err(|e| {
                MigrateError::Failed(format!(
                    "the CA file {} holds a certificate that cannot be a trust anchor: {e}",
                    ca.display()
                ))
            })?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| MigrateError::Failed(format!("TLS setup: {e}")))?
            .with_root_certificates(store)
            .with_no_client_auth();
        let roots = ureq::tls::RootCerts::new_with_certs(
            &certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c).to_owned())
                .collect::<Vec<_>>(),
        );
        Ok(ClientTls {
            config: Arc::new(config),
            roots,
        })
    }
}

/// The agent address and the TLS options must agree: `https://` with a CA, `http://` without.
pub(crate) fn check_address(to: &str, tls: Option<&ClientTls>) -> Result<()> {
    match (to.starts_with("https://"), tls.is_some()) {
        (true, false) => Err(MigrateError::Failed(format!(
            "the agent address {to} is https:// but no CA to check its certificate was given \
             (--tls-ca CA.pem)"
        ))),
        (false, true) => Err(MigrateError::Failed(format!(
            "--tls-ca is given but the agent address {to} is not https://; use \
             https://HOST:PORT"
        ))),
        _ => Ok(()),
    }
}

/// ureq's TLS settings: rustls with ring, trusting only the CA given. Without one no server
/// is trusted, so an https:// address fails cleanly instead of falling back to other roots.
pub(crate) fn ureq_config(tls: Option<&ClientTls>) -> ureq::tls::TlsConfig {
    let roots = match tls {
        Some(t) => t.roots.clone(),
        None => ureq::tls::RootCerts::new_with_certs(&[]),
    };
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(roots)
        .unversioned_rustls_crypto_provider(provider())
        .build()
}

/// What a TLS failure means for someone running `ferry migrate`.
fn tls_hint(e: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            format!("the agent's certificate is not signed by the CA given with --tls-ca ({e})")
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the agent's certificate is not made out to the host name or address in the agent \
             address ({e})"
        ),
        E::InvalidCertificate(_) => format!("the agent's certificate was refused: {e}"),
        E::InvalidMessage(_) => {
            format!("not a TLS peer: {e} (is the agent started with --tls-cert and --tls-key?)")
        }
        _ => format!("TLS: {e}"),
    }
}

fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>())
}

/// An API call's failure in words: TLS problems and the agent's refusals explained.
pub(crate) fn explain(e: &ureq::Error) -> String {
    match e {
        ureq::Error::StatusCode(426) => "the agent serves its API over TLS only (HTTP 426): use \
             an https:// agent address and --tls-ca CA.pem"
            .into(),
        ureq::Error::StatusCode(401) => {
            "the agent refused the token (HTTP 401): missing or wrong --token-file".into()
        }
        ureq::Error::Rustls(r) => tls_hint(r),
        ureq::Error::Io(io) => match rustls_error(io) {
            Some(r) => tls_hint(r),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// The TLS half of a connection: rustls' state and the bytes read from the socket that
/// rustls has not taken yet.
struct Tls {
    conn: rustls::Connection,
    inbox: BufReader<TcpStream>,
}

impl Tls {
    /// Hand what the socket has to rustls and decrypt it. Called only once the socket is known
    /// to be readable (or `inbox` holds bytes), so it does not block.
    fn feed(&mut self) -> std::io::Result<()> {
        self.conn.read_tls(&mut self.inbox)?;
        if let Err(e) = self.conn.process_new_packets() {
            // Tell the peer why (an alert), as far as it can still be told.
            let _ = self.conn.write_tls(self.inbox.get_mut());
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        Ok(())
    }
}

/// One handle on a connection: its own descriptor of the socket and, for TLS, the shared state.
struct Link {
    sock: TcpStream,
    tls: Option<Arc<Mutex<Tls>>>,
}

fn lock(t: &Mutex<Tls>) -> MutexGuard<'_, Tls> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    fn dup(&self) -> std::io::Result<Link> {
        Ok(Link {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.sock.read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut t = lock(tls);
                match t.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            "the peer closed the connection (without a TLS close_notify)",
                        ))
                    }
                    Err(e) => return Err(e),
                }
                if !t.inbox.buffer().is_empty() {
                    t.feed()?;
                    continue;
                }
            }
            // Nothing decrypted and nothing buffered: wait for the peer without the lock. The
            // socket's read timeout bounds the wait (an error, as on a plain stream); end of
            // stream returns at once and `feed` records it.
            self.sock.peek(&mut [0u8; 1])?;
            lock(tls).feed()?;
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.sock.write(buf);
        };
        let mut t = lock(tls);
        loop {
            let n = t.conn.writer().write(buf)?;
            while t.conn.wants_write() {
                if t.conn.write_tls(&mut self.sock)? == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
            }
            // rustls takes nothing only while its outgoing buffer is full, and it is empty now.
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(tls) = &self.tls {
            let mut t = lock(tls);
            while t.conn.wants_write() {
                if t.conn.write_tls(&mut self.sock)? == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
            }
        }
        self.sock.flush()
    }
}

/// A page-stream connection, plain TCP or TLS. `reader()` and `writer()` give handles that can
/// be used from other threads; the socket options apply to all of them (one socket).
pub struct Conn {
    link: Link,
}

fn handshake(
    mut conn: rustls::Connection,
    mut sock: TcpStream,
    peer: &str,
) -> Result<Arc<Mutex<Tls>>> {
    let what = || format!("TLS handshake on the page stream with {peer}");
    let client = matches!(conn, rustls::Connection::Client(_));
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| match rustls_error(&e) {
                // The source gets the hints meant for `ferry migrate`; the agent, what
                // rustls says (a client that does not trust us shows as an alert).
                Some(r) if client => MigrateError::Failed(format!("{}: {}", what(), tls_hint(r))),
                Some(r) => MigrateError::Failed(format!("{}: {r}", what())),
                None => MigrateError::Io {
                    what: what(),
                    source: e,
                },
            })?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(io(what()))?;
    }
    // Take a whole buffered write (up to 1 MiB) at once: fewer, larger socket writes.
    conn.set_buffer_limit(Some(1 << 20));
    Ok(Arc::new(Mutex::new(Tls {
        conn,
        inbox: BufReader::with_capacity(256 << 10, sock),
    })))
}

impl Conn {
    /// The agent's side of an accepted connection: TLS when `tls` is given (the handshake is
    /// done here, bounded by the socket's timeouts), else plain.
    pub fn accept(sock: TcpStream, tls: Option<&ServerTls>) -> Result<Conn> {
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let tls = match tls {
            None => None,
            Some(t) => {
                let c = ServerConnection::new(t.config.clone())
                    .map_err(|e| MigrateError::Failed(format!("TLS setup: {e}")))?;
                Some(handshake(
                    c.into(),
                    sock.try_clone().map_err(io("dup of the socket"))?,
                    &peer,
                )?)
            }
        };
        Ok(Conn {
            link: Link { sock, tls },
        })
    }

    /// The source's side of a connection to `addr` (`HOST:PORT`, as dialed): TLS when `tls` is
    /// given, checking that the agent's certificate is made out to HOST; else plain.
    pub fn connect(sock: TcpStream, tls: Option<&ClientTls>, addr: &str) -> Result<Conn> {
        let tls = match tls {
            None => None,
            Some(t) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_string()).map_err(|e| {
                    MigrateError::Failed(format!(
                        "{host:?} cannot name a TLS server (for the page stream): {e}"
                    ))
                })?;
                let c = ClientConnection::new(t.config.clone(), name)
                    .map_err(|e| MigrateError::Failed(format!("TLS setup: {e}")))?;
                Some(handshake(
                    c.into(),
                    sock.try_clone().map_err(io("dup of the socket"))?,
                    addr,
                )?)
            }
        };
        Ok(Conn {
            link: Link { sock, tls },
        })
    }

    pub fn is_tls(&self) -> bool {
        self.link.tls.is_some()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.link.sock.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.link.sock.set_write_timeout(t)
    }

    pub fn set_nodelay(&self, on: bool) -> std::io::Result<()> {
        self.link.sock.set_nodelay(on)
    }

    /// Shut the socket down (as `TcpStream::shutdown`): a reader blocked on it returns. No
    /// TLS close_notify is sent.
    pub fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.link.sock.shutdown(how)
    }

    /// A handle that reads from this connection.
    pub fn reader(&self) -> std::io::Result<ConnReader> {
        Ok(ConnReader(self.link.dup()?))
    }

    /// A handle that writes to this connection.
    pub fn writer(&self) -> std::io::Result<ConnWriter> {
        Ok(ConnWriter(self.link.dup()?))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.link.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.link.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.link.flush()
    }
}

/// The reading handle of a `Conn`.
pub struct ConnReader(Link);

impl ConnReader {
    /// The connection's read timeout (one socket: it applies to every handle).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.sock.set_read_timeout(t)
    }

    /// Whether a read would return without waiting for the socket: TLS holds bytes already
    /// taken from it (or an error to report), or the socket itself has data.
    pub fn has_data(&self) -> bool {
        if let Some(t) = &self.0.tls {
            let mut t = lock(t);
            if !t.inbox.buffer().is_empty()
                || t.conn
                    .process_new_packets()
                    .map_or(true, |s| s.plaintext_bytes_to_read() > 0)
            {
                return true;
            }
        }
        ferry_sys::net::readable_now(&self.0.sock)
    }
}

impl AsRawFd for ConnReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.sock.as_raw_fd()
    }
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

/// The writing handle of a `Conn`.
pub struct ConnWriter(Link);

impl ConnWriter {
    /// The connection's write timeout (one socket: it applies to every handle).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.sock.set_write_timeout(t)
    }
}

impl Write for ConnWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The HTTP API: plain (`axum::serve` on the listener) or TLS (`TlsListener`).
pub(crate) async fn serve_api(
    l: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<ServerTls>,
) -> Result<()> {
    match tls {
        None => axum::serve(l, app).await,
        Some(t) => {
            eprintln!(
                "ferry agent: TLS on the API and the page stream (certificate {})",
                t.cert_path().display()
            );
            axum::serve(TlsListener::start(l, t.config)?, app).await
        }
    }
    .map_err(io("serving the API"))
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Longest a client may take to finish its handshake on the API.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An `axum::serve` listener that yields TLS streams. Connections are accepted and their
/// handshakes done on tasks of their own, so a slow or hostile client holds up no other.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    /// Start accepting on `l` (from within a Tokio runtime).
    pub fn start(l: tokio::net::TcpListener, config: Arc<ServerConfig>) -> Result<TlsListener> {
        let local = l.local_addr().map_err(io("API listener"))?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little, as axum does.
                        eprintln!("ferry agent: accepting an API connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        let mut first = [0u8; 1];
                        let n = sock.peek(&mut first).await?;
                        if n == 1 && first[0] != TLS_HANDSHAKE {
                            refuse_plain_http(sock).await;
                            return Ok(None);
                        }
                        acceptor.accept(sock).await.map(Some)
                    })
                    .await;
                    match hs {
                        Ok(Ok(Some(s))) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => eprintln!(
                            "ferry agent: TLS handshake with {peer} on the API: the client \
                             closed the connection (does it trust our certificate?)"
                        ),
                        Ok(Err(e)) => {
                            eprintln!("ferry agent: TLS handshake with {peer} on the API: {e}")
                        }
                        Err(_) => eprintln!(
                            "ferry agent: TLS handshake with {peer} on the API: no handshake \
                             within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

/// A plain HTTP request on the TLS port: answer in plain HTTP why it is refused (426, RFC
/// 9110), so that the client shows a reason instead of a garbled stream.
async fn refuse_plain_http(mut sock: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read the request head first: closing with unread bytes would reset the connection and
    // the answer could be lost.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while head.len() < 64 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = r#"{"error": "this agent serves its API over TLS only: use https://"}"#;
    let resp = format!(
        "HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.3\r\nConnection: Upgrade, close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accepting task is gone (it never ends while we exist): wait forever, as a
            // listener with no more connections would.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> tokio::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};

    fn openssl(dir: &Path, args: &[&str]) {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("the openssl command (.ci/run installs it)");
        assert!(st.success(), "openssl {args:?}");
    }

    /// A CA `NAME-ca.pem` and a certificate `NAME.pem` (key `NAME.key`) it signed for
    /// 127.0.0.1, in a fresh directory.
    fn pki(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=ferry test CA"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&d, &ca);
        let mut req = vec!["req", "-subj", "/CN=agent", "-keyout", "agent.key"];
        req.extend(ec);
        req.extend(["-out", "agent.csr"]);
        openssl(&d, &req);
        std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                "agent.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "agent.pem",
            ],
        );
        d
    }

    fn server(d: &Path) -> ServerTls {
        ServerTls::load(&d.join("agent.pem"), &d.join("agent.key")).unwrap()
    }

    /// An agent-side connection on a thread of its own running `f`; returns the address.
    fn serve_one(
        tls: Option<ServerTls>,
        f: impl FnOnce(Result<Conn>) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            f(Conn::accept(s, tls.as_ref()))
        });
        (addr, h)
    }

    fn dial(addr: &str, tls: Option<&ClientTls>) -> Result<Conn> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn::connect(s, tls, addr)
    }

    /// Frames travel both ways over TLS through the reader and writer handles; a reader
    /// waiting for the peer does not hold up a writer on another thread; read timeouts apply.
    #[test]
    fn the_page_stream_runs_over_tls() {
        let d = pki("ok");
        let (addr, h) = serve_one(Some(server(&d)), |c| {
            let mut c = c.unwrap();
            assert!(c.is_tls());
            let mut rd = c.reader().unwrap();
            let mut buf = crate::wire::FrameBuf::default();
            for i in 0..50u32 {
                assert_eq!(
                    crate::wire::read_frame(&mut rd, &mut buf).unwrap(),
                    Kind::Pages
                );
                assert_eq!(buf.len(), 100_000 + i as usize);
                assert!(buf.iter().all(|&b| b == i as u8));
            }
            // Answer only after the client's "ping", which it writes while its reader waits.
            assert_eq!(
                crate::wire::read_frame(&mut rd, &mut buf).unwrap(),
                Kind::Go
            );
            crate::wire::write_frame(&mut c, Kind::Done, &[b"pong"]).unwrap();
            // Then wait for the client to hang up.
            let _ = crate::wire::read_frame(&mut rd, &mut buf);
        });
        let ca = ClientTls::load(&d.join("ca.pem")).unwrap();
        let c = dial(&addr, Some(&ca)).unwrap();
        let mut w = std::io::BufWriter::new(c.writer().unwrap());
        for i in 0..50u32 {
            let data = vec![i as u8; 100_000 + i as usize];
            crate::wire::write_frame(&mut w, Kind::Pages, &[&data]).unwrap();
        }
        w.flush().unwrap();
        let mut rd = std::io::BufReader::new(c.reader().unwrap());
        let waiting = std::thread::spawn(move || {
            let mut buf = crate::wire::FrameBuf::default();
            let k = crate::wire::read_frame(&mut rd, &mut buf).unwrap();
            (k, buf, rd)
        });
        std::thread::sleep(Duration::from_millis(200));
        let t = std::time::Instant::now();
        crate::wire::write_frame(&mut w, Kind::Go, &[]).unwrap();
        w.flush().unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "the writer waited");
        let (k, buf, rd) = waiting.join().unwrap();
        assert_eq!((k, &buf[..]), (Kind::Done, &b"pong"[..]));
        // Nothing more comes: a short read timeout ends the wait with an error, as on a
        // plain socket.
        rd.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut rd = rd;
        let t = std::time::Instant::now();
        let e = rd.read(&mut [0u8; 1]).expect_err("no data, a timeout");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop((rd, w, c));
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A source that writes and hangs up at once, never reading: everything it wrote arrives
    /// (the agent sends nothing unasked, such as session tickets, whose being unread at the
    /// close would reset the connection and cut the stream short).
    #[test]
    fn a_source_that_hangs_up_at_once_loses_nothing() {
        let d = pki("close");
        let (tx, rx) = std::sync::mpsc::channel();
        let (addr, h) = serve_one(Some(server(&d)), move |c| {
            let mut rd = std::io::BufReader::new(c.unwrap().reader().unwrap());
            let (mut buf, mut n) = (crate::wire::FrameBuf::default(), 0);
            while crate::wire::read_frame(&mut rd, &mut buf).is_ok() {
                n += buf.len();
            }
            tx.send(n).unwrap();
        });
        let ca = ClientTls::load(&d.join("ca.pem")).unwrap();
        let c = dial(&addr, Some(&ca)).unwrap();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, c.writer().unwrap());
        let data = vec![5u8; 4 << 20];
        for _ in 0..16 {
            crate::wire::write_frame(&mut w, Kind::Pages, &[&data]).unwrap();
        }
        w.flush().unwrap();
        drop((w, c));
        assert_eq!(rx.recv().unwrap(), 64 << 20);
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A shutdown ends a read that waits for the peer, on TLS as on plain TCP.
    #[test]
    fn shutdown_ends_a_waiting_read() {
        let d = pki("shut");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (addr, h) = serve_one(Some(server(&d)), move |c| {
            let _c = c.unwrap();
            let _ = rx.recv();
        });
        let ca = ClientTls::load(&d.join("ca.pem")).unwrap();
        let c = dial(&addr, Some(&ca)).unwrap();
        let mut rd = c.reader().unwrap();
        let t = std::time::Instant::now();
        let waiting = std::thread::spawn(move || rd.read(&mut [0u8; 16]));
        std::thread::sleep(Duration::from_millis(200));
        c.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(waiting.join().unwrap().is_err());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        tx.send(()).unwrap();
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A source that trusts another CA refuses the agent in the handshake, before any byte
    /// of the stream; the agent sees the handshake fail too.
    #[test]
    fn a_wrong_ca_fails_the_handshake() {
        let (d, other) = (pki("agent"), pki("other"));
        let (addr, h) = serve_one(Some(server(&d)), |c| {
            let e = c.err().expect("the agent's handshake must fail");
            assert!(e.to_string().contains("TLS handshake"), "{e}");
        });
        let ca = ClientTls::load(&other.join("ca.pem")).unwrap();
        let e = dial(&addr, Some(&ca))
            .err()
            .expect("a handshake with the wrong CA");
        let msg = e.to_string();
        assert!(
            msg.contains("TLS handshake") && msg.contains("not signed by the CA"),
            "{msg}"
        );
        h.join().unwrap();
        // The right CA, but a name the certificate is not made out to.
        let (addr, h) = serve_one(Some(server(&d)), |c| assert!(c.is_err()));
        let ca = ClientTls::load(&d.join("ca.pem")).unwrap();
        let port = addr.rsplit_once(':').unwrap().1;
        let s = TcpStream::connect(&addr).unwrap();
        let e = Conn::connect(s, Some(&ca), &format!("localhost:{port}"))
            .err()
            .expect("a certificate for another name");
        assert!(e.to_string().contains("not made out to"), "{e}");
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&other);
    }

    /// A plain client on a TLS page stream, and a TLS client on a plain one: both refused.
    #[test]
    fn plain_and_tls_do_not_mix() {
        let d = pki("mix");
        let (addr, h) = serve_one(Some(server(&d)), |c| assert!(c.is_err()));
        let mut c = dial(&addr, None).unwrap();
        let _ = c.write_all(crate::wire::GREETING);
        let mut b = [0u8; 16];
        // The agent answers with an alert at most and closes: never a frame.
        let n = c.read(&mut b).unwrap_or(0);
        assert!(n == 0 || b[0] == 0x15, "{:?}", &b[..n]);
        h.join().unwrap();
        let (addr, h) = serve_one(None, |c| {
            let mut c = c.unwrap();
            let mut b = [0u8; 8];
            let _ = c.read_exact(&mut b);
            assert_ne!(&b, crate::wire::GREETING);
        });
        let ca = ClientTls::load(&d.join("ca.pem")).unwrap();
        assert!(dial(&addr, Some(&ca)).is_err());
        h.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn loading_explains_bad_files() {
        let d = pki("files");
        let e = ClientTls::load(&d.join("ca.key")).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = ClientTls::load(&d.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        // The CA's key is not the certificate's.
        let e = ServerTls::load(&d.join("agent.pem"), &d.join("ca.key"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("do not make a usable pair"), "{e}");
        let tls = ClientTls::load(&d.join("ca.pem")).unwrap();
        assert!(check_address("https://h:1", Some(&tls)).is_ok());
        assert!(check_address("http://h:1", None).is_ok());
        assert!(check_address("https://h:1", None).is_err());
        assert!(check_address("http://h:1", Some(&tls)).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
