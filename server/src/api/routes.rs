//! Every API route in one table: its method and path, who may call it (an admin-token
//! scope, a vendor's or sender's own token, or no one's), its audit action and a
//! summary. The router, the authentication layer, the audit log and the OpenAPI
//! document are all built from this table, so a route cannot exist without declaring
//! its scope.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;

use herald_shared::token::secret_hash;

use super::*;
use crate::model::{AuditEvent, Scope};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (health, artifacts by hash, the API description).
    Public,
    /// The SMS gateway, with `[sms] report_secret` (the handler checks it).
    Gateway,
    /// An admin token whose scope includes this one.
    Scope(Scope),
    /// As [`Access::Scope`], or a vendor's token (for its own releases).
    ScopeOrVendor(Scope),
    /// As [`Access::Scope`], or a sender's token (for its own messages).
    ScopeOrSender(Scope),
}

impl Access {
    /// The admin scope the route needs, if it takes admin tokens.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Access::Public | Access::Gateway => None,
            Access::Scope(s) | Access::ScopeOrVendor(s) | Access::ScopeOrSender(s) => Some(s),
        }
    }
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: &'static str,
    /// Path as axum matches it (`{param}` for a path segment).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Dotted name: the audit log's action and the OpenAPI operation id.
    pub action: &'static str,
    /// One line for people.
    pub summary: &'static str,
    /// The body streams to disk without the API's body limit (artifacts, lists).
    pub streams: bool,
    /// The JSON body's schema, for the OpenAPI description.
    pub body: Option<
        fn(&mut super::openapi::Components) -> utoipa::openapi::RefOr<utoipa::openapi::Schema>,
    >,
}

impl RouteSpec {
    /// Whether calling it may change something: such calls are audited.
    pub fn changes(&self) -> bool {
        self.method != "GET"
    }
}

macro_rules! api_routes {
    ($( $method:ident $path:literal $access:expr, $action:literal, $summary:literal $([$body:ty])? $(, $streams:ident)? => $handler:expr; )*) => {
        /// Every API route.
        pub const ROUTES: &[RouteSpec] = &[$(RouteSpec {
            method: stringify!($method),
            path: $path,
            access: $access,
            action: $action,
            summary: $summary,
            streams: api_routes!(@streams $($streams)?),
            body: api_routes!(@body $($body)?),
        }),*];

        /// Adds every route of [`ROUTES`] with its handler.
        fn add_routes(mut router: Router<ApiState>) -> Router<ApiState> {
            $(
                let method_router = on(MethodFilter::$method, $handler);
                let method_router = if api_routes!(@streams $($streams)?) {
                    method_router.layer(axum::extract::DefaultBodyLimit::disable())
                } else {
                    method_router
                };
                router = router.route($path, method_router);
            )*
            router
        }
    };
    (@streams streams) => { true };
    (@streams) => { false };
    (@body $body:ty) => { Some(super::openapi::json_body::<$body>) };
    (@body) => { None };
}

use Access::{Gateway, Public, ScopeOrSender, ScopeOrVendor};
use Scope::{Admin, Billing, Jobs, Messages, Metrics, Packages, Read};

const fn scope(s: Scope) -> Access {
    Access::Scope(s)
}

api_routes! {
    GET "/healthz" Public, "health.live", "The process is up." => || async { Json(serde_json::json!({"ok": true})) };
    GET "/readyz" Public, "health.ready", "The database takes writes and the QUIC endpoint serves; 503 with reasons otherwise." => readyz;
    GET "/api/v1/health" Public, "health.api", "The API answers." => || async { Json(serde_json::json!({"ok": true})) };
    GET "/api/v1/openapi.json" Public, "api.describe", "This API's OpenAPI description." => super::openapi::serve;
    GET "/metrics" scope(Metrics), "metrics.read", "Prometheus metrics." => metrics;

    GET "/api/v1/admin-tokens" scope(Admin), "admin_tokens.list", "Admin tokens (never their secrets)." => super::admin::list_admin_tokens;
    POST "/api/v1/admin-tokens" scope(Admin), "admin_tokens.create", "Create a scoped admin token from the hash of its secret." [crate::model::CreateAdminToken] => super::admin::create_admin_token;
    DELETE "/api/v1/admin-tokens/{id}" scope(Admin), "admin_tokens.revoke", "Revoke an admin token." => super::admin::revoke_admin_token;
    GET "/api/v1/audit" scope(Read), "audit.list", "Audit log entries, oldest first." => super::admin::list_audit;
    GET "/api/v1/audit/verify" scope(Read), "audit.verify", "Check the audit log's hash chain." => super::admin::verify_audit;

    GET "/api/v1/tokens" scope(Read), "tokens.list", "Enrollment tokens that can still enroll." => list_tokens;
    POST "/api/v1/tokens" scope(Admin), "tokens.create", "Create an enrollment token from the hash of its secret." [crate::model::CreateToken] => create_token;
    DELETE "/api/v1/tokens/{id}" scope(Admin), "tokens.revoke", "Revoke an enrollment token." => revoke_token;

    GET "/api/v1/agents" scope(Read), "agents.list", "Enrolled agents." => list_agents;
    GET "/api/v1/agents/{agent}" scope(Read), "agents.show", "One agent, with its address history." => show_agent;
    POST "/api/v1/agents/{agent}/revoke" scope(Admin), "agents.revoke", "Revoke an agent and cut it off." => revoke_agent;
    POST "/api/v1/agents/{agent}/membership" scope(Admin), "groups.set", "Set an agent's groups with an operator-signed membership." [crate::model::SetMembership] => set_membership;

    GET "/api/v1/jobs" scope(Read), "jobs.list", "Jobs, newest first, by page." => list_jobs;
    POST "/api/v1/jobs" scope(Jobs), "jobs.create", "Create jobs from an operator-signed order." [crate::model::CreateJobs] => create_jobs;
    GET "/api/v1/jobs/{job}" scope(Read), "jobs.show", "One job, optionally waiting for it to finish." => show_job;
    GET "/api/v1/schedules" scope(Read), "schedules.list", "Schedules." => list_schedules;
    POST "/api/v1/schedules" scope(Jobs), "schedules.create", "Create a schedule from an operator-signed standing order." [crate::model::CreateSchedule] => create_schedule;
    DELETE "/api/v1/schedules/{id}" scope(Jobs), "schedules.remove", "Remove a schedule." => remove_schedule;
    GET "/api/v1/catalog" scope(Read), "catalog.list", "Programs and browser services users may subscribe to." => super::catalog::list_entries;
    POST "/api/v1/catalog" scope(Jobs), "catalog.add", "Add a catalog entry from an operator-signed order." [crate::model::CreateCatalogEntry] => super::catalog::create_entry;
    DELETE "/api/v1/catalog/{name}" scope(Jobs), "catalog.remove", "Remove a catalog entry." => super::catalog::remove_entry;

    GET "/api/v1/vendors" scope(Read), "vendors.list", "Vendors and their delegations." => releases::list_vendors;
    POST "/api/v1/vendors" scope(Packages), "vendors.create", "Register a vendor with an operator-signed delegation." [crate::model::CreateVendor] => releases::create_vendor;
    GET "/api/v1/releases" ScopeOrVendor(Read), "releases.list", "Releases." => releases::list_releases;
    POST "/api/v1/releases" ScopeOrVendor(Packages), "releases.publish", "Publish signed release metadata." [crate::model::CreateRelease] => releases::create_release;
    GET "/api/v1/releases/{id}" scope(Read), "releases.show", "One release." => releases::show_release;
    PUT "/api/v1/releases/{id}/artifact" ScopeOrVendor(Packages), "releases.upload", "Upload a release's artifact (streamed, checked against its metadata).", streams => releases::upload_artifact;
    GET "/install.sh" Public, "install.script", "The agent's one-line installer (text/x-shellscript), with this server's URL and certificate pin filled in." => install::script;
    GET "/api/v1/install/agent" Public, "install.list", "The newest operator-signed herald-agent package per format and platform, one text line each." => install::list;
    GET "/api/v1/artifacts/{sha256}" Public, "artifacts.download", "Download an artifact by its SHA-256 (agents check it against signed metadata)." => releases::download_artifact;
    GET "/api/v1/subscriptions" scope(Read), "subscriptions.list", "Package subscriptions." => releases::list_subscriptions;
    POST "/api/v1/subscriptions" scope(Packages), "subscriptions.create", "Subscribe an audience to a package." [crate::model::CreateSubscription] => releases::create_subscription;
    DELETE "/api/v1/subscriptions/{id}" scope(Packages), "subscriptions.remove", "Remove a package subscription." => releases::remove_subscription;
    POST "/api/v1/installs" scope(Packages), "packages.install", "Install a release now on an audience." [crate::model::CreateJobs] => releases::create_installs;
    GET "/api/v1/rollouts" scope(Read), "rollouts.list", "Rollouts." => releases::list_rollouts;
    GET "/api/v1/rollouts/{id}" scope(Read), "rollouts.show", "One rollout and its waves." => releases::show_rollout;
    POST "/api/v1/rollouts/{id}/{verb}" scope(Packages), "rollouts.control", "Pause, resume or abort a rollout." => releases::control_rollout;

    GET "/api/v1/clubs" scope(Read), "clubs.list", "Clubs users made, with their member counts." => super::clubs::list_clubs;
    GET "/api/v1/clubs/{name}" scope(Read), "clubs.show", "One club and its members." => super::clubs::show_club;
    DELETE "/api/v1/clubs/{name}/members/{login}" scope(Admin), "clubs.remove_member", "Remove a member from a club (not its last owner while others remain)." => super::clubs::remove_member;
    GET "/api/v1/directory" scope(Read), "directory.list", "The online devices and shares a user (?user=LOGIN, or nobody) may reach, filtered by ?q=." => super::clubs::directory;
    GET "/api/v1/nodes" scope(Read), "nodes.list", "The live nodes of this server's cluster (one on SQLite): addresses, heartbeat, leader roles and agents held." => super::nodes;
    GET "/api/v1/sessions" scope(Read), "sessions.list", "Tunnel sessions the relay recorded, newest first (?agent=ID for one providing agent, ?limit=N up to 10,000)." => super::clubs::sessions;

    GET "/api/v1/senders" ScopeOrSender(Read), "senders.list", "Message senders." => messages::list_senders;
    POST "/api/v1/senders" scope(Messages), "senders.create", "Register a sender with an operator-signed grant." [crate::model::CreateSender] => messages::create_sender;
    DELETE "/api/v1/senders/{name}" scope(Messages), "senders.remove", "Remove a sender." => messages::remove_sender;
    POST "/api/v1/senders/{name}/users" scope(Messages), "senders.link", "Let a console user act for a sender." [crate::model::SenderLink] => messages::link_sender;
    GET "/api/v1/grants/{key}" ScopeOrSender(Read), "grants.show", "The grant of a sender key." => messages::show_grant;
    GET "/api/v1/messages" ScopeOrSender(Read), "messages.list", "Messages." => messages::list_messages;
    POST "/api/v1/messages" ScopeOrSender(Messages), "messages.send", "Send a sender-signed message to an audience." [crate::model::SendMessage] => messages::send_message;
    GET "/api/v1/messages/{id}" ScopeOrSender(Read), "messages.show", "One message." => messages::show_message;
    GET "/api/v1/messages/{id}/receipts" ScopeOrSender(Read), "messages.receipts", "A message's signed receipts." => messages::list_receipts;
    GET "/api/v1/messages/{id}/status" ScopeOrSender(Read), "messages.status", "A campaign's figures." => campaigns::campaign_status;
    GET "/api/v1/messages/{id}/recipients" ScopeOrSender(Read), "messages.recipients", "A campaign's rows and their states." => campaigns::campaign_recipients;
    POST "/api/v1/messages/{id}/cancel" ScopeOrSender(Messages), "messages.cancel", "Cancel a message's queued deliveries and fallbacks." => campaigns::cancel_message;
    POST "/api/v1/lists" ScopeOrSender(Messages), "lists.upload", "Upload a recipient list (CSV, streamed).", streams => campaigns::upload_list;
    POST "/api/v1/campaigns" ScopeOrSender(Messages), "campaigns.create", "Create a campaign from a message and an uploaded list." [crate::model::CreateCampaign] => campaigns::create_campaign;
    GET "/api/v1/refusals" ScopeOrSender(Read), "refusals.list", "Signed refusals and blocks of a sender." => messages::list_refusals;
    POST "/api/v1/sms/reports" Gateway, "sms.reports", "Delivery reports from the SMS gateway (its own secret)." => campaigns::sms_reports;

    POST "/api/v1/usage" scope(Billing), "usage.ingest", "Store usage events (a JSON array or JSON lines), each once by its idempotency key." => super::billing::ingest;
    GET "/api/v1/billing/plans" scope(Read), "billing.plans.show", "The price plans in force." => super::billing::show_plans;
    PUT "/api/v1/billing/plans" scope(Billing), "billing.plans.set", "Set the price plans (a TOML plans file)." [crate::model::billing::PlansText] => super::billing::set_plans;
    GET "/api/v1/billing/prices" scope(Read), "billing.prices.list", "Providers' prices for their paid shares." => super::billing::list_prices;
    POST "/api/v1/billing/prices" scope(Billing), "billing.prices.set", "Set a provider's price for a meter." [crate::model::billing::ProviderPrice] => super::billing::set_price;
    POST "/api/v1/billing/runs" scope(Billing), "billing.run", "Meter and rate a month into draft invoices (idempotent)." [crate::model::billing::BillingMonth] => super::billing::run;
    POST "/api/v1/billing/close" scope(Billing), "billing.close", "Rate a month a last time and close it." [crate::model::billing::BillingMonth] => super::billing::close;
    GET "/api/v1/billing/invoices" scope(Read), "billing.invoices", "Invoices, by account and month." => super::billing::invoices;
    GET "/api/v1/billing/export" scope(Read), "billing.export", "A month's invoices as CSV or JSON, or its usage as CloudEvents JSON lines." => super::billing::export;
    GET "/api/v1/stats" scope(Read), "stats.list", "Daily series by account, club, service or sender." => super::billing::stats;
}

/// The route a request matched.
pub(crate) fn spec_of(method: &Method, path: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|r| r.path == path && r.method == method.as_str())
}

/// Builds the router: every route, behind the body limit, authentication and audit.
pub(super) fn build(state: ApiState) -> Router {
    add_routes(Router::new())
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The route of a request, as the router matched it.
/// Looked up once per request: the outer layer keeps it in the request's extensions
/// for the inner one.
fn matched(request: &mut Request) -> Option<&'static RouteSpec> {
    if let Some(spec) = request.extensions().get::<&'static RouteSpec>() {
        return Some(*spec);
    }
    let path = request.extensions().get::<MatchedPath>()?;
    let spec = spec_of(request.method(), path.as_str())?;
    request.extensions_mut().insert(spec);
    Some(spec)
}

/// Answers a body declared larger than [`BODY_LIMIT`] (streaming routes aside).
async fn refuse_oversized(mut request: Request, next: Next) -> Response {
    if matched(&mut request).is_some_and(|r| r.streams) {
        return next.run(request).await;
    }
    super::refuse_oversized(request, next).await
}

/// The caller's address, for the audit log: the client's, also behind a trusted
/// proxy ([`crate::https::ClientAddr`]).
fn source_of(request: &Request) -> String {
    crate::https::ClientAddr::of(request.extensions())
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Checks the caller's token against the route's [`Access`], then audits calls that
/// change something (or were refused for their scope).
async fn authenticate(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    // An unmatched path or method: let the router answer 404/405.
    let Some(spec) = matched(&mut request) else {
        return next.run(request).await;
    };
    let scope = match spec.access {
        Access::Public | Access::Gateway => return next.run(request).await,
        access => access,
    };
    let now = now_ms();
    let hash = bearer(request.headers()).map(|token| secret_hash(token.as_bytes()));
    let caller = match &hash {
        None => None,
        Some(hash) => match state.store.admin_token(hash, now) {
            Ok(Some(admin)) => Some(Caller::Admin(admin)),
            Ok(None) => match state.store.vendor_by_token(hash).ok().flatten() {
                Some(vendor) => Some(Caller::Vendor(vendor)),
                None => state
                    .store
                    .sender_by_token(hash)
                    .ok()
                    .flatten()
                    .map(Caller::Sender),
            },
            Err(e) => return ApiError::from(e).into_response(),
        },
    };
    let Some(caller) = caller else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing, wrong, expired or revoked admin token (see admin.toml written by `herald-server init`)".into(),
        )
        .into_response();
    };
    let refusal = match (&caller, scope) {
        (Caller::Admin(admin), access) => {
            let needed = access.scope().unwrap_or(Scope::Admin);
            (!admin.scope.allows(needed)).then(|| {
                format!(
                    "this token's scope is {}; {} {} needs the {needed} scope",
                    admin.scope, spec.method, spec.path
                )
            })
        }
        (Caller::Vendor(_), Access::ScopeOrVendor(_)) => None,
        (Caller::Vendor(_), _) => Some("vendor tokens may only publish releases".to_string()),
        (Caller::Sender(_), Access::ScopeOrSender(_)) => None,
        (Caller::Sender(_), _) => {
            Some("sender tokens may only send and read their own messages".to_string())
        }
    };
    let audited = spec.changes() || refusal.is_some();
    let event = audited.then(|| AuditEvent {
        actor: caller.actor(),
        source: source_of(&request),
        action: spec.action.to_string(),
        target: request.uri().path().to_string(),
        outcome: String::new(),
    });
    let response = match refusal {
        Some(message) => ApiError(StatusCode::FORBIDDEN, message).into_response(),
        None => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
    };
    match event {
        Some(event) => audit_response(&state, event, response).await,
        None => response,
    }
}

/// The longest error body read back into an audit entry's outcome.
const OUTCOME_BODY_LIMIT: usize = 16 * 1024;

/// Records the outcome of an audited call; a failure keeps the API's one-sentence
/// error. If the entry cannot be written, the answer says so instead of pretending.
async fn audit_response(state: &ApiState, mut event: AuditEvent, response: Response) -> Response {
    let status = response.status();
    let small_body = axum::body::HttpBody::size_hint(response.body())
        .exact()
        .is_some_and(|length| length <= OUTCOME_BODY_LIMIT as u64);
    let response = if status.is_success() {
        event.outcome = "ok".into();
        response
    } else {
        let mut reason = status.canonical_reason().unwrap_or("").to_string();
        // The API's own sentence, from a small JSON body; any other body is passed on
        // untouched.
        let response = if small_body {
            let (parts, body) = response.into_parts();
            match axum::body::to_bytes(body, OUTCOME_BODY_LIMIT).await {
                Ok(bytes) => {
                    if let Ok(body) = serde_json::from_slice::<crate::model::ApiErrorBody>(&bytes) {
                        reason = body.error;
                    }
                    Response::from_parts(parts, axum::body::Body::from(bytes))
                }
                Err(e) => ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the answer could not be read: {e}"),
                )
                .into_response(),
            }
        } else {
            response
        };
        event.outcome = if status == StatusCode::FORBIDDEN {
            format!("denied: {reason}")
        } else {
            format!("failed: {} {reason}", status.as_u16())
        };
        response
    };
    match state.store.audit(&event, now_ms()) {
        Ok(_) => response,
        Err(e) => {
            tracing::error!(action = %event.action, "audit log not written: {e}");
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the call finished ({}) but the audit log could not record it: {e}",
                    status.as_u16()
                ),
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_declared_once() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(
                seen.insert((route.method, route.path)),
                "{} {} twice",
                route.method,
                route.path
            );
            assert!(route.path.starts_with('/'), "{}", route.path);
        }
        let actions: std::collections::HashSet<_> = ROUTES.iter().map(|r| r.action).collect();
        assert_eq!(actions.len(), ROUTES.len(), "actions name one route each");
    }

    #[test]
    fn the_read_scope_changes_nothing() {
        for route in ROUTES.iter().filter(|r| r.changes()) {
            let scope = route.access.scope();
            assert!(
                scope.is_none_or(|s| !Scope::Read.allows(s)),
                "{} {} is open to read tokens",
                route.method,
                route.path
            );
        }
    }
}
