//! The server hands out its own installer: `GET /install.sh` (installers/install.sh with
//! this server's URL and certificate pin filled in) and `GET /api/v1/install/agent`, the
//! list of the newest operator-signed `herald-agent` package per format and platform,
//! one line each, for the script and the admin CLI. Both are public: packages are not
//! secrets, and the one-liner that fetches them pins the server's key and carries the
//! SHA-256 the script must find.
//!
//! How the formats are told apart: a package for the installer is a release of
//! `herald-agent` whose platform ends in `-deb`, `-rpm` or `-tar`
//! (`linux-x86_64-deb`). No agent reports such a platform, so self-update rollouts
//! never pick these releases, and the agent package's rule (only an operator signs it)
//! holds for them unchanged.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;

use herald_shared::release::AGENT_PACKAGE;

use crate::api::{ApiError, ApiState};
use crate::store::{Store, StoreError};

/// The installer script, with the two lines the server fills in.
pub const SCRIPT: &str = include_str!("../../../installers/install.sh");
/// The script's line for its base URL, as shipped.
const URL_LINE: &str = "baked_url=''";
/// The script's line for its certificate pin, as shipped.
const PIN_LINE: &str = "baked_pin=''";
/// The formats the installer knows, as platform suffixes and one-liner keys.
pub const FORMATS: [&str; 3] = ["deb", "rpm", "tar"];
/// The list's path (the script reads it too).
pub const LIST_PATH: &str = "/api/v1/install/agent";
/// Longest `Host` the script is baked with.
const MAX_HOST_LEN: usize = 255;

/// An installer package as the list gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installer {
    /// `deb`, `rpm` or `tar`.
    pub format: String,
    /// The platform it runs on (`linux-x86_64`), without the format suffix.
    pub platform: String,
    /// Version.
    pub version: String,
    /// The artifact's SHA-256 (hex); it is served at `/api/v1/artifacts/<sha256>`.
    pub sha256: String,
    /// The artifact's length.
    pub length: u64,
    /// The operator-signed release metadata (base64 of the envelope), for the admin CLI
    /// to check before it vouches for the hash.
    pub metadata: String,
}

impl Installer {
    /// The list's line: `FORMAT PLATFORM VERSION SHA256 LENGTH METADATA`.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.format, self.platform, self.version, self.sha256, self.length, self.metadata
        )
    }

    /// Parses a list line (comment and blank lines are `None`).
    pub fn parse(line: &str) -> Option<Result<Installer, String>> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [format, platform, version, sha256, length, metadata] = fields[..] else {
            return Some(Err(format!(
                "list line {line:?} does not have 6 fields (format platform version sha256 length metadata)"
            )));
        };
        let Ok(length) = length.parse() else {
            return Some(Err(format!(
                "list line {line:?}: length {length:?} is not a number"
            )));
        };
        Some(Ok(Installer {
            format: format.into(),
            platform: platform.into(),
            version: version.into(),
            sha256: sha256.into(),
            length,
            metadata: metadata.into(),
        }))
    }
}

/// Splits an installer release's platform into its platform and format
/// (`linux-x86_64-deb` -> `("linux-x86_64", "deb")`); `None` for any other platform.
pub fn split_platform(platform: &str) -> Option<(&str, &'static str)> {
    let (base, suffix) = platform.rsplit_once('-')?;
    let format = FORMATS.iter().find(|f| **f == suffix)?;
    (!base.is_empty()).then_some((base, *format))
}

/// The newest operator-signed installer package of each format and platform.
pub fn installers(store: &Store) -> Result<Vec<Installer>, StoreError> {
    let engine = base64::engine::general_purpose::STANDARD;
    Ok(store
        .latest_operator_releases(AGENT_PACKAGE)?
        .into_iter()
        .filter_map(|(release, metadata)| {
            let (platform, format) = split_platform(&release.platform)?;
            Some(Installer {
                format: format.to_string(),
                platform: platform.to_string(),
                version: release.version,
                sha256: release.sha256,
                length: release.length,
                metadata: engine.encode(metadata),
            })
        })
        .collect())
}

/// The pin `curl --pinnedpubkey` takes for a certificate: `sha256//` and the base64 of
/// the SHA-256 of its SubjectPublicKeyInfo.
pub fn spki_pin(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the server certificate does not parse: {e}"))?;
    let digest = sha2::Sha256::digest(cert.public_key().raw);
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// What the one-line install needs of this server, read once when it starts: the URL
/// devices reach it at with Herald's own certificate (`[https] agent_url`, else the
/// public URL) and that certificate's pin (`server.pem` is not reloaded; the public
/// certificate that SIGHUP reloads is never the one pinned).
#[derive(Debug, Clone)]
pub struct InstallSite {
    /// `https://host:port` of Herald's own certificate.
    pub url: String,
    /// `sha256//BASE64` of `server.pem`'s key, or why it could not be read.
    pub pin: Result<String, String>,
}

impl InstallSite {
    /// Reads the pin from `data_dir`'s `server.pem`.
    pub fn load(data_dir: &std::path::Path, url: &str) -> InstallSite {
        let path = data_dir.join(crate::pki::SERVER_CERT);
        let pin = crate::pki::load_cert(&path)
            .map_err(|e| e.to_string())
            .and_then(|cert| spki_pin(&cert));
        InstallSite {
            url: url.trim_end_matches('/').to_string(),
            pin,
        }
    }
}

fn server_pin(state: &ApiState) -> Result<String, String> {
    state.install_site.pin.clone()
}

/// The console's one-liner for `token`: the packages of this server's own platform if
/// there are any, else of the first platform listed. The console trusts the server for
/// the hashes (docs/SECURITY.md); `token create --install-command` checks them.
/// `None` (with the reason logged) when no package is published or the pin is unknown.
pub fn console_command(state: &ApiState, token: &str) -> Option<String> {
    let list = match installers(&state.store) {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!("one-line install: cannot list the installer packages: {e}");
            return None;
        }
    };
    let own = herald_shared::release::this_platform();
    let platform = list
        .iter()
        .find(|i| i.platform == own)
        .or(list.first())
        .map(|i| i.platform.clone())?;
    let pin = match server_pin(state) {
        Ok(pin) => pin,
        Err(e) => {
            tracing::warn!("one-line install: {e}");
            return None;
        }
    };
    let hashes: Vec<(String, String)> = list
        .into_iter()
        .filter(|i| i.platform == platform)
        .map(|i| (i.format, i.sha256))
        .collect();
    Some(one_liner(&state.install_site.url, &pin, token, &hashes))
}

/// Quotes a word for `sh` when it needs it (single quotes; none inside ours).
fn sh_word(word: &str) -> String {
    let plain = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/=+@%,".contains(c));
    if plain && !word.is_empty() {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The one-line install command: fetch the script over the pinned connection, run it
/// as root with the token and the SHA-256 expected for each format.
pub fn one_liner(url: &str, pin: &str, token: &str, hashes: &[(String, String)]) -> String {
    let mut command = format!(
        "curl -fsSk --pinnedpubkey '{pin}' {}/install.sh | sudo sh -s -- {}",
        sh_word(url.trim_end_matches('/')),
        sh_word(token)
    );
    for format in FORMATS {
        if let Some((_, sha256)) = hashes.iter().find(|(f, _)| f == format) {
            command.push_str(&format!(" {format}={sha256}"));
        }
    }
    command
}

/// The script with its URL and pin filled in.
pub fn baked_script(url: &str, pin: &str) -> String {
    SCRIPT
        .replacen(URL_LINE, &format!("baked_url='{url}'"), 1)
        .replacen(PIN_LINE, &format!("baked_pin='{pin}'"), 1)
}

/// The authority a request named (`Host`, or the URI's for HTTP/2), if it is a plain
/// host and port: it is written into a shell script.
fn request_host(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    let host = match headers.get(header::HOST) {
        Some(value) => value.to_str().ok()?.to_string(),
        None => uri.authority()?.as_str().to_string(),
    };
    let ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    ok.then_some(host)
}

/// `GET /install.sh`: the installer, baked with the URL it was fetched from and this
/// server's certificate pin.
pub(crate) async fn script(
    State(state): State<ApiState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let Some(host) = request_host(&headers, &uri) else {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "the request names no usable host (Host header): fetch https://SERVER:PORT/install.sh"
                .into(),
        )
        .into_response();
    };
    let pin = match server_pin(&state) {
        Ok(pin) => pin,
        Err(e) => {
            tracing::error!("install.sh: {e}");
            return ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the server cannot read its own certificate: {e}"),
            )
            .into_response();
        }
    };
    (
        [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")],
        baked_script(&format!("https://{host}"), &pin),
    )
        .into_response()
}

/// `GET /api/v1/install/agent`: one line per installer package.
pub(crate) async fn list(State(state): State<ApiState>) -> Response {
    match installers(&state.store) {
        Ok(list) => {
            let mut text =
                String::from("# format platform version sha256 length metadata(base64)\n");
            for installer in list {
                text.push_str(&installer.line());
                text.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_has_one_line_for_each_baked_value() {
        assert_eq!(SCRIPT.matches(URL_LINE).count(), 1);
        assert_eq!(SCRIPT.matches(PIN_LINE).count(), 1);
        let baked = baked_script("https://10.0.0.5:8443", "sha256//abc=");
        assert!(baked.contains("\nbaked_url='https://10.0.0.5:8443'\n"));
        assert!(baked.contains("\nbaked_pin='sha256//abc='\n"));
        assert!(baked.starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn platforms_name_their_format() {
        assert_eq!(
            split_platform("linux-x86_64-deb"),
            Some(("linux-x86_64", "deb"))
        );
        assert_eq!(
            split_platform("linux-aarch64-tar"),
            Some(("linux-aarch64", "tar"))
        );
        assert_eq!(split_platform("linux-x86_64"), None);
        assert_eq!(split_platform("-deb"), None);
        assert_eq!(split_platform("deb"), None);
    }

    #[test]
    fn list_lines_round_trip_and_bad_ones_are_refused() {
        let installer = Installer {
            format: "rpm".into(),
            platform: "linux-x86_64".into(),
            version: "0.2.0".into(),
            sha256: "ab".repeat(32),
            length: 123,
            metadata: "AAEC".into(),
        };
        assert_eq!(Installer::parse(&installer.line()), Some(Ok(installer)));
        assert_eq!(Installer::parse("# comment"), None);
        assert_eq!(Installer::parse(""), None);
        assert!(matches!(Installer::parse("deb x 1"), Some(Err(_))));
        assert!(matches!(Installer::parse("deb p 1 h many m"), Some(Err(_))));
    }

    #[test]
    fn the_one_liner_pins_the_key_and_carries_each_hash() {
        let hashes = vec![
            ("tar".to_string(), "c".repeat(64)),
            ("deb".to_string(), "a".repeat(64)),
        ];
        let line = one_liner(
            "https://10.0.0.5:8443/",
            "sha256//K+y/=",
            "hrld_abc-_",
            &hashes,
        );
        assert_eq!(
            line,
            format!(
                "curl -fsSk --pinnedpubkey 'sha256//K+y/=' https://10.0.0.5:8443/install.sh \
                 | sudo sh -s -- hrld_abc-_ deb={} tar={}",
                "a".repeat(64),
                "c".repeat(64)
            )
        );
        assert_eq!(sh_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn only_plain_hosts_are_baked_into_the_script() {
        let uri: axum::http::Uri = "/install.sh".parse().unwrap();
        let host = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, value.parse().unwrap());
            request_host(&headers, &uri)
        };
        assert_eq!(host("10.0.0.5:8443").as_deref(), Some("10.0.0.5:8443"));
        assert_eq!(host("[::1]:8443").as_deref(), Some("[::1]:8443"));
        assert_eq!(
            host("herald.example:8443").as_deref(),
            Some("herald.example:8443")
        );
        for bad in ["a'b", "a b", "$(reboot)", "a;b", "a/b"] {
            assert_eq!(host(bad), None, "{bad}");
        }
        assert_eq!(request_host(&HeaderMap::new(), &uri), None);
    }
}
