//! The frame codec (`herald_shared::codec`) on its own, with a value type that uses every
//! serde shape Herald's messages use (and a few more), so the codec's limits, header
//! checks and trailing-byte rule are fuzzed apart from any one message type.
//!
//! The first byte picks the limit and the direction:
//!
//! - bit 7 clear: the rest is a stream of frames read like a peer's
//!   ([`herald_fuzz::frames`]): never a panic, and whatever decodes round-trips;
//! - bit 7 set: the rest is turned into a [`Sample`] by `arbitrary`, which is encoded as a
//!   frame (it must encode, or be refused as too large) and decoded back equal, and whose
//!   payload with a byte appended is refused as trailing.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use herald_fuzz::{frames, Input, Sample};
use herald_shared::codec::{self, CodecError, DEFAULT_FRAME_LIMIT, HEADER_LEN, RESULT_FRAME_LIMIT};
use libfuzzer_sys::fuzz_target;

fn limit(selector: u8) -> usize {
    match selector & 0x03 {
        0 => DEFAULT_FRAME_LIMIT,
        1 => RESULT_FRAME_LIMIT,
        2 => 64,
        // Small limits make the length checks bite on small inputs.
        _ => usize::from(selector >> 2 & 0x1f) + 1,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let selector = input.byte();
    let limit = limit(selector);
    let rest = input.rest();
    if selector & 0x80 == 0 {
        frames::<Sample>(rest, limit, |_| {});
        return;
    }
    let Ok(sample) = Sample::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    match codec::encode_frame(&sample, limit) {
        Ok(frame) => {
            let header = frame[..HEADER_LEN]
                .try_into()
                .expect("frames have a header");
            let len = codec::frame_len(header, limit).expect("an encoded frame's header is valid");
            let payload = &frame[HEADER_LEN..];
            assert_eq!(len, payload.len());
            let back: Sample = codec::from_bytes(payload, limit).expect("an encoded frame decodes");
            assert_eq!(back, sample);
            let mut longer = payload.to_vec();
            longer.push(0);
            match codec::from_bytes::<Sample>(&longer, limit) {
                Err(CodecError::Trailing { extra: 1 }) | Err(CodecError::TooLarge { .. }) => {}
                other => panic!("a payload with a byte appended gave {other:?}"),
            }
        }
        Err(CodecError::TooLarge { len, .. }) => assert!(len > limit),
        Err(e) => panic!("encoding a sample failed: {e}"),
    }
});
