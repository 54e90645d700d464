//! Enrollment tokens: one string that tells a new agent where the server is, which server
//! CA and operator key to pin, and the secret that admits it once.
//!
//! The token is made by the administrator's CLI from its own configuration, not by the
//! server, so what the agent pins does not depend on the server's word.
//!
//! # Format
//!
//! `hrld2_` followed by unpadded URL-safe base64 of
//!
//! ```text
//! bincode(Token) ‖ first 8 bytes of SHA-256("hrld2_" ‖ bincode(Token))
//! ```
//!
//! The checksum is there because tokens travel by copy and paste, chat and e-mail. Without
//! it a single changed character in the middle lands in the operator key: the agent
//! enrolls, the token's use is spent, and the agent pins a key that signs nothing, so it
//! refuses every job for good. With it, any change is caught by [`Token::decode`], which
//! the agent calls before it writes anything or contacts the server. Eight bytes make an
//! undetected accidental change a 1-in-2^64 event. The checksum is not a signature: it
//! protects against damage, not against someone who hands out a forged token (the channel
//! the token travels through has to be trusted for that, as before).
//!
//! Version 1 tokens (`hrld1_`, no checksum) are refused with [`TokenError::Outdated`]:
//! tokens live for hours (24 h by default), so asking for a new one costs little, and
//! accepting unchecked tokens would keep the failure above alive.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::codec;
use crate::envelope::PublicKey;

/// Every token starts with this prefix, so a pasted token is recognisable. The digit is
/// the format version.
pub const TOKEN_PREFIX: &str = "hrld2_";

/// Prefix of version 1 tokens (no checksum), recognised only to refuse them clearly.
const V1_PREFIX: &str = "hrld1_";

/// Longest token we accept (a token is a few hundred bytes).
const MAX_TOKEN_LEN: usize = 4096;

/// Length of the checksum appended to the encoded token, in bytes.
const CHECKSUM_LEN: usize = 8;

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
    /// Missing the `hrld2_` prefix (and not a damaged copy of a token either).
    #[error("not a Herald enrollment token (it should start with {TOKEN_PREFIX})")]
    Prefix,
    /// Longer than any token we issue.
    #[error("token is too long")]
    TooLong,
    /// Truncated, not valid base64, or the checksum does not match: a character was
    /// changed, lost or added on the way.
    #[error("this token is damaged; copy it again")]
    Damaged,
    /// A version 1 token, which has no checksum.
    #[error(
        "this token was made by an older server; create a new one (herald-server token create)"
    )]
    Outdated,
}

impl Token {
    /// The printable form.
    pub fn encode(&self) -> String {
        // A token holds a few short strings and keys; encoding cannot exceed the limit.
        let mut bytes = codec::to_bytes(self).expect("token encodes within limits");
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the printable form, refusing any token whose checksum does not match.
    ///
    /// Surrounding whitespace is ignored. A token whose prefix was damaged (one character
    /// changed, lost or added) is reported as [`TokenError::Damaged`], not as something
    /// that is not a token at all: the intact checksum behind it shows what it was.
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        if let Some(body) = text.strip_prefix(TOKEN_PREFIX) {
            return decode_body(body).ok_or(TokenError::Damaged);
        }
        if let Some(body) = text.strip_prefix(V1_PREFIX) {
            // A current token whose version digit was damaged is damaged, not old.
            return if decode_body(body).is_none() && decode_v1_body(body).is_some() {
                Err(TokenError::Outdated)
            } else {
                Err(TokenError::Damaged)
            };
        }
        // One character changed, lost or added in the prefix leaves the body at one of
        // these offsets.
        let damaged_prefix = (TOKEN_PREFIX.len() - 1..=TOKEN_PREFIX.len() + 1)
            .any(|at| text.get(at..).and_then(decode_body).is_some());
        Err(if damaged_prefix {
            TokenError::Damaged
        } else {
            TokenError::Prefix
        })
    }

    /// The hash the server stores and looks the token up by.
    pub fn secret_hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

/// SHA-256 of a secret, hex.
pub fn secret_hash(secret: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(secret))
}

/// The checksum of an encoded token: SHA-256 over the prefix (so it also binds the format
/// version) and the encoded fields, truncated.
fn checksum(encoded: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = sha2::Sha256::new()
        .chain_update(TOKEN_PREFIX)
        .chain_update(encoded)
        .finalize();
    let mut sum = [0; CHECKSUM_LEN];
    sum.copy_from_slice(&digest[..CHECKSUM_LEN]);
    sum
}

/// Decodes a current body (the text after the prefix); `None` if anything is off.
fn decode_body(body: &str) -> Option<Token> {
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    let split = bytes.len().checked_sub(CHECKSUM_LEN)?;
    let (encoded, sum) = bytes.split_at(split);
    if checksum(encoded) != sum {
        return None;
    }
    codec::from_bytes(encoded, MAX_TOKEN_LEN).ok()
}

/// Decodes a version 1 body (no checksum), only to tell an old token from garbage.
fn decode_v1_body(body: &str) -> Option<Token> {
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    codec::from_bytes(&bytes, MAX_TOKEN_LEN).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Token {
        Token {
            server: "herald.example.org:4433".into(),
            ca_fingerprint: [3; 32],
            operator_keys: vec![PublicKey([4; 32])],
            groups: vec!["web".into()],
            secret: [5; SECRET_LEN],
        }
    }

    /// Characters of the token alphabet (prefix and URL-safe base64) to substitute and
    /// insert: letters of both cases, digits, and both punctuation characters.
    const REPLACEMENTS: [char; 9] = ['A', 'h', 'r', 'z', '0', '1', '2', '-', '_'];

    fn assert_damaged(text: &str, what: &str) {
        match Token::decode(text) {
            Err(TokenError::Damaged) => {}
            other => panic!("{what}: {text:?} gave {other:?}, not the damaged-token error"),
        }
    }

    #[test]
    fn token_round_trips() {
        let token = sample();
        let text = token.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert_eq!(Token::decode(&text).unwrap(), token);
        assert_eq!(Token::decode(&format!("  {text}\n")).unwrap(), token);
        assert!(matches!(Token::decode("abc"), Err(TokenError::Prefix)));
        assert!(matches!(Token::decode(""), Err(TokenError::Prefix)));
        assert!(matches!(
            Token::decode(&format!("{TOKEN_PREFIX}{}", "A".repeat(MAX_TOKEN_LEN))),
            Err(TokenError::TooLong)
        ));
    }

    /// Every single-character substitution, deletion and insertion, at every position
    /// (prefix included), is refused as damaged by the parser the agent runs before it
    /// spends the token's use at the server.
    #[test]
    fn a_damaged_token_is_refused_before_it_is_spent() {
        let text = sample().encode();
        let chars: Vec<char> = text.chars().collect();
        let with = |i: usize, replace: usize, insert: Option<char>| -> String {
            let mut out: Vec<char> = chars[..i].to_vec();
            out.extend(insert);
            out.extend(&chars[i + replace..]);
            out.into_iter().collect()
        };
        let mut tried = 0;
        for (i, &original) in chars.iter().enumerate() {
            for c in REPLACEMENTS.into_iter().filter(|&c| c != original) {
                assert_damaged(&with(i, 1, Some(c)), &format!("'{c}' at {i}"));
                tried += 1;
            }
            assert_damaged(&with(i, 1, None), &format!("deleting {i}"));
            tried += 1;
        }
        for i in 0..=chars.len() {
            for c in REPLACEMENTS {
                let inserted = with(i, 0, Some(c));
                assert_damaged(&inserted, &format!("inserting '{c}' at {i}"));
                tried += 1;
            }
        }
        // Also each of the 63 other base64 characters in the middle, where the operator
        // key sits.
        let middle = chars.len() / 2;
        for c in ('A'..='Z')
            .chain('a'..='z')
            .chain('0'..='9')
            .chain(['-', '_'])
        {
            if c != chars[middle] {
                assert_damaged(&with(middle, 1, Some(c)), &format!("'{c}' at {middle}"));
                tried += 1;
            }
        }
        // Per position: 8 or 9 substitutions, a deletion and 9 insertions.
        assert!(tried >= 18 * chars.len(), "only {tried} variants tried");
    }

    #[test]
    fn a_truncated_token_is_damaged() {
        let text = sample().encode();
        for keep in TOKEN_PREFIX.len()..text.len() {
            assert_damaged(&text[..keep], &format!("first {keep} characters"));
        }
    }

    #[test]
    fn a_version_1_token_is_refused_as_outdated() {
        let v1 = format!(
            "{V1_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(codec::to_bytes(&sample()).unwrap())
        );
        let e = Token::decode(&v1).unwrap_err();
        assert!(matches!(e, TokenError::Outdated), "{e:?}");
        assert!(e.to_string().contains("create a new one"), "{e}");
        // Damage to an old token, or an old prefix on garbage, is reported as damage.
        assert_damaged(&v1[..v1.len() - 3], "truncated version 1 token");
        assert_damaged(&format!("{V1_PREFIX}AAAA"), "version 1 prefix on garbage");
    }

    #[test]
    fn the_damaged_message_says_what_to_do() {
        assert_eq!(
            TokenError::Damaged.to_string(),
            "this token is damaged; copy it again"
        );
    }
}
