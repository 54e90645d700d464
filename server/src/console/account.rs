//! Registration, login, logout and the account page.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::auth::{self, ConnectInfoIp, Flight, Posted, PublicPosted, Session};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout, MessagePage};
use crate::forward::check_target;
use crate::model::{LoginAttempt, Role, User};
use crate::store::StoreError;

/// Longest display name.
const MAX_NAME: usize = 100;
/// The answer to a wrong login or password (the same for both).
const WRONG_LOGIN: &str = "wrong login or password";

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    layout: Layout,
    csrf: String,
    login: String,
    error: Option<String>,
    registration: bool,
}

#[derive(Template)]
#[template(path = "register.html")]
struct RegisterPage {
    layout: Layout,
    csrf: String,
    login: String,
    email: String,
    phone: String,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    layout: Layout,
    user: User,
    display_name: String,
    email: String,
    phone: String,
    error: Option<String>,
    notice: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LoginForm {
    login: String,
    password: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RegisterForm {
    login: String,
    password: String,
    password2: String,
    email: String,
    phone: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct DetailsForm {
    display_name: String,
    email: String,
    phone: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct PasswordForm {
    current: String,
    password: String,
    password2: String,
}

/// A form with nothing but its CSRF token.
#[derive(Deserialize, Default)]
pub(super) struct NoFields {}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct AccountQuery {
    saved: Option<String>,
    password: Option<String>,
}

fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
    if let Some(cookie) = cookie {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
    response
}

/// Starts a session for a user; returns the cookie that carries it.
async fn start_session(state: &ConsoleState, user_id: i64) -> ConsoleResult<HeaderValue> {
    let token = auth::random_token();
    state.store().create_session(
        &auth::token_hash(&token),
        user_id,
        &auth::random_token(),
        state.now(),
        auth::SESSION_IDLE_MS,
        auth::SESSION_MAX_AGE_MS,
    )?;
    Ok(auth::session_cookie(Some(&token)).1)
}

/// `GET /`.
pub(super) async fn home(session: Result<Session, ConsoleError>) -> Response {
    match session {
        Ok(_) => see_other("/devices"),
        Err(_) => see_other("/login"),
    }
}

// === login ===

/// `GET /login`.
pub(super) async fn login_form(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    let (csrf, cookie) = auth::browser_csrf(&headers);
    let page = LoginPage {
        layout: Layout::anonymous(),
        csrf,
        login: String::new(),
        error: None,
        registration: state.settings.registration,
    };
    with_cookie(render(StatusCode::OK, &page), cookie)
}

/// `POST /login`.
///
/// Every attempt is counted as a failure, for its login and its address, before its
/// password is checked, and taken back only when the password proves right; at most
/// one attempt per login and per address is checked at a time. So attempts sent in
/// parallel get no more password checks than attempts sent one after another.
pub(super) async fn login(
    State(state): State<ConsoleState>,
    posted: PublicPosted<LoginForm>,
) -> ConsoleResult {
    let actor = super::audit::login_actor(&posted.form.login);
    let ip = posted.ip;
    let result = check_login(&state, posted).await;
    super::audit::record(&state, actor, ip, "console.login", "/login", result)
}

/// Signs in if the password is right (see [`login`]).
async fn check_login(state: &ConsoleState, posted: PublicPosted<LoginForm>) -> ConsoleResult {
    let login = posted.form.login.trim().to_lowercase();
    let again = |status: StatusCode, error: &str| {
        render(
            status,
            &LoginPage {
                layout: Layout::anonymous(),
                csrf: posted.csrf.clone(),
                login: login.clone(),
                error: Some(error.to_string()),
                registration: state.settings.registration,
            },
        )
    };
    let wrong = || again(StatusCode::UNAUTHORIZED, WRONG_LOGIN);
    let too_many = || Ok(again(StatusCode::TOO_MANY_REQUESTS, auth::TOO_MANY));
    // A login that no account can have is wrong without touching any throttling
    // state, so junk cannot fill the guard's memory.
    if auth::check_login(&login).is_err() {
        return Ok(wrong());
    }
    let guard = &state.guard;
    let now = state.now();
    let (_in_flight, queued) = match guard.admit(&[Flight::Login(login.clone())], posted.ip) {
        Ok(admitted) => admitted,
        Err((status, message)) => return Ok(again(status, &message)),
    };
    if !guard.begin_address(posted.ip, now) {
        return too_many();
    }
    let credentials = state.store().credentials(&login)?;
    let attempt = match &credentials {
        Some(c) => {
            state
                .store()
                .begin_login(c.user.id, auth::MAX_ACCOUNT_FAILURES, auth::LOCK_MS, now)?
        }
        None => guard.begin_unknown(&login, now),
    };
    let LoginAttempt::Counted { locks } = attempt else {
        guard.address_succeeded(posted.ip, now);
        return too_many();
    };
    let turn = queued.turn().await?;
    // Locked by another attempt while this one waited for its turn: refuse unchecked.
    let locked_meanwhile = !locks
        && match &credentials {
            Some(c) => state.store().login_locked(c.user.id, state.now())?,
            None => guard.unknown_locked(&login, state.now()),
        };
    if locked_meanwhile {
        return too_many();
    }
    let phc = credentials.as_ref().map(|c| c.password_hash.clone());
    let (ok, _turn) = turn.verify(posted.form.password.clone(), phc).await?;
    match credentials {
        Some(c) if ok => {
            if !state
                .store()
                .login_succeeded(c.user.id, locks, state.now())?
            {
                return too_many();
            }
            guard.address_succeeded(posted.ip, now);
            let cookie = start_session(state, c.user.id).await?;
            Ok(with_cookie(see_other("/devices"), Some(cookie)))
        }
        _ => Ok(wrong()),
    }
}

/// `POST /logout`.
pub(super) async fn logout(
    State(state): State<ConsoleState>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    state.store().end_session(&session.token_hash)?;
    Ok(with_cookie(
        see_other("/login"),
        Some(auth::session_cookie(None).1),
    ))
}

// === registration ===

fn registration_closed() -> Response {
    render(
        StatusCode::FORBIDDEN,
        &MessagePage {
            layout: Layout::anonymous(),
            page: "register".into(),
            title: "Registration is closed".into(),
            message:
                "This server does not take new registrations; ask an administrator for an account."
                    .into(),
            is_error: true,
        },
    )
}

/// `GET /register`.
pub(super) async fn register_form(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
) -> Response {
    if !state.settings.registration {
        return registration_closed();
    }
    let (csrf, cookie) = auth::browser_csrf(&headers);
    let page = RegisterPage {
        layout: Layout::anonymous(),
        csrf,
        login: String::new(),
        email: String::new(),
        phone: String::new(),
        error: None,
    };
    with_cookie(render(StatusCode::OK, &page), cookie)
}

/// `POST /register`.
pub(super) async fn register(
    State(state): State<ConsoleState>,
    posted: PublicPosted<RegisterForm>,
) -> ConsoleResult {
    let actor = super::audit::login_actor(&posted.form.login);
    let ip = posted.ip;
    let result = create_account(&state, posted).await;
    super::audit::record(&state, actor, ip, "console.register", "/register", result)
}

/// Creates the account (see [`register`]).
async fn create_account(state: &ConsoleState, posted: PublicPosted<RegisterForm>) -> ConsoleResult {
    if !state.settings.registration {
        return Ok(registration_closed());
    }
    let form = &posted.form;
    let login = form.login.trim().to_string();
    let email = form.email.trim().to_string();
    let phone = form.phone.trim().to_string();
    let again = |status: StatusCode, error: String| {
        render(
            status,
            &RegisterPage {
                layout: Layout::anonymous(),
                csrf: posted.csrf.clone(),
                login: login.clone(),
                email: email.clone(),
                phone: phone.clone(),
                error: Some(error),
            },
        )
    };
    let checked = auth::check_login(&login)
        .and_then(|()| auth::check_new_password(&form.password, &form.password2))
        .and_then(|()| match email.as_str() {
            "" => Ok(()),
            e => check_target("email", e, false),
        })
        .and_then(|()| match phone.as_str() {
            "" => Ok(()),
            p => check_target("sms", p, false),
        });
    if let Err(error) = checked {
        return Ok(again(StatusCode::BAD_REQUEST, error));
    }
    let now = state.now();
    let guard = &state.guard;
    let (_in_flight, queued) = match guard.admit(&[], posted.ip) {
        Ok(admitted) => admitted,
        Err((status, message)) => return Ok(again(status, message)),
    };
    if !guard.may_register(posted.ip, now) {
        return Ok(again(
            StatusCode::TOO_MANY_REQUESTS,
            "too many registrations from your address; try again later".into(),
        ));
    }
    let hash = queued.turn().await?.hash(form.password.clone()).await?;
    let id = match state
        .store()
        .add_user(&login, &hash, Role::User, &email, &phone, now)
    {
        Ok(id) => id,
        Err(StoreError::Conflict(_)) => {
            return Ok(again(
                StatusCode::BAD_REQUEST,
                format!("the login {login} is taken; choose another"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let cookie = start_session(state, id).await?;
    Ok(with_cookie(see_other("/devices"), Some(cookie)))
}

// === account ===

fn account_page(
    session: &Session,
    user: User,
    error: Option<String>,
    notice: Option<&str>,
) -> AccountPage {
    AccountPage {
        layout: Layout::of(session),
        display_name: user.display_name.clone(),
        email: user.email.clone(),
        phone: user.phone.clone(),
        user,
        error,
        notice: notice.map(str::to_string),
    }
}

/// `GET /account`.
pub(super) async fn show(session: Session, Query(q): Query<AccountQuery>) -> Response {
    let notice = if q.password.is_some() {
        Some("Password changed; other browsers were logged out.")
    } else if q.saved.is_some() {
        Some("Saved.")
    } else {
        None
    };
    let page = account_page(&session, session.user.clone(), None, notice);
    render(StatusCode::OK, &page)
}

/// `POST /account`.
pub(super) async fn update(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<DetailsForm>,
) -> ConsoleResult {
    let name = form.display_name.trim().to_string();
    let email = form.email.trim().to_string();
    let phone = form.phone.trim().to_string();
    let checked = if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        Err(format!(
            "the name must be at most {MAX_NAME} characters, on one line"
        ))
    } else if !email.is_empty() {
        check_target("email", &email, false)
    } else {
        Ok(())
    }
    .and_then(|()| match phone.as_str() {
        "" => Ok(()),
        p => check_target("sms", p, false),
    });
    if let Err(error) = checked {
        let mut page = account_page(&session, session.user.clone(), Some(error), None);
        page.display_name = name;
        page.email = email;
        page.phone = phone;
        return Ok(render(StatusCode::BAD_REQUEST, &page));
    }
    state
        .store()
        .update_user_details(session.user.id, &name, &email, &phone)?;
    Ok(see_other("/account?saved=1"))
}

/// `POST /account/password`: ends every session of the account, then starts a new
/// one for this browser. A wrong current password counts as a failed login (for the
/// account and the address) and can lock the account.
pub(super) async fn change_password(
    State(state): State<ConsoleState>,
    ConnectInfoIp(ip): ConnectInfoIp,
    Posted(session, form): Posted<PasswordForm>,
) -> ConsoleResult {
    let again = |status: StatusCode, error: String| {
        render(
            status,
            &account_page(&session, session.user.clone(), Some(error), None),
        )
    };
    let too_many = || Ok(again(StatusCode::TOO_MANY_REQUESTS, auth::TOO_MANY.into()));
    // Checked first: a new password that would be refused costs no hashing.
    if let Err(error) = auth::check_new_password(&form.password, &form.password2) {
        return Ok(again(StatusCode::BAD_REQUEST, error));
    }
    let guard = &state.guard;
    let user = session.user.id;
    let now = state.now();
    let keys = [
        Flight::Session(session.token_hash.clone()),
        Flight::Login(session.user.login.clone()),
    ];
    let (_in_flight, queued) = match guard.admit(&keys, ip) {
        Ok(admitted) => admitted,
        Err((status, message)) => return Ok(again(status, message)),
    };
    if !guard.begin_address(ip, now) {
        return too_many();
    }
    let LoginAttempt::Counted { locks } =
        state
            .store()
            .begin_login(user, auth::MAX_ACCOUNT_FAILURES, auth::LOCK_MS, now)?
    else {
        guard.address_succeeded(ip, now);
        return too_many();
    };
    let turn = queued.turn().await?;
    if !locks && state.store().login_locked(user, state.now())? {
        return too_many();
    }
    let stored = state.store().password_hash(user)?;
    let (ok, turn) = turn.verify(form.current.clone(), Some(stored)).await?;
    if !ok {
        return Ok(again(
            StatusCode::BAD_REQUEST,
            "the current password is wrong".into(),
        ));
    }
    if !state.store().login_succeeded(user, locks, state.now())? {
        return too_many();
    }
    guard.address_succeeded(ip, now);
    let hash = turn.hash(form.password.clone()).await?;
    state.store().set_password(user, &hash)?;
    let cookie = start_session(&state, user).await?;
    Ok(with_cookie(see_other("/account?password=1"), Some(cookie)))
}
