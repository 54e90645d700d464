//! `herald-server backup` taken while the server serves and takes jobs restores every
//! job whose creation was acknowledged before the backup began, with the keys (the
//! agent reconnects to the restored server by itself) and a job id counter moved past
//! anything the old server handed out. `backup verify` names what is wrong with a
//! damaged or truncated archive, and `restore` touches neither a live data directory
//! nor anything else when it refuses.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use herald_tests::{all_jobs, wait_until, TestAgent, TestServer, DEADLINE};

/// Threads creating jobs while the backup runs.
const LOAD_THREADS: usize = 2;
/// Jobs acknowledged before the backup starts (at least).
const JOBS_BEFORE: usize = 12;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir` (relative name -> SHA-256), leaving out the files a running
/// SQLite changes by itself.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).expect("list directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, into);
            } else if !path.to_string_lossy().contains("herald.db") {
                let hash = hex::encode(Sha256::digest(std::fs::read(&path).expect("read")));
                into.insert(path.strip_prefix(root).expect("under root").into(), hash);
            }
        }
    }
    let mut all = BTreeMap::new();
    walk(dir, dir, &mut all);
    all
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn backup_taken_under_load_restores_every_acknowledged_job() {
    if herald_tests::sqlite_only("backup copies SQLite's file (PostgreSQL: pg_dump)") {
        return;
    }
    let mut server = TestServer::start("backup-load");
    let agent = TestAgent::start(&server, "worker");
    let archive = server.dir.path().join("herald-backup.tar");

    let acknowledged: Mutex<Vec<i64>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let (before_backup, backup_out) = std::thread::scope(|scope| {
        for _ in 0..LOAD_THREADS {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let ids = server.run_job("agent:worker", &[], &["/bin/true"]);
                    assert_eq!(ids.len(), 1, "one job per run");
                    acknowledged
                        .lock()
                        .expect("no panic holding it")
                        .extend(ids);
                }
            });
        }
        wait_until(
            "jobs to be acknowledged before the backup",
            DEADLINE,
            || (acknowledged.lock().expect("lock").len() >= JOBS_BEFORE).then_some(()),
        );
        // Every id in the list was printed to its caller before this point.
        let before_backup = acknowledged.lock().expect("lock").clone();
        let out = server.cli(&["backup", "--out", &archive.to_string_lossy()]);
        // More jobs after the backup, which the restored server must not hand out again.
        let after = acknowledged.lock().expect("lock").len();
        wait_until("jobs to be acknowledged after the backup", DEADLINE, || {
            (acknowledged.lock().expect("lock").len() >= after + JOBS_BEFORE).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        (before_backup, out)
    });
    assert!(backup_out.status.success(), "{}", stderr(&backup_out));
    assert_eq!(mode(&archive), 0o600, "the archive holds keys");
    assert!(!server.dir.path().join("herald-backup.tar.tmp").exists());

    // The agent has run every job, including those created after the backup.
    let created = acknowledged.into_inner().expect("lock");
    let highest = *created.iter().max().expect("jobs were created");
    wait_until("the agent to run every job", DEADLINE, || {
        let jobs = all_jobs(&server);
        (jobs.len() >= created.len() && jobs.iter().all(|j| j["state"] == "succeeded"))
            .then_some(())
    });

    let verified = server.cli_ok(&["backup", "verify", &archive.to_string_lossy()]);
    assert!(verified.contains("is valid"), "{verified}");

    // Disaster: the server and its directory are gone; restore into the same path.
    server.kill();
    let data_dir = server.data_dir();
    std::fs::rename(&data_dir, server.dir.path().join("server.lost")).expect("move aside");
    let restored = server.cli_ok(&["restore", &archive.to_string_lossy()]);
    assert!(restored.contains("restored"), "{restored}");
    for key in [
        "ca.key",
        "server.key",
        "console.key",
        "operator.key",
        "admin.toml",
    ] {
        assert_eq!(mode(&data_dir.join(key)), 0o600, "{key}");
    }
    server.spawn();

    let jobs: Vec<i64> = all_jobs(&server)
        .iter()
        .filter_map(|j| j["id"].as_i64())
        .collect();
    let missing: Vec<i64> = before_backup
        .iter()
        .filter(|id| !jobs.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup but not restored: {missing:?} (restored: {jobs:?})"
    );

    // The keys came along: the running agent reconnects by itself, and new work runs
    // under ids the agent has never seen (else it would answer Duplicate, never run).
    agent.wait_online(&server);
    let new = server.run_job("agent:worker", &[], &["/bin/echo", "after the restore"]);
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(
        new[0] > highest,
        "job id {} reused (highest {highest})",
        new[0]
    );
    let job = server.wait_job_state(new[0], "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "after the restore\n", "{job:#}");
}

#[test]
fn damaged_backups_and_occupied_directories_are_refused() {
    if herald_tests::sqlite_only("backup copies SQLite's file (PostgreSQL: pg_dump)") {
        return;
    }
    let server = TestServer::start("backup-refusals");
    let data_dir = server.data_dir();
    // An artifact as a published package leaves it: named by its SHA-256.
    let artifact = b"package bytes".to_vec();
    let sha = hex::encode(Sha256::digest(&artifact));
    std::fs::create_dir_all(data_dir.join("artifacts")).expect("artifacts dir");
    std::fs::write(data_dir.join("artifacts").join(&sha), &artifact).expect("artifact");

    let archive = server.dir.path().join("b.tar");
    let archive_arg = archive.to_string_lossy().into_owned();
    server.cli_ok(&["backup", "--out", &archive_arg]);
    let bytes = std::fs::read(&archive).expect("read archive");

    // A flipped byte inside herald.toml's copy: verify fails naming the member.
    let config = std::fs::read(data_dir.join("herald.toml")).expect("herald.toml");
    let at = bytes
        .windows(config.len())
        .position(|w| w == config.as_slice())
        .expect("herald.toml is stored as it is");
    let mut flipped = bytes.clone();
    flipped[at + config.len() / 2] ^= 0x01;
    let flipped_path = server.dir.path().join("flipped.tar");
    std::fs::write(&flipped_path, &flipped).expect("write");
    let out = server.cli(&["backup", "verify", &flipped_path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("member herald.toml: SHA-256 does not match"),
        "{}",
        stderr(&out)
    );

    // A truncated archive: verify fails and says so.
    let truncated_path = server.dir.path().join("truncated.tar");
    std::fs::write(&truncated_path, &bytes[..bytes.len() / 2]).expect("write");
    let out = server.cli(&["backup", "verify", &truncated_path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));

    // Restore over the live data directory is refused and changes nothing.
    let before = tree(&data_dir);
    let out = server.cli(&["restore", &archive_arg]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("already holds a Herald database"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        tree(&data_dir),
        before,
        "a refused restore changed the directory"
    );
    assert!(!server.dir.path().join("server.restoring").exists());

    // A damaged archive is not restored anywhere, and leaves nothing behind.
    let elsewhere = server.dir.path().join("elsewhere");
    let restore_to = |dir: &Path, file: &Path| {
        std::process::Command::new(herald_tests::bin("herald-server"))
            .arg("--data-dir")
            .arg(dir)
            .arg("restore")
            .arg(file)
            .env("HERALD_LOG", "warn")
            .output()
            .expect("run restore")
    };
    let out = restore_to(&elsewhere, &flipped_path);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("member herald.toml"),
        "{}",
        stderr(&out)
    );
    assert!(!elsewhere.exists());
    assert!(!server.dir.path().join("elsewhere.restoring").exists());

    // A good archive restores into a new directory: the artifact comes back, and
    // admin.toml points into the new directory.
    let out = restore_to(&elsewhere, &archive);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(elsewhere.join("artifacts").join(&sha)).expect("artifact restored"),
        artifact
    );
    let admin = std::fs::read_to_string(elsewhere.join("admin.toml")).expect("admin.toml");
    assert!(
        admin.contains(&*elsewhere.join("ca.pem").to_string_lossy()),
        "{admin}"
    );
    assert_eq!(tree(&data_dir), before, "the source changed");

    // --no-artifacts: the manifest names the artifact, the archive leaves it out.
    let lean = server.dir.path().join("lean.tar");
    server.cli_ok(&["backup", "--out", &lean.to_string_lossy(), "--no-artifacts"]);
    let lean_bytes = std::fs::read(&lean).expect("read");
    assert!(
        lean_bytes.windows(sha.len()).any(|w| w == sha.as_bytes()),
        "the manifest lists the artifact"
    );
    assert!(
        !lean_bytes
            .windows(artifact.len())
            .any(|w| w == artifact.as_slice()),
        "the artifact is not in the archive"
    );
    server.cli_ok(&["backup", "verify", &lean.to_string_lossy()]);
}
