//! `herald-server sender ...` and `herald-server message ...`: sender grants (signed by
//! the operator key here, on the administrator's machine), and messages signed by a
//! sender key (on the sender's machine; the server never holds either key).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand};

use herald_shared::codec;
use herald_shared::envelope::{Envelope, PublicKey, Statement};
use herald_shared::message::{self, Message, Priority, SenderGrant};
use herald_shared::schedule;

use herald_io::random_bytes;

use crate::cli::client::Client;
use crate::cli::packages::{encode_envelope, keygen, load_key};
use crate::cli::{parse_duration, print_json, usage, CliError, Context};
use crate::model::{
    parse_country, CampaignCreated, CampaignRecipient, CampaignStatus, CreateCampaign,
    CreateSender, Created, Fallback, GrantInfo, ListUploaded, MessageCreated, MessageDetail,
    MessageInfo, ReceiptInfo, RefusalInfo, SendMessage, SenderInfo, SenderLink, RECIPIENT_STATES,
};
use crate::now_ms;

/// `sender ...`.
#[derive(Debug, Subcommand)]
pub enum SenderCommand {
    /// Make a sender key pair: the private key goes to FILE, the public key is printed.
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Delegate a sender name to a key (operator-signed); prints the sender's API token.
    Add {
        /// Sender name (letters, digits, '.', '_', '-').
        name: String,
        /// What recipients see as the sender.
        #[arg(long)]
        display_name: String,
        /// The sender's public key (hex, from `sender keygen`).
        #[arg(long)]
        key: String,
        /// Allow this sender to mark messages as advertising.
        #[arg(long)]
        advertising: bool,
    },
    /// List senders.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a sender: its token and key stop working for new messages.
    Rm {
        /// Sender name.
        name: String,
    },
    /// Let a console user act for a sender in the console (compose, upload lists,
    /// watch campaigns); `--unlink` undoes it.
    Link {
        /// Sender name.
        name: String,
        /// Console login.
        #[arg(long)]
        user: String,
        /// Remove the link instead.
        #[arg(long)]
        unlink: bool,
    },
}

/// `message ...`.
#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Sign a message with a sender key and send it.
    Send(Box<SendArgs>),
    /// List messages, newest first.
    List {
        /// Only this sender's.
        #[arg(long)]
        sender: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// One message: counts, success rate and every recipient's state.
    Show {
        /// Message id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// A message's signed receipts.
    Receipts {
        /// Message id.
        id: String,
        /// Check every receipt's signature against its agent's enrolled key.
        #[arg(long)]
        verify: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// A campaign's figures: who was reached, by which channel, how fast.
    Status {
        /// Message id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// A campaign's rows, each with its state.
    Recipients {
        /// Message id.
        id: String,
        /// Only rows in this state (read, displayed, stored, blocked, waiting,
        /// fallback_pending, fallback_sent, fallback_delivered, fallback_failed,
        /// canceled, not_reached).
        #[arg(long)]
        state: Option<String>,
        /// CSV output.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// Stop what of a message has not gone out: queued deliveries and fallbacks.
    Cancel {
        /// Message id.
        id: String,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
    /// Who blocked which sender, as the agents reported.
    Refusals {
        /// Only blocks of this sender.
        #[arg(long)]
        sender: Option<String>,
        /// CSV output (phone, sender, agent, by, at): the refusal report a sender is owed.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Sender API token (default: the admin token).
        #[arg(long, env = "HERALD_SENDER_TOKEN")]
        token: Option<String>,
    },
}

/// `message send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The sender's private key file (from `sender keygen`).
    #[arg(long)]
    pub sender_key: PathBuf,
    /// `agent:<id or name>`, `group:<name>` or `all` (with a sender token, agents by id).
    #[arg(long, required_unless_present = "list", conflicts_with = "list")]
    pub to: Option<String>,
    /// A recipient list: CSV with a header row naming any of phone, email, user, agent.
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Default country for national phone numbers in the list (`KR`, `US`).
    #[arg(long, requires = "list")]
    pub country: Option<String>,
    /// Refuse the whole list if any row cannot be read.
    #[arg(long, requires = "list")]
    pub strict: bool,
    /// Where the message goes when the program does not get it there: sms, email, none.
    #[arg(long, requires = "list", default_value = "none")]
    pub fallback: String,
    /// How long to wait for a device's `stored` receipt before the fallback.
    #[arg(long, requires = "list", default_value = "10m")]
    pub fallback_after: String,
    /// At most this many fallbacks (they cost money).
    #[arg(long, requires = "list")]
    pub max_fallback: Option<u64>,
    /// Spread the send: rows per second (`500` or `500/s`).
    #[arg(long, requires = "list")]
    pub rate: Option<String>,
    /// Add a link to the server's page for getting the app to fallbacks for people
    /// without it.
    #[arg(long, requires = "list")]
    pub invite: bool,
    /// Title (at most 200 bytes).
    #[arg(long)]
    pub title: String,
    /// Text (at most 4 KiB).
    #[arg(long)]
    pub body: String,
    /// `normal` or `high` (shown as urgent).
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// How long the message may wait for a recipient (at most 28d).
    #[arg(long, default_value = "3d")]
    pub ttl: String,
    /// A newer message with the same collapse key replaces the older one in inboxes.
    #[arg(long)]
    pub collapse: Option<String>,
    /// Send later: RFC 3339, "YYYY-MM-DD HH:MM" in --tz, or +DUR.
    #[arg(long)]
    pub at: Option<String>,
    /// Time zone for --at.
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// Mark as advertising (the sender must be allowed to).
    #[arg(long)]
    pub advertising: bool,
    /// A page the notification opens (`https:`).
    #[arg(long)]
    pub link: Option<String>,
    /// Sender API token (default: the admin token).
    #[arg(long, env = "HERALD_SENDER_TOKEN")]
    pub token: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

fn decode(text: &str) -> Result<Envelope, CliError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| CliError::Other(format!("the server sent a grant that is not base64: {e}")))?;
    codec::from_bytes(&bytes, codec::DEFAULT_FRAME_LIMIT)
        .map_err(|e| CliError::Other(format!("the server sent a grant that does not decode: {e}")))
}

/// `sender keygen`: needs no server.
pub fn sender_keygen(out: &Path) -> Result<ExitCode, CliError> {
    keygen(out)
}

/// `path`, with `?sender=NAME` when a sender is named (checked as a name first, so
/// nothing else reaches the query string).
fn sender_query(path: &str, sender: &Option<String>) -> Result<String, CliError> {
    match sender {
        Some(name) if !herald_shared::valid_name(name) => Err(usage(format!(
            "--sender {name:?}: a sender name is 1 to 64 of letters, digits, '.', '_' and '-'"
        ))),
        Some(name) => Ok(format!("{path}?sender={name}")),
        None => Ok(path.to_string()),
    }
}

/// A sender name as given on the command line (checked before it reaches a URL).
fn sender_name(name: &str) -> Result<&str, CliError> {
    if herald_shared::valid_name(name) {
        Ok(name)
    } else {
        Err(usage(format!(
            "{name:?}: a sender name is 1 to 64 of letters, digits, '.', '_' and '-'"
        )))
    }
}

/// A message id as given on the command line: 32 hex digits (as `message list` prints).
fn message_id(id: &str) -> Result<&str, CliError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(usage(format!(
            "{id:?} is not a message id: 32 hex digits, as `message list` prints"
        )))
    }
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

impl Context {
    fn client_with(&self, token: &Option<String>) -> Result<Client, CliError> {
        let client = Client::new(&self.admin, None)?;
        Ok(match token {
            Some(token) => client.with_token(token.clone()),
            None => client,
        })
    }

    /// `sender add|list|rm`.
    pub(crate) async fn sender(&self, command: SenderCommand) -> Result<ExitCode, CliError> {
        match command {
            SenderCommand::Keygen { out } => sender_keygen(&out),
            SenderCommand::Add {
                name,
                display_name,
                key,
                advertising,
            } => {
                let key = PublicKey::from_hex(&key).map_err(|_| {
                    usage("--key is not a valid Ed25519 public key (64 hex digits)")
                })?;
                let grant = SenderGrant {
                    sender: name.clone(),
                    display_name,
                    key,
                    advertising,
                    issued_at: now_ms(),
                };
                grant.validate().map_err(usage)?;
                let envelope = self.sign(&Statement::Sender(grant))?;
                let token = format!("hrlds_{}", hex::encode(random_bytes::<24>()));
                let _: Created = self
                    .client
                    .post(
                        "/api/v1/senders",
                        &CreateSender {
                            envelope,
                            token_hash: herald_shared::token::secret_hash(token.as_bytes()),
                        },
                    )
                    .await?;
                let ads = if advertising {
                    ", advertising allowed"
                } else {
                    ""
                };
                println!("sender {name} may send messages{ads}");
                println!("sender API token (give it to the sender; shown once): {token}");
                Ok(ExitCode::SUCCESS)
            }
            SenderCommand::List { json } => {
                let senders: Vec<SenderInfo> = self.client.get("/api/v1/senders").await?;
                if json {
                    print_json(&senders);
                } else if senders.is_empty() {
                    println!("no senders");
                } else {
                    println!(
                        "{:<20} {:<24} {:<18} {:<4} MESSAGES",
                        "SENDER", "DISPLAY NAME", "KEY", "ADS"
                    );
                    for s in senders {
                        println!(
                            "{:<20} {:<24} {:<18} {:<4} {}",
                            s.name,
                            s.display_name,
                            &s.public_key[..16],
                            if s.advertising { "yes" } else { "no" },
                            s.messages
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            SenderCommand::Rm { name } => {
                let _: Created = self
                    .client
                    .delete(&format!("/api/v1/senders/{name}"))
                    .await?;
                println!("sender {name} removed");
                Ok(ExitCode::SUCCESS)
            }
            SenderCommand::Link { name, user, unlink } => {
                let name = sender_name(&name)?;
                let _: Created = self
                    .client
                    .post(
                        &format!("/api/v1/senders/{name}/users"),
                        &SenderLink {
                            login: user.clone(),
                            linked: !unlink,
                        },
                    )
                    .await?;
                if unlink {
                    println!("console user {user} no longer acts for sender {name}");
                } else {
                    println!(
                        "console user {user} now acts for sender {name} in the console (/sender)"
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    /// `message send|list|show|receipts|refusals`.
    pub(crate) async fn message(&self, command: MessageCommand) -> Result<ExitCode, CliError> {
        match command {
            MessageCommand::Send(args) => self.send_message(*args).await,
            MessageCommand::List {
                sender,
                json,
                token,
            } => {
                let path = sender_query("/api/v1/messages", &sender)?;
                let messages: Vec<MessageInfo> = self.client_with(&token)?.get(&path).await?;
                if json {
                    print_json(&messages);
                } else if messages.is_empty() {
                    println!("no messages");
                } else {
                    println!(
                        "{:<32} {:<16} {:>9} {:>7} {:>8} {:>8}  TITLE",
                        "ID", "SENDER", "ADDRESSED", "STORED", "REFUSED", "SUCCESS"
                    );
                    for m in messages {
                        println!(
                            "{:<32} {:<16} {:>9} {:>7} {:>8} {:>8}  {}",
                            m.id,
                            m.sender,
                            m.counts.addressed,
                            m.counts.stored,
                            m.counts.refused,
                            percent(m.counts.success_rate),
                            m.title
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Show { id, json, token } => {
                let detail: MessageDetail = self
                    .client_with(&token)?
                    .get(&format!("/api/v1/messages/{}", message_id(&id)?))
                    .await?;
                if json {
                    print_json(&detail);
                    return Ok(ExitCode::SUCCESS);
                }
                let m = &detail.info;
                let c = &m.counts;
                println!("message {} from {}: {}", m.id, m.sender, m.title);
                println!("{}", detail.body);
                println!(
                    "to {}; {} addressed: {} stored, {} displayed, {} read, {} refused, {} expired, {} pending; success rate {}",
                    m.audience, c.addressed, c.stored, c.displayed, c.read, c.refused, c.expired, c.pending,
                    percent(c.success_rate)
                );
                println!("{:<20} {:<16} REASON", "AGENT", "STATE");
                for r in &detail.recipients {
                    println!(
                        "{:<20} {:<16} {}",
                        r.agent,
                        r.state,
                        r.reason.as_deref().unwrap_or("")
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Receipts {
                id,
                verify,
                json,
                token,
            } => {
                let path = format!(
                    "/api/v1/messages/{}/receipts?verify={verify}",
                    message_id(&id)?
                );
                let receipts: Vec<ReceiptInfo> = self.client_with(&token)?.get(&path).await?;
                if json {
                    print_json(&receipts);
                } else {
                    for r in &receipts {
                        let check = match r.verified {
                            Some(true) => " (signature verifies)",
                            Some(false) => " (SIGNATURE DOES NOT VERIFY)",
                            None => "",
                        };
                        println!(
                            "{} {} at {}{}{check}",
                            r.agent_id,
                            r.state,
                            r.at,
                            r.reason
                                .as_deref()
                                .map(|x| format!(": {x}"))
                                .unwrap_or_default()
                        );
                    }
                }
                if verify {
                    let good = receipts.iter().filter(|r| r.verified == Some(true)).count();
                    eprintln!("{good} of {} receipts verify", receipts.len());
                    if good != receipts.len() {
                        return Ok(ExitCode::FAILURE);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Status { id, json, token } => {
                let status: CampaignStatus = self
                    .client_with(&token)?
                    .get(&format!("/api/v1/messages/{}/status", message_id(&id)?))
                    .await?;
                if json {
                    print_json(&status);
                } else {
                    print_campaign_status(&status);
                }
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Recipients {
                id,
                state,
                csv,
                json,
                token,
            } => {
                let mut path = format!("/api/v1/messages/{}/recipients", message_id(&id)?);
                if let Some(state) = &state {
                    if !RECIPIENT_STATES.contains(&state.as_str()) {
                        return Err(usage(format!(
                            "--state {state:?}: use one of {}",
                            RECIPIENT_STATES.join(", ")
                        )));
                    }
                    path.push_str(&format!("?state={state}"));
                }
                let rows: Vec<CampaignRecipient> = self.client_with(&token)?.get(&path).await?;
                if csv {
                    let text = crate::api::campaigns::recipients_csv(&rows)
                        .map_err(|e| CliError::Other(e.to_string()))?;
                    print!("{}", String::from_utf8_lossy(&text));
                } else if json {
                    print_json(&rows);
                } else {
                    println!(
                        "{:>7} {:<16} {:<24} {:<12} {:>3} {:<18} DETAIL",
                        "LINE", "PHONE", "EMAIL", "USER", "DEV", "STATE"
                    );
                    for r in rows {
                        println!(
                            "{:>7} {:<16} {:<24} {:<12} {:>3} {:<18} {}",
                            r.line,
                            r.phone.as_deref().unwrap_or("-"),
                            r.email.as_deref().unwrap_or("-"),
                            r.user.as_deref().unwrap_or("-"),
                            r.devices,
                            r.state,
                            r.fallback_detail.as_deref().unwrap_or("")
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Cancel { id, token } => {
                let answer: serde_json::Value = self
                    .client_with(&token)?
                    .post(
                        &format!("/api/v1/messages/{}/cancel", message_id(&id)?),
                        &serde_json::json!({}),
                    )
                    .await?;
                println!(
                    "message {id} canceled: {} deliveries and {} fallbacks will not go out",
                    answer["deliveries_canceled"], answer["fallbacks_canceled"]
                );
                Ok(ExitCode::SUCCESS)
            }
            MessageCommand::Refusals {
                sender,
                csv,
                json,
                token,
            } => {
                let path = sender_query("/api/v1/refusals", &sender)?;
                let refusals: Vec<RefusalInfo> = self.client_with(&token)?.get(&path).await?;
                if csv {
                    let mut out = ::csv::Writer::from_writer(std::io::stdout());
                    let write = |out: &mut ::csv::Writer<std::io::Stdout>, r: [&str; 5]| {
                        out.write_record(r)
                            .map_err(|e| CliError::Other(e.to_string()))
                    };
                    write(&mut out, ["phone", "sender", "agent", "by", "at"])?;
                    for r in &refusals {
                        write(
                            &mut out,
                            [
                                r.phone.as_deref().unwrap_or(""),
                                &r.sender,
                                &r.agent_id,
                                &r.by,
                                &r.at.to_string(),
                            ],
                        )?;
                    }
                    out.flush().map_err(|e| CliError::Other(e.to_string()))?;
                } else if json {
                    print_json(&refusals);
                } else if refusals.is_empty() {
                    println!("no refusals");
                } else {
                    println!(
                        "{:<20} {:<16} {:<16} {:<12} AT",
                        "AGENT", "PHONE", "SENDER", "BY"
                    );
                    for r in refusals {
                        println!(
                            "{:<20} {:<16} {:<16} {:<12} {}",
                            r.agent,
                            r.phone.as_deref().unwrap_or("-"),
                            r.sender,
                            r.by,
                            r.at
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn send_message(&self, args: SendArgs) -> Result<ExitCode, CliError> {
        let key = load_key(&args.sender_key)?;
        let priority: Priority = args.priority.parse().map_err(usage)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        if ttl.as_millis() as i64 > message::MAX_TTL_MS {
            return Err(usage(format!("--ttl {}: at most 28d", args.ttl)));
        }
        let now = now_ms();
        let deliver_at = match &args.at {
            Some(at) => Some(
                schedule::parse_time(at, &args.tz, now).map_err(|e| usage(format!("--at: {e}")))?,
            ),
            None => None,
        };
        let client = self.client_with(&args.token)?;
        let campaign = match &args.list {
            Some(list) => Some(campaign_options(&args, list)?),
            None => None,
        };
        let audience = match (&args.to, &args.token) {
            // A list campaign's message is for all: the list narrows it.
            (None, _) => herald_shared::envelope::Audience::All,
            // A sender token cannot look agents up by name: it names them by id.
            (Some(to), Some(_)) => to.parse().map_err(usage)?,
            (Some(to), None) => self.audience(to).await?,
        };
        let grant: GrantInfo = client
            .get(&format!("/api/v1/grants/{}", key.public().to_hex()))
            .await?;
        let issued_at = now;
        let message = Message {
            id: random_bytes(),
            sender: grant.sender.clone(),
            audience,
            title: args.title,
            body: args.body,
            priority,
            issued_at,
            expires_at: deliver_at
                .unwrap_or(issued_at)
                .saturating_add(ttl.as_millis() as i64)
                .min(issued_at + message::MAX_TTL_MS),
            collapse: args.collapse,
            advertising: args.advertising,
            link: args.link,
            grant: decode(&grant.envelope)?,
        };
        message.validate().map_err(usage)?;
        let envelope = key
            .sign(&Statement::Message(message))
            .map_err(|e| usage(e.to_string()))?;
        if let Some((list, mut options)) = campaign {
            let uploaded = upload_list(&client, &list).await?;
            options.envelope = encode_envelope(&envelope)?;
            options.list = uploaded.id;
            options.deliver_at = deliver_at;
            let created: CampaignCreated = client.post("/api/v1/campaigns", &options).await?;
            print_campaign_created(&created, args.json);
            return Ok(ExitCode::SUCCESS);
        }
        let created: MessageCreated = client
            .post(
                "/api/v1/messages",
                &SendMessage {
                    envelope: encode_envelope(&envelope)?,
                    deliver_at,
                },
            )
            .await?;
        if args.json {
            print_json(&created);
        } else {
            let skipped = if created.skipped_blocked > 0 {
                format!(
                    " ({} skipped: they blocked {})",
                    created.skipped_blocked, grant.sender
                )
            } else {
                String::new()
            };
            println!(
                "message {} sent to {} recipients{skipped}",
                created.id, created.addressed
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Checks `message send --list` options before anything is signed or uploaded.
fn campaign_options(args: &SendArgs, list: &Path) -> Result<(PathBuf, CreateCampaign), CliError> {
    let fallback: Fallback = args.fallback.parse().map_err(usage)?;
    let after = parse_duration("--fallback-after", &args.fallback_after)?;
    let rate = match &args.rate {
        Some(rate) => {
            let number = rate.strip_suffix("/s").unwrap_or(rate);
            Some(
                number
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        usage(format!(
                            "--rate {rate:?}: a number of rows per second, like 500/s"
                        ))
                    })?,
            )
        }
        None => None,
    };
    if let Some(country) = &args.country {
        parse_country(country).map_err(|e| usage(format!("--country: {e}")))?;
    }
    if !list.is_file() {
        return Err(usage(format!("--list {}: no such file", list.display())));
    }
    Ok((
        list.to_path_buf(),
        CreateCampaign {
            envelope: String::new(),
            list: String::new(),
            deliver_at: None,
            fallback,
            fallback_after_ms: Some(after.as_millis() as i64),
            max_fallback: args.max_fallback,
            rate,
            invite: args.invite,
            country: args.country.clone(),
            strict: args.strict,
        },
    ))
}

/// Streams a list file to the server.
async fn upload_list(client: &Client, path: &Path) -> Result<ListUploaded, CliError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| usage(format!("--list {}: {e}", path.display())))?;
    let length = file
        .metadata()
        .await
        .map_err(|e| usage(format!("--list {}: {e}", path.display())))?
        .len();
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 256 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok::<_, std::io::Error>(buffer), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok(client
        .upload(
            reqwest::Method::POST,
            "/api/v1/lists",
            reqwest::Body::wrap_stream(stream),
            length,
            "text/csv",
        )
        .await?)
}

fn print_campaign_created(created: &CampaignCreated, json: bool) {
    if json {
        print_json(created);
        return;
    }
    println!(
        "campaign {} sent to {} recipients: {} with the program ({} devices), {} without; {} duplicates, {} bad rows",
        created.id,
        created.addressed,
        created.with_program,
        created.devices,
        created.no_program,
        created.duplicates,
        created.bad
    );
    if created.skipped_blocked > 0 {
        println!(
            "{} devices skipped: they blocked this sender",
            created.skipped_blocked
        );
    }
    for bad in &created.bad_rows {
        eprintln!("line {}: {}", bad.line, bad.reason);
    }
    if created.bad > created.bad_rows.len() as u64 {
        eprintln!(
            "... and {} more bad rows",
            created.bad - created.bad_rows.len() as u64
        );
    }
}

fn print_campaign_status(s: &CampaignStatus) {
    let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{:.1} s", v as f64 / 1000.0));
    println!("campaign {} from {}: {}", s.id, s.sender, s.title);
    if let Some(at) = s.canceled_at {
        println!("canceled at {at}");
    }
    println!(
        "addressed {:>8}   with program {:>8}   no program {:>8}",
        s.addressed, s.with_program, s.no_program
    );
    println!(
        "push:     pushed {} stored {} displayed {} read {} refused {} expired {}; success {} of those with the program",
        s.pushed, s.stored, s.displayed, s.read, s.refused, s.expired, percent(s.push_rate)
    );
    println!(
        "fallback ({}): sent {} delivered {} failed {} pending {}; skipped: blocked {} cap {} other {}; success {}",
        s.fallback,
        s.fallback_sent,
        s.fallback_delivered,
        s.fallback_failed,
        s.fallback_pending,
        s.fallback_skipped_blocked,
        s.fallback_skipped_cap,
        s.fallback_skipped_other,
        percent(s.fallback_rate)
    );
    println!(
        "reached by any channel {} of addressed; not reached {}",
        percent(s.reach_rate),
        s.not_reached
    );
    println!(
        "time to stored: p50 {} p90 {} p99 {}",
        ms(s.stored_ms_p50),
        ms(s.stored_ms_p90),
        ms(s.stored_ms_p99)
    );
    if s.invited > 0 {
        println!(
            "invited {}; {} have linked a device since",
            s.invited, s.invited_linked
        );
    }
}
