//! The agent itself: verifies signals against what it pinned, persists and runs jobs,
//! and keeps results until the server has them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use herald_shared::codec;
use herald_shared::envelope::{check_browser_url, Action, Envelope, PublicKey, Refusal, Statement};
use herald_shared::protocol::{
    Ack, AgentMsg, Bundle, Enroll, JobId, JobResult, ServerMsg, Status, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use herald_shared::token::Token;
use herald_shared::Millis;

use crate::exec;
use crate::host;
use crate::journal::{Journal, JournalError, Known};
use crate::link::{self, lock};
use crate::session::{self, Sessions};
use crate::state::{AgentConfig, Identity, StateError, Status as AgentStatus, WORK_DIR};
use herald_io::{files, now_ms};

/// Stored key of the latest verified membership.
const MEMBERSHIP_KEY: &str = "membership";
/// Stored key of the clock high-water mark.
const CLOCK_KEY: &str = "clock_high_water";
/// A clock more than this far behind the high-water mark is treated as stepped back.
const CLOCK_TOLERANCE_MS: Millis = 5 * 60 * 1000;
/// How long enrollment waits for the server.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
/// Finished jobs are kept in the journal this long (for deduplication of redeliveries).
const KEEP_JOBS_MS: i64 = 7 * 24 * 3600 * 1000;

/// Tunables, mostly for tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// First backoff ceiling.
    pub backoff_base: Duration,
    /// Highest backoff ceiling.
    pub backoff_cap: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// Grace between SIGTERM and SIGKILL for timed-out jobs.
    pub kill_grace: Duration,
    /// How long a browser service waits for the session helper's answer.
    pub session_answer: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backoff_base: link::BACKOFF_BASE,
            backoff_cap: link::BACKOFF_CAP,
            keep_alive: crate::tls::KEEP_ALIVE,
            kill_grace: exec::KILL_GRACE,
            session_answer: session::ANSWER_TIMEOUT,
        }
    }
}

/// Errors starting the agent or enrolling.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// State directory problems.
    #[error(transparent)]
    State(#[from] StateError),
    /// Local database problems.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The token is not readable.
    #[error(transparent)]
    Token(#[from] herald_shared::token::TokenError),
    /// Connecting or talking to the server failed.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// Already enrolled.
    #[error(
        "this agent is already enrolled ({0} exists); remove the state directory to enroll again"
    )]
    AlreadyEnrolled(PathBuf),
    /// A file could not be written.
    #[error(transparent)]
    File(#[from] files::FileError),
}

/// What a browser-service result says about the one-time ticket: nothing.
const TICKET_REDACTED: &str = "<ticket>";

/// The running agent.
pub struct Agent {
    state_dir: PathBuf,
    config: AgentConfig,
    id: String,
    keys: Vec<PublicKey>,
    journal: Journal,
    groups: Mutex<Vec<String>>,
    outbox: Arc<Notify>,
    to_server: Mutex<Option<mpsc::UnboundedSender<AgentMsg>>>,
    kill_grace: Duration,
    high_water: Mutex<Millis>,
    sessions: Arc<Sessions>,
}

impl Agent {
    /// Loads the agent from its state directory.
    pub fn load(state_dir: &Path, options: &Options) -> Result<(Arc<Agent>, Identity), AgentError> {
        let config = AgentConfig::load(state_dir)?;
        let identity = Identity::load_or_create(state_dir)?;
        let keys = config.pinned_keys().map_err(|reason| StateError::Invalid {
            path: state_dir.join(crate::state::AGENT_CONFIG),
            reason,
        })?;
        let journal = Journal::open(state_dir)?;
        let high_water = journal
            .value(CLOCK_KEY)?
            .and_then(|v| v.try_into().ok())
            .map(i64::from_be_bytes)
            .unwrap_or(0);
        let sessions = Arc::new(Sessions::new(
            &config.session,
            nix::unistd::Uid::effective().as_raw(),
            options.session_answer,
        ));
        let agent = Arc::new(Agent {
            state_dir: state_dir.to_path_buf(),
            id: identity.agent_id(),
            groups: Mutex::new(config.token_groups.clone()),
            config,
            keys,
            journal,
            outbox: Arc::new(Notify::new()),
            to_server: Mutex::new(None),
            kill_grace: options.kill_grace,
            high_water: Mutex::new(high_water),
            sessions,
        });
        if let Some(blob) = agent.journal.value(MEMBERSHIP_KEY)? {
            if let Ok(envelope) = codec::from_bytes::<Envelope>(&blob, codec::DEFAULT_FRAME_LIMIT) {
                agent.membership(&envelope);
            }
        }
        Ok((agent, identity))
    }

    /// This agent's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Server address.
    pub fn server(&self) -> &str {
        &self.config.server
    }

    /// The local store.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Notified when a result lands in the outbox.
    pub fn outbox_notify(&self) -> Arc<Notify> {
        self.outbox.clone()
    }

    /// A connection is up: messages may go to the server.
    pub fn attach(&self, sender: mpsc::UnboundedSender<AgentMsg>) {
        *lock(&self.to_server) = Some(sender);
    }

    /// The connection is gone.
    pub fn detach(&self) {
        *lock(&self.to_server) = None;
    }

    /// The pinned operator keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The configuration from `agent.toml`.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Grace between SIGTERM and SIGKILL for jobs.
    pub fn kill_grace(&self) -> Duration {
        self.kill_grace
    }

    /// The connected user-session helpers.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// An HTTPS client that trusts only the pinned CA (downloads from the server).
    pub fn https_client(&self) -> Result<reqwest::Client, crate::tls::TlsError> {
        let fingerprint = self
            .config
            .fingerprint()
            .map_err(crate::tls::TlsError::from_reason)?;
        crate::tls::https_client(fingerprint)
    }

    /// Connected and welcomed: the proof a freshly updated agent is healthy.
    pub fn connected(&self) {
        crate::update::report_self_update(self);
    }

    pub(crate) fn tell_server(&self, msg: AgentMsg) {
        if let Some(sender) = lock(&self.to_server).as_ref() {
            let _ = sender.send(msg);
        }
    }

    /// Records connection state for `herald-agent status`.
    pub fn set_connected(
        &self,
        connected: bool,
        error: Option<String>,
        addresses: &[std::net::IpAddr],
    ) {
        let status = AgentStatus {
            agent_id: self.id.clone(),
            server: self.config.server.clone(),
            connected,
            since: now_ms(),
            last_error: error,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            pid: std::process::id(),
        };
        if let Err(e) = status.save(&self.state_dir) {
            warn!("cannot write status: {e}");
        }
    }

    /// Applies a signed membership if it verifies, names us and is newer.
    pub fn membership(&self, envelope: &Envelope) {
        let Ok(Statement::Membership(membership)) = envelope.open(&self.keys) else {
            warn!("ignoring a membership that does not verify");
            return;
        };
        if membership.agent_id != self.id {
            warn!("ignoring a membership for another agent");
            return;
        }
        let current = self
            .journal
            .value(MEMBERSHIP_KEY)
            .ok()
            .flatten()
            .and_then(|b| codec::from_bytes::<Envelope>(&b, codec::DEFAULT_FRAME_LIMIT).ok())
            .and_then(|e| match e.open(&self.keys) {
                Ok(Statement::Membership(m)) => Some(m.issued_at),
                _ => None,
            });
        if current.is_some_and(|at| at > membership.issued_at) {
            return;
        }
        if let Ok(blob) = codec::to_bytes(envelope) {
            let _ = self.journal.set_value(MEMBERSHIP_KEY, &blob);
        }
        info!(groups = ?membership.groups, "groups updated");
        *lock(&self.groups) = membership.groups;
    }

    /// The time used for validity checks: the wall clock, unless it stepped back behind
    /// the highest time this agent has seen, in which case that high-water mark.
    fn guarded_now(&self) -> Millis {
        let now = now_ms();
        let mut high = lock(&self.high_water);
        if now > *high {
            // Persist at most once a minute; losing the last minute is harmless.
            if now - *high > 60_000 {
                let _ = self.journal.set_value(CLOCK_KEY, &now.to_be_bytes());
            }
            *high = now;
            now
        } else if *high - now > CLOCK_TOLERANCE_MS {
            warn!("system clock is behind the highest time seen; using that instead");
            *high
        } else {
            now
        }
    }

    /// Handles a signal: deduplicate, verify, persist, then start. Returns the ack.
    /// `ticket` is the server's one-time ticket for a browser service (ignored for other
    /// actions).
    pub fn signal(
        self: Arc<Self>,
        job_id: JobId,
        envelope: Envelope,
        bundle: Option<Bundle>,
        ticket: Option<String>,
    ) -> Result<Ack, JournalError> {
        match self.journal.known(job_id)? {
            Some(Known::Refused(reason)) => return Ok(Ack::Refused(reason)),
            Some(Known::Accepted) => return Ok(Ack::Duplicate),
            None => {}
        }
        let now = self.guarded_now();
        let order = match envelope.open(&self.keys) {
            Ok(Statement::Order(order)) => order,
            Ok(_) => return self.refuse(job_id, "-", Refusal::Invalid("not an order".into()), now),
            Err(e) => return self.refuse(job_id, "-", Refusal::Invalid(e.to_string()), now),
        };
        let order_id = hex::encode(order.id);
        let groups = lock(&self.groups).clone();
        let verdict = self.policy(&order.action).and_then(|()| {
            order.check(
                &self.id,
                &groups,
                now,
                self.journal
                    .history(&order_id)
                    .unwrap_or(herald_shared::envelope::History::Unseen),
            )
        });
        let verdict = verdict.and_then(|()| match &order.action {
            Action::Install(spec) => {
                crate::update::check(&self, spec, bundle.as_ref(), now).map(|_| ())
            }
            _ => Ok(()),
        });
        if let Err(refusal) = verdict {
            return self.refuse(job_id, &order_id, refusal, now);
        }
        if let Some(bundle) = &bundle {
            // Kept for a restart before the job starts.
            let blob = codec::to_bytes(bundle).map_err(|e| JournalError::Corrupt(e.to_string()))?;
            self.journal.set_value(&bundle_key(job_id), &blob)?;
        }
        let ticket = ticket.filter(|_| matches!(order.action, Action::Open(_)));
        if let Some(ticket) = &ticket {
            // Kept for a restart before the job starts, like the bundle.
            self.journal
                .set_value(&ticket_key(job_id), ticket.as_bytes())?;
        }
        self.journal
            .accept(job_id, &order_id, &envelope, order.not_after, now)?;
        info!(job_id, action = %order.action.describe(), "job accepted");
        let agent = self.clone();
        tokio::spawn(async move { agent.run_job(job_id, order.action, bundle, ticket).await });
        Ok(Ack::Accepted)
    }

    fn refuse(
        &self,
        job_id: JobId,
        order_id: &str,
        refusal: Refusal,
        now: Millis,
    ) -> Result<Ack, JournalError> {
        let reason = refusal.to_string();
        warn!(job_id, %reason, "job refused");
        self.journal.refuse(job_id, order_id, &reason, now)?;
        Ok(Ack::Refused(reason))
    }

    fn policy(&self, action: &Action) -> Result<(), Refusal> {
        let policy = &self.config.policy;
        match action {
            Action::Run(run) => {
                if !policy.allow_run {
                    return Err(Refusal::Policy(
                        "running programs is disabled on this machine".into(),
                    ));
                }
                if !policy.programs.is_empty() && !policy.programs.contains(&run.program) {
                    return Err(Refusal::Policy(format!(
                        "{} is not in the program allowlist",
                        run.program
                    )));
                }
                if run.run_as.is_some() && !nix::unistd::Uid::effective().is_root() {
                    return Err(Refusal::Policy(
                        "run-as user given but the agent is not running as root".into(),
                    ));
                }
                Ok(())
            }
            Action::Open(open) => {
                if !policy.allow_browser {
                    return Err(Refusal::Policy(
                        "browser services are disabled on this machine (allow_browser = false)"
                            .into(),
                    ));
                }
                check_browser_url(&open.url).map_err(Refusal::Policy)
            }
            Action::Install(_) | Action::Revert { .. } => {
                if policy.allow_install {
                    Ok(())
                } else {
                    Err(Refusal::Policy(
                        "installing packages is disabled on this machine".into(),
                    ))
                }
            }
        }
    }

    /// Runs an accepted job to completion and puts its result in the outbox.
    async fn run_job(
        self: Arc<Self>,
        job_id: JobId,
        action: Action,
        bundle: Option<Bundle>,
        ticket: Option<String>,
    ) {
        let started_at = now_ms();
        // The marker that finds the job's processes must be unique on this machine: job
        // ids are only unique per server, and several agents (or a restarted one) may
        // share a uid.
        let nonce: [u8; 4] = herald_io::random_bytes();
        let marker = format!("job-{job_id}-{}-{}", &self.id[..12], hex::encode(nonce));
        if let Err(e) = self.journal.started(job_id, &marker, started_at) {
            warn!(job_id, "cannot mark job started, not running it: {e}");
            return;
        }
        self.tell_server(AgentMsg::Started {
            job_id,
            at: started_at,
        });
        let result = match action {
            Action::Run(run) => {
                let spec = exec::Spec {
                    job_id: marker,
                    program: run.program.into(),
                    args: run.args,
                    timeout: Duration::from_millis(run.timeout_ms),
                    run_as: run.run_as,
                    work_root: self.state_dir.join(WORK_DIR),
                    output_cap: exec::OUTPUT_CAP,
                    kill_grace: self.kill_grace,
                };
                let _ = files::create_private_dir(&spec.work_root);
                outcome_to_result(job_id, started_at, exec::run(&spec).await)
            }
            Action::Install(spec) => {
                let verified = bundle.as_ref().map(|b| {
                    herald_shared::release::verify(&b.release, b.delegation.as_ref(), &self.keys)
                });
                match (bundle, verified) {
                    (Some(bundle), Some(Ok(release))) => {
                        crate::update::install(
                            self.clone(),
                            job_id,
                            marker,
                            spec,
                            bundle,
                            release,
                            started_at,
                        )
                        .await
                    }
                    (_, Some(Err(e))) => JobResult::without_output(
                        job_id,
                        Status::Failed,
                        started_at,
                        now_ms(),
                        Some(e.to_string()),
                    ),
                    _ => JobResult::without_output(
                        job_id,
                        Status::Failed,
                        started_at,
                        now_ms(),
                        Some("install job without its release metadata".into()),
                    ),
                }
            }
            Action::Revert { package } => {
                crate::update::revert(&self, job_id, &package, started_at)
            }
            Action::Open(open) => {
                let result = self
                    .open_in_browser(job_id, &open.url, ticket.as_deref(), started_at)
                    .await;
                // The ticket is single-use and secret: gone with the job.
                let _ = self.journal.set_value(&ticket_key(job_id), &[]);
                result
            }
        };
        let _ = self.journal.set_value(&bundle_key(job_id), &[]);
        info!(job_id, status = result.status.as_str(), exit = ?result.exit_code, "job finished");
        if let Err(e) = self.journal.finish(&result, now_ms()) {
            warn!(job_id, "cannot store result: {e}");
            return;
        }
        self.outbox.notify_one();
    }

    /// A browser service: the signed page, with the server's ticket appended, goes to a
    /// user-session helper. The ticket never appears in the result or the log.
    async fn open_in_browser(
        &self,
        job_id: JobId,
        url: &str,
        ticket: Option<&str>,
        started_at: Millis,
    ) -> JobResult {
        let redact = |text: String| match ticket.filter(|t| !t.is_empty()) {
            Some(t) => text
                .replace(&session::encode(t), TICKET_REDACTED)
                .replace(t, TICKET_REDACTED),
            None => text,
        };
        let failed = |error: String| {
            JobResult::without_output(
                job_id,
                Status::Failed,
                started_at,
                now_ms(),
                Some(redact(error)),
            )
        };
        let page = match ticket {
            Some(ticket) => session::with_ticket(url, ticket),
            None => url.to_string(),
        };
        // The signed URL passed the policy; the ticket is the server's, so check again
        // what the browser will really load (its length, mostly).
        if let Err(reason) = check_browser_url(&page) {
            return failed(format!(
                "the page with the server's ticket is refused: {reason}"
            ));
        }
        match self.sessions.open(job_id, &page).await {
            Ok(user) => {
                info!(job_id, %user, "browser service opened");
                let mut result = JobResult::without_output(
                    job_id,
                    Status::Succeeded,
                    started_at,
                    now_ms(),
                    None,
                );
                result.stdout =
                    format!("opened {url} in the browser of user {user}\n").into_bytes();
                result
            }
            Err(e) => failed(e.to_string()),
        }
    }

    /// Restart recovery: interrupted jobs to the outbox, never-started jobs resumed.
    pub fn recover(self: &Arc<Self>) -> Result<(), JournalError> {
        let now = now_ms();
        self.journal.prune(now, KEEP_JOBS_MS)?;
        let updating = crate::selfupdate::pending(&self.state_dir).map(|p| p.job_id);
        let (orphans, resume) = self.journal.recover(now, updating)?;
        for marker in orphans {
            // Interrupted means stopped: what the dead agent left running goes too.
            exec::kill_orphans(&marker);
        }
        for resume in resume {
            match resume.envelope.open(&self.keys) {
                Ok(Statement::Order(order)) => {
                    let agent = self.clone();
                    let bundle = self
                        .journal
                        .value(&bundle_key(resume.job_id))?
                        .and_then(|b| codec::from_bytes(&b, codec::DEFAULT_FRAME_LIMIT).ok());
                    let ticket = match order.action {
                        Action::Open(_) => self
                            .journal
                            .value(&ticket_key(resume.job_id))?
                            .and_then(|b| String::from_utf8(b).ok())
                            .filter(|t| !t.is_empty()),
                        _ => None,
                    };
                    tokio::spawn(async move {
                        agent
                            .run_job(resume.job_id, order.action, bundle, ticket)
                            .await
                    });
                }
                _ => warn!(
                    job_id = resume.job_id,
                    "stored order no longer verifies; not running it"
                ),
            }
        }
        Ok(())
    }
}

fn bundle_key(job_id: JobId) -> String {
    format!("bundle:{job_id}")
}

fn ticket_key(job_id: JobId) -> String {
    format!("ticket:{job_id}")
}

fn outcome_to_result(
    job_id: JobId,
    started_at: Millis,
    outcome: Result<exec::Outcome, exec::ExecError>,
) -> JobResult {
    let mut result = JobResult::without_output(job_id, Status::Failed, started_at, now_ms(), None);
    match outcome {
        Ok(outcome) => {
            result.status = match outcome.exit {
                exec::Exit::Code(0) => Status::Succeeded,
                exec::Exit::TimedOut => Status::TimedOut,
                _ => Status::Failed,
            };
            match outcome.exit {
                exec::Exit::Code(code) => result.exit_code = Some(code),
                exec::Exit::Signal(signal) => result.signal = Some(signal),
                exec::Exit::TimedOut => result.error = Some("killed at its timeout".into()),
            }
            result.stdout = outcome.stdout;
            result.stderr = outcome.stderr;
            result.stdout_truncated = outcome.stdout_truncated;
            result.stderr_truncated = outcome.stderr_truncated;
            result.started_at = outcome.started_at_ms;
            result.finished_at = outcome.finished_at_ms;
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

/// `herald-agent enroll`: creates the identity, enrolls with the server named in the
/// token, and records what the token pins. Returns the agent id.
pub async fn enroll(
    state_dir: &Path,
    token: &str,
    name: Option<&str>,
) -> Result<String, AgentError> {
    let token = Token::decode(token)?;
    let config_path = state_dir.join(crate::state::AGENT_CONFIG);
    if config_path.exists() {
        return Err(AgentError::AlreadyEnrolled(config_path));
    }
    files::create_private_dir(state_dir)?;
    let identity = Identity::load_or_create(state_dir)?;
    let client =
        crate::tls::client_config(token.ca_fingerprint, &identity, crate::tls::KEEP_ALIVE)?;
    let addr = link::resolve(&token.server).await?;
    let endpoint = link::endpoint_for(addr).map_err(|e| link::LinkError::Connect {
        server: token.server.clone(),
        reason: e.to_string(),
    })?;
    let connection = tokio::time::timeout(
        ENROLL_TIMEOUT,
        link::connect(&endpoint, client, &token.server),
    )
    .await
    .map_err(|_| link::LinkError::Connect {
        server: token.server.clone(),
        reason: format!(
            "no answer within {} s; is the server running and reachable?",
            ENROLL_TIMEOUT.as_secs()
        ),
    })??;
    let (mut send, mut recv) = connection.open_bi().await.map_err(link::LinkError::from)?;
    let name = name.map(str::to_string).unwrap_or_else(host::hostname);
    link::write_frame(
        &mut send,
        &AgentMsg::Enroll(Enroll {
            protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            secret: token.secret.to_vec(),
            name,
            facts: host::facts(),
        }),
    )
    .await?;
    let answer = link::read_message(&mut recv).await?;
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    match answer {
        Some(ServerMsg::Enrolled { agent_id }) if agent_id == identity.agent_id() => {
            AgentConfig {
                server: token.server.clone(),
                ca_fingerprint: hex::encode(token.ca_fingerprint),
                operator_keys: token.operator_keys.iter().map(|k| k.to_hex()).collect(),
                agent_id: agent_id.clone(),
                token_groups: token.groups.clone(),
                policy: Default::default(),
                update: Default::default(),
                session: Default::default(),
            }
            .save(state_dir)?;
            Ok(agent_id)
        }
        Some(ServerMsg::Enrolled { agent_id }) => Err(link::LinkError::Protocol(format!(
            "server assigned id {agent_id}, which does not match our key"
        ))
        .into()),
        Some(ServerMsg::Refused(reason)) => Err(link::LinkError::Refused(reason).into()),
        _ => Err(link::LinkError::Protocol("no answer to the enrollment request".into()).into()),
    }
}

/// `herald-agent run`: the standby loop, until `shutdown` resolves.
pub async fn run(
    state_dir: &Path,
    options: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let (agent, identity) = Agent::load(state_dir, &options)?;
    let fingerprint = agent
        .config
        .fingerprint()
        .map_err(|reason| StateError::Invalid {
            path: state_dir.join(crate::state::AGENT_CONFIG),
            reason,
        })?;
    let client = crate::tls::client_config(fingerprint, &identity, options.keep_alive)?;
    // Listening before recovery, so a resumed browser job finds helpers that reconnect.
    let socket = session::socket_path(state_dir, &agent.config.session);
    let helpers = match session::bind(&socket, nix::unistd::Uid::effective().is_root()) {
        Ok(listener) => {
            info!(socket = %socket.display(), "listening for session helpers");
            Some(tokio::spawn(session::serve(
                listener,
                agent.sessions.clone(),
            )))
        }
        Err(e) => {
            warn!("browser services will fail: {e}");
            agent.sessions.set_unavailable(e.to_string());
            None
        }
    };
    agent.recover()?;
    info!(agent_id = %agent.id(), server = %agent.server(), "herald-agent starting");
    tokio::select! {
        _ = link::run_forever(agent.clone(), client, &options) => {}
        _ = shutdown => info!("shutting down"),
    }
    if let Some(helpers) = helpers {
        helpers.abort();
        let _ = std::fs::remove_file(&socket);
    }
    agent.set_connected(false, Some("agent stopped".into()), &[]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::envelope::PublicKey;
    use herald_shared::token::{TokenError, SECRET_LEN};

    /// The token is checked before the state directory is made or the server contacted,
    /// so a damaged token costs neither local state nor the token's use at the server.
    #[tokio::test]
    async fn enroll_refuses_a_damaged_token_before_touching_anything() {
        let nonce: [u8; 4] = herald_io::random_bytes();
        let dir = std::env::temp_dir().join(format!(
            "herald-enroll-damaged-{}-{}",
            std::process::id(),
            hex::encode(nonce)
        ));
        let token = Token {
            // Nothing listens there: reaching the network would fail differently.
            server: "127.0.0.1:1".into(),
            ca_fingerprint: [1; 32],
            operator_keys: vec![PublicKey([2; 32])],
            groups: vec![],
            secret: [3; SECRET_LEN],
        }
        .encode();
        let mut chars: Vec<char> = token.chars().collect();
        let middle = chars.len() / 2;
        chars[middle] = if chars[middle] == 'A' { 'B' } else { 'A' };
        let damaged: String = chars.into_iter().collect();

        let error = enroll(&dir, &damaged, Some("test")).await.unwrap_err();
        assert!(
            matches!(error, AgentError::Token(TokenError::Damaged)),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "this token is damaged; copy it again");
        assert!(!dir.exists(), "state written for a damaged token");
    }
}
