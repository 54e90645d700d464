//! Metering and billing: usage events, price plans and the rating rules that turn a
//! month of usage into invoices, and the rule that picks what a tunnel session bills
//! from the counters both ends sign. Pure: no I/O, time passed in.
//!
//! Money is never a float. Amounts are `i64` minor units of the plan's currency (cents
//! for `minor_digits = 2`); prices are decimal strings read exactly into nano-units of
//! the currency ([`Price`]), so a price per byte or per gigabyte loses nothing. Each
//! invoice line is computed exactly (a rational number of minor units) and rounded once,
//! **half to even** ("banker's rounding"); the invoice total is the sum of its rounded
//! lines. The operator's fee on a provider's earnings is rounded the same way, and the
//! provider gets the rest, so `gross = fee + net` always holds.
//!
//! Rating one meter of one account (see `docs/BILLING.md`):
//! 1. the plan's `included` quantity is taken off first (free);
//! 2. the rest is priced at `price` per `per` units, or by `tiers`:
//!    - `graduated`: each tier prices the units that fall inside it;
//!    - `volume`: all billable units at the price of the tier the total falls into.
//!      Tier bounds (`up_to`) count billable units, after the included quantity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use herald_shared::Millis;

use super::Via;

/// Nano-units per currency unit: a [`Price`]'s scale.
pub const PRICE_SCALE: i128 = 1_000_000_000;
/// Basis points in a whole (an operator fee of 1000 bp is 10 %).
pub const BASIS_POINTS: i64 = 10_000;
/// The most fractional digits a currency may have.
pub const MAX_MINOR_DIGITS: u32 = 4;

/// What is counted.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    /// Bytes through a tunnel, both ways.
    TunnelBytes,
    /// Seconds a tunnel session was open (rounded up per session).
    TunnelSeconds,
    /// HTTP requests a (browser) tunnel session carried.
    TunnelRequests,
    /// Message deliveries created for a sender (one per recipient device).
    MessagesSent,
    /// Fallback SMS that went out to the gateway.
    FallbackSms,
    /// Fallback e-mails that went out.
    FallbackEmail,
    /// Jobs that finished on a user's devices.
    JobsRun,
}

/// Every meter, in the order invoices list them.
pub const METERS: [Meter; 7] = [
    Meter::TunnelBytes,
    Meter::TunnelSeconds,
    Meter::TunnelRequests,
    Meter::MessagesSent,
    Meter::FallbackSms,
    Meter::FallbackEmail,
    Meter::JobsRun,
];

impl Meter {
    /// Stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::TunnelBytes => "tunnel_bytes",
            Meter::TunnelSeconds => "tunnel_seconds",
            Meter::TunnelRequests => "tunnel_requests",
            Meter::MessagesSent => "messages_sent",
            Meter::FallbackSms => "fallback_sms",
            Meter::FallbackEmail => "fallback_email",
            Meter::JobsRun => "jobs_run",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Meter> {
        METERS.into_iter().find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key of a usage event: SHA-256 (hex) of its source and its sequence
/// within that source. The same use reported twice (a resend after a crash) has the
/// same key and is stored once.
pub fn usage_key(source: &str, seq: &str) -> String {
    hex::encode(usage_key_bytes(source, seq))
}

/// [`usage_key`] as the 32 bytes it is stored as (half the index of its hex form).
pub fn usage_key_bytes(source: &str, seq: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(source.as_bytes());
    hash.update([0u8]);
    hash.update(seq.as_bytes());
    hash.finalize().into()
}

/// The first millisecond of `time`'s month and of the month after it (UTC).
pub fn month_bounds(time: Millis) -> (Millis, Millis) {
    use chrono::Datelike;
    let date = chrono::DateTime::from_timestamp_millis(time)
        .unwrap_or_default()
        .date_naive();
    let first = date.with_day(1).unwrap_or(date);
    let next = first
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(first);
    let ms = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis()
    };
    (ms(first), ms(next))
}

/// The month (`YYYY-MM`, UTC) a time falls in.
pub fn month_of(at: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .unwrap_or_default()
        .format("%Y-%m")
        .to_string()
}

/// Checks a `YYYY-MM` month.
pub fn parse_month(s: &str) -> Result<(i32, u32), String> {
    let bad = || format!("{s:?} is not a month: use YYYY-MM, e.g. 2026-11");
    let (year, month) = s.split_once('-').ok_or_else(bad)?;
    if year.len() != 4 || month.len() != 2 {
        return Err(bad());
    }
    let year: i32 = year.parse().map_err(|_| bad())?;
    let month: u32 = month.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&month) || year < 1970 {
        return Err(bad());
    }
    Ok((year, month))
}

/// The month after `month` (`YYYY-MM`).
pub fn next_month(month: &str) -> Result<String, String> {
    let (year, m) = parse_month(month)?;
    Ok(if m == 12 {
        format!("{:04}-01", year + 1)
    } else {
        format!("{year:04}-{:02}", m + 1)
    })
}

/// The month an event at `at` is booked into: its own, or the first open month after
/// it when its own is closed (a late event).
pub fn booking_month(at: Millis, closed: &std::collections::BTreeSet<String>) -> String {
    let mut month = month_of(at);
    while closed.contains(&month) {
        // `month_of` only gives valid months, so the next one exists.
        month = next_month(&month).expect("month_of gives YYYY-MM");
    }
    month
}

/// A usage event as a client reports it (`POST /api/v1/usage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewUsage {
    /// Who reports it: `herald/jobs`, `agent:ID`, a gateway's name.
    pub source: String,
    /// The event's sequence within its source (a counter, a row id). With `source` it
    /// makes the idempotency key.
    pub seq: String,
    /// Who pays: `user:ID`, `sender:NAME` or `agent:ID`.
    pub account: String,
    /// Who earns, for a paid share: an account as above.
    #[serde(default)]
    pub provider: Option<String>,
    /// The meter.
    pub meter: Meter,
    /// How much (a non-negative integer in the meter's unit).
    pub quantity: i64,
    /// When the use happened (Unix milliseconds).
    pub time: Millis,
    /// Why it is billed to this account, when that is not obvious.
    #[serde(default)]
    pub note: String,
}

/// Longest source, sequence, account or note an event may carry.
pub const MAX_EVENT_FIELD: usize = 200;

impl NewUsage {
    /// Checks an event from outside; the error says which field is wrong.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("source", &self.source),
            ("seq", &self.seq),
            ("account", &self.account),
        ] {
            if value.trim().is_empty() || value.len() > MAX_EVENT_FIELD {
                return Err(format!(
                    "{name} must be 1 to {MAX_EVENT_FIELD} characters, got {value:?}"
                ));
            }
        }
        check_account(&self.account)?;
        if let Some(provider) = &self.provider {
            check_account(provider)?;
        }
        if self.quantity < 0 {
            return Err(format!(
                "quantity must not be negative, got {}",
                self.quantity
            ));
        }
        if self.note.len() > MAX_EVENT_FIELD {
            return Err(format!("note is longer than {MAX_EVENT_FIELD} characters"));
        }
        Ok(())
    }
}

/// Checks an account name: `user:ID`, `sender:NAME` or `agent:ID`.
pub fn check_account(account: &str) -> Result<(), String> {
    match account.split_once(':') {
        Some(("user" | "sender" | "agent", rest))
            if !rest.is_empty() && !rest.contains(char::is_whitespace) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{account:?} is not an account: use user:ID, sender:NAME or agent:ID"
        )),
    }
}

/// A stored usage event (exports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Idempotency key.
    pub key: String,
    /// Reporter.
    pub source: String,
    /// Payer.
    pub account: String,
    /// Earner, for a paid share.
    pub provider: Option<String>,
    /// Meter.
    pub meter: Meter,
    /// Quantity.
    pub quantity: i64,
    /// When the use happened.
    pub time: Millis,
    /// The month it is billed in (later than `time`'s when that month was closed).
    pub month: String,
    /// Why it is billed to this account, if not obvious.
    pub note: String,
}

/// What an ingest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IngestReport {
    /// New events stored.
    pub accepted: u64,
    /// Events whose key was already stored (counted once).
    pub duplicates: u64,
}

// === Prices ===

/// An exact non-negative price: nano-units of a currency, read from a decimal string
/// (`"0.05"`, `"12"`, `"0.000000001"`). TOML floats are refused: they are not exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Price(pub i128);

impl Price {
    /// Parses a decimal string with at most 9 fractional digits.
    pub fn parse(text: &str) -> Result<Price, String> {
        let bad = || {
            format!(
                "{text:?} is not a price: a decimal string such as \"0.05\" (at most 9 decimals)"
            )
        };
        let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || whole.len() > 15 {
            return Err(bad());
        }
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let whole: i128 = whole.parse().map_err(|_| bad())?;
        let frac_value: i128 = if frac.is_empty() {
            0
        } else {
            frac.parse::<i128>().map_err(|_| bad())? * 10i128.pow(9 - frac.len() as u32)
        };
        Ok(Price(whole * PRICE_SCALE + frac_value))
    }
}

impl std::fmt::Display for Price {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whole = self.0 / PRICE_SCALE;
        let frac = self.0 % PRICE_SCALE;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl Serialize for Price {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Price, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Whole(u64),
            Float(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => Price::parse(&t).map_err(serde::de::Error::custom),
            Raw::Whole(n) => Ok(Price(n as i128 * PRICE_SCALE)),
            Raw::Float(x) => Err(serde::de::Error::custom(format!(
                "price {x} is a float: write it as a string, e.g. \"{x}\", so it stays exact"
            ))),
        }
    }
}

/// `numerator / denominator` rounded half to even (`denominator > 0`).
pub fn round_half_even(numerator: i128, denominator: i128) -> i128 {
    let quotient = numerator.div_euclid(denominator);
    let remainder = numerator.rem_euclid(denominator);
    match (2 * remainder).cmp(&denominator) {
        std::cmp::Ordering::Less => quotient,
        std::cmp::Ordering::Greater => quotient + 1,
        std::cmp::Ordering::Equal => quotient + (quotient & 1),
    }
}

/// Formats minor units as a decimal amount (`1234`, 2 digits → `12.34`).
pub fn format_minor(amount: i64, minor_digits: u32) -> String {
    if minor_digits == 0 {
        return amount.to_string();
    }
    let scale = 10i64.pow(minor_digits);
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        abs / scale as u64,
        abs % scale as u64,
        width = minor_digits as usize
    )
}

// === Plans ===

/// How tiers price a quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierMode {
    /// Each tier prices the units inside it.
    #[default]
    Graduated,
    /// Every unit at the price of the tier the total falls into.
    Volume,
}

/// One tier: units up to `up_to` (billable units, cumulative; none for the last) at
/// `price` per `per` units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Upper bound (inclusive); absent on the last tier.
    #[serde(default)]
    pub up_to: Option<i64>,
    /// Price per `per` units.
    pub price: Price,
}

/// How a plan prices one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterPrice {
    /// Prices are per this many units (1 by default; 1000000000 prices bytes per GB).
    #[serde(default = "one")]
    pub per: i64,
    /// Free units each month.
    #[serde(default)]
    pub included: i64,
    /// One price for every unit (or use `tiers`).
    #[serde(default)]
    pub price: Option<Price>,
    /// Tiers, ascending, the last without `up_to`.
    #[serde(default)]
    pub tiers: Vec<Tier>,
    /// `graduated` (default) or `volume`.
    #[serde(default)]
    pub mode: TierMode,
}

fn one() -> i64 {
    1
}

fn two() -> u32 {
    2
}

/// A price plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Name.
    pub name: String,
    /// ISO 4217 code; one currency per plan.
    pub currency: String,
    /// Digits after the decimal point of the currency's minor unit (2 for cents).
    #[serde(default = "two")]
    pub minor_digits: u32,
    /// Charged every month an account is on the plan.
    #[serde(default)]
    pub flat_fee: Price,
    /// The plan of every account no plan names (exactly one plan is the default).
    #[serde(default)]
    pub default: bool,
    /// Accounts on this plan (`user:ID`, `sender:NAME`, `agent:ID`).
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Prices by meter; a meter not listed is free.
    #[serde(default)]
    pub meters: BTreeMap<Meter, MeterPrice>,
}

/// Operator settings of a plans file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSettings {
    /// The operator's fee on providers' earnings, in basis points (1000 = 10 %).
    #[serde(default)]
    pub fee_bp: i64,
}

/// A plans file (`herald-server billing plan set FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plans {
    /// Operator fee.
    #[serde(default)]
    pub operator: OperatorSettings,
    /// The plans.
    #[serde(default, rename = "plan")]
    pub plans: Vec<Plan>,
}

impl Plans {
    /// Reads and checks a plans file; the error names the plan and field.
    pub fn parse(text: &str) -> Result<Plans, String> {
        let plans: Plans = toml::from_str(text).map_err(|e| format!("plans file: {e}"))?;
        plans.check()?;
        Ok(plans)
    }

    fn check(&self) -> Result<(), String> {
        if self.plans.is_empty() {
            return Err("plans file: no [[plan]]".into());
        }
        if !(0..=BASIS_POINTS).contains(&self.operator.fee_bp) {
            return Err(format!(
                "[operator] fee_bp must be 0 to {BASIS_POINTS}, got {}",
                self.operator.fee_bp
            ));
        }
        let defaults = self.plans.iter().filter(|p| p.default).count();
        if defaults != 1 {
            return Err(format!(
                "exactly one plan must have default = true, found {defaults}"
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut accounts = BTreeMap::new();
        for plan in &self.plans {
            let at = |what: String| format!("plan {:?}: {what}", plan.name);
            if !herald_shared::valid_name(&plan.name) || !names.insert(plan.name.as_str()) {
                return Err(at("name missing, invalid or used twice".into()));
            }
            check_currency(&plan.currency).map_err(at)?;
            if plan.minor_digits > MAX_MINOR_DIGITS {
                return Err(at(format!("minor_digits at most {MAX_MINOR_DIGITS}")));
            }
            for account in &plan.accounts {
                check_account(account).map_err(at)?;
                if let Some(other) = accounts.insert(account.as_str(), plan.name.as_str()) {
                    return Err(at(format!("account {account} is also on plan {other:?}")));
                }
            }
            for (meter, price) in &plan.meters {
                price
                    .check()
                    .map_err(|e| at(format!("meters.{meter}: {e}")))?;
            }
        }
        Ok(())
    }

    /// The plan an account is on.
    pub fn plan_of(&self, account: &str) -> &Plan {
        self.plans
            .iter()
            .find(|p| p.accounts.iter().any(|a| a == account))
            .or_else(|| self.plans.iter().find(|p| p.default))
            // `check` made sure exactly one plan is the default.
            .expect("a checked plans file has a default plan")
    }
}

/// Checks a currency code: three capital letters.
pub fn check_currency(currency: &str) -> Result<(), String> {
    if currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "currency {currency:?} must be an ISO 4217 code such as EUR"
        ))
    }
}

impl MeterPrice {
    fn check(&self) -> Result<(), String> {
        if self.per < 1 {
            return Err("per must be at least 1".into());
        }
        if self.included < 0 {
            return Err("included must not be negative".into());
        }
        match (&self.price, self.tiers.is_empty()) {
            (Some(_), false) => return Err("give price or tiers, not both".into()),
            (None, true) => return Err("give price or tiers".into()),
            _ => {}
        }
        let mut previous = 0;
        for (i, tier) in self.tiers.iter().enumerate() {
            let last = i + 1 == self.tiers.len();
            match (tier.up_to, last) {
                (None, true) => {}
                (None, false) => {
                    return Err(format!(
                        "tier {} needs up_to (only the last has none)",
                        i + 1
                    ))
                }
                (Some(_), true) => return Err("the last tier must not have up_to".into()),
                (Some(up_to), false) if up_to <= previous => {
                    return Err(format!(
                        "tier {}: up_to must grow, {up_to} after {previous}",
                        i + 1
                    ))
                }
                (Some(up_to), false) => previous = up_to,
            }
        }
        Ok(())
    }

    /// Rates `quantity` units; see the module documentation for the rules.
    pub fn rate(&self, meter: Meter, quantity: i64, minor_digits: u32) -> Line {
        let included = quantity.min(self.included);
        let billable = quantity - included;
        let tiers: Vec<Tier> = match self.price {
            Some(price) => vec![Tier { up_to: None, price }],
            None => self.tiers.clone(),
        };
        let mut parts = Vec::new();
        match self.mode {
            TierMode::Graduated => {
                let mut from = 0;
                for tier in &tiers {
                    if from >= billable {
                        break;
                    }
                    let to = tier.up_to.unwrap_or(i64::MAX).min(billable);
                    parts.push((from, to, tier.price));
                    from = to;
                }
            }
            TierMode::Volume => {
                let tier = tiers
                    .iter()
                    .find(|t| t.up_to.is_none_or(|up| billable <= up))
                    // The last tier is unbounded (`check`).
                    .expect("the last tier is unbounded");
                if billable > 0 {
                    parts.push((0, billable, tier.price));
                }
            }
        }
        let denominator = self.per as i128 * PRICE_SCALE;
        let scale = 10i128.pow(minor_digits);
        let exact: i128 = parts
            .iter()
            .map(|&(from, to, price)| (to - from) as i128 * price.0 * scale)
            .sum();
        Line {
            meter,
            quantity,
            included,
            per: self.per,
            tiers: parts
                .into_iter()
                .map(|(from, to, price)| TierUse {
                    from,
                    to,
                    quantity: to - from,
                    price,
                })
                .collect(),
            amount: round_half_even(exact, denominator) as i64,
        }
    }
}

/// The units of a line that one tier priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierUse {
    /// First billable unit (exclusive lower bound, counted from 0).
    pub from: i64,
    /// Last billable unit of the tier used.
    pub to: i64,
    /// Units priced here.
    pub quantity: i64,
    /// Price per `per` units.
    pub price: Price,
}

/// One meter on an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Meter.
    pub meter: Meter,
    /// Units used.
    pub quantity: i64,
    /// Of which free.
    pub included: i64,
    /// Prices are per this many units.
    pub per: i64,
    /// How the billable units were priced.
    pub tiers: Vec<TierUse>,
    /// Amount, minor units, rounded half to even.
    pub amount: i64,
}

// === Provider prices ===

/// A provider's price for a meter of its paid shares (set by the share's owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProviderPrice {
    /// The provider's account (`user:ID`).
    pub provider: String,
    /// Meter.
    pub meter: Meter,
    /// Price per `per` units, a decimal string.
    #[schema(value_type = String)]
    pub price: Price,
    /// Units the price is for.
    pub per: i64,
    /// Currency (ISO 4217).
    pub currency: String,
}

impl ProviderPrice {
    /// Checks a price from outside.
    pub fn check(&self) -> Result<(), String> {
        check_account(&self.provider)?;
        check_currency(&self.currency)?;
        if self.per < 1 {
            return Err("per must be at least 1".into());
        }
        Ok(())
    }
}

/// What a consumer pays a provider for one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCharge {
    /// Who earns it.
    pub provider: String,
    /// Meter.
    pub meter: Meter,
    /// Units.
    pub quantity: i64,
    /// Price per `per` units.
    pub price: Price,
    /// Units the price is for.
    pub per: i64,
    /// Amount, minor units.
    pub amount: i64,
    /// Of which the operator's fee.
    pub operator_fee: i64,
}

/// What a provider earned from one consumer for one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Earning {
    /// Who paid.
    pub consumer: String,
    /// Meter.
    pub meter: Meter,
    /// Units.
    pub quantity: i64,
    /// What the consumer paid.
    pub gross: i64,
    /// The operator's fee.
    pub operator_fee: i64,
    /// What the provider keeps.
    pub net: i64,
}

/// Late events booked on an invoice: their own month was closed when they arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateNote {
    /// The month they happened in.
    pub from_month: String,
    /// How many.
    pub events: u64,
}

/// One account's invoice for one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// `YYYY-MM`.
    pub month: String,
    /// Who pays.
    pub account: String,
    /// Its plan.
    pub plan: String,
    /// Currency.
    pub currency: String,
    /// Digits of the minor unit.
    pub minor_digits: u32,
    /// The plan's flat fee.
    pub flat_fee: i64,
    /// One line per meter used.
    pub lines: Vec<Line>,
    /// What the account pays providers.
    pub provider_charges: Vec<ProviderCharge>,
    /// Total the account pays, minor units: flat fee + lines + provider charges.
    pub total: i64,
    /// What the account earned as a provider (statement; not part of `total`).
    pub earnings: Vec<Earning>,
    /// Net earnings, minor units.
    pub earnings_net: i64,
    /// The operator's fees on this account's earnings.
    pub operator_fees: i64,
    /// Late events from closed months booked here.
    pub late: Vec<LateNote>,
    /// Notes (a provider price in another currency, a browser session billed to its
    /// provider).
    pub notes: Vec<String>,
    /// `draft` until the month is closed, then `final`.
    pub status: String,
}

/// A month's usage of one (account, provider, meter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTotal {
    /// Payer.
    pub account: String,
    /// Earner, if a paid share.
    pub provider: Option<String>,
    /// Meter.
    pub meter: Meter,
    /// Sum of quantities.
    pub quantity: i64,
}

/// Rates a month: one invoice per account that used something or that a plan names.
/// `totals` need not be sorted; invoices come out ordered by account.
pub fn rate_month(
    month: &str,
    plans: &Plans,
    provider_prices: &[ProviderPrice],
    totals: &[UsageTotal],
    late: &BTreeMap<String, Vec<LateNote>>,
    notes: &BTreeMap<String, Vec<String>>,
) -> Vec<Invoice> {
    let prices: BTreeMap<(&str, Meter), &ProviderPrice> = provider_prices
        .iter()
        .map(|p| ((p.provider.as_str(), p.meter), p))
        .collect();
    // Per account: meter totals (whoever provided), and per (provider, meter) totals.
    let mut own: BTreeMap<&str, BTreeMap<Meter, i64>> = BTreeMap::new();
    let mut paid: BTreeMap<&str, BTreeMap<(&str, Meter), i64>> = BTreeMap::new();
    for total in totals {
        *own.entry(&total.account)
            .or_default()
            .entry(total.meter)
            .or_default() += total.quantity;
        if let Some(provider) = &total.provider {
            *paid
                .entry(&total.account)
                .or_default()
                .entry((provider.as_str(), total.meter))
                .or_default() += total.quantity;
        }
    }
    let mut accounts: std::collections::BTreeSet<&str> = own.keys().copied().collect();
    accounts.extend(
        plans
            .plans
            .iter()
            .flat_map(|p| p.accounts.iter().map(String::as_str)),
    );
    accounts.extend(late.keys().map(String::as_str));
    let mut invoices: BTreeMap<&str, Invoice> = BTreeMap::new();
    let mut earnings: Vec<(&str, &str, Earning)> = Vec::new();
    for &account in &accounts {
        let plan = plans.plan_of(account);
        let scale = 10i128.pow(plan.minor_digits);
        let mut invoice = draft(month, account, plan);
        invoice.late = late.get(account).cloned().unwrap_or_default();
        invoice.notes = notes.get(account).cloned().unwrap_or_default();
        for (&meter, &quantity) in own.get(account).into_iter().flatten() {
            if let Some(price) = plan.meters.get(&meter) {
                invoice
                    .lines
                    .push(price.rate(meter, quantity, plan.minor_digits));
            } else {
                invoice.lines.push(Line {
                    meter,
                    quantity,
                    included: 0,
                    per: 1,
                    tiers: Vec::new(),
                    amount: 0,
                });
            }
        }
        for (&(provider, meter), &quantity) in paid.get(account).into_iter().flatten() {
            let Some(price) = prices.get(&(provider, meter)) else {
                continue;
            };
            if price.currency != plan.currency {
                invoice.notes.push(format!(
                    "{provider}'s price for {meter} is in {}, not this plan's {}: not charged",
                    price.currency, plan.currency
                ));
                continue;
            }
            let exact = quantity as i128 * price.price.0 * scale;
            let amount = round_half_even(exact, price.per as i128 * PRICE_SCALE) as i64;
            let fee = round_half_even(
                amount as i128 * plans.operator.fee_bp as i128,
                BASIS_POINTS as i128,
            ) as i64;
            invoice.provider_charges.push(ProviderCharge {
                provider: provider.to_string(),
                meter,
                quantity,
                price: price.price,
                per: price.per,
                amount,
                operator_fee: fee,
            });
            earnings.push((
                provider,
                account,
                Earning {
                    consumer: account.to_string(),
                    meter,
                    quantity,
                    gross: amount,
                    operator_fee: fee,
                    net: amount - fee,
                },
            ));
        }
        invoice.total = invoice.flat_fee
            + invoice.lines.iter().map(|l| l.amount).sum::<i64>()
            + invoice
                .provider_charges
                .iter()
                .map(|c| c.amount)
                .sum::<i64>();
        invoices.insert(account, invoice);
    }
    for (provider, _, earning) in earnings {
        let invoice = invoices
            .entry(provider)
            .or_insert_with(|| draft(month, provider, plans.plan_of(provider)));
        invoice.earnings_net += earning.net;
        invoice.operator_fees += earning.operator_fee;
        invoice.earnings.push(earning);
    }
    invoices.into_values().collect()
}

/// An account's draft invoice for `month` under `plan`: the flat fee and nothing else
/// yet (its total is the fee until lines are added).
fn draft(month: &str, account: &str, plan: &Plan) -> Invoice {
    let scale = 10i128.pow(plan.minor_digits);
    let flat_fee = round_half_even(plan.flat_fee.0 * scale, PRICE_SCALE) as i64;
    Invoice {
        month: month.to_string(),
        account: account.to_string(),
        plan: plan.name.clone(),
        currency: plan.currency.clone(),
        minor_digits: plan.minor_digits,
        flat_fee,
        lines: Vec::new(),
        provider_charges: Vec::new(),
        total: flat_fee,
        earnings: Vec::new(),
        earnings_net: 0,
        operator_fees: 0,
        late: Vec::new(),
        notes: Vec::new(),
        status: "draft".into(),
    }
}

// === Signed counters ===

/// How long after a tunnel session ended the meter step waits for both ends' last
/// signed counts before it bills with what arrived (an end that was offline sends its
/// count from its outbox when it reconnects; one that arrives later than this is kept
/// but no longer changes the bill).
pub const SIGNATURE_GRACE: Millis = 10 * 60 * 1000;
/// How far apart (basis points of the larger count) both ends' counts may be before the
/// session is flagged: bytes still in flight when one end counted explain a little.
pub const SIGNATURE_TOLERANCE_BP: u32 = 100;

/// Cumulative counters one end of a tunnel session signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes consumer → provider.
    pub bytes_up: u64,
    /// Bytes provider → consumer.
    pub bytes_down: u64,
    /// Requests.
    pub requests: u64,
    /// Seconds open.
    pub seconds: u64,
}

impl Counters {
    fn fields(&self) -> [u64; 4] {
        [self.bytes_up, self.bytes_down, self.requests, self.seconds]
    }
}

/// What a session bills, and how that was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billable {
    /// The counters billed.
    pub counters: Counters,
    /// The two ends disagree beyond the tolerance on some counter (for review).
    pub disagreement: bool,
    /// A browser session: only the provider signed; marked so on the invoice.
    pub provider_only: bool,
}

/// Why a session cannot be billed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unbillable {
    /// Agent-to-agent session without the consumer's signed counters: the provider's
    /// alone could bill more than the consumer counted.
    #[error("no counters signed by the consumer's agent")]
    NoConsumerSignature,
    /// A browser session without the provider's signed counters.
    #[error("no counters signed by the provider's agent")]
    NoProviderSignature,
    /// A browser session cannot carry a consumer agent's counters.
    #[error("a browser session has no consumer agent to sign")]
    ConsumerOnBrowser,
}

/// The rule for signed counters: bill the **lower** of what both ends signed, counter
/// by counter, and flag a disagreement larger than `tolerance_bp` basis points of the
/// larger value (plus one unit, so tiny counts do not flag on a single byte in flight
/// at the last interval). A browser session has no consumer agent: it bills what the
/// provider signed and is marked provider-only. An agent session without the
/// consumer's signature is not billed (the provider alone could inflate it); without
/// the provider's, the consumer's counters are billed (they can only be lower than
/// what the provider would claim, so nobody is billed more than they counted).
pub fn billable_counters(
    via: Via,
    provider: Option<Counters>,
    consumer: Option<Counters>,
    tolerance_bp: u32,
) -> Result<Billable, Unbillable> {
    match (via, provider, consumer) {
        (Via::Browser, _, Some(_)) => Err(Unbillable::ConsumerOnBrowser),
        (Via::Browser, None, None) => Err(Unbillable::NoProviderSignature),
        (Via::Browser, Some(counters), None) => Ok(Billable {
            counters,
            disagreement: false,
            provider_only: true,
        }),
        (_, _, None) => Err(Unbillable::NoConsumerSignature),
        (_, None, Some(counters)) => Ok(Billable {
            counters,
            disagreement: false,
            provider_only: false,
        }),
        (_, Some(p), Some(c)) => {
            let disagreement = p.fields().iter().zip(c.fields()).any(|(&a, b)| {
                let high = a.max(b) as u128;
                let slack = high * tolerance_bp as u128 / BASIS_POINTS as u128 + 1;
                a.abs_diff(b) as u128 > slack
            });
            Ok(Billable {
                counters: Counters {
                    bytes_up: p.bytes_up.min(c.bytes_up),
                    bytes_down: p.bytes_down.min(c.bytes_down),
                    requests: p.requests.min(c.requests),
                    seconds: p.seconds.min(c.seconds),
                },
                disagreement,
                provider_only: false,
            })
        }
    }
}

// === Statistics ===

/// One point of a daily series (`herald-server stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatPoint {
    /// Day, `YYYY-MM-DD` (UTC).
    pub day: String,
    /// The account, club, service (`AGENT/SHARE`) or sender.
    pub key: String,
    /// What is counted: a meter, `connections`, `jobs.STATE`, `messages.STATE`,
    /// `tunnel.sessions`, `tunnel.bytes`.
    pub metric: String,
    /// The count.
    pub value: i64,
}

/// What `herald-server stats` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatsBy {
    /// Console accounts (users, senders).
    Account,
    /// Clubs (tunnel sessions to shares they list).
    Club,
    /// Shares (`AGENT/SHARE`).
    Service,
    /// Message senders.
    Sender,
}

impl StatsBy {
    /// Parses `account`, `club`, `service` or `sender`.
    pub fn parse(s: &str) -> Option<StatsBy> {
        match s {
            "account" => Some(StatsBy::Account),
            "club" => Some(StatsBy::Club),
            "service" => Some(StatsBy::Service),
            "sender" => Some(StatsBy::Sender),
            _ => None,
        }
    }
}

/// Run report of `billing run`/`billing close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// Month.
    pub month: String,
    /// Events the meter step derived from stored rows first.
    pub metered: u64,
    /// Invoices for the month.
    pub invoices: u64,
    /// Invoices written or replaced by this run (0 when nothing changed).
    pub changed: u64,
    /// Sum of all invoice totals per currency, minor units.
    pub totals: BTreeMap<String, i64>,
    /// When the month was closed, if it is.
    pub closed_at: Option<Millis>,
}

/// A month to rate or close (`POST /api/v1/billing/runs`, `/close`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BillingMonth {
    /// `YYYY-MM`.
    pub month: String,
}

/// A plans file's text (`PUT /api/v1/billing/plans`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlansText {
    /// TOML, as in docs/BILLING.md.
    pub toml: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLANS: &str = r#"
[operator]
fee_bp = 1500

[[plan]]
name = "standard"
currency = "EUR"
flat_fee = "5.00"
default = true

[plan.meters.tunnel_bytes]
per = 1000000000
included = 1000000000
tiers = [{ up_to = 10000000000, price = "0.10" }, { price = "0.05" }]

[plan.meters.messages_sent]
mode = "volume"
tiers = [{ up_to = 1000, price = "0.01" }, { up_to = 10000, price = "0.008" }, { price = "0.005" }]

[plan.meters.jobs_run]
included = 100
price = "0.02"

[plan.meters.fallback_sms]
price = "0.045"

[[plan]]
name = "yen"
currency = "JPY"
minor_digits = 0
accounts = ["sender:tokyo"]

[plan.meters.messages_sent]
price = "1.5"
"#;

    fn total(account: &str, provider: Option<&str>, meter: Meter, quantity: i64) -> UsageTotal {
        UsageTotal {
            account: account.into(),
            provider: provider.map(String::from),
            meter,
            quantity,
        }
    }

    fn rate(totals: &[UsageTotal]) -> BTreeMap<String, Invoice> {
        let plans = Plans::parse(PLANS).expect("plans parse");
        let prices = [ProviderPrice {
            provider: "user:9".into(),
            meter: Meter::TunnelSeconds,
            price: Price::parse("0.001").expect("price"),
            per: 1,
            currency: "EUR".into(),
        }];
        rate_month(
            "2026-11",
            &plans,
            &prices,
            totals,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .into_iter()
        .map(|i| (i.account.clone(), i))
        .collect()
    }

    fn line(invoice: &Invoice, meter: Meter) -> &Line {
        invoice
            .lines
            .iter()
            .find(|l| l.meter == meter)
            .expect("line for the meter")
    }

    #[test]
    fn rating_matches_hand_computed_invoices() {
        // (account, meter, quantity, hand-computed amount in minor units, why)
        let table: &[(&str, Meter, i64, i64, &str)] = &[
            // 25.5 GB, 1 GB included: 10 GB at 0.10 = 1.00 and 14.5 GB at 0.05 = 0.725;
            // 172.5 cents rounds half to even: 172.
            (
                "user:1",
                Meter::TunnelBytes,
                25_500_000_000,
                172,
                "graduated",
            ),
            // Volume: 5000 messages all at the second tier's 0.008 = 40.00.
            (
                "user:2",
                Meter::MessagesSent,
                5000,
                4000,
                "volume, middle tier",
            ),
            // Volume: exactly 1000 stays in the first tier (up_to is inclusive).
            ("user:3", Meter::MessagesSent, 1000, 1000, "volume, bound"),
            // 80 jobs, 100 included: free.
            ("user:4", Meter::JobsRun, 80, 0, "included"),
            // 130 jobs: 30 at 0.02 = 0.60.
            ("user:5", Meter::JobsRun, 130, 60, "past included"),
            // 4.5 cents rounds to the even 4, 13.5 to the even 14.
            ("user:6", Meter::FallbackSms, 1, 4, "half to even, down"),
            ("user:7", Meter::FallbackSms, 3, 14, "half to even, up"),
            // A meter the plan does not price is free but listed.
            ("user:8", Meter::TunnelRequests, 77, 0, "unpriced"),
            // Yen have no minor unit: 3 x 1.5 = 4.5, rounded to the even 4.
            (
                "sender:tokyo",
                Meter::MessagesSent,
                3,
                4,
                "minor_digits = 0",
            ),
        ];
        let totals: Vec<UsageTotal> = table
            .iter()
            .map(|&(account, meter, quantity, _, _)| total(account, None, meter, quantity))
            .collect();
        let invoices = rate(&totals);
        for &(account, meter, quantity, amount, why) in table {
            let invoice = &invoices[account];
            let l = line(invoice, meter);
            assert_eq!(l.quantity, quantity, "{why}");
            assert_eq!(l.amount, amount, "{why}");
            let flat = if account == "sender:tokyo" { 0 } else { 500 };
            assert_eq!(invoice.flat_fee, flat, "{why}");
            assert_eq!(
                invoice.total,
                flat + amount,
                "{why}: total = flat fee + line"
            );
        }
        let bytes = line(&invoices["user:1"], Meter::TunnelBytes);
        assert_eq!(bytes.included, 1_000_000_000);
        assert_eq!(
            bytes.tiers.iter().map(|t| t.quantity).collect::<Vec<_>>(),
            [10_000_000_000, 14_500_000_000]
        );
        assert_eq!(invoices["user:5"].lines[0].included, 100);
        assert_eq!(invoices["sender:tokyo"].currency, "JPY");
    }

    #[test]
    fn provider_prices_pay_the_provider_less_the_operator_fee() {
        // 12345 s at 0.001 = 12.345 EUR: 1234.5 cents, half to even 1234; the 15 % fee
        // is 185.1, so 185, and the provider keeps 1049.
        let invoices = rate(&[
            total("user:1", Some("user:9"), Meter::TunnelSeconds, 12_345),
            total("user:1", None, Meter::JobsRun, 0),
        ]);
        let consumer = &invoices["user:1"];
        assert_eq!(consumer.provider_charges.len(), 1);
        let charge = &consumer.provider_charges[0];
        assert_eq!((charge.amount, charge.operator_fee), (1234, 185));
        assert_eq!(
            consumer.total,
            500 + 1234,
            "flat fee, free lines, the charge"
        );
        let provider = &invoices["user:9"];
        assert_eq!(provider.earnings.len(), 1);
        assert_eq!(provider.earnings[0].gross, 1234);
        assert_eq!(provider.earnings_net, 1049);
        assert_eq!(provider.operator_fees, 185);
        assert_eq!(
            provider.total, 500,
            "earnings are a statement, not a charge"
        );
    }

    #[test]
    fn a_provider_price_in_another_currency_is_not_charged_and_said() {
        let invoices = rate(&[total(
            "sender:tokyo",
            Some("user:9"),
            Meter::TunnelSeconds,
            10,
        )]);
        let invoice = &invoices["sender:tokyo"];
        assert!(invoice.provider_charges.is_empty());
        assert!(
            invoice.notes[0].contains("not charged"),
            "{:?}",
            invoice.notes
        );
    }

    #[test]
    fn rounding_is_half_to_even() {
        for (n, d, want) in [
            (5, 2, 2),
            (7, 2, 4),
            (-5, 2, -2),
            (1, 3, 0),
            (2, 3, 1),
            (0, 7, 0),
        ] {
            assert_eq!(round_half_even(n, d), want, "{n}/{d}");
        }
    }

    #[test]
    fn prices_are_exact_decimals_and_floats_are_refused() {
        assert_eq!(Price::parse("0.05").expect("price").0, 50_000_000);
        assert_eq!(Price::parse("12").expect("price").0, 12 * PRICE_SCALE);
        assert_eq!(Price::parse("0.000000001").expect("price").0, 1);
        assert_eq!(Price::parse("1.250").expect("price").to_string(), "1.25");
        for bad in ["", "-1", "1.0000000001", "1e3", "0,5", ".5"] {
            assert!(Price::parse(bad).is_err(), "{bad:?}");
        }
        let float = PLANS.replace("flat_fee = \"5.00\"", "flat_fee = 5.0");
        let e = Plans::parse(&float).expect_err("a float price");
        assert!(e.contains("float"), "{e}");
        assert_eq!(format_minor(123_456, 2), "1234.56");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(7, 0), "7");
    }

    #[test]
    fn bad_plans_are_refused_with_the_plan_named() {
        let cases = [
            (PLANS.replace("default = true", ""), "default"),
            (
                PLANS.replace("currency = \"EUR\"", "currency = \"euro\""),
                "currency",
            ),
            (
                PLANS.replace("{ price = \"0.05\" }", "{ up_to = 5, price = \"0.05\" }"),
                "last tier",
            ),
            (
                PLANS.replace(
                    "price = \"0.02\"",
                    "price = \"0.02\"\ntiers = [{ price = \"1\" }]",
                ),
                "not both",
            ),
            (PLANS.replace("fee_bp = 1500", "fee_bp = 20000"), "fee_bp"),
            (
                PLANS.replace("[plan.meters.jobs_run]", "[plan.meters.jobs_walked]"),
                "jobs_walked",
            ),
        ];
        for (text, want) in cases {
            let e = Plans::parse(&text).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn late_events_go_to_the_first_open_month() {
        let closed: std::collections::BTreeSet<String> =
            ["2026-11".to_string(), "2026-12".to_string()].into();
        // 2026-11-15T00:00:00Z
        let november = 1_794_700_800_000;
        assert_eq!(month_of(november), "2026-11");
        assert_eq!(booking_month(november, &closed), "2027-01");
        assert_eq!(booking_month(november, &Default::default()), "2026-11");
        assert_eq!(next_month("2026-12").expect("month"), "2027-01");
        assert!(parse_month("2026-13").is_err());
        assert!(parse_month("26-01").is_err());
    }

    #[test]
    fn the_key_is_a_hash_of_source_and_sequence() {
        assert_eq!(usage_key("agent:a", "1"), usage_key("agent:a", "1"));
        assert_ne!(usage_key("agent:a", "1"), usage_key("agent:a", "2"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(usage_key("ab", "c"), usage_key("a", "bc"));
        assert_eq!(usage_key("a", "b").len(), 64);
        assert_eq!(usage_key("a", "b"), hex::encode(usage_key_bytes("a", "b")));
        let (start, end) = month_bounds(1_794_700_800_000);
        assert_eq!(
            (month_of(start), month_of(end)),
            ("2026-11".into(), "2026-12".into())
        );
        assert_eq!(month_of(end - 1), "2026-11");
    }

    const FAIR: Counters = Counters {
        bytes_up: 1_000,
        bytes_down: 50_000,
        requests: 10,
        seconds: 60,
    };

    #[test]
    fn usage_is_billed_at_the_lower_of_both_signatures() {
        // The provider claims double on every counter: the consumer's count is billed,
        // and the disagreement is flagged.
        let inflated = Counters {
            bytes_up: 2_000,
            bytes_down: 100_000,
            requests: 20,
            seconds: 120,
        };
        let billed =
            billable_counters(Via::Relay, Some(inflated), Some(FAIR), 100).expect("billable");
        assert_eq!(billed.counters, FAIR);
        assert!(billed.disagreement);
        assert!(!billed.provider_only);
        // A consumer that under-reports one counter gets that counter's lower value: the
        // lower of both, counter by counter.
        let low = Counters {
            bytes_down: 40_000,
            ..FAIR
        };
        let billed = billable_counters(Via::Direct, Some(FAIR), Some(low), 100).expect("billable");
        assert_eq!(billed.counters, low);
        assert!(billed.disagreement, "20 % apart is beyond 1 %");
    }

    #[test]
    fn small_differences_within_the_tolerance_are_not_flagged() {
        // The last interval's bytes in flight: 0.5 % apart, tolerance 1 %.
        let close = Counters {
            bytes_down: 49_750,
            ..FAIR
        };
        let billed = billable_counters(Via::Relay, Some(FAIR), Some(close), 100).expect("billable");
        assert_eq!(billed.counters.bytes_down, 49_750);
        assert!(!billed.disagreement);
        let one_off = Counters {
            requests: 9,
            ..FAIR
        };
        assert!(
            !billable_counters(Via::Relay, Some(FAIR), Some(one_off), 0)
                .expect("billable")
                .disagreement,
            "one unit of slack"
        );
    }

    #[test]
    fn browser_sessions_bill_the_provider_s_counters_and_are_marked() {
        let billed = billable_counters(Via::Browser, Some(FAIR), None, 100).expect("billable");
        assert_eq!(billed.counters, FAIR);
        assert!(billed.provider_only);
        assert_eq!(
            billable_counters(Via::Browser, Some(FAIR), Some(FAIR), 100),
            Err(Unbillable::ConsumerOnBrowser)
        );
        assert_eq!(
            billable_counters(Via::Browser, None, None, 100),
            Err(Unbillable::NoProviderSignature)
        );
    }

    #[test]
    fn an_agent_session_without_the_consumer_s_signature_is_not_billed() {
        assert_eq!(
            billable_counters(Via::Relay, Some(FAIR), None, 100),
            Err(Unbillable::NoConsumerSignature)
        );
        let billed = billable_counters(Via::Relay, None, Some(FAIR), 100).expect("billable");
        assert_eq!(billed.counters, FAIR, "the consumer's own count");
    }
}
