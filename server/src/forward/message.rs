//! What a forwarded result says: the facts about a finished job, rendered for a webhook
//! (JSON), an e-mail (subject and text) and an SMS (one short line); the confirmation
//! code messages; and the SMS gateway's request template. Pure functions: no I/O.
//!
//! An SMS and an e-mail subject carry only what the operator or the server wrote (the
//! catalog entry's title, the state, the job id), never text from an agent or a visitor
//! (device names, errors, output, notes): those go to the e-mail body, which only a
//! confirmed address receives, and to the owner's own webhook.

use std::collections::BTreeMap;

use herald_shared::Millis;

use crate::config::{SmsBodyFormat, SmsConfig};
use crate::model::{Facts, STDOUT_EXCERPT_BYTES};

/// Longest SMS text (one classic SMS).
pub const SMS_MAX_CHARS: usize = 160;
/// Longest entry title in an e-mail subject.
const SUBJECT_ENTRY_MAX_CHARS: usize = 100;
/// Subject of the mail that carries a confirmation code.
pub(super) const CODE_EMAIL_SUBJECT: &str = "Confirm forwarding to this address";

// === impl Facts: how each medium says it (the record is `model::Facts`) ===

impl Facts {
    /// The webhook's JSON body. Its exact bytes are what the signature covers.
    pub fn webhook_body(&self) -> Vec<u8> {
        // Serializing a struct of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// E-mail subject: which entry, how it ended, which job. Fixed form, one line.
    pub fn email_subject(&self) -> String {
        format!(
            "[Herald] {}: {} (job {})",
            truncate_chars(&header_text(&self.entry), SUBJECT_ENTRY_MAX_CHARS),
            header_text(&self.state),
            self.job_id
        )
    }

    /// E-mail body (plain text).
    pub fn email_body(&self) -> String {
        let mut body = format!(
            "{} on {} ended: {}\n\nJob:       {}\nService:   {}\nDevice:    {} ({})\nState:     {}\n",
            self.entry,
            self.agent_name,
            self.state,
            self.job_id,
            self.entry,
            self.agent_name,
            self.agent_id,
            self.state,
        );
        if let Some(code) = self.exit_code {
            body.push_str(&format!("Exit code: {code}\n"));
        }
        if let Some(error) = &self.error {
            body.push_str(&format!("Error:     {error}\n"));
        }
        if let Some(outcome) = &self.outcome {
            body.push_str(&format!("Outcome:   {outcome}\n"));
        }
        if let Some(at) = self.finished_at {
            body.push_str(&format!("Finished:  {}\n", format_time(at)));
        }
        if !self.stdout.is_empty() {
            body.push_str(&format!(
                "\nOutput (first {} KiB):\n{}\n",
                STDOUT_EXCERPT_BYTES / 1024,
                self.stdout
            ));
        }
        body.push_str(
            "\n-- \nSent by Herald because of a forwarding rule confirmed for this address \
             in the console; delete the rule there to stop these mails.\n",
        );
        body
    }

    /// SMS text: the entry, the state and the job id, in one line of at most
    /// [`SMS_MAX_CHARS`] characters (the entry's title is shortened to fit).
    pub fn sms_text(&self) -> String {
        let tail = format!(": {} (job {})", header_text(&self.state), self.job_id);
        let head = "Herald: ";
        let room = SMS_MAX_CHARS.saturating_sub(head.chars().count() + tail.chars().count());
        let entry = truncate_chars(&header_text(&self.entry), room.max(1));
        truncate_chars(&format!("{head}{entry}{tail}"), SMS_MAX_CHARS)
    }
}

/// The mail that carries a confirmation code: fixed text around the code, in lines
/// short enough to be sent as they are.
pub(super) fn code_email_body(code: &str) -> String {
    format!(
        "Your Herald confirmation code is {code}\n\
         \n\
         Someone asked Herald to forward job results to this address.\n\
         Enter the code on the console's forwarding page within an hour\n\
         to confirm it.\n\
         \n\
         If that was not you, ignore this mail: nothing is forwarded to\n\
         this address unless the code is entered.\n"
    )
}

/// The SMS that carries a confirmation code.
pub(super) fn code_sms(code: &str) -> String {
    format!("Herald code: {code}")
}

/// Text for a header or an SMS: one line, with control characters (CR and LF among
/// them) dropped and runs of whitespace made one space.
pub(super) fn header_text(text: &str) -> String {
    one_line(&text.replace(|c: char| c.is_control() && !c.is_whitespace(), ""))
}

/// A time in milliseconds as RFC 3339 (UTC, seconds).
pub(super) fn format_time(at: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| at.to_string())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

// === SMS gateway template ===

/// The SMS gateway's request template (`[sms]`), checked at start.
#[derive(Debug, Clone, PartialEq)]
pub struct SmsTemplate {
    url: String,
    method: String,
    headers: BTreeMap<String, String>,
    body: Option<String>,
    format: SmsBodyFormat,
    id_pointer: Option<String>,
}

/// One rendered SMS gateway request.
#[derive(Debug, Clone, PartialEq)]
pub struct SmsRequest {
    /// HTTP method.
    pub method: String,
    /// URL with the placeholders filled in (percent-encoded).
    pub url: String,
    /// Headers: the configured ones, plus a content type for a body unless configured.
    pub headers: Vec<(String, String)>,
    /// Body, if the template has one.
    pub body: Option<String>,
}

impl SmsTemplate {
    /// The template of an `[sms]` section.
    pub fn new(config: &SmsConfig) -> SmsTemplate {
        SmsTemplate {
            url: config.url.clone(),
            method: config.method.to_ascii_uppercase(),
            headers: config.headers.clone(),
            body: config.body.clone(),
            format: config.body_format,
            id_pointer: config.id_pointer.clone(),
        }
    }

    /// The JSON pointer to the gateway's message id in its answer, if configured.
    pub fn id_pointer(&self) -> Option<&str> {
        self.id_pointer.as_deref()
    }

    /// Fills in `{to}` and `{text}`, encoded for where they stand.
    pub fn render(&self, to: &str, text: &str) -> SmsRequest {
        let url = substitute(&self.url, to, text, percent_encode);
        let body = self.body.as_ref().map(|body| match self.format {
            SmsBodyFormat::Form => substitute(body, to, text, percent_encode),
            SmsBodyFormat::Json => substitute(body, to, text, json_escape),
        });
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let has_type = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_type {
            let content_type = match self.format {
                SmsBodyFormat::Form => "application/x-www-form-urlencoded",
                SmsBodyFormat::Json => "application/json",
            };
            headers.push(("Content-Type".to_string(), content_type.to_string()));
        }
        SmsRequest {
            method: self.method.clone(),
            url,
            headers,
            body,
        }
    }
}

/// Replaces `{to}` and `{text}` in one pass, so that a message containing `{to}` is not
/// substituted again.
fn substitute(template: &str, to: &str, text: &str, encode: fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len() + to.len() + text.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("{to}") {
            out.push_str(&encode(to));
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{text}") {
            out.push_str(&encode(text));
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters: safe in a path, a
/// query and a form body alike.
fn percent_encode(value: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, RESERVED).to_string()
}

/// The inside of a JSON string literal (the template supplies the quotes).
fn json_escape(value: &str) -> String {
    let quoted = serde_json::Value::String(value.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            job_id: 42,
            agent_id: "a1b2".into(),
            agent_name: "laptop".into(),
            entry: "Virus scan".into(),
            state: "failed".into(),
            exit_code: Some(3),
            error: Some("exited with 3".into()),
            outcome: None,
            finished_at: Some(1_700_000_000_000),
            stdout: "found 2 threats\n".into(),
        }
    }

    #[test]
    fn webhook_json_has_the_documented_fields() {
        let value: serde_json::Value = serde_json::from_slice(&facts().webhook_body()).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "job_id",
            "agent_id",
            "agent_name",
            "entry",
            "state",
            "exit_code",
            "error",
            "outcome",
            "finished_at",
            "stdout",
        ];
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(value["job_id"], 42);
        assert_eq!(value["exit_code"], 3);
        assert_eq!(value["outcome"], serde_json::Value::Null);
        assert_eq!(value["finished_at"], 1_700_000_000_000i64);
    }

    #[test]
    fn email_carries_the_facts() {
        let f = facts();
        assert_eq!(f.email_subject(), "[Herald] Virus scan: failed (job 42)");
        let body = f.email_body();
        for needle in [
            "Job:       42",
            "Exit code: 3",
            "Error:     exited with 3",
            "Finished:  2023-11-14T22:13:20Z",
            "found 2 threats",
        ] {
            assert!(body.contains(needle), "{needle:?} missing from {body}");
        }
    }

    #[test]
    fn subject_and_sms_carry_no_agent_or_visitor_text() {
        let mut f = facts();
        f.agent_name = "CALL +1 555 0100 NOW".into();
        f.error = Some("Your account is locked: visit evil.example".into());
        f.outcome = Some("declined: click evil.example".into());
        f.stdout = "evil.example".into();
        for text in [f.email_subject(), f.sms_text()] {
            assert!(!text.contains("555") && !text.contains("evil"), "{text}");
        }
        assert_eq!(f.sms_text(), "Herald: Virus scan: failed (job 42)");
    }

    #[test]
    fn subject_and_sms_are_one_line_without_control_characters() {
        let mut f = facts();
        f.entry = "Scan\r\nBcc: x@example.org\u{0}\u{1b}[31m".into();
        for text in [f.email_subject(), f.sms_text()] {
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
        assert_eq!(
            f.email_subject(),
            "[Herald] Scan Bcc: x@example.org[31m: failed (job 42)"
        );
    }

    #[test]
    fn sms_is_one_short_line_and_keeps_the_job_id() {
        let mut f = facts();
        f.entry = "Very long title ".repeat(30);
        let text = f.sms_text();
        assert_eq!(text.chars().count(), SMS_MAX_CHARS);
        assert!(text.ends_with("…: failed (job 42)"), "{text}");
    }

    #[test]
    fn code_messages_are_fixed_text_around_the_code() {
        assert_eq!(code_sms("123456"), "Herald code: 123456");
        let body = code_email_body("123456");
        assert!(body.starts_with("Your Herald confirmation code is 123456\n"));
        assert!(body.lines().all(|l| l.len() < 76), "{body}");
        assert_eq!(CODE_EMAIL_SUBJECT, "Confirm forwarding to this address");
    }

    fn template(url: &str, body: Option<&str>, format: SmsBodyFormat) -> SmsTemplate {
        SmsTemplate::new(&SmsConfig {
            url: url.into(),
            method: "post".into(),
            headers: [("Authorization".to_string(), "Bearer k".to_string())].into(),
            body: body.map(str::to_string),
            body_format: format,
            id_pointer: None,
            report_secret: None,
        })
    }

    #[test]
    fn sms_form_template_percent_encodes() {
        let t = template(
            "https://gw.example/send?to={to}&msg={text}",
            Some("to={to}&text={text}&from=Herald"),
            SmsBodyFormat::Form,
        );
        let r = t.render("+821012345678", "a&b=c d/é {to}");
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.url,
            "https://gw.example/send?to=%2B821012345678&msg=a%26b%3Dc%20d%2F%C3%A9%20%7Bto%7D"
        );
        assert_eq!(
            r.body.as_deref(),
            Some("to=%2B821012345678&text=a%26b%3Dc%20d%2F%C3%A9%20%7Bto%7D&from=Herald")
        );
        assert!(r.headers.contains(&(
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into()
        )));
        assert!(r
            .headers
            .contains(&("Authorization".into(), "Bearer k".into())));
    }

    #[test]
    fn sms_json_template_escapes_and_stays_valid_json() {
        let t = template(
            "https://gw.example/send",
            Some(r#"{"to": "{to}", "text": "{text}", "flash": false}"#),
            SmsBodyFormat::Json,
        );
        let text = "say \"hi\"\n\\ {text} é";
        let r = t.render("+15551234567", text);
        let body: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["to"], "+15551234567");
        assert_eq!(body["text"], text);
        assert_eq!(body["flash"], false);
        assert!(r
            .headers
            .contains(&("Content-Type".into(), "application/json".into())));
    }

    #[test]
    fn configured_content_type_wins_and_no_body_means_no_type() {
        let mut config = SmsConfig {
            url: "https://gw.example/{to}".into(),
            method: "GET".into(),
            headers: [("content-type".to_string(), "text/plain".to_string())].into(),
            body: Some("{text}".into()),
            body_format: SmsBodyFormat::Form,
            id_pointer: None,
            report_secret: None,
        };
        let r = SmsTemplate::new(&config).render("+15551234567", "x");
        assert_eq!(r.headers.len(), 1);
        config.body = None;
        config.headers.clear();
        let r = SmsTemplate::new(&config).render("+15551234567", "x");
        assert!(r.headers.is_empty());
        assert_eq!(r.body, None);
        assert_eq!(r.url, "https://gw.example/%2B15551234567");
    }
}
