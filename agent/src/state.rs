//! The agent's state directory: its identity (Ed25519 key and self-signed certificate),
//! what it pinned at enrollment (`agent.toml`), its local database and status file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use herald_shared::envelope::PublicKey;

use herald_io::files::{self, FileError};

/// Identity key (PKCS#8 PEM, 0600).
pub const IDENTITY_KEY: &str = "identity.key";
/// Identity certificate (PEM).
pub const IDENTITY_CERT: &str = "identity.pem";
/// Enrollment record and policy.
pub const AGENT_CONFIG: &str = "agent.toml";
/// Status written by the running agent for `herald-agent status`.
pub const STATUS_FILE: &str = "status.json";
/// Per-job working directories.
pub const WORK_DIR: &str = "work";
/// System-wide state directory when running as root.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/herald-agent";
/// The machine owner's settings for the system agent (installed by the packages as a
/// configuration file that upgrades keep): its `[policy]`, `[update]`, `[session]` and
/// `[messages]` sections take the place of those in the state directory's `agent.toml`,
/// which keeps the enrollment record. Read only for [`SYSTEM_STATE_DIR`], and only when
/// present, so installs without it behave as before.
pub const LOCAL_SETTINGS: &str = "/etc/herald/agent.toml";

/// Errors reading or writing agent state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The agent is not enrolled.
    #[error("this agent is not enrolled (no {0}); run `herald-agent enroll TOKEN` first")]
    NotEnrolled(PathBuf),
    /// A stored file does not parse.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key or certificate generation failed.
    #[error("cannot create identity: {0}")]
    Identity(#[from] rcgen::Error),
}

/// What the agent pinned at enrollment, plus its local policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Server QUIC address (`host:port`).
    pub server: String,
    /// SHA-256 of the server CA certificate, hex.
    pub ca_fingerprint: String,
    /// Operator public keys, hex.
    pub operator_keys: Vec<String>,
    /// This agent's id (derived from its key).
    pub agent_id: String,
    /// Groups granted by the enrollment token.
    pub token_groups: Vec<String>,
    /// Local policy.
    #[serde(default)]
    pub policy: Policy,
    /// Package and self-update settings.
    #[serde(default)]
    pub update: UpdateSettings,
    /// The user-session helper (browser services).
    #[serde(default)]
    pub session: SessionSettings,
    /// Push messages: receipts, retention, quiet hours.
    #[serde(default)]
    pub messages: MessageSettings,
    /// Shared services and tunnels.
    #[serde(default)]
    pub peers: PeerSettings,
}

/// Tunnels to and from this machine (`[peers]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSettings {
    /// A tunnel that carries no byte either way for this long is closed.
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
    /// While a tunnel is open, its counters are signed for billing this often (and once
    /// more when it closes).
    #[serde(default = "default_usage_interval_secs")]
    pub usage_interval_secs: u64,
}

fn default_idle_secs() -> u64 {
    600
}

fn default_usage_interval_secs() -> u64 {
    60
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            idle_timeout_secs: default_idle_secs(),
            usage_interval_secs: default_usage_interval_secs(),
        }
    }
}

impl PeerSettings {
    /// [`PeerSettings::usage_interval_secs`], at least a second.
    pub fn usage_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.usage_interval_secs.max(1))
    }
}

/// How the agent keeps and shows push messages (`[messages]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSettings {
    /// Send a signed `read` receipt when the person opens a message (off by default:
    /// whether someone read something is theirs to share).
    #[serde(default)]
    pub read_receipts: bool,
    /// At most this many messages are kept per sender; the oldest go first.
    #[serde(default = "default_per_sender")]
    pub max_per_sender: u32,
    /// Advertising is held during these local hours (`HH:MM-HH:MM`, may wrap midnight)
    /// and shown when they end; empty to never hold it.
    #[serde(default = "default_quiet_hours")]
    pub quiet_hours: String,
}

fn default_per_sender() -> u32 {
    1000
}

fn default_quiet_hours() -> String {
    "21:00-08:00".into()
}

impl Default for MessageSettings {
    fn default() -> Self {
        MessageSettings {
            read_receipts: false,
            max_per_sender: default_per_sender(),
            quiet_hours: default_quiet_hours(),
        }
    }
}

/// Where the daemon listens for user-session helpers and whom it lets in (`[session]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// The helpers' Unix socket. Unset: `/run/herald-agent/session.sock` for the system
    /// state directory, else `session.sock` in the state directory. A relative path is
    /// taken relative to the state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// When the daemon runs as root and this is not empty, only helpers of these users
    /// are accepted. When it is empty, a root daemon accepts root's helper and that of
    /// the user at the machine's screen (logind's active user of `seat0`, the owner of
    /// `/dev/console` on macOS), and no other when that cannot be told: set this on
    /// multi-user hosts and where there is no logind. (A daemon that is not root only
    /// ever accepts its own user.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// When the daemon runs as root: browser services go to this user's helper when the
    /// user at the screen has none connected (or cannot be told), instead of the most
    /// recently connected one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// How the agent downloads and updates itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSettings {
    /// A download that receives nothing for this long is abandoned.
    #[serde(default = "default_stall_secs")]
    pub stall_secs: u64,
    /// A new agent binary must reconnect within this long, or the previous one returns.
    #[serde(default = "default_health_secs")]
    pub health_deadline_secs: u64,
}

fn default_stall_secs() -> u64 {
    60
}

fn default_health_secs() -> u64 {
    120
}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            stall_secs: default_stall_secs(),
            health_deadline_secs: default_health_secs(),
        }
    }
}

/// What this machine's owner allows, whatever the operator signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether `run` actions are allowed at all.
    #[serde(default = "yes")]
    pub allow_run: bool,
    /// If not empty, only these absolute program paths may run.
    #[serde(default)]
    pub programs: Vec<String>,
    /// Whether signed packages (and agent updates) may be installed.
    #[serde(default = "yes")]
    pub allow_install: bool,
    /// Whether browser services may open pages for the person at the machine.
    #[serde(default = "yes")]
    pub allow_browser: bool,
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_run: true,
            programs: Vec::new(),
            allow_install: true,
            allow_browser: true,
        }
    }
}

impl AgentConfig {
    /// Loads `agent.toml` from the state directory.
    pub fn load(state_dir: &Path) -> Result<AgentConfig, StateError> {
        let path = state_dir.join(AGENT_CONFIG);
        let text = files::read_string(&path).map_err(|e| {
            if e.is_not_found() {
                StateError::NotEnrolled(path.clone())
            } else {
                StateError::File(e)
            }
        })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| StateError::Invalid {
            path: path.clone(),
            reason: e.message().to_string(),
        })?;
        if state_dir == Path::new(SYSTEM_STATE_DIR) {
            config.apply_local_settings(Path::new(LOCAL_SETTINGS))?;
        }
        config.pinned_keys().map_err(|reason| StateError::Invalid {
            path: path.clone(),
            reason,
        })?;
        config
            .fingerprint()
            .map_err(|reason| StateError::Invalid { path, reason })?;
        Ok(config)
    }

    /// Takes the sections present in the settings file at `path` (see
    /// [`LOCAL_SETTINGS`]); no file, no change.
    fn apply_local_settings(&mut self, path: &Path) -> Result<(), StateError> {
        let text = match files::read_string(path) {
            Ok(text) => text,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let local: LocalSettings = toml::from_str(&text).map_err(|e| StateError::Invalid {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })?;
        self.policy = local.policy.unwrap_or_else(|| self.policy.clone());
        self.update = local.update.unwrap_or_else(|| self.update.clone());
        self.session = local.session.unwrap_or_else(|| self.session.clone());
        self.messages = local.messages.unwrap_or_else(|| self.messages.clone());
        self.peers = local.peers.unwrap_or_else(|| self.peers.clone());
        Ok(())
    }

    /// Writes `agent.toml` atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let path = state_dir.join(AGENT_CONFIG);
        let text = toml::to_string_pretty(self).map_err(|e| StateError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        files::write_private(&path, text.as_bytes())?;
        Ok(())
    }

    /// The pinned operator keys.
    pub fn pinned_keys(&self) -> Result<Vec<PublicKey>, String> {
        self.operator_keys
            .iter()
            .map(|k| PublicKey::from_hex(k).map_err(|_| format!("operator key {k:?} is not valid")))
            .collect()
    }

    /// The pinned CA fingerprint.
    pub fn fingerprint(&self) -> Result<[u8; 32], String> {
        hex::decode(&self.ca_fingerprint)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "ca_fingerprint is not 64 hex digits".to_string())
    }
}

/// The machine owner's settings file ([`LOCAL_SETTINGS`]): only local sections, never
/// the enrollment record.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSettings {
    policy: Option<Policy>,
    update: Option<UpdateSettings>,
    session: Option<SessionSettings>,
    messages: Option<MessageSettings>,
    peers: Option<PeerSettings>,
}

/// The agent's TLS identity.
pub struct Identity {
    /// Certificate (DER).
    pub cert: rustls::pki_types::CertificateDer<'static>,
    /// Private key (PKCS#8 DER).
    pub key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
    /// Raw Ed25519 public key.
    pub public_key: Vec<u8>,
}

impl Identity {
    /// The agent id derived from the key.
    pub fn agent_id(&self) -> String {
        herald_shared::agent_id(&self.public_key)
    }

    /// Loads the identity, creating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Identity, StateError> {
        let key_path = state_dir.join(IDENTITY_KEY);
        let cert_path = state_dir.join(IDENTITY_CERT);
        let key = match files::read_string(&key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| StateError::Invalid {
                path: key_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.is_not_found() => {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
                files::write_private(&key_path, key.serialize_pem().as_bytes())?;
                // A new key invalidates any old certificate.
                let _ = std::fs::remove_file(&cert_path);
                key
            }
            Err(e) => return Err(e.into()),
        };
        let public_key = key.public_key_raw().to_vec();
        let cert = match files::read_string(&cert_path) {
            Ok(pem) => {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
                    StateError::Invalid {
                        path: cert_path.clone(),
                        reason: e.to_string(),
                    }
                })?
            }
            Err(e) if e.is_not_found() => {
                let mut params = rcgen::CertificateParams::new(vec!["herald-agent".to_string()])?;
                params.distinguished_name.push(
                    rcgen::DnType::CommonName,
                    herald_shared::agent_id(&public_key),
                );
                let cert = params.self_signed(&key)?;
                files::write_atomic(&cert_path, cert.pem().as_bytes())?;
                cert.der().clone()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Identity {
            cert,
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
            public_key,
        })
    }
}

/// What the running agent last wrote about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Agent id.
    pub agent_id: String,
    /// Server address.
    pub server: String,
    /// Connected right now.
    pub connected: bool,
    /// Since when (connected or disconnected), unix ms.
    pub since: i64,
    /// Last connection error, if any.
    pub last_error: Option<String>,
    /// Local addresses last reported.
    pub addresses: Vec<String>,
    /// Agent process id.
    pub pid: u32,
}

impl Status {
    /// Writes the status file.
    pub fn save(&self, state_dir: &Path) -> Result<(), FileError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        files::write_atomic(&state_dir.join(STATUS_FILE), text.as_bytes())
    }

    /// Reads the status file, if any.
    pub fn load(state_dir: &Path) -> Option<Status> {
        let text = files::read_string(&state_dir.join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The state directory: the flag or `HERALD_STATE_DIR`, else `/var/lib/herald-agent` for
/// root, else the user's data directory.
pub fn state_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from(SYSTEM_STATE_DIR);
    }
    directories::ProjectDirs::from("org", "herald", "herald-agent")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".herald-agent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrolled() -> AgentConfig {
        AgentConfig {
            server: "127.0.0.1:4433".into(),
            ca_fingerprint: "00".repeat(32),
            operator_keys: vec![],
            agent_id: "a".into(),
            token_groups: vec![],
            policy: Policy::default(),
            update: UpdateSettings::default(),
            session: SessionSettings::default(),
            messages: MessageSettings::default(),
            peers: PeerSettings::default(),
        }
    }

    /// The settings file's sections replace the state directory's; the enrollment
    /// record stays; a missing file changes nothing; a key it may not hold is refused.
    #[test]
    fn local_settings_replace_only_the_sections_they_hold() {
        let dir = std::env::temp_dir().join(format!(
            "herald-local-settings-{}-{}",
            std::process::id(),
            hex::encode(herald_io::random_bytes::<4>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");

        let mut config = enrolled();
        config.apply_local_settings(&path).unwrap();
        assert_eq!(config, enrolled(), "no file, no change");

        std::fs::write(&path, "[policy]\nallow_run = false\n").unwrap();
        let mut config = enrolled();
        config.apply_local_settings(&path).unwrap();
        assert!(!config.policy.allow_run);
        assert!(config.policy.allow_install, "defaults inside the section");
        assert_eq!(config.update, UpdateSettings::default());
        assert_eq!(config.server, "127.0.0.1:4433");

        std::fs::write(&path, "server = \"elsewhere:1\"\n").unwrap();
        let error = enrolled().apply_local_settings(&path).unwrap_err();
        assert!(
            matches!(&error, StateError::Invalid { path: p, .. } if *p == path),
            "{error:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
