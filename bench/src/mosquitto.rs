//! The peer: the same fan-out through Mosquitto (TLS listener on loopback, N subscribers
//! on one topic, QoS 1). Written by a helper.
//!
//! [`Broker::start`] runs a private `mosquitto` process with its own CA, server
//! certificate and config in a directory of the caller's choosing; [`fanout`] connects
//! N rumqttc subscribers over TLS (rustls with the *ring* provider), publishes one
//! message per run and times its arrival at every subscriber.

use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Figures for one fan-out run.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// Subscribers that were connected (and all received the message).
    pub subscribers: usize,
    /// From just before the publish until the last subscriber had the message.
    pub all_received: Duration,
    /// Per subscriber (in subscriber order): receive time − publish time.
    pub latencies: Vec<Duration>,
}

/// A Mosquitto broker started for the benchmark (TLS on a loopback port, own config in
/// `dir`), killed on drop.
pub struct Broker {
    child: Child,
    port: u16,
    ca: CertificateDer<'static>,
    dir: PathBuf,
}

/// Where the broker binary is looked for before `PATH`.
const KNOWN_BINARIES: &[&str] = &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"];
/// How long the broker may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Subscribers connecting (TCP + TLS + CONNECT + SUBSCRIBE) at the same time.
const CONNECT_CONCURRENCY: usize = 256;
/// Attempts per subscriber to connect and subscribe before `fanout` gives up.
const CONNECT_ATTEMPTS: u32 = 5;
/// Per attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per published message (the run number, then filler), roughly a signed job.
const PAYLOAD_LEN: usize = 256;
/// File descriptors kept in reserve beyond one per subscriber.
const FD_RESERVE: u64 = 256;
/// The topic every subscriber listens on.
const TOPIC: &str = "herald/bench/job";

impl Broker {
    /// Starts `mosquitto` with a fresh CA and server certificate (ECDSA P-256, SAN
    /// 127.0.0.1) and a config written to `dir`, on a free loopback port, and waits until
    /// it accepts TCP connections. `Ok(None)` when no `mosquitto` binary is installed.
    pub fn start(dir: &Path) -> anyhow::Result<Option<Broker>> {
        let Some(binary) = find_binary() else {
            return Ok(None);
        };
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = write_certificates(dir)?;
        // The broker needs one descriptor per connection; children inherit our limits.
        raise_nofile(u64::MAX).context("raising the open-files limit")?;
        let mut last_error = None;
        // A free port can be taken between our probe and the broker's bind: retry.
        for _ in 0..3 {
            let port = free_port()?;
            match spawn_and_wait(&binary, dir, port) {
                Ok(child) => {
                    return Ok(Some(Broker {
                        child,
                        port,
                        ca,
                        dir: dir.to_path_buf(),
                    }))
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("mosquitto did not start")))
    }

    /// The loopback TLS port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's directory (config, certificates, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A rustls client configuration (ring provider) trusting the broker's CA.
    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `mosquitto` binary: a known location, else the first one on `PATH`.
fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    KNOWN_BINARIES
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path).map(|d| d.join("mosquitto")))
        .find(|p| p.is_file())
}

/// Writes `ca.pem`, `server.pem` and `server.key` into `dir`; returns the CA certificate.
fn write_certificates(dir: &Path) -> anyhow::Result<CertificateDer<'static>> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Herald bench Mosquitto CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::DnsName("localhost".try_into()?),
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, "Herald bench Mosquitto");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    fs::write(dir.join("server.pem"), server_cert.pem())?;
    fs::write(dir.join("server.key"), server_key.serialize_pem())?;
    Ok(ca_cert.der().clone())
}

/// The broker configuration for a TLS listener on `127.0.0.1:port`, files in `dir`.
fn config_text(dir: &Path, port: u16, as_root: bool) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut conf = String::new();
    if as_root {
        // Mosquitto would otherwise drop to the `mosquitto` user, which may not be able
        // to read the key or write the log in `dir`.
        conf.push_str("user root\n");
    }
    conf.push_str(&format!(
        "per_listener_settings false\n\
         allow_anonymous true\n\
         persistence false\n\
         max_connections -1\n\
         max_inflight_messages 100\n\
         max_queued_messages 10000\n\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         connection_messages false\n\
         listener {port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n",
        log = file("mosquitto.log"),
        ca = file("ca.pem"),
        cert = file("server.pem"),
        key = file("server.key"),
    ));
    conf
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Writes the config for `port`, starts the broker and waits until it listens.
fn spawn_and_wait(binary: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let conf_path = dir.join("mosquitto.conf");
    let as_root = nix::unistd::geteuid().is_root();
    fs::write(&conf_path, config_text(dir, port, as_root))?;
    let out_path = dir.join("mosquitto.out");
    let out = fs::File::create(&out_path)?;
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mosquitto exited ({status}) on port {port}: {}{}",
                read_tail(&out_path),
                read_tail(&dir.join("mosquitto.log"))
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "mosquitto did not listen on port {port} within {START_DEADLINE:?}: {}",
                read_tail(&out_path)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last kilobyte of a file, for error messages.
fn read_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(1024);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text[start..].trim().to_string()
}

/// Whether `n` subscribers fit under the open-files limit (one TCP socket each, in the
/// broker and in this process), raising it as far as allowed: `Err((needed, limit))` if not.
pub fn open_files_for(n: usize) -> anyhow::Result<Result<(), (u64, u64)>> {
    let need = n as u64 + FD_RESERVE;
    let have = raise_nofile(need).context("raising the open-files limit")?;
    Ok(if have < need {
        Err((need, have))
    } else {
        Ok(())
    })
}

/// Raises the soft open-files limit towards `want` (at most the hard limit); returns the
/// soft limit now in force.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    let new = want.min(hard);
    if new > soft {
        setrlimit(Resource::RLIMIT_NOFILE, new, hard)?;
    }
    Ok(new.max(soft))
}

/// Message body: the run number (little-endian u64), then filler up to [`PAYLOAD_LEN`].
fn encode_payload(run: u64) -> Vec<u8> {
    let mut payload = vec![b'.'; PAYLOAD_LEN];
    payload[..8].copy_from_slice(&run.to_le_bytes());
    payload
}

/// The run number of a message body, if it is one of ours.
fn decode_payload(payload: &[u8]) -> Option<u64> {
    if payload.len() != PAYLOAD_LEN {
        return None;
    }
    Some(u64::from_le_bytes(payload[..8].try_into().ok()?))
}

/// What subscriber tasks report.
#[derive(Debug)]
enum Report {
    /// Subscriber `.0` received run `.1`'s message at `.2`.
    Received(usize, u64, Instant),
    /// Subscriber `.0` lost its connection after subscribing.
    Lost(usize, String),
}

/// Arrivals of one run's message, first one per subscriber.
#[derive(Debug)]
struct Tally {
    run: u64,
    published: Instant,
    arrived: Vec<Option<Instant>>,
    count: usize,
}

impl Tally {
    fn new(run: u64, subscribers: usize, published: Instant) -> Self {
        Tally {
            run,
            published,
            arrived: vec![None; subscribers],
            count: 0,
        }
    }

    /// Records an arrival (duplicates and other runs' messages are ignored); true once
    /// every subscriber has the message.
    fn record(&mut self, subscriber: usize, run: u64, at: Instant) -> bool {
        if run == self.run {
            if let Some(slot @ None) = self.arrived.get_mut(subscriber) {
                *slot = Some(at);
                self.count += 1;
            }
        }
        self.complete()
    }

    fn complete(&self) -> bool {
        self.count == self.arrived.len()
    }

    fn finish(self) -> Fanout {
        let latencies: Vec<Duration> = self
            .arrived
            .iter()
            .flatten()
            .map(|at| at.saturating_duration_since(self.published))
            .collect();
        Fanout {
            subscribers: self.arrived.len(),
            all_received: latencies.iter().copied().max().unwrap_or_default(),
            latencies,
        }
    }
}

/// Distinguishes client ids of concurrent or successive `fanout` calls in one process.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Connects `n` QoS-1 subscribers over TLS to one topic, then publishes `runs` messages
/// one after another (waiting for all n to receive each before the next), returning one
/// Fanout per run. Latency per subscriber = receive time − publish time.
pub async fn fanout(broker: &Broker, n: usize, runs: usize) -> anyhow::Result<Vec<Fanout>> {
    if let Err((need, have)) = open_files_for(n)? {
        bail!("{n} subscribers need about {need} open files; the limit is {have}");
    }
    let tls = broker.client_config()?;
    let prefix = format!(
        "hb-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    );
    let options = |id: String| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())))
            .set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_inflight(100);
        o
    };

    // Every task lives in `tasks`; dropping it (also on error) aborts them all.
    let mut tasks = JoinSet::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<Report>();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    for index in 0..n {
        let options = options(format!("{prefix}-s{index}"));
        let (gate, ready_tx, report_tx) = (gate.clone(), ready_tx.clone(), report_tx.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await;
            let connected = subscribe_with_retries(options).await;
            drop(permit);
            match connected {
                Ok((client, eventloop)) => {
                    let _ = ready_tx.send(Ok(()));
                    receive(index, client, eventloop, report_tx).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.context(format!("subscriber {index}"))));
                }
            }
        });
    }
    drop((ready_tx, report_tx));

    let (publisher, mut pub_loop) = AsyncClient::new(options(format!("{prefix}-pub")), 16);
    // Connected before the first publish, so no run pays for the handshake.
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = pub_loop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("publisher: no CONNACK in time")?
    .context("publisher")?;
    let (pub_err_tx, mut pub_err_rx) = mpsc::unbounded_channel::<String>();
    tasks.spawn(async move {
        loop {
            if let Err(e) = pub_loop.poll().await {
                let _ = pub_err_tx.send(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let connect_deadline =
        tokio::time::Instant::now() + CONNECT_TIMEOUT + Duration::from_millis(10 * n as u64);
    for connected in 0..n {
        match tokio::time::timeout_at(connect_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => bail!("subscriber tasks ended early ({connected} of {n} subscribed)"),
            Err(_) => bail!("only {connected} of {n} subscribers subscribed in time"),
        }
    }

    let mut results = Vec::with_capacity(runs);
    for run in 0..runs as u64 {
        let payload = encode_payload(run);
        let published = Instant::now();
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, payload)
            .await
            .context("queueing the publish")?;
        let mut tally = Tally::new(run, n, published);
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while !tally.complete() {
            tokio::select! {
                report = report_rx.recv() => match report {
                    Some(Report::Received(index, r, at)) => {
                        tally.record(index, r, at);
                    }
                    Some(Report::Lost(index, e)) => {
                        bail!("subscriber {index} lost its connection during run {run}: {e}")
                    }
                    None => bail!("subscriber tasks ended during run {run}"),
                },
                Some(e) = pub_err_rx.recv() => bail!("publisher connection failed: {e}"),
                _ = tokio::time::sleep_until(deadline) => bail!(
                    "run {run}: only {} of {n} subscribers received the message within {:?}",
                    tally.count,
                    CONNECT_TIMEOUT
                ),
            }
        }
        results.push(tally.finish());
    }
    let _ = publisher.try_disconnect();
    tasks.shutdown().await;
    Ok(results)
}

/// Connects and subscribes, retrying a few times on a fresh client (a refused or reset
/// connection when the broker is busy accepting).
async fn subscribe_with_retries(options: MqttOptions) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut last = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, subscribe_once(options.clone())).await {
            Ok(Ok(pair)) => return Ok(pair),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow!("no SUBACK within {CONNECT_TIMEOUT:?}")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("not attempted")))
}

/// One attempt: connect, subscribe to [`TOPIC`] at QoS 1, wait for the SUBACK.
async fn subscribe_once(options: MqttOptions) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(TOPIC, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await? {
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure))
            {
                bail!("the broker refused the subscription");
            }
            return Ok((client, eventloop));
        }
    }
}

/// Drives a subscribed client, reporting each message's arrival time, until the
/// connection fails (reported) or the task is aborted.
async fn receive(
    index: usize,
    client: AsyncClient,
    mut eventloop: EventLoop,
    reports: mpsc::UnboundedSender<Report>,
) {
    // Keeps the request channel open: the event loop ends once every client is dropped.
    let _client = client;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                if let Some(run) = decode_payload(&p.payload) {
                    let _ = reports.send(Report::Received(index, run, at));
                }
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let _ = reports.send(Report::Lost(index, e.to_string()));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir.
    fn scratch(name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "herald-bench-{name}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn payload_round_trips_and_rejects_strangers() {
        let p = encode_payload(7);
        assert_eq!(p.len(), PAYLOAD_LEN);
        assert_eq!(decode_payload(&p), Some(7));
        assert_eq!(decode_payload(b"hello"), None);
    }

    #[test]
    fn tally_ignores_duplicates_and_other_runs() {
        let t0 = Instant::now();
        let mut tally = Tally::new(1, 3, t0);
        assert!(!tally.record(0, 1, t0 + Duration::from_millis(5)));
        assert!(!tally.record(0, 1, t0 + Duration::from_millis(50)));
        assert!(!tally.record(1, 0, t0 + Duration::from_millis(1)));
        assert!(!tally.record(9, 1, t0 + Duration::from_millis(1)));
        assert!(!tally.record(2, 1, t0 + Duration::from_millis(9)));
        assert!(tally.record(1, 1, t0 + Duration::from_millis(7)));
        let f = tally.finish();
        assert_eq!(f.subscribers, 3);
        assert_eq!(
            f.latencies,
            [5, 7, 9].map(Duration::from_millis).to_vec(),
            "first arrival per subscriber, in subscriber order"
        );
        assert_eq!(f.all_received, Duration::from_millis(9));
    }

    #[test]
    fn config_listens_on_loopback_with_tls() {
        let dir = Path::new("/tmp/x");
        let conf = config_text(dir, 18883, false);
        for line in [
            "listener 18883 127.0.0.1",
            "cafile /tmp/x/ca.pem",
            "certfile /tmp/x/server.pem",
            "keyfile /tmp/x/server.key",
            "allow_anonymous true",
            "max_connections -1",
            "persistence false",
        ] {
            assert!(conf.lines().any(|l| l == line), "missing {line:?}");
        }
        assert!(!conf.contains("user root"));
        assert!(config_text(dir, 1, true).starts_with("user root\n"));
    }

    #[test]
    fn certificates_are_written() {
        let dir = scratch("certs");
        write_certificates(&dir).unwrap();
        for f in ["ca.pem", "server.pem", "server.key"] {
            assert!(fs::metadata(dir.join(f)).unwrap().len() > 0);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fanout_to_fifty_subscribers() {
        let dir = scratch("mosquitto");
        let Some(broker) = Broker::start(&dir).unwrap() else {
            println!("skipped: mosquitto not installed");
            fs::remove_dir_all(&dir).unwrap();
            return;
        };
        let results = fanout(&broker, 50, 2).await.unwrap();
        assert_eq!(results.len(), 2);
        for f in &results {
            assert_eq!(f.subscribers, 50);
            assert_eq!(f.latencies.len(), 50);
            assert!(f.all_received > Duration::ZERO);
        }
        drop(broker);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The figures for the report: `cargo test -p herald-bench --lib -- --ignored
    /// --nocapture mosquitto` (add `--release` for representative numbers).
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "slow: 1,000 and 10,000 subscribers"]
    async fn fanout_figures() {
        use crate::stats::{median, ms, percentile};
        let dir = scratch("mosquitto-figures");
        let Some(broker) = Broker::start(&dir).unwrap() else {
            println!("skipped: mosquitto not installed");
            return;
        };
        for n in [1_000, 10_000] {
            let started = Instant::now();
            let results = fanout(&broker, n, 3).await.unwrap();
            let all: Vec<Duration> = results.iter().map(|f| f.all_received).collect();
            let p50: Vec<Duration> = results.iter().map(|f| median(&f.latencies)).collect();
            let p99: Vec<Duration> = results
                .iter()
                .map(|f| percentile(&f.latencies, 99.0))
                .collect();
            println!(
                "n={n}: all_received median {} ms (runs {:?}); p50 median {} ms; p99 median {} ms; \
                 total incl. connect {:.1} s",
                ms(median(&all)),
                all.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                ms(median(&p50)),
                ms(median(&p99)),
                started.elapsed().as_secs_f64()
            );
        }
        drop(broker);
        fs::remove_dir_all(&dir).unwrap();
    }
}
