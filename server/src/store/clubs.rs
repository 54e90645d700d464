//! Clubs, their members and one-time invitations (stored by the hash of their code),
//! and users' favourite shares. The membership rules are `model::clubs`'s; each change
//! applies them inside one transaction, so two owners leaving at once cannot leave a
//! club without one.

use std::collections::HashSet;

use super::*;
use crate::model::{may_leave, may_remove, Club, ClubMember, ClubRole, Leaving};

const CLUB_SELECT: &str = "SELECT c.id, c.name, c.description, c.created_at,
    (SELECT COUNT(*) FROM club_members m WHERE m.club_id = c.id) FROM clubs c";

fn club_row(r: &Row<'_>) -> rusqlite::Result<Club> {
    Ok(Club {
        id: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        created_at: r.get(3)?,
        members: r.get(4)?,
        role: None,
    })
}

fn role_of(conn: &Connection, club: i64, user: i64) -> Result<Option<ClubRole>> {
    let role: Option<String> = conn
        .query_row(
            "SELECT role FROM club_members WHERE club_id = ?1 AND user_id = ?2",
            params![club, user],
            |r| r.get(0),
        )
        .optional()?;
    role.map(|r| ClubRole::parse(&r).ok_or_else(|| StoreError::Corrupt(format!("club role {r:?}"))))
        .transpose()
}

fn counts(conn: &Connection, club: i64) -> Result<(usize, usize)> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN role = 'owner' THEN 1 ELSE 0 END), 0)
         FROM club_members WHERE club_id = ?1",
        params![club],
        |r| Ok((r.get::<_, i64>(1)? as usize, r.get::<_, i64>(0)? as usize)),
    )?)
}

impl Store {
    /// Creates a club with `owner` as its first owner; returns its id. A taken name is a
    /// conflict; so is a user's [`crate::model::MAX_CLUBS_CREATED`]th club.
    pub fn create_club(
        &self,
        name: &str,
        description: &str,
        owner: i64,
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM clubs WHERE name = ?1)",
                params![name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(StoreError::Conflict(format!(
                    "a club named {name} already exists; choose another name"
                )));
            }
            let created: i64 = tx.query_row(
                "SELECT COUNT(*) FROM clubs WHERE created_by = ?1",
                params![owner],
                |r| r.get(0),
            )?;
            if created as usize >= crate::model::MAX_CLUBS_CREATED {
                return Err(StoreError::Conflict(format!(
                    "you have created {created} clubs, the most one user may"
                )));
            }
            tx.execute(
                "INSERT INTO clubs (name, description, created_by, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, description, owner, now],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO club_members (club_id, user_id, role, joined_at)
                 VALUES (?1, ?2, 'owner', ?3)",
                params![id, owner, now],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    /// Every club, by name (admins).
    pub fn clubs(&self) -> Result<Vec<Club>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt = conn.prepare(&format!("{CLUB_SELECT} ORDER BY c.name"))?;
            let rows = stmt.query_map([], club_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// The clubs `user` is in, with their role, by name.
    pub fn clubs_of(&self, user: i64) -> Result<Vec<Club>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT c.id, c.name, c.description, c.created_at,
                    (SELECT COUNT(*) FROM club_members m WHERE m.club_id = c.id), me.role
                 FROM clubs c JOIN club_members me ON me.club_id = c.id AND me.user_id = ?1
                 ORDER BY c.name",
            )?;
            let rows = stmt.query_map(params![user], |r| {
                let mut club = club_row(r)?;
                let role: String = r.get(5)?;
                club.role = ClubRole::parse(&role);
                Ok(club)
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// A club by name, with the role of `viewer` in it.
    pub fn club(&self, name: &str, viewer: Option<i64>) -> Result<Option<Club>> {
        self.blocking(|| {
            let conn = self.conn();
            let club = conn
                .query_row(
                    &format!("{CLUB_SELECT} WHERE c.name = ?1"),
                    params![name],
                    club_row,
                )
                .optional()?;
            match (club, viewer) {
                (Some(mut club), Some(user)) => {
                    club.role = role_of(&conn, club.id, user)?;
                    Ok(Some(club))
                }
                (club, _) => Ok(club),
            }
        })
    }

    /// A club's members: owners first, then by login.
    pub fn club_members(&self, club: i64) -> Result<Vec<ClubMember>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT m.user_id, u.login, m.role, m.joined_at
                 FROM club_members m JOIN users u ON u.id = m.user_id
                 WHERE m.club_id = ?1 ORDER BY m.role = 'owner' DESC, u.login",
            )?;
            let rows = stmt.query_map(params![club], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Millis>(3)?,
                ))
            })?;
            let mut members = Vec::new();
            for row in rows {
                let (user_id, login, role, joined_at) = row?;
                let role = ClubRole::parse(&role)
                    .ok_or_else(|| StoreError::Corrupt(format!("club role {role:?}")))?;
                members.push(ClubMember {
                    user_id,
                    login,
                    role,
                    joined_at,
                });
            }
            Ok(members)
        })
    }

    /// Stores an invitation by the hash of its code; only an owner may invite.
    pub fn add_invite(
        &self,
        club: i64,
        code_hash: &str,
        by: i64,
        now: Millis,
        expires_at: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            if role_of(&conn, club, by)? != Some(ClubRole::Owner) {
                return Err(StoreError::Conflict(
                    "only the club's owners may invite".into(),
                ));
            }
            conn.execute(
                "INSERT INTO club_invites (code_hash, club_id, created_by, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![code_hash, club, by, now, expires_at],
            )?;
            Ok(())
        })
    }

    /// The club an unused, unexpired invitation is for (to show before accepting).
    pub fn invite_club(&self, code_hash: &str, now: Millis) -> Result<Club> {
        self.blocking(|| {
            let conn = self.conn();
            let club = check_invite(&conn, code_hash, now)?;
            Ok(conn.query_row(
                &format!("{CLUB_SELECT} WHERE c.id = ?1"),
                params![club],
                club_row,
            )?)
        })
    }

    /// Uses an invitation: `user` joins its club as a member. Unknown, used and expired
    /// codes are refused with a sentence saying which; so is joining a club twice (the
    /// code stays unused then).
    pub fn accept_invite(&self, code_hash: &str, user: i64, now: Millis) -> Result<Club> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let club = check_invite(&tx, code_hash, now)?;
            if role_of(&tx, club, user)?.is_some() {
                return Err(StoreError::Conflict(
                    "you are already a member of this club".into(),
                ));
            }
            tx.execute(
                "UPDATE club_invites SET used_by = ?2, used_at = ?3 WHERE code_hash = ?1",
                params![code_hash, user, now],
            )?;
            tx.execute(
                "INSERT INTO club_members (club_id, user_id, role, joined_at)
                 VALUES (?1, ?2, 'member', ?3)",
                params![club, user, now],
            )?;
            let club = tx.query_row(
                &format!("{CLUB_SELECT} WHERE c.id = ?1"),
                params![club],
                club_row,
            )?;
            tx.commit()?;
            Ok(club)
        })
    }

    /// `user` leaves a club (see [`may_leave`]); the last member leaving deletes it.
    pub fn leave_club(&self, club: i64, user: i64) -> Result<Leaving> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let role = role_of(&tx, club, user)?
                .ok_or_else(|| StoreError::NotFound("you are not a member of this club".into()))?;
            let (owners, members) = counts(&tx, club)?;
            let leaving = may_leave(role, owners, members).map_err(StoreError::Conflict)?;
            tx.execute(
                "DELETE FROM club_members WHERE club_id = ?1 AND user_id = ?2",
                params![club, user],
            )?;
            if leaving == Leaving::DeleteClub {
                tx.execute("DELETE FROM club_invites WHERE club_id = ?1", params![club])?;
                tx.execute("DELETE FROM clubs WHERE id = ?1", params![club])?;
            }
            tx.commit()?;
            Ok(leaving)
        })
    }

    /// An owner removes another member (see [`may_remove`]); `by = None` is an admin.
    pub fn remove_member(&self, club: i64, by: Option<i64>, target: i64) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            if let Some(by) = by {
                let role = role_of(&tx, club, by)?;
                may_remove(role, by, target).map_err(StoreError::Conflict)?;
            }
            let removed = tx.execute(
                "DELETE FROM club_members WHERE club_id = ?1 AND user_id = ?2",
                params![club, target],
            )?;
            if removed == 0 {
                return Err(StoreError::NotFound(
                    "that user is not a member of this club".into(),
                ));
            }
            let (owners, members) = counts(&tx, club)?;
            if owners == 0 && members > 0 {
                return Err(StoreError::Conflict(
                    "that is the club's last owner: make another member an owner first".into(),
                ));
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// An owner makes a member an owner.
    pub fn promote_member(&self, club: i64, by: i64, target: i64) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            if role_of(&conn, club, by)? != Some(ClubRole::Owner) {
                return Err(StoreError::Conflict(
                    "only the club's owners may make owners".into(),
                ));
            }
            let changed = conn.execute(
                "UPDATE club_members SET role = 'owner' WHERE club_id = ?1 AND user_id = ?2",
                params![club, target],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(
                    "that user is not a member of this club".into(),
                ));
            }
            Ok(())
        })
    }

    /// The (agent, share) pairs `user` starred.
    pub fn favourites(&self, user: i64) -> Result<HashSet<(String, String)>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt =
                conn.prepare("SELECT agent_id, share FROM favourites WHERE user_id = ?1")?;
            let rows = stmt.query_map(params![user], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Stars or unstars a share (the caller checks the user may see it).
    pub fn set_favourite(
        &self,
        user: i64,
        agent: &str,
        share: &str,
        on: bool,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            if on {
                conn.execute(
                    "INSERT INTO favourites (user_id, agent_id, share, created_at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    params![user, agent, share, now],
                )?;
            } else {
                conn.execute(
                    "DELETE FROM favourites WHERE user_id = ?1 AND agent_id = ?2 AND share = ?3",
                    params![user, agent, share],
                )?;
            }
            Ok(())
        })
    }
}

/// The club of a usable invitation, or why it is not usable.
fn check_invite(conn: &Connection, code_hash: &str, now: Millis) -> Result<i64> {
    let row: Option<(i64, Millis, Option<i64>)> = conn
        .query_row(
            "SELECT club_id, expires_at, used_by FROM club_invites WHERE code_hash = ?1",
            params![code_hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    match row {
        None => Err(StoreError::NotFound(
            "this invitation code is not known: check it, or ask for a new invitation".into(),
        )),
        Some((_, _, Some(_))) => Err(StoreError::Conflict(
            "this invitation has already been used: each code admits one person; ask for a new one"
                .into(),
        )),
        Some((_, expires, None)) if expires <= now => Err(StoreError::Conflict(
            "this invitation has expired: ask the club's owner for a new one".into(),
        )),
        Some((club, _, None)) => Ok(club),
    }
}

#[cfg(test)]
mod tests {
    use crate::model::Role;

    use super::*;

    fn user(store: &Store, login: &str) -> i64 {
        store.add_user(login, "x", Role::User, "", "", 1).unwrap()
    }

    #[test]
    fn invitations_admit_once_and_owners_stay() {
        let dir = std::env::temp_dir().join(format!(
            "herald-clubs-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        let (ann, ben, cat) = (
            user(&store, "ann"),
            user(&store, "ben"),
            user(&store, "cat"),
        );
        let club = store.create_club("chess", "체스", ann, 1).unwrap();
        assert!(matches!(
            store.create_club("chess", "", ben, 1),
            Err(StoreError::Conflict(_))
        ));
        assert!(
            store.add_invite(club, "h1", ben, 1, 100).is_err(),
            "not an owner"
        );
        store.add_invite(club, "h1", ann, 1, 100).unwrap();
        store.add_invite(club, "h2", ann, 1, 100).unwrap();
        store.add_invite(club, "h3", ann, 1, 10).unwrap();
        assert!(matches!(
            store.accept_invite("nope", ben, 5),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.accept_invite("h3", ben, 50),
            Err(StoreError::Conflict(m)) if m.contains("expired")
        ));
        store.accept_invite("h1", ben, 5).unwrap();
        assert!(matches!(
            store.accept_invite("h1", cat, 5),
            Err(StoreError::Conflict(m)) if m.contains("already been used")
        ));
        assert!(
            store.accept_invite("h2", ben, 5).is_err(),
            "already a member"
        );
        store.accept_invite("h2", cat, 5).unwrap();
        assert_eq!(store.club_members(club).unwrap().len(), 3);
        assert!(
            store.remove_member(club, Some(ben), cat).is_err(),
            "members cannot remove"
        );
        assert!(store.leave_club(club, ann).is_err(), "last owner");
        store.promote_member(club, ann, ben).unwrap();
        assert_eq!(store.leave_club(club, ann).unwrap(), Leaving::Leave);
        store.remove_member(club, Some(ben), cat).unwrap();
        assert_eq!(store.clubs_of(ben).unwrap()[0].role, Some(ClubRole::Owner));
        assert_eq!(store.leave_club(club, ben).unwrap(), Leaving::DeleteClub);
        assert!(store.club("chess", None).unwrap().is_none());
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
