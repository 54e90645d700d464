//! Confirming an e-mail or SMS forwarding rule: before a rule forwards anything, its
//! owner proves they read that mailbox or phone by entering a 6-digit code the server
//! sent there. This is what keeps forwarding from being an open relay to addresses and
//! numbers a user merely typed in. Pure functions: the randomness and the time are
//! passed in, so every rule here is unit-tested. The forwarder draws and sends the
//! codes (`crate::forward`); the store keeps their hashes and checks what a user
//! entered (`crate::store`).

use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use herald_shared::Millis;

/// How long a code may be entered.
pub const CODE_TTL: Duration = Duration::from_secs(3600);
/// Wrong entries after which a code is void (the owner asks for a new one).
pub const MAX_WRONG_TRIES: u32 = 5;
/// Codes sent to one destination of a user within [`CODE_WINDOW`].
pub const MAX_CODES_PER_WINDOW: u32 = 3;
/// The window of [`MAX_CODES_PER_WINDOW`].
pub const CODE_WINDOW: Duration = Duration::from_secs(3600);
/// Digits in a code.
pub const CODE_DIGITS: usize = 6;

/// Codes are uniform over `0..CODE_SPACE`.
const CODE_SPACE: u32 = 1_000_000;

/// A new code, uniform over `000000..=999999`: `random` yields uniform 32-bit values;
/// those at the top of the range that would bias the remainder are drawn again.
pub fn new_code(mut random: impl FnMut() -> u32) -> String {
    // The largest multiple of CODE_SPACE that fits: values at or above it are redrawn.
    const ACCEPT_BELOW: u32 = u32::MAX - u32::MAX % CODE_SPACE;
    loop {
        let value = random();
        if value < ACCEPT_BELOW {
            return format!("{:0width$}", value % CODE_SPACE, width = CODE_DIGITS);
        }
    }
}

/// What the store keeps of a code: `SALT$HASH` (hex), the hash being SHA-256 over the
/// salt, the rule's id and the code, so a code is good for its own rule only.
pub fn hash_code(destination_id: i64, code: &str, salt: [u8; 16]) -> String {
    format!(
        "{}${}",
        hex::encode(salt),
        hex::encode(digest(&salt, destination_id, code))
    )
}

fn digest(salt: &[u8], destination_id: i64, code: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(destination_id.to_le_bytes());
    hasher.update(code.as_bytes());
    hasher.finalize().into()
}

/// Whether `code` is the one hashed into `stored` (constant time; false for anything
/// unreadable).
fn matches(stored: &str, destination_id: i64, code: &str) -> bool {
    let Some((salt, hash)) = stored.split_once('$') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (hex::decode(salt), hex::decode(hash)) else {
        return false;
    };
    bool::from(digest(&salt, destination_id, code).ct_eq(hash.as_slice()))
}

/// The code state of an unconfirmed rule, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingCode {
    /// [`hash_code`] of the latest code, if one was made and is not void.
    pub hash: Option<String>,
    /// When that code stops being accepted.
    pub expires_at: Option<Millis>,
    /// Wrong entries of that code so far.
    pub tries: u32,
}

/// The answer to an entered code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The right code, in time: the rule is confirmed.
    Confirmed,
    /// Not 6 digits: nothing is counted.
    Malformed,
    /// A wrong code; `tries_left` more may be entered (0: the code is now void).
    Wrong {
        /// Entries left before the code is void.
        tries_left: u32,
    },
    /// The code is older than [`CODE_TTL`].
    Expired,
    /// [`MAX_WRONG_TRIES`] wrong codes were entered already.
    TooManyTries,
    /// No code was made yet (or the last one is void).
    NoCode,
}

impl Verdict {
    /// What to tell the user.
    pub fn message(self) -> String {
        match self {
            Verdict::Confirmed => "confirmed".into(),
            Verdict::Malformed => format!("enter the {CODE_DIGITS}-digit code we sent"),
            Verdict::Wrong { tries_left: 0 } | Verdict::TooManyTries => {
                "that code is wrong, and too many wrong codes were entered: send a new code".into()
            }
            Verdict::Wrong { tries_left } => {
                format!("that code is wrong ({tries_left} more tries)")
            }
            Verdict::Expired => "that code has expired: send a new code".into(),
            Verdict::NoCode => "no code is waiting for this rule: send a new code".into(),
        }
    }
}

/// Checks an entered code against the stored state at `now`. Spaces in what was
/// entered are ignored.
pub fn check_code(
    destination_id: i64,
    pending: &PendingCode,
    entered: &str,
    now: Millis,
) -> Verdict {
    let entered: String = entered.chars().filter(|c| !c.is_whitespace()).collect();
    if entered.len() != CODE_DIGITS || !entered.bytes().all(|b| b.is_ascii_digit()) {
        return Verdict::Malformed;
    }
    let Some(hash) = &pending.hash else {
        return Verdict::NoCode;
    };
    if pending.tries >= MAX_WRONG_TRIES {
        return Verdict::TooManyTries;
    }
    if pending.expires_at.is_none_or(|at| now >= at) {
        return Verdict::Expired;
    }
    if matches(hash, destination_id, &entered) {
        Verdict::Confirmed
    } else {
        Verdict::Wrong {
            tries_left: MAX_WRONG_TRIES - pending.tries - 1,
        }
    }
}

/// When a code made at `now` expires.
pub fn code_expiry(now: Millis) -> Millis {
    now.saturating_add(CODE_TTL.as_millis() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: [u8; 16] = [7; 16];
    const NOW: Millis = 1_700_000_000_000;

    fn pending(code: &str) -> PendingCode {
        PendingCode {
            hash: Some(hash_code(9, code, SALT)),
            expires_at: Some(code_expiry(NOW)),
            tries: 0,
        }
    }

    #[test]
    fn codes_are_six_digits_and_biased_values_are_redrawn() {
        assert_eq!(new_code(|| 42), "000042");
        assert_eq!(new_code(|| 4_293_999_999), "999999");
        // The top of the range would favour low codes: redrawn.
        let mut draws = [u32::MAX, 4_294_000_000, 123_456_789].into_iter();
        assert_eq!(new_code(|| draws.next().unwrap()), "456789");
    }

    #[test]
    fn the_hash_is_salted_bound_to_the_rule_and_not_the_code() {
        let stored = hash_code(9, "123456", SALT);
        assert!(!stored.contains("123456"));
        assert_ne!(stored, hash_code(9, "123456", [8; 16]));
        assert!(matches(&stored, 9, "123456"));
        assert!(!matches(&stored, 10, "123456"));
        assert!(!matches(&stored, 9, "123457"));
        assert!(!matches("garbage", 9, "123456"));
    }

    #[test]
    fn the_right_code_in_time_confirms() {
        assert_eq!(
            check_code(9, &pending("123456"), " 123 456 ", NOW),
            Verdict::Confirmed
        );
        assert_eq!(
            check_code(10, &pending("123456"), "123456", NOW),
            Verdict::Wrong { tries_left: 4 }
        );
    }

    #[test]
    fn a_code_expires_after_an_hour() {
        let p = pending("123456");
        assert_eq!(
            check_code(9, &p, "123456", NOW + 3_599_999),
            Verdict::Confirmed
        );
        assert_eq!(
            check_code(9, &p, "123456", NOW + 3_600_000),
            Verdict::Expired
        );
    }

    #[test]
    fn five_wrong_codes_void_the_code() {
        let mut p = pending("123456");
        for left in (0..MAX_WRONG_TRIES).rev() {
            assert_eq!(
                check_code(9, &p, "000000", NOW),
                Verdict::Wrong { tries_left: left }
            );
            p.tries += 1;
        }
        // Even the right code no longer works.
        assert_eq!(check_code(9, &p, "123456", NOW), Verdict::TooManyTries);
    }

    #[test]
    fn malformed_input_and_a_missing_code_are_told_apart() {
        for input in ["", "12345", "1234567", "12345a", "１２３４５６"] {
            assert_eq!(
                check_code(9, &pending("123456"), input, NOW),
                Verdict::Malformed,
                "{input}"
            );
        }
        assert_eq!(
            check_code(9, &PendingCode::default(), "123456", NOW),
            Verdict::NoCode
        );
    }
}
