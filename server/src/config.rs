//! Configuration: the server's `herald.toml` and the admin CLI's `admin.toml`, both
//! written by `init` into the data directory, parsed completely and validated once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use herald_io::files;
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
/// Where a packaged server's `herald.toml` may live instead: read before the data
/// directory's when the data directory is [`SYSTEM_DATA_DIR`] and the file exists.
pub const ETC_SERVER_CONFIG: &str = "/etc/herald/herald.toml";

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
    /// Address agents use to reach the server (`host:port`), written into tokens; or
    /// several separated by commas (nodes of a cluster), which agents try in a random
    /// order, sticking to the one that answers.
    pub public_addr: String,
    /// Operator public keys (hex). The server refuses envelopes from other keys early,
    /// though agents check signatures themselves.
    pub operator_keys: Vec<String>,
    /// HTTPS URL agents use for downloads (default: the host of `public_addr` with the
    /// HTTPS port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// `[smtp]`: the relay forwarded results are mailed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpConfig>,
    /// `[sms]`: the HTTP gateway forwarded results are texted through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<SmsConfig>,
    /// `[forwarding]`: retries, timeouts and what destinations may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<ForwardingConfig>,
    /// Web console settings.
    #[serde(default)]
    pub console: ConsoleSettings,
    /// `[https]`: the console's certificate, trusted reverse proxies and the plain-HTTP
    /// loopback listener.
    #[serde(default, skip_serializing_if = "HttpsSettings::is_default")]
    pub https: HttpsSettings,
    /// `[metrics]`: a separate plain-HTTP listener for Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `[billing]`: the price plans file set at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<BillingConfig>,
    /// In a cluster, the address agents reach this node at (`host:port`), which the
    /// other nodes send a consumer to when this node holds the provider of its tunnel.
    /// Default: `quic_listen` when it names an address, else the entry of `public_addr`
    /// with `quic_listen`'s port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_addr: Option<String>,
    /// `[database]`: PostgreSQL instead of the embedded SQLite file (docs/SCALE-OUT.md).
    #[serde(default, skip_serializing_if = "DatabaseConfig::is_default")]
    pub database: DatabaseConfig,
}

// === database section ===

/// `[database]`: where the store is. Without `url`, SQLite's `herald.db` in the data
/// directory (one server); with `url = "postgres://USER@HOST:PORT/DB"`, that PostgreSQL
/// database, which several nodes may share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The PostgreSQL connection URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl ServerConfig {
    /// The address agents reach this node at (see `node_addr`), given the QUIC
    /// address it is bound to.
    pub fn node_addr(&self, bound: SocketAddr) -> String {
        if let Some(addr) = &self.node_addr {
            return addr.clone();
        }
        if !bound.ip().is_unspecified() {
            return bound.to_string();
        }
        let port = format!(":{}", bound.port());
        self.public_addr
            .split(',')
            .map(str::trim)
            .find(|addr| addr.ends_with(&port))
            .map(str::to_string)
            .unwrap_or_else(|| bound.to_string())
    }
}

impl DatabaseConfig {
    fn is_default(&self) -> bool {
        self == &DatabaseConfig::default()
    }

    /// Reads only the `[database]` section of the server's configuration in `data_dir`
    /// (what the local commands that open the store need, without the rest checked).
    pub fn of(data_dir: &Path) -> Result<DatabaseConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            database: DatabaseConfig,
        }
        let path = server_config_path(data_dir);
        let only: Only =
            toml::from_str(
                &std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
            )
            .map_err(|e| ConfigError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        only.database
            .check()
            .map_err(|reason| ConfigError::Invalid { path, reason })?;
        Ok(only.database)
    }

    /// Checks the URL's form (a `postgres://` or `postgresql://` URL).
    pub fn check(&self) -> Result<(), String> {
        match &self.url {
            None => Ok(()),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(())
            }
            Some(url) => Err(format!(
                "[database] url {:?} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)",
                crate::store::redact_url(url)
            )),
        }
    }
}

// === billing section ===

/// `[billing]`: a price plans file (docs/BILLING.md) that `serve` checks and sets at
/// every start, as `herald-server billing plan set FILE` does; a bad file stops the
/// start with the file's error. Without it, plans are whatever was last set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// The plans file.
    pub plans_file: PathBuf,
}

// === metrics section ===

/// `[metrics]`: where a separate listener serves `GET /metrics` in plain HTTP with no
/// token, for a Prometheus on the same host or network. Without it, `/metrics` is only
/// on the admin API (HTTPS, with a token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port, e.g. `127.0.0.1:9464` (checked at load: an IP address and a
    /// port, no host name, so that nothing is resolved at start).
    pub listen: String,
}

impl MetricsConfig {
    /// The listen address, or why it is not one.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "[metrics] listen = {:?} is not an IP address and port such as \"127.0.0.1:9464\"",
                self.listen
            )
        })
    }
}

// === forwarding sections ===

/// Default SMTP submission port (STARTTLS).
pub const DEFAULT_SMTP_PORT: u16 = 587;
/// Default SMTP port for implicit TLS (`tls = "tls"`).
pub const DEFAULT_SMTPS_PORT: u16 = 465;

/// `[smtp]`: where forwarded results are mailed through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Relay host name or address.
    pub host: String,
    /// Port (default 587, or 465 with `tls = "tls"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Sender address (`herald@example.org` or `Herald <herald@example.org>`).
    pub from: String,
    /// Login, if the relay wants one (requires `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// How the connection is protected.
    #[serde(default)]
    pub tls: SmtpTls,
    /// PEM file of CA certificates trusted in addition to the built-in web roots
    /// (relative paths are taken from the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl SmtpConfig {
    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Tls => DEFAULT_SMTPS_PORT,
            SmtpTls::Starttls | SmtpTls::None => DEFAULT_SMTP_PORT,
        })
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which the relay must offer.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption: only allowed to a relay on loopback.
    None,
}

/// `[sms]`: an HTTP request template for the SMS gateway. `{to}` and `{text}` in `url`
/// and `body` are replaced by the phone number and the message, encoded for where they
/// stand (percent-encoded in the URL and in form bodies, JSON-escaped in JSON bodies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// Request URL template (https unless `[forwarding] allow_http`).
    pub url: String,
    /// HTTP method (default `POST`).
    #[serde(default = "default_sms_method")]
    pub method: String,
    /// Extra request headers, sent as they are (e.g. an API key).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request body template; none sends an empty body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// How placeholders in `body` are encoded, and the default content type.
    #[serde(default)]
    pub body_format: SmsBodyFormat,
    /// Where the gateway's answer to a send holds its message id, as a JSON pointer
    /// (`/id`, `/messages/0/message-id`); delivery reports name SMS by that id. Without
    /// it, campaign fallback SMS get no delivery report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_pointer: Option<String>,
    /// The secret the gateway's delivery-report callbacks carry
    /// (`Authorization: Bearer SECRET` on `POST /api/v1/sms/reports`); without it the
    /// callback is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_secret: Option<String>,
}

fn default_sms_method() -> String {
    "POST".to_string()
}

/// Encoding of an SMS request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmsBodyFormat {
    /// `application/x-www-form-urlencoded`.
    #[default]
    Form,
    /// `application/json`.
    Json,
}

/// `[forwarding]`: delivery of results to users' destinations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingConfig {
    /// Allow `http:` webhook and SMS gateway URLs (default: https only).
    #[serde(default)]
    pub allow_http: bool,
    /// Allow webhooks to loopback, private and link-local addresses (default: refused,
    /// so that users cannot make the server post into its own network).
    #[serde(default)]
    pub allow_private_targets: bool,
    /// Attempts per delivery before it is given up.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, in seconds; doubles on every retry, up to an hour.
    #[serde(default = "default_first_retry_secs")]
    pub first_retry_secs: u64,
    /// Limit on one delivery attempt, in seconds.
    #[serde(default = "default_forward_timeout_secs")]
    pub timeout_secs: u64,
    /// Campaign fallbacks (SMS or e-mail) one sender may have sent in a UTC day.
    #[serde(default = "default_fallback_per_sender_day")]
    pub fallback_per_sender_day: u64,
    /// Campaign fallbacks sent at once.
    #[serde(default = "default_fallback_concurrency")]
    pub fallback_concurrency: usize,
}

fn default_fallback_per_sender_day() -> u64 {
    100_000
}

fn default_fallback_concurrency() -> usize {
    32
}

fn default_max_attempts() -> u32 {
    6
}

fn default_first_retry_secs() -> u64 {
    5
}

fn default_forward_timeout_secs() -> u64 {
    10
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            allow_http: false,
            allow_private_targets: false,
            max_attempts: default_max_attempts(),
            first_retry_secs: default_first_retry_secs(),
            timeout_secs: default_forward_timeout_secs(),
            fallback_per_sender_day: default_fallback_per_sender_day(),
            fallback_concurrency: default_fallback_concurrency(),
        }
    }
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
        let path = server_config_path(data_dir);
        let mut config: ServerConfig = load_toml(&path)?;
        for key in &config.operator_keys {
            PublicKey::from_hex(key).map_err(|_| ConfigError::Invalid {
                path: path.clone(),
                reason: format!("operator key {key:?} is not a valid Ed25519 public key"),
            })?;
        }
        config
            .https
            .check(data_dir)
            .map_err(|reason| ConfigError::Invalid {
                path: path.clone(),
                reason,
            })?;
        if let Some(metrics) = &config.metrics {
            metrics
                .listen_addr()
                .map_err(|reason| ConfigError::Invalid { path, reason })?;
        }
        if let Some(smtp) = &mut config.smtp {
            if let Some(ca_file) = &mut smtp.ca_file {
                *ca_file = data_dir.join(&*ca_file);
            }
        }
        Ok(config)
    }

    /// The `[forwarding]` section, or its defaults.
    pub fn forwarding(&self) -> ForwardingConfig {
        self.forwarding.clone().unwrap_or_default()
    }

    /// The HTTPS base URL agents reach this server at.
    pub fn public_url(&self, http_port: u16) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_string();
        }
        // The first node's host, when `public_addr` lists several.
        let first = self
            .public_addr
            .split(',')
            .next()
            .unwrap_or_default()
            .trim();
        let host = match first.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => first,
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

/// The `herald.toml` that [`ServerConfig::load`] reads: [`ETC_SERVER_CONFIG`] for the
/// system data directory when it exists, else the data directory's. Relative paths in
/// it are still taken relative to the data directory.
pub fn server_config_path(data_dir: &Path) -> PathBuf {
    let etc = Path::new(ETC_SERVER_CONFIG);
    if data_dir == Path::new(SYSTEM_DATA_DIR) && etc.exists() {
        return etc.to_path_buf();
    }
    data_dir.join(SERVER_CONFIG)
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
/// The `[console]` section of `herald.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Whether anyone may register an account (default true). When false, accounts
    /// are made with `herald-server users add`.
    pub registration: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings { registration: true }
    }
}

// === [https] ===

/// The `[https]` section of `herald.toml`.
///
/// Agents pin Herald's own CA, for QUIC and for their downloads; browsers want a
/// certificate from a public CA. With `cert_file` and `key_file` the HTTPS listener
/// presents that certificate to clients asking (by SNI) for a name it covers, and
/// Herald's `server.pem` to everyone else (see `crate::https::Certificates`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpsSettings {
    /// PEM certificate chain for the console (leaf first); relative paths are taken
    /// from the data directory. Reloaded on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Reverse proxies whose `X-Forwarded-For` header names the client
    /// (`"10.0.0.0/8"`, `"127.0.0.1"`); from anyone else the header is ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<Cidr>,
    /// A loopback address to also serve the console and API on in plain HTTP, for a
    /// reverse proxy on this machine that terminates TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_http_listen: Option<SocketAddr>,
    /// HTTPS URL agents download artifacts from (default: `public_url`). Agents trust
    /// only Herald's CA, so it must reach this server's HTTPS listener by an address
    /// `cert_file` does not name (an IP address, say), not a proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
}

impl HttpsSettings {
    fn is_default(&self) -> bool {
        *self == HttpsSettings::default()
    }

    /// Checks what can be checked without reading files, and makes file paths
    /// absolute. The certificate files themselves are read when serving starts.
    fn check(&mut self, data_dir: &Path) -> Result<(), String> {
        match (&mut self.cert_file, &mut self.key_file) {
            (Some(cert), Some(key)) => {
                *cert = data_dir.join(&*cert);
                *key = data_dir.join(&*key);
            }
            (None, None) => {}
            _ => {
                return Err(
                    "[https] cert_file and key_file go together: set both, or neither to \
                     present Herald's own certificate"
                        .into(),
                )
            }
        }
        if let Some(addr) = self.plain_http_listen {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "[https] plain_http_listen = \"{addr}\" is not a loopback address; plain \
                     HTTP is only for a proxy on this machine (use 127.0.0.1 or [::1])"
                ));
            }
        }
        if let Some(url) = &self.agent_url {
            if !url.starts_with("https://") {
                return Err(format!(
                    "[https] agent_url = {url:?} must be an https:// URL of this server"
                ));
            }
        }
        Ok(())
    }

    /// The trusted proxies' networks.
    pub fn proxies(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies.iter().map(|c| c.0).collect()
    }
}

/// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr(pub ipnet::IpNet);

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Cidr, String> {
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            return Ok(Cidr(ipnet::IpNet::from(ip)));
        }
        Err(format!(
            "trusted proxy {text:?} is not an address or a network in CIDR notation \
             (like \"10.0.0.0/8\" or \"::1/128\")"
        ))
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(public_addr: &str, node_addr: Option<&str>) -> ServerConfig {
        let mut text = format!(
            "quic_listen = \"0.0.0.0:4433\"\nhttp_listen = \"0.0.0.0:8443\"\npublic_addr = \"{public_addr}\"\noperator_keys = []\n"
        );
        if let Some(addr) = node_addr {
            text = format!("node_addr = \"{addr}\"\n{text}");
        }
        toml::from_str(&text).expect("a valid herald.toml")
    }

    #[test]
    fn a_node_is_reached_at_its_own_address() {
        let bound: SocketAddr = "0.0.0.0:4434".parse().unwrap();
        // The public address with this node's port.
        let cluster = config("a.example:4433,b.example:4434", None);
        assert_eq!(cluster.node_addr(bound), "b.example:4434");
        // Said outright.
        let told = config("a.example:4433,b.example:4433", Some("b.example:4433"));
        assert_eq!(told.node_addr(bound), "b.example:4433");
        // A listener on one address is that address.
        let one: SocketAddr = "10.0.0.2:4433".parse().unwrap();
        assert_eq!(cluster.node_addr(one), "10.0.0.2:4433");
        // The database URL must be PostgreSQL's.
        let bad = DatabaseConfig {
            url: Some("mysql://u:secret@db/herald".into()),
        };
        let reason = bad.check().unwrap_err();
        assert!(reason.contains("not a PostgreSQL URL"), "{reason}");
        assert!(
            !reason.contains("secret"),
            "the password is not shown: {reason}"
        );
    }
}
