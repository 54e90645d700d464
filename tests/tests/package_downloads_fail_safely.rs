//! Package downloads fail safely: whatever the server that hosts an artifact does (flip a
//! byte, send too little, send too much, go silent) or whatever a vendor's archive or
//! install command does (reach outside its directory, exit non-zero), the agent fails the
//! job with a message that names the fault, installs nothing, leaves `current` where it
//! was and removes the partial download wherever the design says it must go.
//!
//! Faulty downloads are served by a small misbehaving HTTP origin inside the test (a
//! release published with `--url`, as for a CDN); archives and install commands go
//! through the server's own HTTPS endpoint. An honest origin is the positive control.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use herald_tests::{wait_until, TestAgent, TestServer, DEADLINE};

/// The package every test installs (the vendor is delegated `acme-*`).
const PACKAGE: &str = "acme-tool";

/// Job limit for download plus install: far above anything a test should take, so a job
/// that fails quickly failed for its own reason, not for the limit.
const INSTALL_TIMEOUT: &str = "20s";

/// Bytes of comment padding in each artifact, so downloads span many reads.
const PADDING: usize = 64 * 1024;

/// What the `Long` origin sends after the declared bytes.
const EXCESS: usize = 1 << 20;

/// What the `Trickle` origin sends before it goes silent.
const TRICKLE_BYTES: usize = 16;

// === the tests ===

#[test]
fn tampered_artifact_fails_its_hash_check() {
    let setup = Setup::start("pkg-tampered", None);
    setup.install_baseline();
    let genuine = artifact("1.1.0");
    let origin = Origin::start(Behaviour::Tampered(genuine.clone()));
    setup.publish("1.1.0", &genuine, &["--url", &origin.url]);

    let job = setup.install("1.1.0");

    assert_eq!(job["state"], "failed", "{job:#}");
    let error = error_of(&job);
    let served = hex::encode(Sha256::digest(tampered(&genuine)));
    assert!(
        error.contains(&format!("SHA-256 {served}"))
            && error.contains(&format!("declares {}", sha256_hex(&genuine)))
            && error.contains("file discarded"),
        "{error}"
    );
    assert_eq!(origin.requests().len(), 1, "{:?}", origin.requests());
    setup.assert_still_at_baseline("1.1.0");
    // A hash mismatch discards the download: nothing to resume from.
    assert_eq!(setup.staged_files(), Vec::<String>::new());
}

#[test]
fn wrong_length_artifact_is_refused() {
    let setup = Setup::start("pkg-short", None);
    setup.install_baseline();
    let genuine = artifact("1.1.0");
    let origin = Origin::start(Behaviour::Short(genuine.clone()));
    setup.publish("1.1.0", &genuine, &["--url", &origin.url]);

    let job = setup.install("1.1.0");

    assert_eq!(job["state"], "failed", "{job:#}");
    let error = error_of(&job);
    let sent = genuine.len() / 2;
    assert!(
        error.contains(&format!(
            "download is {sent} bytes but its signed release declares {}",
            genuine.len()
        )),
        "{error}"
    );
    assert_eq!(origin.requests().len(), 1, "{:?}", origin.requests());
    setup.assert_still_at_baseline("1.1.0");
    // Unlike suspect or abandoned bytes, a short body is kept so that the next attempt
    // resumes it (download.rs: `WrongLength` keeps the partial file); it holds exactly
    // what was sent and was never taken for the verified artifact.
    let sha = sha256_hex(&genuine);
    assert_eq!(setup.staged_files(), vec![format!("{sha}.part")]);
    let part = std::fs::read(setup.staging_dir().join(format!("{sha}.part"))).expect("read part");
    assert!(
        part == genuine[..sent],
        "the partial file holds other bytes"
    );
}

#[test]
fn artifact_longer_than_declared_is_cut_off_at_the_limit() {
    let setup = Setup::start("pkg-long", None);
    setup.install_baseline();
    let genuine = artifact("1.1.0");
    let origin = Origin::start(Behaviour::Long(genuine.clone()));
    setup.publish("1.1.0", &genuine, &["--url", &origin.url]);
    let part = setup
        .staging_dir()
        .join(format!("{}.part", sha256_hex(&genuine)));
    let watcher = SizeWatcher::start(part.clone());

    let install = setup.install_in_background("1.1.0");
    // The origin sends exactly the declared bytes, then waits: they must all land.
    wait_until(
        "the partial download to reach the declared length",
        DEADLINE,
        || (watcher.largest() == genuine.len() as u64).then_some(()),
    );
    // Now the excess: the agent must stop at the limit and throw the download away.
    origin.release();
    let job = install.finish();
    let largest = watcher.stop();

    assert_eq!(job["state"], "failed", "{job:#}");
    let error = error_of(&job);
    assert!(
        error.contains(&format!(
            "is longer than the {} bytes its signed release declares; download discarded",
            genuine.len()
        )),
        "{error}"
    );
    assert_eq!(
        largest,
        genuine.len() as u64,
        "the partial download grew past the declared length"
    );
    assert!(!part.exists(), "{} was left behind", part.display());
    assert_eq!(setup.staged_files(), Vec::<String>::new());
    setup.assert_still_at_baseline("1.1.0");
}

#[test]
fn trickling_download_hits_the_stall_timeout_and_leaves_no_temp_file() {
    let setup = Setup::start("pkg-stall", Some(1));
    setup.install_baseline();
    let genuine = artifact("1.1.0");
    let origin = Origin::start(Behaviour::Trickle(genuine.clone()));
    setup.publish("1.1.0", &genuine, &["--url", &origin.url]);

    let started = Instant::now();
    let job = setup.install("1.1.0");
    let took = started.elapsed();

    assert_eq!(job["state"], "failed", "{job:#}");
    let error = error_of(&job);
    assert!(
        error.contains(&format!("no data from {} for 1s", origin.url))
            && error.contains("download abandoned"),
        "{error}"
    );
    // Given up for the stall, long before the 20 s job limit; the origin still holds
    // the connection open, so nothing else ended it.
    assert!(took < Duration::from_secs(10), "the job took {took:?}");
    assert_eq!(origin.requests().len(), 1, "{:?}", origin.requests());
    assert_eq!(setup.staged_files(), Vec::<String>::new());
    setup.assert_still_at_baseline("1.1.0");
}

#[test]
fn path_traversal_in_archive_entries_is_refused() {
    let setup = Setup::start("pkg-traversal", None);
    setup.install_baseline();
    let archive = evil_archive();
    setup.publish("1.1.0", &archive, &[]);

    let job = setup.install("1.1.0");

    assert_eq!(job["state"], "failed", "{job:#}");
    let error = error_of(&job);
    assert!(
        error.contains("\"../escaped\" refused") && error.contains("nothing installed"),
        "{error}"
    );
    let packages = setup.packages_dir();
    for outside in [
        packages.join(PACKAGE).join("escaped"),
        packages.join("escaped"),
    ] {
        assert!(!outside.exists(), "{} was written", outside.display());
    }
    let anywhere = files_named(setup.agent.state_dir.parent().expect("test dir"), "escaped");
    assert!(anywhere.is_empty(), "escaped landed at {anywhere:?}");
    // The legitimate entry before the bad one is gone with the half-built version.
    setup.assert_still_at_baseline("1.1.0");
    assert_eq!(setup.staged_files(), Vec::<String>::new());
}

#[test]
fn install_command_failure_keeps_the_previous_version() {
    let setup = Setup::start("pkg-install-cmd", None);
    setup.install_baseline();
    setup.publish(
        "1.1.0",
        &artifact("1.1.0"),
        &[
            "--install-cmd",
            "/bin/sh -c 'echo cannot configure >&2; exit 7'",
        ],
    );

    let job = setup.install("1.1.0");

    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["exit_code"], 7, "{job:#}");
    assert_eq!(job["stderr"], "cannot configure\n", "{job:#}");
    let error = error_of(&job);
    assert!(
        error.contains("exited with 7") && error.contains(&format!("{PACKAGE} stays at 1.0.0")),
        "{error}"
    );
    setup.assert_still_at_baseline("1.1.0");

    // The failed version never became current, so there is nothing to go back to.
    let revert = setup.server.cli(&[
        "package",
        "revert",
        "--to",
        &setup.target(),
        PACKAGE,
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&revert.stdout);
    assert!(!revert.status.success(), "revert succeeded: {stdout}");
    assert!(
        stdout.contains(": failed: ")
            && stdout.contains(&format!("{PACKAGE} has no previous version to revert to")),
        "{stdout}{}",
        String::from_utf8_lossy(&revert.stderr)
    );
    setup.assert_still_at_baseline("1.1.0");
}

#[test]
fn honest_external_url_and_server_endpoint_both_install() {
    let setup = Setup::start("pkg-honest", None);
    // From the server's own endpoint.
    setup.install_baseline();

    // From an external origin, verified the same way.
    let genuine = artifact("1.1.0");
    let origin = Origin::start(Behaviour::Honest(genuine.clone()));
    setup.publish("1.1.0", &genuine, &["--url", &origin.url]);
    let job = setup.install("1.1.0");

    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        job["stdout"],
        format!("installed {PACKAGE} 1.1.0 (previous 1.0.0 kept for revert)\n"),
        "{job:#}"
    );
    assert_eq!(setup.current().as_deref(), Some("1.1.0"));
    assert_eq!(setup.run_installed(), format!("{PACKAGE} 1.1.0\n"));
    assert_eq!(
        origin.requests(),
        vec![Request {
            line: format!("GET {ORIGIN_PATH} HTTP/1.1"),
            range: None,
        }]
    );
    assert_eq!(setup.staged_files(), Vec::<String>::new());
}

// === impl Setup ===

/// A server with the `acme` vendor delegated `acme-*`, and one online agent.
struct Setup {
    // Dropped first: the agent, then the server whose directory holds its state.
    agent: TestAgent,
    server: TestServer,
    vendor_key: PathBuf,
}

impl Setup {
    /// Starts both; `stall_secs` goes into the agent's `[update]` settings.
    fn start(name: &str, stall_secs: Option<u64>) -> Setup {
        let server = TestServer::start(name);
        let (vendor_key, _) = server.add_vendor("acme", "acme-*");
        let mut agent = TestAgent::enroll(&server, "a1", &[]);
        if let Some(secs) = stall_secs {
            set_stall_secs(&agent.state_dir.join("agent.toml"), secs);
        }
        agent.spawn();
        agent.wait_online(&server);
        Setup {
            agent,
            server,
            vendor_key,
        }
    }

    fn target(&self) -> String {
        format!("agent:{}", self.agent.name)
    }

    /// Publishes `bytes` as `PACKAGE` `version`. Without `--url` in `extra` the server
    /// stores and serves the bytes; with it, only the metadata (hash and length of
    /// `bytes`) is stored. A gzip archive is published as `.tar.gz`, anything else as the
    /// single file `PACKAGE`.
    fn publish(&self, version: &str, bytes: &[u8], extra: &[&str]) {
        let dir = self.server.dir.path().join("artifacts").join(version);
        std::fs::create_dir_all(&dir).expect("create artifact dir");
        let name = if bytes.starts_with(&[0x1f, 0x8b]) {
            format!("{PACKAGE}.tar.gz")
        } else {
            PACKAGE.to_string()
        };
        let file = dir.join(name);
        std::fs::write(&file, bytes).expect("write artifact");
        let mut args = vec![
            "package",
            "publish",
            "--vendor-key",
            path_str(&self.vendor_key),
            PACKAGE,
            version,
            path_str(&file),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        self.server.cli_ok(&args);
    }

    /// Publishes and installs 1.0.0 from the server's endpoint; checks that it runs.
    fn install_baseline(&self) {
        self.publish("1.0.0", &artifact("1.0.0"), &[]);
        let job = self.install("1.0.0");
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(self.current().as_deref(), Some("1.0.0"));
        assert_eq!(self.run_installed(), format!("{PACKAGE} 1.0.0\n"));
    }

    /// `package install --wait`: checks that the summary line agrees with the stored job,
    /// and returns the job.
    fn install(&self, version: &str) -> Value {
        finish_install(&self.server, self.install_args(version))
    }

    /// `package install --wait` on another thread, for tests that act while it runs.
    fn install_in_background(&self, version: &str) -> PendingInstall<'_> {
        let server = &self.server;
        let args = self.install_args(version);
        PendingInstall {
            server,
            handle: std::thread::spawn(move || run_cli(&args)),
        }
    }

    fn install_args(&self, version: &str) -> Vec<String> {
        [
            "--data-dir",
            path_str(&self.server.data_dir()),
            "package",
            "install",
            "--to",
            &self.target(),
            PACKAGE,
            version,
            "--timeout",
            INSTALL_TIMEOUT,
            "--wait",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn packages_dir(&self) -> PathBuf {
        self.agent.state_dir.join("packages")
    }

    fn staging_dir(&self) -> PathBuf {
        self.packages_dir().join(".staging")
    }

    /// Names of the files in the staging directory.
    fn staged_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.staging_dir())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The version the `current` link names.
    fn current(&self) -> Option<String> {
        std::fs::read_link(self.packages_dir().join(PACKAGE).join("current"))
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    }

    /// Runs the current version's program; returns its stdout.
    fn run_installed(&self) -> String {
        let program = self
            .packages_dir()
            .join(PACKAGE)
            .join("current")
            .join(PACKAGE);
        let output = Command::new(&program)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(output.status.success(), "{} failed", program.display());
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// 1.0.0 is still current and runs; nothing of `refused` (or its unfinished
    /// directory) exists.
    fn assert_still_at_baseline(&self, refused: &str) {
        assert_eq!(self.current().as_deref(), Some("1.0.0"));
        assert_eq!(self.run_installed(), format!("{PACKAGE} 1.0.0\n"));
        let package = self.packages_dir().join(PACKAGE);
        for dir in [
            package.join(refused),
            package.join(format!("{refused}.new")),
        ] {
            assert!(!dir.exists(), "{} exists", dir.display());
        }
    }
}

/// A `package install --wait` running on another thread.
struct PendingInstall<'a> {
    server: &'a TestServer,
    handle: std::thread::JoinHandle<std::process::Output>,
}

impl PendingInstall<'_> {
    fn finish(self) -> Value {
        let output = self.handle.join().expect("install thread");
        check_install_output(self.server, output)
    }
}

fn run_cli(args: &[String]) -> std::process::Output {
    Command::new(herald_tests::bin("herald-server"))
        .args(args)
        .env("HERALD_LOG", "warn")
        .output()
        .expect("run herald-server CLI")
}

fn finish_install(server: &TestServer, args: Vec<String>) -> Value {
    check_install_output(server, run_cli(&args))
}

/// Parses "job N on AGENT: STATE[: detail]", fetches job N and checks both agree.
fn check_install_output(server: &TestServer, output: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("job "))
        .unwrap_or_else(|| {
            panic!(
                "no job line from package install ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let id: i64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected job line: {line}"));
    let job = server.job(id);
    let state = job["state"].as_str().unwrap_or_default();
    assert!(
        line.contains(&format!(": {state}")),
        "{line:?} does not show state {state}"
    );
    assert_eq!(
        output.status.success(),
        state == "succeeded",
        "exit status {} for a {state} job",
        output.status
    );
    job
}

fn error_of(job: &Value) -> String {
    job["error"]
        .as_str()
        .unwrap_or_else(|| panic!("job has no error: {job:#}"))
        .to_string()
}

/// Sets `stall_secs` in the `[update]` section of an agent's configuration.
fn set_stall_secs(config: &Path, secs: u64) {
    let text = std::fs::read_to_string(config).expect("read agent.toml");
    let line = format!("stall_secs = {secs}");
    let text = if text.contains("[update]") {
        text.lines()
            .map(|l| {
                if l.trim_start().starts_with("stall_secs") {
                    line.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        format!("{text}\n[update]\n{line}\n")
    };
    assert!(text.contains(&line), "no stall_secs in {text}");
    std::fs::write(config, text).expect("write agent.toml");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

// === artifacts ===

/// A shell script that prints "acme-tool VERSION", padded with comments.
fn artifact(version: &str) -> Vec<u8> {
    let mut script = format!("#!/bin/sh\necho \"{PACKAGE} {version}\"\n");
    let line = format!("# {}\n", "padding ".repeat(9));
    while script.len() < PADDING {
        script.push_str(&line);
    }
    script.into_bytes()
}

/// The artifact with one byte flipped, as the tampering origin serves it.
fn tampered(genuine: &[u8]) -> Vec<u8> {
    let mut bytes = genuine.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A `.tar.gz` with a harmless `acme-tool` and then `../escaped`, which unpacked naively
/// would land next to the version directory.
fn evil_archive() -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    let script = artifact("1.1.0");
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, PACKAGE, script.as_slice())
        .expect("append script");

    // `tar` refuses to write `..` through set_path: put the name into the raw header.
    let payload = b"#!/bin/sh\necho escaped\n";
    let name = b"../escaped";
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(payload.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder
        .append(&header, payload.as_slice())
        .expect("append escaping entry");
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish archive")
}

/// Every file or directory called `name` under `root`.
fn files_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if entry.file_name() == name {
                found.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            }
        }
    }
    found
}

// === impl SizeWatcher ===

/// Samples the size of one file on a thread and remembers the largest seen.
struct SizeWatcher {
    largest: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SizeWatcher {
    fn start(path: PathBuf) -> SizeWatcher {
        let largest = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let handle = {
            let (largest, stopping) = (largest.clone(), stopping.clone());
            std::thread::spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    if let Ok(meta) = std::fs::metadata(&path) {
                        largest.fetch_max(meta.len(), Ordering::SeqCst);
                    }
                    // Sampling, not waiting for a condition.
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        SizeWatcher {
            largest,
            stopping,
            handle: Some(handle),
        }
    }

    fn largest(&self) -> u64 {
        self.largest.load(Ordering::SeqCst)
    }

    /// Stops sampling; returns the largest size seen.
    fn stop(mut self) -> u64 {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            handle.join().expect("watcher thread");
        }
        self.largest()
    }
}

impl Drop for SizeWatcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

// === impl Origin ===

/// The one path the origin serves.
const ORIGIN_PATH: &str = "/dist/acme-tool";

/// How the origin answers. Each carries the genuine artifact, whose hash and length the
/// release declares.
#[derive(Clone)]
enum Behaviour {
    /// The artifact, honouring `Range`.
    Honest(Vec<u8>),
    /// The artifact with one byte flipped (same length).
    Tampered(Vec<u8>),
    /// The first half, with a matching `Content-Length`, then close.
    Short(Vec<u8>),
    /// No `Content-Length`: the artifact, then (once released) [`EXCESS`] more bytes.
    Long(Vec<u8>),
    /// The full `Content-Length` and [`TRICKLE_BYTES`] bytes, then silence with the
    /// connection held open until released or the origin is dropped.
    Trickle(Vec<u8>),
}

/// One request the origin received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    line: String,
    range: Option<String>,
}

/// A misbehaving HTTP/1.1 origin on loopback serving [`ORIGIN_PATH`].
struct Origin {
    url: String,
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    gate: Gate,
    stopping: Arc<AtomicBool>,
}

impl Origin {
    fn start(behaviour: Behaviour) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let origin = Origin {
            url: format!("http://{addr}{ORIGIN_PATH}"),
            addr,
            requests: Arc::default(),
            gate: Gate::default(),
            stopping: Arc::default(),
        };
        let (requests, gate, stopping) = (
            origin.requests.clone(),
            origin.gate.clone(),
            origin.stopping.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (behaviour, requests, gate) =
                    (behaviour.clone(), requests.clone(), gate.clone());
                std::thread::spawn(move || {
                    // The agent hanging up is part of several tests.
                    let _ = serve(stream, &behaviour, &requests, &gate);
                });
            }
        });
        origin
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Lets a `Long` origin send its excess and a `Trickle` origin hang up.
    fn release(&self) {
        self.gate.open();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.gate.open();
        // Wake the accept loop so it sees `stopping`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    stream: TcpStream,
    behaviour: &Behaviour,
    requests: &Mutex<Vec<Request>>,
    gate: &Gate,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // the wake-up connection from drop
    }
    let line = line.trim_end().to_string();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    requests.lock().expect("requests lock").push(Request {
        line: line.clone(),
        range: range.clone(),
    });
    let mut out = stream;
    if line.split_whitespace().nth(1) != Some(ORIGIN_PATH) {
        return respond(&mut out, "404 Not Found", &[], b"");
    }
    match behaviour {
        Behaviour::Honest(bytes) => {
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < bytes.len());
            match from {
                Some(from) => {
                    let content_range = format!(
                        "Content-Range: bytes {from}-{}/{}",
                        bytes.len() - 1,
                        bytes.len()
                    );
                    respond(
                        &mut out,
                        "206 Partial Content",
                        &[&content_range],
                        &bytes[from..],
                    )
                }
                None => respond(&mut out, "200 OK", &[], bytes),
            }
        }
        Behaviour::Tampered(bytes) => respond(&mut out, "200 OK", &[], &tampered(bytes)),
        Behaviour::Short(bytes) => respond(&mut out, "200 OK", &[], &bytes[..bytes.len() / 2]),
        Behaviour::Long(bytes) => {
            out.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            out.write_all(bytes)?;
            out.flush()?;
            gate.wait(DEADLINE);
            out.write_all(&vec![0x5a; EXCESS])?;
            out.flush()
        }
        Behaviour::Trickle(bytes) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            )?;
            out.write_all(&bytes[..TRICKLE_BYTES])?;
            out.flush()?;
            gate.wait(DEADLINE);
            Ok(())
        }
    }
}

/// Writes a complete response with a `Content-Length`, then the connection closes.
fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[&str],
    body: &[u8],
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )?;
    for header in headers {
        write!(out, "{header}\r\n")?;
    }
    out.write_all(b"\r\n")?;
    out.write_all(body)?;
    out.flush()
}

/// A one-way latch that origin threads wait on.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().expect("gate lock") = true;
        changed.notify_all();
    }

    /// Waits until opened, at most `limit`.
    fn wait(&self, limit: Duration) {
        let (open, changed) = &*self.0;
        let guard = open.lock().expect("gate lock");
        let _ = changed
            .wait_timeout_while(guard, limit, |open| !*open)
            .expect("gate lock");
    }
}
