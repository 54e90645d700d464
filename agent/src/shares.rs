//! The share table: which local services this machine's owner shares, with whom, and
//! with what limits; and the record of every tunnel session this agent took part in.
//!
//! The table is the machine's last word ([`check_offer`]): the server lists shares in a
//! directory and brokers tunnels, but a tunnel is opened only for a share in this table,
//! only for a consumer the server vouches is in a club the share names (or for anyone
//! when it is public), and only to the address the table holds. An offer from the server
//! names a share, never an address, so whatever the server asks, the agent connects to
//! nothing its owner did not share.
//!
//! The CLI (`herald-agent share add|rm`) writes the table directly, in the agent's one
//! database ([`crate::journal`]), and bumps a version counter in the same transaction;
//! the running daemon polls that counter ([`SHARE_POLL`]) and reports the whole table
//! to the server when it changes, and after every `Welcome`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use herald_shared::peers::{Consumer, ShareInfo, TunnelOffer, MAX_SHARES};
use herald_shared::Millis;

use crate::journal::{Journal, JournalError};

/// How often the daemon looks for a changed share table.
pub const SHARE_POLL: Duration = Duration::from_secs(1);
/// Connections a share carries at once unless `--max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// Highest `--max-connections`.
pub const MAX_CONNECTIONS: u32 = 1024;
/// Lowest `--rate-limit`, in bytes a second (below it a tunnel would time out before a
/// single chunk could pass).
pub const MIN_RATE_LIMIT: u64 = 1024;
/// Session records `share sessions` lists.
pub const SESSIONS_LISTED: u32 = 100;

/// The `kv` key of the table's version counter.
const VERSION_KEY: &str = "shares_version";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS shares (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    http INTEGER NOT NULL,
    public INTEGER NOT NULL,
    clubs TEXT NOT NULL,
    description TEXT NOT NULL,
    max_connections INTEGER NOT NULL,
    rate_limit BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tunnel_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    role TEXT NOT NULL,
    session BIGINT NOT NULL,
    share TEXT NOT NULL,
    peer TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    bytes_up BIGINT NOT NULL DEFAULT 0,
    bytes_down BIGINT NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL
);
"#;

/// Errors of the share table.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The database failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The share breaks a rule (name, clubs or public, description length).
    #[error("{0}")]
    Invalid(String),
    /// `--to` is not `IP:PORT`.
    #[error(
        "--to {0:?} is not IP:PORT (for example 127.0.0.1:8080); the agent resolves no host names"
    )]
    BadAddress(String),
    /// A limit out of range.
    #[error("{0}")]
    BadLimit(String),
    /// A share of that name exists.
    #[error("a share named {0} exists already; `herald-agent share rm {0}` first")]
    Exists(String),
    /// No share of that name.
    #[error("no share named {0}; `herald-agent share list` shows them")]
    Unknown(String),
    /// The table is full.
    #[error("this agent shares {MAX_SHARES} services already, the most it may")]
    Full,
    /// A stored row does not read back.
    #[error("the share table holds a damaged row: {0}")]
    Corrupt(String),
}

impl From<rusqlite::Error> for ShareError {
    fn from(e: rusqlite::Error) -> Self {
        ShareError::Journal(JournalError::Sql(e))
    }
}

impl ShareError {
    /// Whether the person asked for something the table does not allow (exit 64), as
    /// opposed to the database failing.
    pub fn is_usage(&self) -> bool {
        !matches!(self, ShareError::Journal(_) | ShareError::Corrupt(_))
    }
}

type Result<T> = std::result::Result<T, ShareError>;

/// A share as the machine's owner configured it (`share list --json` prints these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Share {
    /// Service name, unique on this agent.
    pub name: String,
    /// The local address tunnels connect to (the only one they ever connect to).
    pub to: SocketAddr,
    /// An HTTP service (browsers may reach it under `/p/OWNER/SERVICE/`).
    pub http: bool,
    /// Open to everyone.
    pub public: bool,
    /// Clubs whose members may reach it, when not public.
    pub clubs: Vec<String>,
    /// What it is.
    pub description: String,
    /// Tunnels open at once, at most.
    pub max_connections: u32,
    /// Bytes a second in each direction over all its tunnels; `None`: unlimited.
    pub rate_limit: Option<u64>,
}

impl Share {
    /// Parses and checks what `share add` was given.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        to: &str,
        http: bool,
        public: bool,
        clubs: Vec<String>,
        description: Option<String>,
        max_connections: Option<u32>,
        rate_limit: Option<u64>,
    ) -> Result<Share> {
        let to = parse_address(to)?;
        let max_connections = max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            return Err(ShareError::BadLimit(format!(
                "--max-connections must be 1 to {MAX_CONNECTIONS}"
            )));
        }
        if rate_limit.is_some_and(|r| r < MIN_RATE_LIMIT) {
            return Err(ShareError::BadLimit(format!(
                "--rate-limit must be at least {MIN_RATE_LIMIT} bytes a second"
            )));
        }
        let share = Share {
            name: name.to_string(),
            to,
            http,
            public,
            clubs,
            description: description.unwrap_or_default(),
            max_connections,
            rate_limit,
        };
        share.info().check().map_err(ShareError::Invalid)?;
        Ok(share)
    }

    /// What the directory may know of it (not the address, not the limits).
    pub fn info(&self) -> ShareInfo {
        ShareInfo {
            name: self.name.clone(),
            http: self.http,
            public: self.public,
            clubs: self.clubs.clone(),
            description: self.description.clone(),
        }
    }
}

/// `IP:PORT` with a port other than 0; host names are refused, since the agent never
/// resolves anything on a server's behalf.
pub fn parse_address(text: &str) -> Result<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 && !addr.ip().is_unspecified() => Ok(addr),
        _ => Err(ShareError::BadAddress(text.to_string())),
    }
}

/// Whether an offer opens the share, decided from the table alone: the share exists
/// (`share`, as the table holds it now), it is public or the server vouches the consumer
/// is in one of its clubs, a browser asks only for an HTTP share, and fewer than its
/// `max_connections` tunnels are open (`active`). Returns the address to connect to —
/// always the table's — or the reason for the refusal.
pub fn check_offer(
    share: Option<&Share>,
    offer: &TunnelOffer,
    active: u32,
) -> std::result::Result<SocketAddr, String> {
    let Some(share) = share else {
        return Err(format!(
            "this device shares no service named {:?}",
            offer.share
        ));
    };
    if !share.public && !offer.clubs.iter().any(|c| share.clubs.contains(c)) {
        return Err(format!(
            "{} is shared only with members of {}, and the consumer is in none of them",
            share.name,
            share.clubs.join(", ")
        ));
    }
    if matches!(offer.consumer, Consumer::Browser { .. }) && !share.http {
        return Err(format!("{} is not an HTTP share", share.name));
    }
    if active >= share.max_connections {
        return Err(format!(
            "{} already carries {active} connections, its limit",
            share.name
        ));
    }
    Ok(share.to)
}

/// Who a session was with, for the local record.
pub fn describe(consumer: &Consumer) -> String {
    match consumer {
        Consumer::Agent {
            agent_id,
            user: Some(user),
        } => format!("{user} (agent {agent_id})"),
        Consumer::Agent {
            agent_id,
            user: None,
        } => format!("agent {agent_id}"),
        Consumer::Browser {
            user: Some(user),
            address,
        } => format!("{user} (browser at {address})"),
        Consumer::Browser {
            user: None,
            address,
        } => format!("browser at {address}"),
    }
}

/// Which end of a tunnel this agent was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// It provided the share.
    Provided,
    /// It reached someone else's share (`connect`).
    Used,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Provided => "provided",
            Role::Used => "used",
        }
    }
}

/// A tunnel session as recorded here (`share sessions --json` prints these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRecord {
    /// Local record id.
    pub id: i64,
    /// Which end this agent was.
    pub role: Role,
    /// The server's session id (0 when the server gave none).
    pub session: i64,
    /// The share (`OWNER/SERVICE` for sessions this agent used).
    pub share: String,
    /// The other end: the consumer as the server vouched, or the providing agent.
    pub peer: String,
    /// Start (unix ms).
    pub started_at: Millis,
    /// End (unix ms), once ended.
    pub ended_at: Option<Millis>,
    /// Bytes from consumer to provider.
    pub bytes_up: u64,
    /// Bytes from provider to consumer.
    pub bytes_down: u64,
    /// `open`, `closed`, `idle`, `refused: …` or `failed: …`.
    pub outcome: String,
}

/// The share table and session records, in the agent's database.
#[derive(Clone)]
pub struct Shares {
    journal: Journal,
}

// === impl Shares ===

impl Shares {
    /// The table on an open journal (created if missing).
    pub fn new(journal: Journal) -> Result<Shares> {
        journal.transaction(|tx| tx.execute_batch(SCHEMA).map_err(ShareError::from))?;
        Ok(Shares { journal })
    }

    /// Opens the table of the agent in `state_dir` (for the CLI).
    pub fn open(state_dir: &Path) -> Result<Shares> {
        Shares::new(Journal::open(state_dir)?)
    }

    /// Adds a share.
    pub fn add(&self, share: &Share, now: Millis) -> Result<()> {
        self.journal.transaction(|tx| {
            let exists: bool = tx
                .query_row(
                    "SELECT 1 FROM shares WHERE name = ?1",
                    params![share.name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if exists {
                return Err(ShareError::Exists(share.name.clone()));
            }
            let count: i64 = tx.query_row("SELECT COUNT(*) FROM shares", [], |r| r.get(0))?;
            if count as usize >= MAX_SHARES {
                return Err(ShareError::Full);
            }
            tx.execute(
                "INSERT INTO shares (name, address, http, public, clubs, description,
                    max_connections, rate_limit, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    share.name,
                    share.to.to_string(),
                    share.http,
                    share.public,
                    share.clubs.join(" "),
                    share.description,
                    share.max_connections,
                    share.rate_limit.map(|r| r as i64),
                    now
                ],
            )?;
            bump(tx)
        })
    }

    /// Removes a share; tunnels already open run on, new ones are refused.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.journal.transaction(|tx| {
            if tx.execute("DELETE FROM shares WHERE name = ?1", params![name])? == 0 {
                return Err(ShareError::Unknown(name.to_string()));
            }
            bump(tx)
        })
    }

    /// Every share, by name.
    pub fn list(&self) -> Result<Vec<Share>> {
        self.journal.read(|conn| {
            let mut stmt = conn.prepare(&format!("{SHARE_SELECT} ORDER BY name"))?;
            let rows = stmt.query_map([], share_row)?;
            rows.map(|r| r.map_err(ShareError::from).and_then(|r| r))
                .collect()
        })
    }

    /// One share, as the table holds it now.
    pub fn get(&self, name: &str) -> Result<Option<Share>> {
        self.journal.read(|conn| {
            conn.query_row(
                &format!("{SHARE_SELECT} WHERE name = ?1"),
                params![name],
                share_row,
            )
            .optional()?
            .transpose()
        })
    }

    /// The table's version: it changes with every add and remove.
    pub fn version(&self) -> Result<u64> {
        self.journal.read(|conn| Ok(version_in(conn)?))
    }

    /// The table as the server gets it.
    pub fn infos(&self) -> Result<Vec<ShareInfo>> {
        Ok(self.list()?.iter().map(Share::info).collect())
    }

    /// Records a session as it starts; returns its local id.
    pub fn open_session(
        &self,
        role: Role,
        session: i64,
        share: &str,
        peer: &str,
        now: Millis,
    ) -> Result<i64> {
        self.journal.transaction(|tx| {
            tx.execute(
                "INSERT INTO tunnel_sessions (role, session, share, peer, started_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'open')",
                params![role.as_str(), session, share, peer, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Records how a session ended (a refusal is a session that ends as it starts).
    pub fn close_session(
        &self,
        id: i64,
        bytes_up: u64,
        bytes_down: u64,
        outcome: &str,
        now: Millis,
    ) -> Result<()> {
        self.journal.transaction(|tx| {
            tx.execute(
                "UPDATE tunnel_sessions SET ended_at = ?2, bytes_up = ?3, bytes_down = ?4,
                    outcome = ?5 WHERE id = ?1",
                params![id, now, bytes_up as i64, bytes_down as i64, outcome],
            )?;
            Ok(())
        })
    }

    /// The most recent sessions, newest first.
    pub fn sessions(&self, limit: u32) -> Result<Vec<SessionRecord>> {
        self.journal.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, role, session, share, peer, started_at, ended_at, bytes_up,
                    bytes_down, outcome FROM tunnel_sessions ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit], |r| {
                let role: String = r.get(1)?;
                Ok(SessionRecord {
                    id: r.get(0)?,
                    role: if role == "used" {
                        Role::Used
                    } else {
                        Role::Provided
                    },
                    session: r.get(2)?,
                    share: r.get(3)?,
                    peer: r.get(4)?,
                    started_at: r.get(5)?,
                    ended_at: r.get(6)?,
                    bytes_up: r.get::<_, i64>(7)? as u64,
                    bytes_down: r.get::<_, i64>(8)? as u64,
                    outcome: r.get(9)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}

const SHARE_SELECT: &str = "SELECT name, address, http, public, clubs, description,
    max_connections, rate_limit FROM shares";

fn share_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Share>> {
    let name: String = r.get(0)?;
    let address: String = r.get(1)?;
    let clubs: String = r.get(4)?;
    let rate_limit: Option<i64> = r.get(7)?;
    Ok(match address.parse() {
        Ok(to) => Ok(Share {
            name,
            to,
            http: r.get(2)?,
            public: r.get(3)?,
            clubs: clubs.split_whitespace().map(str::to_string).collect(),
            description: r.get(5)?,
            max_connections: r.get(6)?,
            rate_limit: rate_limit.map(|r| r as u64),
        }),
        Err(_) => Err(ShareError::Corrupt(format!(
            "share {name}'s address {address:?}"
        ))),
    })
}

fn version_in(conn: &Connection) -> rusqlite::Result<u64> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM kv WHERE key = ?1",
            params![VERSION_KEY],
            |r| r.get(0),
        )
        .optional()?;
    Ok(blob
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn bump(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    let next = version_in(tx)?.wrapping_add(1);
    tx.execute(
        "INSERT INTO kv (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![VERSION_KEY, next.to_be_bytes().to_vec()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("herald-shares-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn web() -> Share {
        Share::new(
            "web",
            "127.0.0.1:8080",
            true,
            false,
            vec!["chess".into(), "choir".into()],
            Some("my page".into()),
            Some(2),
            None,
        )
        .unwrap()
    }

    fn offer(share: &str, clubs: &[&str]) -> TunnelOffer {
        TunnelOffer {
            session: 7,
            share: share.into(),
            consumer: Consumer::Agent {
                agent_id: "b0b".into(),
                user: Some("bob".into()),
            },
            clubs: clubs.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let add = |name: &str, to: &str, public: bool, clubs: &[&str]| {
            Share::new(
                name,
                to,
                false,
                public,
                clubs.iter().map(|c| c.to_string()).collect(),
                None,
                None,
                None,
            )
        };
        for to in [
            "localhost:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "0.0.0.0:80",
            "10.0.0.1:http",
        ] {
            assert!(
                matches!(add("web", to, true, &[]), Err(ShareError::BadAddress(_))),
                "{to}"
            );
        }
        assert!(add("web", "[::1]:8080", true, &[]).is_ok());
        assert!(matches!(
            add("a b", "127.0.0.1:80", true, &[]),
            Err(ShareError::Invalid(_))
        ));
        assert!(matches!(
            add("web", "127.0.0.1:80", false, &[]),
            Err(ShareError::Invalid(_))
        ));
        assert!(matches!(
            add("web", "127.0.0.1:80", true, &["chess"]),
            Err(ShareError::Invalid(_))
        ));
        let limited =
            |max, rate| Share::new("web", "127.0.0.1:80", false, true, vec![], None, max, rate);
        assert!(matches!(
            limited(Some(0), None),
            Err(ShareError::BadLimit(_))
        ));
        assert!(matches!(
            limited(None, Some(10)),
            Err(ShareError::BadLimit(_))
        ));
    }

    #[test]
    fn the_table_round_trips_and_every_change_bumps_the_version() {
        let dir = temp_dir("table");
        let shares = Shares::open(&dir).unwrap();
        assert_eq!(shares.version().unwrap(), 0);
        shares.add(&web(), 1).unwrap();
        assert_eq!(shares.version().unwrap(), 1);
        assert!(matches!(shares.add(&web(), 2), Err(ShareError::Exists(_))));
        assert_eq!(shares.list().unwrap(), vec![web()]);
        assert_eq!(shares.get("web").unwrap(), Some(web()));
        assert_eq!(shares.infos().unwrap()[0].clubs, ["chess", "choir"]);
        // Another handle on the same file (the CLI beside the daemon) sees the change.
        let cli = Shares::open(&dir).unwrap();
        cli.remove("web").unwrap();
        assert_eq!(shares.version().unwrap(), 2);
        assert!(shares.get("web").unwrap().is_none());
        assert!(matches!(cli.remove("web"), Err(ShareError::Unknown(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sessions_are_recorded_from_start_to_end() {
        let dir = temp_dir("sessions");
        let shares = Shares::open(&dir).unwrap();
        let id = shares
            .open_session(Role::Provided, 9, "web", "bob", 10)
            .unwrap();
        shares.close_session(id, 100, 2000, "closed", 20).unwrap();
        let refused = shares
            .open_session(Role::Provided, 10, "cam", "eve", 30)
            .unwrap();
        shares
            .close_session(refused, 0, 0, "refused: no", 30)
            .unwrap();
        let listed = shares.sessions(10).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].outcome, "refused: no");
        assert_eq!(
            (
                listed[1].session,
                listed[1].bytes_up,
                listed[1].bytes_down,
                listed[1].ended_at
            ),
            (9, 100, 2000, Some(20))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_offer_opens_only_a_shared_service_for_its_clubs_within_its_cap() {
        let share = web();
        assert_eq!(
            check_offer(Some(&share), &offer("web", &["choir"]), 0),
            Ok(share.to)
        );
        // A share this device does not have: nothing to connect to.
        let unknown = check_offer(None, &offer("ssh", &["chess"]), 0).unwrap_err();
        assert!(unknown.contains("no service named \"ssh\""), "{unknown}");
        // Vouched for a club the share does not name, or for none.
        for clubs in [&["poker"][..], &[]] {
            let reason = check_offer(Some(&share), &offer("web", clubs), 0).unwrap_err();
            assert!(
                reason.contains("only with members of chess, choir"),
                "{reason}"
            );
        }
        // The cap.
        let full = check_offer(Some(&share), &offer("web", &["chess"]), 2).unwrap_err();
        assert!(full.contains("already carries 2 connections"), "{full}");
        // A browser reaches only an HTTP share.
        let ssh = Share {
            http: false,
            ..share.clone()
        };
        let browser = TunnelOffer {
            consumer: Consumer::Browser {
                user: Some("bob".into()),
                address: "192.0.2.1".into(),
            },
            ..offer("web", &["chess"])
        };
        assert!(check_offer(Some(&ssh), &browser, 0).is_err());
    }

    /// Whatever a server puts in an offer, the address connected to is the table's: an
    /// offer has no field that could carry one (this destructuring stops compiling if
    /// one is added), and a share name that looks like an address is just an unknown
    /// name.
    #[test]
    fn no_offer_field_can_carry_an_address() {
        let offer = offer("127.0.0.1:22", &["chess"]);
        let TunnelOffer {
            session: _,
            share: _,
            consumer: _,
            clubs: _,
        } = &offer;
        let dir = temp_dir("address");
        let shares = Shares::open(&dir).unwrap();
        shares.add(&web(), 1).unwrap();
        let found = shares.get(&offer.share).unwrap();
        assert!(check_offer(found.as_ref(), &offer, 0).is_err());
        let to = check_offer(
            shares.get("web").unwrap().as_ref(),
            &self::offer("web", &["chess"]),
            0,
        );
        assert_eq!(to, Ok("127.0.0.1:8080".parse().unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
