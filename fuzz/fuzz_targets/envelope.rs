//! Signed envelopes and what they carry (`herald_shared::envelope`). The first byte picks
//! what the rest is:
//!
//! - `0`: an [`Envelope`] as it arrives in a frame: it is peeked and opened against its own
//!   signer (the signature check must refuse, never panic), and whatever statement it
//!   carries is signed again with a test key and must open back equal;
//! - `1`: an agent id, its groups, the time and its replay history, then a [`Statement`]:
//!   an order inside it is put through [`Order::check`], whose verdict must agree with the
//!   order's audience, validity window and repeat rule;
//!   A message inside it is signed into a full chain (an operator grant for a sender key,
//!   the message signed by that key) and put through [`message::open`] and
//!   [`Opened::check`], whose verdicts must agree with the message's limits, its
//!   advertising flag, audience, expiry, the replay cache and the block list;
//! - `2`: text for the small parsers beside them: targets (`agent:<id>`), hex keys and
//!   browser URLs. An accepted browser URL is parsed again with the `url` crate (the
//!   WHATWG parser browsers use): plain `http:` must then name a loopback host, and no
//!   URL may carry user info.

#![no_main]

use std::str::FromStr;
use std::sync::OnceLock;

use herald_fuzz::{round_trip, Input};
use herald_shared::codec::{self, DEFAULT_FRAME_LIMIT};
use herald_shared::envelope::{
    check_browser_url, Action, Audience, Envelope, EnvelopeError, History, OperatorKey, Order,
    PublicKey, Refusal, Repeat, Statement, MAX_PAYLOAD,
};
use herald_shared::message::{self, MessageRefusal, Opened, SenderGrant, Verdict};
use libfuzzer_sys::fuzz_target;

fn operator() -> &'static OperatorKey {
    static KEY: OnceLock<OperatorKey> = OnceLock::new();
    KEY.get_or_init(|| OperatorKey::from_seed([1; 32]))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.byte() % 3 {
        0 => envelope(input.rest()),
        1 => statement(input),
        _ => text(&input.text()),
    }
});

fn envelope(bytes: &[u8]) {
    let Ok(envelope) = codec::from_bytes::<Envelope>(bytes, DEFAULT_FRAME_LIMIT) else {
        return;
    };
    round_trip(&envelope, bytes.len(), DEFAULT_FRAME_LIMIT);
    let peeked = envelope.peek();
    assert!(matches!(
        envelope.open(&[]),
        Err(EnvelopeError::UntrustedSigner)
    ));
    if let Ok(opened) = envelope.open(&[envelope.signer]) {
        // Only reachable with a real signature; what opens is what peek reads.
        assert_eq!(peeked.as_ref().ok(), Some(&opened));
    }
    // Whatever arrives, opening it as a message refuses or accepts; it never panics.
    let _ = message::open(&envelope, &[operator().public()]);
    if let Ok(statement) = peeked {
        sign_again(&statement);
    }
}

/// Whatever a payload decodes to can be signed and opens back to itself, and a flipped
/// payload byte is refused.
fn sign_again(statement: &Statement) {
    let key = operator();
    match key.sign(statement) {
        Ok(mut envelope) => {
            let opened = envelope
                .open(&[key.public()])
                .expect("a freshly signed envelope opens");
            assert_eq!(&opened, statement);
            let last = envelope.payload.len() - 1;
            envelope.payload[last] ^= 0x01;
            assert!(matches!(
                envelope.open(&[key.public()]),
                Err(EnvelopeError::BadSignature)
            ));
        }
        Err(EnvelopeError::TooLarge(len)) => assert!(len > MAX_PAYLOAD),
        Err(e) => panic!("signing a decoded statement failed: {e}"),
    }
}

fn statement(mut input: Input<'_>) {
    let agent_id = input.text().into_owned();
    let groups: Vec<String> = input.text().split(',').map(String::from).collect();
    let now = input.i64();
    let history = match input.byte() & 1 {
        0 => History::Unseen,
        _ => History::LastRun(input.i64()),
    };
    let bytes = input.rest();
    let Ok(statement) = codec::from_bytes::<Statement>(bytes, MAX_PAYLOAD) else {
        return;
    };
    round_trip(&statement, bytes.len(), MAX_PAYLOAD);
    sign_again(&statement);
    match &statement {
        Statement::Order(order) => check_order(order, &agent_id, &groups, now, history),
        Statement::Message(m) => check_message(m, &agent_id, &groups, now, input_flags(history)),
        _ => {}
    }
}

/// Two flags for a message's checks from the replay history's shape: (seen, blocked).
fn input_flags(history: History) -> (bool, bool) {
    match history {
        History::Unseen => (false, false),
        History::LastRun(at) => (at & 1 == 1, at & 2 == 2),
    }
}

/// A message signed into a real chain opens exactly when it keeps the limits and its
/// grant allows its advertising flag; then the agent's verdict agrees with audience,
/// replay, expiry and the block list, in that order.
fn check_message(
    m: &message::Message,
    agent_id: &str,
    groups: &[String],
    now: i64,
    (seen, blocked): (bool, bool),
) {
    let sender_key = OperatorKey::from_seed([2; 32]);
    for ads in [false, true] {
        let Ok(grant) = operator().sign(&Statement::Sender(SenderGrant {
            sender: m.sender.clone(),
            display_name: "Fuzz".into(),
            key: sender_key.public(),
            advertising: ads,
            issued_at: 0,
        })) else {
            return;
        };
        let mut m = m.clone();
        m.grant = grant;
        let Ok(envelope) = sender_key.sign(&Statement::Message(m.clone())) else {
            return;
        };
        match message::open(&envelope, &[operator().public()]) {
            Ok(opened) => {
                assert!(m.validate().is_ok() && (ads || !m.advertising));
                assert_eq!(opened.message, m);
                verdict(&opened, agent_id, groups, now, seen, blocked);
            }
            Err(MessageRefusal::Advertising(_)) => assert!(m.advertising && !ads),
            Err(MessageRefusal::Invalid(_)) => assert!(m.validate().is_err()),
            Err(other) => panic!("a real chain refused with {other}"),
        }
    }
}

fn verdict(
    opened: &Opened,
    agent_id: &str,
    groups: &[String],
    now: i64,
    seen: bool,
    blocked: bool,
) {
    let m = &opened.message;
    let addressed = match &m.audience {
        Audience::Agent(id) => id == agent_id,
        Audience::Group(group) => groups.contains(group),
        Audience::All => true,
    };
    let expected = if !addressed {
        "refuse"
    } else if seen {
        "seen"
    } else if now > m.expires_at {
        "expired"
    } else if blocked {
        "blocked"
    } else {
        "keep"
    };
    let got = match opened.check(agent_id, groups, now, seen, blocked) {
        Verdict::Keep => "keep",
        Verdict::Seen => "seen",
        Verdict::Expired => "expired",
        Verdict::Refuse(MessageRefusal::Blocked) => "blocked",
        Verdict::Refuse(MessageRefusal::NotForMe(_)) => "refuse",
        Verdict::Refuse(other) => panic!("check refused with {other}"),
    };
    assert_eq!(got, expected, "{m:?}");
}

fn check_order(order: &Order, agent_id: &str, groups: &[String], now: i64, history: History) {
    let _ = (order.action.kind(), order.action.describe());
    if let Action::Open(open) = &order.action {
        text(&open.url);
    }
    let addressed = match &order.audience {
        Audience::Agent(id) => id == agent_id,
        Audience::Group(group) => groups.contains(group),
        Audience::All => true,
    };
    let in_window = order.not_before <= now && now <= order.not_after;
    // The true time since the last run, without saturation or wrapping.
    let since = |last: i64| i128::from(now) - i128::from(last);
    match order.check(agent_id, groups, now, history) {
        Ok(()) => {
            assert!(addressed && in_window, "{order:?} accepted at {now}");
            match (order.repeat, history) {
                (_, History::Unseen) => {}
                (Repeat::Once, History::LastRun(_)) => panic!("one-off order ran twice"),
                (Repeat::Standing { min_interval_ms }, History::LastRun(last)) => assert!(
                    since(last) >= i128::from(min_interval_ms),
                    "standing order every {min_interval_ms} ms ran again after {} ms",
                    since(last)
                ),
            }
        }
        Err(Refusal::NotForMe(_)) => assert!(!addressed),
        Err(Refusal::NotYetValid) => assert!(addressed && now < order.not_before),
        Err(Refusal::Expired) => assert!(addressed && now > order.not_after),
        Err(Refusal::Replayed) => assert!(
            in_window && order.repeat == Repeat::Once && matches!(history, History::LastRun(_))
        ),
        Err(Refusal::TooSoon { min_ms, .. }) => match history {
            History::LastRun(last) => assert!(in_window && since(last) < i128::from(min_ms)),
            History::Unseen => panic!("an unseen order was too soon"),
        },
        Err(other) => panic!("Order::check refused with {other:?}"),
    }
}

fn text(text: &str) {
    if let Ok(audience) = Audience::from_str(text) {
        assert_eq!(audience.to_string().parse::<Audience>(), Ok(audience));
    }
    if let Ok(key) = PublicKey::from_hex(text) {
        assert_eq!(PublicKey::from_hex(&key.to_hex()).ok(), Some(key));
    }
    if let Ok(key) = OperatorKey::from_hex(text) {
        let again = OperatorKey::from_hex(&key.to_hex()).expect("a key's hex parses");
        assert_eq!(again.public(), key.public());
    }
    if check_browser_url(text).is_ok() {
        browser_url(text);
    }
}

/// What a browser makes of a URL the agent accepted.
fn browser_url(accepted: &str) {
    // A URL the WHATWG parser refuses is not opened by a browser either.
    let Ok(url) = url::Url::parse(accepted) else {
        return;
    };
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "{accepted:?} carries user info"
    );
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Domain(name)) => name == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            assert!(loopback, "{accepted:?} is plain http to {:?}", url.host());
        }
        other => panic!("{accepted:?} accepted with scheme {other}"),
    }
}
