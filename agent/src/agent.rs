//! The agent itself: what it holds (identity, pinned keys, journal, session helpers) and
//! what it does with the jobs the protocol machine ([`crate::protocol`]) accepts —
//! persist them, run them, put their results in the outbox — plus restart recovery.
//!
//! It does not know the link: what its jobs report (started, progress, a result ready)
//! goes out as machine inputs on a channel the link reads ([`Events`]), and the link
//! calls in here to carry out the machine's effects.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use herald_shared::codec;
use herald_shared::envelope::{
    check_browser_url, Action, Envelope, History, InstallSpec, PublicKey, Refusal, Statement,
};
use herald_shared::protocol::{AgentMsg, Bundle, JobId, JobResult, Status};
use herald_shared::Millis;

use crate::exec;
use crate::inbox::{Inbox, InboxError};
use crate::journal::{Journal, JournalError, Known};
use crate::notify::{Notice, NoticeEvent, QuietHours};
use crate::options::Options;
use crate::protocol::{self, Acceptance, Arrival, Input, Job, Ledger, Machine};
use crate::session::{self, Sessions};
use crate::state::{AgentConfig, Identity, StateError, Status as AgentStatus, WORK_DIR};
use crate::sync::lock;
use crate::update;
use herald_io::{files, now_ms};

/// Stored key of the latest verified membership.
const MEMBERSHIP_KEY: &str = "membership";
/// Stored key of the clock high-water mark.
const CLOCK_KEY: &str = "clock_high_water";
/// A clock more than this far behind the high-water mark is treated as stepped back.
const CLOCK_TOLERANCE_MS: Millis = 5 * 60 * 1000;
/// Finished jobs are kept in the journal this long (for deduplication of redeliveries).
const KEEP_JOBS_MS: i64 = 7 * 24 * 3600 * 1000;
/// How often notices that were held (quiet hours) or had no helper to show them are
/// tried again, and expired messages pruned.
const NOTICE_RETRY: Duration = Duration::from_secs(60);

/// Errors loading the agent from its state directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// State directory problems.
    #[error(transparent)]
    State(#[from] StateError),
    /// Local database problems.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The inbox cannot be opened (or the identity key cannot sign).
    #[error(transparent)]
    Inbox(#[from] InboxError),
    /// The share table cannot be opened.
    #[error(transparent)]
    Shares(#[from] crate::shares::ShareError),
}

/// What the agent's jobs tell the link (results ready, progress reports): inputs for
/// its [`Machine`], queued while no connection reads them.
pub type Events = mpsc::UnboundedReceiver<Input>;

/// What a browser-service result says about the one-time ticket: nothing.
const TICKET_REDACTED: &str = "<ticket>";

/// The running agent.
pub struct Agent {
    state_dir: PathBuf,
    config: AgentConfig,
    id: String,
    keys: Vec<PublicKey>,
    journal: Journal,
    inbox: Inbox,
    events: mpsc::UnboundedSender<Input>,
    kill_grace: Duration,
    high_water: Mutex<Millis>,
    sessions: Arc<Sessions>,
    shares: crate::shares::Shares,
    loads: crate::tunnel::Loads,
    /// Direct consumers expected ([`crate::direct`]).
    expectations: crate::direct::Expectations,
    /// The link endpoint's configuration for direct connections (`None`: it takes none).
    direct: Option<quinn::ServerConfig>,
    /// The live link, for a clean close when the agent stops.
    link: Mutex<Option<(quinn::Endpoint, quinn::Connection)>>,
}

impl Agent {
    /// Loads the agent from its state directory. The receiver gets what the agent's jobs
    /// report, for the link to feed to the protocol machine.
    pub fn load(
        state_dir: &Path,
        options: &Options,
    ) -> Result<(Arc<Agent>, Identity, Events), LoadError> {
        let config = AgentConfig::load(state_dir)?;
        let identity = Identity::load_or_create(state_dir)?;
        let keys = config.pinned_keys().map_err(|reason| StateError::Invalid {
            path: state_dir.join(crate::state::AGENT_CONFIG),
            reason,
        })?;
        let journal = Journal::open(state_dir)?;
        let inbox = Inbox::new(journal.clone(), &identity)?;
        let shares = crate::shares::Shares::new(journal.clone())?;
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
        let (events, receiver) = mpsc::unbounded_channel();
        let agent = Arc::new(Agent {
            state_dir: state_dir.to_path_buf(),
            id: identity.agent_id(),
            config,
            keys,
            journal,
            inbox,
            events,
            kill_grace: options.kill_grace,
            high_water: Mutex::new(high_water),
            sessions,
            shares,
            loads: Default::default(),
            expectations: Default::default(),
            direct: crate::direct::server_config(&identity)
                .map_err(|e| warn!("direct connections are off: {e}"))
                .ok(),
            link: Mutex::new(None),
        });
        Ok((agent, identity, receiver))
    }

    /// The protocol machine for this agent, from what its store holds now (the stored
    /// membership, the unacknowledged results).
    pub fn machine(self: &Arc<Self>) -> Result<Machine<Arc<Agent>>, LoadError> {
        let membership = self
            .journal
            .value(MEMBERSHIP_KEY)?
            .and_then(|blob| codec::from_bytes::<Envelope>(&blob, codec::DEFAULT_FRAME_LIMIT).ok());
        let settings = protocol::Settings {
            agent_id: self.id.clone(),
            keys: self.keys.clone(),
            policy: self.config.policy.clone(),
            is_root: nix::unistd::Uid::effective().is_root(),
            token_groups: self.config.token_groups.clone(),
            agent_version: update::AGENT_VERSION.to_string(),
        };
        Ok(Machine::new(
            settings,
            membership,
            self.journal.outbox_ids()?,
            self.clone(),
        )
        .with_reports(self.inbox.report_seqs()?))
    }

    /// Remembers the live link (`None` once it ended).
    pub(crate) fn hold_link(&self, link: Option<(quinn::Endpoint, quinn::Connection)>) {
        *lock(&self.link) = link;
    }

    /// Closes the live link, if any, and waits (briefly) until the server has been told:
    /// it then drops this device from the directory at once instead of at its idle
    /// timeout.
    pub async fn close_link(&self) {
        let link = lock(&self.link).take();
        if let Some((endpoint, connection)) = link {
            connection.close(
                herald_shared::protocol::close::DONE.into(),
                b"agent stopping",
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// The share table.
    pub fn shares(&self) -> &crate::shares::Shares {
        &self.shares
    }

    /// Serves a tunnel offer the server opened a stream for ([`crate::tunnel`]).
    pub async fn provide(&self, send: quinn::SendStream, recv: quinn::RecvStream) {
        let queued = |seq| self.report_queued(seq);
        crate::tunnel::provide(self.provider(&queued), send, recv).await;
    }

    /// Tells the link that a report was put in the outbox (it sends it at once).
    fn report_queued(&self, seq: u64) {
        let _ = self.events.send(Input::ReportsReady(vec![seq]));
    }

    /// What the providing end of a tunnel needs; `queued` hears of each count signed.
    fn provider<'a>(
        &'a self,
        queued: &'a (dyn Fn(u64) + Send + Sync),
    ) -> crate::tunnel::Provider<'a> {
        // The link endpoint is the direct endpoint: its port, while there is a link.
        let port = self.direct.as_ref().and_then(|_| {
            let link = lock(&self.link);
            link.as_ref()
                .and_then(|(endpoint, _)| endpoint.local_addr().ok())
                .map(|addr| addr.port())
        });
        crate::tunnel::Provider {
            shares: &self.shares,
            loads: &self.loads,
            idle: Duration::from_secs(self.config.peers.idle_timeout_secs.max(1)),
            inbox: &self.inbox,
            usage_interval: self.config.peers.usage_interval(),
            queued,
            direct: port.map(|port| (&self.expectations, port)),
        }
    }

    /// The link endpoint's configuration for direct connections, if it takes them.
    pub fn direct_config(&self) -> Option<quinn::ServerConfig> {
        self.direct.clone()
    }

    /// Serves a stream of a direct connection from the agent `consumer` (the id of the
    /// key its handshake proved): admitted only for a session expected from that agent,
    /// then checked and spliced as a relayed offer is ([`crate::direct`]).
    pub async fn serve_direct(
        &self,
        consumer: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let open = match crate::direct::read_open(&mut recv).await {
            Ok(Some(open)) => open,
            Ok(None) => return,
            Err(reason) => {
                warn!(%consumer, "direct stream refused: {reason}");
                return crate::direct::refuse(&mut send, &reason).await;
            }
        };
        let offer = match self
            .expectations
            .admit(open.session, consumer, std::time::Instant::now())
        {
            Ok(offer) => offer,
            Err(reason) => {
                warn!(%consumer, session = open.session, "direct stream refused: {reason}");
                let now = herald_io::now_ms();
                let recorded = self
                    .shares
                    .open_session(
                        crate::shares::Role::Provided,
                        open.session,
                        "",
                        &format!("agent {consumer} (direct)"),
                        now,
                    )
                    .and_then(|id| {
                        self.shares
                            .close_session(id, 0, 0, &format!("refused: {reason}"), now)
                    });
                if let Err(e) = recorded {
                    warn!("cannot record a refused direct stream: {e}");
                }
                return crate::direct::refuse(&mut send, &reason).await;
            }
        };
        self.expectations
            .extend(open.session, std::time::Instant::now());
        let queued = |seq| self.report_queued(seq);
        crate::tunnel::serve(self.provider(&queued), offer, send, recv).await;
        self.expectations
            .extend(open.session, std::time::Instant::now());
    }

    /// Reports the share table to the server whenever it changes (the CLI edits it
    /// beside the daemon); the link sends it after every `Welcome` besides.
    pub async fn report_shares(self: Arc<Self>) {
        let mut reported = self.shares.version().unwrap_or(0);
        let mut tick = tokio::time::interval(crate::shares::SHARE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let version = match self.shares.version() {
                Ok(version) => version,
                Err(e) => {
                    warn!("cannot read the share table: {e}");
                    continue;
                }
            };
            if version == reported {
                continue;
            }
            match self.shares.infos() {
                Ok(infos) => {
                    info!(
                        shares = infos.len(),
                        "share table changed; telling the server"
                    );
                    reported = version;
                    self.tell_server(AgentMsg::Shares(infos));
                }
                Err(e) => warn!("cannot read the share table: {e}"),
            }
        }
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

    /// The inbox (kept messages, senders, block list, report outbox).
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// Keeps a message the machine accepted; returns its receipt's seq.
    pub(crate) fn keep_message(&self, arrival: &Arrival) -> Result<u64, InboxError> {
        self.inbox
            .keep(arrival, self.config.messages.max_per_sender)
    }

    /// Shows a kept message's notice through a user-session helper, unless it is
    /// advertising inside quiet hours (then the retry loop of [`Agent::notices`] shows
    /// it when they end, as it does when no helper is connected now).
    pub(crate) fn show_notice(&self, notice: &Notice) {
        if notice.advertising {
            if let Some(minutes) = self.quiet_hours_hold() {
                info!(id = %notice.message_id, minutes, "advertising held for quiet hours");
                return;
            }
        }
        if self.sessions.notify(notice) {
            if let Err(e) = self.inbox.mark_notified(&notice.message_id, now_ms()) {
                warn!("cannot record a shown notice: {e}");
            }
        }
    }

    /// How many minutes advertising is held from now, if quiet hours hold now. The
    /// local time comes from chrono (the system's time zone).
    fn quiet_hours_hold(&self) -> Option<u32> {
        use chrono::Timelike;
        let quiet = match QuietHours::parse(&self.config.messages.quiet_hours) {
            Ok(quiet) => quiet?,
            Err(e) => {
                warn!("ignoring [messages] quiet_hours: {e}");
                return None;
            }
        };
        let local = chrono::Local::now();
        quiet.holds(local.hour() * 60 + local.minute())
    }

    /// Carries out what the helpers report about notices, and every minute
    /// shows the kept messages not shown yet (held, or no helper was connected) and
    /// prunes expired ones. Runs until the agent stops.
    pub async fn notices(self: Arc<Self>) {
        let mut events = self.sessions.notice_events();
        let mut retry = tokio::time::interval(NOTICE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(event) = async {
                    match events.as_mut() {
                        Some(events) => events.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.notice_event(event),
                _ = retry.tick() => self.show_unshown(),
            }
        }
    }

    /// One report about a notice: displayed, opened, or "block this sender".
    pub(crate) fn notice_event(&self, event: NoticeEvent) {
        let now = self.guarded_now();
        let outcome = match &event {
            NoticeEvent::Displayed { message_id } => self.inbox.mark_displayed(message_id, now),
            NoticeEvent::Opened { message_id } => {
                self.inbox
                    .mark_read(message_id, now, self.config.messages.read_receipts)
            }
            NoticeEvent::Block { sender, .. } => {
                info!(%sender, "sender blocked from a notification");
                self.inbox.block(sender, "notification", now).map(Some)
            }
        };
        match outcome {
            Ok(Some(seq)) => {
                let _ = self.events.send(Input::ReportsReady(vec![seq]));
            }
            Ok(None) => {}
            // A message removed meanwhile, or a sender blocked twice: nothing to do.
            Err(e @ (InboxError::UnknownMessage(_) | InboxError::AlreadyBlocked(_))) => {
                debug!("notice event {event:?}: {e}")
            }
            Err(e) => warn!("cannot record notice event {event:?}: {e}"),
        }
    }

    /// Shows the kept messages not shown yet whose hold has ended; prunes expired ones.
    fn show_unshown(&self) {
        let now = self.guarded_now();
        if let Err(e) = self.inbox.prune(now) {
            warn!("cannot prune the inbox: {e}");
        }
        let unshown = match self.inbox.undisplayed(now) {
            Ok(unshown) => unshown,
            Err(e) => return warn!("cannot read the inbox: {e}"),
        };
        let held = unshown
            .iter()
            .any(|e| e.advertising)
            .then(|| self.quiet_hours_hold())
            .flatten()
            .is_some();
        for entry in unshown.iter().filter(|e| !(e.advertising && held)) {
            if !self.sessions.notify(&entry.notice()) {
                // No helper to show it: all wait for the next round.
                break;
            }
            if let Err(e) = self.inbox.mark_notified(&entry.id, now) {
                warn!("cannot record a shown notice: {e}");
            }
        }
    }

    /// A result is in the outbox: the link sends it when it can.
    pub(crate) fn result_ready(&self, job_id: JobId) {
        let _ = self.events.send(Input::ResultReady(job_id));
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

    /// A report for the server (dropped unless a connection is established).
    pub(crate) fn tell_server(&self, msg: AgentMsg) {
        let _ = self.events.send(Input::Report(msg));
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

    /// Stores the membership the protocol machine verified and applied.
    pub(crate) fn store_membership(&self, envelope: &Envelope) {
        if let Ok(blob) = codec::to_bytes(envelope) {
            if let Err(e) = self.journal.set_value(MEMBERSHIP_KEY, &blob) {
                warn!("cannot store the membership: {e}");
            }
        }
    }

    /// The time used for validity checks: the wall clock, unless it stepped back behind
    /// the highest time this agent has seen, in which case that high-water mark.
    pub(crate) fn guarded_now(&self) -> Millis {
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

    /// Persists an accepted job: its bundle and ticket (kept for a restart before the
    /// job starts), then the job itself with its replay-cache entry.
    pub(crate) fn persist(&self, acceptance: &Acceptance) -> Result<(), JournalError> {
        let job_id = acceptance.job_id;
        if let Some(bundle) = &acceptance.bundle {
            let blob = codec::to_bytes(bundle).map_err(|e| JournalError::Corrupt(e.to_string()))?;
            self.journal.set_value(&bundle_key(job_id), &blob)?;
        }
        if let Some(ticket) = &acceptance.ticket {
            self.journal
                .set_value(&ticket_key(job_id), ticket.as_bytes())?;
        }
        self.journal.accept(
            job_id,
            &acceptance.order_id,
            &acceptance.envelope,
            acceptance.keep_until,
            acceptance.at,
        )
    }

    /// Starts a persisted job; it runs whatever happens to the connection.
    pub(crate) fn spawn(self: &Arc<Self>, job: Job) {
        let agent = self.clone();
        tokio::spawn(async move {
            agent
                .run_job(job.job_id, job.action, job.bundle, job.ticket)
                .await
        });
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
                        update::install(
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
            Action::Revert { package } => update::revert(&*self, job_id, &package, started_at),
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
        self.result_ready(job_id);
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
    pub fn recover(self: &Arc<Self>) -> Result<(), LoadError> {
        let now = now_ms();
        self.journal.prune(now, KEEP_JOBS_MS)?;
        self.inbox.prune(now)?;
        let updating = crate::selfupdate::pending(&self.state_dir).map(|p| p.job_id);
        let (orphans, resume) = self.journal.recover(now, updating)?;
        for marker in orphans {
            // Interrupted means stopped: what the dead agent left running goes too.
            exec::kill_orphans(&marker);
        }
        for resume in resume {
            match resume.envelope.open(&self.keys) {
                Ok(Statement::Order(order)) => {
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
                    self.spawn(Job {
                        job_id: resume.job_id,
                        action: order.action,
                        bundle,
                        ticket,
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

// === impl Ledger for Agent ===

impl Ledger for Agent {
    fn known(&self, job_id: JobId) -> Result<Option<Known>, JournalError> {
        self.journal.known(job_id)
    }

    fn history(&self, order_id: &str) -> History {
        self.journal.history(order_id).unwrap_or(History::Unseen)
    }

    fn vet_release(
        &self,
        spec: &InstallSpec,
        bundle: Option<&Bundle>,
        now: Millis,
    ) -> Result<(), Refusal> {
        update::check(self, spec, bundle, now).map(|_| ())
    }

    fn message_seen(&self, message_id: &[u8; 16]) -> Result<bool, JournalError> {
        self.inbox.seen(message_id).map_err(into_journal)
    }

    fn blocked(&self, sender: &str) -> Result<bool, JournalError> {
        self.inbox.is_blocked(sender).map_err(into_journal)
    }
}

/// An inbox lookup's error as the machine's ledger reports it.
fn into_journal(e: InboxError) -> JournalError {
    match e {
        InboxError::Journal(e) => e,
        other => JournalError::Corrupt(other.to_string()),
    }
}

// === impl update::Context for Agent ===

impl update::Context for Agent {
    fn keys(&self) -> &[PublicKey] {
        Agent::keys(self)
    }
    fn journal(&self) -> &Journal {
        Agent::journal(self)
    }
    fn state_dir(&self) -> &Path {
        Agent::state_dir(self)
    }
    fn config(&self) -> &AgentConfig {
        Agent::config(self)
    }
    fn kill_grace(&self) -> Duration {
        Agent::kill_grace(self)
    }
    fn https_client(&self) -> Result<reqwest::Client, crate::tls::TlsError> {
        Agent::https_client(self)
    }
    fn tell_server(&self, msg: AgentMsg) {
        Agent::tell_server(self, msg)
    }
    fn result_ready(&self, job_id: JobId) {
        Agent::result_ready(self, job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::Filter;
    use herald_shared::envelope::{Audience, PublicKey};
    use herald_shared::message::{Message, Priority, Report};

    fn agent(name: &str, read_receipts: bool) -> (Arc<Agent>, Identity, Events, PathBuf) {
        let dir = std::env::temp_dir().join(format!("herald-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = AgentConfig {
            server: "127.0.0.1:1".into(),
            ca_fingerprint: "00".repeat(32),
            operator_keys: vec!["11".repeat(32)],
            agent_id: "unused".into(),
            token_groups: Vec::new(),
            policy: Default::default(),
            update: Default::default(),
            session: Default::default(),
            messages: Default::default(),
            peers: Default::default(),
        };
        config.messages.read_receipts = read_receipts;
        config.save(&dir).unwrap();
        let (agent, identity, events) = Agent::load(&dir, &Options::default()).unwrap();
        (agent, identity, events, dir)
    }

    fn arrival(agent: &Agent) -> Arrival {
        let at = now_ms();
        Arrival {
            job_id: 1,
            message: Message {
                id: [1; 16],
                sender: "card".into(),
                audience: Audience::All,
                title: "Payment due".into(),
                body: "Friday.".into(),
                priority: Priority::Normal,
                issued_at: at,
                expires_at: at + 3_600_000,
                collapse: None,
                advertising: false,
                link: None,
                grant: Envelope {
                    signer: PublicKey([0; 32]),
                    payload: Vec::new(),
                    signature: Vec::new(),
                },
            },
            display_name: "Card Company".into(),
            hash: [2; 32],
            at: agent.guarded_now(),
        }
    }

    fn ready(events: &mut Events) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(input) = events.try_recv() {
            if let Input::ReportsReady(s) = input {
                seqs.extend(s);
            }
        }
        seqs
    }

    #[test]
    fn notice_events_mark_the_inbox_and_sign_what_the_settings_allow() {
        let (agent, identity, mut events, dir) = agent("notices", false);
        let stored = agent.keep_message(&arrival(&agent)).unwrap();
        let id = hex::encode([1u8; 16]);
        agent.notice_event(NoticeEvent::Displayed {
            message_id: id.clone(),
        });
        agent.notice_event(NoticeEvent::Opened {
            message_id: id.clone(),
        });
        // Read receipts are off: displayed is reported, read is not.
        let seqs = ready(&mut events);
        assert_eq!(seqs.len(), 1);
        let report = agent.inbox().report(seqs[0]).unwrap().unwrap();
        assert!(matches!(
            report.verify(&identity.public_key).unwrap(),
            Report::Receipt(r) if r.state.as_str() == "displayed"
        ));
        let entry = agent.inbox().entry(&id).unwrap();
        assert!(entry.read_at.is_some() && entry.displayed_at.is_some());
        agent.notice_event(NoticeEvent::Block {
            message_id: id.clone(),
            sender: "card".into(),
        });
        let seqs = ready(&mut events);
        assert_eq!(seqs.len(), 1);
        assert!(matches!(
            agent.inbox().report(seqs[0]).unwrap().unwrap().verify(&identity.public_key).unwrap(),
            Report::Block(b) if b.blocked && b.by == "notification"
        ));
        assert!(agent.inbox().is_blocked("card").unwrap());
        // Unknown ids and a second block change nothing.
        agent.notice_event(NoticeEvent::Opened {
            message_id: "ff".into(),
        });
        agent.notice_event(NoticeEvent::Block {
            message_id: id,
            sender: "card".into(),
        });
        assert!(ready(&mut events).is_empty());
        assert_eq!(agent.inbox().report_seqs().unwrap().len(), 3);
        assert!(agent.inbox().report_seqs().unwrap().contains(&stored));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_receipts_when_enabled_and_the_machine_starts_with_the_waiting_reports() {
        let (agent, _, mut events, dir) = agent("read", true);
        let stored = agent.keep_message(&arrival(&agent)).unwrap();
        agent.notice_event(NoticeEvent::Opened {
            message_id: hex::encode([1u8; 16]),
        });
        let read = ready(&mut events);
        assert_eq!(read.len(), 1);
        assert_eq!(
            agent
                .inbox()
                .list(&Filter {
                    sender: None,
                    unread: true
                })
                .unwrap(),
            Vec::new()
        );
        let machine = agent.machine().unwrap();
        assert_eq!(machine.reports().collect::<Vec<_>>(), vec![stored, read[0]]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
