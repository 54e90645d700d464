//! Admin tokens with scopes, and the audit log (an append-only hash chain).

use super::*;

use super::agents::TOKEN_ID_LEN;

use crate::model::{
    audit_hash, AdminTokenInfo, AuditEntry, AuditEvent, AuditVerdict, ChainCheck, Scope,
    AUDIT_GENESIS,
};

/// An admin token that may be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// The first 12 hex digits of the secret's hash.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}

/// Most audit entries one list returns.
pub const MAX_AUDIT_LIST: u32 = 10_000;

/// Entries read per page while verifying the chain.
const VERIFY_PAGE: i64 = 5_000;

/// The columns [`token_row`] reads.
const TOKEN_SELECT: &str =
    "SELECT token_hash, name, scope, created_at, expires_at, revoked_at FROM admin_tokens";

/// A row of `admin_tokens` as stored.
#[derive(Debug, Clone)]
struct TokenRow {
    hash: String,
    name: String,
    scope: String,
    created_at: Millis,
    expires_at: Option<Millis>,
    revoked_at: Option<Millis>,
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        hash: r.get(0)?,
        name: r.get(1)?,
        scope: r.get(2)?,
        created_at: r.get(3)?,
        expires_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

impl TokenRow {
    fn info(self) -> Result<AdminTokenInfo> {
        Ok(AdminTokenInfo {
            id: self.hash.chars().take(TOKEN_ID_LEN).collect(),
            name: self.name,
            scope: parse_scope(self.scope)?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        })
    }
}

fn parse_scope(text: String) -> Result<Scope> {
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("admin token scope: {e}")))
}

impl Store {
    // === admin tokens ===

    /// Stores the hash of an admin API token; returns its id. Names are unique among
    /// tokens not revoked.
    pub fn add_admin_token(
        &self,
        token_hash: &str,
        name: &str,
        scope: Scope,
        expires_at: Option<Millis>,
        now: Millis,
    ) -> Result<String> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let taken = tx
                .query_row(
                    "SELECT 1 FROM admin_tokens WHERE name = ?1 AND revoked_at IS NULL
                     AND (expires_at IS NULL OR expires_at > ?2)",
                    params![name, now],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if taken {
                return Err(StoreError::Conflict(format!(
                    "an admin token named {name:?} exists; revoke it first or pick another name"
                )));
            }
            tx.execute(
                "INSERT INTO admin_tokens (token_hash, created_at, name, scope, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token_hash, now, name, scope.as_str(), expires_at],
            )?;
            tx.commit()?;
            Ok(token_hash.chars().take(TOKEN_ID_LEN).collect())
        })
    }

    /// The admin token with this hash, if it may be used at `now`.
    pub fn admin_token(&self, token_hash: &str, now: Millis) -> Result<Option<AdminCaller>> {
        self.blocking(|| {
            let row = self
                .fast()
                .query_row(
                    "SELECT name, scope FROM admin_tokens WHERE token_hash = ?1
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
                    params![token_hash, now],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?;
            row.map(|(name, scope)| {
                Ok(AdminCaller {
                    id: token_hash.chars().take(TOKEN_ID_LEN).collect(),
                    name,
                    scope: parse_scope(scope)?,
                })
            })
            .transpose()
        })
    }

    /// Every admin token, revoked and expired ones included, newest first.
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{TOKEN_SELECT} ORDER BY created_at DESC, token_hash"
            ))?;
            let rows = stmt.query_map([], token_row)?;
            rows.map(|row| row?.info()).collect()
        })
    }

    /// Revokes the admin token whose hash starts with `id`. Refuses to revoke the last
    /// usable `admin` token: nobody could make another.
    pub fn revoke_admin_token(&self, id: &str, now: Millis) -> Result<AdminTokenInfo> {
        if id.len() < TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Invalid(format!(
                "{id:?} is not a token id: {TOKEN_ID_LEN} or more hex digits, as `admin-token list` prints"
            )));
        }
        let pattern = format!("{}%", id.to_ascii_lowercase());
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let matching: Vec<TokenRow> = {
                let mut stmt =
                    tx.prepare(&format!("{TOKEN_SELECT} WHERE token_hash LIKE ?1 LIMIT 2"))?;
                let rows = stmt.query_map(params![pattern], token_row)?;
                rows.collect::<Result<_, _>>()?
            };
            let row = match matching.as_slice() {
                [] => return Err(StoreError::NotFound(format!("no admin token {id}"))),
                [one] => one.clone(),
                _ => {
                    return Err(StoreError::Conflict(format!(
                        "{id} names more than one admin token: give more digits"
                    )))
                }
            };
            let hash = row.hash.clone();
            let mut info = row.info()?;
            if info.revoked_at.is_some() {
                return Err(StoreError::Conflict(format!(
                    "admin token {id} ({}) is already revoked",
                    info.name
                )));
            }
            if info.scope == Scope::Admin {
                let others: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM admin_tokens WHERE scope = 'admin'
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1)
                     AND token_hash <> ?2",
                    params![now, hash],
                    |r| r.get(0),
                )?;
                if others == 0 {
                    return Err(StoreError::Conflict(format!(
                        "admin token {id} ({}) is the last admin token; create another with \
                         `admin-token create NAME --scope admin` before revoking it",
                        info.name
                    )));
                }
            }
            tx.execute(
                "UPDATE admin_tokens SET revoked_at = ?1 WHERE token_hash = ?2",
                params![now, hash],
            )?;
            tx.commit()?;
            info.revoked_at = Some(now);
            Ok(info)
        })
    }

    // === audit log ===

    /// Appends an entry to the audit log, linked to the last one, and commits it.
    pub fn audit(&self, event: &AuditEvent, now: Millis) -> Result<AuditEntry> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let last: Option<(i64, String)> = tx
                .query_row(
                    "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (seq, prev_hash) = match last {
                Some((seq, hash)) => (seq + 1, hash),
                None => (1, AUDIT_GENESIS.to_string()),
            };
            let hash = audit_hash(&prev_hash, seq, now, event);
            tx.execute(
                "INSERT INTO audit_log (seq, at, actor, source, action, target, outcome, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    seq,
                    now,
                    event.actor,
                    event.source,
                    event.action,
                    event.target,
                    event.outcome,
                    prev_hash,
                    hash
                ],
            )?;
            tx.commit()?;
            Ok(AuditEntry {
                seq,
                at: now,
                actor: event.actor.clone(),
                source: event.source.clone(),
                action: event.action.clone(),
                target: event.target.clone(),
                outcome: event.outcome.clone(),
                prev_hash,
                hash,
            })
        })
    }

    /// Audit entries at or after `since`, by `actor` (an exact actor or its prefix up
    /// to the first space, such as `token:0123abcd4567`), oldest first, at most `limit`
    /// of them from `after_seq` on.
    pub fn audit_entries(
        &self,
        since: Option<Millis>,
        actor: Option<&str>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{AUDIT_SELECT}
                 WHERE seq > ?1 AND at >= ?2
                   AND (actor = ?3 OR actor LIKE ?5 ESCAPE '\\' OR ?3 IS NULL)
                 ORDER BY seq LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![
                    after_seq,
                    since.unwrap_or(0),
                    actor,
                    limit.min(MAX_AUDIT_LIST),
                    actor.map(actor_pattern)
                ],
                audit_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The newest `limit` audit entries (by `actor`, as in [`Store::audit_entries`]),
    /// newest first: the console's page.
    pub fn audit_recent(&self, actor: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{AUDIT_SELECT}
                 WHERE (actor = ?1 OR actor LIKE ?3 ESCAPE '\\' OR ?1 IS NULL)
                 ORDER BY seq DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![actor, limit.min(MAX_AUDIT_LIST), actor.map(actor_pattern)],
                audit_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Checks the whole chain, page by page.
    pub fn audit_verify(&self) -> Result<AuditVerdict> {
        let mut check = ChainCheck::default();
        let mut after = 0;
        loop {
            let page: Vec<AuditEntry> = self.blocking(|| {
                let conn = self.fast();
                let mut stmt = conn.prepare_cached(&format!(
                    "{AUDIT_SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![after, VERIFY_PAGE], audit_row)?;
                rows.collect::<Result<Vec<_>, _>>()
            })?;
            let Some(last) = page.last() else {
                return Ok(check.finish());
            };
            after = last.seq;
            for entry in &page {
                check.push(entry);
            }
        }
    }
}

/// The columns [`audit_row`] reads.
const AUDIT_SELECT: &str =
    "SELECT seq, at, actor, source, action, target, outcome, prev_hash, hash FROM audit_log";

/// The LIKE pattern for an actor given without its name (`token:ID` for
/// `token:ID (NAME)`), its own `%`, `_` and `\` taken literally.
fn actor_pattern(actor: &str) -> String {
    let mut pattern = String::with_capacity(actor.len() + 2);
    for c in actor.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str(" %");
    pattern
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        source: r.get(3)?,
        action: r.get(4)?,
        target: r.get(5)?,
        outcome: r.get(6)?,
        prev_hash: r.get(7)?,
        hash: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a directory removed when the guard drops.
    fn store() -> (Store, RemoveOnDrop) {
        let dir = std::env::temp_dir().join(format!(
            "herald-admin-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir).unwrap(), RemoveOnDrop(dir))
    }

    struct RemoveOnDrop(std::path::PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn event(action: &str) -> AuditEvent {
        AuditEvent {
            actor: "token:0123456789ab (init)".into(),
            source: "127.0.0.1".into(),
            action: action.into(),
            target: "/api/v1/jobs".into(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn audit_log_detects_an_edited_row() {
        let (store, _dir) = store();
        for (i, action) in ["jobs.create", "agents.revoke", "tokens.create"]
            .into_iter()
            .enumerate()
        {
            let entry = store.audit(&event(action), 1000 + i as i64).unwrap();
            assert_eq!(entry.seq, i as i64 + 1);
        }
        let verdict = store.audit_verify().unwrap();
        assert_eq!((verdict.entries, verdict.problems.len()), (3, 0));

        store
            .conn()
            .execute("UPDATE audit_log SET outcome = 'denied' WHERE seq = 2", [])
            .unwrap();
        let verdict = store.audit_verify().unwrap();
        assert_eq!(verdict.problems, ["entry 2: its contents were changed"]);

        store
            .conn()
            .execute("UPDATE audit_log SET outcome = 'ok' WHERE seq = 2", [])
            .unwrap();
        store
            .conn()
            .execute("DELETE FROM audit_log WHERE seq = 2", [])
            .unwrap();
        let verdict = store.audit_verify().unwrap();
        assert_eq!(verdict.entries, 2);
        assert!(
            verdict.problems.iter().any(|p| p.contains("missing")),
            "{:?}",
            verdict.problems
        );
    }

    #[test]
    fn audit_entries_filter_by_time_and_actor() {
        let (store, _dir) = store();
        store.audit(&event("a"), 10).unwrap();
        let mut other = event("b");
        other.actor = "user:ann".into();
        store.audit(&other, 20).unwrap();
        store.audit(&event("c"), 30).unwrap();
        let by = |since, actor| {
            store
                .audit_entries(since, actor, 0, 100)
                .unwrap()
                .into_iter()
                .map(|e| e.action)
                .collect::<Vec<_>>()
        };
        assert_eq!(by(None, None), ["a", "b", "c"]);
        assert_eq!(by(Some(20), None), ["b", "c"]);
        assert_eq!(by(None, Some("user:ann")), ["b"]);
        assert_eq!(by(None, Some("token:0123456789ab")), ["a", "c"]);
        assert_eq!(
            by(None, Some("user:a_n")),
            Vec::<String>::new(),
            "_ is literal"
        );
        assert_eq!(
            by(None, Some("token:%")),
            Vec::<String>::new(),
            "% is literal"
        );
    }

    #[test]
    fn scoped_tokens_expire_and_the_last_admin_token_stays() {
        let (store, _dir) = store();
        let admin = "a".repeat(64);
        let read = "b".repeat(64);
        store
            .add_admin_token(&admin, "init", Scope::Admin, None, 1)
            .unwrap();
        let id = store
            .add_admin_token(&read, "helpdesk", Scope::Read, Some(100), 1)
            .unwrap();
        assert_eq!(id, "bbbbbbbbbbbb");
        assert!(matches!(
            store.add_admin_token(&"c".repeat(64), "helpdesk", Scope::Read, None, 2),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.admin_token(&read, 50).unwrap().map(|c| c.scope),
            Some(Scope::Read)
        );
        assert_eq!(store.admin_token(&read, 100).unwrap(), None, "expired");
        assert!(matches!(
            store.revoke_admin_token("aaaaaaaaaaaa", 5),
            Err(StoreError::Conflict(m)) if m.contains("last admin token")
        ));
        store.revoke_admin_token("bbbbbbbbbbbb", 5).unwrap();
        assert_eq!(store.admin_token(&read, 6).unwrap(), None, "revoked");
        assert!(matches!(
            store.revoke_admin_token("bbbbbbbbbbbb", 7),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.revoke_admin_token("zz", 7),
            Err(StoreError::Invalid(_))
        ));
        let list = store.admin_tokens().unwrap();
        assert_eq!(list.len(), 2);
    }
}
