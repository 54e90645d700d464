//! Results are forwarded: a person registers in the web console, links a device,
//! subscribes it to a catalog entry that fails, and adds forwarding rules: a webhook
//! (failures only), an e-mail (every result) that they confirm with the code the real
//! SMTP server received, and an e-mail and an SMS rule they never confirm. The real
//! server then posts the failed result to the webhook, signed with the secret the
//! console showed once, and mails it through a real SMTP server that requires STARTTLS;
//! the console's delivery log shows them sent. The unconfirmed rules get their code and
//! nothing else.
//!
//! Everything goes through the documented contract: docs/CONSOLE.md for the pages and
//! forms, `herald-server catalog add` for the entry, `[forwarding]`, `[smtp]` and
//! `[sms]` in herald.toml (docs/OPERATIONS.md, "Forwarding").

use std::path::Path;
use std::time::Duration;

use herald_tests::console_client::{between, Console, Page};
use herald_tests::receivers::{HttpReceiver, Mail, SmtpReceiver};
use herald_tests::{wait_until, TempDir, TestServer};

const WAIT: Duration = Duration::from_secs(60);

/// The id and `data-confirmed` of the forwarding rule to `target` on the forwarding
/// page.
fn rule_row(page: &Page, target: &str) -> Option<(String, String)> {
    page.body
        .split("<tr data-destination=\"")
        .skip(1)
        .find_map(|row| {
            let row = row.split("</tr>").next()?;
            if !row.contains(&format!(": {target}<")) {
                return None;
            }
            let id = row.split('"').next()?.to_string();
            let confirmed = between(row, r#"data-confirmed=""#, "\"")?;
            Some((id, confirmed))
        })
}

/// The code in a confirmation mail.
fn mailed_code(mail: &Mail) -> Option<String> {
    let body = mail.body();
    let code: String = body
        .split("confirmation code is ")
        .nth(1)?
        .chars()
        .take(6)
        .collect();
    (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())).then_some(code)
}

fn is_code_mail(mail: &Mail) -> bool {
    mail.header("Subject").as_deref() == Some("Confirm forwarding to this address")
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body).as_ref())
}

/// `[forwarding]` for loopback receivers, `[sms]` for the test gateway, and `[smtp]` for
/// the test relay if there is one.
fn forwarding_config(smtp: Option<&SmtpReceiver>, gateway: &HttpReceiver) -> String {
    let mut extra = format!(
        "[forwarding]\nallow_http = true\nallow_private_targets = true\nfirst_retry_secs = 1\n\
         [sms]\nurl = {:?}\nbody = \"to={{to}}&text={{text}}\"\n",
        gateway.url("/sms")
    );
    if let Some(smtp) = smtp {
        extra.push_str(&format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"Herald <herald@example.org>\"\n\
             tls = \"starttls\"\nca_file = {:?}\n",
            smtp.port(),
            path_str(smtp.ca_file())
        ));
    }
    extra
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 temp path").to_string()
}

#[test]
fn failed_results_reach_the_webhook_signed_and_the_mailbox_over_starttls() {
    let receivers = TempDir::new("forwarded-receivers");
    // Without aiosmtpd the e-mail half is skipped (SmtpReceiver prints why); the
    // webhook half still runs.
    let smtp = SmtpReceiver::start(receivers.path());
    let webhook = HttpReceiver::answering(200);
    let gateway = HttpReceiver::answering(200);
    let server =
        TestServer::start_with_config("forwarded", &forwarding_config(smtp.as_ref(), &gateway));

    // The operator's catalog: a service that always fails.
    server.cli_ok(&[
        "catalog",
        "add",
        "always-fails",
        "--title",
        "Always fails",
        "--min-interval",
        "1s",
        "--",
        "/bin/false",
    ]);

    // A person registers (and is logged in), and links a device.
    let console = Console::new(&server);
    let mut agent =
        console.register_with_device(&server, "alice", "alice@example.org", "", "alices-pc");
    agent.spawn();
    agent.wait_online(&server);
    let devices = console.get("/devices");
    assert!(
        devices
            .body
            .contains(&format!(r#"data-agent="{}""#, agent.id)),
        "the linked device is listed"
    );

    // Forwarding rules first, so the very first result is forwarded.
    let hook_url = webhook.url("/herald");
    let added = console.submit(
        "/forwarding",
        "/forwarding",
        &[
            ("kind", "webhook"),
            ("target", hook_url.as_str()),
            ("only_failures", "1"),
            ("subscription", ""),
        ],
    );
    let secret = between(&added.body, r#"id="webhook-secret">"#, "</code>")
        .unwrap_or_else(|| panic!("the webhook secret is shown once:\n{}", added.body));
    let secret = secret.trim().to_string();
    assert!(secret.len() >= 32, "a long random secret: {secret:?}");
    assert!(
        !console.get("/forwarding").body.contains(&secret),
        "the secret is shown only once"
    );
    // A webhook rule needs no code.
    let page = console.get("/forwarding");
    let (_, confirmed) = rule_row(&page, &hook_url).expect("the webhook rule is listed");
    assert_eq!(confirmed, "1", "a webhook rule is confirmed from the start");

    // An SMS rule that is never confirmed: its number gets the code, and nothing else.
    console.submit(
        "/forwarding",
        "/forwarding",
        &[
            ("kind", "sms"),
            ("target", "+821012345678"),
            ("subscription", ""),
        ],
    );
    let texts = gateway.wait_requests_blocking(1, WAIT);
    let text = String::from_utf8_lossy(&texts[0].body).to_string();
    assert!(
        text.starts_with("to=%2B821012345678&text=Herald%20code%3A%20"),
        "the SMS carries the code and nothing else: {text}"
    );
    let page = console.get("/forwarding");
    let (_, confirmed) = rule_row(&page, "+821012345678").expect("the SMS rule is listed");
    assert_eq!(confirmed, "0");

    if let Some(smtp) = &smtp {
        // Two e-mail rules: alice confirms hers with the code the relay received; the
        // other address never gets confirmed.
        for target in ["alice@example.org", "mallory@example.org"] {
            console.submit(
                "/forwarding",
                "/forwarding",
                &[("kind", "email"), ("target", target), ("subscription", "")],
            );
        }
        let page = console.get("/forwarding");
        let (alice_rule, confirmed) =
            rule_row(&page, "alice@example.org").expect("alice's e-mail rule is listed");
        assert_eq!(confirmed, "0", "an e-mail rule starts unconfirmed");
        let code_mail = wait_until("the confirmation code mail", WAIT, || {
            smtp.mails()
                .into_iter()
                .find(|m| m.rcpt_tos == ["alice@example.org"] && is_code_mail(m))
        });
        assert!(code_mail.tls, "the code was mailed after STARTTLS");
        let code = mailed_code(&code_mail)
            .unwrap_or_else(|| panic!("no code in the mail:\n{}", code_mail.body()));

        // A wrong code is refused and counted; the mailed one confirms the rule.
        let wrong = if code == "000000" { "111111" } else { "000000" };
        let confirm = format!("/forwarding/{alice_rule}/confirm");
        let csrf = console.get("/forwarding").csrf();
        let refused = console.post(&confirm, &[("csrf", csrf.as_str()), ("code", wrong)]);
        assert_eq!(refused.status, 400, "a wrong code: {:?}", refused.error());
        assert!(
            refused.error().is_some_and(|e| e.contains("wrong")),
            "{:?}",
            refused.error()
        );
        // Without the form's csrf field the right code is not even looked at.
        let forged = console.post(&confirm, &[("code", code.as_str())]);
        assert_eq!(forged.status, 403, "a confirmation without csrf");
        let page = console.submit("/forwarding", &confirm, &[("code", code.as_str())]);
        let (_, confirmed) = rule_row(&page, "alice@example.org").expect("alice's rule");
        assert_eq!(confirmed, "1", "the mailed code confirms the rule");
        let (mallory_rule, confirmed) =
            rule_row(&page, "mallory@example.org").expect("the other rule");
        assert_eq!(confirmed, "0");

        // "Send a new code" sends another code, and still nothing else.
        let to_mallory = |mails: Vec<Mail>| {
            mails
                .into_iter()
                .filter(|m| m.rcpt_tos == ["mallory@example.org"])
                .count()
        };
        wait_until("the first code to mallory", WAIT, || {
            (to_mallory(smtp.mails()) == 1).then_some(())
        });
        console.submit(
            "/forwarding",
            &format!("/forwarding/{mallory_rule}/resend"),
            &[],
        );
        wait_until("a second code to mallory", WAIT, || {
            (to_mallory(smtp.mails()) == 2).then_some(())
        });
    }

    // Subscribe the device to the failing entry, every 2 s.
    console.submit(
        "/catalog/always-fails",
        "/subscriptions",
        &[
            ("entry", "always-fails"),
            ("device", agent.id.as_str()),
            ("kind", "every"),
            ("every", "2s"),
            ("cron", ""),
            ("tz", "UTC"),
            ("at", ""),
            ("missed", "skip"),
        ],
    );

    // The webhook gets the failed result, signed with the secret.
    let requests = webhook.wait_requests_blocking(1, WAIT);
    let hook = &requests[0];
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.path, "/herald");
    let expected = format!("sha256={}", hmac_hex(&secret, &hook.body));
    assert_eq!(
        hook.header("x-herald-signature"),
        Some(expected.as_str()),
        "the signature is HMAC-SHA256 of the exact body under the rule's secret"
    );
    let result = hook.json();
    assert_eq!(result["state"], "failed");
    assert_eq!(result["exit_code"], 1);
    assert_eq!(result["entry"], "Always fails");
    assert_eq!(result["agent_id"], agent.id.as_str());
    assert_eq!(result["agent_name"], "alices-pc");
    let job_id = result["job_id"].as_i64().expect("job_id is a number");
    assert!(result["finished_at"].as_i64().is_some());

    // The mail, over STARTTLS, with the same facts.
    if let Some(smtp) = &smtp {
        let mail = wait_until("the result mail", WAIT, || {
            smtp.mails().into_iter().find(|m| !is_code_mail(m))
        });
        assert!(mail.tls, "the mail was sent after STARTTLS");
        assert_eq!(mail.rcpt_tos, ["alice@example.org"]);
        assert_eq!(
            mail.header("Subject"),
            Some(format!("[Herald] Always fails: failed (job {job_id})"))
        );
        assert!(mail.body().contains("Exit code: 1"), "{}", mail.body());
    }

    // The console's delivery log shows the deliveries sent, and the job page its
    // forwarding attempts.
    let sent = if smtp.is_some() { 2 } else { 1 };
    wait_until("the delivery log to show the deliveries sent", WAIT, || {
        let log = console.get("/forwarding").body;
        (log.matches(r#"data-state="sent""#).count() >= sent).then_some(())
    });
    let job = console.get(&format!("/history/{job_id}"));
    assert_eq!(job.page_id().as_deref(), Some("job"));

    // The unconfirmed rules got their code and nothing else, and have no deliveries.
    let log = console.get("/forwarding").body;
    let deliveries = log.split(r#"<table id="deliveries">"#).nth(1).unwrap_or("");
    assert!(!deliveries.contains("+821012345678"), "{deliveries}");
    assert!(!deliveries.contains("mallory@example.org"), "{deliveries}");
    assert_eq!(gateway.requests().len(), 1, "only the code went by SMS");
    if let Some(smtp) = &smtp {
        for mail in smtp.mails() {
            if mail.rcpt_tos != ["alice@example.org"] {
                assert!(is_code_mail(&mail), "an unconfirmed address got {mail:?}");
            }
        }
    }

    // Results the rules exclude are not forwarded: the webhook takes failures only and
    // this entry always fails, so every webhook request is a failure.
    assert!(webhook
        .requests()
        .iter()
        .all(|r| r.json()["state"] == "failed"));
    agent.kill();
}
