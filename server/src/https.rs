//! Serves the admin API router over TLS (tokio-rustls + hyper), since axum's own
//! `serve` speaks plain HTTP only.
//!
//! The listener is public, so it bounds what one client can hold: at most
//! [`MAX_CONNECTIONS`] connections at once (a new one beyond that is closed at once),
//! [`TLS_HANDSHAKE_TIMEOUT`] to finish the handshake and [`HEADER_READ_TIMEOUT`] to
//! send a request's headers, also between the requests of a kept-alive connection.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

/// Longest a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers (slowloris), and to start
/// the next request on a kept-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 4096;

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

/// Accepts HTTPS connections until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, tls, router, shutdown, Limits::default()).await
}

async fn serve_with(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
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
        let router = router.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.tls_handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            // The console's per-address login throttle reads the client address.
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(remote));
                    tower::ServiceExt::oneshot(router.clone(), request)
                },
            );
            // HTTP/1.1 only: that is all the TLS configuration offers (ALPN), and the
            // version sniffing of an "auto" connection would wait for a silent client
            // before any header timeout runs.
            if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
                debug!(%remote, "HTTP connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
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
        let tls = crate::pki::https_config(&pki).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/",
            get(|ConnectInfo(remote): ConnectInfo<SocketAddr>| async move {
                format!("from {}", remote.ip())
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            tls,
            router,
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
}
