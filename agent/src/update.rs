//! Install orders: check the signed release before accepting the job, then download,
//! stage, apply and verify it (or hand the agent's own binary to [`crate::selfupdate`]).
//!
//! Checks at signal time (nothing is downloaded for a refused release): the release is
//! signed by an operator key, or by a vendor key with an operator delegation covering the
//! package; it is the package (and version) the order names, for this platform, not older
//! than the highest version this agent has seen (persisted), not expired by the agent's
//! guarded clock, and not for a newer agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use herald_shared::envelope::{InstallSpec, PublicKey, Refusal};
use herald_shared::protocol::{AgentMsg, Bundle, JobId, JobResult, Progress, Status};
use herald_shared::release::{self, Installed, Release, Verdict, AGENT_PACKAGE};
use herald_shared::Millis;

use crate::download::{self, Fetch};
use crate::install::{self, Packages};
use crate::journal::Journal;
use crate::state::AgentConfig;
use crate::tls::TlsError;
use crate::{exec, selfupdate};
use herald_io::{files, now_ms};

/// Directory under the state directory holding installed packages.
pub const PACKAGES_DIR: &str = "packages";
/// The agent's build version.
pub use crate::selfupdate::AGENT_VERSION;

fn seen_key(package: &str) -> String {
    format!("release_seen:{package}")
}

/// The stored key of the agent's own installed package version.
const AGENT_INSTALLED_KEY: &str = "release_installed:herald-agent";

/// What installing needs from the agent (the agent implements it; a
/// trait so that this module does not depend on the agent that calls it).
pub(crate) trait Context {
    /// The pinned operator keys.
    fn keys(&self) -> &[PublicKey];
    /// The local store.
    fn journal(&self) -> &Journal;
    /// The state directory.
    fn state_dir(&self) -> &Path;
    /// The configuration from `agent.toml`.
    fn config(&self) -> &AgentConfig;
    /// Grace between SIGTERM and SIGKILL for the install command.
    fn kill_grace(&self) -> Duration;
    /// An HTTPS client that trusts only the pinned CA.
    fn https_client(&self) -> Result<reqwest::Client, TlsError>;
    /// A progress report for the server.
    fn tell_server(&self, msg: AgentMsg);
    /// A result is in the outbox.
    fn result_ready(&self, job_id: JobId);
}

/// Verifies an install signal's release against the order and what this agent has seen.
/// On success the highest-seen version is raised (so older metadata is refused from now
/// on, even if this install fails) and the verified release is returned.
pub(crate) fn check(
    agent: &impl Context,
    spec: &InstallSpec,
    bundle: Option<&Bundle>,
    now: Millis,
) -> Result<(Release, Verdict), Refusal> {
    let refuse = |e: release::ReleaseError| Refusal::Release(e.to_string());
    let bundle = bundle
        .ok_or_else(|| Refusal::Release("install order came without release metadata".into()))?;
    let release = release::verify(&bundle.release, bundle.delegation.as_ref(), agent.keys())
        .map_err(refuse)?;
    let installed = installed(agent, &spec.package).map_err(Refusal::Invalid)?;
    let verdict = release
        .check(
            &spec.package,
            spec.version.as_deref(),
            &release::this_platform(),
            AGENT_VERSION,
            &installed,
            now,
        )
        .map_err(refuse)?;
    let offered = release.semver().map_err(refuse)?;
    if installed.highest_seen.as_ref().is_none_or(|h| offered > *h) {
        agent
            .journal()
            .set_value(&seen_key(&spec.package), offered.to_string().as_bytes())
            .map_err(|e| Refusal::Invalid(format!("cannot record the version seen: {e}")))?;
    }
    Ok((release, verdict))
}

fn installed(agent: &impl Context, package: &str) -> Result<Installed, String> {
    let parse = |bytes: Option<Vec<u8>>| {
        bytes
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| semver::Version::parse(&s).ok())
    };
    let highest_seen = parse(
        agent
            .journal()
            .value(&seen_key(package))
            .map_err(|e| e.to_string())?,
    );
    let current = if package == AGENT_PACKAGE {
        parse(
            agent
                .journal()
                .value(AGENT_INSTALLED_KEY)
                .map_err(|e| e.to_string())?,
        )
    } else {
        packages(agent)
            .and_then(|p| p.current(package))
            .map_err(|e| e.to_string())?
            .and_then(|v| semver::Version::parse(&v).ok())
    };
    Ok(Installed {
        highest_seen,
        current,
    })
}

fn packages(agent: &impl Context) -> Result<Packages, install::InstallError> {
    Packages::open(&agent.state_dir().join(PACKAGES_DIR))
}

/// Runs an accepted install job to its result.
pub(crate) async fn install<C: Context + Send + Sync + 'static>(
    agent: Arc<C>,
    job_id: JobId,
    marker: String,
    spec: InstallSpec,
    bundle: Bundle,
    release: Release,
    started_at: Millis,
) -> JobResult {
    let finish = |status, message: String| {
        let mut result = JobResult::without_output(job_id, status, started_at, now_ms(), None);
        if status == Status::Succeeded {
            result.stdout = format!("{message}\n").into_bytes();
        } else {
            result.error = Some(message);
        }
        result
    };
    let deadline = Duration::from_millis(spec.timeout_ms.max(1_000));
    match installed(&*agent, &release.package) {
        Ok(now) if now.current.as_ref() == release.semver().ok().as_ref() => {
            return finish(
                Status::Succeeded,
                format!(
                    "{} {} is already installed",
                    release.package, release.version
                ),
            )
        }
        _ => {}
    }
    let packages = match packages(&*agent) {
        Ok(p) => p,
        Err(e) => return finish(Status::Failed, e.to_string()),
    };
    let staged = packages.staging_dir().join(hex::encode(release.sha256));
    let url = release.url.clone().unwrap_or_else(|| bundle.url.clone());
    let client = match release.url {
        Some(_) => crate::tls::public_client(),
        None => agent.https_client(),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => return finish(Status::Failed, e.to_string()),
    };
    let stall = Duration::from_secs(agent.config().update.stall_secs.max(1));
    agent.tell_server(AgentMsg::Progress {
        job_id,
        progress: Progress::Downloading { percent: 0 },
    });
    let mut last_percent = 0u8;
    let length = release.length.max(1);
    let progress_agent = agent.clone();
    let mut on_progress = move |bytes: u64| {
        let percent = (bytes.saturating_mul(100) / length).min(100) as u8;
        if percent != last_percent {
            last_percent = percent;
            progress_agent.tell_server(AgentMsg::Progress {
                job_id,
                progress: Progress::Downloading { percent },
            });
        }
    };
    let fetched = download::fetch(
        &client,
        &Fetch {
            url: &url,
            length: release.length,
            sha256: release.sha256,
            dest: &staged,
            stall,
            deadline,
        },
        &mut on_progress,
    )
    .await;
    if let Err(e) = fetched {
        return finish(Status::Failed, e.to_string());
    }
    agent.tell_server(AgentMsg::Progress {
        job_id,
        progress: Progress::Installing,
    });
    if release.package == AGENT_PACKAGE {
        return self_update(&*agent, job_id, &release, staged, started_at).await;
    }
    let result = apply(&*agent, &packages, &release, &staged, marker, deadline).await;
    let _ = std::fs::remove_file(&staged);
    match result {
        Ok(message) => finish(Status::Succeeded, message),
        Err(Failure { message, output }) => {
            let mut result = finish(Status::Failed, message);
            if let Some(outcome) = output {
                result.exit_code = match outcome.exit {
                    exec::Exit::Code(c) => Some(c),
                    _ => None,
                };
                result.stdout = outcome.stdout;
                result.stderr = outcome.stderr;
                result.stdout_truncated = outcome.stdout_truncated;
                result.stderr_truncated = outcome.stderr_truncated;
            }
            result
        }
    }
}

struct Failure {
    message: String,
    output: Option<exec::Outcome>,
}

impl From<install::InstallError> for Failure {
    fn from(e: install::InstallError) -> Self {
        Failure {
            message: e.to_string(),
            output: None,
        }
    }
}

/// Stage → apply → verify: unpack from the staged bytes (hashed again as they are read),
/// run the install command, then switch `current`. A failing command discards the new
/// version; `current` never moved.
async fn apply(
    agent: &impl Context,
    packages: &Packages,
    release: &Release,
    staged: &std::path::Path,
    marker: String,
    timeout: Duration,
) -> Result<String, Failure> {
    let format = match &release.format {
        release::Format::TarGz => install::Format::TarGz,
        release::Format::File { name } => install::Format::File { name: name.clone() },
    };
    let previous = packages.current(&release.package)?;
    let dir = {
        // Unpacking may take a while (up to gigabytes): off the runtime's threads.
        let (packages, release, staged) = (packages.clone(), release.clone(), staged.to_path_buf());
        tokio::task::spawn_blocking(move || {
            packages.unpack(
                &release.package,
                &release.version,
                &staged,
                release.sha256,
                release.length,
                &format,
            )
        })
        .await
        .map_err(|e| Failure {
            message: format!("unpacking stopped: {e}"),
            output: None,
        })??
    };
    if let Some(command) = &release.install_command {
        let artifact = match &release.format {
            release::Format::File { name } => dir.join(name),
            release::Format::TarGz => dir.clone(),
        };
        let fill = |text: &str| {
            text.replace("{dir}", &dir.to_string_lossy())
                .replace("{artifact}", &artifact.to_string_lossy())
        };
        let spec = exec::Spec {
            job_id: marker,
            program: PathBuf::from(fill(&command[0])),
            args: command[1..].iter().map(|a| fill(a)).collect(),
            timeout,
            run_as: None,
            work_root: agent.state_dir().join(crate::state::WORK_DIR),
            output_cap: exec::OUTPUT_CAP,
            kill_grace: agent.kill_grace(),
        };
        let _ = files::create_private_dir(&spec.work_root);
        let outcome = exec::run(&spec).await;
        let failed = match &outcome {
            Ok(o) if o.exit == exec::Exit::Code(0) => None,
            Ok(o) => Some(match o.exit {
                exec::Exit::Code(c) => format!("install command exited with {c}"),
                exec::Exit::Signal(s) => format!("install command killed by signal {s}"),
                exec::Exit::TimedOut => "install command timed out".to_string(),
            }),
            Err(e) => Some(format!("install command could not run: {e}")),
        };
        if let Some(reason) = failed {
            if let Err(e) = packages.discard(&release.package, &release.version) {
                warn!("cannot discard the failed version: {e}");
            }
            let kept = previous
                .as_deref()
                .map(|v| format!("; {} stays at {v}", release.package))
                .unwrap_or_else(|| format!("; {} is not installed", release.package));
            return Err(Failure {
                message: format!("{reason}{kept}"),
                output: outcome.ok(),
            });
        }
    }
    packages.switch(&release.package, &release.version)?;
    // Verify: `current` now names the new version.
    let now_current = packages.current(&release.package)?;
    if now_current.as_deref() != Some(release.version.as_str()) {
        return Err(Failure {
            message: format!(
                "after switching, current is {now_current:?}, not {}",
                release.version
            ),
            output: None,
        });
    }
    info!(package = %release.package, version = %release.version, "package installed");
    Ok(format!(
        "installed {} {}{}",
        release.package,
        release.version,
        previous
            .map(|v| format!(" (previous {v} kept for revert)"))
            .unwrap_or_default()
    ))
}

/// Swaps in the verified agent binary and restarts into it; only returns on failure.
async fn self_update(
    agent: &impl Context,
    job_id: JobId,
    release: &Release,
    staged: PathBuf,
    started_at: Millis,
) -> JobResult {
    agent.tell_server(AgentMsg::Progress {
        job_id,
        progress: Progress::Restarting,
    });
    // Give the progress report a moment to leave before the process is replaced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deadline = Duration::from_secs(agent.config().update.health_deadline_secs.max(5));
    let state_dir = agent.state_dir().to_path_buf();
    let version = release.version.clone();
    info!(%version, "replacing the agent binary and restarting");
    let error = tokio::task::spawn_blocking(move || {
        selfupdate::begin(&state_dir, &staged, job_id, &version, deadline)
    })
    .await;
    let reason = match error {
        Ok(e) => e.to_string(),
        Err(e) => e.to_string(),
    };
    let _ = selfupdate::finish(agent.state_dir());
    JobResult::without_output(
        job_id,
        Status::Failed,
        started_at,
        now_ms(),
        Some(format!("self-update failed: {reason}")),
    )
}

/// After a restart: reports how a self-update ended, once the agent is connected (the
/// proof of health). Returns the job id it reported, if any.
pub(crate) fn report_self_update(agent: &impl Context) -> Option<JobId> {
    let pending = match selfupdate::confirm_healthy(agent.state_dir()) {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            warn!("cannot confirm the self-update: {e}");
            return None;
        }
    };
    let now = now_ms();
    let mut result = JobResult::without_output(
        pending.job_id,
        Status::Failed,
        pending.started_at,
        now,
        None,
    );
    match &pending.state {
        selfupdate::PendingState::Healthy => {
            result.status = Status::Succeeded;
            result.stdout = format!(
                "herald-agent updated to {} and reconnected\n",
                pending.to_version
            )
            .into_bytes();
            let _ = agent
                .journal()
                .set_value(AGENT_INSTALLED_KEY, pending.to_version.as_bytes());
        }
        selfupdate::PendingState::Reverted { reason } => {
            result.error = Some(format!("{reason}; the previous agent was restored"));
        }
        selfupdate::PendingState::Trial => return None,
    }
    info!(
        job_id = pending.job_id,
        status = result.status.as_str(),
        "self-update reported"
    );
    if let Err(e) = agent.journal().finish(&result, now) {
        warn!("cannot store the self-update result: {e}");
        return None;
    }
    if let Err(e) = selfupdate::finish(agent.state_dir()) {
        warn!("cannot clear the self-update record: {e}");
    }
    agent.result_ready(pending.job_id);
    Some(pending.job_id)
}

/// Runs an accepted revert job.
pub(crate) fn revert(
    agent: &impl Context,
    job_id: JobId,
    package: &str,
    started_at: Millis,
) -> JobResult {
    let mut result = JobResult::without_output(job_id, Status::Failed, started_at, now_ms(), None);
    match packages(agent).and_then(|p| p.revert(package)) {
        Ok(version) => {
            result.status = Status::Succeeded;
            result.stdout = format!("{package} reverted to {version}\n").into_bytes();
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}
