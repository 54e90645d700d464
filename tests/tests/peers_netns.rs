//! Tunnels across real network paths: the providing agent's address changes under an
//! open tunnel and the tunnel carries on.
//!
//! The server and the consumer (`herald-agent connect`) run in one network namespace, the
//! providing agent and its service in another, joined by a veth pair addressed from
//! 198.18.0.0/15. Needs root for `ip netns`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::Duration;

use herald_tests::netns::{enter, in_ns, ip, log_to, tail, Namespaces};
use herald_tests::{bin, is_root, wait_until, TempDir, DEADLINE};
use serde_json::Value;

const SERVER_IP: &str = "198.18.0.1";
const PROVIDER_IP: &str = "198.18.0.2";
const PROVIDER_NEW_IP: &str = "198.18.0.3";
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
            server_ns,
            provider_ns,
            children: Vec::new(),
            dir: TempDir::new("peers-netns"),
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
    lab.start_server();
    let (server_ns, provider_ns) = (lab.server_ns.clone(), lab.provider_ns.clone());
    let provider = lab.enroll(&provider_ns, "provider");
    lab.enroll(&server_ns, "consumer");
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
            &server_ns,
            "herald-agent",
            &["--state-dir", &consumer_state, "peers", "--json"],
        );
        String::from_utf8_lossy(&out.stdout)
            .contains("\"echo\"")
            .then_some(())
    });
    let port = CONNECT_PORT.to_string();
    lab.spawn(
        &server_ns,
        "herald-agent",
        &[
            "--state-dir",
            &consumer_state,
            "connect",
            "alice/echo",
            "--local-port",
            &port,
        ],
        "connect.log",
    );

    // One TCP connection through the tunnel, from a thread inside the server's namespace.
    let (to_client, orders) = std::sync::mpsc::channel::<usize>();
    let (to_test, done) = std::sync::mpsc::channel::<()>();
    let client_ns = server_ns.clone();
    let client = std::thread::spawn(move || {
        enter(&client_ns);
        let addr: SocketAddr = ([127, 0, 0, 1], CONNECT_PORT).into();
        let mut stream = wait_until("the connect listener", DEADLINE, || {
            TcpStream::connect(addr).ok()
        });
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        stream.set_write_timeout(Some(DEADLINE)).expect("timeout");
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
