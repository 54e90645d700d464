//! Frames on QUIC streams: the I/O half of `herald_shared::codec`, used by the agent and
//! the server alike.

use quinn::{RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

use herald_shared::codec::{self, CodecError, HEADER_LEN};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed while reading.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream failed while writing.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The bytes are not a valid frame (or the value does not fit one).
    #[error("malformed frame: {0}")]
    Codec(#[from] CodecError),
}

/// Reads one frame of at most `limit` bytes; `None` on a clean end of stream before a
/// header.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<Option<T>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = codec::frame_len(header, limit)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    Ok(Some(codec::from_bytes(&payload, limit)?))
}

/// Writes one frame of at most `limit` bytes.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
    limit: usize,
) -> Result<(), WireError> {
    let frame = codec::encode_frame(msg, limit)?;
    send.write_all(&frame).await?;
    Ok(())
}
