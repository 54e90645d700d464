//! `token create --install-command`: the one-line install command for a new token.
//!
//! The trust rule is that the server relays and does not command, so this command
//! vouches only for what it checked itself: it reads the server's list of installer
//! packages over a connection verified against Herald's CA, pins the key of the
//! certificate the server presented there, and verifies each package's release metadata
//! against the operator key before it puts the package's SHA-256 into the command. The
//! script then refuses any package with another hash.

use base64::Engine;

use herald_shared::codec;
use herald_shared::release::{self, AGENT_PACKAGE};

use crate::api::install::{self, Installer};
use crate::cli::client::Client;
use crate::cli::{usage, CliError, Context};
use crate::now_ms;

/// What the one-liner carries besides the token, checked.
pub(crate) struct Checked {
    url: String,
    pin: String,
    hashes: Vec<(String, String)>,
}

impl Checked {
    /// The one-line install command for `token`.
    pub(crate) fn command(&self, token: &str) -> String {
        install::one_liner(&self.url, &self.pin, token, &self.hashes)
    }
}

/// Reads and checks the packages for `platform` at `url` (default: the server URL the
/// CLI uses), before any token is made.
pub(crate) async fn check_packages(
    context: &Context,
    url: Option<&str>,
    platform: &str,
) -> Result<Checked, CliError> {
    release::check_platform(platform).map_err(usage)?;
    let url = url
        .unwrap_or(context.client.base())
        .trim_end_matches('/')
        .to_string();
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| usage(format!("--install-url {url:?} is not a URL: {e}")))?;
    if parsed.scheme() != "https" || parsed.path() != "/" || parsed.query().is_some() {
        return Err(usage(format!(
            "--install-url {url:?} must be https://SERVER:PORT, the address devices reach the \
             server at"
        )));
    }
    let client = Client::new(&context.admin, Some(&url))?;
    let (list, certificate) = client.get_public_text(install::LIST_PATH).await?;
    let pin = install::spki_pin(&certificate).map_err(CliError::Other)?;
    let operator = context.operator_key()?.public();
    let mut hashes: Vec<(String, String)> = Vec::new();
    for line in list.lines() {
        let Some(parsed) = Installer::parse(line) else {
            continue;
        };
        let installer = parsed.map_err(|e| CliError::Other(format!("the server's list: {e}")))?;
        if installer.platform != platform {
            continue;
        }
        check(&installer, &operator).map_err(|reason| {
            CliError::Other(format!(
                "the server's {} package for {platform} fails its check: {reason}; refusing \
                 to vouch for it",
                installer.format
            ))
        })?;
        if !hashes.iter().any(|(f, _)| *f == installer.format) {
            hashes.push((installer.format, installer.sha256));
        }
    }
    if hashes.is_empty() {
        return Err(CliError::Other(format!(
            "the server has no operator-signed {AGENT_PACKAGE} package for {platform}: publish \
             one with `herald-server package publish --vendor-key operator.key {AGENT_PACKAGE} \
             VERSION herald-agent_VERSION_ARCH.deb --platform {platform}-deb` (and -rpm, -tar), \
             see docs/PACKAGES.md"
        )));
    }
    Ok(Checked { url, pin, hashes })
}

/// Checks a listed package against its metadata: signed by the operator, the agent's
/// package for that platform and format, not expired, and the same hash and length.
fn check(
    installer: &Installer,
    operator: &herald_shared::envelope::PublicKey,
) -> Result<(), String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&installer.metadata)
        .map_err(|_| "its metadata is not base64".to_string())?;
    let envelope = codec::from_bytes(&bytes, codec::DEFAULT_FRAME_LIMIT)
        .map_err(|e| format!("its metadata does not decode: {e}"))?;
    let signed = release::verify(&envelope, None, std::slice::from_ref(operator))
        .map_err(|e| format!("its metadata is not signed by your operator key: {e}"))?;
    let platform = format!("{}-{}", installer.platform, installer.format);
    if signed.package != AGENT_PACKAGE || signed.platform != platform {
        return Err(format!(
            "its metadata is for {} on {}, not {AGENT_PACKAGE} on {platform}",
            signed.package, signed.platform
        ));
    }
    if hex::encode(signed.sha256) != installer.sha256 || signed.length != installer.length {
        return Err("the listed SHA-256 or length is not the signed one".into());
    }
    if signed.version != installer.version {
        return Err("the listed version is not the signed one".into());
    }
    if signed.expires_at <= now_ms() {
        return Err(format!(
            "its metadata expired; publish {AGENT_PACKAGE} again with a later --expires"
        ));
    }
    Ok(())
}
