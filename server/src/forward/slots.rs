//! Who gets the forwarder's send slots. Sends run a few at a time, each for up to the
//! attempt timeout; without a rule, one user with many rules to an endpoint that never
//! answers would hold every slot and delay everyone's results. So a user has at most
//! [`Fairness::per_user`] sends under way, a destination host at most
//! [`Fairness::per_host`], and due deliveries are taken round-robin by user
//! (`Store::due_deliveries`). Pure: the caller passes what is due and what is under way.

use crate::model::{Candidate, Kind};

/// Sends under way at once, in all, per user and per destination host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fairness {
    /// In all.
    pub total: usize,
    /// Of one user's rules.
    pub per_user: usize,
    /// To one destination host (see [`host_key`]).
    pub per_host: usize,
}

impl Fairness {
    /// The forwarder's defaults.
    pub const DEFAULT: Fairness = Fairness {
        total: 16,
        per_user: 2,
        per_host: 2,
    };
}

/// A send under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Flight {
    /// The delivery (`None`: a confirmation code).
    pub delivery: Option<i64>,
    /// Whose.
    pub user: i64,
    /// Where to ([`host_key`]).
    pub host: Option<String>,
}

/// The host a send connects to or is about, for the per-host limit: a webhook's URL
/// host, an e-mail's recipient domain (both lowercase). SMS all go to the operator's
/// gateway and have none: the per-user limit covers them.
pub(super) fn host_key(kind: Option<Kind>, target: &str) -> Option<String> {
    match kind? {
        Kind::Webhook => reqwest::Url::parse(target)
            .ok()?
            .host_str()
            .map(str::to_ascii_lowercase),
        Kind::Email => target
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_ascii_lowercase()),
        Kind::Sms => None,
    }
}

/// Picks, in order, the candidates that may start now beside the sends under way in
/// `flying`: none already under way, none past a user's or host's limit, and no more
/// than the room left in all.
pub(super) fn pick(
    candidates: Vec<Candidate>,
    flying: &[&Flight],
    limits: &Fairness,
) -> Vec<(Candidate, Flight)> {
    let mut under_way: Vec<Flight> = flying.iter().map(|f| (*f).clone()).collect();
    let mut picked = Vec::new();
    for candidate in candidates {
        if under_way.len() >= limits.total {
            break;
        }
        if under_way.iter().any(|f| f.delivery == Some(candidate.id)) {
            continue;
        }
        let user_busy = under_way
            .iter()
            .filter(|f| f.user == candidate.user)
            .count();
        if user_busy >= limits.per_user {
            continue;
        }
        let host = host_key(candidate.kind, &candidate.target);
        if let Some(host) = &host {
            let host_busy = under_way
                .iter()
                .filter(|f| f.host.as_ref() == Some(host))
                .count();
            if host_busy >= limits.per_host {
                continue;
            }
        }
        let flight = Flight {
            delivery: Some(candidate.id),
            user: candidate.user,
            host,
        };
        under_way.push(flight.clone());
        picked.push((candidate, flight));
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(id: i64, user: i64, url: &str) -> Candidate {
        Candidate {
            id,
            user,
            kind: Some(Kind::Webhook),
            target: url.into(),
        }
    }

    fn ids(picked: &[(Candidate, Flight)]) -> Vec<i64> {
        picked.iter().map(|(c, _)| c.id).collect()
    }

    #[test]
    fn hosts_are_the_url_host_or_the_mail_domain() {
        assert_eq!(
            host_key(Some(Kind::Webhook), "https://Hooks.Example.org:8443/x?y"),
            Some("hooks.example.org".into())
        );
        assert_eq!(
            host_key(Some(Kind::Email), "Ann@Mail.Example.org"),
            Some("mail.example.org".into())
        );
        assert_eq!(host_key(Some(Kind::Sms), "+15551234567"), None);
        assert_eq!(host_key(None, "https://x.example"), None);
        assert_eq!(host_key(Some(Kind::Webhook), "not a url"), None);
    }

    #[test]
    fn one_user_gets_two_slots_and_the_others_get_theirs() {
        // Ann's five deliveries (to five hosts) come first in time; bob's after.
        let mut due: Vec<Candidate> = (1..=5)
            .map(|n| hook(n, 1, &format!("https://h{n}.example/")))
            .collect();
        due.push(hook(6, 2, "https://b.example/"));
        let picked = pick(due, &[], &Fairness::DEFAULT);
        assert_eq!(ids(&picked), [1, 2, 6]);
    }

    #[test]
    fn sends_under_way_count_and_are_not_started_twice() {
        let busy = Flight {
            delivery: Some(1),
            user: 1,
            host: Some("h1.example".into()),
        };
        let due = vec![
            hook(1, 1, "https://h1.example/"),
            hook(2, 1, "https://h2.example/"),
            hook(3, 1, "https://h3.example/"),
        ];
        assert_eq!(ids(&pick(due, &[&busy], &Fairness::DEFAULT)), [2]);
    }

    #[test]
    fn one_host_gets_two_slots_whoever_asks() {
        let due: Vec<Candidate> = (1..=4)
            .map(|n| hook(n, n, "https://slow.example/hook"))
            .chain([hook(5, 5, "https://fast.example/hook")])
            .collect();
        assert_eq!(ids(&pick(due, &[], &Fairness::DEFAULT)), [1, 2, 5]);
    }

    #[test]
    fn the_total_is_a_ceiling() {
        let due: Vec<Candidate> = (1..=40)
            .map(|n| hook(n, n, &format!("https://h{n}.example/")))
            .collect();
        let limits = Fairness {
            total: 16,
            ..Fairness::DEFAULT
        };
        let busy = Flight {
            delivery: None,
            user: 99,
            host: None,
        };
        assert_eq!(pick(due, &[&busy], &limits).len(), 15);
    }
}
