//! `herald-server serve`: opens the store, binds the QUIC and HTTPS ports, and runs the
//! relay, the scheduler and the admin API until a shutdown signal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::config::{ConfigError, ServerConfig};
use crate::pki::{self, Keyring};
use crate::relay::Relay;
use crate::store::{Store, StoreError};
use crate::ticket::Tickets;
use crate::{https, scheduler};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The console's configured certificate (`[https] cert_file`, `key_file`).
    #[error("[https] certificate: {0}")]
    Certificate(#[from] https::CertificateError),
    /// The console's ticket key cannot be read or created.
    #[error("cannot read or create {path}: {source}")]
    Key {
        /// Key file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is another server running?")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running server: its bound addresses and a handle to stop it.
pub struct Running {
    /// Bound QUIC address.
    pub quic_addr: SocketAddr,
    /// Bound HTTPS address.
    pub http_addr: SocketAddr,
    /// Bound plain-HTTP loopback address (`[https] plain_http_listen`), if any.
    pub plain_http_addr: Option<SocketAddr>,
    /// Bound address of the `[metrics]` listener, if configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The relay (for the demo's live output).
    pub relay: Arc<Relay>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops every task and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Overrides from flags and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// QUIC listen address.
    pub quic_listen: Option<SocketAddr>,
    /// HTTPS listen address.
    pub http_listen: Option<SocketAddr>,
}

/// Loads everything and starts serving. All configuration is read and validated, and
/// both ports bound, before this returns.
pub async fn start(data_dir: &Path, overrides: &Overrides) -> Result<Running, ServeError> {
    let mut config = ServerConfig::load(data_dir)?;
    crate::forward::validate_config(&config).map_err(|reason| ConfigError::Invalid {
        path: crate::config::server_config_path(data_dir),
        reason,
    })?;
    if let Some(addr) = overrides.quic_listen {
        config.quic_listen = addr;
    }
    if let Some(addr) = overrides.http_listen {
        config.http_listen = addr;
    }
    let pki = pki::load(data_dir)?;
    let certificates = Arc::new(https::Certificates::load(
        &pki,
        config
            .https
            .cert_file
            .as_deref()
            .zip(config.https.key_file.as_deref()),
    )?);
    config
        .database
        .check()
        .map_err(|reason| ConfigError::Invalid {
            path: crate::config::server_config_path(data_dir),
            reason,
        })?;
    let store = Store::open_database(data_dir, config.database.url.as_deref())?;
    if let Some(billing) = &config.billing {
        crate::billing::set_plans_file(&store, &billing.plans_file, crate::now_ms()).map_err(
            |reason| ConfigError::Invalid {
                path: billing.plans_file.clone(),
                reason,
            },
        )?;
    }
    let keyring = Arc::new(Keyring::new(store.agent_keys()?));
    let quic_config = pki::quic_server_config(&pki, keyring.clone())?;
    let bind_err = |source| ServeError::Bind {
        addr: config.quic_listen,
        what: "QUIC, udp",
        source,
    };
    let socket = quic_socket(config.quic_listen).map_err(bind_err)?;
    let endpoint = quinn::Endpoint::new(
        pki::endpoint_config(data_dir)?,
        Some(quic_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)?;
    let quic_addr = endpoint.local_addr().map_err(|source| ServeError::Bind {
        addr: config.quic_listen,
        what: "QUIC, udp",
        source,
    })?;
    let (listener, http_addr) = bind_tcp(config.http_listen, "admin API, tcp").await?;

    let agent_url = agent_url(&config, http_addr.port(), &certificates).map_err(|reason| {
        ConfigError::Invalid {
            path: crate::config::server_config_path(data_dir),
            reason,
        }
    })?;
    let plain = match config.https.plain_http_listen {
        Some(addr) => Some(bind_tcp(addr, "plain HTTP for a proxy, tcp").await?),
        None => None,
    };
    let metrics_listener = match &config.metrics {
        Some(metrics) => {
            // Checked when the configuration was loaded.
            let addr = metrics
                .listen_addr()
                .map_err(|reason| ConfigError::Invalid {
                    path: data_dir.join(crate::config::SERVER_CONFIG),
                    reason,
                })?;
            Some(bind_tcp(addr, "metrics, tcp").await?)
        }
        None => None,
    };
    let plain_http_addr = plain.as_ref().map(|(_, addr)| *addr);
    let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);

    let tickets = Tickets::load_or_create(data_dir).map_err(|source| ServeError::Key {
        path: data_dir.join(crate::ticket::KEY_FILE),
        source,
    })?;
    let relay = Relay::new(
        store.clone(),
        keyring,
        format!("{agent_url}/api/v1/artifacts"),
        tickets.clone(),
    );
    // What the leaders' loops wait on, and what this node's API pokes: the same on
    // SQLite; in a cluster the API's pokes go round through the database to whichever
    // node leads (crate::cluster).
    let wakes = crate::cluster::Wakes::default();
    let local = if store.postgres_url().is_some() {
        crate::cluster::Wakes::default()
    } else {
        wakes.clone()
    };
    let node = crate::cluster::Node::new(
        store.clone(),
        relay.clone(),
        node_id(&quic_addr),
        config.node_addr(quic_addr),
        http_addr.to_string(),
    );
    let (stop, stopped) = watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut forward_settings = crate::forward::Settings::from_config(&config);
    forward_settings.fallbacks = wakes.fallbacks.clone();
    // Bound above; false again if the relay stops serving it.
    let quic_serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let state = ApiState {
        store: store.clone(),
        relay: relay.clone(),
        scheduler: local.scheduler.clone(),
        operator_keys: Arc::new(config.operator_keys()),
        artifacts: data_dir.join(crate::api::releases::ARTIFACT_DIR),
        rollouts: local.rollouts.clone(),
        lists: data_dir.join(crate::api::campaigns::LIST_DIR),
        public_url: config.public_url(http_addr.port()),
        fallbacks: local.fallbacks.clone(),
        sms_report_secret: config.sms.as_ref().and_then(|s| s.report_secret.clone()),
        quic_serving: quic_serving.clone(),
        install_site: Arc::new(crate::api::install::InstallSite::load(data_dir, &agent_url)),
        node: node.clone(),
        fallback_media: [
            (config.sms.is_some(), crate::model::Fallback::Sms),
            (config.smtp.is_some(), crate::model::Fallback::Email),
        ]
        .into_iter()
        .filter_map(|(set_up, medium)| set_up.then_some(medium))
        .collect(),
    };
    // Built before any task starts, so that an error leaves nothing running.
    let tls = certificates.clone().tls_config()?;
    let site = https::Site {
        router: api::router(state.clone()).merge(crate::console::router(
            crate::console::ConsoleState::new(
                state,
                tickets,
                config.console.clone(),
                crate::console::Enrollment::new(&config, &pki),
            )
            .with_http_webhooks(config.forwarding().allow_http),
        )),
        trusted_proxies: Arc::new(config.https.proxies()),
    };
    // systemd's watchdog (WatchdogSec= in the unit) is fed only while the database
    // takes writes and the QUIC endpoint serves: what /readyz checks.
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(feed_watchdog(
            store.clone(),
            quic_serving.clone(),
            period / 3,
            until_stopped(),
        ))
    });
    node.start(local, wakes.clone(), until_stopped())?;
    let mut tasks = vec![
        tokio::spawn({
            let relay = relay.clone();
            let serving = quic_serving.clone();
            let stopped = until_stopped();
            async move {
                relay.serve(endpoint, stopped).await;
                serving.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }),
        node.lead(
            "rollouts",
            {
                let (store, relay, wake, until) = (
                    store.clone(),
                    relay.clone(),
                    wakes.rollouts.clone(),
                    until_stopped.clone(),
                );
                move || {
                    crate::packages::rollout::run(
                        store.clone(),
                        relay.clone(),
                        wake.clone(),
                        until(),
                    )
                }
            },
            until_stopped(),
        ),
        node.lead(
            "forwarding",
            {
                let (store, relay, settings, until) = (
                    store.clone(),
                    relay.clone(),
                    forward_settings.clone(),
                    until_stopped.clone(),
                );
                move || {
                    crate::forward::run(store.clone(), relay.subscribe(), settings.clone(), until())
                }
            },
            until_stopped(),
        ),
        // The meter step: usage events from stored rows, every billing::METER_EVERY.
        node.lead(
            "meter",
            {
                let (store, until) = (store.clone(), until_stopped.clone());
                move || crate::billing::meter_periodically(store.clone(), until())
            },
            until_stopped(),
        ),
        node.lead(
            "scheduler",
            {
                let (store, relay, wake, until) = (
                    store.clone(),
                    relay.clone(),
                    wakes.scheduler.clone(),
                    until_stopped.clone(),
                );
                move || scheduler::run(store.clone(), relay.clone(), wake.clone(), until())
            },
            until_stopped(),
        ),
        tokio::spawn(https::serve(
            listener,
            Some(tls),
            site.clone(),
            until_stopped(),
        )),
        tokio::spawn(reload_on_hangup(certificates, until_stopped())),
    ];
    if let Some((listener, addr)) = plain {
        info!(%addr, "plain HTTP for a reverse proxy on loopback");
        tasks.push(tokio::spawn(https::serve(
            listener,
            None,
            site,
            until_stopped(),
        )));
    }
    if let Some((listener, _)) = metrics_listener {
        let stopped = until_stopped();
        let router = metrics_router(relay.clone(), node.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::warn!("metrics listener stopped: {e}");
            }
        }));
    }
    tasks.extend(watchdog);
    info!(%quic_addr, %http_addr, metrics = ?metrics_addr, "herald-server serving");
    Ok(Running {
        quic_addr,
        http_addr,
        plain_http_addr,
        metrics_addr,
        relay,
        stop,
        tasks,
    })
}

/// Sends systemd `WATCHDOG=1` every `every` while the server is healthy, until stopped.
async fn feed_watchdog(
    store: Store,
    quic_serving: Arc<std::sync::atomic::AtomicBool>,
    every: std::time::Duration,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    loop {
        match api::Readiness::check(&store, &quic_serving, every / 2) {
            api::Readiness {
                database: Ok(()),
                quic_serving: true,
            } => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            api::Readiness {
                database: Err(e), ..
            } => warn!("watchdog not fed: the database does not take writes: {e}"),
            api::Readiness { .. } => warn!("watchdog not fed: the QUIC endpoint is not serving"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut stopped => return,
        }
    }
}

/// The base URL agents download artifacts from: `[https] agent_url`, or `public_url`.
/// Agents trust only Herald's CA, so the listener must present Herald's certificate
/// there: refused when the configured public certificate covers its host.
fn agent_url(
    config: &ServerConfig,
    http_port: u16,
    certificates: &https::Certificates,
) -> Result<String, String> {
    let (url, key) = match &config.https.agent_url {
        Some(url) => (url.trim_end_matches('/').to_string(), "[https] agent_url"),
        None => (config.public_url(http_port), "public_url"),
    };
    let parsed = reqwest::Url::parse(&url).map_err(|e| format!("{key} {url:?}: {e}"))?;
    if let Some(host) = parsed.host_str() {
        if certificates.covers(host) {
            return Err(format!(
                "agents download artifacts from {url} ({key}), but [https] cert_file covers \
                 {host}, so they would be shown that certificate instead of Herald's, which \
                 they pin; set [https] agent_url to a URL of this listener by an address the \
                 certificate does not name, e.g. https://SERVER-IP:{http_port}"
            ));
        }
    }
    Ok(url)
}

/// Reads the console's certificate files again on every SIGHUP until `stopped`; a
/// reload that fails keeps the certificate in use and says why.
async fn reload_on_hangup(
    certificates: Arc<https::Certificates>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            warn!("cannot handle SIGHUP, certificates will not be reloaded: {e}");
            return;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            _ = &mut stopped => return,
        }
        match certificates.reload() {
            Ok(true) => info!("SIGHUP: reloaded the [https] certificate"),
            Ok(false) => info!("SIGHUP: no [https] cert_file configured, nothing to reload"),
            Err(e) => warn!("SIGHUP: kept the [https] certificate in use: {e}"),
        }
    }
}

/// Binds an extra TCP listener; returns it with the address it got.
async fn bind_tcp(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let bind_err = |source| ServeError::Bind { addr, what, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}

/// The `[metrics]` listener's routes: `GET /metrics` and nothing else (404 for any
/// other path, 405 for another method), in plain HTTP and without a token: it is meant
/// for a Prometheus on the same host or a private network, and shows counts only.
fn metrics_router(relay: Arc<Relay>, node: crate::cluster::Node) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { api::metrics_response(&relay, &node) }),
    )
}

/// Socket buffer the QUIC socket asks for. A burst of handshakes (a reconnect storm
/// after a restart) or of acknowledgements (a broadcast's, one per agent at once)
/// overflows the kernel's default (~200 KiB), and every dropped datagram costs its
/// connection a retransmission timeout. The kernel caps the request at
/// `net.core.rmem_max`, unless the server may override that (`CAP_NET_ADMIN`, as quic-go
/// does too).
const QUIC_SOCKET_BUFFER: usize = 16 * 1024 * 1024;

/// Binds a QUIC UDP socket with large buffers (the server's; the benchmark's swarm
/// binds its client sockets the same way).
pub fn quic_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer still works, it only drops more under bursts.
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{setsockopt, sockopt};
        // Past `rmem_max`/`wmem_max` where privileged; the kernel reports double what
        // was granted, so anything under the request means it was capped.
        if socket.recv_buffer_size().unwrap_or(0) < QUIC_SOCKET_BUFFER {
            let _ = setsockopt(&socket, sockopt::RcvBufForce, &QUIC_SOCKET_BUFFER);
        }
        if socket.send_buffer_size().unwrap_or(0) < QUIC_SOCKET_BUFFER {
            let _ = setsockopt(&socket, sockopt::SndBufForce, &QUIC_SOCKET_BUFFER);
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(data_dir: &Path, overrides: &Overrides) -> Result<(), ServeError> {
    let running = start(data_dir, overrides).await?;
    println!(
        "herald-server: QUIC on udp/{}, admin API on https://{}",
        running.quic_addr, running.http_addr
    );
    if let Some(addr) = running.plain_http_addr {
        println!("herald-server: plain HTTP for a reverse proxy on http://{addr}");
    }
    if let Some(addr) = running.metrics_addr {
        println!("herald-server: metrics on http://{addr}/metrics");
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    shutdown_signal().await;
    info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    running.stop().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The store of the server initialised in `data_dir`: the database its `herald.toml`
/// names, else SQLite's file there.
pub fn open_store(data_dir: &Path) -> Result<Store, OpenStoreError> {
    let database = crate::config::DatabaseConfig::of(data_dir)?;
    Ok(Store::open_database(data_dir, database.url.as_deref())?)
}

/// Why [`open_store`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// This node's id in a cluster: the host's name and the QUIC address it serves, stable
/// across restarts and distinct for nodes sharing a host.
fn node_id(quic_addr: &SocketAddr) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    format!("{host}/{quic_addr}")
}
