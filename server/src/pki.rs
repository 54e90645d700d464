//! The server's certificates and TLS configuration.
//!
//! `init` creates a CA; the CA issues the server certificate used both for QUIC and for
//! the HTTPS admin API. Agents pin the CA's SHA-256 fingerprint (from the enrollment
//! token). Agents present a self-signed certificate over their own Ed25519 key; the TLS
//! handshake proves they hold the key, and [`Keyring`] decides at handshake time whether
//! the key is enrolled, unknown (allowed only to enroll) or revoked (refused).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Digest;

use herald_shared::protocol::{ALPN, SERVER_NAME};

use herald_io::files;

/// CA certificate file (PEM), inside the data directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key (PEM, mode 0600).
pub const CA_KEY: &str = "ca.key";
/// Server certificate (PEM).
pub const SERVER_CERT: &str = "server.pem";
/// Server private key (PEM, mode 0600).
pub const SERVER_KEY: &str = "server.key";
/// Secret for QUIC stateless resets (mode 0600). It must survive restarts: after a crash
/// the new process answers agents' packets for the old connection with a stateless
/// reset, and agents only believe a reset made with the same key, so they reconnect at
/// once instead of waiting out the idle timeout.
pub const RESET_KEY: &str = "reset.key";

/// How long the server's idle timeout is; agents keep the link alive more often.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Errors creating or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// Certificate generation failed.
    #[error("cannot create certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored certificate or key does not parse.
    #[error("{path}: {reason}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The server's loaded certificates.
pub struct Pki {
    /// CA certificate.
    pub ca: CertificateDer<'static>,
    /// Server certificate followed by the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// Server key.
    pub key: PrivateKeyDer<'static>,
}

/// The crypto provider used everywhere: rustls with *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(der).into()
}

/// Creates the CA and the server certificate in `data_dir`. `hosts` are extra names or
/// addresses the certificate should be valid for (the public address).
pub fn create(data_dir: &Path, hosts: &[String]) -> Result<[u8; 32], PkiError> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Herald server CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    files::write_private(&data_dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
    files::write_atomic(&data_dir.join(CA_CERT), ca_cert.pem().as_bytes())?;
    issue_server_cert(data_dir, hosts, &ca_params, &ca_key)?;
    Ok(fingerprint(ca_cert.der()))
}

fn issue_server_cert(
    data_dir: &Path,
    hosts: &[String],
    ca_params: &CertificateParams,
    ca_key: &KeyPair,
) -> Result<(), PkiError> {
    let mut names = vec![
        SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Herald server");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    files::write_private(&data_dir.join(SERVER_KEY), key.serialize_pem().as_bytes())?;
    files::write_atomic(&data_dir.join(SERVER_CERT), cert.pem().as_bytes())?;
    Ok(())
}

/// The QUIC endpoint configuration with the persistent stateless-reset key, created on
/// first use.
pub fn endpoint_config(data_dir: &Path) -> Result<quinn::EndpointConfig, PkiError> {
    let path = data_dir.join(RESET_KEY);
    let secret = match std::fs::read(&path) {
        Ok(secret) if secret.len() == 32 => secret,
        Ok(_) => {
            return Err(PkiError::Parse {
                path,
                reason: "expected 32 bytes".into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = crate::random_bytes::<32>().to_vec();
            files::write_private(&path, &secret)?;
            secret
        }
        Err(e) => {
            return Err(PkiError::Parse {
                path,
                reason: e.to_string(),
            })
        }
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection ids are hashed with a key too; a restarted server must recognise the
    // old ids as its own, or it drops their packets before it would send the reset.
    let digest = sha2::Sha256::digest([&secret[..], b"connection-ids"].concat());
    let cid_key = u64::from_le_bytes(digest[..8].try_into().expect("8 of 32 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// Loads the server's certificates from `data_dir`.
pub fn load(data_dir: &Path) -> Result<Pki, PkiError> {
    let ca = load_cert(&data_dir.join(CA_CERT))?;
    let cert = load_cert(&data_dir.join(SERVER_CERT))?;
    let key_path = data_dir.join(SERVER_KEY);
    let key_pem = files::read_string(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Parse {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| PkiError::Parse {
        path: key_path,
        reason: e.to_string(),
    })?;
    Ok(Pki {
        chain: vec![cert, ca.clone()],
        ca,
        key,
    })
}

/// Reads one PEM certificate.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let pem = files::read_string(path)?;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Parse {
        path: path.to_path_buf(),
        reason: format!("not a PEM certificate: {e}"),
    })
}

/// TLS configuration for the QUIC endpoint: TLS 1.3 only, client certificates required,
/// 0-RTT off (rustls' default `max_early_data_size` of 0).
pub fn quic_server_config(
    pki: &Pki,
    keyring: Arc<Keyring>,
) -> Result<quinn::ServerConfig, PkiError> {
    let verifier = Arc::new(AgentCertVerifier {
        keyring,
        provider: provider(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // No session resumption: a resumed session skips the client-certificate check, and
    // that check is where revoked agents are refused.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("60 s fits a QUIC varint"),
    ));
    // Agents open one control stream and one uni stream per result, and one bidirectional
    // stream per tunnel or directory request (`connect` carries every local connection
    // on one side connection, and browsers open six at a time). Streams cost memory only
    // while open; the window bounds how many a connection may hold at once.
    transport.max_concurrent_bidi_streams(64u32.into());
    transport.max_concurrent_uni_streams(16u32.into());
    config.transport_config(Arc::new(transport));
    config.migration(true);
    Ok(config)
}

// === impl Keyring ===

/// What the server knows of agent keys, consulted during every handshake.
#[derive(Default)]
pub struct Keyring {
    /// Public key → revoked.
    keys: RwLock<HashMap<Vec<u8>, bool>>,
}

/// How the keyring classifies a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// An enrolled, active agent.
    Enrolled,
    /// Not known: may only enroll.
    Unknown,
    /// Revoked: the handshake fails.
    Revoked,
}

impl Keyring {
    /// Builds the keyring from stored keys.
    pub fn new(keys: impl IntoIterator<Item = (Vec<u8>, bool)>) -> Keyring {
        Keyring {
            keys: RwLock::new(keys.into_iter().collect()),
        }
    }

    /// Status of a key.
    pub fn status(&self, key: &[u8]) -> KeyStatus {
        match self.keys.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            Some(false) => KeyStatus::Enrolled,
            Some(true) => KeyStatus::Revoked,
            None => KeyStatus::Unknown,
        }
    }

    /// Records an enrolled key.
    pub fn enrolled(&self, key: Vec<u8>) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, false);
    }

    /// Replaces every key with those stored (another node enrolled or revoked some).
    pub fn replace(&self, keys: impl IntoIterator<Item = (Vec<u8>, bool)>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.into_iter().collect();
    }

    /// Marks a key revoked.
    pub fn revoked(&self, key: Vec<u8>) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, true);
    }
}

#[derive(Debug)]
struct AgentCertVerifier {
    keyring: Arc<Keyring>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring")
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Possession of the key is proven by the handshake signature (checked in
        // verify_tls13_signature); here we only decide whether the key may connect.
        let key = herald_io::tls::agent_cert_key(end_entity)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ))?
            .to_vec();
        match self.keyring.status(&key) {
            KeyStatus::Revoked => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            )),
            KeyStatus::Enrolled | KeyStatus::Unknown => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        herald_io::tls::refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        herald_io::tls::verify_tls13(message, cert, dss, &self.provider)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Browsers refuse Ed25519 server certificates, and the console is for browsers:
    /// the CA and the server certificate must both be ECDSA P-256.
    #[test]
    fn the_ca_and_server_certificates_are_ecdsa_p256() {
        let dir = std::env::temp_dir().join(format!(
            "herald-pki-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        create(&dir, &["herald.example".to_string()]).unwrap();
        for file in [CA_CERT, SERVER_CERT] {
            let der = load_cert(&dir.join(file)).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(
                cert.signature_algorithm.algorithm,
                x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256,
                "{file} is signed with ECDSA-SHA256"
            );
            assert_eq!(
                cert.public_key().algorithm.algorithm,
                x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY,
                "{file} has an EC key"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
