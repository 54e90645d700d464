//! Tunnels across real network paths: the providing agent's address changes under an
//! open tunnel and the tunnel carries on; a consumer that can reach the providing agent
//! connects to it directly, one that cannot uses the relay.
//!
//! The server and the consumer (`herald-agent connect`) run in one network namespace, the
//! providing agent and its service in another, joined by a veth pair addressed from
//! 198.18.0.0/15. For the direct path the consumer runs in a third namespace, routed to
//! the others through the server's, which forwards packets or not. Needs root for
//! `ip netns`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::Duration;

use herald_io::wire;
use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::peers::{DirectOpen, OfferAnswer};
use herald_tests::netns::{enter, in_ns, ip, log_to, ns_sysctl, tail, Namespaces};
use herald_tests::{bin, is_root, wait_until, TempDir, DEADLINE};
use serde_json::Value;

const SERVER_IP: &str = "198.18.0.1";
const PROVIDER_IP: &str = "198.18.0.2";
const PROVIDER_NEW_IP: &str = "198.18.0.3";
/// The server's namespace on the consumer's link, and the consumer's address.
const ROUTER_IP: &str = "198.18.1.1";
const CONSUMER_IP: &str = "198.18.1.2";
const PREFIX: &str = "/24";
const QUIC_PORT: u16 = 4433;
const HTTP_PORT: u16 = 8443;
/// The consumer's `connect` listener, inside the server's namespace.
const CONNECT_PORT: u16 = 9000;
/// The service's port, inside the provider's namespace.
const SERVICE_PORT: u16 = 7000;

/// A server, a providing agent (alice's) and a consumer agent (bob's), alice and bob in
/// one club.
struct Lab {
    server_ns: String,
    provider_ns: String,
    /// Where the consumer runs: the server's namespace, or one of its own.
    consumer_ns: String,
    children: Vec<Child>,
    dir: TempDir,
    /// Deleted on drop, after the processes above.
    _namespaces: Namespaces,
}

impl Lab {
    fn new() -> Lab {
        let mut namespaces = Namespaces::default();
        let server_ns = namespaces.add("herald-psrv");
        let provider_ns = namespaces.add("herald-pprov");
        namespaces.veth(
            (&server_ns, "hp0", Some(&format!("{SERVER_IP}{PREFIX}"))),
            (&provider_ns, "hp1", Some(&format!("{PROVIDER_IP}{PREFIX}"))),
        );
        Lab {
            consumer_ns: server_ns.clone(),
            server_ns,
            provider_ns,
            children: Vec::new(),
            dir: TempDir::new("peers-netns"),
            _namespaces: namespaces,
        }
    }

    /// A lab whose consumer runs in a namespace of its own, linked to the server's
    /// (198.18.1.0/24); the server's namespace routes between the consumer's and the
    /// provider's networks when `forwarding`, so the consumer reaches the provider
    /// directly, and drops what the consumer sends the provider when not. The server is
    /// reachable from both either way (it is the router).
    fn routed(forwarding: bool) -> Lab {
        let mut namespaces = Namespaces::default();
        let server_ns = namespaces.add("herald-psrv");
        let provider_ns = namespaces.add("herald-pprov");
        let consumer_ns = namespaces.add("herald-pcons");
        namespaces.veth(
            (&server_ns, "hp0", Some(&format!("{SERVER_IP}{PREFIX}"))),
            (&provider_ns, "hp1", Some(&format!("{PROVIDER_IP}{PREFIX}"))),
        );
        namespaces.veth(
            (&server_ns, "hc0", Some(&format!("{ROUTER_IP}{PREFIX}"))),
            (&consumer_ns, "hc1", Some(&format!("{CONSUMER_IP}{PREFIX}"))),
        );
        ip(&[
            "-n",
            &consumer_ns,
            "route",
            "add",
            "default",
            "via",
            ROUTER_IP,
        ]);
        ip(&[
            "-n",
            &provider_ns,
            "route",
            "add",
            "default",
            "via",
            SERVER_IP,
        ]);
        ns_sysctl(
            &server_ns,
            "/proc/sys/net/ipv4/ip_forward",
            if forwarding { "1" } else { "0" },
        );
        Lab {
            server_ns,
            provider_ns,
            consumer_ns,
            children: Vec::new(),
            dir: TempDir::new("peers-direct"),
            _namespaces: namespaces,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn output(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        in_ns(ns, &bin(program))
            .args(args)
            .env("HERALD_LOG", "warn")
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    fn ok(&self, ns: &str, program: &str, args: &[&str]) -> String {
        let out = self.output(ns, program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn server(&self, args: &[&str]) -> String {
        let data = self.path("server");
        let mut all = vec!["--data-dir", data.to_str().expect("UTF-8 path")];
        all.extend_from_slice(args);
        self.ok(&self.server_ns, "herald-server", &all)
    }

    fn agent(&self, ns: &str, state: &str, args: &[&str]) -> String {
        let state = self.path(state);
        let mut all = vec!["--state-dir", state.to_str().expect("UTF-8 path")];
        all.extend_from_slice(args);
        self.ok(ns, "herald-agent", &all)
    }

    fn spawn(&mut self, ns: &str, program: &str, args: &[&str], log: &str) {
        let log = self.path(log);
        let child = in_ns(ns, &bin(program))
            .args(args)
            .env("HERALD_LOG", "info,herald_agent=debug,herald_server=debug")
            .stdout(log_to(&log))
            .stderr(log_to(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        self.children.push(child);
    }

    fn start_server(&mut self) {
        let quic = format!("{SERVER_IP}:{QUIC_PORT}");
        let http = format!("127.0.0.1:{HTTP_PORT}");
        self.server(&[
            "init",
            "--public-addr",
            &quic,
            "--quic-listen",
            &quic,
            "--http-listen",
            &http,
        ]);
        let data = self.path("server");
        let ns = self.server_ns.clone();
        self.spawn(
            &ns,
            "herald-server",
            &["--data-dir", data.to_str().expect("UTF-8"), "serve"],
            "server.log",
        );
        let log = self.path("server.log");
        wait_until("the server to serve", DEADLINE, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("herald-server serving"))
                .map(|_| ())
        });
    }

    /// Enrolls an agent whose state lives in `state`; returns its id.
    fn enroll(&self, ns: &str, state: &str) -> String {
        let token = self.server(&["token", "create"]).trim().to_string();
        let out = self.agent(ns, state, &["enroll", &token, "--name", state]);
        out.split_whitespace()
            .nth(2)
            .expect("enroll prints 'enrolled as ID'")
            .trim_end_matches(';')
            .to_string()
    }

    /// Makes users alice (owning `provider`) and bob (owning `consumer`), both in club
    /// `friends`, in the server's database (the console's clubs are tested elsewhere).
    fn club(&self) {
        let db =
            rusqlite::Connection::open(self.path("server").join("herald.db")).expect("open db");
        db.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        db.execute_batch(
            "INSERT INTO users (login, password_hash, role, created_at)
                 VALUES ('alice', 'x', 'user', 0), ('bob', 'x', 'user', 0);
             UPDATE agents SET owner_user_id = (SELECT id FROM users WHERE login = 'alice')
                 WHERE name = 'provider';
             UPDATE agents SET owner_user_id = (SELECT id FROM users WHERE login = 'bob')
                 WHERE name = 'consumer';
             INSERT INTO clubs (name, created_by, created_at)
                 SELECT 'friends', id, 0 FROM users WHERE login = 'alice';
             INSERT INTO club_members (club_id, user_id, role, joined_at)
                 SELECT c.id, u.id, CASE u.login WHEN 'alice' THEN 'owner' ELSE 'member' END, 0
                 FROM clubs c, users u WHERE c.name = 'friends';",
        )
        .expect("users and club");
    }

    fn agent_detail(&self, agent: &str) -> Value {
        let out = self.server(&["agents", "show", agent, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON: {e}\n{out}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["server.log", "provider.log", "connect.log"] {
                eprintln!("--- {log}:\n{}", tail(&self.path(log), 40));
            }
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A lab with alice's providing agent running and sharing an echo service with club
/// `friends`, and bob's `herald-agent connect alice/echo` (with `extra` arguments)
/// listening on [`CONNECT_PORT`] in the consumer's namespace; returns the provider's id.
fn shared_echo(lab: &mut Lab, extra: &[&str]) -> String {
    lab.start_server();
    let (provider_ns, consumer_ns) = (lab.provider_ns.clone(), lab.consumer_ns.clone());
    let provider = lab.enroll(&provider_ns, "provider");
    lab.enroll(&consumer_ns, "consumer");
    lab.club();
    echo_service(provider_ns.clone());
    let service = format!("127.0.0.1:{SERVICE_PORT}");
    lab.agent(
        &provider_ns,
        "provider",
        &[
            "share", "add", "echo", "--to", &service, "--club", "friends",
        ],
    );
    let state = lab.path("provider");
    lab.spawn(
        &provider_ns,
        "herald-agent",
        &["--state-dir", state.to_str().expect("UTF-8"), "run"],
        "provider.log",
    );
    wait_until("the provider online", DEADLINE, || {
        (lab.agent_detail(&provider)["online"] == true).then_some(())
    });
    // `connect` checks the directory first: start it once the share is listed.
    let consumer_state = lab.path("consumer");
    let consumer_state = consumer_state.to_str().expect("UTF-8").to_string();
    wait_until("alice/echo in bob's directory", DEADLINE, || {
        let out = lab.output(
            &consumer_ns,
            "herald-agent",
            &["--state-dir", &consumer_state, "peers", "--json"],
        );
        String::from_utf8_lossy(&out.stdout)
            .contains("\"echo\"")
            .then_some(())
    });
    let port = CONNECT_PORT.to_string();
    let mut args = vec![
        "--state-dir",
        &consumer_state,
        "connect",
        "alice/echo",
        "--local-port",
        &port,
    ];
    args.extend_from_slice(extra);
    lab.spawn(&consumer_ns, "herald-agent", &args, "connect.log");
    provider
}

/// A TCP connection to `connect`'s port, from a thread that entered the consumer's
/// namespace, once it listens; reads and writes time out after [`DEADLINE`].
fn dial_connect() -> TcpStream {
    let addr: SocketAddr = ([127, 0, 0, 1], CONNECT_PORT).into();
    let stream = wait_until("the connect listener", DEADLINE, || {
        TcpStream::connect(addr).ok()
    });
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.set_write_timeout(Some(DEADLINE)).expect("timeout");
    stream
}

/// Echoes `rounds` blocks through `connect`'s port from a thread inside `ns`, on one TCP
/// connection; returns once it is closed again.
fn echo_through_connect(ns: &str, seed: u8, rounds: usize) {
    let ns = ns.to_string();
    let client = std::thread::spawn(move || {
        enter(&ns);
        echo_rounds(&mut dial_connect(), seed, rounds);
    });
    client.join().expect("the echo went through");
}

/// The server's tunnel sessions, oldest first: (id, via, bytes up, bytes down, outcome,
/// ended).
fn server_sessions(lab: &Lab) -> Vec<(i64, String, i64, i64, String, bool)> {
    let db = rusqlite::Connection::open(lab.path("server").join("herald.db")).expect("open db");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let mut stmt = db
        .prepare(
            "SELECT id, via, bytes_up, bytes_down, outcome, ended_at IS NOT NULL
             FROM tunnel_sessions ORDER BY id",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

/// The providing agent's own session records, newest first.
fn provider_sessions(lab: &Lab) -> Vec<Value> {
    let out = lab.agent(
        &lab.provider_ns,
        "provider",
        &["share", "sessions", "--json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON: {e}\n{out}"))
}

/// Waits for `connect`'s log to hold a line starting with `prefix`; returns it.
fn connect_line(lab: &Lab, prefix: &str) -> String {
    let log = lab.path("connect.log");
    wait_until(&format!("connect to print {prefix:?}"), DEADLINE, || {
        std::fs::read_to_string(&log)
            .ok()?
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
    })
}

/// A QUIC client for the agents' direct ALPN with a fresh Ed25519 identity (an agent
/// key no session was brokered for), trusting any certificate.
fn stranger_client() -> quinn::ClientConfig {
    herald_tests::raw_quic_client_for(&rcgen::PKCS_ED25519, b"herald-peer/1")
}

/// From namespace `ns`, connects to the provider's direct endpoint at `addr` as a
/// stranger and opens a stream for each of `sessions`; returns the provider's answers.
fn stranger_opens(ns: &str, addr: SocketAddr, sessions: Vec<i64>) -> Vec<OfferAnswer> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let endpoint =
                quinn::Endpoint::client("0.0.0.0:0".parse().expect("address")).expect("endpoint");
            let connecting = endpoint
                .connect_with(stranger_client(), addr, "herald-agent")
                .expect("connect");
            let connection = tokio::time::timeout(DEADLINE, connecting)
                .await
                .expect("the handshake in time")
                .expect("the provider takes any agent's handshake");
            let mut answers = Vec::new();
            for session in sessions {
                let (mut send, mut recv) = connection.open_bi().await.expect("open a stream");
                wire::write_frame(&mut send, &DirectOpen { session }, DEFAULT_FRAME_LIMIT)
                    .await
                    .expect("send the opening");
                let answer = tokio::time::timeout(
                    DEADLINE,
                    wire::read_frame::<OfferAnswer>(&mut recv, DEFAULT_FRAME_LIMIT),
                )
                .await
                .expect("an answer in time")
                .expect("a readable answer")
                .expect("an answer before the end of the stream");
                answers.push(answer);
            }
            answers
        })
    })
    .join()
    .expect("the stranger's thread")
}

/// An echo service inside namespace `ns`, on a thread of its own.
fn echo_service(ns: String) {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(&ns);
        let listener = TcpListener::bind(("127.0.0.1", SERVICE_PORT)).expect("bind the service");
        ready_tx.send(()).expect("ready");
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    ready.recv_timeout(DEADLINE).expect("the service started");
}

/// Sends `rounds` blocks of 256 KiB through `stream` and checks each comes back intact.
fn echo_rounds(stream: &mut TcpStream, seed: u8, rounds: usize) {
    let mut back = vec![0u8; 256 * 1024];
    for round in 0..rounds {
        let block: Vec<u8> = (0..back.len())
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed)
                    .wrapping_add(round as u8)
            })
            .collect();
        stream.write_all(&block).expect("write through the tunnel");
        stream
            .read_exact(&mut back)
            .expect("read the echo through the tunnel");
        assert!(back == block, "round {round}: the echo differs");
    }
}

#[test]
fn tunnel_survives_an_address_change() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = Lab::new();
    // The provider is the server side of a direct connection, which QUIC cannot migrate:
    // this test is about the relay's tunnels.
    let provider = shared_echo(&mut lab, &["--relay-only"]);
    let (server_ns, provider_ns) = (lab.server_ns.clone(), lab.provider_ns.clone());

    // One TCP connection through the tunnel, from a thread inside the server's namespace.
    let (to_client, orders) = std::sync::mpsc::channel::<usize>();
    let (to_test, done) = std::sync::mpsc::channel::<()>();
    let client_ns = server_ns.clone();
    let client = std::thread::spawn(move || {
        enter(&client_ns);
        let mut stream = dial_connect();
        for (seed, rounds) in orders.iter().enumerate() {
            echo_rounds(&mut stream, seed as u8, rounds);
            to_test.send(()).expect("report");
        }
    });
    to_client.send(8).expect("order");
    done.recv_timeout(DEADLINE)
        .expect("2 MiB echoed before the address change");

    // Move the provider to a new address under the open tunnel.
    ip(&[
        "-n",
        &provider_ns,
        "addr",
        "add",
        &format!("{PROVIDER_NEW_IP}{PREFIX}"),
        "dev",
        "hp1",
    ]);
    ip(&[
        "-n",
        &provider_ns,
        "addr",
        "del",
        &format!("{PROVIDER_IP}{PREFIX}"),
        "dev",
        "hp1",
    ]);
    let new_prefix = format!("{PROVIDER_NEW_IP}:");
    wait_until(
        "the server to see the provider's new address",
        DEADLINE,
        || {
            let detail = lab.agent_detail(&provider);
            let observed = detail["observed_address"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            observed.starts_with(&new_prefix).then_some(())
        },
    );

    // The same TCP connection carries on.
    to_client.send(16).expect("order");
    done.recv_timeout(DEADLINE)
        .expect("4 MiB echoed after the address change");
    drop(to_client);
    client.join().expect("the client thread");

    // The provider's link moved to the new path rather than being replaced: a new
    // connection would have ended the tunnel's stream with it.
    let log = std::fs::read_to_string(lab.path("server.log")).unwrap_or_default();
    assert_eq!(
        log.matches("agent connected").count(),
        1,
        "the provider reconnected instead of migrating"
    );
}

#[test]
fn direct_path_is_used_when_reachable() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = Lab::routed(true);
    let provider = shared_echo(&mut lab, &[]);
    let consumer_ns = lab.consumer_ns.clone();

    // Bytes flow end to end, on the direct path.
    echo_through_connect(&consumer_ns, 1, 8);
    let path = connect_line(&lab, "path: ");
    assert!(
        path.starts_with(&format!("path: direct ({PROVIDER_IP}:")),
        "connect took another path: {path}"
    );

    // The server brokered the session and recorded it as direct, but moved none of its
    // bytes: it ends with the consumer's TCP connection, at 0 bytes.
    let sessions = wait_until("the direct session's end at the server", DEADLINE, || {
        let sessions = server_sessions(&lab);
        sessions.iter().all(|s| s.5).then_some(sessions)
    });
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let (session, via, up, down, outcome, _) = &sessions[0];
    assert_eq!(
        (via.as_str(), *up, *down, outcome.as_str()),
        ("direct", 0, 0, "closed"),
        "the server's record"
    );
    // The provider moved them, for that session.
    let moved = wait_until("the provider's record of the session", DEADLINE, || {
        provider_sessions(&lab)
            .into_iter()
            .find(|r| r["session"] == *session && r["outcome"] == "closed")
    });
    let expected = 8 * 256 * 1024;
    assert_eq!(
        (moved["bytes_up"].as_i64(), moved["bytes_down"].as_i64()),
        (Some(expected), Some(expected)),
        "{moved}"
    );
    // The server saw none of them, but the provider's signed count of the session
    // (what billing uses) reaches it through the provider's report outbox.
    let signed = wait_until(
        "the provider's signed count of the session",
        DEADLINE,
        || {
            let db = rusqlite::Connection::open(lab.path("server").join("herald.db")).ok()?;
            db.busy_timeout(Duration::from_secs(10)).ok()?;
            db.query_row(
                "SELECT bytes_up, bytes_down FROM usage_signatures
             WHERE session_id = ?1 AND side = 'provider' AND final = 1",
                [*session],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .ok()
        },
    );
    assert_eq!(signed, (expected, expected));

    // A second connection reuses the direct connection, with a session of its own.
    echo_through_connect(&consumer_ns, 2, 2);
    let log = std::fs::read_to_string(lab.path("connect.log")).unwrap_or_default();
    assert_eq!(
        log.matches("path: ").count(),
        1,
        "the path was decided once:\n{log}"
    );
    let sessions = server_sessions(&lab);
    assert!(
        sessions.len() == 2 && sessions.iter().all(|s| s.1 == "direct" && s.2 == 0),
        "{sessions:?}"
    );

    // Someone else at the provider's direct endpoint (any agent key passes the
    // handshake) is refused, for a session brokered for bob and for one never brokered.
    let observed = lab.agent_detail(&provider)["observed_address"]
        .as_str()
        .expect("the provider's observed address")
        .parse::<SocketAddr>()
        .expect("an address");
    let answers = stranger_opens(&consumer_ns, observed, vec![*session, 999_999]);
    match &answers[..] {
        [OfferAnswer::Refused(theirs), OfferAnswer::Refused(unknown)] => {
            assert!(theirs.contains("is for another agent"), "{theirs}");
            assert!(
                unknown.contains("no direct session 999999 is expected"),
                "{unknown}"
            );
        }
        other => panic!("a stranger was not refused: {other:?}"),
    }
    let refused = provider_sessions(&lab)
        .into_iter()
        .filter(|r| {
            r["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("refused: "))
        })
        .count();
    assert_eq!(refused, 2, "the provider records both refusals");
}

#[test]
fn an_unreachable_provider_is_reached_through_the_relay() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The server's namespace does not forward: the consumer reaches the server but not
    // the provider's addresses.
    let mut lab = Lab::routed(false);
    shared_echo(&mut lab, &[]);
    let consumer_ns = lab.consumer_ns.clone();
    echo_through_connect(&consumer_ns, 3, 8);
    let path = connect_line(&lab, "path: ");
    assert!(
        path.starts_with("path: relay (direct failed: ") && path.contains(PROVIDER_IP),
        "{path}"
    );
    let sessions = wait_until("both sessions' ends at the server", DEADLINE, || {
        let sessions = server_sessions(&lab);
        (sessions.len() == 2 && sessions.iter().all(|s| s.5)).then_some(sessions)
    });
    let (_, via, _, _, outcome, _) = &sessions[0];
    assert_eq!(via, "direct");
    assert!(
        outcome.starts_with("failed: the consumer could not reach the device directly"),
        "{outcome}"
    );
    let expected = 8 * 256 * 1024;
    let (_, via, up, down, outcome, _) = &sessions[1];
    assert_eq!(
        (via.as_str(), *up, *down, outcome.as_str()),
        ("relay", expected, expected, "closed"),
        "the relay carried the bytes"
    );

    // The relay stays the path: the next connection does not try again.
    echo_through_connect(&consumer_ns, 4, 1);
    let sessions = server_sessions(&lab);
    assert!(
        sessions.len() == 3 && sessions[2].1 == "relay",
        "{sessions:?}"
    );
}
