//! Exports, so an operator can hand billing to another system: a month's invoices as
//! CSV (one row per charge) or JSON, and its raw usage as CloudEvents 1.0 JSON lines,
//! the shape OpenMeter and Lago ingest.
//!
//! CSV rows: `kind` is `flat_fee`, `usage` (a meter line), `provider_charge` (paid to a
//! provider, fee included) or `earning` (a provider's statement). The `flat_fee`, `usage`
//! and `provider_charge` rows of an account add up to its invoice's `total`; `earning`
//! rows are not charges.

use crate::model::billing::{format_minor, parse_month, Invoice, UsageEvent};
use crate::store::Store;

use super::BillingError;

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Invoices, one CSV row per charge.
    Csv,
    /// Invoices as a JSON array.
    Json,
    /// Raw usage events as CloudEvents JSON lines.
    CloudEvents,
}

impl ExportFormat {
    /// Parses `csv`, `json` or `cloudevents`.
    pub fn parse(s: &str) -> Option<ExportFormat> {
        match s {
            "csv" => Some(ExportFormat::Csv),
            "json" => Some(ExportFormat::Json),
            "cloudevents" => Some(ExportFormat::CloudEvents),
            _ => None,
        }
    }

    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Csv => "text/csv; charset=utf-8",
            ExportFormat::Json => "application/json",
            ExportFormat::CloudEvents => "application/x-ndjson",
        }
    }
}

/// The export of `month` in `format`.
pub fn export(store: &Store, month: &str, format: ExportFormat) -> Result<String, BillingError> {
    parse_month(month).map_err(BillingError::Month)?;
    Ok(match format {
        ExportFormat::Json => {
            let invoices = store.invoices(None, Some(month))?;
            // Plain data serializes.
            serde_json::to_string_pretty(&invoices).expect("invoices serialize")
        }
        ExportFormat::Csv => csv(&store.invoices(None, Some(month))?),
        ExportFormat::CloudEvents => {
            let mut out = String::new();
            store.for_each_usage(month, |event| {
                out.push_str(&cloud_event(&event).to_string());
                out.push('\n');
            })?;
            out
        }
    })
}

/// Invoices as CSV.
pub(super) fn csv(invoices: &[Invoice]) -> String {
    let mut writer = ::csv::Writer::from_writer(Vec::new());
    let header = [
        "month",
        "account",
        "plan",
        "currency",
        "kind",
        "meter",
        "provider",
        "quantity",
        "included",
        "amount_minor",
        "amount",
        "status",
    ];
    // Writing to a Vec cannot fail.
    writer.write_record(header).expect("write to memory");
    for invoice in invoices {
        let digits = invoice.minor_digits;
        let mut row =
            |kind: &str, meter: &str, provider: &str, quantity: i64, included: i64, amount: i64| {
                writer
                    .write_record([
                        invoice.month.as_str(),
                        &invoice.account,
                        &invoice.plan,
                        &invoice.currency,
                        kind,
                        meter,
                        provider,
                        &quantity.to_string(),
                        &included.to_string(),
                        &amount.to_string(),
                        &format_minor(amount, digits),
                        &invoice.status,
                    ])
                    .expect("write to memory");
            };
        row("flat_fee", "", "", 0, 0, invoice.flat_fee);
        for line in &invoice.lines {
            row(
                "usage",
                line.meter.as_str(),
                "",
                line.quantity,
                line.included,
                line.amount,
            );
        }
        for charge in &invoice.provider_charges {
            row(
                "provider_charge",
                charge.meter.as_str(),
                &charge.provider,
                charge.quantity,
                0,
                charge.amount,
            );
        }
        for earning in &invoice.earnings {
            row(
                "earning",
                earning.meter.as_str(),
                &earning.consumer,
                earning.quantity,
                0,
                earning.net,
            );
        }
    }
    String::from_utf8(writer.into_inner().expect("flush to memory")).expect("CSV of UTF-8 fields")
}

/// One usage event as a CloudEvent (specversion 1.0).
pub(super) fn cloud_event(event: &UsageEvent) -> serde_json::Value {
    let time = chrono::DateTime::from_timestamp_millis(event.time)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "specversion": "1.0",
        "type": format!("herald.usage.{}", event.meter),
        "source": event.source,
        "id": event.key,
        "subject": event.account,
        "time": time,
        "datacontenttype": "application/json",
        "data": {
            "quantity": event.quantity,
            "meter": event.meter.as_str(),
            "provider": event.provider,
            "month": event.month,
        },
    })
}
