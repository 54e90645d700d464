//! The forwarding page: a user's forwarding rules and their delivery log. Adding a
//! rule (at most `model::MAX_RULES`); an e-mail or SMS rule then waits, forwarding
//! nothing, until its owner enters the code the server sent through it (or asks for a
//! new one); deleting a rule. Another user's rule answers 404, exactly like one that
//! does not exist. The rules themselves are kept by `store::forwarding`.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::account::NoFields;
use super::auth::{Posted, Session};
use super::pages::path_id;
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::forward::check_target;
use crate::model::Delivery;
use crate::model::Subscription;
use crate::model::{Destination, NewDestination, Verdict};
use crate::store::RuleError;

/// Deliveries the forwarding page shows.
const DELIVERY_LIMIT: u32 = 100;

#[derive(Template)]
#[template(path = "forwarding.html")]
struct ForwardingPage {
    layout: Layout,
    destinations: Vec<Destination>,
    deliveries: Vec<Delivery>,
    subscriptions: Vec<Subscription>,
    form: ForwardForm,
    secret: Option<String>,
    error: Option<String>,
    /// The error is about a rule in the list (a code), not the form to add one.
    error_about_rule: bool,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub(super) struct ForwardForm {
    kind: String,
    target: String,
    only_failures: String,
    subscription: String,
}

/// The code entered for an unconfirmed rule.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct CodeForm {
    code: String,
}

/// What to show besides the page's own data.
#[derive(Default)]
struct Extra {
    form: Option<ForwardForm>,
    secret: Option<String>,
    error: Option<String>,
    error_about_rule: bool,
}

fn forwarding_page(
    state: &ConsoleState,
    session: &Session,
    extra: Extra,
) -> ConsoleResult<ForwardingPage> {
    let user = session.user.id;
    Ok(ForwardingPage {
        layout: Layout::of(session),
        destinations: state.store().destinations(user)?,
        deliveries: state.store().user_deliveries(user, DELIVERY_LIMIT)?,
        subscriptions: state.store().service_subscriptions(Some(user))?,
        form: extra.form.unwrap_or_else(|| ForwardForm {
            kind: "email".into(),
            ..ForwardForm::default()
        }),
        secret: extra.secret,
        error: extra.error,
        error_about_rule: extra.error_about_rule,
    })
}

/// The page again with a message about one of the rules, as a `400`.
fn rule_error(state: &ConsoleState, session: &Session, error: String) -> ConsoleResult {
    let extra = Extra {
        error: Some(error),
        error_about_rule: true,
        ..Extra::default()
    };
    let page = forwarding_page(state, session, extra)?;
    Ok(render(StatusCode::BAD_REQUEST, &page))
}

/// `GET /forwarding`. A webhook secret made by the previous POST is shown once.
pub(super) async fn forwarding(
    State(state): State<ConsoleState>,
    session: Session,
) -> ConsoleResult {
    let extra = Extra {
        secret: state.flash().remove(&session.token_hash),
        ..Extra::default()
    };
    let page = forwarding_page(&state, &session, extra)?;
    Ok(render(StatusCode::OK, &page))
}

/// `POST /forwarding`: adds a rule. A webhook's secret is shown on the next view; an
/// e-mail or SMS rule starts unconfirmed, and the forwarder sends its code.
pub(super) async fn add_forwarding(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<ForwardForm>,
) -> ConsoleResult {
    let kind = form.kind.trim();
    let target = form.target.trim();
    let mut problem = check_target(kind, target, state.allow_http_webhooks).err();
    let schedule_id = match form.subscription.trim() {
        "" => None,
        text => {
            let own = text.parse::<i64>().ok().and_then(|id| {
                state
                    .store()
                    .service_subscription(id)
                    .ok()
                    .filter(|s| s.owner_user_id == session.user.id)
            });
            match own {
                Some(s) => Some(s.id),
                None => {
                    problem.get_or_insert_with(|| "choose one of your subscriptions".into());
                    None
                }
            }
        }
    };
    let secret = (kind == "webhook").then(super::auth::random_token);
    if problem.is_none() {
        let added = state.store().add_destination(
            &NewDestination {
                user_id: session.user.id,
                schedule_id,
                kind,
                target,
                secret: secret.as_deref(),
                only_failures: form.only_failures == "1",
            },
            state.now(),
        );
        match added {
            Ok(_) => {}
            Err(RuleError::Store(e)) => return Err(e.into()),
            Err(e) => problem = Some(e.to_string()),
        }
    }
    if let Some(error) = problem {
        let extra = Extra {
            form: Some(form.clone()),
            error: Some(error),
            ..Extra::default()
        };
        let page = forwarding_page(&state, &session, extra)?;
        return Ok(render(StatusCode::BAD_REQUEST, &page));
    }
    if let Some(secret) = secret {
        state.flash().insert(session.token_hash.clone(), secret);
    }
    Ok(see_other("/forwarding"))
}

/// `POST /forwarding/{id}/confirm`: the code sent for an e-mail or SMS rule. The
/// owner's only; a wrong code is counted, and the fifth voids it.
pub(super) async fn confirm_forwarding(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, form): Posted<CodeForm>,
) -> ConsoleResult {
    let verdict = state.store().confirm_destination(
        session.user.id,
        path_id(&id)?,
        &form.code,
        state.now(),
    )?;
    match verdict {
        Verdict::Confirmed => Ok(see_other("/forwarding")),
        other => rule_error(&state, &session, other.message()),
    }
}

/// `POST /forwarding/{id}/resend`: asks for a new code for an unconfirmed rule (the
/// owner's only; a few an hour).
pub(super) async fn resend_code(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let requested =
        state
            .store()
            .request_confirmation_code(session.user.id, path_id(&id)?, state.now());
    match requested {
        Ok(()) => Ok(see_other("/forwarding")),
        Err(RuleError::Store(e)) => Err(ConsoleError::Store(e)),
        Err(e) => rule_error(&state, &session, e.to_string()),
    }
}

/// `POST /forwarding/{id}/delete`: the owner's only.
pub(super) async fn delete_forwarding(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    state
        .store()
        .remove_destination(session.user.id, path_id(&id)?)?;
    Ok(see_other("/forwarding"))
}
