//! What the fuzz targets share: a reader that splits one fuzz input into the several
//! arguments a decoder takes ([`Input`]), the writer the seed generator uses to build
//! inputs in the same layout ([`Seed`]), and the frame-stream round trip that the
//! `frame`, `agent_msg` and `server_msg` targets run ([`frames`]).
//!
//! # Input layout
//!
//! An input is read front to back: single bytes, big-endian `i64`s and *parts* (a
//! big-endian `u16` length, then that many bytes). Whatever the reader asks for past the
//! end reads as zeros or empty, so every byte string is a valid input and libFuzzer's
//! mutations never need to keep the layout intact to reach the decoders.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::IpAddr;

use arbitrary::Arbitrary;
use herald_shared::codec::{self, CodecError, HEADER_LEN};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

// === impl Input ===

/// Reads arguments off the front of a fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Starts reading `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// The next byte, or 0 past the end.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next big-endian `i64`, zero-padded past the end.
    pub fn i64(&mut self) -> i64 {
        let mut bytes = [0u8; 8];
        let n = self.data.len().min(8);
        bytes[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        i64::from_be_bytes(bytes)
    }

    /// The next part: a big-endian `u16` length, then up to that many bytes.
    pub fn part(&mut self) -> &'a [u8] {
        let len = usize::from(u16::from_be_bytes([self.byte(), self.byte()]));
        let n = len.min(self.data.len());
        let (part, rest) = self.data.split_at(n);
        self.data = rest;
        part
    }

    /// The next part as text (invalid UTF-8 replaced, as a user's paste would not be).
    pub fn text(&mut self) -> Cow<'a, str> {
        String::from_utf8_lossy(self.part())
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

// === impl Seed ===

/// Builds an input in the layout [`Input`] reads; used by `examples/seeds.rs`.
#[derive(Default)]
pub struct Seed {
    bytes: Vec<u8>,
}

impl Seed {
    /// An empty input.
    pub fn new() -> Self {
        Seed::default()
    }

    /// Appends one byte.
    pub fn byte(mut self, b: u8) -> Self {
        self.bytes.push(b);
        self
    }

    /// Appends a big-endian `i64`.
    pub fn i64(mut self, v: i64) -> Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a length-prefixed part.
    ///
    /// # Panics
    ///
    /// If `part` is longer than `u16::MAX`: seeds are meant to be small.
    pub fn part(mut self, part: impl AsRef<[u8]>) -> Self {
        let part = part.as_ref();
        let len = u16::try_from(part.len()).expect("seed parts are under 64 KiB");
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(part);
        self
    }

    /// Appends bytes as they are (the unprefixed rest of an input).
    pub fn rest(mut self, rest: impl AsRef<[u8]>) -> Self {
        self.bytes.extend_from_slice(rest.as_ref());
        self
    }

    /// The finished input.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

// === frames ===

/// The `frame` target's value type (here so that the seed generator can encode it).
/// Every serde shape: no recursion (no Herald message nests itself, and bincode has no
/// depth limit of its own) and no floats (NaN would break the equality check).
#[derive(Debug, PartialEq, Serialize, Deserialize, Arbitrary)]
pub enum Sample {
    /// A unit variant.
    Unit,
    /// A newtype variant.
    Newtype(String),
    /// A tuple variant.
    Tuple(u8, i16, u32, i64),
    /// A struct variant with every field type.
    Struct {
        flag: bool,
        wide: u128,
        signed: i128,
        letter: char,
        bytes: Vec<u8>,
        maybe: Option<String>,
        fixed: [u8; 16],
        pair: (u16, Option<i32>),
        map: BTreeMap<String, u64>,
        addresses: Vec<IpAddr>,
        kinds: Vec<Kind>,
    },
}

/// The enum inside [`Sample`].
#[derive(Debug, PartialEq, Serialize, Deserialize, Arbitrary)]
pub enum Kind {
    /// Unit.
    Plain,
    /// Newtype.
    Text(String),
    /// Struct.
    Numbers {
        /// One byte.
        small: u8,
        /// A varint.
        large: u64,
    },
}

/// Reads `bytes` as a peer's stream of frames the way `herald_io::wire::read_frame` does
/// (header, length check against `limit`, exactly that many payload bytes, decode with
/// the same limit), until the stream ends or a frame is refused. Every value that decodes
/// must re-encode within the limit, no longer than it came, and decode back equal; each
/// is then handed to `inspect`. Returns how many frames decoded.
pub fn frames<T>(mut bytes: &[u8], limit: usize, mut inspect: impl FnMut(&T)) -> usize
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut decoded = 0;
    while let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() {
        let len = match codec::frame_len(*header, limit) {
            Ok(len) => len,
            // A reader closes the stream on a refused header.
            Err(CodecError::Empty) | Err(CodecError::TooLarge { .. }) => return decoded,
            Err(e) => panic!("frame_len returned an unexpected error: {e}"),
        };
        assert!(len > 0 && len <= limit, "frame_len let {len} through");
        // A stream that ends inside a payload is a read error, not a decode.
        let Some(payload) = rest.get(..len) else {
            return decoded;
        };
        bytes = &rest[len..];
        match codec::from_bytes::<T>(payload, limit) {
            Ok(value) => {
                round_trip(&value, payload.len(), limit);
                inspect(&value);
                decoded += 1;
            }
            Err(CodecError::Malformed(_)) | Err(CodecError::Trailing { .. }) => return decoded,
            Err(e) => panic!("from_bytes of {len} bytes returned an unexpected error: {e}"),
        }
    }
    decoded
}

/// A decoded value re-encodes as a frame no longer than the payload it came from (the
/// encoding is minimal) and decodes back to itself.
pub fn round_trip<T>(value: &T, payload_len: usize, limit: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = match codec::encode_frame(value, limit) {
        Ok(frame) => frame,
        Err(e) => panic!("a value decoded from {payload_len} bytes does not re-encode: {e}"),
    };
    let header = frame[..HEADER_LEN]
        .try_into()
        .expect("a frame starts with its header");
    let len = codec::frame_len(header, limit).expect("a re-encoded frame has a valid header");
    assert_eq!(len, frame.len() - HEADER_LEN);
    assert!(
        len <= payload_len,
        "re-encoding grew from {payload_len} to {len} bytes"
    );
    let back: T = codec::from_bytes(&frame[HEADER_LEN..], limit).expect("re-encoded value decodes");
    assert_eq!(&back, value, "value changed over a round trip");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_layout_reads_back() {
        let bytes = Seed::new()
            .byte(7)
            .i64(-3)
            .part("abc")
            .rest([1, 2])
            .into_bytes();
        let mut input = Input::new(&bytes);
        assert_eq!(input.byte(), 7);
        assert_eq!(input.i64(), -3);
        assert_eq!(input.text(), "abc");
        assert_eq!(input.rest(), &[1, 2]);
    }

    #[test]
    fn reading_past_the_end_gives_zeros() {
        let mut input = Input::new(&[0, 9, b'x']);
        assert_eq!(input.part(), b"x");
        assert_eq!(input.byte(), 0);
        assert_eq!(input.i64(), 0);
        assert_eq!(input.part(), b"");
    }
}
