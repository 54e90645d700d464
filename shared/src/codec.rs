//! The wire format: a frame is a big-endian `u32` length followed by a bincode value.
//!
//! All of bincode lives in this file. Every decode has an explicit size limit and rejects
//! trailing bytes, so a peer can neither make us allocate without bound nor smuggle data
//! after a value. Decoding never panics on hostile input; it returns [`CodecError`].

use serde::{de::DeserializeOwned, Serialize};

/// Default upper bound for one frame's payload (1 MiB).
pub const DEFAULT_FRAME_LIMIT: usize = 1024 * 1024;

/// Upper bound for a result frame, which carries up to 1 MiB of stdout and of stderr.
pub const RESULT_FRAME_LIMIT: usize = 3 * 1024 * 1024;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Errors from encoding or decoding a value.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame header announced more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// A frame of length zero; no message encodes to nothing.
    #[error("empty frame")]
    Empty,
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The value decoded but bytes were left over.
    #[error("{extra} trailing bytes after the value")]
    Trailing {
        /// Number of bytes left over.
        extra: usize,
    },
    /// The value could not be encoded (or encodes beyond the limit).
    #[error("cannot encode value: {0}")]
    Encode(String),
}

/// bincode configuration with a compile-time limit; fixed-width big-endian integers are not
/// needed, the standard varint config is compact and canonical enough for us.
fn config<const LIMIT: usize>() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes a value without a frame header (used for signed payloads and stored blobs).
pub fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config::<RESULT_FRAME_LIMIT>())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a value from exactly `bytes` (no frame header), refusing more than `limit` bytes.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    // The byte-length check above bounds the input; bincode's own limit bounds what a
    // length prefix inside the value may make it allocate.
    let (value, used) = if limit <= DEFAULT_FRAME_LIMIT {
        bincode::serde::decode_from_slice(bytes, config::<DEFAULT_FRAME_LIMIT>())
    } else {
        bincode::serde::decode_from_slice(bytes, config::<RESULT_FRAME_LIMIT>())
    }
    .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Encodes a value as a complete frame (header and payload).
pub fn encode_frame<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, CodecError> {
    let payload = to_bytes(value)?;
    if payload.len() > limit {
        return Err(CodecError::TooLarge {
            len: payload.len(),
            limit,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooLarge {
        len: payload.len(),
        limit,
    })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads a frame header and checks the announced length against `limit`.
pub fn frame_len(header: [u8; HEADER_LEN], limit: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > limit {
        return Err(CodecError::TooLarge { len, limit });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        items: Vec<u32>,
    }

    #[test]
    fn frame_round_trips() {
        let value = Sample {
            name: "x".into(),
            items: vec![1, 2, 3],
        };
        let frame = encode_frame(&value, DEFAULT_FRAME_LIMIT).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap(), DEFAULT_FRAME_LIMIT).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: Sample = from_bytes(&frame[4..], DEFAULT_FRAME_LIMIT).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn oversized_header_is_rejected() {
        let err = frame_len(u32::MAX.to_be_bytes(), DEFAULT_FRAME_LIMIT).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }));
        assert!(matches!(frame_len([0; 4], 10), Err(CodecError::Empty)));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = to_bytes(&Sample {
            name: "a".into(),
            items: vec![],
        })
        .unwrap();
        bytes.push(0);
        let err = from_bytes::<Sample>(&bytes, DEFAULT_FRAME_LIMIT).unwrap_err();
        assert!(matches!(err, CodecError::Trailing { extra: 1 }));
    }

    #[test]
    fn huge_inner_length_does_not_allocate() {
        // A vec length prefix claiming 2^60 elements must fail, not allocate.
        let mut bytes = vec![1u8, b'a'];
        bytes.push(0xff);
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(from_bytes::<Sample>(&bytes, DEFAULT_FRAME_LIMIT).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = from_bytes::<Sample>(&bytes, DEFAULT_FRAME_LIMIT);
            let _ = from_bytes::<crate::protocol::ServerMsg>(&bytes, DEFAULT_FRAME_LIMIT);
            let _ = from_bytes::<crate::protocol::AgentMsg>(&bytes, DEFAULT_FRAME_LIMIT);
        }
    }
}
