//! The handshake checks both ends' certificate verifiers share: Herald speaks TLS 1.3
//! only, and checks a handshake signature with the crypto provider's algorithms.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::DigitallySignedStruct;

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
