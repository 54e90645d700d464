//! Peers: the shares agents report, the directory a user sees, and tunnel sessions.
//! Clubs, their members and invitations are in `clubs.rs`.
//!
//! Who sees a share: everyone when it is public; otherwise the members of a club the
//! share names, provided the share's owner is a member of that club too (an agent cannot
//! put its services into a club its owner is not in).

use std::collections::{HashMap, HashSet};

use herald_shared::peers::{PeerService, ShareInfo};

use super::*;
use crate::model::{DirectoryEntry, NewSession, SessionEnd, TunnelSession, Via};

const SESSION_SELECT: &str = "SELECT id, provider_agent_id, share, provider_user_id,
    consumer_user_id, consumer_agent_id, via, source, path, started_at, ended_at,
    bytes_up, bytes_down, requests, outcome FROM tunnel_sessions";

impl Store {
    /// Replaces an agent's reported shares (the whole table at once).
    pub fn set_shares(&self, agent_id: &str, shares: &[ShareInfo], now: Millis) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.fast();
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM shares WHERE agent_id = ?1", params![agent_id])?;
            tx.execute(
                "DELETE FROM share_clubs WHERE agent_id = ?1",
                params![agent_id],
            )?;
            for share in shares {
                tx.execute(
                    "INSERT INTO shares (agent_id, name, http, public, description, reported_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        agent_id,
                        share.name,
                        share.http,
                        share.public,
                        share.description,
                        now
                    ],
                )?;
                for club in &share.clubs {
                    tx.execute(
                        "INSERT INTO share_clubs (agent_id, share, club) VALUES (?1, ?2, ?3)
                         ON CONFLICT DO NOTHING",
                        params![agent_id, share.name, club],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Every share of an active agent that `viewer` (a console user; `None` for nobody
    /// signed in, or an agent linked to nobody) may reach, online or not, ordered by
    /// owner, device and share; only `owner`'s (a login) when given, as for one tunnel
    /// or one browser request, which need not read everyone's shares.
    pub fn directory(
        &self,
        viewer: Option<i64>,
        owner: Option<&str>,
    ) -> Result<Vec<DirectoryEntry>> {
        self.blocking(|| {
            let conn = self.conn();
            let viewer_clubs: HashSet<String> = match viewer {
                Some(user) => conn
                    .prepare(
                        "SELECT c.name FROM clubs c JOIN club_members m ON m.club_id = c.id
                         WHERE m.user_id = ?1",
                    )?
                    .query_map(params![user], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?,
                None => HashSet::new(),
            };
            // The clubs each share names that its owner is in.
            let mut share_clubs: HashMap<(String, String), Vec<String>> = HashMap::new();
            {
                let mut stmt = conn.prepare(
                    "SELECT sc.agent_id, sc.share, sc.club FROM share_clubs sc
                     JOIN agents a ON a.id = sc.agent_id
                     JOIN clubs c ON c.name = sc.club
                     JOIN club_members m ON m.club_id = c.id AND m.user_id = a.owner_user_id
                     WHERE a.owner_user_id = (SELECT id FROM users WHERE login = ?1)
                        OR ?1 IS NULL
                     ORDER BY sc.club",
                )?;
                let rows = stmt.query_map(params![owner], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })?;
                for row in rows {
                    let (agent, share, club) = row?;
                    if viewer_clubs.contains(&club) {
                        share_clubs.entry((agent, share)).or_default().push(club);
                    }
                }
            }
            let mut stmt = conn.prepare(
                "SELECT s.agent_id, a.name, COALESCE(u.login, ''), a.owner_user_id,
                        a.local_addresses, a.observed_address, s.name, s.http, s.public,
                        s.description
                 FROM shares s JOIN agents a ON a.id = s.agent_id
                 LEFT JOIN users u ON u.id = a.owner_user_id
                 WHERE a.revoked_at IS NULL AND (u.login = ?1 OR ?1 IS NULL)
                 ORDER BY 3, a.name, s.name",
            )?;
            let rows = stmt.query_map(params![owner], |r| {
                Ok(DirectoryEntry {
                    agent_id: r.get(0)?,
                    device: r.get(1)?,
                    owner: r.get(2)?,
                    owner_user_id: r.get(3)?,
                    reported: r.get(4)?,
                    observed: r.get(5)?,
                    service: PeerService {
                        name: r.get(6)?,
                        http: r.get(7)?,
                        public: r.get(8)?,
                        clubs: Vec::new(),
                        description: r.get(9)?,
                    },
                })
            })?;
            let mut entries = Vec::new();
            for row in rows {
                let mut entry = row?;
                let key = (entry.agent_id.clone(), entry.service.name.clone());
                entry.service.clubs = share_clubs.remove(&key).unwrap_or_default();
                if entry.service.public || !entry.service.clubs.is_empty() {
                    entries.push(entry);
                }
            }
            Ok(entries)
        })
    }

    /// The user an agent is linked to: (id, login).
    pub fn agent_owner_login(&self, agent_id: &str) -> Result<Option<(i64, String)>> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT u.id, u.login FROM agents a JOIN users u ON u.id = a.owner_user_id
                     WHERE a.id = ?1",
                    params![agent_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
        })
    }

    /// Records a tunnel session as it starts; returns its id.
    pub fn open_session(&self, session: &NewSession) -> Result<i64> {
        self.blocking(|| {
            let conn = self.conn();
            conn.execute(
                "INSERT INTO tunnel_sessions (provider_agent_id, share, provider_user_id,
                    consumer_user_id, consumer_agent_id, via, source, path, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    session.provider_agent_id,
                    session.share,
                    session.provider_user_id,
                    session.consumer_user_id,
                    session.consumer_agent_id,
                    session.via.as_str(),
                    session.source,
                    session.path,
                    session.started_at
                ],
            )?;
            Ok(conn.last_insert_rowid())
        })
    }

    /// Records how a session ended. Only an open session is closed (a second close, as
    /// after a retry, changes nothing).
    pub fn close_session(&self, id: i64, end: &SessionEnd) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "UPDATE tunnel_sessions SET ended_at = ?2, bytes_up = ?3, bytes_down = ?4,
                    requests = ?5, outcome = ?6
                 WHERE id = ?1 AND ended_at IS NULL",
                params![
                    id,
                    end.ended_at,
                    end.bytes_up as i64,
                    end.bytes_down as i64,
                    end.requests as i64,
                    end.outcome
                ],
            )?;
            Ok(())
        })
    }

    /// Tunnel sessions, newest first: all, or those a provider agent served.
    pub fn sessions(&self, provider: Option<&str>, limit: u32) -> Result<Vec<TunnelSession>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt = conn.prepare(&format!(
                "{SESSION_SELECT} WHERE (provider_agent_id = ?1 OR ?1 IS NULL)
                 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![provider, limit], session_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<TunnelSession> {
    let via: String = r.get(6)?;
    Ok(TunnelSession {
        id: r.get(0)?,
        provider_agent_id: r.get(1)?,
        share: r.get(2)?,
        provider_user_id: r.get(3)?,
        consumer_user_id: r.get(4)?,
        consumer_agent_id: r.get(5)?,
        via: Via::parse(&via).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                6,
                rusqlite::types::Type::Text,
                format!("unknown session path {via:?}").into(),
            )
        })?,
        source: r.get(7)?,
        path: r.get(8)?,
        started_at: r.get(9)?,
        ended_at: r.get(10)?,
        bytes_up: r.get::<_, i64>(11)? as u64,
        bytes_down: r.get::<_, i64>(12)? as u64,
        requests: r.get::<_, i64>(13)? as u64,
        outcome: r.get(14)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn share(name: &str, clubs: &[&str]) -> ShareInfo {
        ShareInfo {
            name: name.into(),
            http: false,
            public: clubs.is_empty(),
            clubs: clubs.iter().map(|c| c.to_string()).collect(),
            description: String::new(),
        }
    }

    /// (owner, share) pairs, in the directory's order.
    fn seen(store: &Store, viewer: Option<i64>, owner: Option<&str>) -> Vec<(String, String)> {
        store
            .directory(viewer, owner)
            .unwrap()
            .into_iter()
            .map(|e| (e.owner, e.service.name))
            .collect()
    }

    #[test]
    fn the_directory_shows_club_shares_to_fellow_members_and_filters_by_owner() {
        let dir = std::env::temp_dir().join(format!(
            "herald-peers-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        let user = |login| store.add_user(login, "x", Role::User, "", "", 1).unwrap();
        let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
        let chess = store.create_club("chess", "", alice, 1).unwrap();
        store.add_invite(chess, "code", alice, 1, 100).unwrap();
        store.accept_invite("code", bob, 2).unwrap();
        store.create_club("other", "", carol, 1).unwrap();
        for (id, owner, key) in [("a1", alice, 1u8), ("b1", bob, 2u8)] {
            store
                .conn()
                .execute(
                    "INSERT INTO agents (id, name, public_key, enrolled_at, owner_user_id)
                     VALUES (?1, ?1, ?2, 0, ?3)",
                    params![id, vec![key], owner],
                )
                .unwrap();
        }
        // alice names a club she is not in: it exposes nothing to that club.
        store
            .set_shares(
                "a1",
                &[
                    share("web", &["chess"]),
                    share("pub", &[]),
                    share("sneaky", &["other"]),
                ],
                3,
            )
            .unwrap();
        store
            .set_shares("b1", &[share("cam", &["chess"])], 3)
            .unwrap();
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(o, s)| (o.to_string(), s.to_string()))
                .collect()
        };

        assert_eq!(
            seen(&store, Some(bob), None),
            pairs(&[("alice", "pub"), ("alice", "web"), ("bob", "cam")])
        );
        assert_eq!(seen(&store, Some(carol), None), pairs(&[("alice", "pub")]));
        assert_eq!(seen(&store, None, None), pairs(&[("alice", "pub")]));
        // One owner's shares only, as a tunnel or a browser request reads them.
        assert_eq!(
            seen(&store, Some(bob), Some("alice")),
            pairs(&[("alice", "pub"), ("alice", "web")])
        );
        assert_eq!(
            seen(&store, Some(alice), Some("bob")),
            pairs(&[("bob", "cam")])
        );
        assert!(seen(&store, Some(bob), Some("nobody")).is_empty());
        let web = store.directory(Some(bob), Some("alice")).unwrap();
        assert_eq!(
            web[1].service.clubs,
            ["chess"],
            "the clubs bob shares with alice"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
