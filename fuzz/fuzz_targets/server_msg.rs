//! What an agent reads from the server: [`ServerMsg`] frames on the control stream, the
//! reason a closing server gives (`close::reconnect_window`), and the first frames of
//! the peers streams (an offer on a stream the server opens, the server's answer to a
//! request, and what a provider reads from whoever dialled its direct endpoint), picked
//! by the first byte. Envelopes inside the messages are peeked and opened against a pinned key the way
//! the agent does (the signatures will not verify; the decoding before them is the point).

#![no_main]

use std::time::Duration;

use herald_fuzz::{frames, Input};
use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::envelope::{Envelope, PublicKey};
use herald_shared::peers::{DirectOpen, Offer, OfferAnswer, StreamAnswer};
use herald_shared::protocol::{close, ServerMsg};
use libfuzzer_sys::fuzz_target;

/// Longest reconnect window a reason may impose (ten minutes, `MAX_WINDOW_MS`).
const MAX_WINDOW: Duration = Duration::from_secs(600);

fn open(envelope: &Envelope) {
    let _ = envelope.peek();
    let _ = envelope.open(&[envelope.signer, PublicKey([7; 32])]);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let kind = input.byte();
    if kind & 3 == 2 {
        let rest = input.rest();
        let _ = Offer::decode(rest, DEFAULT_FRAME_LIMIT);
        frames::<StreamAnswer>(rest, DEFAULT_FRAME_LIMIT, |_| {});
        frames::<DirectOpen>(rest, DEFAULT_FRAME_LIMIT, |_| {});
        frames::<OfferAnswer>(rest, DEFAULT_FRAME_LIMIT, |_| {});
        return;
    }
    if kind & 1 == 1 {
        if let Some(window) = close::reconnect_window(input.rest()) {
            assert!(window.start <= window.end, "reversed window {window:?}");
            assert!(window.end <= MAX_WINDOW, "window {window:?} beyond the cap");
        }
        return;
    }
    frames::<ServerMsg>(input.rest(), DEFAULT_FRAME_LIMIT, |msg| match msg {
        ServerMsg::Welcome(welcome) => welcome.membership.iter().for_each(open),
        ServerMsg::Signal(signal) => {
            open(&signal.envelope);
            if let Some(bundle) = &signal.bundle {
                open(&bundle.release);
                bundle.delegation.iter().for_each(open);
            }
        }
        ServerMsg::Membership(envelope) => open(envelope),
        _ => {}
    });
});
