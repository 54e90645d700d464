//! A compromised server cannot make an agent run anything: orders a hostile server forges
//! or replays are refused by the agent, with the right reason, and never run.
//!
//! The hostile server is simulated by writing `orders` and `jobs` rows straight into the
//! running server's SQLite database; a normal job created through the CLI then pokes the
//! relay, which re-reads every queued job and signals the injected ones too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_shared::codec;
use herald_shared::envelope::{
    Action, Audience, Envelope, Membership, OperatorKey, Order, Repeat, RunSpec, Statement,
};
use herald_tests::{now_ms, random_bytes, TestAgent, TestServer, DEADLINE};
use rusqlite::{params, Connection};

/// The server's direct database, as a hostile server (or whoever owns it) would use it.
struct HostileDb {
    conn: Connection,
}

impl HostileDb {
    fn open(server: &TestServer) -> HostileDb {
        let conn = Connection::open(server.db_path()).expect("open the server's database");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("set busy timeout");
        conn.pragma_update(None, "foreign_keys", "ON")
            .expect("enable foreign keys");
        HostileDb { conn }
    }

    /// Stores an order row for `envelope` under `order_id`.
    fn insert_order(&self, order_id: &str, envelope: &Envelope, action: &str) {
        let blob = codec::to_bytes(envelope).expect("encode envelope");
        self.conn
            .execute(
                "INSERT INTO orders (id, envelope, action, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![order_id, blob, action, now_ms()],
            )
            .expect("insert order");
    }

    /// Queues a job for `agent_id` carrying the stored order `order_id`, due now and
    /// expiring in ten minutes. Returns the job id.
    fn insert_job(&self, agent_id: &str, order_id: &str) -> i64 {
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at,
                                   deliver_after, expires_at)
                 VALUES (?1, ?2, NULL, 'queued', ?3, ?3, ?4)",
                params![agent_id, order_id, now, now + 600_000],
            )
            .expect("insert job");
        self.conn.last_insert_rowid()
    }

    /// Stores an order and one job for it; returns the job id.
    fn inject(&self, agent_id: &str, order_id: &str, envelope: &Envelope) -> i64 {
        self.insert_order(order_id, envelope, "injected");
        self.insert_job(agent_id, order_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A one-off order for `audience`, valid from a minute ago for an hour, running
/// `/bin/sh -c script`.
fn order(audience: Audience, script: &str) -> Order {
    let now = now_ms();
    Order {
        id: random_bytes(),
        audience,
        issued_at: now - 60_000,
        not_before: now - 60_000,
        not_after: now + 3_600_000,
        repeat: Repeat::Once,
        action: Action::Run(RunSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_ms: 30_000,
            run_as: None,
        }),
    }
}

/// A shell command that creates (or appends a line to) `trace`.
fn leave_trace(trace: &Path) -> String {
    format!("echo ran >> '{}'", trace.display())
}

fn sign(key: &OperatorKey, order: &Order) -> Envelope {
    key.sign(&Statement::Order(order.clone()))
        .expect("sign order")
}

struct Case {
    name: &'static str,
    job_id: i64,
    trace: PathBuf,
    /// The refusal reason must contain one of these.
    reason: &'static [&'static str],
}

#[test]
fn agent_refuses_bad_envelopes() {
    if herald_tests::sqlite_only("writes forged orders and jobs into herald.db") {
        return;
    }
    let server = TestServer::start("refuses-bad-envelopes");
    let agent = TestAgent::start(&server, "alpha");
    let operator = server.operator_key();
    let traces = server.dir.path().join("traces");
    std::fs::create_dir_all(&traces).expect("create trace dir");
    let trace = |name: &str| traces.join(name);
    let db = HostileDb::open(&server);
    let me = Audience::Agent(agent.id.clone());

    // Positive control: a correctly signed order injected the same way runs. This proves
    // injected rows are delivered and their traces appear, so the refusals below are
    // caused by what is wrong with each envelope. Its order is replayed later.
    let replay_trace = trace("replay");
    let legit = order(me.clone(), &leave_trace(&replay_trace));
    let legit_order_id = hex(&legit.id);
    let legit_job = db.inject(&agent.id, &legit_order_id, &sign(&operator, &legit));
    server.poke_with_marker_job(&agent);
    let first = server.wait_job_state(legit_job, "succeeded", DEADLINE);
    assert_eq!(first["error"], serde_json::Value::Null, "{first}");
    assert_eq!(
        std::fs::read_to_string(&replay_trace).expect("the legitimate order left its trace"),
        "ran\n"
    );

    let mut cases = Vec::new();

    // (a) A validly signed envelope whose payload was altered after signing: the signed
    // script exits before touching anything, the tampered one does not.
    {
        let path = trace("tampered");
        let signed_script = format!("exit 7; {}", leave_trace(&path));
        let tampered_script = format!(":     ; {}", leave_trace(&path));
        assert_eq!(signed_script.len(), tampered_script.len());
        let original = order(me.clone(), &signed_script);
        let mut envelope = sign(&operator, &original);
        let at = envelope
            .payload
            .windows(6)
            .position(|w| w == b"exit 7")
            .expect("script bytes in payload");
        envelope.payload[at..at + 6].copy_from_slice(b":     ");
        // The tampered payload still decodes to a runnable order: only the signature
        // stands between it and execution.
        let Statement::Order(tampered) =
            codec::from_bytes::<Statement>(&envelope.payload, codec::DEFAULT_FRAME_LIMIT)
                .expect("tampered payload decodes")
        else {
            panic!("tampered payload is not an order");
        };
        let Action::Run(run) = &tampered.action else {
            panic!("tampered order is not a run");
        };
        assert_eq!(run.args[1], tampered_script);
        cases.push(Case {
            name: "tampered payload",
            job_id: db.inject(&agent.id, &hex(&original.id), &envelope),
            trace: path,
            reason: &["signature"],
        });
    }

    // (b) Signed by a key the agent does not pin...
    let intruder = OperatorKey::from_seed(random_bytes());
    assert_ne!(intruder.public(), operator.public());
    {
        let path = trace("other-key");
        let forged = order(me.clone(), &leave_trace(&path));
        cases.push(Case {
            name: "signed by another key",
            job_id: db.inject(&agent.id, &hex(&forged.id), &sign(&intruder, &forged)),
            trace: path,
            reason: &["not trusted", "signed by"],
        });
    }
    // ...and the same, claiming to be signed by the operator.
    {
        let path = trace("other-key-claiming-operator");
        let forged = order(me.clone(), &leave_trace(&path));
        let mut envelope = sign(&intruder, &forged);
        envelope.signer = operator.public();
        cases.push(Case {
            name: "signed by another key, naming the operator as signer",
            job_id: db.inject(&agent.id, &hex(&forged.id), &envelope),
            trace: path,
            reason: &["signature"],
        });
    }

    // (c) Properly signed, but for another agent.
    {
        let path = trace("other-agent");
        let other = order(Audience::Agent("0".repeat(20)), &leave_trace(&path));
        cases.push(Case {
            name: "addressed to another agent",
            job_id: db.inject(&agent.id, &hex(&other.id), &sign(&operator, &other)),
            trace: path,
            reason: &["not addressed"],
        });
    }

    // (d) Properly signed, but expired.
    {
        let path = trace("expired");
        let mut old = order(me.clone(), &leave_trace(&path));
        let now = now_ms();
        old.issued_at = now - 7_200_000;
        old.not_before = now - 7_200_000;
        old.not_after = now - 3_600_000;
        cases.push(Case {
            name: "expired",
            job_id: db.inject(&agent.id, &hex(&old.id), &sign(&operator, &old)),
            trace: path,
            reason: &["expired"],
        });
    }

    // (e) The legitimate one-off order from above, delivered again under a new job id.
    let replay_job = db.insert_job(&agent.id, &legit_order_id);
    assert_ne!(replay_job, legit_job);

    // (f) Properly signed, for a group the agent is not in.
    {
        let path = trace("other-group");
        let group = order(Audience::Group("not-my-group".into()), &leave_trace(&path));
        cases.push(Case {
            name: "group the agent is not in",
            job_id: db.inject(&agent.id, &hex(&group.id), &sign(&operator, &group)),
            trace: path,
            reason: &["not addressed"],
        });
    }

    // (g) Properly signed, but not valid yet.
    {
        let path = trace("not-yet-valid");
        let mut early = order(me.clone(), &leave_trace(&path));
        let now = now_ms();
        early.not_before = now + 3_600_000;
        early.not_after = now + 7_200_000;
        cases.push(Case {
            name: "not valid yet",
            job_id: db.inject(&agent.id, &hex(&early.id), &sign(&operator, &early)),
            trace: path,
            reason: &["not valid yet"],
        });
    }

    // (h) A genuine operator signature over something that is not an order (a membership)
    // delivered as a job.
    {
        let membership = operator
            .sign(&Statement::Membership(Membership {
                agent_id: agent.id.clone(),
                groups: vec!["ops".into()],
                issued_at: now_ms(),
            }))
            .expect("sign membership");
        cases.push(Case {
            name: "membership delivered as a job",
            job_id: db.inject(&agent.id, &hex(&random_bytes::<16>()), &membership),
            trace: trace("never-created"),
            reason: &["not an order"],
        });
    }

    server.poke_with_marker_job(&agent);

    for case in &cases {
        let job = server.wait_job_state(case.job_id, "refused", DEADLINE);
        let error = job["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            case.reason.iter().any(|r| error.contains(r)),
            "{}: refusal reason {error:?} should mention one of {:?}",
            case.name,
            case.reason
        );
        assert_eq!(
            job["started_at"],
            serde_json::Value::Null,
            "{}: {job}",
            case.name
        );
    }
    let replayed = server.wait_job_state(replay_job, "refused", DEADLINE);
    let error = replayed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("replayed"),
        "replayed order: refusal reason {error:?} should mention replay"
    );

    // Nothing ran: no trace of any refused order, and the replayed order ran only once.
    // A run would have left its trace before the agent could report anything, but give a
    // runaway process a moment by checking after one more full round trip.
    server.poke_with_marker_job(&agent);
    for case in &cases {
        assert!(
            !case.trace.exists(),
            "{}: the refused order ran (trace {} exists)",
            case.name,
            case.trace.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&replay_trace).expect("replay trace"),
        "ran\n",
        "the replayed one-off order ran a second time"
    );
    let entries: Vec<_> = std::fs::read_dir(&traces)
        .expect("list traces")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("replay")]);
}

/// Sets the agent's stored membership (what the relay sends in `Welcome` and after a
/// poke) and its group rows, as a hostile server could.
fn write_membership(db: &HostileDb, agent_id: &str, envelope: &Envelope, groups: &[&str]) {
    let blob = codec::to_bytes(envelope).expect("encode membership");
    db.conn
        .execute(
            "UPDATE agents SET membership = ?2 WHERE id = ?1",
            params![agent_id, blob],
        )
        .expect("store membership");
    db.conn
        .execute(
            "DELETE FROM agent_groups WHERE agent_id = ?1",
            params![agent_id],
        )
        .expect("clear groups");
    for group in groups {
        db.conn
            .execute(
                "INSERT INTO agent_groups (agent_id, group_name) VALUES (?1, ?2)",
                params![agent_id, group],
            )
            .expect("add group");
    }
}

fn membership(key: &OperatorKey, agent_id: &str, groups: &[&str]) -> Envelope {
    key.sign(&Statement::Membership(Membership {
        agent_id: agent_id.to_string(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        issued_at: now_ms(),
    }))
    .expect("sign membership")
}

/// A hostile server cannot widen an order's reach by inventing group memberships: a
/// membership the operator did not sign for this agent is ignored, so group orders for
/// that group are refused. A genuine membership sent the same way does take effect.
#[test]
fn forged_membership_does_not_widen_group_orders() {
    if herald_tests::sqlite_only("plays a hostile server by writing memberships into herald.db") {
        return;
    }
    let server = TestServer::start("forged-membership");
    let mut agent = TestAgent::enroll(&server, "alpha", &[]);
    let operator = server.operator_key();
    let intruder = OperatorKey::from_seed(random_bytes());
    let traces = server.dir.path().join("traces");
    std::fs::create_dir_all(&traces).expect("create trace dir");
    let db = HostileDb::open(&server);

    // A membership in group "evil" signed by another key but naming the operator as
    // signer, in place before the agent connects: it arrives in `Welcome`.
    let mut forged = membership(&intruder, &agent.id, &["evil"]);
    forged.signer = operator.public();
    write_membership(&db, &agent.id, &forged, &["evil"]);
    agent.spawn();
    agent.wait_online(&server);

    let evil_trace = traces.join("evil");
    let evil = order(Audience::Group("evil".into()), &leave_trace(&evil_trace));
    let evil_job = db.inject(&agent.id, &hex(&evil.id), &sign(&operator, &evil));
    server.poke_with_marker_job(&agent);
    let job = server.wait_job_state(evil_job, "refused", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not addressed"),
        "group order after a forged membership: refusal {error:?}"
    );

    // A genuine operator-signed membership, but for another agent, sent after a poke.
    write_membership(
        &db,
        &agent.id,
        &membership(&operator, &"0".repeat(20), &["evil"]),
        &["evil"],
    );
    server.poke_with_marker_job(&agent);
    let evil_again = order(Audience::Group("evil".into()), &leave_trace(&evil_trace));
    let evil_again_job = db.inject(
        &agent.id,
        &hex(&evil_again.id),
        &sign(&operator, &evil_again),
    );
    server.poke_with_marker_job(&agent);
    let job = server.wait_job_state(evil_again_job, "refused", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not addressed"),
        "group order after another agent's membership: refusal {error:?}"
    );
    assert!(
        !evil_trace.exists(),
        "a group order ran through a membership the operator did not sign for this agent"
    );

    // Control: the operator's own membership for this agent, delivered the same way,
    // makes a group order for that group run.
    write_membership(
        &db,
        &agent.id,
        &membership(&operator, &agent.id, &["good"]),
        &["good"],
    );
    server.poke_with_marker_job(&agent);
    let good_trace = traces.join("good");
    let good = order(Audience::Group("good".into()), &leave_trace(&good_trace));
    let good_job = db.inject(&agent.id, &hex(&good.id), &sign(&operator, &good));
    server.poke_with_marker_job(&agent);
    server.wait_job_state(good_job, "succeeded", DEADLINE);
    assert_eq!(
        std::fs::read_to_string(&good_trace).expect("the genuine group order ran"),
        "ran\n"
    );
}
