//! Enrollment tokens as a person pastes them (`Token::decode`). The first byte picks what
//! the rest is: the pasted text itself, or the bytes behind the `hrld1_` prefix (so the
//! fuzzer reaches the decoding after base64 without having to discover base64). A token
//! that decodes must encode and decode back equal.

#![no_main]

use base64::Engine;
use herald_fuzz::Input;
use herald_shared::token::{Token, TOKEN_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let text = match input.byte() & 1 {
        0 => String::from_utf8_lossy(input.rest()).into_owned(),
        _ => format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(input.rest())
        ),
    };
    let Ok(token) = Token::decode(&text) else {
        return;
    };
    let again = Token::decode(&token.encode()).expect("an encoded token decodes");
    assert_eq!(again, token);
    assert_eq!(token.secret_hash().len(), 64);
});
