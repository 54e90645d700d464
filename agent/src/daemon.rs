//! The agent's two commands as the binary runs them: `enroll` (one exchange with the
//! server, then the configuration is written) and `run` (the standby loop until
//! shutdown), and the errors they end with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use herald_shared::protocol::{AgentMsg, Enroll, ServerMsg, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use herald_shared::token::Token;

use crate::agent::{Agent, LoadError};
use crate::host;
use crate::journal::JournalError;
use crate::link;
use crate::options::Options;
use crate::session;
use crate::state::{AgentConfig, Identity, StateError};
use herald_io::files;

/// How long enrollment waits for the server.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors starting the agent or enrolling.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// State directory problems.
    #[error(transparent)]
    State(#[from] StateError),
    /// Local database problems.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The inbox cannot be opened.
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
    /// The share table cannot be opened.
    #[error(transparent)]
    Shares(#[from] crate::shares::ShareError),
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

impl From<LoadError> for AgentError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::State(e) => AgentError::State(e),
            LoadError::Journal(e) => AgentError::Journal(e),
            LoadError::Inbox(e) => AgentError::Inbox(e),
            LoadError::Shares(e) => AgentError::Shares(e),
        }
    }
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
    // Each further address of a cluster may cost its attempt's timeout first.
    let extra = link::ATTEMPT_TIMEOUT * token.server.matches(',').count() as u32;
    let connection = tokio::time::timeout(
        ENROLL_TIMEOUT + extra,
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
                messages: Default::default(),
                peers: Default::default(),
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
    let (agent, identity, events) = Agent::load(state_dir, &options)?;
    let fingerprint = agent
        .config()
        .fingerprint()
        .map_err(|reason| StateError::Invalid {
            path: state_dir.join(crate::state::AGENT_CONFIG),
            reason,
        })?;
    let client = crate::tls::client_config(fingerprint, &identity, options.keep_alive)?;
    // Listening before recovery, so a resumed browser job finds helpers that reconnect.
    let socket = session::socket_path(state_dir, &agent.config().session);
    let helpers = match session::bind(&socket, nix::unistd::Uid::effective().is_root()) {
        Ok(listener) => {
            info!(socket = %socket.display(), "listening for session helpers");
            Some(tokio::spawn(session::serve(
                listener,
                agent.sessions().clone(),
            )))
        }
        Err(e) => {
            warn!("browser services will fail: {e}");
            agent.sessions().set_unavailable(e.to_string());
            None
        }
    };
    agent.recover()?;
    let notices = tokio::spawn(agent.clone().notices());
    let shares = tokio::spawn(agent.clone().report_shares());
    // After recovery, so the interrupted jobs' results are in the machine's outbox.
    let machine = agent.machine()?;
    info!(agent_id = %agent.id(), server = %agent.server(), "herald-agent starting");
    let backoff = (options.backoff_base, options.backoff_cap);
    crate::systemd::ready();
    tokio::select! {
        _ = link::run_forever(agent.clone(), machine, events, client, backoff) => {}
        _ = shutdown => {
            info!("shutting down");
            crate::systemd::stopping();
            agent.close_link().await;
        }
    }
    notices.abort();
    shares.abort();
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
