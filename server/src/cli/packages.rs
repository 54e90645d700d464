//! `herald-server vendor ...` and `herald-server package ...`: delegations, signed
//! release metadata and artifact upload, installs, subscriptions and rollouts.
//!
//! Signing happens here, on the administrator's or vendor's machine: the operator key
//! signs delegations and install orders, the vendor key signs release metadata.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand};
use sha2::Digest;
use tokio::io::AsyncReadExt;

use herald_shared::codec;
use herald_shared::envelope::{Action, InstallSpec, Repeat, Statement, VendorKey};
use herald_shared::release::{self, Delegation, Format, Release};
use herald_shared::schedule;

use crate::cli::{
    deadline, parse_duration, parse_timeout, print_json, time, usage, CliError, Context,
    CLOCK_SKEW, DEFAULT_TTL, STANDING_VALIDITY,
};
use crate::model::{
    CreateJobs, CreateRelease, CreateSubscription, CreateVendor, Created, InstallsCreated,
};
use crate::model::{ReleaseInfo, RolloutInfo, SubscriptionInfo, VendorInfo, Waves};
use crate::{now_ms, random_bytes};

/// Default limit for download plus install command.
const INSTALL_TIMEOUT: &str = "30m";
/// Default metadata lifetime.
const DEFAULT_EXPIRES: &str = "30d";

/// `vendor ...`.
#[derive(Debug, Subcommand)]
pub enum VendorCommand {
    /// Make a vendor key pair: the private key goes to FILE, the public key is printed.
    Keygen {
        /// Where to write the private key (created with mode 0600; must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Delegate package names to a vendor key (operator-signed); prints the vendor's
    /// API token for publishing.
    Add {
        /// Vendor name.
        name: String,
        /// The vendor's public key (hex, from `vendor keygen`).
        #[arg(long)]
        key: String,
        /// Package-name patterns the vendor may publish (`acme-*`); repeatable.
        #[arg(long = "packages", required = true)]
        packages: Vec<String>,
    },
    /// List vendors.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `package ...`.
#[derive(Debug, Subcommand)]
pub enum PackageCommand {
    /// Sign release metadata with a vendor key and upload the artifact.
    Publish(Box<PublishArgs>),
    /// List releases.
    List {
        /// Only this package.
        package: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a package: releases, subscriptions, rollouts.
    Show {
        /// Package name.
        package: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Install one version now (a one-off job per agent).
    Install(InstallArgs),
    /// Keep agents on the latest version: every new release rolls out in waves.
    Subscribe(SubscribeArgs),
    /// Remove a subscription (running rollouts stop).
    Unsubscribe {
        /// Subscription id.
        id: i64,
    },
    /// Switch agents back to the version installed before the current one.
    Revert(RevertArgs),
    /// Rollouts of new releases to subscribed agents.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

/// `package publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The vendor's private key file (from `vendor keygen`); the operator key file for
    /// `herald-agent` itself.
    #[arg(long)]
    pub vendor_key: PathBuf,
    /// Package name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// The artifact: a `.tar.gz` is unpacked; anything else is installed as one file.
    pub file: PathBuf,
    /// Platform it runs on.
    #[arg(long, default_value_t = release::this_platform())]
    pub platform: String,
    /// Command run after unpacking, e.g. "{dir}/install.sh --quiet"; `{dir}` is the new
    /// version's directory and `{artifact}` the installed file.
    #[arg(long)]
    pub install_cmd: Option<String>,
    /// How long the metadata allows new installs.
    #[arg(long, default_value = DEFAULT_EXPIRES)]
    pub expires: String,
    /// Lowest agent version that may install it.
    #[arg(long)]
    pub min_agent_version: Option<String>,
    /// Agents download from this URL (a CDN) instead of the server.
    #[arg(long)]
    pub url: Option<String>,
    /// Vendor API token from `vendor add` (default: the admin token).
    #[arg(long, env = "HERALD_VENDOR_TOKEN")]
    pub token: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `package install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Limit for download plus install.
    #[arg(long, default_value = INSTALL_TIMEOUT)]
    pub timeout: String,
    /// How long the job waits for an offline agent.
    #[arg(long, default_value = DEFAULT_TTL)]
    pub ttl: String,
    /// Wait for the results.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: print the results as one JSON document (`{"ok", "jobs",
    /// "skipped"}`, each job as `show --json` prints it).
    #[arg(long, requires = "wait")]
    pub json: bool,
}

/// `package subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// Package name.
    pub name: String,
    /// Waves: a canary count, then cumulative percentages.
    #[arg(long, default_value = "1,10%,50%,100%")]
    pub waves: String,
    /// Failed installs (percent of those started) that halt a rollout.
    #[arg(long, default_value = "10%")]
    pub max_failures: String,
    /// Limit for download plus install.
    #[arg(long, default_value = INSTALL_TIMEOUT)]
    pub timeout: String,
    /// How long each install job waits for an offline agent.
    #[arg(long, default_value = "7d")]
    pub ttl: String,
}

/// `package revert`.
#[derive(Debug, Args)]
pub struct RevertArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// Package name.
    pub name: String,
    /// How long the job waits for an offline agent.
    #[arg(long, default_value = DEFAULT_TTL)]
    pub ttl: String,
    /// Wait for the results.
    #[arg(long)]
    pub wait: bool,
}

/// `package rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// List rollouts.
    List {
        /// Only this package.
        package: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one rollout with every agent's state.
    Show {
        /// Rollout id.
        id: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Stop starting new waves.
    Pause {
        /// Rollout id.
        id: i64,
    },
    /// Continue a paused or halted rollout.
    Resume {
        /// Rollout id.
        id: i64,
    },
}

/// `vendor keygen`: needs no server.
pub fn keygen(out: &Path) -> Result<ExitCode, CliError> {
    if out.exists() {
        return Err(usage(format!(
            "{} exists; refusing to overwrite a key",
            out.display()
        )));
    }
    let key = VendorKey::from_seed(random_bytes());
    herald_io::files::write_private(out, key.to_hex().as_bytes())
        .map_err(|e| CliError::Other(e.to_string()))?;
    println!("private key written to {}", out.display());
    println!("public key: {}", key.public().to_hex());
    Ok(ExitCode::SUCCESS)
}

/// Reads a vendor's or sender's private key file (from `keygen`).
pub(crate) fn load_key(path: &Path) -> Result<VendorKey, CliError> {
    let text = herald_io::files::read_string(path).map_err(|e| usage(e.to_string()))?;
    VendorKey::from_hex(&text)
        .map_err(|_| usage(format!("{} does not hold a valid key", path.display())))
}

/// An envelope as the API takes it: base64 of its bincode.
pub(crate) fn encode_envelope(
    envelope: &herald_shared::envelope::Envelope,
) -> Result<String, CliError> {
    let bytes = codec::to_bytes(envelope).map_err(|e| CliError::Other(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn parse_percent(flag: &str, text: &str) -> Result<f64, CliError> {
    let number = text.strip_suffix('%').unwrap_or(text);
    match number.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
        _ => Err(usage(format!(
            "{flag}: {text:?} is not a percentage between 0% and 100%"
        ))),
    }
}

impl Context {
    /// `vendor add|list`.
    pub(crate) async fn vendor(&self, command: VendorCommand) -> Result<ExitCode, CliError> {
        match command {
            VendorCommand::Keygen { out } => keygen(&out),
            VendorCommand::Add {
                name,
                key,
                packages,
            } => {
                if !herald_shared::valid_name(&name) {
                    return Err(usage(format!(
                        "invalid vendor name {name:?}: use letters, digits, '.', '_' and '-'"
                    )));
                }
                let key = herald_shared::envelope::PublicKey::from_hex(&key).map_err(|_| {
                    usage("--key is not a valid Ed25519 public key (64 hex digits)")
                })?;
                for pattern in &packages {
                    release::check_pattern(pattern).map_err(usage)?;
                }
                let envelope = self.sign(&Statement::Delegation(Delegation {
                    vendor: name.clone(),
                    key,
                    packages: packages.clone(),
                    issued_at: now_ms(),
                }))?;
                let token = format!("hrldv_{}", hex::encode(random_bytes::<24>()));
                let _: Created = self
                    .client
                    .post(
                        "/api/v1/vendors",
                        &CreateVendor {
                            envelope,
                            token_hash: herald_shared::token::secret_hash(token.as_bytes()),
                        },
                    )
                    .await?;
                println!("vendor {name} may publish {}", packages.join(", "));
                println!("vendor API token (give it to the vendor; shown once): {token}");
                Ok(ExitCode::SUCCESS)
            }
            VendorCommand::List { json } => {
                let vendors: Vec<VendorInfo> = self.client.get("/api/v1/vendors").await?;
                if json {
                    print_json(&vendors);
                } else if vendors.is_empty() {
                    println!("no vendors");
                } else {
                    println!("{:<20} {:<18} PACKAGES", "VENDOR", "KEY");
                    for v in vendors {
                        println!(
                            "{:<20} {:<18} {}",
                            v.name,
                            &v.public_key[..16],
                            v.packages.join(",")
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    /// `package ...`.
    pub(crate) async fn package(&self, command: PackageCommand) -> Result<ExitCode, CliError> {
        match command {
            PackageCommand::Publish(args) => self.publish(*args).await,
            PackageCommand::List { package, json } => {
                let path = match &package {
                    Some(p) => format!("/api/v1/releases?package={p}"),
                    None => "/api/v1/releases".into(),
                };
                let releases: Vec<ReleaseInfo> = self.client.get(&path).await?;
                if json {
                    print_json(&releases);
                } else {
                    print_releases(&releases);
                }
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::Show { package, json } => {
                release::check_package_name(&package).map_err(usage)?;
                let releases: Vec<ReleaseInfo> = self
                    .client
                    .get(&format!("/api/v1/releases?package={package}"))
                    .await?;
                let subscriptions: Vec<SubscriptionInfo> = self
                    .client
                    .get(&format!("/api/v1/subscriptions?package={package}"))
                    .await?;
                let rollouts: Vec<RolloutInfo> = self
                    .client
                    .get(&format!("/api/v1/rollouts?package={package}"))
                    .await?;
                if json {
                    print_json(&serde_json::json!({
                        "package": package,
                        "releases": releases,
                        "subscriptions": subscriptions,
                        "rollouts": rollouts,
                    }));
                } else {
                    println!("package {package}");
                    print_releases(&releases);
                    println!();
                    for s in subscriptions.iter().filter(|s| !s.target.is_empty()) {
                        println!(
                            "subscription {}: {} waves {} halt above {}% failed",
                            s.id,
                            s.target,
                            s.waves,
                            (s.max_failures * 100.0).round()
                        );
                    }
                    for r in &rollouts {
                        print_rollout_line(r);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::Install(args) => self.install(args).await,
            PackageCommand::Subscribe(args) => self.subscribe(args).await,
            PackageCommand::Unsubscribe { id } => {
                let _: Created = self
                    .client
                    .delete(&format!("/api/v1/subscriptions/{id}"))
                    .await?;
                println!("subscription {id} removed");
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::Revert(args) => self.revert(args).await,
            PackageCommand::Rollout(command) => self.rollout(command).await,
        }
    }

    async fn publish(&self, args: PublishArgs) -> Result<ExitCode, CliError> {
        let key = load_key(&args.vendor_key)?;
        release::check_package_name(&args.name).map_err(usage)?;
        release::check_platform(&args.platform).map_err(usage)?;
        let expires = parse_duration("--expires", &args.expires)?;
        let file_name = args
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| usage(format!("{} is not a file name", args.file.display())))?
            .to_string();
        let format = if file_name.ends_with(".tar.gz") || file_name.ends_with(".tgz") {
            Format::TarGz
        } else {
            Format::File { name: file_name }
        };
        let install_command = match &args.install_cmd {
            Some(text) => Some(
                shlex::split(text)
                    .filter(|words| !words.is_empty())
                    .ok_or_else(|| usage(format!("--install-cmd {text:?} does not parse")))?,
            ),
            None => None,
        };
        if let Some(url) = &args.url {
            herald_shared::url::check_download_url(url).map_err(usage)?;
        }
        let (length, sha256) = hash_file(&args.file).await?;
        let now = now_ms();
        let metadata = Release {
            package: args.name.clone(),
            version: args.version.clone(),
            platform: args.platform.clone(),
            sha256,
            length,
            format,
            install_command,
            min_agent_version: args.min_agent_version.clone(),
            url: args.url.clone(),
            issued_at: now,
            expires_at: deadline(now, &[expires], "--expires")?,
        };
        metadata.validate().map_err(|e| usage(e.to_string()))?;
        let envelope = key
            .sign(&Statement::Release(metadata))
            .map_err(|e| CliError::Other(e.to_string()))?;
        let client = match &args.token {
            Some(token) => {
                crate::cli::client::Client::new(&self.admin, None)?.with_token(token.clone())
            }
            None => crate::cli::client::Client::new(&self.admin, None)?,
        };
        let info: ReleaseInfo = client
            .post(
                "/api/v1/releases",
                &CreateRelease {
                    envelope: encode_envelope(&envelope)?,
                },
            )
            .await?;
        let info = if info.state == "uploading" {
            upload(&client, &info, &args.file, args.quiet).await?
        } else {
            info
        };
        println!(
            "published {} {} for {} (release {}, {} bytes, sha256 {})",
            info.package, info.version, info.platform, info.id, info.length, info.sha256
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn install(&self, args: InstallArgs) -> Result<ExitCode, CliError> {
        release::check_package_name(&args.name).map_err(usage)?;
        semver::Version::parse(&args.version)
            .map_err(|e| usage(format!("version {:?}: {e}", args.version)))?;
        let timeout = parse_timeout(&args.timeout)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let audience = self.audience(&args.to).await?;
        let envelope = self.sign_order(
            audience,
            Action::Install(InstallSpec {
                package: args.name.clone(),
                version: Some(args.version.clone()),
                timeout_ms: timeout.as_millis() as u64,
            }),
            Repeat::Once,
            deadline(
                now_ms(),
                &[ttl, timeout, CLOCK_SKEW],
                "--ttl plus --timeout",
            )?,
        )?;
        let created: InstallsCreated = self
            .client
            .post(
                "/api/v1/installs",
                &CreateJobs {
                    envelope,
                    ttl_ms: ttl.as_millis() as u64,
                },
            )
            .await?;
        for agent in &created.skipped {
            eprintln!(
                "agent {agent}: no published release of {} {} for its platform; skipped",
                args.name, args.version
            );
        }
        if args.json {
            return self
                .report_jobs_json(&created.ids, Some(&created.skipped))
                .await;
        }
        self.report_jobs(&created.ids, args.wait).await
    }

    async fn revert(&self, args: RevertArgs) -> Result<ExitCode, CliError> {
        release::check_package_name(&args.name).map_err(usage)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let action = Action::Revert {
            package: args.name.clone(),
        };
        let created = self
            .queue_once(&args.to, action, std::time::Duration::ZERO, ttl)
            .await?;
        self.report_jobs(&created.ids, args.wait).await
    }

    async fn subscribe(&self, args: SubscribeArgs) -> Result<ExitCode, CliError> {
        release::check_package_name(&args.name).map_err(usage)?;
        let waves: Waves = args
            .waves
            .parse()
            .map_err(|e: String| usage(format!("--waves: {e}")))?;
        let max_failures = parse_percent("--max-failures", &args.max_failures)?;
        let timeout = parse_timeout(&args.timeout)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let audience = self.audience(&args.to).await?;
        let target = audience.to_string();
        let envelope = self.sign_order(
            audience,
            Action::Install(InstallSpec {
                package: args.name.clone(),
                version: None,
                timeout_ms: timeout.as_millis() as u64,
            }),
            Repeat::Standing { min_interval_ms: 0 },
            deadline(now_ms(), &[STANDING_VALIDITY], "the standing validity")?,
        )?;
        let created: Created = self
            .client
            .post(
                "/api/v1/subscriptions",
                &CreateSubscription {
                    envelope,
                    waves: waves.to_string(),
                    max_failures,
                    ttl_ms: ttl.as_millis() as u64,
                },
            )
            .await?;
        println!(
            "subscription {} : {target} follows {} (waves {waves}, halt above {}% failed)",
            created.ids.first().copied().unwrap_or(0),
            args.name,
            (max_failures * 100.0).round()
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn rollout(&self, command: RolloutCommand) -> Result<ExitCode, CliError> {
        match command {
            RolloutCommand::List { package, json } => {
                let path = match &package {
                    Some(p) => format!("/api/v1/rollouts?package={p}"),
                    None => "/api/v1/rollouts".into(),
                };
                let rollouts: Vec<RolloutInfo> = self.client.get(&path).await?;
                if json {
                    print_json(&rollouts);
                } else if rollouts.is_empty() {
                    println!("no rollouts");
                } else {
                    for r in &rollouts {
                        print_rollout_line(r);
                    }
                }
            }
            RolloutCommand::Show { id, json } => {
                let rollout: RolloutInfo =
                    self.client.get(&format!("/api/v1/rollouts/{id}")).await?;
                if json {
                    print_json(&rollout);
                } else {
                    print_rollout(&rollout);
                }
            }
            RolloutCommand::Pause { id } | RolloutCommand::Resume { id } => {
                let verb = if matches!(command, RolloutCommand::Pause { .. }) {
                    "pause"
                } else {
                    "resume"
                };
                let rollout: RolloutInfo = self
                    .client
                    .post(
                        &format!("/api/v1/rollouts/{id}/{verb}"),
                        &serde_json::json!({}),
                    )
                    .await?;
                print_rollout_line(&rollout);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

async fn hash_file(path: &Path) -> Result<(u64, [u8; 32]), CliError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut length = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buffer)
            .await
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        length += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((length, hasher.finalize().into()))
}

/// Streams the artifact with a progress bar (on a terminal).
async fn upload(
    client: &crate::cli::client::Client,
    info: &ReleaseInfo,
    path: &Path,
    quiet: bool,
) -> Result<ReleaseInfo, CliError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(info.length);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let progress = bar.clone();
    let stream = futures_util::stream::unfold(file, move |mut file| {
        let progress = progress.clone();
        async move {
            let mut buffer = vec![0u8; 256 * 1024];
            match file.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    progress.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(buffer), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        }
    });
    let result = client
        .put_body(
            &format!("/api/v1/releases/{}/artifact", info.id),
            reqwest::Body::wrap_stream(stream),
            info.length,
        )
        .await;
    bar.finish_and_clear();
    Ok(result?)
}

fn print_releases(releases: &[ReleaseInfo]) {
    if releases.is_empty() {
        println!("no releases");
        return;
    }
    println!(
        "{:<5} {:<20} {:<12} {:<16} {:<10} {:<12} {:<25} EXPIRES",
        "ID", "PACKAGE", "VERSION", "PLATFORM", "STATE", "VENDOR", "PUBLISHED"
    );
    for r in releases {
        println!(
            "{:<5} {:<20} {:<12} {:<16} {:<10} {:<12} {:<25} {}",
            r.id,
            r.package,
            r.version,
            r.platform,
            r.state,
            r.vendor.as_deref().unwrap_or("(operator)"),
            time(r.published_at),
            schedule::format_time(r.expires_at)
        );
    }
}

fn print_rollout_line(r: &RolloutInfo) {
    println!(
        "rollout {}: {} {} ({}) {} wave {}/{}: {} succeeded, {} failed, {} in progress, {} waiting{}",
        r.id,
        r.package,
        r.version,
        r.platform,
        r.state,
        r.wave + 1,
        r.wave_ends.len().max(1),
        r.succeeded,
        r.failed,
        r.in_progress,
        r.waiting,
        r.reason
            .as_ref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default()
    );
}

fn print_rollout(r: &RolloutInfo) {
    print_rollout_line(r);
    println!("wave ends: {:?}", r.wave_ends);
    println!(
        "{:<22} {:<5} {:<8} {:<12} DETAIL",
        "AGENT", "WAVE", "JOB", "STATE"
    );
    for t in &r.targets {
        let detail = t
            .error
            .clone()
            .or_else(|| t.progress.clone())
            .unwrap_or_default();
        println!(
            "{:<22} {:<5} {:<8} {:<12} {}",
            t.agent_id,
            t.wave + 1,
            t.job_id
                .map(|j| j.to_string())
                .unwrap_or_else(|| "-".into()),
            t.state,
            detail
        );
    }
}
