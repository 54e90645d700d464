//! `herald-server init`: creates the data directory, database, CA and server
//! certificate, operator key and admin token, and writes both configuration files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herald_io::files;
use herald_shared::envelope::OperatorKey;

use crate::config::{self, AdminConfig, ServerConfig};
use crate::store::Store;
use crate::{now_ms, pki, random_bytes};

/// What `init` is asked to do.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Data directory to create.
    pub data_dir: PathBuf,
    /// Address agents will use (`host:port`).
    pub public_addr: String,
    /// QUIC listen address.
    pub quic_listen: SocketAddr,
    /// HTTPS listen address.
    pub http_listen: SocketAddr,
    /// The PostgreSQL database to keep the store in (SQLite's file when absent).
    pub database_url: Option<String>,
}

/// Errors from `init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The data directory already holds a server.
    #[error("{0} already contains a Herald server (herald.toml exists); choose another --data-dir or remove it")]
    Exists(PathBuf),
    /// The public address is not `host:port`.
    #[error("invalid --public-addr {0:?}: expected HOST:PORT, or several separated by commas")]
    PublicAddr(String),
    /// `--database-url` is not a PostgreSQL URL.
    #[error("invalid --database-url: {0}")]
    Database(String),
    /// Something failed while creating files.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Database.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Result of `init`, printed for the administrator.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Path of the admin configuration.
    pub admin_config: PathBuf,
    /// CA fingerprint (hex).
    pub ca_fingerprint: String,
    /// Operator public key (hex).
    pub operator_key: String,
}

/// Runs `init`.
pub fn init(options: &InitOptions) -> Result<Initialized, InitError> {
    let dir = &options.data_dir;
    if dir.join(config::SERVER_CONFIG).exists() {
        return Err(InitError::Exists(dir.clone()));
    }
    // One `host:port`, or several separated by commas (the nodes agents may reach).
    let mut hosts = Vec::new();
    for addr in options.public_addr.split(',').map(str::trim) {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| InitError::PublicAddr(options.public_addr.clone()))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(InitError::PublicAddr(options.public_addr.clone()));
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    let database = crate::config::DatabaseConfig {
        url: options.database_url.clone(),
    };
    database.check().map_err(InitError::Database)?;
    files::create_private_dir(dir)?;
    let fingerprint = pki::create(dir, &hosts)?;

    let operator = OperatorKey::from_seed(random_bytes());
    let key_path = dir.join(config::OPERATOR_KEY);
    files::write_private(&key_path, operator.to_hex().as_bytes())?;

    let store = Store::open_database(dir, database.url.as_deref())?;
    let admin_token = hex::encode(random_bytes::<32>());
    store.add_admin_token(
        &herald_shared::token::secret_hash(admin_token.as_bytes()),
        "init",
        crate::model::Scope::Admin,
        None,
        now_ms(),
    )?;

    let admin_path = dir.join(config::ADMIN_CONFIG);
    let http = options.http_listen;
    let api_host = if http.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        http.ip().to_string()
    };
    let api_host = if api_host.contains(':') {
        format!("[{api_host}]")
    } else {
        api_host
    };
    config::save_toml(
        &admin_path,
        &AdminConfig {
            server_url: format!("https://{api_host}:{}", http.port()),
            admin_token,
            ca_cert: absolute(&dir.join(pki::CA_CERT)),
            operator_key: absolute(&key_path),
            public_addr: options.public_addr.clone(),
        },
    )?;
    // Written last: its presence means "initialised".
    config::save_toml(
        &dir.join(config::SERVER_CONFIG),
        &ServerConfig {
            quic_listen: options.quic_listen,
            http_listen: options.http_listen,
            public_addr: options.public_addr.clone(),
            operator_keys: vec![operator.public().to_hex()],
            public_url: None,
            smtp: None,
            sms: None,
            forwarding: None,
            console: Default::default(),
            https: Default::default(),
            metrics: None,
            billing: None,
            node_addr: None,
            database,
        },
    )?;
    Ok(Initialized {
        data_dir: dir.clone(),
        admin_config: admin_path,
        ca_fingerprint: hex::encode(fingerprint),
        operator_key: operator.public().to_hex(),
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
