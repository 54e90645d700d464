//! The forwarder against a real store in a temporary directory and real receivers on
//! loopback: an HTTP server (webhooks, the SMS gateway) and aiosmtpd with STARTTLS.
//! The guards against abuse (confirmation codes, daily limits, fair slots, what an SMS
//! says) are tested here end to end through the forwarder task.

use std::time::Duration;

use tokio::sync::{broadcast, oneshot};

use herald_tests::receivers::{HttpReceiver, Reply, SmtpReceiver};
use herald_tests::TempDir;

use super::*;
use crate::config::{SmsBodyFormat, SmsConfig, SmtpConfig, SmtpTls};
use crate::model::{JobEvent, NewDestination, Role, Verdict, FORWARDED_STATES};
use crate::store::{Store, TestJob};

const WAIT: Duration = Duration::from_secs(20);

// === fixture ===

struct Fixture {
    _dir: TempDir,
    store: Store,
    user: i64,
    agent: String,
    order: String,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = TempDir::new(name);
        let store = Store::open(dir.path()).expect("open store");
        let now = crate::now_ms();
        store.insert_test_agent("agent-1", "laptop", now);
        store.insert_test_order("order-1", "run /usr/bin/scan", now);
        store.insert_test_catalog_entry("scan", "Virus scan", "order-1", now);
        let mut fixture = Fixture {
            _dir: dir,
            store,
            user: 0,
            agent: "agent-1".into(),
            order: "order-1".into(),
        };
        fixture.user = fixture.add_user("alice");
        fixture
    }

    fn add_user(&self, login: &str) -> i64 {
        self.store
            .add_user(login, "x", Role::User, "", "", 0)
            .unwrap()
    }

    /// A subscription of `owner` to the catalog entry.
    fn add_subscription(&self, owner: i64) -> i64 {
        self.store
            .insert_test_subscription(owner, &self.order, "agent:agent-1", "scan")
    }

    /// A job of a schedule, as the scheduler creates it (`forward_pending = 1`), in
    /// `state`.
    fn add_job(&self, schedule: i64, state: &str) -> i64 {
        let final_fields = state
            .parse::<crate::model::JobState>()
            .is_ok_and(|s| s.is_final());
        self.store.insert_test_job(&TestJob {
            agent_id: &self.agent,
            order_id: &self.order,
            schedule_id: Some(schedule),
            state,
            created_at: 0,
            deliver_after: 0,
            expires_at: i64::MAX / 2,
            forward_pending: true,
            exit_code: final_fields.then_some(if state == "succeeded" { 0 } else { 3 }),
            stdout: final_fields.then_some(b"found 2 threats\n".as_slice()),
            error: (final_fields && state != "succeeded").then_some("exited with 3"),
            finished_at: final_fields.then_some(1_700_000_000_000i64),
        })
    }

    fn set_state(&self, job: i64, state: &str) {
        self.store.set_test_job_state(job, state);
    }

    /// A confirmed rule.
    fn add_rule(
        &self,
        user: i64,
        subscription: Option<i64>,
        kind: &str,
        target: &str,
        only_failures: bool,
    ) -> i64 {
        self.store.insert_test_rule(
            user,
            subscription,
            kind,
            target,
            (kind == "webhook").then_some(SECRET),
            only_failures,
        )
    }

    /// A rule as the console adds it: e-mail and SMS unconfirmed, with a code asked for.
    fn add_rule_as_console(&self, user: i64, kind: &str, target: &str) -> i64 {
        self.store
            .add_destination(
                &NewDestination {
                    user_id: user,
                    schedule_id: None,
                    kind,
                    target,
                    secret: (kind == "webhook").then_some(SECRET),
                    only_failures: false,
                },
                crate::now_ms(),
            )
            .unwrap()
    }

    /// (job, destination) of every delivery, in id order.
    fn deliveries(&self) -> Vec<(i64, i64)> {
        self.store.test_delivery_routes()
    }

    fn delivery_of(&self, job: i64, destination: i64) -> i64 {
        self.store.test_delivery_id(job, destination)
    }

    /// (state, attempts, last_error) of a delivery.
    fn delivery(&self, id: i64) -> (String, i64, Option<String>) {
        self.store.test_delivery_state(id)
    }

    /// (ok, detail) of every attempt of a delivery, in order.
    fn attempts(&self, id: i64) -> Vec<(bool, String)> {
        self.store
            .test_delivery_attempts(id)
            .into_iter()
            .map(|a| (a.ok, a.detail))
            .collect()
    }

    async fn wait_state(&self, delivery: i64, state: &str) -> (String, i64, Option<String>) {
        let what = format!("delivery {delivery} to be {state}");
        poll(&what, || {
            let row = self.delivery(delivery);
            (row.0 == state).then_some(row)
        })
        .await
    }

    fn start(&self, settings: Settings) -> Forwarder {
        Forwarder::start(self.store.clone(), settings)
    }
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Enqueues under the default limits; how many deliveries were queued.
fn queued(store: &Store, now: i64) -> usize {
    enqueue(store, now, &DailyLimits::DEFAULT).unwrap().queued
}

/// Polls a database condition (written by another task) until it holds.
async fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settings() -> Settings {
    Settings {
        allow_http: true,
        allow_private_targets: true,
        retry: RetryPolicy {
            max_attempts: 3,
            first_retry: Duration::from_millis(100),
        },
        timeout: Duration::from_secs(5),
        fairness: Fairness::DEFAULT,
        daily: DailyLimits::DEFAULT,
        // Long: the tests show that events and retry times wake the forwarder.
        scan_interval: Duration::from_secs(3600),
        smtp: None,
        sms: None,
        fallback_per_sender_day: 100,
        fallback_concurrency: 4,
        fallbacks: Default::default(),
    }
}

/// A running forwarder; stopped on drop.
struct Forwarder {
    events: broadcast::Sender<JobEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    fn start(store: Store, settings: Settings) -> Forwarder {
        let (events, receiver) = broadcast::channel(16);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(store, receiver, settings, async {
            let _ = stopped.await;
        }));
        Forwarder {
            events,
            stop: Some(stop),
            task,
        }
    }

    fn job_changed(&self, job_id: i64) {
        let _ = self.events.send(JobEvent { job_id });
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(WAIT, task)
            .await
            .expect("forwarder stops")
            .expect("forwarder does not panic");
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body).as_ref())
}

// === queueing ===

#[test]
fn enqueue_follows_only_failures_and_the_rule_scope() {
    let f = Fixture::new("forward-scope");
    let bob = f.add_user("bob");
    let sub1 = f.add_subscription(f.user);
    let sub2 = f.add_subscription(f.user);
    let bobs = f.add_subscription(bob);
    let all_every = f.add_rule(f.user, None, "email", "a@example.org", false);
    let sub1_failures = f.add_rule(f.user, Some(sub1), "sms", "+15551234567", true);
    let sub2_every = f.add_rule(f.user, Some(sub2), "webhook", "https://h.example/x", false);
    let bob_all = f.add_rule(bob, None, "email", "b@example.org", false);

    let ok1 = f.add_job(sub1, "succeeded");
    let failed1 = f.add_job(sub1, "failed");
    let failed2 = f.add_job(sub2, "timed_out");
    let running = f.add_job(sub1, "running");
    let waiting = f.add_job(sub1, "waiting");
    let bobs_job = f.add_job(bobs, "succeeded");
    // A job not of a subscription (forward_pending stays 0) is never forwarded.
    let plain = f.add_job(sub1, "failed");
    f.store.set_test_forward_pending(plain, false);

    let created = queued(&f.store, 1);
    let mut expected = vec![
        (ok1, all_every),
        (failed1, all_every),
        (failed1, sub1_failures),
        (failed2, all_every),
        (failed2, sub2_every),
        (bobs_job, bob_all),
    ];
    expected.sort_unstable();
    let mut got = f.deliveries();
    got.sort_unstable();
    assert_eq!(got, expected);
    assert_eq!(created, expected.len());

    // Unfinished jobs wait: a browser job in `waiting` too.
    f.set_state(running, "succeeded");
    f.set_state(waiting, "failed");
    queued(&f.store, 2);
    let got = f.deliveries();
    assert!(got.contains(&(running, all_every)));
    assert!(!got.contains(&(running, sub1_failures)));
    assert!(got.contains(&(waiting, all_every)));
    assert!(got.contains(&(waiting, sub1_failures)));
    assert_eq!(got.len(), expected.len() + 3);
}

#[test]
fn nothing_is_enqueued_twice() {
    let f = Fixture::new("forward-twice");
    let sub = f.add_subscription(f.user);
    f.add_rule(f.user, None, "email", "a@example.org", false);
    f.add_rule(f.user, Some(sub), "email", "b@example.org", false);
    for _ in 0..3 {
        f.add_job(sub, "failed");
    }
    assert_eq!(queued(&f.store, 1), 6);
    assert_eq!(queued(&f.store, 2), 0);
    // A store reopened (a restart) does not enqueue them again either.
    let reopened = Store::open(f._dir.path()).unwrap();
    assert_eq!(queued(&reopened, 3), 0);
    assert_eq!(f.deliveries().len(), 6);
}

#[test]
fn a_job_of_a_deleted_subscription_is_dropped_quietly() {
    let f = Fixture::new("forward-deleted-sub");
    let sub = f.add_subscription(f.user);
    f.add_rule(f.user, None, "email", "a@example.org", false);
    let job = f.add_job(sub, "failed");
    f.store.remove_schedule(sub).unwrap();
    assert_eq!(queued(&f.store, 1), 0);
    let pending: i64 = f.store.test_forward_pending(job);
    assert_eq!(pending, 0);
}

#[test]
fn unconfirmed_rules_get_nothing_until_confirmed() {
    let f = Fixture::new("forward-unconfirmed");
    let sub = f.add_subscription(f.user);
    let email = f.add_rule_as_console(f.user, "email", "a@example.org");
    let sms = f.add_rule_as_console(f.user, "sms", "+15551234567");
    let hook = f.add_rule_as_console(f.user, "webhook", "https://h.example/x");
    let first = f.add_job(sub, "failed");
    queued(&f.store, 1);
    // The webhook needs no code; the e-mail and SMS rules forward nothing yet.
    assert_eq!(f.deliveries(), [(first, hook)]);

    f.store.set_test_rule_confirmed_at(email, Some(2));
    let second = f.add_job(sub, "failed");
    queued(&f.store, 3);
    let got = f.deliveries();
    assert!(got.contains(&(second, email)) && got.contains(&(second, hook)));
    assert!(!got.iter().any(|(_, d)| *d == sms), "{got:?}");
}

#[test]
fn results_of_runs_that_did_not_happen_are_not_forwarded() {
    let f = Fixture::new("forward-states");
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", "https://h.example/x", false);
    let forwarded: Vec<i64> = FORWARDED_STATES.iter().map(|s| f.add_job(sub, s)).collect();
    let not: Vec<i64> = ["refused", "expired", "canceled"]
        .iter()
        .map(|s| f.add_job(sub, s))
        .collect();
    assert_eq!(queued(&f.store, 1), forwarded.len());
    let jobs: Vec<i64> = f.deliveries().iter().map(|(j, _)| *j).collect();
    assert_eq!(jobs, forwarded);
    assert!(f.deliveries().iter().all(|(_, d)| *d == rule));
    // The others are handled all the same: not looked at again.
    let pending: i64 = f.store.test_forward_pending_count();
    assert_eq!(pending, 0, "{not:?}");
}

#[test]
fn over_the_daily_limit_a_delivery_is_given_up_at_once_and_logged() {
    let f = Fixture::new("forward-daily");
    let bob = f.add_user("bob");
    let sub = f.add_subscription(f.user);
    let bobs = f.add_subscription(bob);
    let hook = f.add_rule(f.user, None, "webhook", "https://h.example/x", false);
    let mail = f.add_rule(f.user, None, "email", "a@example.org", false);
    let sms = f.add_rule(f.user, None, "sms", "+15551234567", false);
    let bob_hook = f.add_rule(bob, None, "webhook", "https://b.example/x", false);
    let limits = DailyLimits {
        email_and_webhook: 3,
        sms: 1,
    };
    let now = 1_700_000_000_000;
    let jobs: Vec<i64> = (0..2).map(|_| f.add_job(sub, "failed")).collect();
    let bobs_job = f.add_job(bobs, "failed");
    let done = enqueue(&f.store, now, &limits).unwrap();
    // Ann: job 1 takes 2 of 3 e-mail/webhook and the 1 SMS; job 2 gets the third
    // e-mail/webhook (the webhook), not the e-mail, not the SMS. Bob has his own.
    let over: Vec<i64> = done.over_limit.iter().map(|(d, _, _)| *d).collect();
    assert_eq!(done.queued, 5);
    let expect_over = [f.delivery_of(jobs[1], mail), f.delivery_of(jobs[1], sms)];
    assert_eq!(over, expect_over);
    for id in expect_over {
        assert_eq!(
            f.delivery(id),
            ("given_up".into(), 1, Some(DAILY_LIMIT_REACHED.into()))
        );
        assert_eq!(f.attempts(id), [(false, DAILY_LIMIT_REACHED.to_string())]);
    }
    assert_eq!(f.delivery(f.delivery_of(jobs[1], hook)).0, "pending");
    assert_eq!(f.delivery(f.delivery_of(bobs_job, bob_hook)).0, "pending");

    // A day later there is room again; what was given up for the limit never counted.
    let later = f.add_job(sub, "failed");
    let day = crate::model::DAILY_WINDOW.as_millis() as i64;
    let done = enqueue(&f.store, now + day + 1, &limits).unwrap();
    assert_eq!((done.queued, done.over_limit.len()), (3, 0));
    assert_eq!(f.delivery(f.delivery_of(later, sms)).0, "pending");
}

#[tokio::test]
async fn old_deliveries_and_their_attempts_are_pruned() {
    let f = Fixture::new("forward-prune");
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", "http://127.0.0.1:9/x", false);
    // A running job: nothing to enqueue for it.
    let job = f.add_job(sub, "running");
    let now = crate::now_ms();
    let month = RETENTION.as_millis() as i64;
    let add = |state: &str, created_at: i64| -> i64 {
        f.store
            .insert_test_delivery(rule, f.user, job, state, created_at)
    };
    let old_sent = add("sent", now - month - 1000);
    let old_given_up = add("given_up", now - month - 1000);
    let recent = add("sent", now - month + 60_000);
    // A delivery still being retried is left to finish.
    let old_pending = add("pending", now - month - 1000);
    let forwarder = f.start(settings());
    poll("old deliveries to be deleted", || {
        let ids: Vec<i64> = f.store.test_delivery_ids();
        (ids == [recent, old_pending]).then_some(())
    })
    .await;
    for id in [old_sent, old_given_up] {
        assert!(f.attempts(id).is_empty());
    }
    assert_eq!(f.attempts(recent).len(), 1);
    forwarder.stop().await;
}

// === webhooks ===

#[tokio::test]
async fn webhook_gets_the_result_as_signed_json() {
    let f = Fixture::new("forward-webhook");
    let receiver = HttpReceiver::answering(200);
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, Some(sub), "webhook", &receiver.url("/hook"), false);
    let forwarder = f.start(settings());
    // Finished after the forwarder started: the relay's event wakes it.
    let job = f.add_job(sub, "failed");
    forwarder.job_changed(job);

    let requests = receiver.wait_requests(1, WAIT).await;
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hook");
    assert_eq!(request.header("content-type"), Some("application/json"));
    let expected = format!("sha256={}", hmac_hex(SECRET, &request.body));
    assert_eq!(
        request.header("x-herald-signature"),
        Some(expected.as_str())
    );
    let body = request.json();
    assert_eq!(body["job_id"], job);
    assert_eq!(body["agent_id"], "agent-1");
    assert_eq!(body["agent_name"], "laptop");
    assert_eq!(body["entry"], "Virus scan");
    assert_eq!(body["state"], "failed");
    assert_eq!(body["exit_code"], 3);
    assert_eq!(body["error"], "exited with 3");
    assert_eq!(body["outcome"], serde_json::Value::Null);
    assert_eq!(body["finished_at"], 1_700_000_000_000i64);
    assert_eq!(body["stdout"], "found 2 threats\n");

    let delivery = f.delivery_of(job, rule);
    let (_, attempts, last_error) = f.wait_state(delivery, "sent").await;
    assert_eq!((attempts, last_error), (1, None));
    assert_eq!(f.attempts(delivery), [(true, "HTTP 200".to_string())]);
    forwarder.stop().await;
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_with_every_attempt_logged_then_given_up() {
    let f = Fixture::new("forward-give-up");
    let receiver = HttpReceiver::answering(500);
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", &receiver.url("/down"), false);
    let job = f.add_job(sub, "failed");
    let forwarder = f.start(settings());

    let delivery = poll("the delivery", || f.deliveries().first().copied()).await;
    assert_eq!(delivery, (job, rule));
    let delivery = f.delivery_of(job, rule);
    let (_, attempts, last_error) = f.wait_state(delivery, "given_up").await;
    assert_eq!(attempts, 3);
    assert!(
        last_error.as_deref().unwrap_or("").starts_with("HTTP 500"),
        "{last_error:?}"
    );
    let log = f.attempts(delivery);
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log
        .iter()
        .all(|(ok, detail)| !ok && detail.starts_with("HTTP 500")));
    // Given up means no more tries.
    assert_eq!(receiver.requests().len(), 3);
    forwarder.stop().await;
}

#[tokio::test]
async fn a_retry_after_a_failure_delivers_after_the_backoff() {
    let f = Fixture::new("forward-retry");
    let receiver = HttpReceiver::start(vec![Reply::Status(503)], Reply::Status(204));
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", &receiver.url("/flaky"), false);
    let job = f.add_job(sub, "succeeded");
    let forwarder = f.start(settings());

    let requests = receiver.wait_requests(2, WAIT).await;
    // The same bytes, the same signature: a retry is the same message.
    assert_eq!(requests[0].body, requests[1].body);
    let delivery = f.delivery_of(job, rule);
    let (_, attempts, last_error) = f.wait_state(delivery, "sent").await;
    assert_eq!((attempts, last_error), (2, None));
    let log = f.attempts(delivery);
    assert_eq!(log.len(), 2);
    assert!(!log[0].0 && log[0].1.starts_with("HTTP 503"));
    assert_eq!(log[1], (true, "HTTP 204".to_string()));
    let at: Vec<i64> = f
        .store
        .test_delivery_attempts(delivery)
        .iter()
        .map(|a| a.at)
        .collect();
    assert!(at[1] - at[0] >= 100, "retried {} ms later", at[1] - at[0]);
    forwarder.stop().await;
}

#[tokio::test]
async fn a_dead_endpoint_delays_its_owners_other_rules_by_at_most_the_timeout() {
    // A user's sends share two slots: with both held by an endpoint that never
    // answers, the user's other rules wait for the attempt timeout, no longer.
    let f = Fixture::new("forward-dead");
    let dead = HttpReceiver::hanging();
    let healthy = HttpReceiver::answering(200);
    let sub = f.add_subscription(f.user);
    // The dead rule comes first, so its deliveries are queued and started first.
    let dead_rule = f.add_rule(f.user, None, "webhook", &dead.url("/dead"), false);
    let healthy_rule = f.add_rule(f.user, None, "webhook", &healthy.url("/ok"), false);
    let jobs: Vec<i64> = (0..3).map(|_| f.add_job(sub, "failed")).collect();
    let mut quick = settings();
    quick.timeout = Duration::from_millis(500);
    quick.retry.max_attempts = 1;
    let forwarder = f.start(quick);

    healthy.wait_requests(3, WAIT).await;
    for job in &jobs {
        let sent = f
            .wait_state(f.delivery_of(*job, healthy_rule), "sent")
            .await;
        assert_eq!(sent.1, 1);
        let dead = f
            .wait_state(f.delivery_of(*job, dead_rule), "given_up")
            .await;
        assert_eq!(dead.1, 1);
    }
    assert_eq!(dead.requests().len(), 3);
    forwarder.stop().await;
}

#[tokio::test]
async fn an_attempt_that_outlasts_the_timeout_fails_and_is_logged() {
    let f = Fixture::new("forward-timeout");
    let dead = HttpReceiver::hanging();
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", &dead.url("/dead"), false);
    let job = f.add_job(sub, "failed");
    let mut quick = settings();
    quick.timeout = Duration::from_millis(300);
    quick.retry.max_attempts = 1;
    let forwarder = f.start(quick);
    let delivery = poll("the delivery", || f.deliveries().first().copied()).await;
    assert_eq!(delivery, (job, rule));
    let (_, attempts, last_error) = f.wait_state(f.delivery_of(job, rule), "given_up").await;
    assert_eq!(attempts, 1);
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("timed out") || last_error.contains("no answer"),
        "{last_error}"
    );
    forwarder.stop().await;
}

#[tokio::test]
async fn a_refused_connection_is_logged_without_the_secret_url() {
    let f = Fixture::new("forward-refused");
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let sub = f.add_subscription(f.user);
    let url = format!("http://127.0.0.1:{port}/hooks/T000/B000/s3cr3t-path");
    let rule = f.add_rule(f.user, None, "webhook", &url, false);
    let job = f.add_job(sub, "failed");
    let mut once = settings();
    once.retry.max_attempts = 1;
    let forwarder = f.start(once);
    let delivery = f.delivery_of_eventually(job, rule).await;
    let (_, _, last_error) = f.wait_state(delivery, "given_up").await;
    let last_error = last_error.unwrap_or_default();
    assert!(!last_error.is_empty());
    assert!(!last_error.contains("s3cr3t"), "{last_error}");
    forwarder.stop().await;
}

#[tokio::test]
async fn webhooks_to_private_addresses_are_refused_unless_allowed() {
    let f = Fixture::new("forward-private");
    let receiver = HttpReceiver::answering(200);
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", &receiver.url("/internal"), false);
    let job = f.add_job(sub, "failed");
    let mut strict = settings();
    strict.allow_private_targets = false;
    let forwarder = f.start(strict);
    let delivery = poll("the delivery", || f.deliveries().first().copied()).await;
    assert_eq!(delivery, (job, rule));
    let (_, attempts, last_error) = f.wait_state(f.delivery_of(job, rule), "given_up").await;
    // Refused at once: retrying cannot make the address public.
    assert_eq!(attempts, 1);
    assert!(
        last_error
            .unwrap_or_default()
            .contains("not a public address"),
        "refused for the address"
    );
    assert!(receiver.requests().is_empty());
    forwarder.stop().await;
}

#[tokio::test]
async fn a_deleted_rule_stops_its_pending_deliveries() {
    let f = Fixture::new("forward-rule-deleted");
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", "http://127.0.0.1:9/never", false);
    let job = f.add_job(sub, "failed");
    queued(&f.store, 1);
    f.store.remove_destination(f.user, rule).unwrap();
    let forwarder = f.start(settings());
    let (_, attempts, last_error) = f.wait_state(f.delivery_of(job, rule), "given_up").await;
    assert_eq!(attempts, 1);
    assert_eq!(
        last_error.as_deref(),
        Some("the forwarding rule was deleted")
    );
    forwarder.stop().await;
}

#[tokio::test]
async fn one_users_hanging_endpoint_does_not_delay_another_users_delivery() {
    let f = Fixture::new("forward-fair");
    let dead = HttpReceiver::hanging();
    let healthy = HttpReceiver::answering(200);
    let bob = f.add_user("bob");
    let anns = f.add_subscription(f.user);
    let bobs = f.add_subscription(bob);
    // Ann: five rules to an endpoint that never answers, four results: twenty
    // deliveries, more than there are slots, all due before bob's.
    for n in 0..5 {
        f.add_rule(
            f.user,
            None,
            "webhook",
            &dead.url(&format!("/ann{n}")),
            false,
        );
    }
    for _ in 0..4 {
        f.add_job(anns, "failed");
    }
    // Bob's endpoint is another host name for the same loopback receiver.
    let bob_url = healthy.url("/bob").replace("127.0.0.1", "localhost");
    let bob_rule = f.add_rule(bob, None, "webhook", &bob_url, false);
    let bob_job = f.add_job(bobs, "failed");
    let mut slow = settings();
    slow.timeout = Duration::from_secs(60);
    let started = tokio::time::Instant::now();
    let forwarder = f.start(slow);

    let delivery = f.delivery_of_eventually(bob_job, bob_rule).await;
    f.wait_state(delivery, "sent").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bob's result waited {:?} behind ann's hanging endpoint",
        started.elapsed()
    );
    // Ann has two sends under way, no more.
    dead.wait_requests(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dead.requests().len(), 2);
    forwarder.stop().await;
}

/// A server that answers every request `500` with a body that never ends (a chunk
/// every 10 ms, for at most `SERVE_FOR`).
async fn endless_error_body() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SERVE_FOR: Duration = Duration::from_secs(30);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/endless", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = b"HTTP/1.1 500 Internal Server Error\r\n\
                              Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(reply).await.is_err() {
                    return;
                }
                let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                let until = tokio::time::Instant::now() + SERVE_FOR;
                while tokio::time::Instant::now() < until {
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn an_endless_error_body_is_not_read_to_its_end() {
    let f = Fixture::new("forward-endless");
    let url = endless_error_body().await;
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "webhook", &url, false);
    let job = f.add_job(sub, "failed");
    let mut patient = settings();
    patient.timeout = Duration::from_secs(25);
    patient.retry.max_attempts = 1;
    let started = tokio::time::Instant::now();
    let forwarder = f.start(patient);
    let delivery = f.delivery_of_eventually(job, rule).await;
    let (_, _, last_error) = f.wait_state(delivery, "given_up").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the attempt took {:?}",
        started.elapsed()
    );
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.starts_with("HTTP 500: xxxx"), "{last_error}");
    assert!(last_error.len() < 300, "{last_error}");
    forwarder.stop().await;
}

#[tokio::test]
async fn a_pending_delivery_of_an_unconfirmed_rule_is_not_sent() {
    // Deliveries queued before e-mail rules needed confirming (migration 4 leaves
    // such rules unconfirmed) must not go out.
    let f = Fixture::new("forward-unconfirmed-pending");
    let gateway = HttpReceiver::answering(200);
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "sms", "+15551234567", false);
    let job = f.add_job(sub, "failed");
    queued(&f.store, 1);
    f.store.set_test_rule_confirmed_at(rule, None);
    let mut with_sms = settings();
    with_sms.sms = Some(sms_config(&gateway));
    let forwarder = f.start(with_sms);
    let (_, attempts, last_error) = f.wait_state(f.delivery_of(job, rule), "given_up").await;
    assert_eq!(attempts, 1);
    assert_eq!(
        last_error.as_deref(),
        Some("the forwarding rule is not confirmed")
    );
    assert!(gateway.requests().is_empty());
    forwarder.stop().await;
}

fn sms_config(gateway: &HttpReceiver) -> SmsConfig {
    SmsConfig {
        url: gateway.url("/send"),
        method: "POST".into(),
        headers: Default::default(),
        body: Some(r#"{"to": "{to}", "text": "{text}"}"#.into()),
        body_format: SmsBodyFormat::Json,
        id_pointer: None,
        report_secret: None,
    }
}

// === confirmation codes ===

#[tokio::test]
async fn a_code_goes_by_sms_as_fixed_text_and_confirms_the_rule() {
    let f = Fixture::new("forward-code-sms");
    let gateway = HttpReceiver::answering(200);
    let mut with_sms = settings();
    with_sms.sms = Some(sms_config(&gateway));
    let forwarder = f.start(with_sms);
    let rule = f.add_rule_as_console(f.user, "sms", "+821012345678");
    // The console cannot wake the forwarder; the tests' long scan interval needs a
    // nudge (in the server, the 5 s safety-net scan picks the request up).
    forwarder.job_changed(0);
    let requests = gateway.wait_requests(1, WAIT).await;
    let body = requests[0].json();
    assert_eq!(body["to"], "+821012345678");
    let text = body["text"].as_str().unwrap_or_default().to_string();
    let code = text.strip_prefix("Herald code: ").unwrap_or_default();
    assert!(
        code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}"
    );
    poll("the code's note", || {
        let rule = f.store.destinations(f.user).unwrap().remove(0);
        (rule.code_note.as_deref() == Some("Code sent.")).then_some(())
    })
    .await;
    assert_eq!(
        f.store
            .confirm_destination(f.user, rule, code, crate::now_ms())
            .unwrap(),
        Verdict::Confirmed
    );
    assert!(f.store.destinations(f.user).unwrap()[0].confirmed);
    forwarder.stop().await;
}

#[tokio::test]
async fn a_code_that_cannot_be_sent_says_why() {
    let f = Fixture::new("forward-code-no-sms");
    let forwarder = f.start(settings());
    f.add_rule_as_console(f.user, "sms", "+821012345678");
    forwarder.job_changed(0);
    let note = poll("the code's note", || {
        let rule = f.store.destinations(f.user).unwrap().remove(0);
        rule.code_note
            .filter(|n| n.starts_with("The code could not"))
    })
    .await;
    assert!(note.contains("no [sms]"), "{note}");
    forwarder.stop().await;
}

// === SMS ===

#[tokio::test]
async fn sms_goes_through_the_gateway_template() {
    let f = Fixture::new("forward-sms");
    let gateway = HttpReceiver::answering(200);
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "sms", "+821012345678", true);
    let job = f.add_job(sub, "failed");
    let ok_job = f.add_job(sub, "succeeded");
    let mut with_sms = settings();
    with_sms.sms = Some(SmsConfig {
        url: gateway.url("/send?to={to}"),
        method: "POST".into(),
        headers: [("X-Api-Key".to_string(), "k-123".to_string())].into(),
        body: Some(r#"{"to": "{to}", "text": "{text}"}"#.into()),
        body_format: SmsBodyFormat::Json,
        id_pointer: None,
        report_secret: None,
    });
    let forwarder = f.start(with_sms);
    let requests = gateway.wait_requests(1, WAIT).await;
    let request = &requests[0];
    assert_eq!(request.path, "/send?to=%2B821012345678");
    assert_eq!(request.header("x-api-key"), Some("k-123"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body = request.json();
    assert_eq!(body["to"], "+821012345678");
    // The entry, the state and the job: nothing the agent wrote (device name, error).
    assert_eq!(
        body["text"],
        format!("Herald: Virus scan: failed (job {job})")
    );
    f.wait_state(f.delivery_of(job, rule), "sent").await;
    // Only failures: the succeeded job was not queued for this rule at all.
    assert!(!f.deliveries().iter().any(|(j, _)| *j == ok_job));
    forwarder.stop().await;
}

#[tokio::test]
async fn sms_without_a_gateway_is_given_up_with_the_reason() {
    let f = Fixture::new("forward-no-sms");
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "sms", "+821012345678", false);
    let job = f.add_job(sub, "failed");
    let forwarder = f.start(settings());
    let (_, attempts, last_error) = f
        .wait_state(f.delivery_of_eventually(job, rule).await, "given_up")
        .await;
    assert_eq!(attempts, 1);
    assert!(last_error.unwrap_or_default().contains("no [sms]"));
    forwarder.stop().await;
}

impl Fixture {
    async fn delivery_of_eventually(&self, job: i64, destination: i64) -> i64 {
        poll("the delivery", || {
            self.deliveries()
                .contains(&(job, destination))
                .then(|| self.delivery_of(job, destination))
        })
        .await
    }
}

// === e-mail ===

fn smtp_settings(smtp: &SmtpReceiver, ca_file: Option<std::path::PathBuf>) -> Settings {
    let mut s = settings();
    s.smtp = Some(SmtpConfig {
        host: "127.0.0.1".into(),
        port: Some(smtp.port()),
        from: "Herald <herald@example.org>".into(),
        username: None,
        password: None,
        tls: SmtpTls::Starttls,
        ca_file,
    });
    s
}

#[tokio::test]
async fn email_is_sent_over_starttls_to_a_real_smtp_server() {
    let f = Fixture::new("forward-email");
    let Some(smtp) = SmtpReceiver::start(f._dir.path()) else {
        return;
    };
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, Some(sub), "email", "alice@example.org", false);
    let job = f.add_job(sub, "failed");
    let forwarder = f.start(smtp_settings(&smtp, Some(smtp.ca_file().to_path_buf())));

    let mails = smtp.wait_mails(1, WAIT).await;
    let mail = &mails[0];
    assert!(mail.tls, "the mail was sent after STARTTLS");
    assert_eq!(mail.mail_from, "herald@example.org");
    assert_eq!(mail.rcpt_tos, ["alice@example.org"]);
    let subject = format!("[Herald] Virus scan: failed (job {job})");
    assert_eq!(mail.header("Subject").as_deref(), Some(subject.as_str()));
    assert_eq!(mail.header("To").as_deref(), Some("alice@example.org"));
    let body = mail.body();
    for fact in [
        format!("Job:       {job}"),
        "Device:    laptop (agent-1)".to_string(),
        "Exit code: 3".to_string(),
        "Error:     exited with 3".to_string(),
        "Finished:  2023-11-14T22:13:20Z".to_string(),
        "found 2 threats".to_string(),
    ] {
        assert!(body.contains(&fact), "{fact:?} missing from:\n{body}");
    }
    let delivery = f.delivery_of(job, rule);
    f.wait_state(delivery, "sent").await;
    let log = f.attempts(delivery);
    assert_eq!(log.len(), 1);
    assert!(log[0].0 && log[0].1.starts_with("SMTP 250"), "{log:?}");
    forwarder.stop().await;
}

#[tokio::test]
async fn email_to_a_relay_with_an_untrusted_certificate_is_not_sent() {
    let f = Fixture::new("forward-email-untrusted");
    let Some(smtp) = SmtpReceiver::start(f._dir.path()) else {
        return;
    };
    let sub = f.add_subscription(f.user);
    let rule = f.add_rule(f.user, None, "email", "alice@example.org", false);
    let job = f.add_job(sub, "failed");
    let mut untrusted = smtp_settings(&smtp, None);
    untrusted.retry.max_attempts = 1;
    let forwarder = f.start(untrusted);
    let delivery = f.delivery_of_eventually(job, rule).await;
    let (_, _, last_error) = f.wait_state(delivery, "given_up").await;
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.starts_with("SMTP"), "{last_error}");
    assert!(
        last_error.to_lowercase().contains("certificate"),
        "{last_error}"
    );
    assert!(smtp.mails().is_empty());
    forwarder.stop().await;
}

#[tokio::test]
async fn an_e_mail_rule_is_confirmed_with_the_code_mailed_to_it() {
    let f = Fixture::new("forward-code-email");
    let Some(smtp) = SmtpReceiver::start(f._dir.path()) else {
        return;
    };
    let sub = f.add_subscription(f.user);
    let forwarder = f.start(smtp_settings(&smtp, Some(smtp.ca_file().to_path_buf())));
    let rule = f.add_rule_as_console(f.user, "email", "alice@example.org");
    forwarder.job_changed(0);
    let mails = smtp.wait_mails(1, WAIT).await;
    let mail = &mails[0];
    assert!(mail.tls);
    assert_eq!(mail.rcpt_tos, ["alice@example.org"]);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Confirm forwarding to this address")
    );
    let body = mail.body();
    let code = body
        .split("confirmation code is ")
        .nth(1)
        .map(|rest| rest.chars().take(6).collect::<String>())
        .unwrap_or_default();
    assert!(
        code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
        "{body}"
    );

    // Unconfirmed, a result goes nowhere.
    let before = f.add_job(sub, "failed");
    forwarder.job_changed(before);
    poll("the job to be handled", || {
        let pending: i64 = f.store.test_forward_pending(before);
        (pending == 0).then_some(())
    })
    .await;
    assert!(f.deliveries().is_empty());

    // A wrong code is counted; the right one confirms.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let now = crate::now_ms();
    assert_eq!(
        f.store
            .confirm_destination(f.user, rule, wrong, now)
            .unwrap(),
        Verdict::Wrong { tries_left: 4 }
    );
    assert_eq!(
        f.store
            .confirm_destination(f.user, rule, &code, now)
            .unwrap(),
        Verdict::Confirmed
    );
    let after = f.add_job(sub, "failed");
    forwarder.job_changed(after);
    let mails = smtp.wait_mails(2, WAIT).await;
    let subject = format!("[Herald] Virus scan: failed (job {after})");
    assert_eq!(
        mails[1].header("Subject").as_deref(),
        Some(subject.as_str())
    );
    assert_eq!(f.deliveries(), [(after, rule)]);
    forwarder.stop().await;
}

// === rules and configuration ===

#[test]
fn targets_are_checked_per_kind() {
    assert!(check_target("email", "alice@example.org", false).is_ok());
    assert!(check_target("email", "Alice <alice@example.org>", false).is_err());
    assert!(check_target("email", "alice", false).is_err());
    assert!(check_target("email", " alice@example.org", false).is_err());
    assert!(check_target("email", "a@b.org, c@d.org", false).is_err());
    assert!(check_target("webhook", "https://hooks.example.org/x?y=1", false).is_ok());
    assert!(check_target("webhook", "http://127.0.0.1:8080/x", false).is_err());
    assert!(check_target("webhook", "http://127.0.0.1:8080/x", true).is_ok());
    assert!(check_target("webhook", "ftp://example.org/x", true).is_err());
    assert!(check_target("webhook", "not a url", true).is_err());
    assert!(check_target(
        "webhook",
        &format!("https://e.org/{}", "a".repeat(3000)),
        false
    )
    .is_err());
    assert!(check_target("sms", "+821012345678", false).is_ok());
    assert!(check_target("sms", "+123456", false).is_ok());
    assert!(check_target("sms", "+12345", false).is_err());
    assert!(check_target("sms", "+1234567890123456", false).is_err());
    assert!(check_target("sms", "821012345678", false).is_err());
    assert!(check_target("sms", "+82 10 1234 5678", false).is_err());
    let err = check_target("pager", "x", false).unwrap_err();
    assert!(err.contains("email, webhook or sms"), "{err}");
}

fn server_config(extra: &str) -> Result<ServerConfig, String> {
    let text = format!(
        "quic_listen = \"127.0.0.1:4433\"\nhttp_listen = \"127.0.0.1:8443\"\n\
         public_addr = \"127.0.0.1:4433\"\noperator_keys = []\n{extra}"
    );
    let config: ServerConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
    validate_config(&config)?;
    Ok(config)
}

#[test]
fn forwarding_sections_parse_with_defaults() {
    let config = server_config("").unwrap();
    let s = Settings::from_config(&config);
    assert!(!s.allow_http && !s.allow_private_targets);
    assert_eq!(s.retry.max_attempts, 6);
    assert_eq!(s.retry.first_retry, Duration::from_secs(5));
    assert_eq!(s.timeout, Duration::from_secs(10));
    assert!(s.smtp.is_none() && s.sms.is_none());

    let config = server_config(
        "[smtp]\nhost = \"smtp.example.org\"\nfrom = \"herald@example.org\"\n\
         [sms]\nurl = \"https://gw.example.org/send\"\nbody = \"to={to}&text={text}\"\n\
         [forwarding]\nmax_attempts = 3\n",
    )
    .unwrap();
    let smtp = config.smtp.as_ref().unwrap();
    assert_eq!((smtp.port(), smtp.tls), (587, SmtpTls::Starttls));
    let sms = config.sms.as_ref().unwrap();
    assert_eq!(
        (sms.method.as_str(), sms.body_format),
        ("POST", SmsBodyFormat::Form)
    );
    assert_eq!(config.forwarding().max_attempts, 3);
    assert_eq!(config.forwarding().timeout_secs, 10);
    let smtps = server_config(
        "[smtp]\nhost = \"smtp.example.org\"\nfrom = \"herald@example.org\"\ntls = \"tls\"\n",
    )
    .unwrap();
    assert_eq!(smtps.smtp.unwrap().port(), 465);
}

#[test]
fn unsafe_or_broken_forwarding_configuration_is_refused() {
    let smtp = "[smtp]\nhost = \"smtp.example.org\"\nfrom = \"herald@example.org\"\n";
    let cases = [
        (
            format!("{smtp}tls = \"none\"\n"),
            "only allowed to a relay on loopback",
        ),
        (format!("{smtp}tls = \"plain\"\n"), "unknown variant"),
        (format!("{smtp}username = \"u\"\n"), "go together"),
        (
            format!("{smtp}ca_file = \"/nonexistent/ca.pem\"\n"),
            "ca_file",
        ),
        (format!("{smtp}port = 25\nsurprise = 1\n"), "unknown field"),
        (
            "[smtp]\nhost = \"smtp.example.org\"\nfrom = \"not an address\"\n".into(),
            "[smtp] from",
        ),
        (
            "[sms]\nurl = \"http://gw.example.org/{to}\"\n".into(),
            "https://",
        ),
        (
            "[sms]\nurl = \"https://gw.example.org/\"\nmethod = \"NOT A METHOD\"\n".into(),
            "method",
        ),
        (
            "[sms]\nurl = \"https://gw.example.org/\"\nbody_format = \"xml\"\n".into(),
            "unknown variant",
        ),
        ("[forwarding]\nmax_attempts = 0\n".into(), "max_attempts"),
    ];
    for (extra, expected) in cases {
        let err = server_config(&extra).expect_err(&extra);
        assert!(err.contains(expected), "{extra}: {err}");
    }
    // Plain SMTP to loopback and http gateways with allow_http are fine.
    server_config(
        "[smtp]\nhost = \"127.0.0.1\"\nfrom = \"h@example.org\"\ntls = \"none\"\n\
         [sms]\nurl = \"http://127.0.0.1:9/{to}\"\n[forwarding]\nallow_http = true\n",
    )
    .unwrap();
}
