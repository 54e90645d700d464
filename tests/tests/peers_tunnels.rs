//! Shared services through the relay, with real processes: a server, providing agents
//! that share local TCP services (`herald-agent share add`), and consumers that reach
//! them with `herald-agent connect` and list the directory with `herald-agent peers`.
//!
//! Users register in the console and link their devices with their personal tokens;
//! clubs are written into the server's database (there is no clubs API on this branch),
//! as `clubs` and `club_members` rows.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use herald_tests::console_client::Console;
use herald_tests::{bin, free_port, wait_until, TestAgent, TestServer, DEADLINE};

/// Bytes of the large transfer.
const LARGE: usize = 64 * 1024 * 1024;

// === fixtures ===

/// Registers `login` in the console and links a device named `device` to them
/// (enrolled, not started).
fn user_with_device(server: &TestServer, login: &str, device: &str) -> TestAgent {
    Console::new(server).register_with_device(
        server,
        login,
        &format!("{login}@example.org"),
        "",
        device,
    )
}

/// Creates club `name` with `members` (logins), straight in the server's database.
fn club(server: &TestServer, name: &str, members: &[&str]) {
    server.club(name, members);
}

/// Removes `login` from club `name`.
fn leave_club(server: &TestServer, name: &str, login: &str) {
    server.leave_club(name, login);
}

/// The server's tunnel sessions, oldest first, as JSON objects (from `sessions --json`).
fn server_sessions(server: &TestServer) -> Vec<Value> {
    let mut sessions: Vec<Value> = server
        .json(&["sessions", "--limit", "10000"])
        .as_array()
        .expect("sessions is an array")
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s["id"],
                "provider": s["provider_agent_id"],
                "share": s["share"],
                "consumer": s["consumer_agent_id"],
                "via": s["via"],
                "bytes_up": s["bytes_up"],
                "bytes_down": s["bytes_down"],
                "outcome": s["outcome"],
                "ended": !s["ended_at"].is_null(),
            })
        })
        .collect();
    sessions.sort_by_key(|s| s["id"].as_i64());
    sessions
}

/// A local TCP service for the tests. Each connection's first byte says what it does:
/// `e` echoes everything back until the client finishes; `s` then a decimal count and
/// a newline sends that many bytes and closes.
struct Service {
    port: u16,
}

impl Service {
    fn start() -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind service");
        let port = listener.local_addr().expect("service address").port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || serve(stream));
            }
        });
        Service { port }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve(mut stream: TcpStream) {
    let mut mode = [0u8; 1];
    if stream.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        b'e' => {
            let mut reader = stream.try_clone().expect("clone stream");
            let _ = std::io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        }
        b's' => {
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            if reader.read_line(&mut line).is_err() {
                return;
            }
            let count: usize = line.trim().parse().unwrap_or(0);
            let chunk = vec![b'x'; 16 * 1024];
            let mut left = count;
            while left > 0 {
                let n = left.min(chunk.len());
                if stream.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n;
            }
            let _ = stream.shutdown(Shutdown::Write);
        }
        _ => {}
    }
}

/// A running `herald-agent connect`, with its output read in threads.
struct Connect {
    child: Child,
    port: u16,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Connect {
    /// Starts `connect TARGET` for `agent` and waits for its "listening" line.
    fn start(agent: &TestAgent, target: &str) -> Connect {
        let (child, stdout, stderr, port) = spawn_connect(agent, target);
        let connect = Connect {
            child,
            port,
            stdout,
            stderr,
        };
        let line = connect
            .stdout
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("connect printed nothing: {}", connect.stderr_text()));
        assert!(
            line.starts_with(&format!("{target}: relay through 127.0.0.1:"))
                && line.ends_with(&format!("listening on 127.0.0.1:{port}")),
            "{line}"
        );
        connect
    }

    /// Connects to the local port.
    fn dial(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("dial connect's port");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        stream
    }

    /// Waits for a line on stderr containing `text`.
    fn wait_stderr(&self, text: &str) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < DEADLINE {
            match self.stderr.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(text) => return line,
                Ok(line) => seen.push(line),
                Err(_) => {}
            }
        }
        panic!("connect never said {text:?}; it said: {seen:?}");
    }

    fn stderr_text(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_connect(
    agent: &TestAgent,
    target: &str,
) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>, u16) {
    let port = free_port();
    let mut child = Command::new(bin("herald-agent"))
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .args(["connect", target, "--local-port", &port.to_string()])
        // These tests are about the relay; peers_netns.rs tests the direct path.
        .arg("--relay-only")
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald-agent connect");
    let lines = |pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
    let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
    (child, stdout, stderr, port)
}

/// Echoes `data` through `stream` (in `e` mode): writes it from a thread while reading
/// the echo; returns the SHA-256 of what came back and its length.
fn echo_through(stream: TcpStream, data: Vec<u8>) -> ([u8; 32], usize) {
    let mut writer = stream.try_clone().expect("clone stream");
    let sending = std::thread::spawn(move || {
        writer.write_all(b"e").expect("mode");
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).expect("send through the tunnel");
        }
        writer.shutdown(Shutdown::Write).expect("finish sending");
    });
    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).expect("read the echo");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    sending.join().expect("sender thread");
    (hasher.finalize().into(), total)
}

/// Pseudo-random bytes (xorshift), so a reordered or repeated chunk changes the digest.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Replaces the line `from` (which must be there) with `to` in `agent`'s agent.toml.
fn set_in_config(agent: &TestAgent, from: &str, to: &str) {
    let path = agent.state_dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).expect("read agent.toml");
    assert!(text.contains(from), "{text}");
    std::fs::write(&path, text.replace(from, to)).expect("write agent.toml");
}

/// `peers --json` for `agent`.
fn peers(agent: &TestAgent, query: Option<&str>) -> Vec<Value> {
    let mut args = vec!["peers"];
    args.extend(query);
    agent.json(&args).as_array().expect("an array").clone()
}

/// The services `agent` sees, as `OWNER@DEVICE/SERVICE`.
fn reachable(agent: &TestAgent, query: Option<&str>) -> Vec<String> {
    let mut all: Vec<String> = peers(agent, query)
        .iter()
        .flat_map(|d| {
            let owner = d["owner"].as_str().unwrap_or_default().to_string();
            let device = d["device"].as_str().unwrap_or_default().to_string();
            d["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |s| {
                    format!(
                        "{owner}@{device}/{}",
                        s["name"].as_str().unwrap_or_default()
                    )
                })
        })
        .collect();
    all.sort();
    all
}

fn wait_reachable(agent: &TestAgent, query: Option<&str>, expected: &[&str]) {
    wait_until(
        &format!("{} to see {expected:?}", agent.name),
        DEADLINE,
        || (reachable(agent, query) == expected).then_some(()),
    );
}

// === tests ===

/// alice (running) and bob (enrolled, not running), both in club chess; alice shares an
/// echo service as `share` with the club (plus `extra` arguments to `share add`), and
/// bob's directory lists it.
fn alice_shares_echo(
    name: &str,
    share: &str,
    extra: &[&str],
) -> (TestServer, TestAgent, TestAgent, Service) {
    let server = TestServer::start(name);
    let mut alice = user_with_device(&server, "alice", "alice-pc");
    let bob = user_with_device(&server, "bob", "bob-pc");
    club(&server, "chess", &["alice", "bob"]);
    alice.spawn();
    alice.wait_online(&server);
    let service = Service::start();
    let address = service.address();
    let mut args = vec!["share", "add", share, "--to", &address, "--club", "chess"];
    args.extend_from_slice(extra);
    alice.cli_ok(&args);
    wait_reachable(&bob, None, &[&format!("alice@alice-pc/{share}")]);
    (server, alice, bob, service)
}

/// `agent` shares `service` as `echo` with the club `chess`.
fn share_echo_with_chess(agent: &TestAgent, service: &Service) {
    agent.cli_ok(&[
        "share",
        "add",
        "echo",
        "--to",
        &service.address(),
        "--club",
        "chess",
    ]);
}

/// The newest session `agent` recorded, once `done` holds for it.
fn newest_session(agent: &TestAgent, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, DEADLINE, || {
        let s = agent.json(&["share", "sessions"]);
        let first = s.as_array()?.first()?.clone();
        done(&first).then_some(first)
    })
}

#[test]
fn club_member_reaches_a_shared_service_through_the_relay() {
    // The consumer's daemon need not run: `connect` uses a side connection.
    let (server, alice, bob, _service) =
        alice_shares_echo("tunnel-relay", "echo", &["--description", "an echo"]);
    let connect = Connect::start(&bob, "alice/echo");

    // Bytes both ways, then a large transfer whose digest must match.
    let mut small = connect.dial();
    small.write_all(b"ehello").unwrap();
    let mut back = [0u8; 5];
    small.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    drop(small);
    // Several tunnels at once on `connect`'s one side connection, as a browser opens them.
    let many: Vec<TcpStream> = (0..8u8)
        .map(|i| {
            let mut stream = connect.dial();
            stream.write_all(&[b'e', b'0' + i]).unwrap();
            stream
        })
        .collect();
    // All answer while all are open.
    for (i, mut stream) in many.iter().enumerate() {
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back[0], b'0' + i as u8);
    }
    drop(many);
    let data = noise(LARGE);
    let sent: [u8; 32] = Sha256::digest(&data).into();
    let started = Instant::now();
    let (received, len) = echo_through(connect.dial(), data);
    eprintln!("64 MiB echoed through the relay in {:?}", started.elapsed());
    assert_eq!(len, LARGE);
    assert_eq!(received, sent, "the echo's digest matches what was sent");

    // Recorded by the server (consumer → provider counts the mode byte too)...
    let sessions = wait_until(
        "the server to record every session as ended",
        DEADLINE,
        || {
            let s = server_sessions(&server);
            (s.len() == 10 && s.iter().all(|s| s["ended"] == true)).then_some(s)
        },
    );
    let large = &sessions[9];
    assert_eq!(large["via"], "relay");
    assert_eq!(large["share"], "echo");
    assert_eq!(large["provider"], alice.id.as_str());
    assert_eq!(large["consumer"], bob.id.as_str());
    assert_eq!(large["outcome"], "closed");
    assert_eq!(large["bytes_up"], (LARGE + 1) as i64);
    assert_eq!(large["bytes_down"], LARGE as i64);
    assert_eq!(sessions[0]["bytes_up"], 6);
    // ...by the provider...
    let provided = newest_session(&alice, "alice to record the session", |s| {
        s["outcome"] == "closed" && s["session"] == large["id"]
    });
    assert_eq!(provided["role"], "provided");
    assert_eq!(provided["share"], "echo");
    assert_eq!(provided["bytes_up"], (LARGE + 1) as i64);
    assert_eq!(provided["bytes_down"], LARGE as i64);
    assert!(
        provided["peer"].as_str().unwrap().contains("bob"),
        "{provided}"
    );
    // ...and by the consumer.
    let used = newest_session(&bob, "bob to record the session", |s| {
        s["outcome"] == "closed" && s["session"] == large["id"]
    });
    assert_eq!(used["role"], "used");
    assert_eq!(used["share"], "alice/echo");
    assert_eq!(used["bytes_up"], (LARGE + 1) as i64);
    assert_eq!(used["bytes_down"], LARGE as i64);
}

#[test]
fn non_member_and_unshared_port_are_refused() {
    let server = TestServer::start("tunnel-refused");
    let mut alice = user_with_device(&server, "alice", "alice-pc");
    let bob = user_with_device(&server, "bob", "bob-pc");
    let carol = user_with_device(&server, "carol", "carol-pc");
    club(&server, "chess", &["alice", "bob"]);
    alice.spawn();
    alice.wait_online(&server);
    let service = Service::start();
    // A port nothing listens on, shared all the same.
    let dead = format!("127.0.0.1:{}", free_port());
    share_echo_with_chess(&alice, &service);
    alice.cli_ok(&["share", "add", "dead", "--to", &dead, "--club", "chess"]);
    wait_reachable(&bob, None, &["alice@alice-pc/dead", "alice@alice-pc/echo"]);

    // Carol is in no club: alice's services are not hers to reach.
    assert!(reachable(&carol, None).is_empty());
    let refused = carol.cli(&[
        "connect",
        "alice/echo",
        "--local-port",
        &free_port().to_string(),
    ]);
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("alice/echo is not in your directory: no online device of alice shares anything with you"),
        "{stderr}"
    );

    // The providing agent refuses what it cannot serve, and says why.
    let connect = Connect::start(&bob, "alice/dead");
    let mut stream = connect.dial();
    let mut buf = [0u8; 1];
    assert_eq!(
        stream.read(&mut buf).unwrap_or(0),
        0,
        "the refused connection is closed"
    );
    let line = connect.wait_stderr("refused");
    assert!(
        line.contains(&format!(
            "the device sharing it refused: the local service at {dead} is not answering"
        )),
        "{line}"
    );
    drop(connect);

    // Bob leaves the club while connected: the next connection is refused by the
    // server, with the reason, and nothing reaches the service.
    let connect = Connect::start(&bob, "alice/echo");
    leave_club(&server, "chess", "bob");
    let mut stream = connect.dial();
    stream.write_all(b"e").ok();
    assert_eq!(
        stream.read(&mut buf).unwrap_or(0),
        0,
        "the refused connection is closed"
    );
    let line = connect.wait_stderr("refused");
    assert!(line.contains("alice shares nothing with you"), "{line}");

    // The refusals are on record: at the server (what reached a provider) and at alice.
    let sessions = server_sessions(&server);
    assert!(
        sessions
            .iter()
            .any(|s| s["share"] == "dead"
                && s["outcome"].as_str().unwrap().contains("is not answering")),
        "{sessions:?}"
    );
    let local = alice.json(&["share", "sessions"]);
    assert!(
        local
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["share"] == "dead"
                && s["outcome"]
                    .as_str()
                    .unwrap()
                    .starts_with("refused: the local service")),
        "{local}"
    );
    let log = alice.log();
    assert!(
        log.contains("tunnel refused"),
        "the provider logs its refusal"
    );
    let server_log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    assert!(
        server_log.contains("tunnel refused"),
        "the server logs refusals"
    );
}

#[test]
fn rate_limit_and_connection_cap_hold() {
    const RATE: u64 = 200_000;
    const BYTES: u64 = 600_000;
    let rate = RATE.to_string();
    let (_server, _alice, bob, _service) = alice_shares_echo(
        "tunnel-limits",
        "svc",
        &["--max-connections", "2", "--rate-limit", &rate],
    );
    let connect = Connect::start(&bob, "alice/svc");

    // Two tunnels open (each proven by an echo), the third is refused with the reason.
    let open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = connect.dial();
            stream.write_all(b"eping").unwrap();
            let mut back = [0u8; 4];
            stream.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping");
            stream
        })
        .collect();
    let mut third = connect.dial();
    third.write_all(b"e").ok();
    let mut buf = [0u8; 1];
    assert_eq!(
        third.read(&mut buf).unwrap_or(0),
        0,
        "the third connection is closed"
    );
    let line = connect.wait_stderr("refused");
    assert!(
        line.contains("svc already carries 2 connections, its limit"),
        "{line}"
    );
    drop(open);

    // Rate: BYTES at RATE bytes a second take at least (BYTES - burst) / RATE, the burst
    // being a quarter second's worth.
    let mut stream = wait_until("a place under the cap again", DEADLINE, || {
        let mut stream = connect.dial();
        stream.write_all(format!("s{BYTES}\n").as_bytes()).ok()?;
        let mut first = [0u8; 1];
        (stream.read(&mut first).ok()? == 1).then_some(stream)
    });
    let started = Instant::now();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let took = started.elapsed();
    assert_eq!(rest.len() as u64 + 1, BYTES);
    let floor = Duration::from_secs_f64((BYTES - RATE / 4 - 64 * 1024) as f64 / RATE as f64);
    assert!(
        took >= floor,
        "{BYTES} bytes at {RATE} B/s took only {took:?} (floor {floor:?})"
    );
    eprintln!("{BYTES} bytes at {RATE} B/s took {took:?} (floor {floor:?})");
}

#[test]
fn directory_shows_only_what_my_clubs_share() {
    let server = TestServer::start("tunnel-directory");
    let mut alice = user_with_device(&server, "alice", "alice-pc");
    let bob = user_with_device(&server, "bob", "bob-pc");
    let carol = user_with_device(&server, "carol", "carol-pc");
    club(&server, "chess", &["alice", "bob"]);
    club(&server, "family", &["alice"]);
    alice.spawn();
    alice.wait_online(&server);
    let service = Service::start();
    let to = service.address();
    alice.cli_ok(&[
        "share",
        "add",
        "board",
        "--to",
        &to,
        "--club",
        "chess",
        "--description",
        "Schachbrett 체스판",
    ]);
    alice.cli_ok(&["share", "add", "photos", "--to", &to, "--club", "family"]);
    alice.cli_ok(&["share", "add", "blog", "--to", &to, "--public", "--http"]);

    // Bob (chess) sees the chess share and the public one, not the family's.
    wait_reachable(&bob, None, &["alice@alice-pc/blog", "alice@alice-pc/board"]);
    let listed = peers(&bob, None);
    assert_eq!(listed.len(), 1);
    let device = &listed[0];
    assert_eq!(device["agent_id"], alice.id.as_str());
    assert!(device["online_since"].as_i64().unwrap() > 0);
    assert!(
        device["observed"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{device}"
    );
    let board = device["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "board")
        .unwrap();
    assert_eq!(board["clubs"], serde_json::json!(["chess"]));
    assert_eq!(board["description"], "Schachbrett 체스판");
    // Carol (no club) sees only the public share.
    assert_eq!(reachable(&carol, None), ["alice@alice-pc/blog"]);
    // Keywords in any language, over owners, services and descriptions.
    assert_eq!(reachable(&bob, Some("체스")), ["alice@alice-pc/board"]);
    assert_eq!(reachable(&bob, Some("SCHACH")), ["alice@alice-pc/board"]);
    assert_eq!(reachable(&bob, Some("alice")).len(), 2);
    assert!(reachable(&bob, Some("nothing-like-this")).is_empty());

    // A share removed on the machine leaves the directory within seconds.
    alice.cli_ok(&["share", "rm", "board"]);
    wait_reachable(&bob, None, &["alice@alice-pc/blog"]);

    // So does a device that stops.
    let pid = alice.pid().expect("alice runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let stopped = Instant::now();
    wait_until("alice's agent to exit", DEADLINE, || alice.try_wait());
    wait_until(
        "alice's device to leave bob's directory",
        Duration::from_secs(10),
        || reachable(&bob, None).is_empty().then_some(()),
    );
    eprintln!(
        "the directory dropped a stopped device after {:?}",
        stopped.elapsed()
    );
}

#[test]
fn idle_tunnels_are_closed() {
    let server = TestServer::start("tunnel-idle");
    let mut alice = user_with_device(&server, "alice", "alice-pc");
    let bob = user_with_device(&server, "bob", "bob-pc");
    club(&server, "chess", &["alice", "bob"]);
    // `[peers] idle_timeout_secs` in the providing agent's agent.toml.
    set_in_config(&alice, "idle_timeout_secs = 600", "idle_timeout_secs = 2");
    alice.spawn();
    alice.wait_online(&server);
    let service = Service::start();
    share_echo_with_chess(&alice, &service);
    wait_reachable(&bob, None, &["alice@alice-pc/echo"]);
    let connect = Connect::start(&bob, "alice/echo");
    let mut stream = connect.dial();
    stream.write_all(b"eping").unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).unwrap();
    // Then nothing either way: the provider closes the tunnel after two seconds.
    let quiet = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(
        stream.read(&mut buf).unwrap_or(0),
        0,
        "the idle tunnel is closed"
    );
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after only {waited:?}"
    );
    let provided = newest_session(&alice, "alice to record the idle end", |s| {
        s["outcome"] == "idle"
    });
    assert_eq!(provided["bytes_up"], 5);
    assert_eq!(provided["bytes_down"], 4);
    // The server and the consumer record it as idle too, not as a failure.
    wait_until("the server to record the idle end", DEADLINE, || {
        let s = server_sessions(&server);
        (s.len() == 1 && s[0]["outcome"] == "idle").then_some(())
    });
    newest_session(&bob, "bob to record the idle end", |s| {
        s["outcome"] == "idle"
    });
}

#[test]
fn connect_carries_on_after_the_server_restarts() {
    if herald_tests::sqlite_only("makes clubs by writing rows into herald.db") {
        return;
    }
    let (mut server, alice, bob, _service) = alice_shares_echo("tunnel-restart", "echo", &[]);
    let connect = Connect::start(&bob, "alice/echo");
    let round_trip = |connect: &Connect| {
        let mut stream = connect.dial();
        stream.write_all(b"eping").ok()?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).ok()?;
        (&back == b"ping").then_some(())
    };
    round_trip(&connect).expect("a tunnel before the restart");

    // The server dies without a word and comes back: the side connection is dead, and
    // `connect` finds that out and opens a new one for the next local connection.
    server.kill();
    server.spawn();
    alice.wait_online(&server);
    wait_until(
        "a tunnel after the restart",
        Duration::from_secs(90),
        || round_trip(&connect),
    );
}

// === signed counters (billing) ===

/// The counters one end signed for `session`, newest first, as the server stored them:
/// (seq, bytes_up, bytes_down, final).
fn usage_rows(server: &TestServer, session: i64, side: &str) -> Vec<(i64, i64, i64, bool)> {
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let mut stmt = db
        .prepare(
            "SELECT seq, bytes_up, bytes_down, final FROM usage_signatures
             WHERE session_id = ?1 AND side = ?2 ORDER BY seq DESC",
        )
        .expect("prepare");
    let rows = stmt
        .query_map(rusqlite::params![session, side], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

/// A plan that prices tunnel bytes, so the consumer's invoice has a line for them.
const BYTES_PLAN: &str = r#"
[[plan]]
name = "standard"
currency = "EUR"
default = true

[plan.meters.tunnel_bytes]
per = 1000
price = "0.01"

[plan.meters.tunnel_seconds]
price = "0.001"
"#;

#[test]
fn usage_is_billed_at_the_lower_of_both_signatures() {
    if herald_tests::sqlite_only("makes clubs by writing rows into herald.db") {
        return;
    }
    let (server, alice, mut bob, _service) = alice_shares_echo("usage-signed", "echo", &[]);
    // bob's agent signs every second while a tunnel is open.
    set_in_config(&bob, "usage_interval_secs = 60", "usage_interval_secs = 1");
    // bob's daemon sends what his `connect` signs (from the shared outbox).
    bob.spawn();
    bob.wait_online(&server);
    let connect = Connect::start(&bob, "alice/echo");

    // While a tunnel is open, bob's counts arrive at intervals, not only at its close.
    let mut open = connect.dial();
    open.write_all(b"eopen").unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).unwrap();
    let first = wait_until("the server to record the open session", DEADLINE, || {
        server_sessions(&server)
            .first()
            .and_then(|s| s["id"].as_i64())
    });
    wait_until(
        "an interval count while the tunnel is open",
        DEADLINE,
        || {
            usage_rows(&server, first, "consumer")
                .iter()
                .any(|r| !r.3 && r.1 == 5 && r.2 == 4)
                .then_some(())
        },
    );
    drop(open);
    let data = noise(100_000);
    let (_, len) = echo_through(connect.dial(), data);
    assert_eq!(len, 100_000);
    let session = wait_until(
        "the server to record the session as ended",
        DEADLINE,
        || {
            let s = server_sessions(&server);
            (s.len() == 2 && s[1]["ended"] == true).then(|| s[1]["id"].as_i64().expect("id"))
        },
    );
    // Both ends signed their last count, and both counted the same: the mode byte and
    // the data up, the echo down.
    let (up, down) = (100_001, 100_000);
    for (id, counted) in [(first, (5, 4)), (session, (up, down))] {
        for side in ["provider", "consumer"] {
            let rows = wait_until(
                &format!("the {side}'s last signed count of session {id} to be stored"),
                DEADLINE,
                || {
                    let rows = usage_rows(&server, id, side);
                    rows.first().is_some_and(|r| r.3).then_some(rows)
                },
            );
            assert_eq!((rows[0].1, rows[0].2), counted, "{side}: {rows:?}");
        }
    }

    // The operator sees both sessions, newest first.
    let listed = server.json(&["sessions", "--agent", &alice.id]);
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], session);
    assert_eq!(listed[0]["via"], "relay");
    assert_eq!(listed[0]["consumer_agent_id"], bob.id.as_str());
    assert_eq!(listed[0]["bytes_up"], up);
    let text = server.cli_ok(&["sessions"]);
    assert!(text.contains("relay") && text.contains("closed"), "{text}");
    let bad = server.cli(&["sessions", "--limit", "0"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("limit must be 1 to 10000"),
        "{bad:?}"
    );

    // alice's machine over-reports: a later "last" count, ten times higher, signed with
    // her agent's own key and sent from her agent's outbox.
    let inflated = herald_shared::message::Report::Usage(herald_shared::peers::SessionUsage {
        agent_id: alice.id.clone(),
        session,
        end: herald_shared::peers::End::Provider,
        seq: 1000,
        bytes_up: up as u64 * 10,
        bytes_down: down as u64 * 10,
        requests: 1,
        seconds: 3600,
        last: true,
        at: herald_io::now_ms(),
    });
    alice.queue_report(&inflated);
    wait_until("alice's inflated count to be stored", DEADLINE, || {
        (usage_rows(&server, session, "provider")[0].0 == 1000).then_some(())
    });
    // A count signed by the wrong end (bob claiming to be the provider) is refused.
    let mut forged = inflated.clone();
    if let herald_shared::message::Report::Usage(u) = &mut forged {
        u.agent_id = bob.id.clone();
        u.seq = 2000;
    }
    bob.queue_report(&forged);
    // And someone with the server's database raises bob's stored count in place.
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    db.execute(
        "UPDATE usage_signatures SET bytes_up = bytes_up * 100, bytes_down = bytes_down * 100
         WHERE session_id = ?1 AND side = 'consumer'",
        [session],
    )
    .expect("edit the consumer's row");
    // bob's outbox empties once the server answered (stored or dropped) his forgery.
    wait_until("bob's outbox to empty", DEADLINE, || {
        let journal =
            rusqlite::Connection::open(bob.state_dir.join("agent.db")).expect("bob's journal");
        let waiting: i64 = journal
            .query_row("SELECT COUNT(*) FROM reports", [], |r| r.get(0))
            .expect("count reports");
        (waiting == 0).then_some(())
    });
    assert!(
        usage_rows(&server, session, "provider")
            .iter()
            .all(|r| r.0 != 2000),
        "a count from the consumer's agent for the provider's end is not stored"
    );

    let plans = server.dir.path().join("plans.toml");
    std::fs::write(&plans, BYTES_PLAN).expect("write plans");
    server.cli_ok(&["billing", "plan", "set", plans.to_str().expect("path")]);
    let month: String = db
        .query_row(
            "SELECT strftime('%Y-%m', ended_at / 1000, 'unixepoch') FROM tunnel_sessions
             WHERE id = ?1",
            [session],
            |r| r.get(0),
        )
        .expect("the session's month");
    server.cli_ok(&["billing", "run", "--month", &month]);
    let invoices = server.json(&["billing", "invoices", "--month", &month]);
    let bob_user: i64 = db
        .query_row("SELECT id FROM users WHERE login = 'bob'", [], |r| r.get(0))
        .expect("bob's id");
    let bob_invoice = invoices
        .as_array()
        .expect("invoices")
        .iter()
        .find(|i| i["account"] == format!("user:{bob_user}"))
        .unwrap_or_else(|| panic!("no invoice for bob: {invoices:#}"));
    let bytes = bob_invoice["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .find(|l| l["meter"] == "tunnel_bytes")
        .unwrap_or_else(|| panic!("no bytes line: {bob_invoice:#}"));
    // Billed at what bob's agent signed: not alice's inflated count, not the edited row.
    // (Plus the 5 + 4 bytes of the first, held-open tunnel, which both ends agree on.)
    assert_eq!(bytes["quantity"], up + down + 9, "{bob_invoice:#}");
    let notes = bob_invoice["notes"].to_string();
    assert!(
        notes.contains("differ by more than") && notes.contains("the lower was billed"),
        "the disagreement is flagged: {notes}"
    );
    assert!(
        notes.contains("consumer's stored counters differ from what it signed"),
        "the edited row is caught by its signature: {notes}"
    );
}

#[test]
fn a_tunnel_reaches_a_provider_connected_to_another_node() {
    let Some(mut nodes) = TestServer::start_cluster("tunnel-nodes", 2) else {
        return;
    };
    let mut alice = user_with_device(&nodes[0], "alice", "alice-pc");
    let bob = user_with_device(&nodes[0], "bob", "bob-pc");
    nodes[0].club("chess", &["alice", "bob"]);
    // alice's device on the second node (the first is down while it connects)...
    nodes[0].kill();
    alice.spawn();
    alice.wait_online(&nodes[1]);
    nodes[0].spawn();
    let service = Service::start();
    share_echo_with_chess(&alice, &service);
    // ...and bob's side connections to the first node only.
    let both = format!(
        "127.0.0.1:{},127.0.0.1:{}",
        nodes[0].quic_port, nodes[1].quic_port
    );
    set_in_config(&bob, &both, &format!("127.0.0.1:{}", nodes[0].quic_port));

    // The first node lists alice's share although another node holds her device, and
    // sends bob's tunnel to that node, which splices it.
    wait_reachable(&bob, None, &["alice@alice-pc/echo"]);
    let connect = Connect::start(&bob, "alice/echo");
    let mut stream = connect.dial();
    stream.write_all(b"eacross").unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"across");
    drop(stream);
    let sessions = wait_until("the session recorded as ended", DEADLINE, || {
        let s = server_sessions(&nodes[0]);
        (s.len() == 1 && s[0]["ended"] == true).then_some(s)
    });
    assert_eq!(sessions[0]["via"], "relay");
    assert_eq!(sessions[0]["provider"], alice.id.as_str());
    assert_eq!(sessions[0]["consumer"], bob.id.as_str());
    assert_eq!(sessions[0]["bytes_up"], 7);
}
