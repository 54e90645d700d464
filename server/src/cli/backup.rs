//! `herald-server backup`, `backup verify` and `restore`: a whole server in one file,
//! taken while it serves, checked before it is trusted, and put back only where it
//! cannot overwrite anything.
//!
//! # The archive
//!
//! A tar file (mode 0600: it holds the keys), members in this order:
//!
//! - `manifest.json`: format version, herald version, schema version, time, the data
//!   directory it came from, and every member's name, size and SHA-256; with
//!   `--no-artifacts`, the artifacts left out (`omitted`, names and hashes only);
//! - `herald.db`: a consistent online copy of the database (see `store::backup`);
//! - `herald.toml`, `admin.toml`, and the keys: `ca.*`, `server.*`, `console.key`,
//!   `reset.key`, `operator.key` (whichever the data directory holds);
//! - `artifacts/<sha256>`: the package artifacts, unless `--no-artifacts`.
//!
//! Every member is hashed once to write the manifest and again as it goes into the
//! archive; a file that changed in between fails the backup rather than produce an
//! archive that contradicts its manifest. The archive is written to `FILE.tmp`,
//! fsynced, then renamed: a crash leaves the previous `FILE` or the new one, never half.
//!
//! # Restore
//!
//! `restore` never overwrites: it refuses a directory that holds a `herald.db` (whether
//! a server runs on it or not: a stopped server's database is as precious) or anything
//! else. It unpacks into `DIR.restoring`, checks every hash and the database's
//! integrity there, and only then renames it to `DIR`. On the way it moves the job id
//! counter on by [`RESTORE_JOB_ID_GAP`] (agents deduplicate by job id, and the old
//! server may have handed out ids after the backup) and points `admin.toml`'s paths
//! into the new directory.
//!
//! Why `tar`: a format every operator can list and unpack by hand (`tar tf`), streamed
//! so an archive of large artifacts never sits in memory, and the crate is already in
//! the workspace (the agent unpacks packages with it).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::{usage, CliError};
use crate::config::{self, AdminConfig};
use crate::store::{self, BackupError, DB_FILE};

/// The archive format this server writes and reads.
pub const FORMAT: u32 = 1;
/// The manifest's member name.
const MANIFEST: &str = "manifest.json";
/// The most a manifest may weigh (names and hashes: ~150 bytes an artifact).
const MANIFEST_LIMIT: u64 = 16 << 20;
/// How far `restore` moves the job id counter past the backup's highest id: more jobs
/// than any server creates between a backup and its restore, and small enough that
/// billions of restores fit in an i64.
pub const RESTORE_JOB_ID_GAP: i64 = 1 << 32;
/// Top-level files other than the database that go into the archive, besides `ca.*`
/// and `server.*` (the CA and server certificate and key).
const DATA_FILES: &[&str] = &[
    config::SERVER_CONFIG,
    config::ADMIN_CONFIG,
    crate::ticket::KEY_FILE,
    crate::pki::RESET_KEY,
    config::OPERATOR_KEY,
];

/// `backup`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    /// Check an archive instead of writing one.
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// The archive to write (replaced atomically if it exists).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Leave the package artifacts out: the manifest lists their names and hashes.
    #[arg(long)]
    pub no_artifacts: bool,
}

/// `backup ...`.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Check an archive: every member's size and hash, the database's integrity and
    /// schema version.
    Verify {
        /// The archive.
        file: PathBuf,
    },
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The archive `backup` wrote; restored into --data-dir, which must not hold a server.
    pub file: PathBuf,
}

/// What the manifest says about the archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    /// Archive format ([`FORMAT`]).
    format: u32,
    /// The herald-server version that wrote it.
    herald_version: String,
    /// The database copy's schema version.
    schema_version: usize,
    /// When the backup was taken (RFC 3339, UTC).
    created_at: String,
    /// The data directory it was taken from.
    data_dir: PathBuf,
    /// The members after the manifest, in archive order.
    members: Vec<Member>,
    /// Artifacts left out with `--no-artifacts`.
    #[serde(default)]
    omitted: Vec<Member>,
}

/// One file: its name in the archive (and in the data directory), size and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    name: String,
    size: u64,
    sha256: String,
}

/// Why a backup, a check or a restore failed.
#[derive(Debug, thiserror::Error)]
enum ArchiveError {
    /// Wrong usage (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The database copy or check.
    #[error(transparent)]
    Database(#[from] BackupError),
    /// A file operation.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A data-directory file changed while it was being archived.
    #[error("{0} changed while the backup was being written; run the backup again")]
    Changed(String),
    /// The archive cannot be read to the end.
    #[error("backup {file} is damaged or truncated: {reason}")]
    Damaged { file: PathBuf, reason: String },
    /// The archive reads, but what it holds is wrong.
    #[error("backup {file} is not valid:\n  {}", problems.join("\n  "))]
    Invalid {
        file: PathBuf,
        problems: Vec<String>,
    },
    /// Restore would overwrite something.
    #[error("{0}")]
    Refused(String),
}

impl From<ArchiveError> for CliError {
    fn from(e: ArchiveError) -> CliError {
        match e {
            ArchiveError::Usage(m) => usage(m),
            other => CliError::Other(other.to_string()),
        }
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.to_path_buf();
    move |source| ArchiveError::Io {
        action,
        path,
        source,
    }
}

type Result<T, E = ArchiveError> = std::result::Result<T, E>;

// === backup ===

/// Runs `backup --out FILE` or `backup verify FILE`.
pub fn backup(data_dir: &Path, args: BackupArgs) -> Result<ExitCode, CliError> {
    match (args.command, args.out) {
        (Some(BackupCommand::Verify { file }), _) => {
            // The database copy is checked from a file; the archive's own directory may
            // be read-only media.
            let staging = Staging::new(&std::env::temp_dir().join(format!(
                "herald-verify-{}-{}",
                std::process::id(),
                hex::encode(crate::random_bytes::<6>())
            )))?;
            let (manifest, _) = unpack(&file, staging.path(), false)?;
            println!(
                "backup {} is valid: {} members, schema v{}, taken {} by herald {}",
                file.display(),
                manifest.members.len(),
                manifest.schema_version,
                manifest.created_at,
                manifest.herald_version
            );
            if !manifest.omitted.is_empty() {
                println!(
                    "  {} artifacts are listed but not included (--no-artifacts)",
                    manifest.omitted.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(out)) => {
            let manifest = write_backup(data_dir, &out, !args.no_artifacts)?;
            let bytes: u64 = manifest.members.iter().map(|m| m.size).sum();
            println!(
                "backup written to {}: {} members, {bytes} bytes, schema v{}",
                out.display(),
                manifest.members.len(),
                manifest.schema_version
            );
            if !manifest.omitted.is_empty() {
                println!(
                    "  {} artifacts not included (--no-artifacts): keep {} yourself",
                    manifest.omitted.len(),
                    data_dir.join(crate::api::releases::ARTIFACT_DIR).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, None) => Err(usage("backup needs --out FILE (or: backup verify FILE)")),
    }
}

/// Writes the archive of `data_dir` to `out` (through `out.tmp`); returns its manifest.
fn write_backup(data_dir: &Path, out: &Path, with_artifacts: bool) -> Result<Manifest> {
    if !config::server_config_path(data_dir).exists() {
        return Err(ArchiveError::Usage(format!(
            "no server in {} (run `herald-server init` first, or pass --data-dir)",
            data_dir.display()
        )));
    }
    let database =
        config::DatabaseConfig::of(data_dir).map_err(|e| ArchiveError::Usage(e.to_string()))?;
    if let Some(url) = &database.url {
        return Err(ArchiveError::Usage(format!(
            "the store is in PostgreSQL ({}): back it up with pg_dump; `backup` copies SQLite's file",
            store::redact_url(url)
        )));
    }
    let staging = Staging::new(&with_suffix(out, ".db.tmp"))?;
    let db_copy = staging.path().join(DB_FILE);
    let schema_version = store::copy_live(data_dir, &db_copy)?;

    let mut sources = vec![(DB_FILE.to_string(), db_copy)];
    sources.extend(data_files(data_dir)?);
    let artifacts = artifact_files(data_dir)?;
    let mut manifest = Manifest {
        format: FORMAT,
        herald_version: env!("CARGO_PKG_VERSION").to_string(),
        schema_version,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        data_dir: std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()),
        members: Vec::new(),
        omitted: Vec::new(),
    };
    for (name, path) in &sources {
        manifest.members.push(hash_file(name, path)?);
    }
    for (name, path) in &artifacts {
        let member = hash_file(name, path)?;
        if with_artifacts {
            manifest.members.push(member);
        } else {
            manifest.omitted.push(member);
        }
    }
    if with_artifacts {
        sources.extend(artifacts);
    }

    let tmp = with_suffix(out, ".tmp");
    let written = write_archive(&tmp, &manifest, &sources);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, out).map_err(io_err("cannot rename", &tmp))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        herald_io::files::sync_dir(parent);
    }
    Ok(manifest)
}

/// Writes the manifest and `sources` (as the manifest lists them) to a new file `tmp`.
fn write_archive(tmp: &Path, manifest: &Manifest, sources: &[(String, PathBuf)]) -> Result<()> {
    let file = private_file(tmp)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mtime = chrono::Utc::now().timestamp().max(0) as u64;
    let manifest_json =
        serde_json::to_vec_pretty(manifest).expect("a manifest of strings and numbers encodes");
    let mut head = header(manifest_json.len() as u64, mtime);
    tar.append_data(&mut head, MANIFEST, manifest_json.as_slice())
        .map_err(io_err("cannot write", tmp))?;
    for ((name, path), member) in sources.iter().zip(&manifest.members) {
        debug_assert_eq!(name, &member.name);
        let source = File::open(path).map_err(io_err("cannot read", path))?;
        let mut reader = Hashing::new(source.take(member.size));
        let mut head = header(member.size, mtime);
        tar.append_data(&mut head, name, &mut reader)
            .map_err(io_err("cannot write", tmp))?;
        if reader.count != member.size || reader.hex() != member.sha256 {
            return Err(ArchiveError::Changed(path.display().to_string()));
        }
    }
    let writer = tar.into_inner().map_err(io_err("cannot write", tmp))?;
    let file = writer
        .into_inner()
        .map_err(|e| io_err("cannot write", tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err("cannot sync", tmp))?;
    Ok(())
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mtime);
    header
}

/// The configuration and key files of `data_dir` that go into the archive, by name. A
/// packaged server's `/etc/herald/herald.toml`, when it is the one in use, goes in as
/// `herald.toml` (a restore puts it in the data directory, where it is read unless
/// `/etc/herald/herald.toml` exists).
fn data_files(data_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(data_dir).map_err(io_err("cannot list", data_dir))? {
        let entry = entry.map_err(io_err("cannot list", data_dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let wanted = DATA_FILES.contains(&name.as_str())
            || ((name.starts_with("ca.") || name.starts_with("server."))
                && !name.ends_with(".tmp"));
        if wanted && entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(name);
        }
    }
    let in_use = config::server_config_path(data_dir);
    if in_use != data_dir.join(config::SERVER_CONFIG)
        && !names.iter().any(|n| n == config::SERVER_CONFIG)
    {
        names.push(config::SERVER_CONFIG.to_string());
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let path = if name == config::SERVER_CONFIG {
                in_use.clone()
            } else {
                data_dir.join(&name)
            };
            (name, path)
        })
        .collect())
}

/// The stored artifacts (files named by a SHA-256; uploads in progress are not).
fn artifact_files(data_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = data_dir.join(crate::api::releases::ARTIFACT_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot list", &dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("cannot list", &dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_sha256(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            files.push((artifact_name(&name), entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

fn artifact_name(sha256: &str) -> String {
    format!("{}/{sha256}", crate::api::releases::ARTIFACT_DIR)
}

fn is_sha256(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hash_file(name: &str, path: &Path) -> Result<Member> {
    let file = File::open(path).map_err(io_err("cannot read", path))?;
    let mut reader = Hashing::new(file);
    io::copy(&mut reader, &mut io::sink()).map_err(io_err("cannot read", path))?;
    Ok(Member {
        name: name.to_string(),
        size: reader.count,
        sha256: reader.hex(),
    })
}

// === verify and unpack ===

/// Reads the archive `file`, checking every member against the manifest, and the
/// database copy's integrity and schema version. The database always goes to
/// `staging`; the other members too when `write_all`. Returns the manifest and the
/// database check.
fn unpack(file: &Path, staging: &Path, write_all: bool) -> Result<(Manifest, store::CopyCheck)> {
    let damaged = |reason: String| ArchiveError::Damaged {
        file: file.to_path_buf(),
        reason,
    };
    let archive = File::open(file).map_err(io_err("cannot open", file))?;
    let mut archive = tar::Archive::new(BufReader::new(archive));
    let mut entries = archive
        .entries()
        .map_err(|e| damaged(format!("not a tar archive: {e}")))?;

    let manifest = match entries.next() {
        None => return Err(damaged("empty: no manifest.json".into())),
        Some(Err(e)) => return Err(damaged(format!("cannot read the first member: {e}"))),
        Some(Ok(entry)) => read_manifest(file, entry)?,
    };
    let mut expected: BTreeMap<&str, &Member> = BTreeMap::new();
    for member in &manifest.members {
        if !is_member_name(&member.name) || expected.insert(&member.name, member).is_some() {
            return Err(ArchiveError::Invalid {
                file: file.to_path_buf(),
                problems: vec![format!(
                    "manifest.json: member name {:?} is not one a backup holds, or repeated",
                    member.name
                )],
            });
        }
    }
    if !expected.contains_key(DB_FILE) {
        return Err(ArchiveError::Invalid {
            file: file.to_path_buf(),
            problems: vec![format!("manifest.json lists no {DB_FILE}")],
        });
    }

    let mut problems = Vec::new();
    let mut last = MANIFEST.to_string();
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(format!("after member {last}: {e}")))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| damaged(format!("after member {last}: bad member name: {e}")))?;
        let Some(member) = expected.remove(name.as_str()) else {
            problems.push(format!(
                "member {name}: not in the manifest (or there twice)"
            ));
            last = name;
            continue;
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            problems.push(format!("member {name}: not a regular file"));
            last = name;
            continue;
        }
        let mut out = if write_all || name == DB_FILE {
            let path = staging.join(&name);
            if let Some(parent) = path.parent() {
                herald_io::files::create_private_dir(parent)
                    .map_err(|e| io_err(e.action, &e.path)(e.source))?;
            }
            Some((private_file(&path)?, path))
        } else {
            None
        };
        let stored = entry.size();
        let mut reader = Hashing::new(&mut entry);
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| damaged(format!("member {name} cannot be read to its end: {e}")))?;
            if n == 0 {
                break;
            }
            if let Some((file, path)) = &mut out {
                file.write_all(&buf[..n])
                    .map_err(io_err("cannot write", path))?;
            }
        }
        if let Some((file, path)) = out {
            file.sync_all().map_err(io_err("cannot sync", &path))?;
        }
        let (count, sha256) = (reader.count, reader.hex());
        if count < stored {
            return Err(damaged(format!(
                "member {name} is cut short ({count} of {stored} bytes): the archive is truncated"
            )));
        }
        if count != member.size {
            problems.push(format!(
                "member {name}: {count} bytes, the manifest says {}",
                member.size
            ));
        } else if sha256 != member.sha256 {
            problems.push(format!(
                "member {name}: SHA-256 does not match the manifest (damaged or altered)"
            ));
        }
        last = name;
    }
    for name in expected.keys() {
        problems.push(format!(
            "member {name} is missing (the archive is truncated?)"
        ));
    }
    if !problems.is_empty() {
        return Err(ArchiveError::Invalid {
            file: file.to_path_buf(),
            problems,
        });
    }

    let db = staging.join(DB_FILE);
    let check = store::check_copy(&db)?;
    if !check.problems.is_empty() {
        problems.push(format!(
            "member {DB_FILE}: fails the integrity check: {}",
            check.problems.join("; ")
        ));
    } else if check.schema_version != manifest.schema_version {
        problems.push(format!(
            "member {DB_FILE}: schema version {}, the manifest says {}",
            check.schema_version, manifest.schema_version
        ));
    }
    if !problems.is_empty() {
        return Err(ArchiveError::Invalid {
            file: file.to_path_buf(),
            problems,
        });
    }
    Ok((manifest, check))
}

fn read_manifest(file: &Path, entry: tar::Entry<'_, impl Read>) -> Result<Manifest> {
    let invalid = |problem: String| ArchiveError::Invalid {
        file: file.to_path_buf(),
        problems: vec![problem],
    };
    let name = entry
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != MANIFEST {
        return Err(invalid(format!(
            "the first member is {name:?}, not {MANIFEST}: not a herald-server backup"
        )));
    }
    let stored = entry.size();
    let mut text = Vec::new();
    entry
        .take(MANIFEST_LIMIT + 1)
        .read_to_end(&mut text)
        .map_err(|e| ArchiveError::Damaged {
            file: file.to_path_buf(),
            reason: format!("member {MANIFEST} cannot be read to its end: {e}"),
        })?;
    if (text.len() as u64) < stored.min(MANIFEST_LIMIT) {
        return Err(ArchiveError::Damaged {
            file: file.to_path_buf(),
            reason: format!("member {MANIFEST} is cut short: the archive is truncated"),
        });
    }
    if text.len() as u64 > MANIFEST_LIMIT {
        return Err(invalid(format!(
            "{MANIFEST} is larger than {MANIFEST_LIMIT} bytes"
        )));
    }
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{MANIFEST} is not a backup manifest: {e}")))?;
    if format.format != FORMAT {
        return Err(invalid(format!(
            "archive format {} is not one this herald-server reads ({FORMAT}); use the herald-server that wrote it",
            format.format
        )));
    }
    serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{MANIFEST} is not a backup manifest: {e}")))
}

/// A name a backup may hold: a plain top-level file name, or `artifacts/<sha256>`.
fn is_member_name(name: &str) -> bool {
    if let Some(sha256) = name
        .strip_prefix(crate::api::releases::ARTIFACT_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
    {
        return is_sha256(sha256);
    }
    name != MANIFEST
        && !name.starts_with('.')
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

// === restore ===

/// Runs `restore FILE --data-dir DIR`.
pub fn restore(data_dir: Option<&Path>, args: RestoreArgs) -> Result<ExitCode, CliError> {
    let dir = data_dir.ok_or_else(|| {
        usage("restore needs --data-dir DIR: the directory to restore into (new or empty)")
    })?;
    let dir = std::path::absolute(dir).map_err(io_err("cannot resolve", dir))?;
    let (manifest, next_job) = restore_into(&args.file, &dir)?;
    println!(
        "restored {} into {}: schema v{}, backup taken {}",
        args.file.display(),
        dir.display(),
        manifest.schema_version,
        manifest.created_at
    );
    println!("  new job ids start at {next_job} (ids the old server may have used after the backup are skipped)");
    if !manifest.omitted.is_empty() {
        println!(
            "  {} artifacts were left out of the backup (--no-artifacts): copy them into {} (named by their SHA-256)",
            manifest.omitted.len(),
            dir.join(crate::api::releases::ARTIFACT_DIR).display()
        );
    }
    println!("Next: herald-server --data-dir {} serve", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn restore_into(file: &Path, dir: &Path) -> Result<(Manifest, i64)> {
    refuse_existing(dir)?;
    let staging = with_suffix(dir, ".restoring");
    if fs::symlink_metadata(&staging).is_ok() {
        return Err(ArchiveError::Refused(format!(
            "{} exists (an interrupted restore?); remove it and run restore again",
            staging.display()
        )));
    }
    herald_io::files::create_private_dir(&staging)
        .map_err(|e| io_err(e.action, &e.path)(e.source))?;
    let restored = (|| {
        let (manifest, check) = unpack(file, &staging, true)?;
        let known = store::latest_schema_version();
        if check.schema_version > known {
            return Err(ArchiveError::Refused(format!(
                "backup {} holds schema version {}, newer than this herald-server understands ({known}); restore it with a newer herald-server",
                file.display(),
                check.schema_version
            )));
        }
        let next_job = store::advance_job_ids(&staging.join(DB_FILE), RESTORE_JOB_ID_GAP)?;
        rebase_admin_config(&staging, &manifest.data_dir, dir)?;
        for path in [&staging, &staging.join(crate::api::releases::ARTIFACT_DIR)] {
            herald_io::files::sync_dir(path);
        }
        // Checked just now by refuse_existing; an empty directory gives way to the
        // restored one.
        if dir.is_dir() {
            fs::remove_dir(dir).map_err(io_err("cannot replace the empty directory", dir))?;
        }
        fs::rename(&staging, dir).map_err(io_err("cannot rename", &staging))?;
        if let Some(parent) = dir.parent() {
            herald_io::files::sync_dir(parent);
        }
        Ok((manifest, next_job))
    })();
    if restored.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    restored
}

/// Refuses a target that holds a database, or anything at all.
fn refuse_existing(dir: &Path) -> Result<()> {
    if fs::symlink_metadata(dir.join(DB_FILE)).is_ok() {
        return Err(ArchiveError::Refused(format!(
            "{} already holds a Herald database ({DB_FILE}); restore never overwrites one, \
             whether a server runs on it or not. Stop that server and move the directory \
             aside, or restore into a new directory",
            dir.display()
        )));
    }
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ArchiveError::Refused(format!(
                    "{} is not empty; restore only into a new or empty directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(ArchiveError::Refused(format!(
            "{} is a file, not a directory",
            dir.display()
        ))),
        Err(e) => Err(io_err("cannot read", dir)(e)),
    }
}

/// Points `admin.toml`'s CA and operator key paths, when they were inside the old data
/// directory, into the new one (`init` writes them absolute).
fn rebase_admin_config(staging: &Path, old: &Path, new: &Path) -> Result<()> {
    let path = staging.join(config::ADMIN_CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let invalid = |e: config::ConfigError| ArchiveError::Invalid {
        file: path.clone(),
        problems: vec![e.to_string()],
    };
    let mut admin: AdminConfig = config::load_toml(&path).map_err(invalid)?;
    let mut changed = false;
    for file in [&mut admin.ca_cert, &mut admin.operator_key] {
        if let Ok(rest) = file.strip_prefix(old) {
            *file = new.join(rest);
            changed = true;
        }
    }
    if changed && old != new {
        config::save_toml(&path, &admin).map_err(invalid)?;
    }
    Ok(())
}

// === helpers ===

/// A reader that hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A new file with mode 0600 (replacing one left over).
fn private_file(path: &Path) -> Result<File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path).map_err(io_err("cannot create", path))?;
    // `mode` only applies to a new file; an old one keeps its mode unless told.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot set the mode of", path))?;
    }
    Ok(file)
}

/// `path` with `suffix` appended to its file name (`FILE` -> `FILE.tmp`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A private scratch directory, removed with everything in it when dropped.
struct Staging(PathBuf);

impl Staging {
    fn new(path: &Path) -> Result<Staging> {
        let _ = fs::remove_dir_all(path);
        herald_io::files::create_private_dir(path)
            .map_err(|e| io_err(e.action, &e.path)(e.source))?;
        Ok(Staging(path.to_path_buf()))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_stay_inside_the_data_directory() {
        for good in [
            "herald.db",
            "ca.pem",
            "operator.key",
            "artifacts/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_member_name(good), "{good}");
        }
        for bad in [
            "",
            "../herald.db",
            "/etc/passwd",
            "a/b",
            ".hidden",
            "..",
            "manifest.json",
            "artifacts/../../x",
            "artifacts/0123",
            "artifacts/0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_member_name(bad), "{bad}");
        }
    }

    #[test]
    fn suffixes_append_to_the_whole_name() {
        assert_eq!(
            with_suffix(Path::new("/b/herald.tar"), ".tmp"),
            PathBuf::from("/b/herald.tar.tmp")
        );
        assert_eq!(
            with_suffix(Path::new("/var/lib/herald"), ".restoring"),
            PathBuf::from("/var/lib/herald.restoring")
        );
    }
}
