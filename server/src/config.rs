//! Configuration: the server's `herald.toml` and the admin CLI's `admin.toml`, both
//! written by `init` into the data directory, parsed completely and validated once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use herald_agent::files;
use herald_shared::envelope::PublicKey;

/// Server configuration file name inside the data directory.
pub const SERVER_CONFIG: &str = "herald.toml";
/// Admin CLI configuration file name inside the data directory.
pub const ADMIN_CONFIG: &str = "admin.toml";
/// Operator key file name (hex seed, mode 0600). Meant to be moved off the server.
pub const OPERATOR_KEY: &str = "operator.key";
/// Default QUIC port.
pub const DEFAULT_QUIC_PORT: u16 = 4433;
/// Default QUIC listen address.
pub const DEFAULT_QUIC_LISTEN: &str = "0.0.0.0:4433";
/// Default admin API listen address (loopback only until an operator opens it).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8443";
/// System-wide data directory when running as root.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/herald";

/// Errors reading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{0} (run `herald-server init` first, or pass --data-dir / --config)")]
    Missing(files::FileError),
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// `herald.toml`: what `serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address for QUIC.
    pub quic_listen: SocketAddr,
    /// TCP address for the HTTPS admin API.
    pub http_listen: SocketAddr,
    /// Address agents use to reach the server (`host:port`), written into tokens.
    pub public_addr: String,
    /// Operator public keys (hex). The server refuses envelopes from other keys early,
    /// though agents check signatures themselves.
    pub operator_keys: Vec<String>,
    /// HTTPS URL agents use for downloads (default: the host of `public_addr` with the
    /// HTTPS port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

/// `admin.toml`: what the admin CLI needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin API base URL, e.g. `https://127.0.0.1:8443`.
    pub server_url: String,
    /// Admin API token (bearer).
    pub admin_token: String,
    /// Server CA certificate (PEM) used to verify the API and put into tokens.
    pub ca_cert: PathBuf,
    /// Operator key file (hex seed).
    pub operator_key: PathBuf,
    /// QUIC address agents connect to.
    pub public_addr: String,
}

impl ServerConfig {
    /// Reads and validates `herald.toml` from a data directory.
    pub fn load(data_dir: &Path) -> Result<ServerConfig, ConfigError> {
        let config: ServerConfig = load_toml(&data_dir.join(SERVER_CONFIG))?;
        for key in &config.operator_keys {
            PublicKey::from_hex(key).map_err(|_| ConfigError::Invalid {
                path: data_dir.join(SERVER_CONFIG),
                reason: format!("operator key {key:?} is not a valid Ed25519 public key"),
            })?;
        }
        Ok(config)
    }

    /// The HTTPS base URL agents reach this server at.
    pub fn public_url(&self, http_port: u16) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let host = match self.public_addr.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => self.public_addr.as_str(),
        };
        format!("https://{host}:{http_port}")
    }

    /// Parsed operator keys (validated at load).
    pub fn operator_keys(&self) -> Vec<PublicKey> {
        self.operator_keys
            .iter()
            .filter_map(|k| PublicKey::from_hex(k).ok())
            .collect()
    }
}

impl AdminConfig {
    /// Reads `admin.toml`.
    pub fn load(path: &Path) -> Result<AdminConfig, ConfigError> {
        load_toml(path)
    }
}

/// Reads a TOML file into a typed value.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = files::read_string(path).map_err(|e| {
        if e.is_not_found() {
            ConfigError::Missing(e)
        } else {
            ConfigError::File(e)
        }
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        reason: e.message().to_string(),
    })
}

/// Writes a TOML file atomically (0600: admin.toml holds a secret).
pub fn save_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let text = toml::to_string_pretty(value).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    files::write_private(path, text.as_bytes())?;
    Ok(())
}

/// The data directory: the flag or `HERALD_DATA_DIR` if given, else `/var/lib/herald`
/// for root, else the user's data directory.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from(SYSTEM_DATA_DIR);
    }
    directories::ProjectDirs::from("org", "herald", "herald-server")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".herald-server"))
}
