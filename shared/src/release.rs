//! Signed software releases: the operator delegates package names to vendor keys, vendors
//! sign release metadata, agents check both before downloading a byte.
//!
//! Modelled on TUF's targets delegations, reduced to one level: an operator-signed
//! [`Delegation`] names a vendor key and the package-name patterns it may sign for; a
//! vendor-signed [`Release`] describes one artifact (name, version, platform, hash, length,
//! expiry). The package [`AGENT_PACKAGE`] is reserved: only an operator key signs it.

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, EnvelopeError, PublicKey, Statement};
use crate::Millis;

/// The agent's own package name; releases of it must be signed by an operator key.
pub const AGENT_PACKAGE: &str = "herald-agent";

/// Longest package name.
pub const MAX_NAME_LEN: usize = 64;

/// An operator-signed grant: `key` may sign releases of packages matching `packages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Vendor name (for people and the CLI).
    pub vendor: String,
    /// The vendor's public key.
    pub key: PublicKey,
    /// Glob patterns of package names (`acme-*`).
    pub packages: Vec<String>,
    /// When the operator signed it.
    pub issued_at: Millis,
}

impl Delegation {
    /// Whether this delegation covers `package`. The agent's own package never is, and
    /// neither is a name longer than [`MAX_NAME_LEN`]; a pattern the CLI would not accept
    /// (too long, other characters) covers nothing. The bounds also bound the matching:
    /// glob matching backtracks on `*`, and the fuzzer found a several-hundred-character
    /// pattern of `*` and `?` that took minutes.
    pub fn covers(&self, package: &str) -> bool {
        package != AGENT_PACKAGE
            && package.len() <= MAX_NAME_LEN
            && self.packages.iter().any(|pattern| {
                pattern_chars_ok(pattern)
                    && glob::Pattern::new(pattern).is_ok()
                    && wildcard_match(pattern.as_bytes(), package.as_bytes())
            })
    }
}

/// Whether `name` matches `pattern` of literal bytes, `?` (any one byte) and `*` (any
/// run), as the glob crate matches these patterns (a leading `.` only literally), in
/// O(pattern × name) steps: the last `*` is retried one byte further on a mismatch, never
/// the earlier ones. The glob crate backtracks through every `*`, and the fuzzer found a
/// 64-byte pattern of `*` and `?` that took minutes.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && matches!(pattern.first(), Some(b'*' | b'?')) {
        return false;
    }
    let (mut p, mut n) = (0, 0);
    let mut retry: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                retry = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match retry {
                Some((star, from)) => {
                    retry = Some((star, from + 1));
                    p = star + 1;
                    n = from + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// How the glob crate would match these patterns (the test holds `wildcard_match` to it).
#[cfg(test)]
const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

/// Checks a delegation pattern as the CLI accepts it: a glob over package-name characters
/// that cannot match the reserved agent package.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if !pattern_chars_ok(pattern) {
        return Err(format!(
            "invalid package pattern {pattern:?}: use lower-case letters, digits, '-', '_', '.', and '*' or '?'"
        ));
    }
    glob::Pattern::new(pattern).map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
    if wildcard_match(pattern.as_bytes(), AGENT_PACKAGE.as_bytes()) {
        return Err(format!(
            "pattern {pattern:?} would cover {AGENT_PACKAGE}, which only the operator signs"
        ));
    }
    Ok(())
}

/// A pattern's length and characters as [`check_pattern`] accepts them.
fn pattern_chars_ok(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= MAX_NAME_LEN
        && pattern
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.*?".contains(c))
}

/// Checks a package name: `[a-z0-9][a-z0-9._-]*`, at most [`MAX_NAME_LEN`] bytes.
pub fn check_package_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok
        || name.len() > MAX_NAME_LEN
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
    {
        return Err(format!(
            "invalid package name {name:?}: use lower-case letters, digits, '-', '_' and '.', starting with a letter or digit, at most {MAX_NAME_LEN} characters"
        ));
    }
    Ok(())
}

/// Checks a platform name such as `linux-x86_64`.
pub fn check_platform(platform: &str) -> Result<(), String> {
    let ok = !platform.is_empty()
        && platform.len() <= 32
        && platform
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid platform {platform:?}: use e.g. linux-x86_64 or linux-aarch64"
        ))
    }
}

/// The platform this code was built for, in release-metadata form.
pub fn this_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

/// How the artifact becomes an installed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// A gzip-compressed tar archive, unpacked into the version directory.
    TarGz,
    /// A single file, installed as `<version dir>/<name>` with mode 0755.
    File {
        /// File name inside the version directory.
        name: String,
    },
}

/// Vendor-signed metadata for one artifact of one version on one platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Package name.
    pub package: String,
    /// Semantic version.
    pub version: String,
    /// Platform (`linux-x86_64`).
    pub platform: String,
    /// SHA-256 of the artifact.
    pub sha256: [u8; 32],
    /// Exact length of the artifact in bytes.
    pub length: u64,
    /// How to install it.
    pub format: Format,
    /// Program and arguments run after unpacking; `{dir}` and `{artifact}` in them are
    /// replaced by the version directory and the installed file.
    pub install_command: Option<Vec<String>>,
    /// Lowest agent version that may install it.
    pub min_agent_version: Option<String>,
    /// Where to download it instead of the server (a CDN), if set.
    pub url: Option<String>,
    /// When the vendor signed it.
    pub issued_at: Millis,
    /// After this, the metadata no longer allows new installs.
    pub expires_at: Millis,
}

impl Release {
    /// The parsed version (checked at signing and at verification).
    pub fn semver(&self) -> Result<semver::Version, ReleaseError> {
        semver::Version::parse(&self.version)
            .map_err(|e| ReleaseError::Invalid(format!("version {:?}: {e}", self.version)))
    }

    /// Checks the fields a signer controls, so neither side stores nonsense.
    pub fn validate(&self) -> Result<(), ReleaseError> {
        check_package_name(&self.package).map_err(ReleaseError::Invalid)?;
        check_platform(&self.platform).map_err(ReleaseError::Invalid)?;
        self.semver()?;
        if let Some(min) = &self.min_agent_version {
            semver::Version::parse(min).map_err(|e| {
                ReleaseError::Invalid(format!("minimum agent version {min:?}: {e}"))
            })?;
        }
        if let Format::File { name } = &self.format {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                return Err(ReleaseError::Invalid(format!("invalid file name {name:?}")));
            }
        }
        if let Some(command) = &self.install_command {
            if command.first().is_none_or(|p| p.is_empty()) {
                return Err(ReleaseError::Invalid("empty install command".into()));
            }
        }
        if self.expires_at <= self.issued_at {
            return Err(ReleaseError::Invalid("expires before it was issued".into()));
        }
        Ok(())
    }
}

/// What the agent knows about a package before installing a release of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Highest version whose metadata this agent has verified (persisted; never goes down).
    pub highest_seen: Option<semver::Version>,
    /// Version currently installed.
    pub current: Option<semver::Version>,
}

/// What to do with a verified release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Download and install it.
    Install,
    /// It is the installed version already.
    AlreadyInstalled,
}

/// Why a release is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// Signature or delegation problems.
    #[error("release metadata not trusted: {0}")]
    Untrusted(String),
    /// Malformed metadata.
    #[error("invalid release metadata: {0}")]
    Invalid(String),
    /// Not the package or version the order names.
    #[error("release does not match the order: {0}")]
    Mismatch(String),
    /// Built for another platform.
    #[error("release is for {release}, this machine is {ours}")]
    Platform {
        /// The release's platform.
        release: String,
        /// Ours.
        ours: String,
    },
    /// Older than what this agent has seen (rollback or replayed metadata).
    #[error("version {version} is older than {highest_seen}, already seen for this package (rollback refused)")]
    Rollback {
        /// Offered version.
        version: String,
        /// Highest seen.
        highest_seen: String,
    },
    /// The metadata's expiry passed.
    #[error("release metadata expired at {expired_at} (unix ms); ask the vendor to re-sign it")]
    Expired {
        /// When.
        expired_at: Millis,
    },
    /// The agent is too old for it.
    #[error("release needs agent version {needs} or later; this agent is {ours}")]
    AgentTooOld {
        /// Required.
        needs: String,
        /// Ours.
        ours: String,
    },
}

/// Verifies a release envelope and, for vendor-signed releases, the delegation that lets
/// its signer sign this package. Releases of [`AGENT_PACKAGE`] must be operator-signed.
pub fn verify(
    release: &Envelope,
    delegation: Option<&Envelope>,
    operator_keys: &[PublicKey],
) -> Result<Release, ReleaseError> {
    let untrusted = |e: EnvelopeError| ReleaseError::Untrusted(e.to_string());
    let statement = if operator_keys.contains(&release.signer) {
        release.open(operator_keys).map_err(untrusted)?
    } else {
        let delegation = delegation.ok_or_else(|| {
            ReleaseError::Untrusted("signed by a vendor key but no delegation came with it".into())
        })?;
        let grant = match delegation
            .open(operator_keys)
            .map_err(|e| ReleaseError::Untrusted(format!("delegation: {e}")))?
        {
            Statement::Delegation(grant) => grant,
            _ => {
                return Err(ReleaseError::Untrusted(
                    "delegation is not a delegation".into(),
                ))
            }
        };
        if grant.key != release.signer {
            return Err(ReleaseError::Untrusted(format!(
                "signed by a key that vendor {} was not delegated",
                grant.vendor
            )));
        }
        let statement = release.open(&[grant.key]).map_err(untrusted)?;
        if let Statement::Release(r) = &statement {
            if !grant.covers(&r.package) {
                return Err(ReleaseError::Untrusted(format!(
                    "vendor {} is not delegated package {}",
                    grant.vendor, r.package
                )));
            }
        }
        statement
    };
    match statement {
        Statement::Release(release) => {
            release.validate()?;
            Ok(release)
        }
        _ => Err(ReleaseError::Untrusted("not release metadata".into())),
    }
}

impl Release {
    /// Checks a verified release against the order, this machine and what the agent has
    /// seen. `now` must be the agent's guarded clock (never behind its high-water mark).
    pub fn check(
        &self,
        package: &str,
        version: Option<&str>,
        platform: &str,
        agent_version: &str,
        installed: &Installed,
        now: Millis,
    ) -> Result<Verdict, ReleaseError> {
        if self.package != package {
            return Err(ReleaseError::Mismatch(format!(
                "order is for {package}, metadata for {}",
                self.package
            )));
        }
        let offered = self.semver()?;
        if let Some(wanted) = version {
            let wanted = semver::Version::parse(wanted)
                .map_err(|e| ReleaseError::Mismatch(format!("version {wanted:?}: {e}")))?;
            if wanted != offered {
                return Err(ReleaseError::Mismatch(format!(
                    "order is for version {wanted}, metadata for {offered}"
                )));
            }
        }
        if self.platform != platform {
            return Err(ReleaseError::Platform {
                release: self.platform.clone(),
                ours: platform.to_string(),
            });
        }
        if let Some(highest) = &installed.highest_seen {
            if offered < *highest {
                return Err(ReleaseError::Rollback {
                    version: offered.to_string(),
                    highest_seen: highest.to_string(),
                });
            }
        }
        if installed.current.as_ref() == Some(&offered) {
            return Ok(Verdict::AlreadyInstalled);
        }
        if now > self.expires_at {
            return Err(ReleaseError::Expired {
                expired_at: self.expires_at,
            });
        }
        if let Some(min) = &self.min_agent_version {
            let needs = semver::Version::parse(min)
                .map_err(|e| ReleaseError::Invalid(format!("minimum agent version: {e}")))?;
            let ours = semver::Version::parse(agent_version)
                .map_err(|e| ReleaseError::Invalid(format!("agent version: {e}")))?;
            if ours < needs {
                return Err(ReleaseError::AgentTooOld {
                    needs: min.clone(),
                    ours: agent_version.to_string(),
                });
            }
        }
        Ok(Verdict::Install)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn wildcard_matching_agrees_with_glob_and_stays_fast() {
        let patterns = [
            "acme-*", "a?c*", "*", "*-tool", "a*b*c", "?", "*?x", ".*", "*.x", "a.b",
        ];
        let names = [
            "acme-tool",
            "abc",
            "a",
            "",
            "abxbc",
            "x",
            ".hidden",
            "y.x",
            "a.b",
            "axb",
        ];
        for pattern in patterns {
            let glob = glob::Pattern::new(pattern).unwrap();
            for name in names {
                assert_eq!(
                    wildcard_match(pattern.as_bytes(), name.as_bytes()),
                    glob.matches_with(name, GLOB_OPTIONS),
                    "{pattern:?} on {name:?}"
                );
            }
        }
        // The fuzzer's slow shape, 64 bytes of `*` and `?`: at once now (32 `?` need 32).
        let pattern = "?*".repeat(32);
        assert!(!wildcard_match(
            pattern.as_bytes(),
            "x".repeat(31).as_bytes()
        ));
        assert!(wildcard_match(
            pattern.as_bytes(),
            "x".repeat(64).as_bytes()
        ));
    }

    #[test]
    fn patterns_the_cli_refuses_cover_nothing() {
        // Found by the fuzzer: hundreds of `*` and `?` made glob matching backtrack for
        // minutes. Such a pattern is refused by the CLI, and now covers nothing either.
        let long = "*?".repeat(200);
        let grant = |pattern: &str| Delegation {
            vendor: "v".into(),
            key: crate::envelope::PublicKey([0; 32]),
            packages: vec![pattern.to_string()],
            issued_at: 0,
        };
        assert!(!grant(&long).covers("acme-tool"));
        assert!(!grant("ACME-*").covers("ACME-tool"));
        assert!(!grant("acme-*").covers(&format!("acme-{}", "x".repeat(64))));
        assert!(grant("acme-*").covers("acme-tool"));
    }
    use super::*;
    use crate::envelope::OperatorKey;

    fn release(package: &str, version: &str) -> Release {
        Release {
            package: package.into(),
            version: version.into(),
            platform: "linux-x86_64".into(),
            sha256: [1; 32],
            length: 10,
            format: Format::File {
                name: "tool".into(),
            },
            install_command: None,
            min_agent_version: None,
            url: None,
            issued_at: 1_000,
            expires_at: 100_000,
        }
    }

    fn delegation(operator: &OperatorKey, vendor: &OperatorKey, patterns: &[&str]) -> Envelope {
        operator
            .sign(&Statement::Delegation(Delegation {
                vendor: "acme".into(),
                key: vendor.public(),
                packages: patterns.iter().map(|p| p.to_string()).collect(),
                issued_at: 1_000,
            }))
            .unwrap()
    }

    fn keys() -> (OperatorKey, OperatorKey) {
        (
            OperatorKey::from_seed([1; 32]),
            OperatorKey::from_seed([2; 32]),
        )
    }

    #[test]
    fn delegated_vendor_release_verifies() {
        let (operator, vendor) = keys();
        let grant = delegation(&operator, &vendor, &["acme-*"]);
        let signed = vendor
            .sign(&Statement::Release(release("acme-tool", "1.2.0")))
            .unwrap();
        let got = verify(&signed, Some(&grant), &[operator.public()]).unwrap();
        assert_eq!(got.version, "1.2.0");
    }

    #[test]
    fn vendor_outside_its_delegation_is_refused() {
        let (operator, vendor) = keys();
        let grant = delegation(&operator, &vendor, &["acme-*"]);
        let signed = vendor
            .sign(&Statement::Release(release("other-tool", "1.0.0")))
            .unwrap();
        let err = verify(&signed, Some(&grant), &[operator.public()]).unwrap_err();
        assert!(
            err.to_string().contains("not delegated package other-tool"),
            "{err}"
        );
    }

    #[test]
    fn vendor_can_never_sign_the_agent_itself() {
        let (operator, vendor) = keys();
        let grant = delegation(&operator, &vendor, &["*"]);
        let signed = vendor
            .sign(&Statement::Release(release(AGENT_PACKAGE, "9.0.0")))
            .unwrap();
        assert!(verify(&signed, Some(&grant), &[operator.public()]).is_err());
        assert!(check_pattern("*").is_err());
        assert!(check_pattern("herald-*").is_err());
        assert!(check_pattern("acme-*").is_ok());
        let by_operator = operator
            .sign(&Statement::Release(release(AGENT_PACKAGE, "9.0.0")))
            .unwrap();
        assert!(verify(&by_operator, None, &[operator.public()]).is_ok());
    }

    #[test]
    fn delegation_signed_by_someone_else_is_refused() {
        let (operator, vendor) = keys();
        let forged = delegation(&vendor, &vendor, &["acme-*"]);
        let signed = vendor
            .sign(&Statement::Release(release("acme-tool", "1.0.0")))
            .unwrap();
        assert!(verify(&signed, Some(&forged), &[operator.public()]).is_err());
        assert!(verify(&signed, None, &[operator.public()]).is_err());
    }

    #[test]
    fn release_signed_by_another_key_than_delegated_is_refused() {
        let (operator, vendor) = keys();
        let intruder = OperatorKey::from_seed([3; 32]);
        let grant = delegation(&operator, &vendor, &["acme-*"]);
        let signed = intruder
            .sign(&Statement::Release(release("acme-tool", "1.0.0")))
            .unwrap();
        assert!(verify(&signed, Some(&grant), &[operator.public()]).is_err());
    }

    #[test]
    fn versions_never_go_down_and_expiry_blocks_installs() {
        let r = release("acme-tool", "1.2.0");
        let seen = |v: &str| Installed {
            highest_seen: Some(semver::Version::parse(v).unwrap()),
            current: None,
        };
        let check = |installed: &Installed, now| {
            r.check("acme-tool", None, "linux-x86_64", "0.1.0", installed, now)
        };
        assert_eq!(check(&Installed::default(), 2_000), Ok(Verdict::Install));
        assert!(matches!(
            check(&seen("1.3.0"), 2_000),
            Err(ReleaseError::Rollback { .. })
        ));
        // The same version after a failed attempt may be retried.
        assert_eq!(check(&seen("1.2.0"), 2_000), Ok(Verdict::Install));
        assert!(matches!(
            check(&Installed::default(), 200_000),
            Err(ReleaseError::Expired { .. })
        ));
        let current = Installed {
            highest_seen: None,
            current: Some(semver::Version::parse("1.2.0").unwrap()),
        };
        assert_eq!(check(&current, 2_000), Ok(Verdict::AlreadyInstalled));
    }

    #[test]
    fn platform_order_and_agent_version_are_checked() {
        let mut r = release("acme-tool", "1.2.0");
        let none = Installed::default();
        assert!(matches!(
            r.check("acme-tool", None, "linux-aarch64", "0.1.0", &none, 2_000),
            Err(ReleaseError::Platform { .. })
        ));
        assert!(matches!(
            r.check(
                "acme-tool",
                Some("1.1.0"),
                "linux-x86_64",
                "0.1.0",
                &none,
                2_000
            ),
            Err(ReleaseError::Mismatch(_))
        ));
        assert!(matches!(
            r.check("acme-other", None, "linux-x86_64", "0.1.0", &none, 2_000),
            Err(ReleaseError::Mismatch(_))
        ));
        r.min_agent_version = Some("0.2.0".into());
        assert!(matches!(
            r.check("acme-tool", None, "linux-x86_64", "0.1.0", &none, 2_000),
            Err(ReleaseError::AgentTooOld { .. })
        ));
    }

    #[test]
    fn malformed_metadata_is_invalid() {
        let mut r = release("acme-tool", "not-semver");
        assert!(r.validate().is_err());
        r.version = "1.0.0".into();
        r.format = Format::File {
            name: "../x".into(),
        };
        assert!(r.validate().is_err());
        r.format = Format::TarGz;
        r.install_command = Some(vec![]);
        assert!(r.validate().is_err());
        assert!(check_package_name("Acme").is_err());
        assert!(check_package_name("acme-tool").is_ok());
    }
}
