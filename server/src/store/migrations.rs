//! The schema, as a list of migrations applied in order (`PRAGMA user_version` counts
//! them). Add one at the end; never edit one that has shipped.

use super::*;

/// Migrations, applied in order; index + 1 is the schema version.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL UNIQUE,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT,
    last_seen_at BIGINT,
    version TEXT,
    facts TEXT NOT NULL DEFAULT '{}',
    local_addresses TEXT NOT NULL DEFAULT '',
    observed_address TEXT,
    membership BLOB
);
CREATE TABLE agent_groups (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    group_name TEXT NOT NULL,
    PRIMARY KEY (agent_id, group_name)
);
CREATE INDEX agent_groups_by_group ON agent_groups(group_name);
CREATE TABLE address_history (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX address_history_by_agent ON address_history(agent_id, at);
CREATE TABLE tokens (
    secret_hash TEXT PRIMARY KEY,
    groups TEXT NOT NULL,
    uses_left INTEGER NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    envelope BLOB NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL REFERENCES orders(id),
    target TEXT NOT NULL,
    spec TEXT NOT NULL,
    missed TEXT NOT NULL,
    splay_ms BIGINT NOT NULL,
    ttl_ms BIGINT NOT NULL,
    min_interval_ms BIGINT NOT NULL DEFAULT 0,
    next_fire_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX schedules_by_next_fire ON schedules(next_fire_at);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    order_id TEXT NOT NULL REFERENCES orders(id),
    schedule_id BIGINT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    deliver_after BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    delivered_at BIGINT,
    started_at BIGINT,
    finished_at BIGINT,
    attempt INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    stdout BLOB,
    stderr BLOB,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX jobs_by_agent_state ON jobs(agent_id, state);
CREATE INDEX jobs_by_state_expiry ON jobs(state, expires_at);
CREATE INDEX jobs_by_state_deliver ON jobs(state, deliver_after);
"#,
    r#"
CREATE TABLE vendors (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    packages TEXT NOT NULL,
    delegation BLOB NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    package TEXT NOT NULL,
    version TEXT NOT NULL,
    platform TEXT NOT NULL,
    vendor TEXT REFERENCES vendors(name),
    metadata BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    url TEXT,
    expires_at BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT,
    UNIQUE (package, version, platform)
);
CREATE TABLE package_subscriptions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    package TEXT NOT NULL,
    order_id TEXT NOT NULL REFERENCES orders(id),
    target TEXT NOT NULL,
    waves TEXT NOT NULL,
    max_failures DOUBLE PRECISION NOT NULL,
    ttl_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX package_subscriptions_by_package ON package_subscriptions(package);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id BIGINT NOT NULL REFERENCES releases(id),
    subscription_id BIGINT NOT NULL REFERENCES package_subscriptions(id),
    state TEXT NOT NULL,
    wave INTEGER NOT NULL,
    reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rollouts_by_state ON rollouts(state);
CREATE TABLE rollout_targets (
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
    position INTEGER NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    job_id BIGINT REFERENCES jobs(id),
    PRIMARY KEY (rollout_id, position)
);
ALTER TABLE jobs ADD COLUMN release_id BIGINT REFERENCES releases(id);
ALTER TABLE jobs ADD COLUMN progress TEXT;
"#,
    // Web console: accounts, sessions, the service catalog, users' subscriptions,
    // browser-service visits, and forwarding of results.
    r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    login TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '',
    phone TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX web_sessions_by_user ON web_sessions(user_id);
CREATE TABLE visits (
    token_hash TEXT PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
ALTER TABLE tokens ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
ALTER TABLE agents ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
CREATE INDEX agents_by_owner ON agents(owner_user_id);
ALTER TABLE orders ADD COLUMN kind TEXT NOT NULL DEFAULT 'run';
ALTER TABLE orders ADD COLUMN open_timeout_ms BIGINT;
CREATE TABLE catalog (
    name TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    kind TEXT NOT NULL,
    order_id TEXT NOT NULL REFERENCES orders(id),
    summary TEXT NOT NULL,
    target TEXT NOT NULL,
    min_interval_ms BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
ALTER TABLE schedules ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
ALTER TABLE schedules ADD COLUMN catalog_name TEXT;
CREATE INDEX schedules_by_owner ON schedules(owner_user_id);
ALTER TABLE jobs ADD COLUMN visit_redeemed_at BIGINT;
ALTER TABLE jobs ADD COLUMN outcome TEXT;
ALTER TABLE jobs ADD COLUMN forward_pending INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_forward ON jobs(forward_pending, state);
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users(id),
    schedule_id BIGINT,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    secret TEXT,
    only_failures INTEGER NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX destinations_by_user ON destinations(user_id);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users(id),
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX deliveries_by_job ON deliveries(job_id);
CREATE TABLE delivery_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id BIGINT NOT NULL REFERENCES deliveries(id),
    at BIGINT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts(delivery_id);
"#,
    // Forwarding: e-mail and SMS rules are confirmed with a code sent to the target
    // (webhooks need none); codes sent and deliveries per user are counted for the
    // daily limits; deliveries are pruned by age.
    r#"
ALTER TABLE destinations ADD COLUMN confirmed_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_code_hash TEXT;
ALTER TABLE destinations ADD COLUMN confirm_expires_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE destinations ADD COLUMN confirm_requested_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_note TEXT;
UPDATE destinations SET confirmed_at = created_at WHERE kind = 'webhook';
CREATE TABLE confirmation_codes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    sent_at BIGINT NOT NULL
);
CREATE INDEX confirmation_codes_by_user ON confirmation_codes(user_id, sent_at);
CREATE INDEX destinations_code_requested ON destinations(confirm_requested_at)
    WHERE confirm_requested_at IS NOT NULL;
ALTER TABLE deliveries ADD COLUMN over_limit INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deliveries_by_user ON deliveries(user_id, created_at);
CREATE INDEX deliveries_by_created ON deliveries(created_at);
"#,
    // Push messages: senders (operator-signed grants), messages (each also an order of
    // kind 'message' whose jobs are its deliveries), the agents' signed receipts, and
    // the block-list changes agents report.
    r#"
CREATE TABLE senders (
    name TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    advertising INTEGER NOT NULL,
    grant_envelope BLOB NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE messages (
    id TEXT PRIMARY KEY REFERENCES orders(id),
    sender TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    priority TEXT NOT NULL,
    advertising INTEGER NOT NULL,
    audience TEXT NOT NULL,
    collapse TEXT,
    link TEXT,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX messages_by_sender ON messages(sender, created_at);
CREATE INDEX jobs_by_order ON jobs(order_id, agent_id);
CREATE TABLE message_receipts (
    message_id TEXT NOT NULL REFERENCES orders(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    state TEXT NOT NULL,
    reason TEXT,
    at BIGINT NOT NULL,
    report BLOB NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, agent_id, state)
);
CREATE TABLE sender_blocks (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    sender TEXT NOT NULL,
    blocked INTEGER NOT NULL,
    by TEXT NOT NULL,
    at BIGINT NOT NULL,
    report BLOB NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, sender)
);
CREATE INDEX sender_blocks_by_sender ON sender_blocks(sender, blocked);
CREATE TABLE block_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    sender TEXT NOT NULL,
    blocked INTEGER NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    UNIQUE (agent_id, sender)
);
"#,
    // Campaigns: a message sent to a recipient list, one row per recipient with its
    // fallback's state, the devices each row resolved to, the SMS gateway's delivery
    // reports, per-sender daily fallback counts, and console users who act for a sender.
    r#"
CREATE TABLE campaigns (
    id TEXT PRIMARY KEY REFERENCES messages(id),
    sender TEXT NOT NULL,
    fallback TEXT NOT NULL,
    fallback_after_ms BIGINT NOT NULL,
    max_fallback BIGINT,
    rate BIGINT,
    invite_url TEXT,
    start_at BIGINT NOT NULL,
    canceled_at BIGINT,
    fallbacks BIGINT NOT NULL DEFAULT 0,
    rows_bad BIGINT NOT NULL DEFAULT 0,
    rows_duplicate BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE INDEX campaigns_by_sender ON campaigns(sender, created_at);
CREATE TABLE campaign_rows (
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    line BIGINT NOT NULL,
    recipient TEXT NOT NULL,
    phone TEXT,
    email TEXT,
    login TEXT,
    agent TEXT,
    user_id BIGINT,
    devices INTEGER NOT NULL,
    send_at BIGINT NOT NULL,
    fallback_at BIGINT,
    fb_state TEXT,
    fb_kind TEXT,
    fb_target TEXT,
    fb_attempts INTEGER NOT NULL DEFAULT 0,
    fb_next_at BIGINT,
    fb_detail TEXT,
    fb_sent_at BIGINT,
    fb_gateway_id TEXT,
    fb_reported_at BIGINT,
    PRIMARY KEY (campaign_id, line),
    UNIQUE (campaign_id, recipient)
);
CREATE INDEX campaign_rows_fallback_due ON campaign_rows(fallback_at)
    WHERE fb_state IS NULL AND fallback_at IS NOT NULL;
CREATE INDEX campaign_rows_fallback_next ON campaign_rows(fb_next_at)
    WHERE fb_state = 'pending';
CREATE INDEX campaign_rows_sending ON campaign_rows(fb_state) WHERE fb_state = 'sending';
CREATE INDEX campaign_rows_by_gateway_id ON campaign_rows(fb_gateway_id)
    WHERE fb_gateway_id IS NOT NULL;
CREATE TABLE campaign_targets (
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    line BIGINT NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    PRIMARY KEY (campaign_id, line, agent_id)
);
CREATE TABLE sms_reports (
    gateway_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    detail TEXT,
    received_at BIGINT NOT NULL
);
CREATE INDEX sms_reports_by_received ON sms_reports(received_at);
CREATE TABLE fallback_days (
    sender TEXT NOT NULL,
    day BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (sender, day)
);
ALTER TABLE users ADD COLUMN sender TEXT;
"#,
    // Readiness: `/readyz` commits a write here to prove the database takes writes.
    r#"
CREATE TABLE health (
    id INTEGER PRIMARY KEY,
    checked_at BIGINT NOT NULL
);
"#,
    // Scoped admin tokens, and the audit log: an append-only hash chain (seq from 1
    // without gaps; each entry's hash covers the previous one's).
    r#"
ALTER TABLE admin_tokens ADD COLUMN name TEXT NOT NULL DEFAULT 'init';
ALTER TABLE admin_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE admin_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE admin_tokens ADD COLUMN revoked_at BIGINT;
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_by_at ON audit_log(at);
"#,
    // Peers: clubs (user-made groups) with members and one-time invitations, the shares
    // agents report for the directory (and the clubs each names), users' favourites, and
    // one record per tunnel session (who, whom, which share, when, bytes, requests) for
    // metering.
    r#"
CREATE TABLE clubs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_by BIGINT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL
);
CREATE TABLE club_members (
    club_id BIGINT NOT NULL REFERENCES clubs(id),
    user_id BIGINT NOT NULL REFERENCES users(id),
    role TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (club_id, user_id)
);
CREATE INDEX club_members_by_user ON club_members(user_id);
CREATE TABLE club_invites (
    code_hash TEXT PRIMARY KEY,
    club_id BIGINT NOT NULL REFERENCES clubs(id),
    created_by BIGINT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_by BIGINT REFERENCES users(id),
    used_at BIGINT
);
CREATE INDEX club_invites_by_club ON club_invites(club_id);
CREATE TABLE shares (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    http INTEGER NOT NULL,
    public INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, name)
);
CREATE TABLE share_clubs (
    agent_id TEXT NOT NULL,
    share TEXT NOT NULL,
    club TEXT NOT NULL,
    PRIMARY KEY (agent_id, share, club)
);
CREATE INDEX share_clubs_by_club ON share_clubs(club);
CREATE TABLE favourites (
    user_id BIGINT NOT NULL REFERENCES users(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    share TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, agent_id, share)
);
CREATE TABLE tunnel_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    provider_agent_id TEXT NOT NULL,
    share TEXT NOT NULL,
    provider_user_id BIGINT,
    consumer_user_id BIGINT,
    consumer_agent_id TEXT,
    via TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL DEFAULT '',
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    bytes_up BIGINT NOT NULL DEFAULT 0,
    bytes_down BIGINT NOT NULL DEFAULT 0,
    requests BIGINT NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT 'open'
);
CREATE INDEX tunnel_sessions_by_provider ON tunnel_sessions(provider_agent_id, started_at);
CREATE INDEX tunnel_sessions_by_consumer ON tunnel_sessions(consumer_user_id, started_at);
"#,
    // Metering and billing (issue 16): usage events (one row per billable use, unique by
    // its idempotency key; `month` is the month it is billed in, later than its own when
    // that was closed), closed months, price plans as set (latest wins), providers'
    // prices, invoices (one per account and month, the body as JSON), and the cumulative
    // counters each end of a tunnel session signs (the lower of both is billed).
    r#"
CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    source TEXT NOT NULL,
    seq TEXT NOT NULL,
    account TEXT NOT NULL,
    provider TEXT,
    meter TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    at BIGINT NOT NULL,
    month TEXT NOT NULL,
    late_from TEXT,
    note TEXT NOT NULL DEFAULT '',
    received_at BIGINT NOT NULL
);
CREATE INDEX usage_events_by_month ON usage_events(month, account, provider, meter, quantity);
CREATE INDEX usage_events_late ON usage_events(month, account, late_from) WHERE late_from IS NOT NULL;
CREATE INDEX usage_events_noted ON usage_events(month, account, note) WHERE note <> '';
CREATE INDEX usage_events_by_source ON usage_events(source, seq);
CREATE TABLE billing_months (
    month TEXT PRIMARY KEY,
    closed_at BIGINT NOT NULL
);
CREATE TABLE billing_plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plans TEXT NOT NULL,
    set_at BIGINT NOT NULL
);
CREATE TABLE provider_prices (
    provider TEXT NOT NULL,
    meter TEXT NOT NULL,
    price TEXT NOT NULL,
    per BIGINT NOT NULL,
    currency TEXT NOT NULL,
    set_at BIGINT NOT NULL,
    PRIMARY KEY (provider, meter)
);
CREATE TABLE invoices (
    month TEXT NOT NULL,
    account TEXT NOT NULL,
    currency TEXT NOT NULL,
    total BIGINT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    written_at BIGINT NOT NULL,
    PRIMARY KEY (month, account)
);
CREATE INDEX invoices_by_account ON invoices(account, month);
CREATE TABLE usage_signatures (
    session_id BIGINT NOT NULL REFERENCES tunnel_sessions(id),
    side TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    bytes_up BIGINT NOT NULL,
    bytes_down BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    seconds BIGINT NOT NULL,
    final INTEGER NOT NULL DEFAULT 0,
    signature BLOB NOT NULL,
    signed_at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, side, seq)
);
CREATE INDEX jobs_by_finished ON jobs(finished_at);
"#,
    // Nodes of a cluster (issue 19; a lone server is one node): each node's addresses
    // and heartbeat, the leader roles it holds, and the agents connected to it (valid
    // while the node's heartbeat is fresh: a dead node's lease runs out).
    r#"
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    quic_addr TEXT NOT NULL,
    http_addr TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    roles TEXT NOT NULL DEFAULT ''
);
CREATE TABLE agent_nodes (
    agent_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    since BIGINT NOT NULL
);
CREATE INDEX agent_nodes_by_node ON agent_nodes(node_id);
"#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    if conn.is_postgres() {
        // Nodes starting together migrate one at a time; the lock ends with the session
        // if this one dies.
        conn.execute_batch("SELECT pg_advisory_lock(7252306)")?;
        let migrated = migrate_locked(conn);
        conn.execute_batch("SELECT pg_advisory_unlock(7252306)")?;
        return migrated;
    }
    migrate_locked(conn)
}

fn migrate_locked(conn: &mut Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let version: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    let version = version.unwrap_or(0) as usize;
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    let postgres = conn.is_postgres();
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        if postgres {
            tx.execute_batch(&super::sql::translate_schema(sql))?;
        } else {
            tx.execute_batch(sql)?;
        }
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![(index + 1) as i64],
        )?;
        tx.commit()?;
    }
    Ok(())
}
