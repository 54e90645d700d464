//! Who is asking: passwords (argon2id), browser sessions and their cookies, CSRF
//! tokens, login throttling and the extractors that put them in front of handlers.
//!
//! Every state-changing request goes through [`Posted`] (a session's form, its CSRF
//! token checked before the handler runs) or [`PublicPosted`] (login and registration,
//! checked against the per-browser `herald_csrf` cookie), so no handler can forget it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use herald_shared::token::secret_hash;
use herald_shared::Millis;

use super::{ConsoleError, ConsoleState};
use crate::https::ClientAddr;
use crate::model::{LoginAttempt, User};

/// Session cookie. `__Host-`: browsers accept it only with `Secure`, `Path=/` and no
/// `Domain`, so neither a sibling host nor plain HTTP can plant or overwrite it.
pub(crate) const SESSION_COOKIE: &str = "__Host-herald_session";
/// Per-browser CSRF cookie of the login and registration forms (`__Host-` as above).
pub(crate) const CSRF_COOKIE: &str = "__Host-herald_csrf";
/// Browser-service visit cookies are this followed by the job id (path
/// `/service/NAME`): one per job, so a second ticket does not end the first visit.
pub(crate) const VISIT_COOKIE_PREFIX: &str = "herald_visit_";
/// A session ends after this long without a request.
pub(crate) const SESSION_IDLE_MS: i64 = 12 * 3600 * 1000;
/// A session ends this long after the login, however active it is.
pub(crate) const SESSION_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;
/// Consecutive failed logins that lock an account.
pub(crate) const MAX_ACCOUNT_FAILURES: u32 = 5;
/// How long a locked account stays locked.
pub(crate) const LOCK_MS: i64 = 15 * 60 * 1000;
/// Failed logins from one address, within [`ADDRESS_WINDOW_MS`], that lock it out.
pub(crate) const MAX_ADDRESS_FAILURES: usize = 20;
/// The window of [`MAX_ADDRESS_FAILURES`].
pub(crate) const ADDRESS_WINDOW_MS: i64 = 15 * 60 * 1000;
/// Accounts one address may register within [`REGISTRATION_WINDOW_MS`].
pub(crate) const MAX_REGISTRATIONS: usize = 10;
/// The window of [`MAX_REGISTRATIONS`].
pub(crate) const REGISTRATION_WINDOW_MS: i64 = 3600 * 1000;
/// Shortest password.
pub(crate) const MIN_PASSWORD: usize = 10;
/// Longest password (hashing cost grows with it).
pub(crate) const MAX_PASSWORD: usize = 256;
/// Most addresses or unknown logins tracked at once; beyond it the oldest go.
const MAX_TRACKED: usize = 100_000;
/// Password hashes computed at once (each takes ~19 MiB and a core for a while).
const HASHING_PERMITS: usize = 4;
/// Requests waiting for or holding a hashing permit, at most; beyond it a request is
/// answered at once (503) instead of queueing without bound.
const HASHING_QUEUE: usize = 32;
/// IPv6 addresses are throttled by their /64 (one customer's network): the bits kept.
const IPV6_PREFIX_BITS: u32 = 64;
/// The answer to a throttled login.
pub(crate) const TOO_MANY: &str = "too many failed logins; wait 15 minutes and try again";
/// The answer when another password check for the same login, session or address is
/// still running.
pub(crate) const IN_PROGRESS: &str =
    "another login attempt is still being checked; wait a moment and try again";
/// Longest value, in characters, of form fields that have a limit; a longer one is
/// refused with 400 before any handler sees it. (The service page's `note` has its
/// own, stricter limit there.)
const FIELD_LIMITS: &[(&str, usize)] = &[
    ("display_name", 100),
    ("email", 254),
    ("phone", 20),
    ("current", 1024),
    ("password", 1024),
    ("password2", 1024),
];

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PasswordError {
    /// The hasher refused (should not happen with default parameters).
    #[error("cannot hash the password: {0}")]
    Hash(String),
    /// The blocking task failed.
    #[error("password hashing task failed: {0}")]
    Task(String),
}

// === passwords ===

/// Checks a login name: 3 to 32 characters of `[a-z0-9._-]`.
pub(crate) fn check_login(login: &str) -> Result<(), String> {
    let ok_chars = login
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
    if !(3..=32).contains(&login.len()) || !ok_chars {
        return Err(
            "the login must be 3 to 32 characters: lower-case letters, digits, '.', '_' or '-'"
                .into(),
        );
    }
    Ok(())
}

/// Checks a new password and its confirmation.
pub(crate) fn check_new_password(password: &str, again: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(format!(
            "the password must be at least {MIN_PASSWORD} characters"
        ));
    }
    if password.len() > MAX_PASSWORD {
        return Err(format!("the password must be at most {MAX_PASSWORD} bytes"));
    }
    if password != again {
        return Err("the two passwords differ".into());
    }
    Ok(())
}

/// Hashes a password with argon2id (the crate's default parameters) and a random salt.
pub(crate) fn hash_password(password: &str) -> Result<String, PasswordError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether a password matches a stored PHC string (false for an unreadable one).
pub(crate) fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the login does not exist, so that the answer takes
/// as long as for a real account.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password("decoy password never matches anything")
            .unwrap_or_else(|_| String::from("$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
    })
}

// === tokens and cookies ===

/// A fresh random token (32 bytes, hex).
pub(crate) fn random_token() -> String {
    hex::encode(crate::random_bytes::<32>())
}

/// What the store keeps of a cookie token.
pub(crate) fn token_hash(token: &str) -> String {
    secret_hash(token.as_bytes())
}

/// Constant-time comparison of a submitted CSRF token with the expected one. An empty
/// expected token never matches.
pub(crate) fn csrf_matches(submitted: &str, expected: &str) -> bool {
    !expected.is_empty()
        && submitted.len() == expected.len()
        && bool::from(submitted.as_bytes().ct_eq(expected.as_bytes()))
}

/// The value of a cookie in the request, if present.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value: HttpOnly, Secure, with the given SameSite and path; `None`
/// for `value` deletes the cookie.
pub(crate) fn set_cookie(
    name: &str,
    value: Option<&str>,
    path: &str,
    same_site: &str,
) -> HeaderValue {
    let text = match value {
        Some(v) => format!("{name}={v}; HttpOnly; Secure; SameSite={same_site}; Path={path}"),
        None => format!("{name}=; HttpOnly; Secure; SameSite={same_site}; Path={path}; Max-Age=0"),
    };
    // Names are constants and values hex: always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The session cookie header for a token.
pub(crate) fn session_cookie(token: Option<&str>) -> (axum::http::HeaderName, HeaderValue) {
    (SET_COOKIE, set_cookie(SESSION_COOKIE, token, "/", "Strict"))
}

/// The client's address, as the HTTP server recorded it: [`ClientAddr`] (the client
/// a trusted proxy names, else the TCP peer), or the bare peer address where a router
/// is served without it (the console's unit tests).
pub(crate) fn client_ip(parts: &Parts) -> Option<IpAddr> {
    ClientAddr::of(&parts.extensions)
}

// === throttling ===

/// What throttling counts an address as: an IPv4 address itself (also when mapped
/// into IPv6), an IPv6 address by its /64, which one customer can rotate through
/// freely.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - IPV6_PREFIX_BITS);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// In-memory throttling state: failures of logins that do not exist (known accounts
/// keep theirs in the store), failures and registrations per address, the password
/// checks in flight, and the hashing permits with their bounded queue.
pub(crate) struct Guard {
    unknown: Mutex<HashMap<String, Lock>>,
    failures: Mutex<Window>,
    registrations: Mutex<Window>,
    in_flight: Mutex<HashSet<Flight>>,
    hashing: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Lock {
    failures: u32,
    locked_until: Option<Millis>,
}

/// Events per address within a sliding window.
#[derive(Default)]
struct Window {
    by_address: HashMap<IpAddr, VecDeque<Millis>>,
}

impl Window {
    fn count(&mut self, ip: IpAddr, window_ms: i64, now: Millis) -> usize {
        let Some(times) = self.by_address.get_mut(&ip) else {
            return 0;
        };
        while times.front().is_some_and(|t| *t <= now - window_ms) {
            times.pop_front();
        }
        let n = times.len();
        if n == 0 {
            self.by_address.remove(&ip);
        }
        n
    }

    fn record(&mut self, ip: IpAddr, cap: usize, now: Millis) {
        if self.by_address.len() >= MAX_TRACKED && !self.by_address.contains_key(&ip) {
            // Forget the address whose latest event is oldest.
            if let Some(oldest) = self
                .by_address
                .iter()
                .min_by_key(|(_, t)| t.back().copied().unwrap_or(Millis::MIN))
                .map(|(ip, _)| *ip)
            {
                self.by_address.remove(&oldest);
            }
        }
        let times = self.by_address.entry(ip).or_default();
        times.push_back(now);
        while times.len() > cap {
            times.pop_front();
        }
    }

    /// Takes back one event recorded at `at`.
    fn unrecord(&mut self, ip: IpAddr, at: Millis) {
        if let Some(times) = self.by_address.get_mut(&ip) {
            if let Some(i) = times.iter().rposition(|t| *t == at) {
                times.remove(i);
            }
            if times.is_empty() {
                self.by_address.remove(&ip);
            }
        }
    }
}

/// What a password check in flight holds, so that a second one for the same thing is
/// refused instead of queued.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Flight {
    /// A login name (existing or not).
    Login(String),
    /// A client address, as [`address_key`] counts it.
    Address(IpAddr),
    /// A session (by the hash of its cookie).
    Session(String),
}

/// Password checks in flight, released when dropped (also when the client goes away
/// and the request is dropped half-way).
pub(crate) struct InFlight<'a> {
    guard: &'a Guard,
    keys: Vec<Flight>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.guard.in_flight);
        for key in &self.keys {
            in_flight.remove(key);
        }
    }
}

/// The password hasher is busy: too many requests already wait for it.
#[derive(Debug, thiserror::Error)]
#[error("the server is busy checking passwords; try again in a moment")]
pub(crate) struct Busy;

/// A place in the hashing queue, given back when dropped.
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the hashing queue, not yet a turn at the hasher.
pub(crate) struct Queued {
    slot: QueueSlot,
    hashing: Arc<Semaphore>,
}

impl Queued {
    /// Waits for a turn at the hasher.
    pub(crate) async fn turn(self) -> Result<Hashing, PasswordError> {
        let permit = self
            .hashing
            .acquire_owned()
            .await
            .map_err(|e| PasswordError::Task(e.to_string()))?;
        Ok(Hashing {
            _permit: permit,
            _slot: self.slot,
        })
    }
}

/// A turn at the password hasher. The hashing itself runs on a blocking thread that
/// owns the turn, so a request dropped half-way cannot start more hashes than there
/// are permits.
pub(crate) struct Hashing {
    _permit: OwnedSemaphorePermit,
    _slot: QueueSlot,
}

impl Hashing {
    /// Verifies a password; `None` as the hash verifies against a decoy so that
    /// unknown logins take as long as known ones. Gives the turn back for a second use.
    pub(crate) async fn verify(
        self,
        password: String,
        phc: Option<String>,
    ) -> Result<(bool, Hashing), PasswordError> {
        tokio::task::spawn_blocking(move || {
            let ok = match phc {
                Some(phc) => verify_password(&password, &phc),
                None => {
                    verify_password(&password, decoy_hash());
                    false
                }
            };
            (ok, self)
        })
        .await
        .map_err(|e| PasswordError::Task(e.to_string()))
    }

    /// Hashes a new password.
    pub(crate) async fn hash(self, password: String) -> Result<String, PasswordError> {
        tokio::task::spawn_blocking(move || {
            let _turn = self;
            hash_password(&password)
        })
        .await
        .map_err(|e| PasswordError::Task(e.to_string()))?
    }
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            unknown: Mutex::new(HashMap::new()),
            failures: Mutex::new(Window::default()),
            registrations: Mutex::new(Window::default()),
            in_flight: Mutex::new(HashSet::new()),
            hashing: Arc::new(Semaphore::new(HASHING_PERMITS)),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guard {
    /// Claims `keys` and the client's address for one password check; `None` if any
    /// of them already has one in flight.
    pub(crate) fn claim(&self, keys: &[Flight], ip: Option<IpAddr>) -> Option<InFlight<'_>> {
        let mut keys = keys.to_vec();
        keys.extend(ip.map(|ip| Flight::Address(address_key(ip))));
        let mut in_flight = lock(&self.in_flight);
        if keys.iter().any(|k| in_flight.contains(k)) {
            return None;
        }
        in_flight.extend(keys.iter().cloned());
        drop(in_flight);
        Some(InFlight { guard: self, keys })
    }

    /// A place in the hashing queue, or [`Busy`] at once when it is full.
    pub(crate) fn queue(&self) -> Result<Queued, Busy> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < HASHING_QUEUE).then_some(n + 1)
            })
            .map_err(|_| Busy)?;
        Ok(Queued {
            slot: QueueSlot(self.queued.clone()),
            hashing: self.hashing.clone(),
        })
    }

    /// [`Guard::claim`] then [`Guard::queue`], as every password form does; when either
    /// says no, the status and message to show on the form instead.
    pub(crate) fn admit(
        &self,
        keys: &[Flight],
        ip: Option<IpAddr>,
    ) -> Result<(InFlight<'_>, Queued), (axum::http::StatusCode, String)> {
        use axum::http::StatusCode;
        let in_flight = self
            .claim(keys, ip)
            .ok_or_else(|| (StatusCode::TOO_MANY_REQUESTS, IN_PROGRESS.to_string()))?;
        let queued = self
            .queue()
            .map_err(|busy| (StatusCode::SERVICE_UNAVAILABLE, busy.to_string()))?;
        Ok((in_flight, queued))
    }

    /// Whether an address has failed too often lately.
    #[cfg(test)]
    pub(crate) fn address_blocked(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        ip.is_some_and(|ip| {
            lock(&self.failures).count(address_key(ip), ADDRESS_WINDOW_MS, now)
                >= MAX_ADDRESS_FAILURES
        })
    }

    /// Counts a login attempt from an address as a failure before its password is
    /// checked (taken back by [`Guard::address_succeeded`]); false, and nothing
    /// counted, if the address has failed too often lately.
    pub(crate) fn begin_address(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        let Some(ip) = ip.map(address_key) else {
            return true;
        };
        let mut window = lock(&self.failures);
        if window.count(ip, ADDRESS_WINDOW_MS, now) >= MAX_ADDRESS_FAILURES {
            return false;
        }
        window.record(ip, MAX_ADDRESS_FAILURES, now);
        true
    }

    /// Takes back the failure [`Guard::begin_address`] counted at `at`: the password
    /// was right, or the attempt was refused before any check.
    pub(crate) fn address_succeeded(&self, ip: Option<IpAddr>, at: Millis) {
        if let Some(ip) = ip {
            lock(&self.failures).unrecord(address_key(ip), at);
        }
    }

    /// Whether a login that has no account is locked (it locks like a real one).
    pub(crate) fn unknown_locked(&self, login: &str, now: Millis) -> bool {
        lock(&self.unknown)
            .get(login)
            .and_then(|l| l.locked_until)
            .is_some_and(|until| until > now)
    }

    /// Counts an attempt on a login that has no account, before its (decoy) check,
    /// exactly as [`crate::store::Store::begin_login`] counts a real one.
    pub(crate) fn begin_unknown(&self, login: &str, now: Millis) -> LoginAttempt {
        let mut unknown = lock(&self.unknown);
        if unknown.len() >= MAX_TRACKED && !unknown.contains_key(login) {
            unknown.retain(|_, l| l.locked_until.is_some_and(|u| u > now));
            if unknown.len() >= MAX_TRACKED {
                unknown.clear();
            }
        }
        let entry = unknown.entry(login.to_string()).or_default();
        if entry.locked_until.is_some_and(|u| u > now) {
            return LoginAttempt::Locked;
        }
        entry.locked_until = None;
        entry.failures += 1;
        let locks = entry.failures >= MAX_ACCOUNT_FAILURES;
        if locks {
            entry.failures = 0;
            entry.locked_until = Some(now + LOCK_MS);
        }
        LoginAttempt::Counted { locks }
    }

    /// How many logins without an account are tracked.
    #[cfg(test)]
    pub(crate) fn tracked_unknown(&self) -> usize {
        lock(&self.unknown).len()
    }

    /// Counts a registration from an address; false if it made too many lately.
    pub(crate) fn may_register(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        let Some(ip) = ip.map(address_key) else {
            return true;
        };
        let mut window = lock(&self.registrations);
        if window.count(ip, REGISTRATION_WINDOW_MS, now) >= MAX_REGISTRATIONS {
            return false;
        }
        window.record(ip, MAX_REGISTRATIONS, now);
        true
    }
}

impl From<PasswordError> for ConsoleError {
    fn from(e: PasswordError) -> Self {
        ConsoleError::Internal(e.to_string())
    }
}

// === extractors ===

/// A signed-in user.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Who.
    pub(crate) user: User,
    /// The session's CSRF token.
    pub(crate) csrf: String,
    /// Hash of the session cookie (to end it).
    pub(crate) token_hash: String,
}

impl Session {
    /// Whether this user may see objects owned by `owner`.
    pub(crate) fn may_see(&self, owner: Option<i64>) -> bool {
        self.user.is_admin() || owner == Some(self.user.id)
    }
}

impl FromRequestParts<ConsoleState> for Session {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Session, ConsoleError> {
        // Looked up once per request: the audit layer resolves it before the handler.
        if let Some(session) = parts.extensions.get::<Session>() {
            return Ok(session.clone());
        }
        let token = cookie(&parts.headers, SESSION_COOKIE).ok_or(ConsoleError::SignIn)?;
        let hash = token_hash(token);
        let record = state
            .store()
            .session(&hash, state.now(), SESSION_IDLE_MS, SESSION_MAX_AGE_MS)?
            .ok_or(ConsoleError::SignIn)?;
        let session = Session {
            user: record.user,
            csrf: record.csrf,
            token_hash: hash,
        };
        parts.extensions.insert(session.clone());
        Ok(session)
    }
}

/// The client's address, when the HTTPS server recorded it (never rejects).
pub(crate) struct ConnectInfoIp(pub(crate) Option<IpAddr>);

impl FromRequestParts<ConsoleState> for ConnectInfoIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &ConsoleState,
    ) -> Result<ConnectInfoIp, Self::Rejection> {
        Ok(ConnectInfoIp(client_ip(parts)))
    }
}

/// A signed-in admin; anyone else gets 403.
#[derive(Debug, Clone)]
pub(crate) struct Admin(pub(crate) Session);

impl FromRequestParts<ConsoleState> for Admin {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Admin, ConsoleError> {
        let session = Session::from_request_parts(parts, state).await?;
        if !session.user.is_admin() {
            return Err(ConsoleError::Forbidden(
                "this page is for administrators".into(),
            ));
        }
        Ok(Admin(session))
    }
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

async fn form_body<T: DeserializeOwned>(
    req: Request,
    state: &ConsoleState,
) -> Result<(String, T), ConsoleError> {
    let bytes = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| ConsoleError::BadRequest(format!("cannot read the form: {e}")))?;
    let csrf: CsrfField = serde_urlencoded::from_bytes(&bytes).map_err(|_| ConsoleError::Csrf)?;
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| ConsoleError::BadRequest(format!("cannot read the form: {e}")))?;
    check_field_lengths(&fields).map_err(ConsoleError::BadRequest)?;
    let form = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| ConsoleError::BadRequest(format!("cannot read the form: {e}")))?;
    Ok((csrf.csrf, form))
}

/// Refuses a form field longer than its limit in [`FIELD_LIMITS`], with a message
/// that names the field.
pub(crate) fn check_field_lengths(fields: &[(String, String)]) -> Result<(), String> {
    for (name, value) in fields {
        let limit = FIELD_LIMITS
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, limit)| *limit);
        if let Some(limit) = limit {
            // Bytes bound characters from above: count only when it could matter.
            if value.len() > limit && value.chars().count() > limit {
                return Err(format!(
                    "the field {name} is too long: at most {limit} characters"
                ));
            }
        }
    }
    Ok(())
}

/// A signed-in user's form, its CSRF token already checked.
pub(crate) struct Posted<T>(pub(crate) Session, pub(crate) T);

impl<T: DeserializeOwned> FromRequest<ConsoleState> for Posted<T> {
    type Rejection = ConsoleError;

    async fn from_request(req: Request, state: &ConsoleState) -> Result<Self, ConsoleError> {
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        let (csrf, form) = form_body(Request::from_parts(parts, body), state).await?;
        if !csrf_matches(&csrf, &session.csrf) {
            return Err(ConsoleError::Csrf);
        }
        Ok(Posted(session, form))
    }
}

/// A form posted without a session (login, registration), its CSRF token checked
/// against the per-browser `herald_csrf` cookie; with the client's address.
pub(crate) struct PublicPosted<T> {
    pub(crate) form: T,
    pub(crate) ip: Option<IpAddr>,
    pub(crate) csrf: String,
}

impl<T: DeserializeOwned> FromRequest<ConsoleState> for PublicPosted<T> {
    type Rejection = ConsoleError;

    async fn from_request(req: Request, state: &ConsoleState) -> Result<Self, ConsoleError> {
        let (parts, body) = req.into_parts();
        let expected = cookie(&parts.headers, CSRF_COOKIE)
            .unwrap_or("")
            .to_string();
        let ip = client_ip(&parts);
        let (csrf, form) = form_body(Request::from_parts(parts, body), state).await?;
        if !csrf_matches(&csrf, &expected) {
            return Err(ConsoleError::Csrf);
        }
        Ok(PublicPosted {
            form,
            ip,
            csrf: expected,
        })
    }
}

/// The per-browser CSRF token of the login and registration forms: the cookie's, or
/// a new one with the header that sets it.
pub(crate) fn browser_csrf(headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match cookie(headers, CSRF_COOKIE) {
        Some(token) if token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (token.to_string(), None)
        }
        _ => {
            let token = random_token();
            let header = set_cookie(CSRF_COOKIE, Some(&token), "/", "Strict");
            (token, Some(header))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("correct horse battery", "not a hash"));
        // Salted: the same password hashes differently.
        assert_ne!(hash, hash_password("correct horse battery").unwrap());
    }

    #[test]
    fn csrf_comparison_needs_an_exact_non_empty_match() {
        assert!(csrf_matches("abc123", "abc123"));
        assert!(!csrf_matches("abc124", "abc123"));
        assert!(!csrf_matches("abc12", "abc123"));
        assert!(!csrf_matches("", ""));
        assert!(!csrf_matches("x", ""));
    }

    #[test]
    fn logins_and_passwords_are_validated() {
        for good in ["ann", "a.b-c_d", "x1y2z3", &"a".repeat(32)] {
            assert!(check_login(good).is_ok(), "{good}");
        }
        for bad in ["ab", "Ann", "a b", "ann!", "", &"a".repeat(33), "ännä"] {
            assert!(check_login(bad).is_err(), "{bad}");
        }
        assert!(check_new_password("0123456789", "0123456789").is_ok());
        assert!(check_new_password("012345678", "012345678").is_err());
        assert!(check_new_password("0123456789", "0123456780").is_err());
        assert!(
            check_new_password(&"x".repeat(MAX_PASSWORD + 1), &"x".repeat(MAX_PASSWORD + 1))
                .is_err()
        );
    }

    #[test]
    fn cookies_are_found_among_several() {
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1; __Host-herald_session=abc"),
        );
        headers.append(COOKIE, HeaderValue::from_static("__Host-herald_csrf=def"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("def"));
        assert_eq!(cookie(&headers, "herald_session"), None);
    }

    #[test]
    fn unknown_logins_lock_at_the_fifth_attempt_until_the_window_passes() {
        let guard = Guard::default();
        for _ in 0..4 {
            assert_eq!(
                guard.begin_unknown("ghost", 1_000),
                LoginAttempt::Counted { locks: false }
            );
            assert!(!guard.unknown_locked("ghost", 1_000));
        }
        assert_eq!(
            guard.begin_unknown("ghost", 1_000),
            LoginAttempt::Counted { locks: true }
        );
        assert_eq!(guard.begin_unknown("ghost", 1_000), LoginAttempt::Locked);
        assert!(guard.unknown_locked("ghost", 1_000));
        assert!(guard.unknown_locked("ghost", 1_000 + LOCK_MS - 1));
        assert!(!guard.unknown_locked("ghost", 1_000 + LOCK_MS));
        assert!(!guard.unknown_locked("other", 1_000));
        // After the lock the count starts again.
        assert_eq!(
            guard.begin_unknown("ghost", 1_000 + LOCK_MS),
            LoginAttempt::Counted { locks: false }
        );
    }

    #[test]
    fn an_address_is_blocked_after_twenty_failures_in_the_window() {
        let guard = Guard::default();
        let ip: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        for i in 0..MAX_ADDRESS_FAILURES as i64 - 1 {
            assert!(guard.begin_address(ip, i));
        }
        assert!(!guard.address_blocked(ip, 100));
        // A right password takes its attempt back.
        assert!(guard.begin_address(ip, 100));
        guard.address_succeeded(ip, 100);
        assert!(!guard.address_blocked(ip, 100));
        assert!(guard.begin_address(ip, 100));
        assert!(guard.address_blocked(ip, 100));
        assert!(!guard.begin_address(ip, 100), "refused, and not counted");
        // The first failures age out of the window.
        assert!(!guard.address_blocked(ip, ADDRESS_WINDOW_MS + 1));
        // Without a known address there is nothing to count.
        assert!(!guard.address_blocked(None, 100));
        assert!(guard.begin_address(None, 100));
    }

    #[test]
    fn ipv6_addresses_count_by_their_slash_64() {
        let guard = Guard::default();
        for i in 0..MAX_ADDRESS_FAILURES {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            assert!(guard.begin_address(Some(ip), 10));
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(guard.address_blocked(Some(same_64), 10));
        assert!(!guard.address_blocked(Some(other_64), 10));
        for i in 0..MAX_REGISTRATIONS {
            let ip: IpAddr = format!("2001:db8:9:9::{:x}", i + 1).parse().unwrap();
            assert!(guard.may_register(Some(ip), 10));
        }
        let ip: IpAddr = "2001:db8:9:9:abcd::7".parse().unwrap();
        assert!(!guard.may_register(Some(ip), 10));
        // IPv4, also mapped into IPv6, counts by the address itself.
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), v4);
        assert_eq!(address_key(v4), v4);
    }

    #[test]
    fn one_check_in_flight_per_login_and_address() {
        let guard = Guard::default();
        let ip: Option<IpAddr> = Some("2001:db8::1".parse().unwrap());
        let neighbour: Option<IpAddr> = Some("2001:db8::2".parse().unwrap());
        let ann = Flight::Login("ann".into());
        let first = guard.claim(std::slice::from_ref(&ann), ip).unwrap();
        assert!(guard.claim(std::slice::from_ref(&ann), None).is_none());
        assert!(guard
            .claim(&[Flight::Login("bob".into())], neighbour)
            .is_none());
        let bob = guard.claim(&[Flight::Login("bob".into())], None).unwrap();
        drop(first);
        assert!(guard.claim(&[ann], neighbour).is_some());
        drop(bob);
    }

    #[tokio::test]
    async fn the_hashing_queue_is_bounded() {
        let guard = Guard::default();
        let places: Vec<Queued> = (0..HASHING_QUEUE).map(|_| guard.queue().unwrap()).collect();
        assert!(guard.queue().is_err());
        drop(places);
        let turn = guard.queue().unwrap().turn().await.unwrap();
        let (ok, turn) = turn
            .verify(
                "x".repeat(12),
                Some(hash_password("x".repeat(12).as_str()).unwrap()),
            )
            .await
            .unwrap();
        assert!(ok);
        assert!(turn.hash("another password".into()).await.is_ok());
        assert_eq!(guard.queued.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn overlong_fields_are_refused_by_name() {
        let field = |name: &str, n: usize| vec![(name.to_string(), "é".repeat(n))];
        assert!(check_field_lengths(&field("display_name", 100)).is_ok());
        let error = check_field_lengths(&field("display_name", 101)).unwrap_err();
        assert!(
            error.contains("display_name") && error.contains("100"),
            "{error}"
        );
        assert!(check_field_lengths(&field("email", 255)).is_err());
        assert!(check_field_lengths(&field("phone", 21)).is_err());
        for password in ["current", "password", "password2"] {
            assert!(check_field_lengths(&field(password, 1024)).is_ok());
            assert!(check_field_lengths(&field(password, 1025)).is_err());
        }
        // Fields without a limit are bounded by the body limit only.
        assert!(check_field_lengths(&field("target", 5000)).is_ok());
    }
}
