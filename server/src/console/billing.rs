//! `/account/usage` (a user's own usage and invoices) and `/admin/billing` (the
//! operator's overview), with daily charts drawn server-side as inline SVG: no script,
//! no chart library, nothing fetched. A chart's `viewBox` scales it to the page, so it
//! stays readable at 390 px.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;

use super::auth::{Admin, Session};
use super::{render, ConsoleResult, ConsoleState, Layout};
use crate::model::billing::{format_minor, Invoice, StatPoint, StatsBy};

/// Days the charts cover.
const CHART_DAYS: i64 = 30;
/// Most invoices the admin overview lists.
const ADMIN_INVOICES: usize = 200;

/// One chart: a title and its daily values.
pub(crate) struct Chart {
    /// What it counts.
    pub(crate) title: String,
    /// Sum over the days shown.
    pub(crate) total: i64,
    /// The SVG (numbers and day names only: nothing user-supplied).
    pub(crate) svg: String,
}

/// An invoice row for a page.
pub(crate) struct InvoiceRow {
    pub(crate) month: String,
    pub(crate) account: String,
    pub(crate) plan: String,
    pub(crate) status: String,
    pub(crate) total: String,
    pub(crate) earnings: String,
    pub(crate) lines: Vec<(String, i64, i64, String)>,
    pub(crate) late: Vec<String>,
    pub(crate) notes: Vec<String>,
}

impl InvoiceRow {
    fn of(invoice: &Invoice) -> InvoiceRow {
        let money = |amount| {
            format!(
                "{} {}",
                format_minor(amount, invoice.minor_digits),
                invoice.currency
            )
        };
        InvoiceRow {
            month: invoice.month.clone(),
            account: invoice.account.clone(),
            plan: invoice.plan.clone(),
            status: invoice.status.clone(),
            total: money(invoice.total),
            earnings: if invoice.earnings.is_empty() {
                String::new()
            } else {
                money(invoice.earnings_net)
            },
            lines: invoice
                .lines
                .iter()
                .map(|l| (l.meter.to_string(), l.quantity, l.included, money(l.amount)))
                .collect(),
            late: invoice
                .late
                .iter()
                .map(|l| format!("{} late event(s) from {} (closed)", l.events, l.from_month))
                .collect(),
            notes: invoice.notes.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "usage.html")]
struct UsagePage {
    layout: Layout,
    account: String,
    charts: Vec<Chart>,
    invoices: Vec<InvoiceRow>,
}

#[derive(Template)]
#[template(path = "admin_billing.html")]
struct AdminBillingPage {
    layout: Layout,
    charts: Vec<Chart>,
    months: Vec<(String, String, usize, String)>,
    invoices: Vec<InvoiceRow>,
}

/// `GET /account/usage`.
pub(super) async fn usage(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    let account = format!("user:{}", session.user.id);
    let now = crate::now_ms();
    let since = start_of_day(now) - (CHART_DAYS - 1) * DAY_MS;
    let points: Vec<StatPoint> = state
        .store()
        .stats(StatsBy::Account, since)?
        .into_iter()
        .filter(|p| p.key == account)
        .collect();
    let mut invoices = state.store().invoices(Some(&account), None)?;
    invoices.reverse();
    Ok(render(
        StatusCode::OK,
        &UsagePage {
            layout: Layout::of(&session),
            charts: charts(&points, since, now),
            invoices: invoices.iter().map(InvoiceRow::of).collect(),
            account,
        },
    ))
}

/// `GET /admin/billing`.
pub(super) async fn admin(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
) -> ConsoleResult {
    let now = crate::now_ms();
    let since = start_of_day(now) - (CHART_DAYS - 1) * DAY_MS;
    let points = state.store().stats(StatsBy::Account, since)?;
    let mut invoices = state.store().invoices(None, None)?;
    invoices.reverse();
    let mut months: BTreeMap<(String, String), (String, usize, i64, u32)> = BTreeMap::new();
    for invoice in &invoices {
        let entry = months
            .entry((invoice.month.clone(), invoice.currency.clone()))
            .or_insert_with(|| (invoice.status.clone(), 0, 0, invoice.minor_digits));
        entry.1 += 1;
        entry.2 += invoice.total;
    }
    Ok(render(
        StatusCode::OK,
        &AdminBillingPage {
            layout: Layout::of(&session),
            charts: charts(&points, since, now),
            months: months
                .into_iter()
                .rev()
                .map(|((month, currency), (status, count, total, digits))| {
                    (
                        month,
                        status,
                        count,
                        format!("{} {currency}", format_minor(total, digits)),
                    )
                })
                .collect(),
            invoices: invoices
                .iter()
                .take(ADMIN_INVOICES)
                .map(InvoiceRow::of)
                .collect(),
        },
    ))
}

const DAY_MS: i64 = 86_400_000;

fn start_of_day(t: i64) -> i64 {
    t - t.rem_euclid(DAY_MS)
}

fn day_name(t: i64) -> String {
    chrono::DateTime::from_timestamp_millis(t)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// One chart per metric, each over every day from `since` to `now` (missing days 0).
fn charts(points: &[StatPoint], since: i64, now: i64) -> Vec<Chart> {
    let days: Vec<String> = (0..)
        .map(|i| since + i * DAY_MS)
        .take_while(|&t| t <= now)
        .map(day_name)
        .collect();
    let mut by_metric: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for p in points {
        *by_metric
            .entry(p.metric.as_str())
            .or_default()
            .entry(p.day.as_str())
            .or_default() += p.value;
    }
    by_metric
        .into_iter()
        .map(|(metric, values)| {
            let series: Vec<(String, i64)> = days
                .iter()
                .map(|d| (d.clone(), values.get(d.as_str()).copied().unwrap_or(0)))
                .collect();
            Chart {
                title: metric.to_string(),
                total: series.iter().map(|(_, v)| v).sum(),
                svg: bar_chart(metric, &series),
            }
        })
        .collect()
}

/// A bar chart of daily values as SVG: bars scaled to the largest value, the first and
/// last day and the maximum labelled, each bar titled with its day and value.
pub(crate) fn bar_chart(label: &str, series: &[(String, i64)]) -> String {
    const WIDTH: i64 = 360;
    const HEIGHT: i64 = 140;
    const TOP: i64 = 18;
    const BOTTOM: i64 = 20;
    let n = series.len().max(1) as i64;
    let max = series.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let slot = WIDTH * 100 / n; // hundredths of a unit
    let plot = HEIGHT - TOP - BOTTOM;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"100%\" role=\"img\" \
         aria-label=\"{} per day\" xmlns=\"http://www.w3.org/2000/svg\">",
        escape(label)
    );
    svg.push_str(&format!(
        "<line x1=\"0\" y1=\"{y}\" x2=\"{WIDTH}\" y2=\"{y}\" stroke=\"#888\" stroke-width=\"1\"/>",
        y = HEIGHT - BOTTOM
    ));
    for (i, (day, value)) in series.iter().enumerate() {
        let h = value * plot / max;
        let x = i as i64 * slot;
        svg.push_str(&format!(
            "<rect x=\"{}.{:02}\" y=\"{}\" width=\"{}.{:02}\" height=\"{h}\" fill=\"#2a6fdb\"><title>{} {value}</title></rect>",
            x / 100,
            x % 100,
            HEIGHT - BOTTOM - h,
            (slot * 8 / 10) / 100,
            (slot * 8 / 10) % 100,
            escape(day)
        ));
    }
    let first = series.first().map(|(d, _)| d.as_str()).unwrap_or("");
    let last = series.last().map(|(d, _)| d.as_str()).unwrap_or("");
    svg.push_str(&format!(
        "<text x=\"0\" y=\"{HEIGHT}\" font-size=\"11\" fill=\"#444\">{}</text>\
         <text x=\"{WIDTH}\" y=\"{HEIGHT}\" font-size=\"11\" fill=\"#444\" text-anchor=\"end\">{}</text>\
         <text x=\"0\" y=\"12\" font-size=\"11\" fill=\"#444\">max {max}</text></svg>",
        escape(first),
        escape(last)
    ));
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_scales_bars_to_the_largest_value() {
        let series = vec![
            ("2026-11-01".to_string(), 5),
            ("2026-11-02".to_string(), 10),
        ];
        let svg = bar_chart("jobs.<x>", &series);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(
            svg.contains("aria-label=\"jobs.&lt;x&gt; per day\""),
            "{svg}"
        );
        // 140 - 18 - 20 = 102 units of plot: 10 fills it, 5 half of it.
        assert!(svg.contains("height=\"102\""), "{svg}");
        assert!(svg.contains("height=\"51\""), "{svg}");
        assert!(svg.contains("<title>2026-11-02 10</title>"));
        assert!(!svg.contains("style="), "the CSP forbids inline styles");
    }

    #[test]
    fn charts_fill_missing_days_with_zero() {
        let day = 1_794_700_800_000;
        let points = vec![StatPoint {
            day: "2026-11-16".into(),
            key: "user:1".into(),
            metric: "jobs_run".into(),
            value: 3,
        }];
        let charts = charts(&points, day, day + 2 * DAY_MS);
        assert_eq!(charts.len(), 1);
        assert_eq!(charts[0].total, 3);
        assert_eq!(charts[0].svg.matches("<rect").count(), 3);
    }
}
