//! Direct tunnels: one agent reaching another's share over a QUIC connection of their
//! own, when the providing agent is reachable, instead of through the server.
//!
//! The server still brokers every direct tunnel: it checks the consumer may reach the
//! share, tells the provider to *expect* that consumer agent for that session (the
//! provider checks the share against its own table, as for a relayed offer), and gives
//! the consumer the provider's key and the addresses to try. Both ends then authenticate
//! each other by their agent keys:
//!
//! - the consumer accepts only a server certificate carrying the provider's key (given
//!   by the server, and the same key the provider enrolled with), checked by the TLS
//!   handshake signature;
//! - the provider accepts any agent certificate in the handshake, then admits the
//!   connection's streams only for a session it was told to expect *from that key's
//!   agent*, before the expectation runs out.
//!
//! The agent's link endpoint doubles as the direct endpoint (it carries a server
//! configuration), so the port the provider announces is the one its link already
//! keeps open through NATs that allow it.
//!
//! # The flow
//!
//! 1. The consumer asks the server for `StreamRequest::Direct(OWNER/SERVICE)` on its side
//!    connection. The server checks it as for a relayed tunnel, records a session (`via
//!    direct`) and sends the provider a [`DirectOffer`] on its link.
//! 2. The provider checks the offer against its share table as it is then (the share
//!    exists, the consumer is vouched for one of its clubs or it is public, the cap is
//!    not reached), [`Expectations::expect`]s the consumer for that session and answers
//!    `Expecting { port }`, its link endpoint's port.
//! 3. The server answers the consumer `Direct { session, provider_key, candidates }`.
//!    The consumer [`dial`]s every candidate at once within [`DIAL_TIMEOUT`], or reuses
//!    the direct connection it already has to that provider, and opens a stream whose
//!    first frame is [`DirectOpen`].
//! 4. The provider admits the stream only if that session is expected *from the agent
//!    whose key the connection proved* and has not run out ([`Expectations::admit`]),
//!    checks the share table again as it is now, connects to the share's address and
//!    splices, exactly as for a relayed tunnel (`crate::tunnel::serve`). A refusal is
//!    answered `Refused(reason)` on the stream and recorded.
//!
//! The server never sees a direct tunnel's bytes: its session record keeps 0 bytes, and
//! ends when the consumer finishes the request stream it held open for the tunnel.
//!
//! # Address changes
//!
//! The consumer is the QUIC client of a direct connection, so a change of *its* address
//! migrates the connection. The provider is the server side, which QUIC cannot move: a
//! change of the provider's address ends the direct connection and its tunnels (their
//! TCP connections are closed); the consumer's next local connection dials again, and
//! uses the relay for good if that fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;

use herald_io::wire;
use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::peers::{Consumer, DirectOffer, DirectOpen, OfferAnswer, TunnelOffer};

use crate::shares::Share;
use crate::state::Identity;
use crate::tls::TlsError;

/// ALPN of direct agent-to-agent connections (not the server's `herald/1`).
pub const PEER_ALPN: &[u8] = b"herald-peer/1";
/// The name agent certificates are issued for.
pub const PEER_NAME: &str = "herald-agent";
/// How long a provider waits for an expected consumer's connection.
pub const EXPECT_FOR: Duration = Duration::from_secs(30);
/// How long a consumer tries the provider's addresses before it falls back to the relay.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a consumer has to send a direct stream's [`DirectOpen`].
pub const OPEN_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub use herald_io::tls::{agent_cert_key as cert_key, peer_agent_key as peer_key};

fn tls_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::from_reason(e.to_string())
}

/// The provider's side: serves direct connections with the agent's own certificate and
/// asks every client for one.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(Arc::new(AnyAgent { provider }))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key().into())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    // 0-RTT data is replayable; never accept it.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        crate::tls::IDLE_TIMEOUT
            .try_into()
            .expect("60 s fits a QUIC varint"),
    ));
    // A consumer opens one stream per TCP connection it carries; the share's own
    // connection cap is enforced per stream on top of this.
    transport.max_concurrent_bidi_streams(64u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    config.migration(true);
    Ok(config)
}

/// The consumer's side: presents the agent's certificate and accepts only a server
/// holding `provider_key`.
pub fn client_config(
    identity: &Identity,
    provider_key: [u8; 32],
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedPeer {
        key: provider_key,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key().into())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(crate::tls::KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        crate::tls::IDLE_TIMEOUT
            .try_into()
            .expect("60 s fits a QUIC varint"),
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Tries every candidate address at once; the first completed handshake wins, the
/// others are dropped. `Err` lists why each failed (all within `timeout`).
pub async fn dial(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    candidates: &[SocketAddr],
    timeout: Duration,
) -> Result<(Connection, SocketAddr), String> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    for &addr in candidates {
        match endpoint.connect_with(config.clone(), addr, PEER_NAME) {
            Ok(connecting) => {
                attempts.spawn(async move {
                    match tokio::time::timeout(timeout, connecting).await {
                        Ok(Ok(connection)) => Ok((connection, addr)),
                        Ok(Err(e)) => Err(format!("{addr}: {e}")),
                        Err(_) => Err(format!("{addr}: no answer in {} s", timeout.as_secs())),
                    }
                });
            }
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok(Ok(won)) => return Ok(won),
            Ok(Err(failure)) => failures.push(failure),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        failures.push("no address to try".into());
    }
    Err(failures.join("; "))
}

/// What a provider was told to expect: a consumer agent, for an offer, until a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    consumer: String,
    offer: TunnelOffer,
    until: Instant,
}

/// The sessions a provider expects direct connections for.
#[derive(Debug, Default)]
pub struct Expectations {
    sessions: Mutex<HashMap<i64, Expected>>,
}

impl Expectations {
    /// Expects `consumer` (an agent id) for `offer`'s session, for [`EXPECT_FOR`].
    pub fn expect(&self, offer: &TunnelOffer, consumer: &str, now: Instant) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, e| e.until > now);
        sessions.insert(
            offer.session,
            Expected {
                consumer: consumer.to_string(),
                offer: offer.clone(),
                until: now + EXPECT_FOR,
            },
        );
    }

    /// The offer a stream of a direct connection from `consumer` may open for
    /// `session`; otherwise why not. The expectation stays for further streams of the
    /// same session until it runs out.
    pub fn admit(&self, session: i64, consumer: &str, now: Instant) -> Result<TunnelOffer, String> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(&session) {
            None => Err(format!("no direct session {session} is expected")),
            Some(e) if e.until <= now => Err(format!("direct session {session} has expired")),
            Some(e) if e.consumer != consumer => Err(format!(
                "direct session {session} is for another agent, not {consumer}"
            )),
            Some(e) => Ok(e.offer.clone()),
        }
    }

    /// Keeps an admitted session's expectation alive while its connection carries
    /// streams.
    pub fn extend(&self, session: i64, now: Instant) {
        if let Some(e) = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&session)
        {
            e.until = e.until.max(now + EXPECT_FOR);
        }
    }
}

/// Checks a [`DirectOffer`] against the share table's row `share` (with `active`
/// tunnels open to it) and, if it passes, expects its consumer. The stream itself is
/// checked again when it arrives.
pub fn expect(
    expectations: &Expectations,
    share: Option<&Share>,
    active: u32,
    direct: &DirectOffer,
    now: Instant,
) -> Result<(), String> {
    let Consumer::Agent { agent_id, .. } = &direct.offer.consumer else {
        return Err("only an agent can connect directly".into());
    };
    crate::shares::check_offer(share, &direct.offer, active)?;
    expectations.expect(&direct.offer, agent_id, now);
    Ok(())
}

/// Reads a direct stream's first frame.
pub async fn read_open(recv: &mut quinn::RecvStream) -> Result<Option<DirectOpen>, String> {
    match tokio::time::timeout(
        OPEN_READ_TIMEOUT,
        wire::read_frame::<DirectOpen>(recv, DEFAULT_FRAME_LIMIT),
    )
    .await
    {
        Ok(Ok(open)) => Ok(open),
        Ok(Err(e)) => Err(format!("no valid direct opening: {e}")),
        Err(_) => Err(format!(
            "no direct opening within {} s",
            OPEN_READ_TIMEOUT.as_secs()
        )),
    }
}

/// Answers a refused stream with its reason and finishes it.
pub async fn refuse(send: &mut quinn::SendStream, reason: &str) {
    let answer = OfferAnswer::Refused(reason.to_string());
    let _ = wire::write_frame(send, &answer, DEFAULT_FRAME_LIMIT).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Accepts any agent certificate in the handshake (the handshake signature proves the
/// key); which sessions that key may open is decided per stream by [`Expectations`].
#[derive(Debug)]
struct AnyAgent {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyAgent {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        cert_key(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ))
    }

    herald_io::tls13_signature_methods!();
}

/// Accepts only a server certificate carrying one agent key.
#[derive(Debug)]
struct PinnedPeer {
    key: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if cert_key(end_entity) == Some(self.key) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    herald_io::tls13_signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh identity in a scratch directory of its own.
    fn identity(name: &str) -> Identity {
        let dir = std::env::temp_dir().join(format!("herald-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let identity = Identity::load_or_create(&dir).expect("identity");
        let _ = std::fs::remove_dir_all(&dir);
        identity
    }

    fn key(identity: &Identity) -> [u8; 32] {
        identity.public_key.as_slice().try_into().expect("32 bytes")
    }

    #[test]
    fn the_key_comes_from_the_certificate_s_own_key_field() {
        let me = identity("me");
        assert_eq!(cert_key(&me.cert), Some(key(&me)));
        assert_eq!(cert_key(&CertificateDer::from(vec![0x30, 0x00])), None);
    }

    #[tokio::test]
    async fn consumers_reach_only_the_provider_they_were_told_of() {
        let (provider, consumer, stranger) = (
            identity("provider"),
            identity("consumer"),
            identity("stranger"),
        );
        let server = Endpoint::server(
            server_config(&provider).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        // The provider's side: the first completed handshake (the refused one fails).
        let accept = tokio::spawn(async move {
            loop {
                let incoming = server.accept().await.expect("the endpoint is open");
                if let Ok(connection) = incoming.await {
                    let who = peer_key(&connection);
                    return (connection, who);
                }
            }
        });
        let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        // Pinned to another key: refused by the consumer, whatever the address.
        let wrong = client_config(&consumer, key(&stranger)).unwrap();
        let refused = dial(&client, wrong, &[addr], Duration::from_secs(5)).await;
        assert!(
            refused.is_err(),
            "a provider without the pinned key was accepted"
        );

        // Pinned to the provider's key: connected, and the provider sees the consumer's key.
        let right = client_config(&consumer, key(&provider)).unwrap();
        let unreachable: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (_connection, used) =
            dial(&client, right, &[unreachable, addr], Duration::from_secs(5))
                .await
                .expect("the provider's address answers");
        assert_eq!(used, addr);
        let (_server_side, who) = accept.await.unwrap();
        assert_eq!(who, Some(key(&consumer)));
    }

    fn offer(session: i64) -> TunnelOffer {
        TunnelOffer {
            session,
            share: "web".into(),
            consumer: Consumer::Agent {
                agent_id: "consumer".into(),
                user: None,
            },
            clubs: vec![],
        }
    }

    #[test]
    fn expectations_admit_only_the_expected_agent_until_they_expire() {
        let expected = Expectations::default();
        let now = Instant::now();
        expected.expect(&offer(7), "consumer", now);
        assert_eq!(expected.admit(7, "consumer", now), Ok(offer(7)));
        assert!(expected.admit(7, "intruder", now).is_err());
        assert!(expected.admit(8, "consumer", now).is_err());
        let later = now + EXPECT_FOR + Duration::from_secs(1);
        assert!(expected.admit(7, "consumer", later).is_err());
        expected.extend(7, now + Duration::from_secs(20));
        assert!(expected.admit(7, "consumer", later).is_ok());
    }
}
