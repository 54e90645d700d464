//! Hostile input on the QUIC port closes that connection only: malformed frames and
//! protocol violations from a raw client make the server close it promptly with a
//! protocol error, while a real agent stays connected and keeps getting jobs. A key that
//! was never enrolled is refused when it says `Hello`.

use std::net::SocketAddr;
use std::time::Duration;

use herald_shared::codec::{self, DEFAULT_FRAME_LIMIT, HEADER_LEN};
use herald_shared::protocol::{AgentMsg, Facts, Hello, ServerMsg, SERVER_NAME};
use herald_tests::{wait_until, TestAgent, TestServer, DEADLINE};
use quinn::{Connection, ConnectionError};

/// Close code for protocol violations (`relay::close::PROTOCOL`).
const CLOSE_PROTOCOL: u32 = 1;
/// Close code for refused agents (`relay::close::REFUSED`).
const CLOSE_REFUSED: u32 = 4;
/// How long the server may take to close a connection after a bad frame. Shorter than
/// its 10 s hello timeout, so a close that only came from that timeout does not count.
const PROMPT_CLOSE: Duration = Duration::from_secs(5);
/// Deadline for connections the server can only drop by timing them out.
const TIMEOUT_CLOSE: Duration = Duration::from_secs(25);

/// A QUIC client with a fresh, never enrolled Ed25519 identity (as a new agent would
/// have before enrolling), speaking ALPN `herald/1`.
fn raw_client_config() -> quinn::ClientConfig {
    herald_tests::raw_quic_client(&rcgen::PKCS_ED25519)
}

/// Connects a raw client to the server's QUIC port.
async fn connect(addr: SocketAddr) -> Connection {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(raw_client_config());
    tokio::time::timeout(
        DEADLINE,
        endpoint.connect(addr, SERVER_NAME).expect("start connect"),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake with the server")
}

/// Waits for the server to close `connection`; returns the application close code and
/// reason, panicking if it stays open past `deadline` or ends any other way.
async fn closed_by_server(
    what: &str,
    connection: &Connection,
    deadline: Duration,
) -> (u32, String) {
    let error = tokio::time::timeout(deadline, connection.closed())
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: server did not close the connection within {deadline:?}")
        });
    match error {
        ConnectionError::ApplicationClosed(close) => (
            u32::try_from(close.error_code.into_inner()).expect("small close code"),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => panic!("{what}: connection ended by {other:?}, not closed by the server"),
    }
}

/// Opens the control stream, sends `bytes` without finishing the stream (so the server
/// must act on what it got, not on an end of stream) and waits for the server to close
/// the connection. Returns the close code and reason.
async fn send_raw(
    what: &str,
    addr: SocketAddr,
    bytes: Vec<u8>,
    deadline: Duration,
) -> (u32, String) {
    let connection = connect(addr).await;
    let (mut send, _recv) = connection.open_bi().await.expect("open control stream");
    send.write_all(&bytes).await.expect("write bytes");
    let closed = closed_by_server(what, &connection, deadline).await;
    drop(send);
    closed
}

fn frame(msg: &AgentMsg) -> Vec<u8> {
    codec::encode_frame(msg, DEFAULT_FRAME_LIMIT).expect("encode frame")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn connected_lines(server: &TestServer, agent: &TestAgent) -> usize {
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("agent connected") && l.contains(&agent.id))
        .count()
}

#[test]
fn malformed_frames_close_connection() {
    let server = TestServer::start("malformed-frames");
    let agent = TestAgent::start(&server, "alpha");
    let addr: SocketAddr = format!("127.0.0.1:{}", server.quic_port)
        .parse()
        .expect("server addr");
    assert_eq!(connected_lines(&server, &agent), 1);

    // A garbage payload of exactly the announced length: only decoding can fail.
    let garbage = vec![0xff_u8; 64];
    let mut garbage_frame = (garbage.len() as u32).to_be_bytes().to_vec();
    garbage_frame.extend_from_slice(&garbage);
    assert!(
        codec::from_bytes::<AgentMsg>(&garbage, DEFAULT_FRAME_LIMIT).is_err(),
        "the garbage must not decode"
    );
    // A well-formed frame whose value decodes but leaves bytes over.
    let mut trailing = codec::to_bytes(&AgentMsg::Addresses(vec![])).expect("encode");
    trailing.push(0);
    let mut trailing_frame = (trailing.len() as u32).to_be_bytes().to_vec();
    trailing_frame.extend_from_slice(&trailing);

    struct Case {
        name: &'static str,
        bytes: Vec<u8>,
        /// The close reason must contain this.
        reason: &'static str,
    }
    let cases = vec![
        Case {
            name: "length prefix of zero",
            bytes: 0u32.to_be_bytes().to_vec(),
            reason: "empty frame",
        },
        Case {
            name: "length prefix of u32::MAX",
            bytes: u32::MAX.to_be_bytes().to_vec(),
            reason: "exceeds the limit",
        },
        Case {
            name: "length prefix just over the 1 MiB limit",
            bytes: ((DEFAULT_FRAME_LIMIT + 1) as u32).to_be_bytes().to_vec(),
            reason: "exceeds the limit",
        },
        Case {
            name: "garbage that does not decode",
            bytes: garbage_frame,
            reason: "malformed",
        },
        Case {
            name: "trailing bytes after a value",
            bytes: trailing_frame,
            reason: "trailing",
        },
        Case {
            name: "valid frame of the wrong message type first",
            bytes: frame(&AgentMsg::Addresses(vec![])),
            reason: "expected Hello or Enroll",
        },
        Case {
            name: "Started before Hello",
            bytes: frame(&AgentMsg::Started { job_id: 1, at: 0 }),
            reason: "expected Hello or Enroll",
        },
    ];

    let rt = runtime();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for case in cases {
            tasks.push(tokio::spawn(async move {
                let (code, reason) = send_raw(case.name, addr, case.bytes, PROMPT_CLOSE).await;
                (case.name, case.reason, code, reason)
            }));
        }
        // Clients that stall: one never opens a stream, one announces a frame and sends
        // only part of it. The server must not hold these open forever.
        let silent = tokio::spawn(async move {
            let connection = connect(addr).await;
            closed_by_server("silent client", &connection, TIMEOUT_CLOSE).await
        });
        let mut partial = 100u32.to_be_bytes().to_vec();
        partial.extend_from_slice(&[0u8; 10]);
        let truncated = tokio::spawn(send_raw("truncated frame", addr, partial, TIMEOUT_CLOSE));

        for task in tasks {
            let (name, expected, code, reason) = task.await.expect("case task");
            assert_eq!(
                code, CLOSE_PROTOCOL,
                "{name}: closed with code {code} ({reason:?}), expected a protocol error"
            );
            assert!(
                reason.to_lowercase().contains(&expected.to_lowercase()),
                "{name}: close reason {reason:?} should mention {expected:?}"
            );
        }
        for (name, task) in [("silent client", silent), ("truncated frame", truncated)] {
            let (code, reason) = task.await.expect("stall task");
            assert_eq!(
                code, CLOSE_PROTOCOL,
                "{name}: closed with code {code} ({reason:?}), expected a protocol error"
            );
        }
    });

    // The real agent was not disturbed: still online on its first connection, and the
    // server still runs jobs on it.
    assert!(server.agent_online(&agent.id), "agent went offline");
    assert_eq!(
        connected_lines(&server, &agent),
        1,
        "the agent had to reconnect during the abuse"
    );
    let out = server.cli(&[
        "run",
        "--to",
        &format!("agent:{}", agent.name),
        "--wait",
        "--",
        "/bin/echo",
        "still",
        "serving",
    ]);
    assert!(
        out.status.success(),
        "run --wait after the abuse failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still serving\n");
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

#[test]
fn unknown_key_hello_is_refused() {
    let server = TestServer::start("unknown-key-hello");
    let addr: SocketAddr = format!("127.0.0.1:{}", server.quic_port)
        .parse()
        .expect("server addr");

    let rt = runtime();
    let (answer, code, reason) = rt.block_on(async {
        let connection = connect(addr).await;
        let (mut send, mut recv) = connection.open_bi().await.expect("open control stream");
        let hello = AgentMsg::Hello(Hello {
            protocol: (1, 0),
            agent_version: "0.0.0-test".into(),
            facts: Facts::default(),
            addresses: vec![],
        });
        send.write_all(&frame(&hello)).await.expect("send Hello");
        let answer = tokio::time::timeout(PROMPT_CLOSE, async {
            let mut header = [0u8; HEADER_LEN];
            recv.read_exact(&mut header)
                .await
                .expect("read answer header");
            let len = codec::frame_len(header, DEFAULT_FRAME_LIMIT).expect("answer length");
            let mut payload = vec![0u8; len];
            recv.read_exact(&mut payload).await.expect("read answer");
            codec::from_bytes::<ServerMsg>(&payload, DEFAULT_FRAME_LIMIT).expect("decode answer")
        })
        .await
        .expect("the server did not answer Hello");
        let (code, reason) = closed_by_server("unknown key", &connection, PROMPT_CLOSE).await;
        (answer, code, reason)
    });

    let ServerMsg::Refused(text) = answer else {
        panic!("an unknown key's Hello got {answer:?}, expected Refused");
    };
    assert!(text.contains("not enrolled"), "refusal {text:?}");
    assert_eq!(code, CLOSE_REFUSED, "close code (reason {reason:?})");
    assert!(reason.contains("not enrolled"), "close reason {reason:?}");
    // Nothing was recorded for the stranger.
    let agents = server.json(&["agents", "list"]);
    assert_eq!(agents.as_array().map(Vec::len), Some(0), "{agents}");
    wait_until("the server to log the refusal", DEADLINE, || {
        std::fs::read_to_string(server.log_path())
            .ok()
            .filter(|l| l.contains("refusing agent"))
            .map(|_| ())
    });
}
