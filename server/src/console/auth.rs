//! Who is asking: passwords (argon2id), browser sessions and their cookies, CSRF
//! tokens, login throttling and the extractors that put them in front of handlers.
//!
//! Every state-changing request goes through [`Posted`] (a session's form, its CSRF
//! token checked before the handler runs) or [`PublicPosted`] (login and registration,
//! checked against the per-browser `herald_csrf` cookie), so no handler can forget it.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use herald_shared::token::secret_hash;
use herald_shared::Millis;

use super::{ConsoleError, ConsoleState};
use crate::accounts::User;

/// Session cookie.
pub(crate) const SESSION_COOKIE: &str = "herald_session";
/// Per-browser CSRF cookie of the login and registration forms.
pub(crate) const CSRF_COOKIE: &str = "herald_csrf";
/// Browser-service visit cookie (path `/service/`).
pub(crate) const VISIT_COOKIE: &str = "herald_visit";
/// A session ends after this long without a request.
pub(crate) const SESSION_IDLE_MS: i64 = 12 * 3600 * 1000;
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
/// The answer to a throttled login.
pub(crate) const TOO_MANY: &str = "too many failed logins; wait 15 minutes and try again";

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

/// The client's address, when the HTTPS server recorded it.
pub(crate) fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

// === throttling ===

/// In-memory throttling state: failures of logins that do not exist (known accounts
/// keep theirs in the store), failures and registrations per address, and the
/// hashing permits.
pub(crate) struct Guard {
    unknown: Mutex<HashMap<String, Lock>>,
    failures: Mutex<Window>,
    registrations: Mutex<Window>,
    hashing: Semaphore,
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
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            unknown: Mutex::new(HashMap::new()),
            failures: Mutex::new(Window::default()),
            registrations: Mutex::new(Window::default()),
            hashing: Semaphore::new(HASHING_PERMITS),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guard {
    /// Whether an address has failed too often lately.
    pub(crate) fn address_blocked(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        ip.is_some_and(|ip| {
            lock(&self.failures).count(ip, ADDRESS_WINDOW_MS, now) >= MAX_ADDRESS_FAILURES
        })
    }

    /// Counts a failed login from an address.
    pub(crate) fn address_failed(&self, ip: Option<IpAddr>, now: Millis) {
        if let Some(ip) = ip {
            lock(&self.failures).record(ip, MAX_ADDRESS_FAILURES, now);
        }
    }

    /// Whether a login that has no account is locked (it locks like a real one).
    pub(crate) fn unknown_locked(&self, login: &str, now: Millis) -> bool {
        lock(&self.unknown)
            .get(login)
            .and_then(|l| l.locked_until)
            .is_some_and(|until| until > now)
    }

    /// Counts a failed login for a login that has no account.
    pub(crate) fn unknown_failed(&self, login: &str, now: Millis) {
        let mut unknown = lock(&self.unknown);
        if unknown.len() >= MAX_TRACKED && !unknown.contains_key(login) {
            unknown.retain(|_, l| l.locked_until.is_some_and(|u| u > now));
            if unknown.len() >= MAX_TRACKED {
                unknown.clear();
            }
        }
        let entry = unknown.entry(login.to_string()).or_default();
        if entry.locked_until.is_some_and(|u| u <= now) {
            entry.locked_until = None;
        }
        entry.failures += 1;
        if entry.failures >= MAX_ACCOUNT_FAILURES {
            entry.failures = 0;
            entry.locked_until = Some(now + LOCK_MS);
        }
    }

    /// Counts a registration from an address; false if it made too many lately.
    pub(crate) fn may_register(&self, ip: Option<IpAddr>, now: Millis) -> bool {
        let Some(ip) = ip else { return true };
        let mut window = lock(&self.registrations);
        if window.count(ip, REGISTRATION_WINDOW_MS, now) >= MAX_REGISTRATIONS {
            return false;
        }
        window.record(ip, MAX_REGISTRATIONS, now);
        true
    }

    /// Hashes a password off the async threads, a few at a time.
    pub(crate) async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| PasswordError::Task(e.to_string()))?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| PasswordError::Task(e.to_string()))?
    }

    /// Verifies a password off the async threads; `None` as the hash verifies against
    /// a decoy so that unknown logins take as long as known ones.
    pub(crate) async fn verify(&self, password: String, phc: Option<String>) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match phc {
            Some(phc) => verify_password(&password, &phc),
            None => {
                verify_password(&password, decoy_hash());
                false
            }
        })
        .await
        .unwrap_or(false)
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
        let token = cookie(&parts.headers, SESSION_COOKIE).ok_or(ConsoleError::SignIn)?;
        let hash = token_hash(token);
        let record = state
            .store()
            .session(&hash, state.now(), SESSION_IDLE_MS)?
            .ok_or(ConsoleError::SignIn)?;
        Ok(Session {
            user: record.user,
            csrf: record.csrf,
            token_hash: hash,
        })
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
    let form = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| ConsoleError::BadRequest(format!("cannot read the form: {e}")))?;
    Ok((csrf.csrf, form))
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
        headers.append(COOKIE, HeaderValue::from_static("a=1; herald_session=abc"));
        headers.append(COOKIE, HeaderValue::from_static("herald_csrf=def"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("def"));
        assert_eq!(cookie(&headers, VISIT_COOKIE), None);
    }

    #[test]
    fn unknown_logins_lock_after_five_failures_until_the_window_passes() {
        let guard = Guard::default();
        for _ in 0..4 {
            guard.unknown_failed("ghost", 1_000);
            assert!(!guard.unknown_locked("ghost", 1_000));
        }
        guard.unknown_failed("ghost", 1_000);
        assert!(guard.unknown_locked("ghost", 1_000));
        assert!(guard.unknown_locked("ghost", 1_000 + LOCK_MS - 1));
        assert!(!guard.unknown_locked("ghost", 1_000 + LOCK_MS));
        assert!(!guard.unknown_locked("other", 1_000));
    }

    #[test]
    fn an_address_is_blocked_after_twenty_failures_in_the_window() {
        let guard = Guard::default();
        let ip: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        for i in 0..MAX_ADDRESS_FAILURES as i64 - 1 {
            guard.address_failed(ip, i);
        }
        assert!(!guard.address_blocked(ip, 100));
        guard.address_failed(ip, 100);
        assert!(guard.address_blocked(ip, 100));
        // The first failures age out of the window.
        assert!(!guard.address_blocked(ip, ADDRESS_WINDOW_MS + 1));
        // Without a known address there is nothing to count.
        assert!(!guard.address_blocked(None, 100));
    }
}
