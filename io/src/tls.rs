//! The handshake checks both ends' certificate verifiers share: Herald speaks TLS 1.3
//! only, checks a handshake signature with the crypto provider's algorithms, and reads
//! an agent's Ed25519 key from its certificate the same way on the server and on a
//! providing agent.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::DigitallySignedStruct;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410: the algorithm is OID
/// 1.3.101.112), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The Ed25519 key of an agent certificate, read from its parsed SubjectPublicKeyInfo
/// (never by searching the certificate's bytes, where other fields could hold a
/// look-alike); `None` for anything else.
pub fn agent_cert_key(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

/// The agent key a connection's peer proved in the handshake.
pub fn peer_agent_key(connection: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    agent_cert_key(certs.first()?)
}

/// The answer to a TLS 1.2 signature: refused, Herald offers only TLS 1.3.
pub fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Checks a TLS 1.3 handshake signature (proof that the peer holds its key).
pub fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    provider: &CryptoProvider,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The three signature methods every Herald certificate verifier shares, for the body of
/// a `ServerCertVerifier` or `ClientCertVerifier` impl on a type with a `provider:
/// Arc<CryptoProvider>` field: TLS 1.2 refused ([`refuse_tls12`]), TLS 1.3 checked with
/// the provider's algorithms ([`verify_tls13`]), and the schemes those algorithms take.
#[macro_export]
macro_rules! tls13_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &::rustls::pki_types::CertificateDer<'_>,
            _dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::tls::refuse_tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::tls::verify_tls13(message, cert, dss, &self.provider)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
