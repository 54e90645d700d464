//! Campaigns: one signed message sent to a recipient list, with a fallback to SMS or
//! e-mail for the rows it does not reach. This holds the list format (a CSV file read
//! row by row, so memory does not grow with the list), phone-number normalisation, the
//! fallback's text, and the records the API returns and the CLI prints.
//!
//! A row names a person by any of `phone`, `email`, `user` (console login) and `agent`
//! (id or name). The store resolves each to devices; the rules for what a row may hold
//! are here.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use herald_shared::Millis;

/// Most rows a list may have.
pub const MAX_ROWS: u64 = 1_000_000;
/// Largest list file accepted, in bytes.
pub const MAX_LIST_BYTES: u64 = 256 * 1024 * 1024;
/// Bad rows a creation answer lists one by one (all are counted).
pub const MAX_BAD_ROWS_LISTED: usize = 1000;
/// Default wait for a `stored` receipt before the fallback goes out (10 minutes).
pub const DEFAULT_FALLBACK_AFTER_MS: i64 = 10 * 60_000;
/// Longest value of one field, in bytes.
const MAX_FIELD: usize = 320;

/// The columns a list may have.
pub const COLUMNS: [&str; 4] = ["phone", "email", "user", "agent"];

/// Where a message goes when the program does not get it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// No fallback.
    None,
    /// A text message through the `[sms]` gateway.
    Sms,
    /// An e-mail through the `[smtp]` relay.
    Email,
}

impl Fallback {
    /// The name used in the CLI, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::None => "none",
            Fallback::Sms => "sms",
            Fallback::Email => "email",
        }
    }
}

impl std::str::FromStr for Fallback {
    type Err = String;

    fn from_str(s: &str) -> Result<Fallback, String> {
        match s {
            "none" => Ok(Fallback::None),
            "sms" => Ok(Fallback::Sms),
            "email" => Ok(Fallback::Email),
            other => Err(format!(
                "unknown fallback {other:?}: use sms, email or none"
            )),
        }
    }
}

/// A fallback's state on one row. `None` in the database until its time comes.
pub mod fallback_state {
    /// Decided and waiting for a send slot (or a retry).
    pub const PENDING: &str = "pending";
    /// Handed to a send; if the server dies now the row becomes [`INTERRUPTED`].
    pub const SENDING: &str = "sending";
    /// The gateway or relay took it.
    pub const SENT: &str = "sent";
    /// The carrier reported it delivered.
    pub const DELIVERED: &str = "delivered";
    /// Refused by the gateway or relay after its retries, or reported failed.
    pub const FAILED: &str = "failed";
    /// The server stopped while sending; not sent again, so that nothing is paid twice.
    pub const INTERRUPTED: &str = "interrupted";
    /// A device got the message in time.
    pub const NOT_NEEDED: &str = "not_needed";
    /// The recipient blocked the sender on a device: no fallback either.
    pub const SKIPPED_BLOCKED: &str = "skipped_blocked";
    /// The campaign's `max_fallback` or the sender's daily cap was reached.
    pub const SKIPPED_CAP: &str = "skipped_cap";
    /// The row has no phone number (or e-mail address) for the fallback.
    pub const SKIPPED_NO_ADDRESS: &str = "skipped_no_address";
    /// The message expired before the fallback's time came.
    pub const SKIPPED_EXPIRED: &str = "skipped_expired";
    /// The campaign was canceled first.
    pub const CANCELED: &str = "canceled";
}

/// One readable row of a list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListRow {
    /// Line number in the file (the header is line 1).
    pub line: u64,
    /// Phone number in E.164 (`+821012345678`).
    pub phone: Option<String>,
    /// E-mail address (domain lower-cased).
    pub email: Option<String>,
    /// Console login.
    pub user: Option<String>,
    /// Agent id or name.
    pub agent: Option<String>,
}

/// A row that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    /// Line number in the file.
    pub line: u64,
    /// What is wrong, in words a sender can act on.
    pub reason: String,
}

/// A list that cannot be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// The header row is missing or names no known column.
    #[error("the list's first line must name its columns (any of phone, email, user, agent): {0}")]
    Header(String),
    /// More rows than [`MAX_ROWS`].
    #[error("the list has more than {MAX_ROWS} rows")]
    TooLong,
    /// The file could not be read.
    #[error("the list cannot be read: {0}")]
    Io(String),
}

/// Reads a list row by row.
pub struct ListReader<R: Read> {
    records: csv::Reader<Counted<R>>,
    lines: Rc<RefCell<Lines>>,
    columns: [Option<usize>; 4],
    country: Option<phonenumber::country::Id>,
    record: csv::ByteRecord,
    rows: u64,
}

impl<R: Read> ListReader<R> {
    /// Reads the header. `country` is the default for phone numbers written in national
    /// form (`010-1234-5678` with `KR`).
    pub fn new(reader: R, country: Option<phonenumber::country::Id>) -> Result<Self, ListError> {
        let lines = Rc::new(RefCell::new(Lines::default()));
        let mut records = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(Counted {
                inner: reader,
                lines: lines.clone(),
            });
        let header = records
            .byte_headers()
            .map_err(|e| ListError::Io(e.to_string()))?
            .clone();
        let mut columns = [None; 4];
        for (index, name) in header.iter().enumerate() {
            let name = String::from_utf8_lossy(name);
            // A byte-order mark that a spreadsheet wrote.
            let name = name
                .trim_start_matches('\u{feff}')
                .trim()
                .to_ascii_lowercase();
            let Some(column) = COLUMNS.iter().position(|c| *c == name) else {
                return Err(ListError::Header(format!("unknown column {name:?}")));
            };
            if columns[column].is_some() {
                return Err(ListError::Header(format!("column {name:?} appears twice")));
            }
            columns[column] = Some(index);
        }
        if columns.iter().all(Option::is_none) {
            return Err(ListError::Header("no columns".into()));
        }
        Ok(ListReader {
            records,
            lines,
            columns,
            country,
            record: csv::ByteRecord::new(),
            rows: 0,
        })
    }

    /// The next row, `Ok(None)` at the end. A row that cannot be read is an
    /// `Ok(Some(Err(_)))`; only a list that cannot be read on is an `Err`.
    #[allow(clippy::type_complexity)]
    pub fn next_row(&mut self) -> Result<Option<Result<ListRow, BadRow>>, ListError> {
        loop {
            let read = self.records.read_byte_record(&mut self.record);
            let end = self.records.position().byte();
            // The csv crate's own line numbers go wrong after blank lines: count them
            // from the bytes (the line a row ends on, less the line breaks inside it).
            let line = self.lines.borrow_mut().line_ending_at(end);
            match read {
                Ok(false) => return Ok(None),
                Ok(true) => {}
                Err(e) => {
                    return match e.kind() {
                        csv::ErrorKind::Io(_) => Err(ListError::Io(e.to_string())),
                        _ => Ok(Some(Err(BadRow {
                            line,
                            reason: e.to_string(),
                        }))),
                    }
                }
            }
            let inside: usize = self.record.iter().map(line_breaks).sum();
            let line = line.saturating_sub(inside as u64).max(2);
            // A blank line is no row.
            if self.record.iter().all(<[u8]>::is_empty) {
                continue;
            }
            self.rows += 1;
            if self.rows > MAX_ROWS {
                return Err(ListError::TooLong);
            }
            return Ok(Some(self.row(line)));
        }
    }

    fn row(&self, line: u64) -> Result<ListRow, BadRow> {
        let bad = |reason: String| BadRow { line, reason };
        let header_len = self.columns.iter().flatten().count();
        if self.record.len() > header_len {
            return Err(bad(format!(
                "{} fields, but the header names {header_len}",
                self.record.len()
            )));
        }
        let mut fields: [Option<&str>; 4] = [None; 4];
        for (column, index) in self.columns.iter().enumerate() {
            let Some(bytes) = index.and_then(|i| self.record.get(i)) else {
                continue;
            };
            if bytes.is_empty() {
                continue;
            }
            let text = std::str::from_utf8(bytes)
                .map_err(|_| bad(format!("the {} is not UTF-8 text", COLUMNS[column])))?;
            if text.len() > MAX_FIELD {
                return Err(bad(format!(
                    "the {} is longer than {MAX_FIELD} bytes",
                    COLUMNS[column]
                )));
            }
            fields[column] = Some(text);
        }
        let [phone, email, user, agent] = fields;
        let phone = phone
            .map(|p| normalize_phone(p, self.country))
            .transpose()
            .map_err(bad)?;
        let email = email.map(normalize_email).transpose().map_err(bad)?;
        for (what, name) in [("user", user), ("agent", agent)] {
            if let Some(name) = name {
                if !herald_shared::valid_name(name) {
                    return Err(bad(format!(
                        "{what} {name:?} is not a name (1 to 64 of letters, digits, '.', '_' and '-')"
                    )));
                }
            }
        }
        Ok(ListRow {
            line,
            phone,
            email,
            user: user.map(str::to_string),
            agent: agent.map(str::to_string),
        })
    }
}

/// A reader that notes where its line breaks are, for [`ListReader`]'s line numbers.
struct Counted<R> {
    inner: R,
    lines: Rc<RefCell<Lines>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut lines = self.lines.borrow_mut();
        // A line ends at "\n", "\r\n" (counted at the "\r") or a lone "\r", as the csv
        // reader ends records.
        for (i, b) in buf[..n].iter().enumerate() {
            let at = lines.read + i as u64;
            match b {
                b'\r' => lines.breaks.push_back(at),
                b'\n' if !lines.after_cr => lines.breaks.push_back(at),
                _ => {}
            }
            lines.after_cr = *b == b'\r';
        }
        lines.read += n as u64;
        Ok(n)
    }
}

/// Line breaks in a field, counted as [`Counted`] counts them.
fn line_breaks(field: &[u8]) -> usize {
    field
        .iter()
        .enumerate()
        .filter(|(i, b)| **b == b'\r' || **b == b'\n' && (*i == 0 || field[i - 1] != b'\r'))
        .count()
}

/// Line breaks read but not yet passed (the csv reader's buffer's worth), and how many
/// were passed.
#[derive(Default)]
struct Lines {
    breaks: std::collections::VecDeque<u64>,
    passed: u64,
    read: u64,
    after_cr: bool,
}

impl Lines {
    /// The line (from 1) of a row that ends at byte `end` (just past its terminator,
    /// if it has one).
    fn line_ending_at(&mut self, end: u64) -> u64 {
        let mut last = None;
        while let Some(&at) = self.breaks.front() {
            if at >= end {
                break;
            }
            self.breaks.pop_front();
            self.passed += 1;
            last = Some(at);
        }
        let terminator = u64::from(last.is_some_and(|at| at + 1 == end));
        1 + self.passed - terminator
    }
}

/// A country code for `--country` (`KR`, `us`).
pub fn parse_country(code: &str) -> Result<phonenumber::country::Id, String> {
    code.to_ascii_uppercase()
        .parse()
        .map_err(|_| format!("{code:?} is not a country code (two letters, like KR or US)"))
}

/// A phone number in E.164 (`+821012345678`), from international form or, with a
/// default country, national form. Numbers that cannot exist are refused.
pub fn normalize_phone(
    text: &str,
    country: Option<phonenumber::country::Id>,
) -> Result<String, String> {
    if !text.starts_with('+') && country.is_none() {
        return Err(format!(
            "phone {text:?} is not in international form (+...); give --country for national numbers"
        ));
    }
    let number = phonenumber::parse(country, text)
        .map_err(|e| format!("phone {text:?} is not a phone number: {e}"))?;
    if !phonenumber::is_valid(&number) {
        return Err(format!("phone {text:?} is not a valid number"));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// An e-mail address with its domain lower-cased; it must parse as one address.
pub fn normalize_email(text: &str) -> Result<String, String> {
    let Some((local, domain)) = text.rsplit_once('@') else {
        return Err(format!("email {text:?} is not an e-mail address"));
    };
    let address = format!("{local}@{}", domain.to_ascii_lowercase());
    address
        .parse::<lettre::Address>()
        .map_err(|_| format!("email {text:?} is not an e-mail address"))?;
    Ok(address)
}

/// The text of a fallback SMS: `[Ad] ` if advertising, then `Sender: title`, then the
/// link if the message has one, or else as much of the body as fits, cut at a word
/// where it can be and marked with `…`; then the invitation link. At most
/// [`SMS_LIMIT`] characters (a long SMS of three parts); the title alone
/// is cut if even it does not fit.
pub fn fallback_sms(
    display_name: &str,
    title: &str,
    body: &str,
    link: Option<&str>,
    advertising: bool,
    invite: Option<&str>,
) -> String {
    let prefix = if advertising { "[Ad] " } else { "" };
    let head = one_line(&format!("{prefix}{display_name}: {title}"));
    let tail = invite.map_or(String::new(), |url| format!(" Get the app: {url}"));
    let room = SMS_LIMIT.saturating_sub(tail.chars().count());
    let head = cut(&head, room);
    let room = room.saturating_sub(head.chars().count());
    let middle = match link {
        Some(link) if link.chars().count() < room => format!(" {link}"),
        Some(_) => String::new(),
        None if room > 4 && !body.trim().is_empty() => {
            format!(" - {}", cut(&one_line(body), room - 3))
        }
        None => String::new(),
    };
    format!("{head}{middle}{tail}")
}

/// Longest fallback SMS in characters: three concatenated parts of 153 GSM characters.
pub const SMS_LIMIT: usize = 459;

/// The subject and body of a fallback e-mail.
pub fn fallback_email(
    display_name: &str,
    title: &str,
    body: &str,
    link: Option<&str>,
    advertising: bool,
    invite: Option<&str>,
) -> (String, String) {
    let prefix = if advertising { "[Ad] " } else { "" };
    let subject = one_line(&format!("{prefix}{title}"));
    let mut text = format!("{display_name} sent you a message:\n\n{title}\n\n{body}\n");
    if let Some(link) = link {
        text.push_str(&format!("\n{link}\n"));
    }
    if let Some(url) = invite {
        text.push_str(&format!(
            "\nGet messages like this in the Herald app instead: {url}\n"
        ));
    }
    text.push_str(&format!(
        "\nYou receive this as a recipient of {display_name}. To stop their messages, block {display_name} in the Herald app or reply to them.\n"
    ));
    (subject, text)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `text` in at most `max` characters: whole if it fits, else cut at the last space
/// in the second half (or mid-word) with `…`.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let kept: String = text.chars().take(max - 1).collect();
    let kept = match kept.rfind(' ') {
        Some(space) if kept[..space].chars().count() >= max / 2 => kept[..space].to_string(),
        _ => kept,
    };
    format!("{kept}…")
}

// === API records ===

/// Request body: create a campaign (`POST /api/v1/campaigns`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateCampaign {
    /// Sender-signed message (audience `all`: the list narrows it), base64 of the
    /// bincode envelope.
    pub envelope: String,
    /// The uploaded list (`POST /api/v1/lists`).
    pub list: String,
    /// Start from this time on (Unix ms); now when absent.
    #[serde(default)]
    pub deliver_at: Option<Millis>,
    /// `sms`, `email` or `none`.
    #[serde(default = "no_fallback")]
    pub fallback: Fallback,
    /// Wait this long for a `stored` receipt before falling back (ms).
    #[serde(default)]
    pub fallback_after_ms: Option<i64>,
    /// At most this many fallbacks for the whole campaign.
    #[serde(default)]
    pub max_fallback: Option<u64>,
    /// Rows started per second (spreads a large send); all at once when absent.
    #[serde(default)]
    pub rate: Option<u32>,
    /// Add a link to the server's page for getting the app to fallbacks.
    #[serde(default)]
    pub invite: bool,
    /// Default country for national phone numbers (`KR`).
    #[serde(default)]
    pub country: Option<String>,
    /// Refuse the whole list if any row is bad.
    #[serde(default)]
    pub strict: bool,
}

fn no_fallback() -> Fallback {
    Fallback::None
}

/// Answer to `POST /api/v1/lists`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListUploaded {
    /// The list's id, for `POST /api/v1/campaigns`.
    pub id: String,
    /// Its size.
    pub bytes: u64,
}

/// Answer to `POST /api/v1/campaigns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignCreated {
    /// Message id (hex), also the campaign's.
    pub id: String,
    /// Rows taken (after deduplication).
    pub addressed: u64,
    /// Rows with at least one device.
    pub with_program: u64,
    /// Rows with no device (fallback at once).
    pub no_program: u64,
    /// Devices the message goes to.
    pub devices: u64,
    /// Devices skipped because they reported blocking the sender.
    pub skipped_blocked: u64,
    /// Rows naming someone an earlier row already named.
    pub duplicates: u64,
    /// Rows that could not be read.
    pub bad: u64,
    /// The first [`MAX_BAD_ROWS_LISTED`] of them.
    pub bad_rows: Vec<BadRow>,
}

/// A campaign's figures (`message status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CampaignStatus {
    /// Message id.
    pub id: String,
    /// Sender name.
    pub sender: String,
    /// Title.
    pub title: String,
    /// `sms`, `email` or `none`.
    pub fallback: String,
    /// When it was created, and when it starts.
    pub created_at: Millis,
    /// When the first row goes out.
    pub start_at: Millis,
    /// When the message expires.
    pub expires_at: Millis,
    /// When it was canceled, if it was.
    pub canceled_at: Option<Millis>,
    /// Rows taken.
    pub addressed: u64,
    /// Rows with at least one device.
    pub with_program: u64,
    /// Rows with no device.
    pub no_program: u64,
    /// Rows handed to at least one device.
    pub pushed: u64,
    /// Rows with a signed `stored` receipt from a device.
    pub stored: u64,
    /// ... `displayed`.
    pub displayed: u64,
    /// ... `read`.
    pub read: u64,
    /// Rows whose recipient blocked the sender (a device refused it or had reported
    /// the block).
    pub refused: u64,
    /// Rows with devices where the message expired unstored.
    pub expired: u64,
    /// Fallbacks handed to the gateway or relay.
    pub fallback_sent: u64,
    /// Fallbacks the carrier reported delivered (e-mails accepted by the relay count).
    pub fallback_delivered: u64,
    /// Fallbacks refused, reported failed, or interrupted.
    pub fallback_failed: u64,
    /// Fallbacks waiting for their time or a send slot.
    pub fallback_pending: u64,
    /// Fallbacks not sent because the recipient blocked the sender.
    pub fallback_skipped_blocked: u64,
    /// Fallbacks not sent: over the cap.
    pub fallback_skipped_cap: u64,
    /// Fallbacks not sent: no phone number or e-mail address, or expired.
    pub fallback_skipped_other: u64,
    /// Rows reached by no channel, and not waiting for anything.
    pub not_reached: u64,
    /// stored ÷ with_program.
    pub push_rate: f64,
    /// fallback_delivered ÷ fallback_sent.
    pub fallback_rate: f64,
    /// Rows reached by any channel ÷ addressed.
    pub reach_rate: f64,
    /// Time from a row's start to its first `stored` receipt, at the 50th, 90th and
    /// 99th percentiles (ms); `None` before any.
    pub stored_ms_p50: Option<i64>,
    /// 90th percentile.
    pub stored_ms_p90: Option<i64>,
    /// 99th percentile.
    pub stored_ms_p99: Option<i64>,
    /// Rows with no program that got an invitation.
    pub invited: u64,
    /// Of those, how many have linked a device since.
    pub invited_linked: u64,
    /// Stored receipts per minute since the start: (minute start, count).
    pub stored_per_minute: Vec<(Millis, u64)>,
}

/// One row of a campaign (`message recipients`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRecipient {
    /// Line in the list.
    pub line: u64,
    /// Phone (E.164), as listed or from the console user.
    pub phone: Option<String>,
    /// E-mail address, as listed or from the console user.
    pub email: Option<String>,
    /// Console login the row resolved to.
    pub user: Option<String>,
    /// Agent named in the list.
    pub agent: Option<String>,
    /// Devices the message went to.
    pub devices: u64,
    /// Summary: `read`, `displayed`, `stored`, `blocked`, `waiting`, `fallback_pending`,
    /// `fallback_sent`, `fallback_delivered`, `fallback_failed`, `canceled`,
    /// `not_reached`.
    pub state: String,
    /// The fallback's own state, if it came to one.
    pub fallback_state: Option<String>,
    /// What the gateway or relay said.
    pub fallback_detail: Option<String>,
    /// When the first `stored` receipt came in.
    pub stored_at: Option<Millis>,
}

/// The states `message recipients --state` filters on.
pub const RECIPIENT_STATES: [&str; 11] = [
    "read",
    "displayed",
    "stored",
    "blocked",
    "waiting",
    "fallback_pending",
    "fallback_sent",
    "fallback_delivered",
    "fallback_failed",
    "canceled",
    "not_reached",
];

/// One delivery report from the SMS gateway (`POST /api/v1/sms/reports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmsReport {
    /// The gateway's message id (as it answered the send).
    pub id: String,
    /// `delivered`; `failed`, `undelivered`, `rejected` or `expired`; anything else
    /// (`queued`, `sent`, ...) is taken and changes nothing.
    pub status: String,
    /// The gateway's words, kept with the row.
    #[serde(default)]
    pub detail: Option<String>,
}

/// What became of one delivery report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmsReportOutcome {
    /// Gateway message id.
    pub id: String,
    /// `updated`, `duplicate` (already final), `kept` (no fallback SMS has this id yet:
    /// applied if one gets it), `ignored` (not a final status).
    pub outcome: String,
}

/// A due fallback, as the forwarder sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackSend {
    /// Campaign (message) id.
    pub campaign: String,
    /// Line.
    pub line: u64,
    /// `sms` or `email`.
    pub kind: Fallback,
    /// Phone number or address.
    pub target: String,
    /// Attempts before this one.
    pub attempts: u32,
    /// The text (SMS) or subject and body (e-mail).
    pub text: String,
    /// E-mail subject.
    pub subject: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, country: Option<&str>) -> Result<Vec<Result<ListRow, BadRow>>, ListError> {
        let country = country.map(|c| parse_country(c).unwrap());
        let mut reader = ListReader::new(text.as_bytes(), country)?;
        let mut rows = Vec::new();
        while let Some(row) = reader.next_row()? {
            rows.push(row);
        }
        Ok(rows)
    }

    #[test]
    fn phones_are_normalised_to_e164() {
        let kr = Some(parse_country("kr").unwrap());
        assert_eq!(
            normalize_phone("010-1234-5678", kr).unwrap(),
            "+821012345678"
        );
        assert_eq!(
            normalize_phone("+82 10 1234 5678", None).unwrap(),
            "+821012345678"
        );
        assert_eq!(
            normalize_phone("(202) 555-0143", Some(parse_country("US").unwrap())).unwrap(),
            "+12025550143"
        );
        assert!(normalize_phone("010-1234-5678", None)
            .unwrap_err()
            .contains("--country"));
        assert!(normalize_phone("+82 12", None).is_err());
        assert!(normalize_phone("call me", kr).is_err());
        assert!(parse_country("Korea").is_err());
    }

    #[test]
    fn rows_are_read_with_line_numbers_and_bad_rows_say_why() {
        let list = "\u{feff}Phone,email,user\n\
                    +821012345678,,\n\
                    \n\
                    010-2222-3333,A@Example.ORG,\n\
                    nonsense,,\n\
                    ,,bad name!\n\
                    ,,\n\
                    +821099998888,x,\n\
                    ,,alice,extra\n";
        let rows = read(list, Some("KR")).unwrap();
        let lines: Vec<(u64, bool)> = rows
            .iter()
            .map(|r| match r {
                Ok(row) => (row.line, true),
                Err(bad) => (bad.line, false),
            })
            .collect();
        // Line 3 is blank and line 7 has only empty fields: both are skipped.
        assert_eq!(
            lines,
            vec![
                (2, true),
                (4, true),
                (5, false),
                (6, false),
                (8, false),
                (9, false)
            ]
        );
        let Ok(row) = &rows[1] else { panic!() };
        assert_eq!(row.phone.as_deref(), Some("+821022223333"));
        assert_eq!(row.email.as_deref(), Some("A@example.org"));
        let Err(bad) = &rows[2] else { panic!() };
        assert!(bad.reason.contains("nonsense"), "{}", bad.reason);
        let Err(bad) = &rows[4] else { panic!() };
        assert!(bad.reason.contains("email"), "{}", bad.reason);
        let Err(bad) = &rows[5] else { panic!() };
        assert!(bad.reason.contains("fields"), "{}", bad.reason);
    }

    #[test]
    fn line_numbers_count_blank_lines_crlf_and_quoted_breaks() {
        let list = "user\r\na\r\n\r\nb\n\"c\r\nc\"\n\n\nd\re";
        let rows = read(list, None).unwrap();
        let lines: Vec<u64> = rows
            .iter()
            .map(|r| match r {
                Ok(row) => row.line,
                Err(bad) => bad.line,
            })
            .collect();
        // "c\nc" is not a valid name, so a bad row, but on the line it starts on.
        assert_eq!(lines, vec![2, 4, 5, 9, 10]);
    }

    #[test]
    fn a_list_without_a_usable_header_is_refused() {
        assert!(matches!(read("", None), Err(ListError::Header(_))));
        assert!(matches!(
            read("mobile\n+821012345678\n", None),
            Err(ListError::Header(_))
        ));
        assert!(matches!(
            read("phone,phone\n", None),
            Err(ListError::Header(_))
        ));
    }

    #[test]
    fn invalid_utf8_is_a_bad_row_not_a_bad_list() {
        let mut list = b"user\nalice\n".to_vec();
        list.extend_from_slice(b"\xff\xfe\n");
        list.extend_from_slice(b"bob\n");
        let mut reader = ListReader::new(&list[..], None).unwrap();
        let mut results = Vec::new();
        while let Some(row) = reader.next_row().unwrap() {
            results.push(row.is_ok());
        }
        assert_eq!(results, vec![true, false, true]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_lines_only_grow() {
        // A small xorshift generator: the same inputs on every run.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"phone,email,user,agent\n\r\"+0123456789 @.-_ab\xff\xfe";
        for _ in 0..3000 {
            let len = (next() % 200) as usize;
            let mut input = b"phone,email,user,agent\n".to_vec();
            input.extend((0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]));
            let Ok(mut reader) = ListReader::new(&input[..], Some(parse_country("KR").unwrap()))
            else {
                continue;
            };
            let mut last = 1;
            while let Ok(Some(row)) = reader.next_row() {
                let line = match row {
                    Ok(row) => row.line,
                    Err(bad) => bad.line,
                };
                assert!(line > last, "line {line} after {last}: {input:?}");
                last = line;
            }
        }
    }

    #[test]
    fn sms_fits_and_says_how_it_was_cut() {
        let long = "word ".repeat(200);
        let text = fallback_sms("Bank", "Your card", &long, None, false, None);
        assert!(text.chars().count() <= SMS_LIMIT);
        assert!(text.starts_with("Bank: Your card - word"));
        assert!(text.ends_with('…'));
        let text = fallback_sms(
            "Bank",
            "Your card",
            &long,
            Some("https://bank.example/x"),
            true,
            Some("https://herald.example/join"),
        );
        assert_eq!(
            text,
            "[Ad] Bank: Your card https://bank.example/x Get the app: https://herald.example/join"
        );
        let title = "T".repeat(600);
        assert!(
            fallback_sms("B", &title, "", None, false, None)
                .chars()
                .count()
                <= SMS_LIMIT
        );
        assert_eq!(
            fallback_sms("B", "Hi\nthere", "", None, false, None),
            "B: Hi there"
        );
    }
}
