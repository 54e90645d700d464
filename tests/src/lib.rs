//! Helpers for Herald's end-to-end tests: real `herald-server` and `herald-agent`
//! processes on loopback, each test in its own temporary directory, and waiting for
//! conditions with deadlines instead of sleeping.

#![forbid(unsafe_code)]

pub mod browser;
pub mod chroot;
pub mod console_client;
mod database;
pub mod dbus;
pub mod netns;
pub mod receivers;
pub mod session_helper;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use database::{
    on_postgres, postgres_only, sqlite_only, TestDatabase, DATABASE_URL_VAR, SKIP_LOG_VAR,
};

/// Accepts the server's certificate without checking its chain, for loopback test
/// clients whose subject is not the certificate (the handshake signature is still
/// verified, TLS 1.3 only).
#[derive(Debug)]
pub struct AcceptAnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnyServerCert {
    /// With the ring provider.
    pub fn new() -> std::sync::Arc<AcceptAnyServerCert> {
        std::sync::Arc::new(AcceptAnyServerCert(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        )))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client speaking Herald's ALPN with a fresh self-signed identity of
/// `algorithm` (Ed25519 for an agent-like client that was never enrolled, another for a
/// certificate the server cannot take), trusting any server certificate.
pub fn raw_quic_client(algorithm: &'static rcgen::SignatureAlgorithm) -> quinn::ClientConfig {
    raw_quic_client_for(algorithm, herald_shared::protocol::ALPN)
}

/// [`raw_quic_client`] speaking `alpn` (the agents' direct ALPN, for a stranger at a
/// providing agent's endpoint).
pub fn raw_quic_client_for(
    algorithm: &'static rcgen::SignatureAlgorithm,
    alpn: &[u8],
) -> quinn::ClientConfig {
    let key = rcgen::KeyPair::generate_for(algorithm).expect("generate a client key");
    let cert = rcgen::CertificateParams::new(vec!["herald-agent".to_string()])
        .expect("certificate params")
        .self_signed(&key)
        .expect("self-sign the client certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new())
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("client auth certificate");
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client config");
    quinn::ClientConfig::new(std::sync::Arc::new(crypto))
}

/// The job ids in CLI output lines that start `job N` (`run`, `package install`).
pub fn job_ids(output: &str) -> Vec<i64> {
    output
        .lines()
        .filter_map(|l| {
            l.strip_prefix("job ")?
                .split_whitespace()
                .next()?
                .trim_end_matches(':')
                .parse()
                .ok()
        })
        .collect()
}

pub use herald_io::random_bytes;

/// Default deadline for conditions in tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

static BUILD: Once = Once::new();

/// Directory holding the built binaries (`target/debug`), building them once per test
/// binary so `cargo test` alone is enough.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "--quiet", "--workspace", "--bins"]);
        // The test runner's CARGO_* variables would make build scripts rerun and
        // relink the binaries on every test; give the nested build a plain environment.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
                command.env_remove(key.as_ref());
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "building herald binaries failed");
    });
    dir
}

/// Path of a built binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A temporary directory removed on drop (kept if the test failed, for inspection).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory named after the test.
    pub fn new(name: &str) -> TempDir {
        let base = std::env::var_os("HERALD_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "herald-test-{name}-{}-{}",
            std::process::id(),
            nanos()
        ));
        std::fs::create_dir_all(&dir).expect("create test dir");
        TempDir(dir)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// An HTTPS client for the test server that accepts its self-signed certificate and
/// follows no redirects (tests look at the redirect itself).
pub fn https_client() -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A free loopback port for UDP and TCP (probed, then released).
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("local addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub fn wait_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Spawns `command`, whose program may be a binary this test process has just copied.
///
/// Another test thread that forks while the copy's write descriptor is open carries
/// that descriptor until its own exec, and meanwhile exec of the copy fails with
/// `ETXTBSY` ("Text file busy"). The window is short; retry until it has passed.
pub fn spawn_copied_binary(command: &mut Command) -> Child {
    wait_until(
        &format!("{:?} to start", command.get_program()),
        DEADLINE,
        || match command.spawn() {
            Ok(child) => Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
            Err(e) => panic!("spawn {:?}: {e}", command.get_program()),
        },
    )
}

fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .expect("open log file")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `herald-server` process with its own data directory.
pub struct TestServer {
    /// Test directory (server data under `server/`).
    pub dir: TempDir,
    /// QUIC port.
    pub quic_port: u16,
    /// HTTPS port.
    pub http_port: u16,
    child: Option<Child>,
    /// Its PostgreSQL database when the suite runs on PostgreSQL; dropped after `child`
    /// was killed (`Drop` kills it before the fields go).
    database: Option<database::TestDatabase>,
}

impl TestServer {
    /// Initialises and starts a server on free loopback ports.
    pub fn start(name: &str) -> TestServer {
        Self::start_with_config(name, "")
    }

    /// Like [`TestServer::start`], with `extra` TOML appended to the server's
    /// `herald.toml` before it starts (e.g. `[forwarding]` settings).
    pub fn start_with_config(name: &str, extra: &str) -> TestServer {
        Self::start_on(name, extra, database::TestDatabase::create())
    }

    /// Like [`TestServer::start`], on SQLite whatever the run's backend (what `init`
    /// does without `--database-url`).
    pub fn start_on_sqlite(name: &str) -> TestServer {
        Self::start_on(name, "", None)
    }

    fn start_on(name: &str, extra: &str, database: Option<database::TestDatabase>) -> TestServer {
        let mut server = TestServer {
            dir: TempDir::new(name),
            quic_port: free_port(),
            http_port: free_port(),
            child: None,
            database,
        };
        server.init(&format!("127.0.0.1:{}", server.quic_port));
        if !extra.is_empty() {
            let config = server.data_dir().join("herald.toml");
            let mut text = std::fs::read_to_string(&config).expect("read herald.toml");
            text.push('\n');
            text.push_str(extra);
            std::fs::write(&config, text).expect("write herald.toml");
        }
        server.spawn();
        server
    }

    /// `init` on this server's ports and database; agents are told `public_addr`.
    fn init(&self, public_addr: &str) {
        let quic = format!("127.0.0.1:{}", self.quic_port);
        let http = format!("127.0.0.1:{}", self.http_port);
        let mut init = vec![
            "init",
            "--public-addr",
            public_addr,
            "--quic-listen",
            &quic,
            "--http-listen",
            &http,
        ];
        if let Some(database) = &self.database {
            init.extend(["--database-url", database.url()]);
        }
        self.cli_ok(&init);
    }

    /// `nodes` servers sharing one PostgreSQL database, each with its own listeners, as
    /// an operator sets them up (docs/SCALE-OUT.md): the first is initialised with every
    /// node's address as the public address, the others are copies of its data
    /// directory with their own listen addresses. `None`, after saying why, when the run
    /// is not on PostgreSQL.
    pub fn start_cluster(name: &str, nodes: usize) -> Option<Vec<TestServer>> {
        if database::postgres_only("several nodes share a PostgreSQL database") {
            return None;
        }
        let mut servers: Vec<TestServer> = (0..nodes)
            .map(|i| TestServer {
                dir: TempDir::new(&format!("{name}-{}", i + 1)),
                quic_port: free_port(),
                http_port: free_port(),
                child: None,
                database: if i == 0 {
                    database::TestDatabase::create()
                } else {
                    None
                },
            })
            .collect();
        let public: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.quic_port))
            .collect();
        servers[0].init(&public.join(","));
        let (first, others) = servers.split_first().expect("one node at least");
        for node in others {
            copy_dir(&first.data_dir(), &node.data_dir());
            for (file, from, to) in [
                (
                    "herald.toml",
                    format!("127.0.0.1:{}\"", first.quic_port),
                    format!("127.0.0.1:{}\"", node.quic_port),
                ),
                (
                    "herald.toml",
                    format!("127.0.0.1:{}\"", first.http_port),
                    format!("127.0.0.1:{}\"", node.http_port),
                ),
                (
                    "admin.toml",
                    format!("https://127.0.0.1:{}", first.http_port),
                    format!("https://127.0.0.1:{}", node.http_port),
                ),
            ] {
                let path = node.data_dir().join(file);
                let text = std::fs::read_to_string(&path).expect("read the node's configuration");
                assert!(text.contains(&from), "{file} has no {from}: {text}");
                std::fs::write(&path, text.replacen(&from, &to, 1))
                    .expect("write the configuration");
            }
        }
        for server in &mut servers {
            server.spawn();
        }
        Some(servers)
    }

    /// The HTTPS base URL (admin API and web console).
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.http_port)
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// The server's database file (SQLite only: see [`sqlite_only`]).
    pub fn db_path(&self) -> PathBuf {
        assert!(
            self.database.is_none(),
            "this server keeps its data in PostgreSQL, not in a file: \
             start the test with `if herald_tests::sqlite_only(\"why\") {{ return; }}`"
        );
        self.data_dir().join("herald.db")
    }

    /// The URL of the server's own PostgreSQL database, when the suite runs on
    /// PostgreSQL ([`on_postgres`]).
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.url())
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Starts the `serve` process and waits until the API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        // The log is appended to across restarts: wait for one more "serving" line.
        let serving = |text: &str| text.matches("herald-server serving").count();
        let before = serving(&std::fs::read_to_string(self.log_path()).unwrap_or_default());
        let child = Command::new(bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("serve")
            .env("HERALD_LOG", "info,herald_server=debug")
            .stdin(Stdio::null())
            .stdout(log_file(&self.log_path()))
            .stderr(log_file(&self.log_path()))
            .spawn()
            .expect("spawn herald-server");
        self.child = Some(child);
        let log = self.log_path();
        wait_until("the server to serve", DEADLINE, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| serving(t) > before)
                .map(|_| ())
        });
    }

    /// The running server's process id (to send it signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (no shutdown at all).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a CLI command against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env("HERALD_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run herald-server CLI")
    }

    /// `users add LOGIN [--admin]` with `password` on stdin, run as the operating-system
    /// user `operator` (the audit log names local commands by it).
    pub fn add_user(&self, login: &str, admin: bool, password: &str) -> Output {
        let mut child = Command::new(bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["users", "add", login])
            .args(admin.then_some("--admin"))
            .env("HERALD_LOG", "warn")
            .env("USER", "operator")
            .env_remove("SUDO_USER")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run herald-server users add");
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = writeln!(stdin, "{password}");
        }
        child.wait_with_output().expect("wait for users add")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "herald-server {args:?} failed ({}):\n{}\n--- server log tail:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            tail(&self.log_path(), 30)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a CLI command with `--json` and parses its output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// The operator key `init` wrote (tests sign what a hostile server cannot).
    pub fn operator_key(&self) -> herald_shared::envelope::OperatorKey {
        let text = std::fs::read_to_string(self.data_dir().join("operator.key"))
            .expect("read operator.key");
        herald_shared::envelope::OperatorKey::from_hex(&text)
            .expect("operator.key holds a hex seed")
    }

    /// `vendor keygen --out FILE`; returns the public key (hex).
    pub fn vendor_keygen(&self, out: &Path) -> String {
        let text = self.cli_ok(&["vendor", "keygen", "--out", &out.to_string_lossy()]);
        text.lines()
            .find_map(|l| l.strip_prefix("public key: "))
            .unwrap_or_else(|| panic!("unexpected keygen output: {text}"))
            .trim()
            .to_string()
    }

    /// Makes a vendor key in the test directory and delegates `pattern` to it with
    /// `vendor add`; returns the key file and the vendor's API token.
    pub fn add_vendor(&self, name: &str, pattern: &str) -> (PathBuf, String) {
        let key = self.dir.path().join(format!("{name}.key"));
        let public = self.vendor_keygen(&key);
        let text = self.cli_ok(&[
            "vendor",
            "add",
            name,
            "--key",
            &public,
            "--packages",
            pattern,
        ]);
        let token = text
            .split_whitespace()
            .find(|w| w.starts_with("hrldv_"))
            .unwrap_or_else(|| panic!("no vendor token in {text}"))
            .to_string();
        (key, token)
    }

    /// Makes a sender key in the test directory and registers it as sender `name`
    /// ("Card Company", `--advertising` if asked) with `sender add`; returns the key
    /// file and the sender's token.
    pub fn add_sender(&self, name: &str, advertising: bool) -> (PathBuf, String) {
        let key = self.dir.path().join(format!("{name}.sender.key"));
        let text = self.cli_ok(&["sender", "keygen", "--out", &key.to_string_lossy()]);
        let public = text
            .lines()
            .find_map(|l| l.strip_prefix("public key: "))
            .unwrap_or_else(|| panic!("unexpected keygen output: {text}"))
            .trim()
            .to_string();
        let mut args = vec![
            "sender",
            "add",
            name,
            "--display-name",
            "Card Company",
            "--key",
            &public,
        ];
        if advertising {
            args.push("--advertising");
        }
        let text = self.cli_ok(&args);
        let token = text
            .split_whitespace()
            .find(|w| w.starts_with("hrlds_"))
            .unwrap_or_else(|| panic!("no sender token in {text}"))
            .to_string();
        (key, token)
    }

    /// Creates an enrollment token.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.cli_ok(&args).trim().to_string()
    }

    /// One job as JSON.
    pub fn job(&self, id: i64) -> Value {
        self.json(&["jobs", "show", &id.to_string()])
    }

    /// Waits until a job reaches `state`; returns it.
    pub fn wait_job_state(&self, id: i64, state: &str, deadline: Duration) -> Value {
        wait_until(&format!("job {id} to be {state}"), deadline, || {
            let job = self.job(id);
            (job["state"] == state).then_some(job)
        })
    }

    /// Queues a one-off job (no --wait) and returns its id(s).
    pub fn run_job(&self, to: &str, extra: &[&str], command: &[&str]) -> Vec<i64> {
        let mut args = vec!["run", "--to", to];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(command);
        job_ids(&self.cli_ok(&args))
    }

    /// Runs a harmless job on `agent` through the CLI and waits until it succeeded. A
    /// job for one agent makes its link re-read the store, so rows a test injected into
    /// the database are signalled first, in job order.
    pub fn poke_with_marker_job(&self, agent: &TestAgent) {
        let ids = self.run_job(&format!("agent:{}", agent.name), &[], &["/bin/true"]);
        assert_eq!(ids.len(), 1, "one marker job");
        self.wait_job_state(ids[0], "succeeded", DEADLINE);
    }

    /// Whether the agent shows as online.
    pub fn agent_online(&self, agent: &str) -> bool {
        let detail = self.json(&["agents", "show", agent]);
        detail["online"] == true
    }

    /// Runs one statement on the server's database, SQLite's file or its PostgreSQL
    /// database (`?N` placeholders, text parameters); the rows it changed. For set-up
    /// the API has no call for.
    pub fn sql_execute(&self, sql: &str, params: &[&str]) -> u64 {
        match &self.database {
            Some(database) => {
                let mut client = postgres::Client::connect(database.url(), postgres::NoTls)
                    .expect("connect to the test database");
                let mut pg = sql.to_string();
                for n in (1..=params.len()).rev() {
                    pg = pg.replace(&format!("?{n}"), &format!("${n}::TEXT"));
                }
                let values: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                client.execute(&pg, &values).expect("run the statement")
            }
            None => {
                let db = rusqlite::Connection::open(self.db_path()).expect("open the database");
                db.busy_timeout(Duration::from_secs(10))
                    .expect("busy timeout");
                db.execute(sql, rusqlite::params_from_iter(params.iter()))
                    .expect("run the statement") as u64
            }
        }
    }

    /// Creates club `name` with `members` (logins; the first owns it), straight in the
    /// database.
    pub fn club(&self, name: &str, members: &[&str]) {
        self.sql_execute(
            "INSERT INTO clubs (name, created_by, created_at)
             SELECT ?1, id, 0 FROM users WHERE login = ?2",
            &[name, members[0]],
        );
        for (i, member) in members.iter().enumerate() {
            let role = if i == 0 { "owner" } else { "member" };
            let added = self.sql_execute(
                "INSERT INTO club_members (club_id, user_id, role, joined_at)
                 SELECT c.id, u.id, ?3, 0 FROM clubs c, users u
                 WHERE c.name = ?1 AND u.login = ?2",
                &[name, member, role],
            );
            assert_eq!(added, 1, "user {member} exists");
        }
    }

    /// Removes `login` from club `name`, straight in the database.
    pub fn leave_club(&self, name: &str, login: &str) {
        self.sql_execute(
            "DELETE FROM club_members WHERE club_id = (SELECT id FROM clubs WHERE name = ?1)
             AND user_id = (SELECT id FROM users WHERE login = ?2)",
            &[name, login],
        );
    }

    /// Prints the tail of the server log (for failing tests).
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 40)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log tail:\n{}", self.log_tail());
        }
        self.kill();
    }
}

/// A `herald-agent` process with its own state directory.
pub struct TestAgent {
    /// Agent name.
    pub name: String,
    /// Agent id.
    pub id: String,
    /// State directory.
    pub state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    binary: PathBuf,
}

impl TestAgent {
    /// Enrolls a new agent with a fresh token (without starting it).
    pub fn enroll(server: &TestServer, name: &str, token_args: &[&str]) -> TestAgent {
        Self::enroll_with_token(server, name, &server.token(token_args))
    }

    /// Enrolls a new agent with a given token, e.g. a personal one from the console
    /// (without starting it).
    pub fn enroll_with_token(server: &TestServer, name: &str, token: &str) -> TestAgent {
        let token = token.to_string();
        let state_dir = server.dir.path().join(format!("agent-{name}"));
        let output = Self::command(&state_dir)
            .args(["enroll", &token, "--name", name])
            .output()
            .expect("run herald-agent enroll");
        assert!(
            output.status.success(),
            "enroll failed: {}\n--- server log tail:\n{}",
            String::from_utf8_lossy(&output.stderr),
            server.log_tail()
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = stdout
            .split_whitespace()
            .nth(2)
            .expect("enroll prints 'enrolled as ID'")
            .trim_end_matches(';')
            .to_string();
        TestAgent {
            name: name.to_string(),
            id,
            log: server.dir.path().join(format!("agent-{name}.log")),
            state_dir,
            child: None,
            binary: bin("herald-agent"),
        }
    }

    /// Runs this agent from its own copy of the binary (which a self-update may
    /// replace) instead of the shared build output. Returns the copy's path.
    pub fn use_own_binary(&mut self) -> PathBuf {
        let dir = self.state_dir.with_extension("bin");
        std::fs::create_dir_all(&dir).expect("create agent binary dir");
        let copy = dir.join("herald-agent");
        std::fs::copy(bin("herald-agent"), &copy).expect("copy herald-agent");
        self.binary = copy.clone();
        copy
    }

    /// Enrolls and starts an agent, waiting until the server sees it online.
    pub fn start(server: &TestServer, name: &str) -> TestAgent {
        let mut agent = Self::enroll(server, name, &[]);
        agent.spawn();
        agent.wait_online(server);
        agent
    }

    fn command(state_dir: &Path) -> Command {
        Self::command_with(&bin("herald-agent"), state_dir)
    }

    fn command_with(binary: &Path, state_dir: &Path) -> Command {
        let mut command = Command::new(binary);
        command
            .arg("--state-dir")
            .arg(state_dir)
            .env("HERALD_LOG", "info,herald_agent=debug")
            .stdin(Stdio::null());
        command
    }

    /// Starts `herald-agent run`.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let mut command = Self::command_with(&self.binary, &self.state_dir);
        command
            .arg("run")
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log));
        self.child = Some(spawn_copied_binary(&mut command));
    }

    /// Waits until the server shows this agent online.
    pub fn wait_online(&self, server: &TestServer) {
        wait_until(&format!("agent {} online", self.name), DEADLINE, || {
            server.agent_online(&self.id).then_some(())
        });
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL, and the process its status file names if that is
    /// another (an agent restarted by a self-update watchdog).
    pub fn kill(&mut self) {
        let recorded = std::fs::read_to_string(self.state_dir.join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["pid"].as_u64());
        if let Some(mut child) = self.child.take() {
            let own = child.id();
            let _ = child.kill();
            let _ = child.wait();
            if let Some(pid) = recorded.filter(|&p| p as u32 != own) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Whether the agent process has exited; returns its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Runs a `herald-agent` command on this agent's state directory (beside the
    /// running daemon, as the person at the machine would).
    pub fn cli(&self, args: &[&str]) -> Output {
        Self::command(&self.state_dir)
            .args(args)
            .env("HERALD_LOG", "warn")
            .output()
            .expect("run herald-agent")
    }

    /// [`TestAgent::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "herald-agent {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// [`TestAgent::cli_ok`] with `--json`, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// `herald-agent status --json` for this agent.
    pub fn status(&self) -> Value {
        let output = Self::command(&self.state_dir)
            .args(["status", "--json"])
            .env("HERALD_LOG", "warn")
            .output()
            .expect("run herald-agent status");
        assert!(
            output.status.success(),
            "herald-agent status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "bad status JSON: {e}: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// The agent log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A report signed with this agent's identity key, as its outbox stores it and the
    /// server keeps it (the codec bytes of a `SignedReport`): what a modified agent on
    /// this machine could sign and send.
    pub fn sign_report(&self, report: &herald_shared::message::Report) -> Vec<u8> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let pem = std::fs::read_to_string(self.state_dir.join("identity.key"))
            .expect("the agent's identity key");
        let pair = rcgen::KeyPair::from_pem(&pem).expect("a PEM key");
        let key = ed25519_dalek::SigningKey::from_pkcs8_der(&pair.serialize_der())
            .expect("an Ed25519 key");
        let signed = herald_shared::message::SignedReport::sign(&key, report);
        herald_shared::codec::to_bytes(&signed).expect("a report encodes")
    }

    /// Puts a signed report in this agent's own outbox (its journal), as if the agent
    /// had written it; a running agent sends it within seconds.
    pub fn queue_report(&self, report: &herald_shared::message::Report) {
        let db = rusqlite::Connection::open(self.state_dir.join("agent.db")).expect("agent.db");
        db.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        db.execute(
            "INSERT INTO reports (report) VALUES (?1)",
            rusqlite::params![self.sign_report(report)],
        )
        .expect("queue a report");
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent {} log tail:\n{}", self.name, tail(&self.log, 40));
        }
        self.kill();
    }
}

/// Adds a schedule through the CLI and returns its id (from "schedule N added: ...").
pub fn add_schedule(server: &TestServer, args: &[&str]) -> i64 {
    let mut all = vec!["schedule", "add"];
    all.extend_from_slice(args);
    let out = server.cli_ok(&all);
    out.strip_prefix("schedule ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `schedule add` output: {out:?}"))
}

/// Schedule `id` as `schedule list --json` reports it (panics if it is not listed).
pub fn schedule_entry(server: &TestServer, id: i64) -> Value {
    let list = server.json(&["schedule", "list"]);
    list.as_array()
        .expect("schedule list is an array")
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("schedule {id} not listed: {list:#}"))
}

/// Every job, oldest first.
pub fn all_jobs(server: &TestServer) -> Vec<Value> {
    let jobs = server.json(&["jobs", "list", "--limit", "10000"]);
    let mut jobs = jobs.as_array().expect("jobs list is an array").clone();
    jobs.sort_by_key(|j| j["id"].as_i64());
    jobs
}

/// Removes terminal colour sequences (`ESC [ ... m`) from log text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The wall clock in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether this process runs as root (network-namespace tests need it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Copies directory `from` into `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("read a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}
