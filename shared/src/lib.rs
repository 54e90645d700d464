//! Herald's shared core: protocol types, the wire codec, signed envelopes, enrollment
//! tokens and schedule expressions. Pure logic: no async runtime, no sockets, no files.

#![forbid(unsafe_code)]

pub mod codec;
pub mod envelope;
pub mod message;
pub mod peers;
pub mod protocol;
pub mod release;
pub mod schedule;
pub mod token;
pub mod url;

/// Unix time in milliseconds, UTC.
pub type Millis = i64;

/// The agent id for a public key: the first 10 bytes of its SHA-256, hex. Derived from
/// the verified certificate, never taken from a message.
pub fn agent_id(public_key: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(public_key)[..10])
}

/// Validates a name used for agents and groups: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
