//! The agent's TLS: it verifies the server against the CA whose fingerprint it pinned from
//! the enrollment token (not against system roots or anything the server says), and
//! presents its own key in a self-signed client certificate.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use sha2::Digest;

use herald_shared::protocol::ALPN;

use crate::state::Identity;

/// Keep-alive interval: keeps NAT bindings open and notices a dead server.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Idle timeout on the agent side (the server's is the same; keep-alives keep it busy).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsError(String);

impl TlsError {
    /// An error from a reason.
    pub fn from_reason(reason: String) -> TlsError {
        TlsError(reason)
    }
}

/// Builds the QUIC client configuration.
pub fn client_config(
    fingerprint: [u8; 32],
    identity: &Identity,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        fingerprint,
        provider: provider.clone(),
        fixed_name: false,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key().into())
        .map_err(|e| TlsError(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data is replayable; never send it.
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("60 s fits a QUIC varint"),
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Verifies the server's chain against the pinned CA, which the server sends along.
/// An HTTPS client for downloads from the server itself: it trusts only the pinned CA and
/// checks the certificate's name as `herald-server` (as for QUIC), whatever host the URL
/// names, since the pinned CA is what matters.
pub fn https_client(fingerprint: [u8; 32]) -> Result<reqwest::Client, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        fingerprint,
        provider: provider.clone(),
        fixed_name: true,
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .map_err(|e| TlsError(e.to_string()))
}

/// An HTTPS client for downloads from elsewhere (a vendor's CDN named in signed
/// metadata): the system's roots. Integrity comes from the signed hash either way.
pub fn public_client() -> Result<reqwest::Client, TlsError> {
    // reqwest's rustls needs a process-wide provider; ring, like everything else here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        // A redirect could lead to plain http elsewhere; metadata names the real URL.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| TlsError(e.to_string()))
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Verify the name `herald-server` instead of the URL's host.
    fixed_name: bool,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| <[u8; 32]>::from(sha2::Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| c.as_ref() != ca.as_ref())
            .cloned()
            .collect();
        let fixed = ServerName::try_from(herald_shared::protocol::SERVER_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = if self.fixed_name { &fixed } else { server_name };
        verifier.verify_server_cert(end_entity, &others, name, ocsp_response, now)
    }

    herald_io::tls13_signature_methods!();
}
