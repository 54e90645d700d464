//! Serves the admin API and console router over TLS (tokio-rustls + hyper), since
//! axum's own `serve` speaks plain HTTP only, and in plain HTTP on loopback for a
//! reverse proxy that terminates TLS (`[https] plain_http_listen`).
//!
//! The listener is public, so it bounds what one client can hold: at most
//! [`MAX_CONNECTIONS`] connections at once (a new one beyond that is closed at once),
//! [`TLS_HANDSHAKE_TIMEOUT`] to finish the handshake and [`HEADER_READ_TIMEOUT`] to
//! send a request's headers, also between the requests of a kept-alive connection.
//!
//! Which certificate: agents pin Herald's CA, browsers want a public one. With
//! `[https] cert_file`, [`Certificates`] presents that certificate to clients that ask
//! (by SNI) for a name it covers, and Herald's `server.pem` to everyone else: clients
//! that send no SNI (any client connecting by IP address, such as the admin CLI on
//! `https://127.0.0.1:8443`) or another name (agents downloading from
//! `[https] agent_url`). The configured files are read again on SIGHUP; a reload that
//! fails keeps the certificate in use.
//!
//! Who is asking: every request carries a [`ClientAddr`] in its extensions, the TCP
//! peer's address or, from a trusted proxy, the client its `X-Forwarded-For` names
//! (see [`client_addr`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::pki::{self, Pki};

/// Longest a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers (slowloris), and to start
/// the next request on a kept-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 4096;
/// The header in which reverse proxies name the client (each appends the address it
/// got the request from).
static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How much the listener lets clients hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    tls_handshake: Duration,
    header_read: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            tls_handshake: TLS_HANDSHAKE_TIMEOUT,
            header_read: HEADER_READ_TIMEOUT,
        }
    }
}

// === impl ClientAddr ===

/// The address of the client a request comes from: the TCP peer, or the client a
/// trusted proxy names. Every request served here carries one in its extensions; the
/// login throttle and the audit log read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

impl ClientAddr {
    /// The client's address from a request's extensions: [`ClientAddr`], or the bare
    /// TCP peer where a router is served without it (routers in unit tests).
    pub fn of(extensions: &axum::http::Extensions) -> Option<IpAddr> {
        if let Some(ClientAddr(ip)) = extensions.get::<ClientAddr>() {
            return Some(*ip);
        }
        extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|axum::extract::ConnectInfo(addr)| addr.ip())
    }
}

/// The client behind `peer`: `peer` itself unless it is within `trusted`; from a
/// trusted proxy, the right-most `X-Forwarded-For` entry that is not itself a trusted
/// proxy (each proxy appends its peer, so entries left of the first untrusted one may
/// be anything the client wrote). When every entry is trusted, the left-most. A
/// malformed entry met before an untrusted one, or no header, gives `peer`.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Several header lines read as one list, in order.
    let mut entries = Vec::new();
    for value in headers.get_all(&FORWARDED_FOR) {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        entries.extend(text.split(',').map(str::trim));
    }
    let mut leftmost = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = forwarded_ip(entry) else {
            return peer;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        leftmost = ip;
    }
    leftmost
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`,
/// `[::1]:5`), as some proxies write it.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

// === impl Certificates ===

/// Why the configured certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate, or one that does not parse.
    #[error("{path}: not a PEM certificate ({reason}); [https] cert_file wants the certificate chain, leaf first")]
    NotCertificate {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no usable PEM private key.
    #[error("{path}: not a usable PEM private key ({reason})")]
    NotKey {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{key} is not the private key of the certificate in {cert} ({reason})")]
    Mismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// Herald's own certificate cannot be used.
    #[error("Herald's server certificate: {0}")]
    Herald(rustls::Error),
}

/// The certificates the HTTPS listener presents: Herald's own, and optionally the
/// configured one for the names it covers, replaceable while serving.
#[derive(Debug)]
pub struct Certificates {
    herald: Arc<CertifiedKey>,
    configured: Option<Configured>,
}

#[derive(Debug)]
struct Configured {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificates {
    /// Herald's certificate, and the configured one read from `files` (cert, key).
    pub fn load(
        pki: &Pki,
        files: Option<(&Path, &Path)>,
    ) -> Result<Certificates, CertificateError> {
        let herald =
            CertifiedKey::from_der(pki.chain.clone(), pki.key.clone_key(), &pki::provider())
                .map_err(CertificateError::Herald)?;
        let configured = match files {
            Some((cert, key)) => Some(Configured {
                cert_file: cert.to_path_buf(),
                key_file: key.to_path_buf(),
                current: RwLock::new(Arc::new(read_pair(cert, key)?)),
            }),
            None => None,
        };
        Ok(Certificates {
            herald: Arc::new(herald),
            configured,
        })
    }

    /// Whether a certificate is configured.
    pub fn configured(&self) -> Option<(&Path, &Path)> {
        self.configured
            .as_ref()
            .map(|c| (c.cert_file.as_path(), c.key_file.as_path()))
    }

    /// Reads the configured files again and presents them from the next handshake on;
    /// on error the certificate in use stays. `Ok(false)` when none is configured.
    pub fn reload(&self) -> Result<bool, CertificateError> {
        let Some(configured) = &self.configured else {
            return Ok(false);
        };
        let fresh = read_pair(&configured.cert_file, &configured.key_file)?;
        *configured
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        Ok(true)
    }

    /// Whether the configured certificate is presented for `host` (a DNS name it
    /// covers); false for IP addresses, which clients send no SNI for.
    pub fn covers(&self, host: &str) -> bool {
        match &self.configured {
            Some(configured) => names(&configured.current(), host),
            None => false,
        }
    }

    /// The certificate for a client asking for `server_name`.
    fn choose(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        if let (Some(configured), Some(name)) = (&self.configured, server_name) {
            let current = configured.current();
            if names(&current, name) {
                return current;
            }
        }
        self.herald.clone()
    }

    /// The TLS configuration of the HTTPS listener, presenting these certificates.
    pub fn tls_config(self: Arc<Self>) -> Result<rustls::ServerConfig, CertificateError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()
            .map_err(CertificateError::Herald)?
            .with_no_client_auth()
            .with_cert_resolver(self);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tls)
    }
}

impl Configured {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(client_hello.server_name()))
    }
}

/// Whether `key`'s leaf certificate is valid for the DNS name `host`.
fn names(key: &CertifiedKey, host: &str) -> bool {
    let (Ok(name), Some(leaf)) = (ServerName::try_from(host), key.cert.first()) else {
        return false;
    };
    if !matches!(name, ServerName::DnsName(_)) {
        return false;
    }
    ParsedCertificate::try_from(leaf)
        .and_then(|cert| rustls::client::verify_server_name(&cert, &name))
        .is_ok()
}

/// Reads a PEM certificate chain and its key, checking that they belong together.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertificateError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertificateError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let not_cert = |reason: String| CertificateError::NotCertificate {
        path: cert_path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_cert(e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(not_cert("no CERTIFICATE block".into()));
    };
    ParsedCertificate::try_from(leaf).map_err(|e| not_cert(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertificateError::NotKey {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = pki::provider();
    let signing =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertificateError::NotKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        // A key type whose public half rustls cannot derive: the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(e) => Err(CertificateError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

// === serving ===

/// What a listener serves: the router, and whom to believe about client addresses.
#[derive(Clone)]
pub struct Site {
    /// The API and console.
    pub router: Router,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<Vec<IpNet>>,
}

/// Accepts connections until `shutdown` resolves: HTTPS with `tls`, plain HTTP
/// without (only ever bound to loopback, see `[https] plain_http_listen`).
pub async fn serve(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    site: Site,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, tls, site, shutdown, Limits::default()).await
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    site: Site,
    shutdown: impl std::future::Future<Output = ()>,
    limits: Limits,
) {
    let acceptor = tls.map(|tls| TlsAcceptor::from(Arc::new(tls)));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    debug!("accept failed: {e}");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        // Over the cap, the new connection is dropped (closed) rather than queued:
        // queued sockets would still hold descriptors and memory.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%remote, "connection refused: too many connections");
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let site = site.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                return connection(http, tcp, remote, site).await;
            };
            match tokio::time::timeout(limits.tls_handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => connection(http, tls, remote, site).await,
                Ok(Err(e)) => debug!(%remote, "TLS handshake failed: {e}"),
                Err(_) => {}
            }
        });
    }
}

/// Serves the requests of one connection, each with its [`ClientAddr`].
async fn connection(
    http: hyper::server::conn::http1::Builder,
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    remote: SocketAddr,
    site: Site,
) {
    let Site {
        router,
        trusted_proxies,
    } = site;
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let client = client_addr(remote.ip(), request.headers(), &trusted_proxies);
            request.extensions_mut().insert(ClientAddr(client));
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(remote));
            tower::ServiceExt::oneshot(router.clone(), request)
        });
    // HTTP/1.1 only: that is all the TLS configuration offers (ALPN), and the version
    // sniffing of an "auto" connection would wait for a silent client before any
    // header timeout runs.
    // With upgrades: a WebSocket to a shared web service (`/p/…`) is passed through.
    if let Err(e) = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        debug!(%remote, "HTTP connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::http::HeaderValue;
    use axum::routing::get;
    use axum::Extension;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::TlsConnector;

    use super::*;

    /// A listener on loopback with the server's own certificates, answering `/` with
    /// the client address it was told.
    struct Listener {
        addr: SocketAddr,
        connector: TlsConnector,
        _stop: oneshot::Sender<()>,
        dir: std::path::PathBuf,
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn listen(limits: Limits) -> Listener {
        let dir = std::env::temp_dir().join(format!(
            "herald-https-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        crate::pki::create(&dir, &[]).unwrap();
        let pki = crate::pki::load(&dir).unwrap();
        let tls = Arc::new(Certificates::load(&pki, None).unwrap())
            .tls_config()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router =
            Router::new().route(
                "/",
                get(
                    |Extension(ClientAddr(ip)): Extension<ClientAddr>| async move {
                        format!("from {ip}")
                    },
                ),
            );
        let site = Site {
            router,
            trusted_proxies: Arc::new(Vec::new()),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            Some(tls),
            site,
            async move {
                let _ = stopped.await;
            },
            limits,
        ));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(crate::pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Listener {
            addr,
            connector: TlsConnector::from(Arc::new(client)),
            _stop: stop,
            dir,
        }
    }

    impl Listener {
        async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
            let tcp = TcpStream::connect(self.addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            self.connector.connect(name, tcp).await
        }
    }

    /// Reads until the peer closes the connection; false if it is still open at the
    /// deadline.
    async fn closed_within(stream: &mut TlsStream<TcpStream>, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_client_that_does_not_finish_its_headers_is_disconnected() {
        let listener = listen(Limits {
            header_read: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut stream = listener.connect().await.unwrap();
        // A whole request is answered, with the client address passed on.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&answer).contains("from 127.0.0.1") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        // Then half a request, and nothing more.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
        // A connection that never sends anything goes the same way.
        let mut silent = listener.connect().await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        let listener = listen(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let first = listener.connect().await.unwrap();
        let _second = listener.connect().await.unwrap();
        assert!(
            listener.connect().await.is_err(),
            "a third connection gets no TLS handshake"
        );
        // A place frees when a connection ends.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while listener.connect().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "no place freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(&FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_rightmost_address_a_trusted_proxy_did_not_add() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let proxy = ip("10.0.0.1");
        // Untrusted peers are taken as they are, whatever they claim.
        assert_eq!(
            client_addr(ip("198.51.100.7"), &forwarded(&["203.0.113.9"]), &proxies),
            ip("198.51.100.7")
        );
        // From a proxy: its client, or the client of a chain of proxies.
        assert_eq!(
            client_addr(proxy, &forwarded(&["203.0.113.9"]), &proxies),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_addr(proxy, &forwarded(&["203.0.113.9, 10.1.2.3"]), &proxies),
            ip("203.0.113.9")
        );
        // What the client wrote itself stays left of its own address.
        assert_eq!(
            client_addr(
                proxy,
                &forwarded(&["1.1.1.1, nonsense", "203.0.113.9"]),
                &proxies
            ),
            ip("203.0.113.9")
        );
        // Ports and IPv6 in brackets, as some proxies write them; mapped IPv4 peers.
        assert_eq!(
            client_addr(proxy, &forwarded(&["[2001:db8::5]:443"]), &proxies),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_addr(
                ip("::ffff:10.0.0.1"),
                &forwarded(&["203.0.113.9:1234"]),
                &proxies
            ),
            ip("203.0.113.9")
        );
        // Every entry a proxy: the left-most. No header: the proxy itself.
        assert_eq!(
            client_addr(proxy, &forwarded(&["10.9.9.9, ::1"]), &proxies),
            ip("10.9.9.9")
        );
        assert_eq!(client_addr(proxy, &HeaderMap::new(), &proxies), proxy);
        // Malformed where the client should be: the proxy, not a guess.
        assert_eq!(
            client_addr(proxy, &forwarded(&["203.0.113.9, bogus"]), &proxies),
            proxy
        );
        assert_eq!(client_addr(proxy, &forwarded(&[""]), &proxies), proxy);
        // Nobody trusted: the header means nothing.
        assert_eq!(client_addr(proxy, &forwarded(&["203.0.113.9"]), &[]), proxy);
    }

    /// A CA and a leaf for `names`, as PEM (cert chain, key) written into `dir`.
    fn public_pair(dir: &Path, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let cert_file = dir.join(format!("{tag}.pem"));
        let key_file = dir.join(format!("{tag}.key"));
        std::fs::write(&cert_file, leaf.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    fn herald_pki(dir: &Path) -> Pki {
        crate::pki::create(dir, &[]).unwrap();
        crate::pki::load(dir).unwrap()
    }

    #[test]
    fn the_configured_certificate_goes_to_the_names_it_covers_and_herald_s_to_the_rest() {
        let dir = scratch("resolve");
        let pki = herald_pki(&dir);
        let (cert, key) = public_pair(&dir, "public", &["console.example.org", "*.example.net"]);
        let certs = Certificates::load(&pki, Some((&cert, &key))).unwrap();
        let configured = certs.choose(Some("console.example.org")).cert[0].clone();
        assert_ne!(configured, pki.chain[0]);
        assert_eq!(certs.choose(Some("a.example.net")).cert[0], configured);
        for other in [None, Some("herald-server"), Some("other.example.org")] {
            assert_eq!(certs.choose(other).cert[0], pki.chain[0], "{other:?}");
        }
        assert!(certs.covers("console.example.org"));
        assert!(!certs.covers("127.0.0.1"));
        // Without a configured certificate, everyone gets Herald's.
        let plain = Certificates::load(&pki, None).unwrap();
        assert_eq!(
            plain.choose(Some("console.example.org")).cert[0],
            pki.chain[0]
        );
        assert!(!plain.reload().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unusable_certificate_files_are_refused_by_name_and_a_failed_reload_keeps_the_old() {
        let dir = scratch("files");
        let pki = herald_pki(&dir);
        let (cert, key) = public_pair(&dir, "one", &["console.example.org"]);
        let (_, other_key) = public_pair(&dir, "two", &["console.example.org"]);
        let missing = dir.join("missing.pem");
        let error = |cert: &Path, key: &Path| {
            Certificates::load(&pki, Some((cert, key)))
                .unwrap_err()
                .to_string()
        };
        assert!(
            error(&missing, &key).contains("cannot read"),
            "{}",
            error(&missing, &key)
        );
        assert!(
            error(&key, &key).contains("not a PEM certificate"),
            "{}",
            error(&key, &key)
        );
        assert!(error(&cert, &cert).contains("not a usable PEM private key"));
        let mismatch = error(&cert, &other_key);
        assert!(
            mismatch.contains("is not the private key of the certificate"),
            "{mismatch}"
        );

        let certs = Certificates::load(&pki, Some((&cert, &key))).unwrap();
        let before = certs.choose(Some("console.example.org")).cert[0].clone();
        std::fs::write(&cert, "garbage").unwrap();
        assert!(certs.reload().is_err());
        assert_eq!(certs.choose(Some("console.example.org")).cert[0], before);
        let (fresh_cert, fresh_key) = public_pair(&dir, "three", &["console.example.org"]);
        std::fs::rename(fresh_cert, &cert).unwrap();
        std::fs::rename(fresh_key, &key).unwrap();
        assert!(certs.reload().unwrap());
        assert_ne!(certs.choose(Some("console.example.org")).cert[0], before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "herald-https-{name}-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
