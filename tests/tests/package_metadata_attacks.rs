//! Hostile, stale or out-of-scope release metadata never gets a package installed.
//!
//! Each test is named after an attack on signed software distribution (DESIGN.md,
//! "Updates" and "Trust model"): metadata signed by a vendor outside its delegation,
//! metadata without a valid signature, a rollback to an older version, old metadata
//! replayed after a newer one, expired metadata (also behind a clock stepped back), and a
//! vendor's API token used for more than publishing its own packages. The agent must
//! refuse at signal time with the reason, before downloading anything: no new version
//! directory, nothing staged, `current` unchanged, no progress reported.
//!
//! A hostile server is simulated as in `agent_refuses_bad_envelopes.rs`: rows written
//! straight into the running server's SQLite database (with the artifact dropped into its
//! artifact store, so only the metadata stands between the agent and the bytes), then a
//! normal job created through the CLI pokes the relay, which signals every queued job.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use herald_shared::codec;
use herald_shared::envelope::{
    Action, Audience, Envelope, InstallSpec, OperatorKey, Order, Repeat, Statement, VendorKey,
};
use herald_shared::release::{this_platform, Format, Release};
use herald_tests::{now_ms, random_bytes, wait_until, TestAgent, TestServer, DEADLINE};
use rusqlite::{params, Connection};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The package every test installs (delegated to vendor `acme`).
const PACKAGE: &str = "acme-tool";

/// The agent journal key holding its clock high-water mark (i64 big-endian unix ms).
const CLOCK_KEY: &str = "clock_high_water";

// === vendors, artifacts and the CLI ===

/// A vendor registered with the server through `vendor keygen` and `vendor add`.
struct Vendor {
    key_file: PathBuf,
    key: VendorKey,
    token: String,
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Makes a key pair for vendor `name` and delegates `pattern` to it.
fn add_vendor(server: &TestServer, name: &str, pattern: &str) -> Vendor {
    let (key_file, token) = server.add_vendor(name, pattern);
    let key = VendorKey::from_hex(&std::fs::read_to_string(&key_file).expect("read key file"))
        .expect("the key file holds a hex seed");
    Vendor {
        key_file,
        key,
        token,
    }
}

/// The bytes of a small shell-script artifact.
fn script(package: &str, version: &str) -> Vec<u8> {
    format!("#!/bin/sh\necho {package} {version}\n").into_bytes()
}

/// Writes the script artifact of `package` `version` into its own build directory.
fn artifact_file(server: &TestServer, package: &str, version: &str) -> PathBuf {
    let dir = server.dir.path().join(format!("build-{package}-{version}"));
    std::fs::create_dir_all(&dir).expect("create build dir");
    let file = dir.join(package);
    std::fs::write(&file, script(package, version)).expect("write artifact");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
        .expect("make artifact executable");
    file
}

/// `package publish` of a fresh script artifact, signed with `vendor`'s key.
fn publish(
    server: &TestServer,
    vendor: &Vendor,
    package: &str,
    version: &str,
    extra: &[&str],
) -> Output {
    let file = artifact_file(server, package, version);
    let mut args = vec![
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        path_str(&vendor.key_file),
        package,
        version,
        path_str(&file),
    ];
    args.extend_from_slice(extra);
    server.cli(&args)
}

fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a CLI command failed; returns its stderr.
fn failed(output: &Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what} should have failed but printed:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `package install --wait` of one version to `agent`; returns the job as `jobs show`
/// reports it, after checking the command's exit status agrees with the job's state.
fn install(
    server: &TestServer,
    agent: &TestAgent,
    version: &str,
    extra: &[&str],
) -> (Value, String) {
    let to = format!("agent:{}", agent.name);
    let mut args = vec![
        "package", "install", "--to", &to, PACKAGE, version, "--wait",
    ];
    args.extend_from_slice(extra);
    let output = server.cli(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let id: i64 = *herald_tests::job_ids(&stdout).first().unwrap_or_else(|| {
        panic!(
            "`package install --wait` names no job: {stdout:?} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let job = server.job(id);
    assert_eq!(
        output.status.success(),
        job["state"] == "succeeded",
        "exit status {} for job {job:#}",
        output.status
    );
    (job, stdout)
}

/// Every release of [`PACKAGE`] the server lists.
fn releases(server: &TestServer) -> Vec<Value> {
    server
        .json(&["package", "list", PACKAGE])
        .as_array()
        .cloned()
        .expect("package list is an array")
}

fn release_info(server: &TestServer, version: &str) -> Value {
    releases(server)
        .into_iter()
        .find(|r| r["version"] == version)
        .unwrap_or_else(|| panic!("{PACKAGE} {version} is not listed"))
}

// === what the agent has installed ===

fn package_dir(agent: &TestAgent) -> PathBuf {
    agent.state_dir.join("packages").join(PACKAGE)
}

/// Entries of the package's directory other than `current` and `state.json`: the
/// installed version directories (and any half-built `.new` leftover), sorted.
fn versions(agent: &TestAgent) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(package_dir(agent)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n != "current" && n != "state.json")
        .collect();
    names.sort();
    names
}

/// The version `current` points at.
fn current(agent: &TestAgent) -> Option<String> {
    std::fs::read_link(package_dir(agent).join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Downloads waiting in (or left in) the agent's staging directory.
fn staged(agent: &TestAgent) -> Vec<String> {
    std::fs::read_dir(agent.state_dir.join("packages/.staging"))
        .map(|entries| {
            entries
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the installed `current` version prints.
fn run_current(agent: &TestAgent) -> String {
    let out = std::process::Command::new(package_dir(agent).join("current").join(PACKAGE))
        .output()
        .expect("run the installed tool");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts `job` was refused at signal time for a reason containing `reason`: never
/// started, no download progress.
fn assert_refused(job: &Value, reason: &str, what: &str) {
    assert_eq!(job["state"], "refused", "{what}: {job:#}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(reason),
        "{what}: refusal {error:?} should contain {reason:?}"
    );
    assert_eq!(job["started_at"], Value::Null, "{what}: {job:#}");
    assert_eq!(job["progress"], Value::Null, "{what}: {job:#}");
}

/// Asserts the agent holds exactly `installed` versions, `current` names `current_version`
/// and nothing is staged.
fn assert_installed(agent: &TestAgent, installed: &[&str], current_version: Option<&str>) {
    assert_eq!(versions(agent), installed, "version directories");
    assert_eq!(
        current(agent).as_deref(),
        current_version,
        "current version"
    );
    assert_eq!(staged(agent), Vec::<String>::new(), "staged downloads");
}

// === the hostile server ===

/// The server's database, as a hostile server (or whoever owns it) would use it.
struct HostileDb {
    conn: Connection,
    artifacts: PathBuf,
}

impl HostileDb {
    fn open(server: &TestServer) -> HostileDb {
        let conn = Connection::open(server.db_path()).expect("open the server's database");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("set busy timeout");
        conn.pragma_update(None, "foreign_keys", "ON")
            .expect("enable foreign keys");
        HostileDb {
            conn,
            artifacts: server.data_dir().join("artifacts"),
        }
    }

    /// Stores `metadata` as a published release of `release` attributed to `vendor` (whose
    /// delegation the relay attaches), with `artifact` in the artifact store. Returns the
    /// release id.
    fn insert_release(
        &self,
        release: &Release,
        vendor: Option<&str>,
        metadata: &Envelope,
        artifact: &[u8],
    ) -> i64 {
        let sha256 = hex::encode(release.sha256);
        std::fs::create_dir_all(&self.artifacts).expect("create artifact store");
        std::fs::write(self.artifacts.join(&sha256), artifact).expect("store artifact");
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO releases (package, version, platform, vendor, metadata, sha256,
                                       length, url, expires_at, state, created_at, published_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, 'published', ?9, ?9)",
                params![
                    release.package,
                    release.version,
                    release.platform,
                    vendor,
                    codec::to_bytes(metadata).expect("encode metadata"),
                    sha256,
                    release.length as i64,
                    release.expires_at,
                    now
                ],
            )
            .expect("insert release");
        self.conn.last_insert_rowid()
    }

    /// Stores an order row for `envelope`; returns the order id.
    fn insert_order(&self, order: &Order, envelope: &Envelope) -> String {
        let order_id = hex::encode(order.id);
        self.conn
            .execute(
                "INSERT INTO orders (id, envelope, action, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    order_id,
                    codec::to_bytes(envelope).expect("encode order"),
                    "injected install",
                    now_ms()
                ],
            )
            .expect("insert order");
        order_id
    }

    /// Queues an install job for `agent_id` carrying order `order_id` and release
    /// `release_id`, due now, expiring in ten minutes. Returns the job id.
    fn insert_install_job(&self, agent_id: &str, order_id: &str, release_id: i64) -> i64 {
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at,
                                   deliver_after, expires_at, release_id)
                 VALUES (?1, ?2, NULL, 'queued', ?3, ?3, ?4, ?5)",
                params![agent_id, order_id, now, now + 600_000, release_id],
            )
            .expect("insert job");
        self.conn.last_insert_rowid()
    }

    /// A genuine operator-signed one-off install of `release`'s version for `agent`,
    /// carrying `metadata`, whatever that is. Returns the job id.
    fn inject_install(
        &self,
        operator: &OperatorKey,
        agent: &TestAgent,
        release: &Release,
        metadata: &Envelope,
        vendor: Option<&str>,
        artifact: &[u8],
    ) -> i64 {
        let release_id = self.insert_release(release, vendor, metadata, artifact);
        let order = install_order(agent, Some(&release.version), Repeat::Once);
        let order_id = self.insert_order(&order, &sign_order(operator, &order));
        self.insert_install_job(&agent.id, &order_id, release_id)
    }
}

/// Release metadata of [`PACKAGE`] `version` for `artifact`, valid for an hour.
fn release(version: &str, artifact: &[u8]) -> Release {
    let now = now_ms();
    Release {
        package: PACKAGE.into(),
        version: version.into(),
        platform: this_platform(),
        sha256: Sha256::digest(artifact).into(),
        length: artifact.len() as u64,
        format: Format::File {
            name: PACKAGE.into(),
        },
        install_command: None,
        min_agent_version: None,
        url: None,
        issued_at: now - 60_000,
        expires_at: now + 3_600_000,
    }
}

fn sign_release(key: &VendorKey, release: &Release) -> Envelope {
    key.sign(&Statement::Release(release.clone()))
        .expect("sign release")
}

/// An install order of [`PACKAGE`] for `agent`, valid from a minute ago for an hour.
fn install_order(agent: &TestAgent, version: Option<&str>, repeat: Repeat) -> Order {
    let now = now_ms();
    Order {
        id: random_bytes(),
        audience: Audience::Agent(agent.id.clone()),
        issued_at: now - 60_000,
        not_before: now - 60_000,
        not_after: now + 3_600_000,
        repeat,
        action: Action::Install(InstallSpec {
            package: PACKAGE.into(),
            version: version.map(str::to_string),
            timeout_ms: 60_000,
        }),
    }
}

fn sign_order(key: &OperatorKey, order: &Order) -> Envelope {
    key.sign(&Statement::Order(order.clone()))
        .expect("sign order")
}

/// Positive control for the injection path: acme's genuine metadata for 1.0.0, injected
/// exactly like the attacks, installs. So what refuses the attacks is their metadata.
fn injected_control_installs(
    server: &TestServer,
    agent: &TestAgent,
    db: &HostileDb,
    operator: &OperatorKey,
    acme: &Vendor,
) {
    let bytes = script(PACKAGE, "1.0.0");
    let genuine = release("1.0.0", &bytes);
    let job = db.inject_install(
        operator,
        agent,
        &genuine,
        &sign_release(&acme.key, &genuine),
        Some("acme"),
        &bytes,
    );
    server.poke_with_marker_job(agent);
    server.wait_job_state(job, "succeeded", DEADLINE);
    assert_installed(agent, &["1.0.0"], Some("1.0.0"));
    assert_eq!(run_current(agent), "acme-tool 1.0.0");
}

/// One injected attack and the refusal it must meet.
struct Attack {
    name: &'static str,
    job_id: i64,
    reason: &'static str,
}

fn assert_attacks_refused(server: &TestServer, attacks: &[Attack]) {
    for attack in attacks {
        let job = server.wait_job_state(attack.job_id, "refused", DEADLINE);
        assert_refused(&job, attack.reason, attack.name);
    }
}

// === the attacks ===

/// Vendor `other` may sign `other-*` only. Metadata for `acme-tool` signed with its key
/// is refused by the server's API, and by the agent when a hostile server relays it
/// anyway, whichever vendor's delegation it attaches.
#[test]
fn metadata_signed_by_a_vendor_not_delegated_for_that_package_is_refused() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("vendor-not-delegated");
    let agent = TestAgent::start(&server, "a1");
    let acme = add_vendor(&server, "acme", "acme-*");
    let other = add_vendor(&server, "other", "other-*");

    let stderr = failed(
        &publish(&server, &other, PACKAGE, "2.0.0", &[]),
        "publishing acme-tool signed with other's key",
    );
    assert!(
        stderr.contains("vendor other is not delegated package acme-tool"),
        "publish refusal: {stderr:?}"
    );
    assert_eq!(releases(&server), Vec::<Value>::new(), "nothing registered");

    let db = HostileDb::open(&server);
    let operator = server.operator_key();
    injected_control_installs(&server, &agent, &db, &operator, &acme);

    // Higher versions than the installed one, so only the delegation can stop them.
    let mut attacks = Vec::new();
    let evil = b"#!/bin/sh\necho owned\n".to_vec();
    let forged = release("2.0.0", &evil);
    attacks.push(Attack {
        name: "signed by other, relayed with other's delegation",
        job_id: db.inject_install(
            &operator,
            &agent,
            &forged,
            &sign_release(&other.key, &forged),
            Some("other"),
            &evil,
        ),
        reason: "vendor other is not delegated package acme-tool",
    });
    let forged = release("2.0.1", &evil);
    attacks.push(Attack {
        name: "signed by other, relayed with acme's delegation",
        job_id: db.inject_install(
            &operator,
            &agent,
            &forged,
            &sign_release(&other.key, &forged),
            Some("acme"),
            &evil,
        ),
        reason: "signed by a key that vendor acme was not delegated",
    });
    let forged = release("2.0.2", &evil);
    attacks.push(Attack {
        name: "signed by other, relayed without a delegation",
        job_id: db.inject_install(
            &operator,
            &agent,
            &forged,
            &sign_release(&other.key, &forged),
            None,
            &evil,
        ),
        reason: "no delegation came with it",
    });
    server.poke_with_marker_job(&agent);
    assert_attacks_refused(&server, &attacks);
    assert_installed(&agent, &["1.0.0"], Some("1.0.0"));
    assert_eq!(run_current(&agent), "acme-tool 1.0.0");
}

/// Metadata whose signature does not verify over its bytes (zeroed, missing, garbage,
/// or a genuine signature over metadata altered afterwards to name another artifact) is
/// refused, whether it names the vendor or the operator as its signer.
#[test]
fn unsigned_metadata_is_refused() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("unsigned-metadata");
    let agent = TestAgent::start(&server, "a1");
    let acme = add_vendor(&server, "acme", "acme-*");
    let db = HostileDb::open(&server);
    let operator = server.operator_key();
    injected_control_installs(&server, &agent, &db, &operator, &acme);

    let evil = b"#!/bin/sh\necho owned\n".to_vec();
    let mut attacks = Vec::new();
    let mut inject = |name: &'static str, version: &str, edit: &dyn Fn(&mut Envelope)| {
        let forged = release(version, &evil);
        let mut envelope = sign_release(&acme.key, &forged);
        edit(&mut envelope);
        attacks.push(Attack {
            name,
            job_id: db.inject_install(&operator, &agent, &forged, &envelope, Some("acme"), &evil),
            reason: "signature does not verify",
        });
    };
    inject("zeroed signature", "2.0.0", &|e| e.signature = vec![0; 64]);
    inject("no signature", "2.0.1", &|e| e.signature.clear());
    inject("garbage signature", "2.0.2", &|e| {
        e.signature = random_bytes::<64>().to_vec()
    });
    inject(
        "operator named as signer, no valid signature",
        "2.0.3",
        &|e| {
            e.signer = operator.public();
            e.signature = vec![0; 64];
        },
    );

    // A genuine acme signature over 2.0.4 for a harmless artifact, with the hash and
    // length swapped for the evil one's after signing.
    let harmless = script(PACKAGE, "2.0.4");
    let signed = release("2.0.4", &harmless);
    let mut envelope = sign_release(&acme.key, &signed);
    let tampered = release("2.0.4", &evil);
    envelope.payload =
        codec::to_bytes(&Statement::Release(tampered.clone())).expect("encode tampered");
    assert_ne!(signed.sha256, tampered.sha256);
    attacks.push(Attack {
        name: "metadata altered after signing",
        job_id: db.inject_install(&operator, &agent, &tampered, &envelope, Some("acme"), &evil),
        reason: "signature does not verify",
    });

    server.poke_with_marker_job(&agent);
    assert_attacks_refused(&server, &attacks);
    assert_installed(&agent, &["1.0.0"], Some("1.0.0"));
    assert_eq!(run_current(&agent), "acme-tool 1.0.0");
}

/// Once 1.1.0 is installed, a genuine order to install the genuine, still valid 1.0.0
/// is refused: versions never go down, and the agent remembers across a restart.
#[test]
fn rollback_to_an_older_version_is_refused() {
    let server = TestServer::start("rollback");
    let mut agent = TestAgent::start(&server, "a1");
    let acme = add_vendor(&server, "acme", "acme-*");
    for version in ["1.0.0", "1.1.0"] {
        succeeded(
            &publish(&server, &acme, PACKAGE, version, &[]),
            &format!("publishing {version}"),
        );
    }
    let (job, _) = install(&server, &agent, "1.1.0", &[]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_installed(&agent, &["1.1.0"], Some("1.1.0"));

    // What the agent has seen is persisted, not just held in memory.
    agent.kill();
    agent.spawn();
    agent.wait_online(&server);

    let (job, stdout) = install(&server, &agent, "1.0.0", &[]);
    assert_refused(
        &job,
        "version 1.0.0 is older than 1.1.0",
        "rollback to 1.0.0",
    );
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("rollback refused")),
        "{job:#}"
    );
    assert!(stdout.contains(": refused: "), "install output {stdout:?}");
    assert_installed(&agent, &["1.1.0"], Some("1.1.0"));
    assert_eq!(run_current(&agent), "acme-tool 1.1.0");
}

/// A subscription's standing order names no version, so a hostile server could replay
/// the old (genuinely signed, unexpired) 1.0.0 metadata with it after 1.1.0 rolled out.
/// The agent refuses it.
#[test]
fn replayed_old_metadata_after_a_newer_one_is_refused() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("replayed-metadata");
    let agent = TestAgent::start(&server, "a1");
    let acme = add_vendor(&server, "acme", "acme-*");
    let wait_rollout = |version: &str| {
        wait_until(
            &format!("the rollout of {version} to complete"),
            DEADLINE,
            || {
                let rollouts = server.json(&["package", "rollout", "list", PACKAGE]);
                rollouts
                    .as_array()?
                    .iter()
                    .find(|r| r["version"] == version && r["state"] == "completed")
                    .cloned()
            },
        )
    };

    succeeded(
        &publish(&server, &acme, PACKAGE, "1.0.0", &[]),
        "publishing 1.0.0",
    );
    let to = format!("agent:{}", agent.name);
    server.cli_ok(&["package", "subscribe", "--to", &to, PACKAGE, "--waves", "1"]);
    wait_rollout("1.0.0");
    succeeded(
        &publish(&server, &acme, PACKAGE, "1.1.0", &[]),
        "publishing 1.1.0",
    );
    let rollout = wait_rollout("1.1.0");
    assert_eq!(rollout["succeeded"], 1, "{rollout:#}");
    assert_installed(&agent, &["1.0.0", "1.1.0"], Some("1.1.0"));

    // The hostile server queues another job for the subscription's standing order, with
    // the 1.0.0 release attached.
    let db = HostileDb::open(&server);
    let order_id: String = db
        .conn
        .query_row(
            "SELECT order_id FROM package_subscriptions WHERE package = ?1",
            params![PACKAGE],
            |r| r.get(0),
        )
        .expect("the subscription's order");
    let old = release_info(&server, "1.0.0")["id"]
        .as_i64()
        .expect("release id");
    let job_id = db.insert_install_job(&agent.id, &order_id, old);
    server.poke_with_marker_job(&agent);
    let job = server.wait_job_state(job_id, "refused", DEADLINE);
    assert_refused(&job, "version 1.0.0 is older than 1.1.0", "replayed 1.0.0");
    assert_installed(&agent, &["1.0.0", "1.1.0"], Some("1.1.0"));
    assert_eq!(run_current(&agent), "acme-tool 1.1.0");
}

/// Metadata past its expiry no longer installs (the vendor must re-sign it), but the
/// agent is not stopped by it: other jobs keep running.
#[test]
fn expired_metadata_blocks_installs_but_the_agent_keeps_running_jobs() {
    let server = TestServer::start("expired-metadata");
    let mut agent = TestAgent::start(&server, "a1");
    let acme = add_vendor(&server, "acme", "acme-*");
    succeeded(
        &publish(&server, &acme, PACKAGE, "1.0.0", &["--expires", "2s"]),
        "publishing 1.0.0 for two seconds",
    );
    let expires_at = release_info(&server, "1.0.0")["expires_at"]
        .as_i64()
        .expect("expires_at");
    assert!(expires_at <= now_ms() + 2_000, "expires at {expires_at}");
    wait_until("the metadata to expire", DEADLINE, || {
        (now_ms() > expires_at).then_some(())
    });

    let (job, _) = install(&server, &agent, "1.0.0", &[]);
    assert_refused(&job, "release metadata expired", "expired 1.0.0");
    assert_installed(&agent, &[], None);

    let to = format!("agent:{}", agent.name);
    let output = server.cli(&[
        "run",
        "--to",
        &to,
        "--wait",
        "--",
        "/bin/echo",
        "still-here",
    ]);
    assert_eq!(
        succeeded(&output, "a run after the refusal"),
        "still-here\n"
    );
    assert!(agent.try_wait().is_none(), "the agent exited");
}

/// With the agent's clock high-water mark three days ahead (its wall clock stepped back
/// by three days), metadata that expires in one day by the wall clock is expired. The
/// install order itself, valid for a week, passes the same guarded clock: the release's
/// expiry is what refuses.
#[test]
fn clock_stepped_back_does_not_revive_expired_metadata() {
    let server = TestServer::start("clock-stepped-back");
    let mut agent = TestAgent::start(&server, "a1");
    agent.kill();
    let high_water = now_ms() + 3 * 24 * 3_600_000;
    {
        let journal =
            Connection::open(agent.state_dir.join("agent.db")).expect("open the agent's journal");
        journal
            .execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)",
                params![CLOCK_KEY, high_water.to_be_bytes().to_vec()],
            )
            .expect("store the clock high-water mark");
    }
    agent.spawn();
    agent.wait_online(&server);

    let acme = add_vendor(&server, "acme", "acme-*");
    succeeded(
        &publish(&server, &acme, PACKAGE, "1.0.0", &["--expires", "1d"]),
        "publishing 1.0.0 for a day",
    );
    let expires_at = release_info(&server, "1.0.0")["expires_at"]
        .as_i64()
        .expect("expires_at");
    assert!(now_ms() < expires_at && expires_at < high_water);

    let (job, _) = install(&server, &agent, "1.0.0", &["--ttl", "7d"]);
    assert_refused(
        &job,
        &format!("release metadata expired at {expires_at}"),
        "1.0.0 behind a stepped-back clock",
    );
    assert_installed(&agent, &[], None);
}

/// A vendor's API token publishes that vendor's own packages and nothing else: not
/// packages outside its delegation, not another vendor's signed releases, and no admin
/// endpoint at all.
#[test]
fn vendor_token_can_only_publish_its_own_packages() {
    let server = TestServer::start("vendor-token");
    let acme = add_vendor(&server, "acme", "acme-*");
    let other = add_vendor(&server, "other", "other-*");
    let with_acme_token = ["--token", acme.token.as_str()];

    let out = succeeded(
        &publish(&server, &acme, "acme-x", "1.0.0", &with_acme_token),
        "acme publishing acme-x with its token",
    );
    assert!(out.contains("published acme-x 1.0.0"), "{out:?}");

    let stderr = failed(
        &publish(&server, &acme, "other-x", "1.0.0", &with_acme_token),
        "acme publishing other-x with its own key and token",
    );
    assert!(
        stderr.contains("vendor acme is not delegated package other-x"),
        "{stderr:?}"
    );
    let stderr = failed(
        &publish(&server, &other, "other-x", "1.0.0", &with_acme_token),
        "acme's token publishing other's release",
    );
    assert!(
        stderr.contains("release is signed by vendor other, not by you (acme)"),
        "{stderr:?}"
    );
    let listed: Vec<(Value, Value)> = server
        .json(&["package", "list"])
        .as_array()
        .expect("package list is an array")
        .iter()
        .map(|r| (r["package"].clone(), r["vendor"].clone()))
        .collect();
    assert_eq!(
        listed,
        [(Value::from("acme-x"), Value::from("acme"))],
        "releases registered"
    );

    // The admin CLI's configuration with the vendor token in place of the admin token.
    let admin = std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("admin.toml");
    let swapped: Vec<String> = admin
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("admin_token") {
                format!("admin_token = \"{}\"", acme.token)
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_ne!(swapped.join("\n"), admin.trim_end(), "admin_token replaced");
    let config = server.dir.path().join("vendor-as-admin.toml");
    std::fs::write(&config, swapped.join("\n") + "\n").expect("write config");
    for command in [
        &["agents", "list"][..],
        &["token", "create"],
        &["vendor", "list"],
    ] {
        let mut args = vec!["--config", path_str(&config)];
        args.extend_from_slice(command);
        let stderr = failed(
            &server.cli(&args),
            &format!("{command:?} with a vendor token"),
        );
        assert!(
            stderr.contains("vendor tokens may only publish releases"),
            "{command:?}: {stderr:?}"
        );
    }
}
