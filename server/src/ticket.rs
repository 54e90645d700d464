//! One-time tickets for browser services.
//!
//! When the relay signals a browser job it attaches a ticket; the agent appends it to
//! the service page's URL (`herald_ticket=`). The console redeems it once
//! (`jobs.visit_redeemed_at`), which lets that visit in as the device's user, for that
//! job only. A ticket is `v1.<job id>.<expiry ms>.<hex HMAC-SHA256>` under a key kept in
//! the data directory, so the server need not store tickets it hands out, and resending
//! a signal after a reconnect simply mints a fresh one for the same job.

use std::path::Path;

use herald_shared::protocol::JobId;
use herald_shared::Millis;
use ring::hmac;

/// File holding the ticket key, in the data directory.
pub const KEY_FILE: &str = "console.key";

/// Why a ticket was not accepted. One message for people: the details go to the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// Not of the ticket form, or the signature does not match.
    #[error("invalid ticket")]
    Invalid,
    /// Its time is up.
    #[error("ticket expired")]
    Expired,
}

/// Mints and checks tickets.
#[derive(Clone)]
pub struct Tickets {
    key: hmac::Key,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tickets(..)")
    }
}

impl Tickets {
    /// Loads the key from the data directory, creating it (mode 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Tickets> {
        let path = data_dir.join(KEY_FILE);
        let secret = match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => bytes,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a 32-byte key", path.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = crate::random_bytes::<32>().to_vec();
                write_private(&path, &bytes)?;
                bytes
            }
            Err(e) => return Err(e),
        };
        Ok(Tickets::from_secret(&secret))
    }

    /// Tickets under a given secret.
    pub fn from_secret(secret: &[u8]) -> Tickets {
        Tickets {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A ticket for `job_id`, valid until `expires_at`.
    pub fn mint(&self, job_id: JobId, expires_at: Millis) -> String {
        let body = format!("v1.{job_id}.{expires_at}");
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", hex::encode(tag.as_ref()))
    }

    /// The job a ticket is for, if it is genuine and not expired.
    pub fn verify(&self, ticket: &str, now: Millis) -> Result<JobId, TicketError> {
        if ticket.len() > 200 {
            return Err(TicketError::Invalid);
        }
        let (body, tag) = ticket.rsplit_once('.').ok_or(TicketError::Invalid)?;
        let tag = hex::decode(tag).map_err(|_| TicketError::Invalid)?;
        hmac::verify(&self.key, body.as_bytes(), &tag).map_err(|_| TicketError::Invalid)?;
        let mut parts = body.split('.');
        let (Some("v1"), Some(job), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Invalid);
        };
        let job_id: JobId = job.parse().map_err(|_| TicketError::Invalid)?;
        let expires_at: Millis = expires.parse().map_err(|_| TicketError::Invalid)?;
        if expires_at <= now {
            return Err(TicketError::Expired);
        }
        Ok(job_id)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_ticket_verifies_until_it_expires() {
        let tickets = Tickets::from_secret(b"k");
        let ticket = tickets.mint(42, 1_000);
        assert!(ticket.starts_with("v1.42.1000."));
        assert_eq!(tickets.verify(&ticket, 999), Ok(42));
        assert_eq!(tickets.verify(&ticket, 1_000), Err(TicketError::Expired));
    }

    #[test]
    fn forged_or_altered_tickets_are_invalid() {
        let tickets = Tickets::from_secret(b"k");
        let ticket = tickets.mint(42, 1_000);
        let other = Tickets::from_secret(b"other").mint(42, 1_000);
        let altered_job = ticket.replacen("v1.42.", "v1.43.", 1);
        let later = ticket.replacen(".1000.", ".9000.", 1);
        for bad in [
            other.as_str(),
            altered_job.as_str(),
            later.as_str(),
            "",
            "v1.42.1000",
            "v1.42.1000.zz",
            "garbage",
        ] {
            assert_eq!(tickets.verify(bad, 0), Err(TicketError::Invalid), "{bad}");
        }
    }

    #[test]
    fn the_key_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!(
            "herald-ticket-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let first = Tickets::load_or_create(&dir).unwrap().mint(1, 10);
        let second = Tickets::load_or_create(&dir).unwrap().mint(1, 10);
        assert_eq!(first, second);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
