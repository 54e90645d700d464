//! What the server reads from an agent: [`AgentMsg`] frames on the control stream (at
//! most [`DEFAULT_FRAME_LIMIT`]) or on a result stream (at most [`RESULT_FRAME_LIMIT`]),
//! picked by the first byte. Any bytes must decode or be refused without a panic, and
//! whatever decodes must round-trip.

#![no_main]

use herald_fuzz::{frames, Input};
use herald_shared::codec::{DEFAULT_FRAME_LIMIT, RESULT_FRAME_LIMIT};
use herald_shared::protocol::AgentMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limit = if input.byte() & 1 == 0 {
        DEFAULT_FRAME_LIMIT
    } else {
        RESULT_FRAME_LIMIT
    };
    frames::<AgentMsg>(input.rest(), limit, |msg| match msg {
        // What the server prints and stores of them.
        AgentMsg::Progress { progress, .. } => drop(progress.to_string()),
        AgentMsg::Result(result) => drop(result.status.as_str()),
        _ => {}
    });
});
