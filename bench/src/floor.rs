//! The floor under the relay's round trip: bare quinn, both ends in this process on
//! loopback, one stream, a signal-sized message out and an ack-sized answer back. What
//! Herald's signal → ack round trip adds on top of it is Herald's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Bytes out (about a signed signal) and back (about an ack).
const REQUEST: usize = 300;
const ANSWER: usize = 24;

/// Round trips of one request/answer exchange on one QUIC stream, `runs` times.
pub async fn quinn_round_trips(runs: usize) -> anyhow::Result<Vec<Duration>> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())?;
    server_tls.alpn_protocols = vec![b"floor".to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let server_addr = server.local_addr()?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"floor".to_vec()];
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;

    let echo = tokio::spawn(async move {
        let connection = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = connection.accept_bi().await?;
        let mut request = [0u8; REQUEST];
        while recv.read_exact(&mut request).await.is_ok() {
            send.write_all(&[1u8; ANSWER]).await?;
        }
        anyhow::Ok(())
    });
    let connection = client
        .connect_with(client_config, server_addr, "localhost")?
        .await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut answer = [0u8; ANSWER];
    let mut trips = Vec::with_capacity(runs);
    // The first exchanges open the stream and settle the congestion window; not timed.
    for i in 0..runs + 10 {
        // Spaced like the relay's unicast runs (an API call between signals), so each
        // exchange starts on a quiet connection, not back to back.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let t0 = Instant::now();
        send.write_all(&[0u8; REQUEST]).await?;
        recv.read_exact(&mut answer).await?;
        if i >= 10 {
            trips.push(t0.elapsed());
        }
    }
    send.finish()?;
    connection.close(0u32.into(), b"done");
    echo.abort();
    client.wait_idle().await;
    Ok(trips)
}
