//! Enrollment tokens: one string that tells a new agent where the server is, which server
//! CA and operator key to pin, and the secret that admits it once.
//!
//! The token is made by the administrator's CLI from its own configuration, not by the
//! server, so what the agent pins does not depend on the server's word.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::envelope::PublicKey;

/// Every token starts with this prefix, so a pasted token is recognisable.
pub const TOKEN_PREFIX: &str = "hrld1_";

/// Longest token we accept (a token is a few hundred bytes).
const MAX_TOKEN_LEN: usize = 4096;

/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 24;

/// What an enrollment token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Server QUIC address, `host:port`.
    pub server: String,
    /// SHA-256 of the server CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// Operator public keys the agent will pin.
    pub operator_keys: Vec<PublicKey>,
    /// Groups the agent joins on enrollment.
    pub groups: Vec<String>,
    /// The secret; the server only stores its hash.
    pub secret: [u8; SECRET_LEN],
}

/// Why a token string could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Missing the `hrld1_` prefix.
    #[error("not a Herald enrollment token (it should start with {TOKEN_PREFIX})")]
    Prefix,
    /// Longer than any token we issue.
    #[error("token is too long")]
    TooLong,
    /// Not valid base64 or not a valid encoding.
    #[error("token is damaged (was it copied completely?)")]
    Damaged,
}

impl Token {
    /// The printable form.
    pub fn encode(&self) -> String {
        // A token holds a few short strings and keys; encoding cannot exceed the limit.
        let bytes = codec::to_bytes(self).expect("token encodes within limits");
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// Parses the printable form.
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        codec::from_bytes(&bytes, MAX_TOKEN_LEN).map_err(|_| TokenError::Damaged)
    }

    /// The hash the server stores and looks the token up by.
    pub fn secret_hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

/// SHA-256 of a secret, hex.
pub fn secret_hash(secret: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_damage() {
        let token = Token {
            server: "127.0.0.1:4433".into(),
            ca_fingerprint: [3; 32],
            operator_keys: vec![PublicKey([4; 32])],
            groups: vec!["web".into()],
            secret: [5; SECRET_LEN],
        };
        let text = token.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert_eq!(Token::decode(&text).unwrap(), token);
        assert!(matches!(Token::decode("abc"), Err(TokenError::Prefix)));
        assert!(matches!(
            Token::decode(&text[..text.len() - 5]),
            Err(TokenError::Damaged)
        ));
    }
}
