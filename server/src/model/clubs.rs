//! Clubs: groups that console users make themselves and join by a one-time invitation
//! (not the operator's signed audience groups), and the directory as one viewer sees
//! it: online devices with the shares they may reach, favourites first.
//!
//! The rules of membership are pure functions here ([`may_leave`], [`may_remove`]); the
//! store applies them inside its transactions.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use herald_shared::peers::PeerDevice;
use herald_shared::Millis;

use super::DirectoryEntry;

/// Longest club description, in characters.
pub const MAX_CLUB_DESCRIPTION: usize = 500;
/// How long an invitation stays usable.
pub const INVITE_TTL_MS: Millis = 7 * 24 * 3600 * 1000;
/// Most clubs one user may create (a quota against junk, not a product limit).
pub const MAX_CLUBS_CREATED: usize = 50;

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClubRole {
    /// Invites, removes and promotes members.
    Owner,
    /// Sees what the club's members share with it.
    Member,
}

impl ClubRole {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            ClubRole::Owner => "owner",
            ClubRole::Member => "member",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<ClubRole> {
        match s {
            "owner" => Some(ClubRole::Owner),
            "member" => Some(ClubRole::Member),
            _ => None,
        }
    }
}

/// A club (`--json` form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Club {
    /// Id.
    pub id: i64,
    /// Unique name ([`herald_shared::valid_name`]); shares name clubs by it.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Creation time.
    pub created_at: Millis,
    /// Number of members.
    pub members: u32,
    /// The viewer's role, when the list is a user's own.
    pub role: Option<ClubRole>,
}

/// A club's member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClubMember {
    /// User id.
    pub user_id: i64,
    /// Login.
    pub login: String,
    /// Role.
    pub role: ClubRole,
    /// When they joined.
    pub joined_at: Millis,
}

/// A club with its members (`--json` form of the API's club).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClubDetail {
    /// The club.
    pub club: Club,
    /// Its members, owners first.
    pub members: Vec<ClubMember>,
}

/// Checks a new club's name and description; the error is for people.
pub fn check_club(name: &str, description: &str) -> Result<(), String> {
    if !herald_shared::valid_name(name) {
        return Err(format!(
            "the club name {name:?} must be 1-64 letters, digits, '.', '_' or '-' (no spaces)"
        ));
    }
    if description.chars().count() > MAX_CLUB_DESCRIPTION {
        return Err(format!(
            "the description is too long: at most {MAX_CLUB_DESCRIPTION} characters"
        ));
    }
    Ok(())
}

/// What leaving does to the club.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The member goes; the club stays.
    Leave,
    /// The last member goes: the club and its invitations are deleted.
    DeleteClub,
}

/// Whether a member with `role` may leave a club with `owners` owners and `members`
/// members in all (themselves included). The last owner may not leave while others
/// remain: they promote someone first (or remove everyone); the last member leaving
/// deletes the club.
pub fn may_leave(role: ClubRole, owners: usize, members: usize) -> Result<Leaving, String> {
    if members <= 1 {
        return Ok(Leaving::DeleteClub);
    }
    if role == ClubRole::Owner && owners <= 1 {
        return Err(
            "you are the club's last owner: make another member an owner first, or remove \
             the other members (the club is deleted when its last member leaves)"
                .into(),
        );
    }
    Ok(Leaving::Leave)
}

/// Whether `by` (with their role, if a member) may remove `target`: owners only, and
/// removing oneself is leaving.
pub fn may_remove(by_role: Option<ClubRole>, by: i64, target: i64) -> Result<(), String> {
    if by == target {
        return Err("to remove yourself, leave the club".into());
    }
    match by_role {
        Some(ClubRole::Owner) => Ok(()),
        _ => Err("only the club's owners may remove members".into()),
    }
}

/// The invitation code as typed or pasted: the bare code, or the whole
/// `…/clubs/join/CODE` link.
pub fn invite_code(input: &str) -> &str {
    let input = input.trim().trim_end_matches('/');
    input.rsplit('/').next().unwrap_or(input).trim()
}

/// The directory as a viewer sees it: the `entries` the store lets them reach, only on
/// online devices (`online` says since when), matching `keyword`, grouped by device,
/// devices with a favourite share first (then by owner and device), and within a device
/// favourite shares first. Returns the devices and which (agent, share) are favourites.
pub fn directory_view(
    entries: Vec<DirectoryEntry>,
    online: impl Fn(&str) -> Option<Millis>,
    keyword: &str,
    favourites: &HashSet<(String, String)>,
) -> Vec<PeerDevice> {
    let mut devices: Vec<PeerDevice> = Vec::new();
    for entry in entries {
        let Some(since) = online(&entry.agent_id) else {
            continue;
        };
        if !entry.matches(keyword) {
            continue;
        }
        match devices.iter_mut().find(|d| d.agent_id == entry.agent_id) {
            Some(device) => device.services.push(entry.service),
            None => devices.push(PeerDevice {
                owner: entry.owner,
                device: entry.device,
                agent_id: entry.agent_id,
                online_since: since,
                reported: entry
                    .reported
                    .split([' ', ','])
                    .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                    .collect(),
                observed: entry
                    .observed
                    .as_deref()
                    .and_then(|a| a.parse::<SocketAddr>().ok()),
                services: vec![entry.service],
            }),
        }
    }
    let starred = |agent: &str, share: &str| favourites.contains(&(agent.into(), share.into()));
    for device in &mut devices {
        let agent = device.agent_id.clone();
        // Stable: within each half, the store's order (by name) stays.
        device.services.sort_by_key(|s| !starred(&agent, &s.name));
    }
    devices.sort_by(|a, b| {
        let fav = |d: &PeerDevice| d.services.iter().any(|s| starred(&d.agent_id, &s.name));
        fav(b)
            .cmp(&fav(a))
            .then_with(|| a.owner.cmp(&b.owner))
            .then_with(|| a.device.cmp(&b.device))
    });
    devices
}

#[cfg(test)]
mod tests {
    use herald_shared::peers::PeerService;

    use super::*;

    #[test]
    fn the_last_owner_stays_while_others_remain() {
        assert!(may_leave(ClubRole::Owner, 1, 3).is_err());
        assert_eq!(may_leave(ClubRole::Owner, 2, 3), Ok(Leaving::Leave));
        assert_eq!(may_leave(ClubRole::Member, 1, 3), Ok(Leaving::Leave));
        assert_eq!(may_leave(ClubRole::Owner, 1, 1), Ok(Leaving::DeleteClub));
    }

    #[test]
    fn only_owners_remove_and_never_themselves() {
        assert!(may_remove(Some(ClubRole::Owner), 1, 2).is_ok());
        assert!(may_remove(Some(ClubRole::Member), 1, 2).is_err());
        assert!(may_remove(None, 1, 2).is_err());
        assert!(may_remove(Some(ClubRole::Owner), 1, 1).is_err());
    }

    #[test]
    fn names_and_codes() {
        assert!(check_club("chess-club", "체스 동호회").is_ok());
        assert!(check_club("chess club", "").is_err());
        assert!(check_club("", "").is_err());
        assert!(check_club("c", &"x".repeat(MAX_CLUB_DESCRIPTION + 1)).is_err());
        assert_eq!(invite_code(" abc "), "abc");
        assert_eq!(invite_code("https://h.example/clubs/join/abc/"), "abc");
    }

    fn entry(agent: &str, owner: &str, share: &str, description: &str) -> DirectoryEntry {
        DirectoryEntry {
            agent_id: agent.into(),
            device: format!("dev-{agent}"),
            owner: owner.into(),
            owner_user_id: Some(1),
            reported: "10.0.0.2 fd00::2 junk".into(),
            observed: Some("192.0.2.1:4433".into()),
            service: PeerService {
                name: share.into(),
                http: true,
                public: false,
                clubs: vec!["c".into()],
                description: description.into(),
            },
        }
    }

    #[test]
    fn the_view_keeps_online_matching_devices_favourites_first() {
        let entries = vec![
            entry("a1", "alice", "blog", "my blog"),
            entry("a1", "alice", "shop", "빵집"),
            entry("b1", "bob", "cam", "camera"),
            entry("c1", "carol", "nas", "files"),
        ];
        let online = |id: &str| (id != "c1").then_some(7);
        let none = HashSet::new();
        let all = directory_view(entries.clone(), online, "", &none);
        assert_eq!(all.len(), 2, "carol's device is offline");
        assert_eq!(all[0].owner, "alice");
        assert_eq!(all[0].services.len(), 2);
        assert_eq!(all[0].reported.len(), 2, "junk addresses are dropped");
        assert_eq!(all[0].online_since, 7);
        let found = directory_view(entries.clone(), online, "빵집", &none);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].services[0].name, "shop");
        let favs = HashSet::from([("b1".to_string(), "cam".to_string())]);
        let starred = directory_view(entries.clone(), online, "", &favs);
        assert_eq!(starred[0].owner, "bob");
        let favs = HashSet::from([("a1".to_string(), "shop".to_string())]);
        let starred = directory_view(entries, online, "", &favs);
        assert_eq!(starred[0].services[0].name, "shop");
    }
}
