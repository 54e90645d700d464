//! The agent replacing its own binary, and putting the previous one back if the new
//! version does not come back healthy.
//!
//! # Flow
//!
//! 1. [`begin`] (in the running agent, after the new binary was downloaded and
//!    verified): copies the running binary to `<state>/update/herald-agent.previous`,
//!    records the update in `<state>/update/pending.json` (state `trial`), starts the
//!    watchdog from that previous copy, swaps the new binary in with `self-replace` and
//!    re-executes the agent as the new binary (same pid, same arguments).
//! 2. The watchdog (`herald-agent update-watchdog`, [`watchdog`]) polls the record. If
//!    the agent process exits, or the deadline passes, before the record says
//!    `healthy`, it reverts: records `reverted`, copies the previous binary back over
//!    the agent's path, stops the agent, and (unless systemd restarts it) starts the
//!    restored agent with the recorded arguments.
//! 3. The new agent calls [`pending`] at start-up and [`confirm_healthy`] once it is
//!    back in touch with the server; the caller reports the job and calls [`finish`].
//!
//! # Who ends the trial
//!
//! The agent ([`confirm_healthy`]) and the watchdog (a revert) can try to end the same
//! trial at the same moment. Whoever ends it first writes the whole new record to a
//! temporary file and hard-links it to `verdict.json`: the link fails if the file
//! exists, so exactly one of them wins and the file is complete the moment it appears.
//! The winner then renames the temporary file over `pending.json`. Readers prefer
//! `verdict.json`, so a crash between the two steps loses nothing. Every write is a
//! rename of a fully written, fsynced file.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_shared::Millis;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use herald_io::files::{create_private_dir, io_error, remove_if_present, sync_dir, FileError};

/// Directory under the state directory that holds the self-update files.
pub const UPDATE_DIR: &str = "update";
/// The update record, under [`UPDATE_DIR`].
pub const PENDING_FILE: &str = "pending.json";
/// How the trial ended, created once by whoever ended it (see the module docs).
const VERDICT_FILE: &str = "verdict.json";
/// The copy of the binary that ran before the update, under [`UPDATE_DIR`].
pub const PREVIOUS_FILE: &str = "herald-agent.previous";
/// Where a watchdog started without systemd writes its messages, under [`UPDATE_DIR`].
pub const WATCHDOG_LOG: &str = "watchdog.log";
/// The hidden subcommand that runs [`watchdog`].
pub const WATCHDOG_SUBCOMMAND: &str = "update-watchdog";
/// Appended to the agent's path for the restored copy before it is renamed into place.
const RESTORE_SUFFIX: &str = ".herald-restore";
/// Prefix of the transient systemd unit that runs the watchdog; the job id follows.
const WATCHDOG_UNIT_PREFIX: &str = "herald-agent-update-watchdog-";
/// Set by systemd for the processes of a unit; its stop and restart kill the whole cgroup.
const SYSTEMD_MARKER_ENV: &str = "INVOCATION_ID";
/// How often the watchdog looks at the record and the agent process.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the agent must look gone before the watchdog believes it. An exec from a
/// thread other than the main one leaves the old thread-group leader a zombie for a
/// moment, which `/proc` shows as the process itself.
const GONE_FOR: Duration = Duration::from_millis(800);
/// How long a stopped agent gets between `SIGTERM` and `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for a `SIGKILL`ed agent to disappear.
const KILL_WAIT: Duration = Duration::from_secs(1);
/// Attempts to exec a binary that another process still briefly holds open for writing
/// (`ETXTBSY`: a concurrent fork inherited the write descriptor until its own exec).
const EXEC_ATTEMPTS: u32 = 5;
/// Pause between those attempts.
const EXEC_RETRY: Duration = Duration::from_millis(100);
/// Stands in for a trial deadline that `Instant` cannot represent.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The agent's build version: the code that is running now (the one being replaced,
/// during an update).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
const RUNNING_VERSION: &str = AGENT_VERSION;

/// Something that went wrong while updating the agent's own binary.
#[derive(Debug, thiserror::Error)]
pub enum SelfUpdateError {
    /// The path of the running binary could not be determined.
    #[error("cannot find the running herald-agent binary: {0}")]
    CurrentExe(#[source] io::Error),
    /// An argument of the running agent is not UTF-8, so it cannot be recorded for the
    /// restart.
    #[error(
        "the agent was started with an argument that is not UTF-8 ({0:?}); \
         start it with UTF-8 arguments to update it"
    )]
    NonUtf8Argument(OsString),
    /// An earlier self-update has not ended yet.
    #[error(
        "the update to {to_version} (job {job_id}) is still on trial; \
         wait until it is confirmed or reverted"
    )]
    StillOnTrial {
        /// The job of the earlier update.
        job_id: i64,
        /// The version it installed.
        to_version: String,
    },
    /// Creating the update directory failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The update record cannot be parsed.
    #[error(
        "{path} is not a valid self-update record ({source}); remove it to abandon the update"
    )]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The watchdog could not be started.
    #[error("cannot start the update watchdog {previous}: {reason}")]
    StartWatchdog {
        /// The binary the watchdog runs from.
        previous: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The new binary could not be put in place of the running one.
    #[error("cannot put {new_binary} in place of {exe}: {source}")]
    Replace {
        /// The verified new binary.
        new_binary: PathBuf,
        /// The agent's binary.
        exe: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Executing the (new or restored) agent binary failed.
    #[error("cannot start {exe}: {source}")]
    Exec {
        /// The agent's binary.
        exe: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The copy of the previous binary is gone, so there is nothing to revert to.
    #[error(
        "the previous binary {path} is missing, so the update cannot be reverted; \
         if the new version misbehaves, reinstall herald-agent by hand"
    )]
    PreviousMissing {
        /// Where the copy should be.
        path: PathBuf,
    },
    /// The watchdog was given a process id that cannot be signalled safely.
    #[error("{0} is not a valid process id for the agent")]
    InvalidPid(u32),
    /// Applying the update failed, and so did putting things back.
    #[error("{error}; undoing the update also failed: {undo}")]
    UndoFailed {
        /// Why the update failed.
        error: Box<SelfUpdateError>,
        /// Why undoing it failed.
        undo: Box<SelfUpdateError>,
    },
}

/// The record of a self-update, `<state>/update/pending.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The job that asked for the update.
    pub job_id: i64,
    /// The version that started the update.
    pub from_version: String,
    /// The version being installed.
    pub to_version: String,
    /// SHA-256 (hex) of the new binary: the agent that confirms must be running it.
    #[serde(default)]
    pub to_sha256: String,
    /// The agent's binary (canonical path), replaced by the new version.
    pub exe: PathBuf,
    /// The copy of the binary that ran before the update.
    pub previous: PathBuf,
    /// The agent's arguments, `argv[0]` included, used to start it again.
    pub argv: Vec<String>,
    /// The agent's process id (kept across the re-exec).
    pub pid: u32,
    /// When the update began (unix ms).
    pub started_at: Millis,
    /// When the new version must have reported healthy (unix ms).
    pub deadline_at: Millis,
    /// The agent runs under systemd, which restarts it after a revert.
    #[serde(default)]
    pub under_systemd: bool,
    /// Where the update stands.
    #[serde(flatten)]
    pub state: PendingState,
}

/// Where a self-update stands (`"state"` in the record; `"reason"` goes with `reverted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PendingState {
    /// The new version runs and has not yet reported healthy.
    Trial,
    /// The new version reported healthy; it stays.
    Healthy,
    /// The previous version was put back.
    Reverted {
        /// Why, for the job's result.
        reason: String,
    },
}

/// How [`watchdog`] behaves after a revert.
#[derive(Debug, Clone, Copy)]
pub struct WatchdogOptions {
    /// Start the restored agent by executing it in place of the watchdog, unless the
    /// record says systemd restarts it. Tests turn this off.
    pub exec_after_revert: bool,
}

/// Swaps in `new_binary`, keeps the previous binary, starts a watchdog, and re-executes
/// the agent (same pid, same argv) as the new binary. Only returns on failure (after
/// undoing what it did: the previous binary is back and the record says `reverted`
/// with the reason, for the caller to report before calling [`finish`]).
///
/// Blocks (file copies, process starts); `new_binary` must already be verified.
pub fn begin(
    state_dir: &Path,
    new_binary: &Path,
    job_id: i64,
    to_version: &str,
    health_deadline: Duration,
) -> SelfUpdateError {
    let to_sha256 = match file_sha256(new_binary) {
        Ok(hash) => hash,
        Err(e) => return e,
    };
    match Attempt::prepare(state_dir, job_id, to_version, &to_sha256, health_deadline) {
        Ok(mut attempt) => {
            let error = attempt.swap_and_exec(new_binary);
            attempt.undo(error)
        }
        Err(error) => error,
    }
}

/// What a starting agent finds: the record of the last self-update, until [`finish`].
/// An unreadable record is logged and reported as none.
pub fn pending(state_dir: &Path) -> Option<Pending> {
    read_current(&state_dir.join(UPDATE_DIR)).unwrap_or_else(|e| {
        tracing::warn!("ignoring the self-update record: {e}");
        None
    })
}

/// Called once the (new) agent has reconnected to the server and got its Welcome:
/// `trial` becomes `healthy` (the watchdog sees it and exits). Returns the record so the
/// caller can report the job.
///
/// If the record is already `reverted` (the watchdog was faster), it is returned
/// unchanged: the binary on disk is the previous version again and the caller should
/// exit so that it is restarted. If the agent binary on disk is not the new one (the
/// swap did not survive a crash), the trial ends as `reverted` instead. The check is by
/// hash, not by version: the version is what the operator called the release.
pub fn confirm_healthy(state_dir: &Path) -> Result<Option<Pending>, SelfUpdateError> {
    let update_dir = state_dir.join(UPDATE_DIR);
    let Some(current) = read_current(&update_dir)? else {
        return Ok(None);
    };
    if current.state != PendingState::Trial {
        return Ok(Some(current));
    }
    let running = std::env::current_exe()
        .map_err(SelfUpdateError::CurrentExe)
        .and_then(|exe| file_sha256(&exe));
    let next = match running {
        Ok(hash) if current.to_sha256.is_empty() || hash == current.to_sha256 => {
            PendingState::Healthy
        }
        Ok(hash) => PendingState::Reverted {
            reason: format!(
                "the agent binary on disk (sha256 {hash}) is not version {} (sha256 {})",
                current.to_version, current.to_sha256
            ),
        },
        Err(e) => PendingState::Reverted {
            reason: format!("cannot check the agent binary: {e}"),
        },
    };
    Ok(end_trial(&update_dir, next)?.record())
}

/// Called after the caller has recorded the job's result: removes the record (keeps
/// `herald-agent.previous`).
pub fn finish(state_dir: &Path) -> Result<(), SelfUpdateError> {
    let update_dir = state_dir.join(UPDATE_DIR);
    // pending.json first: a crash in between leaves the verdict, which is reported again
    // rather than a stale `trial` that nobody watches.
    remove_if_present(&update_dir.join(PENDING_FILE))?;
    remove_if_present(&update_dir.join(VERDICT_FILE))?;
    sync_dir(&update_dir);
    Ok(())
}

/// The hidden `herald-agent update-watchdog --state-dir D --pid P` subcommand: watches
/// the trial of the agent process `pid` and reverts it if the agent exits or the
/// deadline passes first. Returns when the trial has ended; after a revert with
/// [`WatchdogOptions::exec_after_revert`] it becomes the restored agent instead.
///
/// Exits quietly when there is no record, the trial has already ended, or the record
/// belongs to another process. The deadline is measured on the monotonic clock from the
/// watchdog's start, so a clock step does not move it.
pub fn watchdog(
    state_dir: &Path,
    pid: u32,
    options: WatchdogOptions,
) -> Result<(), SelfUpdateError> {
    let raw = i32::try_from(pid)
        .ok()
        .filter(|raw| *raw > 0)
        .ok_or(SelfUpdateError::InvalidPid(pid))?;
    let agent = Process::watch(Pid::from_raw(raw));
    let update_dir = state_dir.join(UPDATE_DIR);
    let Some(first) = read_current(&update_dir)? else {
        tracing::info!("no self-update pending; nothing to watch");
        return Ok(());
    };
    if first.pid != pid {
        tracing::warn!(
            "the self-update record is for process {}, not {pid}; not watching",
            first.pid
        );
        return Ok(());
    }
    let remaining =
        u64::try_from(first.deadline_at.saturating_sub(herald_io::now_ms())).unwrap_or(0);
    let now = Instant::now();
    // A deadline too far away to represent is as good as none.
    let deadline = now
        .checked_add(Duration::from_millis(remaining))
        .unwrap_or(now + FAR_FUTURE);
    let mut gone_since: Option<Instant> = None;
    loop {
        let Some(current) = read_current(&update_dir)? else {
            tracing::info!("the self-update record is gone; stopping");
            return Ok(());
        };
        if current.state != PendingState::Trial {
            tracing::info!(state = ?current.state, "the self-update trial has ended");
            return Ok(());
        }
        let now = Instant::now();
        if agent.is_alive() {
            gone_since = None;
        } else {
            gone_since.get_or_insert(now);
        }
        let reason = if gone_since.is_some_and(|since| now.duration_since(since) >= GONE_FOR) {
            format!(
                "the new version ({}) exited before reporting healthy",
                current.to_version
            )
        } else if now >= deadline {
            let seconds = current
                .deadline_at
                .saturating_sub(current.started_at)
                .max(0)
                / 1000;
            format!(
                "the new version ({}) did not report healthy within {seconds} s",
                current.to_version
            )
        } else {
            let pause = if gone_since.is_some() {
                POLL_INTERVAL / 4
            } else {
                POLL_INTERVAL
            };
            std::thread::sleep(pause.min(deadline.saturating_duration_since(now)));
            continue;
        };
        return revert(&update_dir, &current, reason, &agent, options);
    }
}

// === impl Attempt ===

/// One run of [`begin`], remembering what to undo.
struct Attempt {
    state_dir: PathBuf,
    update_dir: PathBuf,
    record: Pending,
    watchdog: Option<WatchdogHandle>,
    replaced: bool,
}

impl Attempt {
    /// Steps 1 and 2: keep the previous binary and write the record.
    fn prepare(
        state_dir: &Path,
        job_id: i64,
        to_version: &str,
        to_sha256: &str,
        health_deadline: Duration,
    ) -> Result<Attempt, SelfUpdateError> {
        let exe = std::env::current_exe()
            .and_then(|exe| exe.canonicalize())
            .map_err(SelfUpdateError::CurrentExe)?;
        let argv = std::env::args_os()
            .map(|arg| arg.into_string().map_err(SelfUpdateError::NonUtf8Argument))
            .collect::<Result<Vec<_>, _>>()?;
        let update_dir = state_dir.join(UPDATE_DIR);
        if let Some(current) = read_current(&update_dir)? {
            match current.state {
                PendingState::Trial => {
                    return Err(SelfUpdateError::StillOnTrial {
                        job_id: current.job_id,
                        to_version: current.to_version,
                    })
                }
                _ => tracing::warn!(
                    job_id = current.job_id,
                    "replacing a self-update record that was never finished"
                ),
            }
        }
        create_private_dir(&update_dir)?;
        fs::set_permissions(&update_dir, Permissions::from_mode(0o700))
            .map_err(io_error("cannot set the mode of", &update_dir))?;
        let previous = update_dir.join(PREVIOUS_FILE);
        copy_executable(&exe, &previous, &with_suffix(&previous, ".tmp"))?;
        let started_at = herald_io::now_ms();
        let window = Millis::try_from(health_deadline.as_millis()).unwrap_or(Millis::MAX);
        let record = Pending {
            job_id,
            from_version: RUNNING_VERSION.to_owned(),
            to_version: to_version.to_owned(),
            to_sha256: to_sha256.to_owned(),
            exe,
            previous,
            argv,
            pid: std::process::id(),
            started_at,
            deadline_at: started_at.saturating_add(window),
            under_systemd: std::env::var_os(SYSTEMD_MARKER_ENV).is_some(),
            state: PendingState::Trial,
        };
        remove_if_present(&update_dir.join(VERDICT_FILE))?;
        let tmp = write_temp(&update_dir, &record)?;
        publish(&tmp, &update_dir.join(PENDING_FILE))?;
        Ok(Attempt {
            state_dir: state_dir.to_path_buf(),
            update_dir,
            record,
            watchdog: None,
            replaced: false,
        })
    }

    /// Steps 3 to 5; returns only if something failed.
    fn swap_and_exec(&mut self, new_binary: &Path) -> SelfUpdateError {
        let record = &self.record;
        match start_watchdog(
            &record.previous,
            &self.state_dir,
            record.pid,
            record.job_id,
            record.under_systemd,
            &self.update_dir.join(WATCHDOG_LOG),
        ) {
            Ok(handle) => self.watchdog = Some(handle),
            Err(e) => return e,
        }
        if let Err(e) = fs::set_permissions(new_binary, Permissions::from_mode(0o755)) {
            return io_error("cannot set the mode of", new_binary)(e).into();
        }
        if let Err(source) = self_replace::self_replace(new_binary) {
            return SelfUpdateError::Replace {
                new_binary: new_binary.to_path_buf(),
                exe: record.exe.clone(),
                source,
            };
        }
        self.replaced = true;
        // self-replace renames without syncing the directory; a crash right after the
        // exec must not bring back the old binary while the record says `trial`.
        sync_dir(record.exe.parent().unwrap_or(Path::new("/")));
        tracing::info!(
            to_version = %record.to_version,
            "starting the new herald-agent binary"
        );
        exec_agent(&record.exe, &record.argv)
    }

    /// Puts things back after `error`, and returns the error to report.
    fn undo(self, error: SelfUpdateError) -> SelfUpdateError {
        tracing::error!("self-update to {} failed: {error}", self.record.to_version);
        let reason = format!(
            "the update to {} could not be applied: {error}",
            self.record.to_version
        );
        let mut failure = end_trial(&self.update_dir, PendingState::Reverted { reason }).err();
        if self.replaced {
            if let Err(e) = restore_previous(&self.record.previous, &self.record.exe) {
                failure.get_or_insert(e);
            }
        }
        if let Some(watchdog) = &self.watchdog {
            watchdog.stop();
        }
        match failure {
            None => error,
            Some(undo) => SelfUpdateError::UndoFailed {
                error: Box::new(error),
                undo: Box::new(undo),
            },
        }
    }
}

// === the record ===

/// How an attempt to end the trial went.
#[derive(Debug)]
enum TrialEnd {
    /// This call ended it; the record as written.
    Decided(Pending),
    /// It had already ended (or someone else was faster); the record as it stands.
    AlreadyEnded(Pending),
    /// There is no record.
    NoRecord,
}

impl TrialEnd {
    fn record(self) -> Option<Pending> {
        match self {
            TrialEnd::Decided(record) | TrialEnd::AlreadyEnded(record) => Some(record),
            TrialEnd::NoRecord => None,
        }
    }
}

/// Moves the record from `trial` to `next`, unless the trial has already ended.
fn end_trial(update_dir: &Path, next: PendingState) -> Result<TrialEnd, SelfUpdateError> {
    let Some(mut record) = read_current(update_dir)? else {
        return Ok(TrialEnd::NoRecord);
    };
    if record.state != PendingState::Trial {
        return Ok(TrialEnd::AlreadyEnded(record));
    }
    record.state = next;
    let tmp = write_temp(update_dir, &record)?;
    let verdict = update_dir.join(VERDICT_FILE);
    match fs::hard_link(&tmp, &verdict) {
        Ok(()) => {}
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Ok(read_current(update_dir)?
                    .map(TrialEnd::AlreadyEnded)
                    .unwrap_or(TrialEnd::NoRecord));
            }
            return Err(io_error("cannot create", &verdict)(e).into());
        }
    }
    publish(&tmp, &update_dir.join(PENDING_FILE))?;
    Ok(TrialEnd::Decided(record))
}

/// The record as it stands: the verdict if the trial has ended, else `pending.json`.
fn read_current(update_dir: &Path) -> Result<Option<Pending>, SelfUpdateError> {
    for name in [VERDICT_FILE, PENDING_FILE] {
        let path = update_dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => {
                return serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| SelfUpdateError::Corrupt { path, source });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot read", &path)(e).into()),
        }
    }
    Ok(None)
}

/// Writes `record` to a new, uniquely named, fsynced file in `update_dir`.
fn write_temp(update_dir: &Path, record: &Pending) -> Result<PathBuf, SelfUpdateError> {
    let tmp = update_dir.join(format!(
        "pending.{}.tmp",
        hex::encode(herald_io::random_bytes::<8>())
    ));
    let bytes = serde_json::to_vec_pretty(record).expect("the record serializes to JSON");
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut file, &bytes)?;
        file.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("cannot write", &tmp)(e)
    })?;
    Ok(tmp)
}

/// Renames `tmp` over `path` and makes the rename durable.
fn publish(tmp: &Path, path: &Path) -> Result<(), SelfUpdateError> {
    fs::rename(tmp, path).map_err(|e| {
        let _ = fs::remove_file(tmp);
        io_error("cannot replace", path)(e)
    })?;
    sync_dir(path.parent().unwrap_or(Path::new("/")));
    Ok(())
}

// === the revert ===

/// Ends the trial as reverted and puts the previous binary back; see [`watchdog`].
fn revert(
    update_dir: &Path,
    current: &Pending,
    reason: String,
    agent: &Process,
    options: WatchdogOptions,
) -> Result<(), SelfUpdateError> {
    // Checked before deciding: a `reverted` record over a binary that stays new would
    // be a lie, and with the copy gone nothing can be put back anyway.
    if !current.previous.is_file() {
        return Err(SelfUpdateError::PreviousMissing {
            path: current.previous.clone(),
        });
    }
    let record = match end_trial(update_dir, PendingState::Reverted { reason })? {
        TrialEnd::Decided(record) => record,
        TrialEnd::AlreadyEnded(_) | TrialEnd::NoRecord => return Ok(()),
    };
    if let PendingState::Reverted { reason } = &record.state {
        tracing::warn!(
            job_id = record.job_id,
            "reverting the self-update: {reason}"
        );
    }
    restore_previous(&record.previous, &record.exe)?;
    agent.stop();
    if options.exec_after_revert && !record.under_systemd {
        tracing::info!("starting the restored herald-agent {}", record.from_version);
        return Err(exec_agent(&record.exe, &record.argv));
    }
    Ok(())
}

/// Copies `previous` over `exe` atomically.
fn restore_previous(previous: &Path, exe: &Path) -> Result<(), SelfUpdateError> {
    copy_executable(previous, exe, &with_suffix(exe, RESTORE_SUFFIX)).map_err(|e| match e {
        SelfUpdateError::File(FileError { source, path, .. })
            if source.kind() == io::ErrorKind::NotFound && path == previous =>
        {
            SelfUpdateError::PreviousMissing { path }
        }
        e => e,
    })
}

/// Copies `from` to `tmp` (mode 0755, fsynced), then renames it over `to`.
fn copy_executable(from: &Path, to: &Path, tmp: &Path) -> Result<(), SelfUpdateError> {
    let mut source = File::open(from).map_err(io_error("cannot read", from))?;
    let _ = fs::remove_file(tmp);
    let mut copy = || -> io::Result<()> {
        let mut target = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(tmp)?;
        io::copy(&mut source, &mut target)?;
        // The mode given to open is reduced by the umask.
        target.set_permissions(Permissions::from_mode(0o755))?;
        target.sync_all()
    };
    copy().map_err(|e| {
        let _ = fs::remove_file(tmp);
        io_error("cannot write", tmp)(e)
    })?;
    publish(tmp, to)
}

/// Replaces this process with `exe` started with `argv`; returns only on failure.
fn exec_agent(exe: &Path, argv: &[String]) -> SelfUpdateError {
    let mut command = Command::new(exe);
    if let Some((arg0, args)) = argv.split_first() {
        command.arg0(arg0).args(args);
    }
    let mut attempt = 1;
    loop {
        let source = command.exec();
        if source.raw_os_error() != Some(Errno::ETXTBSY as i32) || attempt >= EXEC_ATTEMPTS {
            return SelfUpdateError::Exec {
                exe: exe.to_path_buf(),
                source,
            };
        }
        attempt += 1;
        std::thread::sleep(EXEC_RETRY);
    }
}

// === impl Process ===

/// The agent process as the watchdog sees it. Its start time (from `/proc`) tells it
/// apart from an unrelated process that later gets the same pid.
struct Process {
    pid: Pid,
    started: Option<u64>,
}

impl Process {
    fn watch(pid: Pid) -> Process {
        Process {
            pid,
            started: proc_stat(pid).map(|(_, started)| started),
        }
    }

    /// Zombies count as gone: they no longer run.
    fn is_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, started)) => {
                !matches!(state, 'Z' | 'X' | 'x') && self.started.is_none_or(|s| s == started)
            }
            None => !matches!(kill(self.pid, None), Err(Errno::ESRCH)),
        }
    }

    /// `SIGTERM`, then `SIGKILL` after [`STOP_GRACE`].
    fn stop(&self) {
        if !self.is_alive() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGTERM);
        if wait_until(STOP_GRACE, || !self.is_alive()) || !self.is_alive() {
            return;
        }
        tracing::warn!(pid = %self.pid, "the agent ignored SIGTERM; killing it");
        let _ = kill(self.pid, Signal::SIGKILL);
        wait_until(KILL_WAIT, || !self.is_alive());
    }
}

/// State letter and start time (clock ticks after boot) from `/proc/<pid>/stat`.
fn proc_stat(pid: Pid) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain any bytes.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the file; the first field after the name is field 3.
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// === starting the watchdog ===

/// A started watchdog, for stopping it when [`begin`] fails.
#[derive(Debug)]
enum WatchdogHandle {
    /// A detached process.
    Process(Pid),
    /// A transient systemd unit.
    Unit { name: String, user: bool },
}

impl WatchdogHandle {
    /// Stops the watchdog. It would also exit by itself on seeing the trial ended; this
    /// is belt and braces.
    fn stop(&self) {
        match self {
            WatchdogHandle::Process(pid) => {
                // Only if the pid still is a watchdog, not a recycled pid.
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == WATCHDOG_SUBCOMMAND.as_bytes())
                {
                    let _ = kill(*pid, Signal::SIGTERM);
                }
            }
            WatchdogHandle::Unit { name, user } => {
                let mut command = Command::new("systemctl");
                if *user {
                    command.arg("--user");
                }
                let _ = command
                    .args(["stop", "--no-block", name])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Starts `<previous> update-watchdog --state-dir <state_dir> --pid <pid>` so that it
/// outlives the agent: as a transient systemd unit when the agent runs under systemd
/// (whose stop and restart kill the agent's whole cgroup), else as a detached process in
/// its own process group, reparented to init, with its messages in `log`.
fn start_watchdog(
    previous: &Path,
    state_dir: &Path,
    pid: u32,
    job_id: i64,
    under_systemd: bool,
    log: &Path,
) -> Result<WatchdogHandle, SelfUpdateError> {
    let mut args: Vec<OsString> = vec![
        previous.into(),
        WATCHDOG_SUBCOMMAND.into(),
        "--state-dir".into(),
        state_dir.into(),
        "--pid".into(),
        pid.to_string().into(),
    ];
    if under_systemd {
        let name = format!("{WATCHDOG_UNIT_PREFIX}{job_id}");
        let user = fs::read_to_string("/proc/self/cgroup").is_ok_and(|c| c.contains("/user@"));
        let mut command = Command::new("systemd-run");
        if user {
            command.arg("--user");
        }
        let status = command
            .args(["--collect", "--quiet", "--unit", &name, "--"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => return Ok(WatchdogHandle::Unit { name, user }),
            Ok(status) => tracing::warn!("systemd-run failed ({status}); starting the watchdog directly, where a restart of the service would stop it"),
            Err(e) => tracing::warn!("cannot run systemd-run ({e}); starting the watchdog directly, where a restart of the service would stop it"),
        }
    }
    let failed = |reason: String| SelfUpdateError::StartWatchdog {
        previous: previous.to_path_buf(),
        reason,
    };
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| failed(format!("cannot open {}: {e}", log.display())))?;
    // A shell that starts the watchdog in the background and exits: the watchdog is
    // reparented to init (no zombie left with the agent) and stays in the shell's own
    // process group, away from signals sent to the agent's group.
    args.insert(0, "sh".into());
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#""$@" </dev/null >/dev/null & echo $!"#)
        .args(&args)
        .stdin(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .output()
        .map_err(|e| failed(format!("cannot run /bin/sh: {e}")))?;
    if !output.status.success() {
        return Err(failed(format!("/bin/sh {}", output.status)));
    }
    let watchdog_pid = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse::<i32>()
        .map_err(|e| failed(format!("no process id from /bin/sh: {e}")))?;
    Ok(WatchdogHandle::Process(Pid::from_raw(watchdog_pid)))
}

// === helpers ===

fn file_sha256(path: &Path) -> Result<String, SelfUpdateError> {
    use sha2::Digest;
    let mut file = File::open(path).map_err(io_error("cannot read", path))?;
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_error("cannot read", path))?;
    Ok(hex::encode(hasher.finalize()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Child;

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir()
                .join(format!("herald-selfupdate-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A record on trial for process `pid`, with `exe` holding "NEW" and the previous
    /// copy holding "OLD".
    fn trial(state_dir: &Path, pid: u32, window: Duration) -> Pending {
        let update_dir = state_dir.join(UPDATE_DIR);
        create_private_dir(&update_dir).unwrap();
        let bin = state_dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("herald-agent");
        fs::write(&exe, "NEW").unwrap();
        let previous = update_dir.join(PREVIOUS_FILE);
        fs::write(&previous, "OLD").unwrap();
        let now = herald_io::now_ms();
        let record = Pending {
            job_id: 42,
            from_version: "0.0.1".into(),
            to_version: RUNNING_VERSION.into(),
            to_sha256: String::new(),
            exe,
            previous,
            argv: vec![
                "herald-agent".into(),
                "run".into(),
                "--state-dir".into(),
                state_dir.join("with space").display().to_string(),
            ],
            pid,
            started_at: now,
            deadline_at: now + window.as_millis() as Millis,
            under_systemd: false,
            state: PendingState::Trial,
        };
        let tmp = write_temp(&update_dir, &record).unwrap();
        publish(&tmp, &update_dir.join(PENDING_FILE)).unwrap();
        record
    }

    fn reverted_reason(state_dir: &Path) -> String {
        match pending(state_dir).expect("a record").state {
            PendingState::Reverted { reason } => reason,
            state => panic!("expected reverted, found {state:?}"),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Writes an executable script through a child process, so that no descriptor of
    /// ours open for writing can leak into a process that another test forks at the
    /// same moment (which would make executing the script fail with ETXTBSY).
    fn write_script(path: &Path, body: &str) {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"cat > "$1.tmp" && chmod 755 "$1.tmp" && mv "$1.tmp" "$1""#)
            .arg("sh")
            .arg(path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        io::Write::write_all(&mut child.stdin.take().unwrap(), body.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }

    /// A script that writes its arguments, one a line, to `marker`.
    fn argv_recorder(marker: &Path) -> String {
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > '{0}.tmp'\nmv '{0}.tmp' '{0}'\n",
            marker.display()
        )
    }

    fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("process {} did not exit within {timeout:?}", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    const NO_EXEC: WatchdogOptions = WatchdogOptions {
        exec_after_revert: false,
    };

    #[test]
    fn trial_ends_healthy_once_confirmed_and_finish_removes_the_record() {
        let scratch = Scratch::new("confirm");
        assert_eq!(pending(&scratch.0), None);
        assert_eq!(confirm_healthy(&scratch.0).unwrap(), None);
        let record = trial(&scratch.0, 1, Duration::from_secs(60));
        assert_eq!(pending(&scratch.0), Some(record.clone()));

        let confirmed = confirm_healthy(&scratch.0).unwrap().unwrap();
        assert_eq!(confirmed.state, PendingState::Healthy);
        assert_eq!(confirmed.job_id, record.job_id);
        assert_eq!(pending(&scratch.0), Some(confirmed.clone()));
        // Both files say the same once the trial has ended.
        let file = fs::read(scratch.0.join(UPDATE_DIR).join(PENDING_FILE)).unwrap();
        assert_eq!(serde_json::from_slice::<Pending>(&file).unwrap(), confirmed);
        // Confirming again changes nothing.
        assert_eq!(confirm_healthy(&scratch.0).unwrap(), Some(confirmed));

        finish(&scratch.0).unwrap();
        assert_eq!(pending(&scratch.0), None);
        assert!(scratch.0.join(UPDATE_DIR).join(PREVIOUS_FILE).exists());
        finish(&scratch.0).unwrap();
    }

    #[test]
    fn confirm_after_a_revert_returns_the_revert_unchanged() {
        let scratch = Scratch::new("confirm-reverted");
        trial(&scratch.0, 1, Duration::from_secs(60));
        let reverted = PendingState::Reverted {
            reason: "because".into(),
        };
        end_trial(&scratch.0.join(UPDATE_DIR), reverted.clone()).unwrap();
        let record = confirm_healthy(&scratch.0).unwrap().unwrap();
        assert_eq!(record.state, reverted);
        assert_eq!(pending(&scratch.0).unwrap().state, reverted);
    }

    #[test]
    fn confirm_from_another_binary_than_the_new_one_reverts() {
        let scratch = Scratch::new("confirm-version");
        let mut record = trial(&scratch.0, 1, Duration::from_secs(60));
        record.to_version = "999.0.0".into();
        record.to_sha256 = "00".repeat(32);
        let update_dir = scratch.0.join(UPDATE_DIR);
        publish(
            &write_temp(&update_dir, &record).unwrap(),
            &update_dir.join(PENDING_FILE),
        )
        .unwrap();
        confirm_healthy(&scratch.0).unwrap();
        let reason = reverted_reason(&scratch.0);
        assert!(
            reason.contains("999.0.0") && reason.contains(&"00".repeat(32)),
            "{reason}"
        );
    }

    #[test]
    fn the_record_is_plain_json_with_a_state_tag() {
        let scratch = Scratch::new("format");
        trial(&scratch.0, 7, Duration::from_secs(60));
        end_trial(
            &scratch.0.join(UPDATE_DIR),
            PendingState::Reverted {
                reason: "why".into(),
            },
        )
        .unwrap();
        let text = fs::read_to_string(scratch.0.join(UPDATE_DIR).join(PENDING_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["state"], "reverted");
        assert_eq!(value["reason"], "why");
        assert_eq!(value["job_id"], 42);
        assert_eq!(value["pid"], 7);
        assert_eq!(value["argv"][1], "run");
        assert_eq!(mode(&scratch.0.join(UPDATE_DIR).join(PENDING_FILE)), 0o600);
    }

    #[test]
    fn a_racing_confirm_and_revert_end_the_trial_exactly_once() {
        let scratch = Scratch::new("race");
        for round in 0..20 {
            finish(&scratch.0).unwrap();
            trial(&scratch.0, 1, Duration::from_secs(60));
            let update_dir = scratch.0.join(UPDATE_DIR);
            let results: Vec<(bool, PendingState)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6)
                    .map(|i| {
                        let update_dir = &update_dir;
                        s.spawn(move || {
                            let next = if i % 2 == 0 {
                                PendingState::Healthy
                            } else {
                                PendingState::Reverted {
                                    reason: format!("thread {i}"),
                                }
                            };
                            match end_trial(update_dir, next).unwrap() {
                                TrialEnd::Decided(r) => (true, r.state),
                                TrialEnd::AlreadyEnded(r) => (false, r.state),
                                TrialEnd::NoRecord => panic!("record vanished"),
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners = results.iter().filter(|(won, _)| *won).count();
            assert_eq!(winners, 1, "round {round}: {results:?}");
            let final_state = pending(&scratch.0).unwrap().state;
            assert!(
                results.iter().all(|(_, state)| *state == final_state),
                "round {round}: {results:?}"
            );
            // No temporary files are left behind.
            let names: Vec<_> = fs::read_dir(&update_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(names.is_empty(), "{names:?}");
        }
    }

    #[test]
    fn watchdog_reverts_when_the_new_version_never_reports_healthy() {
        let scratch = Scratch::new("deadline");
        let mut agent = sleeper();
        let record = trial(&scratch.0, agent.id(), Duration::from_secs(1));
        let started = Instant::now();
        watchdog(&scratch.0, agent.id(), NO_EXEC).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "OLD");
        assert_eq!(mode(&record.exe), 0o755);
        assert!(!with_suffix(&record.exe, RESTORE_SUFFIX).exists());
        let status = wait_for_exit(&mut agent, Duration::from_secs(5));
        assert!(!status.success(), "the agent was stopped by a signal");
        let reason = reverted_reason(&scratch.0);
        assert_eq!(
            reason,
            format!("the new version ({RUNNING_VERSION}) did not report healthy within 1 s")
        );
    }

    #[test]
    fn watchdog_reverts_promptly_when_the_new_version_exits() {
        let scratch = Scratch::new("exited");
        let mut agent = Command::new("true").spawn().unwrap();
        let pid = agent.id();
        agent.wait().unwrap();
        let record = trial(&scratch.0, pid, Duration::from_secs(20));
        let started = Instant::now();
        watchdog(&scratch.0, pid, NO_EXEC).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "OLD");
        assert_eq!(
            reverted_reason(&scratch.0),
            format!("the new version ({RUNNING_VERSION}) exited before reporting healthy")
        );
    }

    #[test]
    fn watchdog_leaves_a_confirmed_update_alone() {
        let scratch = Scratch::new("healthy");
        let mut agent = sleeper();
        let record = trial(&scratch.0, agent.id(), Duration::from_secs(20));
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                confirm_healthy(&scratch.0).unwrap();
            });
            watchdog(&scratch.0, agent.id(), NO_EXEC).unwrap();
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "NEW");
        assert_eq!(pending(&scratch.0).unwrap().state, PendingState::Healthy);
        assert!(agent.try_wait().unwrap().is_none(), "the agent still runs");
        agent.kill().unwrap();
        agent.wait().unwrap();
    }

    #[test]
    fn watchdog_exits_quietly_without_a_trial_for_its_process() {
        let scratch = Scratch::new("quiet");
        watchdog(&scratch.0, 12345, NO_EXEC).unwrap();
        // A record for another process: not ours to revert, even past its deadline.
        let record = trial(&scratch.0, 1, Duration::ZERO);
        watchdog(&scratch.0, 2, NO_EXEC).unwrap();
        assert_eq!(pending(&scratch.0), Some(record.clone()));
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "NEW");
        assert!(matches!(
            watchdog(&scratch.0, 0, NO_EXEC),
            Err(SelfUpdateError::InvalidPid(0))
        ));
        assert!(matches!(
            watchdog(&scratch.0, u32::MAX, NO_EXEC),
            Err(SelfUpdateError::InvalidPid(_))
        ));
    }

    #[test]
    fn watchdog_without_the_previous_binary_says_so_and_changes_nothing() {
        let scratch = Scratch::new("no-previous");
        let mut agent = sleeper();
        let record = trial(&scratch.0, agent.id(), Duration::ZERO);
        fs::remove_file(&record.previous).unwrap();
        let error = watchdog(&scratch.0, agent.id(), NO_EXEC).unwrap_err();
        assert!(matches!(error, SelfUpdateError::PreviousMissing { .. }));
        assert!(error.to_string().contains(PREVIOUS_FILE), "{error}");
        assert_eq!(pending(&scratch.0), Some(record.clone()));
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "NEW");
        assert!(agent.try_wait().unwrap().is_none());
        agent.kill().unwrap();
        agent.wait().unwrap();
    }

    #[test]
    fn a_corrupt_record_is_reported_with_its_path() {
        let scratch = Scratch::new("corrupt");
        let update_dir = scratch.0.join(UPDATE_DIR);
        create_private_dir(&update_dir).unwrap();
        fs::write(update_dir.join(PENDING_FILE), "{ not json").unwrap();
        assert_eq!(pending(&scratch.0), None);
        let error = watchdog(&scratch.0, 1, NO_EXEC).unwrap_err();
        assert!(matches!(error, SelfUpdateError::Corrupt { .. }));
        assert!(error.to_string().contains(PENDING_FILE), "{error}");
    }

    #[test]
    fn the_watchdog_starts_detached_with_its_arguments() {
        let scratch = Scratch::new("start");
        let marker = scratch.0.join("marker");
        let previous = scratch.0.join("previous");
        // Records its arguments, its process group, and where stdin and stdout go.
        write_script(
            &previous,
            &format!(
                "#!/bin/sh\nout=$(readlink /proc/$$/fd/1)\n\
                 {{ for a in \"$@\"; do printf '%s\\n' \"$a\"; done; \
                 echo $$; cut -d' ' -f5 /proc/$$/stat; readlink /proc/$$/fd/0; \
                 echo \"$out\"; }} > '{0}.tmp'\nmv '{0}.tmp' '{0}'\n",
                marker.display()
            ),
        );
        let log = scratch.0.join(WATCHDOG_LOG);
        let handle = start_watchdog(&previous, &scratch.0, 4321, 9, false, &log).unwrap();
        let WatchdogHandle::Process(pid) = handle else {
            panic!("started as {handle:?}");
        };
        assert!(wait_until(Duration::from_secs(10), || marker.exists()));
        let lines: Vec<String> = fs::read_to_string(&marker)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let state_dir = scratch.0.display().to_string();
        assert_eq!(
            lines[..4],
            [WATCHDOG_SUBCOMMAND, "--state-dir", &state_dir, "--pid"]
        );
        assert_eq!(lines[4], "4321");
        assert_eq!(lines[5], pid.to_string(), "the handle names the watchdog");
        assert_ne!(lines[6], nix::unistd::getpgrp().to_string());
        assert_eq!(lines[7], "/dev/null");
        assert_eq!(lines[8], "/dev/null");
        assert_eq!(mode(&log), 0o600);
    }

    #[test]
    fn undoing_a_failed_begin_restores_the_binary_and_stops_the_watchdog() {
        let scratch = Scratch::new("undo");
        let record = trial(&scratch.0, std::process::id(), Duration::from_secs(60));
        // A stand-in watchdog whose command line names the subcommand.
        let mut stand_in = Command::new("/bin/sh")
            .args([
                "-c",
                "while :; do sleep 0.1; done",
                "sh",
                WATCHDOG_SUBCOMMAND,
            ])
            .spawn()
            .unwrap();
        let stand_in_pid = Pid::from_raw(stand_in.id() as i32);
        let attempt = Attempt {
            state_dir: scratch.0.clone(),
            update_dir: scratch.0.join(UPDATE_DIR),
            record: record.clone(),
            watchdog: Some(WatchdogHandle::Process(stand_in_pid)),
            replaced: true,
        };
        let error = attempt.undo(SelfUpdateError::Exec {
            exe: record.exe.clone(),
            source: io::Error::from_raw_os_error(Errno::ENOEXEC as i32),
        });
        assert!(matches!(error, SelfUpdateError::Exec { .. }), "{error}");
        assert_eq!(fs::read_to_string(&record.exe).unwrap(), "OLD");
        let reason = reverted_reason(&scratch.0);
        assert!(reason.contains("could not be applied"), "{reason}");
        assert!(!wait_for_exit(&mut stand_in, Duration::from_secs(5)).success());
    }

    /// Environment for [`child_process`]: what to do.
    const ROLE_ENV: &str = "HERALD_SELFUPDATE_TEST_ROLE";
    /// Environment for [`child_process`]: the scratch (state) directory.
    const DIR_ENV: &str = "HERALD_SELFUPDATE_TEST_DIR";
    /// Environment for [`child_process`]: the agent pid or the new binary.
    const ARG_ENV: &str = "HERALD_SELFUPDATE_TEST_ARG";

    /// Not a test of its own: other tests run the test binary again with only this test
    /// selected, to be a watchdog or an updating agent in a process that may exec.
    #[test]
    #[ignore = "run as a child process by other tests"]
    fn child_process() {
        let (Some(role), Some(dir), Some(arg)) = (
            std::env::var_os(ROLE_ENV),
            std::env::var_os(DIR_ENV),
            std::env::var_os(ARG_ENV),
        ) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let error = match role.to_str() {
            Some("watchdog") => {
                let pid = arg.to_str().unwrap().parse().unwrap();
                let options = WatchdogOptions {
                    exec_after_revert: true,
                };
                watchdog(&dir, pid, options).err()
            }
            Some("begin") => Some(begin(
                &dir,
                Path::new(&arg),
                42,
                "9.9.9",
                Duration::from_secs(60),
            )),
            _ => panic!("unknown role {role:?}"),
        };
        // Only reached when there was no exec.
        fs::write(dir.join("child-error"), format!("{error:?}")).unwrap();
    }

    /// Runs [`child_process`] in `program` (a test binary) and waits for it.
    fn run_child(program: &Path, role: &str, dir: &Path, arg: &OsString) -> Vec<String> {
        let args = [
            "--exact",
            "selfupdate::tests::child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut child = Command::new(program)
            .args(args)
            .env(ROLE_ENV, role)
            .env(DIR_ENV, dir)
            .env(ARG_ENV, arg)
            .env_remove(SYSTEMD_MARKER_ENV)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let status = wait_for_exit(&mut child, Duration::from_secs(60));
        assert!(status.success(), "child {role}: {status}");
        args.map(str::to_owned).to_vec()
    }

    #[test]
    fn after_a_revert_the_watchdog_becomes_the_restored_agent_with_the_saved_argv() {
        let scratch = Scratch::new("exec");
        let mut agent = Command::new("true").spawn().unwrap();
        let pid = agent.id();
        agent.wait().unwrap();
        let record = trial(&scratch.0, pid, Duration::from_secs(20));
        let marker = scratch.0.join("marker");
        write_script(&record.previous, &argv_recorder(&marker));

        let test_binary = std::env::current_exe().unwrap();
        run_child(
            &test_binary,
            "watchdog",
            &scratch.0,
            &pid.to_string().into(),
        );

        let error = scratch.0.join("child-error");
        assert!(!error.exists(), "{}", fs::read_to_string(&error).unwrap());
        let recorded = fs::read_to_string(&marker).unwrap();
        assert_eq!(recorded.lines().collect::<Vec<_>>(), record.argv[1..]);
        assert_eq!(mode(&record.exe), 0o755);
        assert!(reverted_reason(&scratch.0).contains("exited before reporting healthy"));
    }

    /// Copies the test binary, so that the copy can be replaced by [`begin`]. With `cp`,
    /// for the reason given at [`write_script`].
    fn copy_of_the_test_binary(scratch: &Scratch) -> PathBuf {
        let copy = scratch.0.join("bin").join("herald-agent");
        fs::create_dir_all(copy.parent().unwrap()).unwrap();
        let status = Command::new("cp")
            .arg(std::env::current_exe().unwrap())
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        copy
    }

    #[test]
    fn begin_keeps_the_previous_binary_and_reexecutes_as_the_new_one() {
        let scratch = Scratch::new("begin");
        let agent = copy_of_the_test_binary(&scratch);
        let marker = scratch.0.join("marker");
        let new_binary = scratch.0.join("new-binary");
        write_script(&new_binary, &argv_recorder(&marker));
        fs::set_permissions(&new_binary, Permissions::from_mode(0o600)).unwrap();

        let argv = run_child(&agent, "begin", &scratch.0, &new_binary.clone().into());

        let error = scratch.0.join("child-error");
        assert!(!error.exists(), "{}", fs::read_to_string(&error).unwrap());
        // The re-executed "agent" got the same arguments.
        assert_eq!(
            fs::read_to_string(&marker)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            argv
        );
        assert_eq!(fs::read(&agent).unwrap(), fs::read(&new_binary).unwrap());
        assert_eq!(mode(&agent), 0o755);
        let record = pending(&scratch.0).unwrap();
        assert_eq!(record.state, PendingState::Trial);
        assert_eq!((record.job_id, record.to_version.as_str()), (42, "9.9.9"));
        assert_eq!(record.exe, agent.canonicalize().unwrap());
        assert_eq!(record.argv[1..], argv);
        assert!(!record.under_systemd);
        assert!(record.deadline_at - record.started_at == 60_000);
        assert_eq!(
            fs::read(&record.previous).unwrap(),
            fs::read(std::env::current_exe().unwrap()).unwrap()
        );
        assert_eq!(mode(&record.previous), 0o755);
        assert_eq!(mode(&scratch.0.join(UPDATE_DIR)), 0o700);
    }

    #[test]
    fn begin_puts_everything_back_when_the_new_binary_cannot_start() {
        let scratch = Scratch::new("begin-fails");
        let agent = copy_of_the_test_binary(&scratch);
        let new_binary = scratch.0.join("new-binary");
        // The kernel refuses to run a script whose interpreter does not exist.
        write_script(&new_binary, "#!/nonexistent/interpreter\n");

        run_child(&agent, "begin", &scratch.0, &new_binary.into());

        let error = fs::read_to_string(scratch.0.join("child-error")).unwrap();
        assert!(error.contains("Exec"), "{error}");
        assert_eq!(
            fs::read(&agent).unwrap(),
            fs::read(std::env::current_exe().unwrap()).unwrap(),
            "the previous binary is back"
        );
        assert_eq!(mode(&agent), 0o755);
        let reason = reverted_reason(&scratch.0);
        assert!(
            reason.starts_with("the update to 9.9.9 could not be applied: cannot start"),
            "{reason}"
        );
    }
}
