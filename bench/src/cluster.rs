//! A real `herald-server` process for the benchmark: initialised in a scratch directory,
//! with the swarm's identities enrolled directly in its database (enrolling 100,000
//! agents one handshake at a time would measure enrollment, not the relay), and an admin
//! client that signs orders and sender grants with the operator key like the CLI does,
//! and messages with a sender key like `herald-server message send`.
//!
//! Several nodes on one PostgreSQL database ([`Cluster::init_nodes`]) are made as an
//! operator makes them (docs/SCALE-OUT.md): `init --database-url` once, the data
//! directory copied for every other node, each given its own listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;

use herald_server::cli::client::Client;
use herald_server::config::ServerConfig;
use herald_server::config::{self, AdminConfig};
use herald_server::model::{
    CampaignCreated, CampaignStatus, CreateCampaign, CreateJobs, CreateSender, Created,
    ListUploaded, MessageCreated, MessageDetail, MessageInfo, SendMessage,
};
use herald_shared::codec;
use herald_shared::envelope::{
    Action, Audience, Envelope, OperatorKey, Order, Repeat, RunSpec, Statement, VendorKey,
};
use herald_shared::message::{Message, Priority, SenderGrant, DEFAULT_TTL_MS};
use herald_shared::protocol::JobId;

use crate::swarm::SimAgent;

/// Environment variable with the server's log filter (`HERALD_LOG` for the server
/// process; `warn` when unset), e.g. `debug` to see why links ended.
pub const SERVER_LOG_ENV: &str = "HERALD_BENCH_SERVER_LOG";

/// A sender registered with the server: its name, its key (which stays with the sender:
/// the server never holds it) and the operator's grant that its messages carry.
pub struct Sender {
    /// Sender name.
    pub name: String,
    key: VendorKey,
    grant: Envelope,
}

impl Sender {
    /// A message to `audience` signed with the sender's key, as `herald-server message
    /// send` makes it: base64 of the encoded envelope, as the API takes it.
    pub fn signed_message(&self, audience: Audience) -> anyhow::Result<String> {
        let now = herald_server::now_ms();
        let message = Message {
            id: herald_server::random_bytes(),
            sender: self.name.clone(),
            audience,
            title: "Benchmark".into(),
            body: "A push message from herald-bench.".into(),
            priority: Priority::Normal,
            issued_at: now,
            expires_at: now + DEFAULT_TTL_MS,
            collapse: None,
            advertising: false,
            link: None,
            grant: self.grant.clone(),
        };
        let envelope = self.key.sign(&Statement::Message(message))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(codec::to_bytes(&envelope)?))
    }
}

/// The server process and what the benchmark needs to drive it.
pub struct Cluster {
    /// Scratch directory.
    pub dir: PathBuf,
    /// QUIC address.
    pub quic: SocketAddr,
    bin_dir: PathBuf,
    child: Option<Child>,
    client: Client,
    operator: OperatorKey,
    /// CA fingerprint agents pin.
    pub fingerprint: [u8; 32],
}

impl Cluster {
    /// Initialises a server in `dir` on free loopback ports (not started yet).
    pub async fn init(dir: &Path, bin_dir: &Path) -> anyhow::Result<Cluster> {
        let quic = format!("127.0.0.1:{}", free_port()?);
        let http = format!("127.0.0.1:{}", free_port()?);
        init_data(&dir.join("server"), bin_dir, &quic, &quic, &http, None)?;
        Cluster::open(dir, bin_dir, &quic, None)
    }

    /// Initialises `nodes` servers sharing the PostgreSQL database at `database_url`
    /// (empty), each in `dir/node-I` on free loopback ports, with every node's QUIC
    /// address in `public_addr` (not started yet).
    pub async fn init_nodes(
        dir: &Path,
        bin_dir: &Path,
        database_url: &str,
        nodes: usize,
    ) -> anyhow::Result<Vec<Cluster>> {
        anyhow::ensure!(nodes > 0, "no nodes to make");
        let listen = (0..nodes)
            .map(|_| {
                Ok((
                    format!("127.0.0.1:{}", free_port()?),
                    format!("127.0.0.1:{}", free_port()?),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let public = listen
            .iter()
            .map(|(quic, _)| quic.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let first = dir.join("node-0").join("server");
        let (quic, http) = &listen[0];
        init_data(&first, bin_dir, &public, quic, http, Some(database_url))?;
        let mut clusters = Vec::with_capacity(nodes);
        for (i, (quic, http)) in listen.iter().enumerate() {
            let node_dir = dir.join(format!("node-{i}"));
            let url = if i == 0 {
                None
            } else {
                copy_dir(&first, &node_dir.join("server"))?;
                Some(format!("https://{http}"))
            };
            let node = Cluster::open(&node_dir, bin_dir, quic, url.as_deref())?;
            node.configure(|server| {
                server.quic_listen = quic.parse().expect("formatted from a socket address");
                server.http_listen = http.parse().expect("formatted from a socket address");
            })?;
            clusters.push(node);
        }
        Ok(clusters)
    }

    /// The cluster in `dir` after `init`: its admin client (to `api_url` rather than
    /// admin.toml's when given) and the keys.
    fn open(
        dir: &Path,
        bin_dir: &Path,
        quic: &str,
        api_url: Option<&str>,
    ) -> anyhow::Result<Cluster> {
        let data = dir.join("server");
        let admin = AdminConfig::load(&data.join(config::ADMIN_CONFIG))?;
        let operator = OperatorKey::from_hex(&std::fs::read_to_string(&admin.operator_key)?)?;
        let ca = herald_server::pki::load_cert(&admin.ca_cert)?;
        let client = Client::new(&admin, api_url)?;
        Ok(Cluster {
            dir: dir.to_path_buf(),
            quic: quic.parse()?,
            bin_dir: bin_dir.to_path_buf(),
            child: None,
            client,
            operator,
            fingerprint: herald_server::pki::fingerprint(&ca),
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("server")
    }

    /// Edits `herald.toml` (before the server starts, or before a restart).
    pub fn configure(&self, edit: impl FnOnce(&mut ServerConfig)) -> anyhow::Result<()> {
        let path = self.data_dir().join(config::SERVER_CONFIG);
        let mut server: ServerConfig = config::load_toml(&path)?;
        edit(&mut server);
        config::save_toml(&path, &server)?;
        Ok(())
    }

    /// Enrolls identities by writing them into the database (server not running): the
    /// SQLite file, or the PostgreSQL database `[database] url` names (for several
    /// nodes, through any one of them).
    pub fn enroll(&self, agents: &[SimAgent]) -> anyhow::Result<()> {
        if let Some(url) = config::DatabaseConfig::of(&self.data_dir())?.url {
            return enroll_postgres(&url, agents);
        }
        let mut db = rusqlite::Connection::open(self.data_dir().join("herald.db"))?;
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO agents (id, name, public_key, enrolled_at) VALUES (?1, ?2, ?3, 0)",
            )?;
            for (i, agent) in agents.iter().enumerate() {
                insert.execute(rusqlite::params![
                    agent.id,
                    format!("sim-{i}"),
                    agent.public_key
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Starts `herald-server serve` and waits until its API answers.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let child = Command::new(self.bin_dir.join("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("serve")
            .env(
                "HERALD_LOG",
                std::env::var(SERVER_LOG_ENV).unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning herald-server")?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self
                .client
                .get::<serde_json::Value>("/api/v1/health")
                .await
                .is_ok()
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "server did not start within 30 s; see {}",
                    self.dir.join("server.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server: SIGTERM (graceful) or SIGKILL.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let signal = if kill {
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            let _ = nix::sys::signal::kill(pid, signal);
            let _ = child.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Signs a one-off order like the CLI and creates its jobs; returns their ids.
    pub async fn post_job(&self, audience: Audience) -> anyhow::Result<Vec<JobId>> {
        let now = herald_server::now_ms();
        let order = Order {
            id: herald_server::random_bytes(),
            audience,
            issued_at: now,
            not_before: now - 60_000,
            not_after: now + 3_600_000,
            repeat: Repeat::Once,
            action: Action::Run(RunSpec {
                program: "/bin/true".into(),
                args: Vec::new(),
                timeout_ms: 10_000,
                run_as: None,
            }),
        };
        let envelope = self.operator.sign(&Statement::Order(order))?;
        let envelope =
            base64::engine::general_purpose::STANDARD.encode(codec::to_bytes(&envelope)?);
        let created: Created = self
            .client
            .post(
                "/api/v1/jobs",
                &CreateJobs {
                    envelope,
                    ttl_ms: 600_000,
                },
            )
            .await?;
        Ok(created.ids)
    }

    /// Registers a sender as `herald-server sender keygen` + `sender add` do: a fresh
    /// key, a grant signed with the operator key, `POST /api/v1/senders`.
    pub async fn add_sender(&self, name: &str) -> anyhow::Result<Sender> {
        let key = VendorKey::from_seed(herald_server::random_bytes());
        let grant = self.operator.sign(&Statement::Sender(SenderGrant {
            sender: name.into(),
            display_name: "Herald benchmark".into(),
            key: key.public(),
            advertising: false,
            issued_at: herald_server::now_ms(),
        }))?;
        let token = hex::encode(herald_server::random_bytes::<24>());
        let _: Created = self
            .client
            .post(
                "/api/v1/senders",
                &CreateSender {
                    envelope: base64::engine::general_purpose::STANDARD
                        .encode(codec::to_bytes(&grant)?),
                    token_hash: herald_shared::token::secret_hash(token.as_bytes()),
                },
            )
            .await
            .with_context(|| format!("registering sender {name}"))?;
        Ok(Sender {
            name: name.into(),
            key,
            grant,
        })
    }

    /// Signs a message with the sender's key as `herald-server message send` does and
    /// sends it now (`POST /api/v1/messages`).
    pub async fn send_message(
        &self,
        sender: &Sender,
        audience: Audience,
    ) -> anyhow::Result<MessageCreated> {
        let created: MessageCreated = self
            .client
            .post(
                "/api/v1/messages",
                &SendMessage {
                    envelope: sender.signed_message(audience)?,
                    deliver_at: None,
                },
            )
            .await?;
        Ok(created)
    }

    /// Uploads a recipient list (`POST /api/v1/lists`, the CSV as the body), as
    /// `herald-server message send --list` does.
    pub async fn upload_list(&self, csv: Vec<u8>) -> anyhow::Result<ListUploaded> {
        let length = csv.len() as u64;
        Ok(self
            .client
            .upload(
                reqwest::Method::POST,
                "/api/v1/lists",
                reqwest::Body::from(csv),
                length,
                "text/csv",
            )
            .await?)
    }

    /// Creates a campaign from an uploaded list (`POST /api/v1/campaigns`).
    pub async fn create_campaign(
        &self,
        campaign: &CreateCampaign,
    ) -> anyhow::Result<CampaignCreated> {
        Ok(self.client.post("/api/v1/campaigns", campaign).await?)
    }

    /// A campaign's figures (`GET /api/v1/messages/{id}/status`; the server reads every
    /// row of the campaign for it).
    pub async fn campaign_status(&self, id: &str) -> anyhow::Result<CampaignStatus> {
        Ok(self
            .client
            .get(&format!("/api/v1/messages/{id}/status"))
            .await?)
    }

    /// The newest message of `sender` with its counts (`GET /api/v1/messages?sender=S&limit=1`:
    /// the same counts as `GET /api/v1/messages/{id}` without one row per recipient, so
    /// polling it does not load the server with N rows a poll).
    pub async fn newest_message(&self, sender: &str) -> anyhow::Result<Option<MessageInfo>> {
        let list: Vec<MessageInfo> = self
            .client
            .get(&format!("/api/v1/messages?sender={sender}&limit=1"))
            .await?;
        Ok(list.into_iter().next())
    }

    /// One message with every recipient's state (`GET /api/v1/messages/{id}`).
    pub async fn message(&self, id: &str) -> anyhow::Result<MessageDetail> {
        Ok(self.client.get(&format!("/api/v1/messages/{id}")).await?)
    }

    /// The server's relay round-trip histogram (`herald_signal_ack_seconds`) now.
    pub async fn signal_rtt(&self) -> anyhow::Result<Vec<(f64, u64)>> {
        let text = self.client.get_text("/metrics").await?;
        let buckets = crate::stats::histogram_buckets(&text, "herald_signal_ack_seconds");
        anyhow::ensure!(
            !buckets.is_empty(),
            "no herald_signal_ack_seconds in /metrics"
        );
        Ok(buckets)
    }

    /// Waits until the relay round-trip histogram holds `more` samples beyond `before`
    /// (every acknowledgement of a broadcast read by the server); returns it then.
    pub async fn signal_rtt_count_reaches(
        &self,
        before: &[(f64, u64)],
        more: usize,
        deadline: Duration,
    ) -> anyhow::Result<Vec<(f64, u64)>> {
        let count = |h: &[(f64, u64)]| h.last().map_or(0, |(_, c)| *c);
        let start = Instant::now();
        loop {
            let now = self.signal_rtt().await?;
            let got = count(&now).saturating_sub(count(before));
            if got >= more as u64 {
                return Ok(now);
            }
            anyhow::ensure!(
                start.elapsed() < deadline,
                "the server read {got} of {more} acknowledgements within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A counter or gauge from the server's `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.client.get_text("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {name} in /metrics"))
    }

    /// The admin client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Directory of the Herald binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Runs `herald-server init` for a data directory `data`.
fn init_data(
    data: &Path,
    bin_dir: &Path,
    public: &str,
    quic: &str,
    http: &str,
    database_url: Option<&str>,
) -> anyhow::Result<()> {
    let mut init = Command::new(bin_dir.join("herald-server"));
    init.arg("--data-dir")
        .arg(data)
        .args(["init", "--public-addr", public, "--quic-listen", quic])
        .args(["--http-listen", http]);
    if let Some(url) = database_url {
        init.args(["--database-url", url]);
    }
    let output = init
        .stdout(Stdio::null())
        .output()
        .context("running herald-server init (build it first: cargo build --release)")?;
    if !output.status.success() {
        bail!(
            "herald-server init failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The SQLite path's insert on PostgreSQL, in one transaction, on a thread of its own
/// (the `postgres` client blocks on a runtime of its own, which tokio does not allow
/// inside its own).
fn enroll_postgres(url: &str, agents: &[SimAgent]) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| insert_agents(url, agents))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("enrolling on PostgreSQL panicked")))
    })
}

fn insert_agents(url: &str, agents: &[SimAgent]) -> anyhow::Result<()> {
    let mut db = postgres::Client::connect(url, postgres::NoTls)
        .with_context(|| format!("connecting to {}", herald_server::store::redact_url(url)))?;
    let mut tx = db.transaction()?;
    let insert = tx
        .prepare("INSERT INTO agents (id, name, public_key, enrolled_at) VALUES ($1, $2, $3, 0)")?;
    for (i, agent) in agents.iter().enumerate() {
        let name = format!("sim-{i}");
        let params: [&(dyn postgres::types::ToSql + Sync); 3] =
            [&agent.id, &name, &agent.public_key];
        tx.execute(&insert, &params)?;
    }
    tx.commit()?;
    Ok(())
}

/// Copies the directory `from` to `to` (which must not exist), files and folders.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// A free loopback port for both UDP and TCP.
pub fn free_port() -> anyhow::Result<u16> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    status_field(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// A `kB` or count field of `/proc/<pid>/status`.
pub fn status_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) a process has used.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(0) ... utime(11) stime(12), in clock ticks.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// UDP datagrams the kernel has dropped for full receive buffers, machine-wide
/// (`RcvbufErrors` in `/proc/net/snmp`); `None` where that is not readable.
pub fn udp_receive_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
}
