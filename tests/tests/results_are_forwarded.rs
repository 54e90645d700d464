//! Results are forwarded: a person registers in the web console, links a device,
//! subscribes it to a catalog entry that fails, and adds two forwarding rules: a
//! webhook (failures only) and an e-mail (every result). The real server then posts the
//! failed result to the webhook, signed with the secret the console showed once, and
//! mails it through a real SMTP server that requires STARTTLS; the console's delivery
//! log shows them sent.
//!
//! Everything goes through the documented contract: docs/CONSOLE.md for the pages and
//! forms, `herald-server catalog add` for the entry, `[forwarding]` and `[smtp]` in
//! herald.toml (docs/OPERATIONS.md, "Forwarding").

use std::path::Path;
use std::time::Duration;

use rustls::pki_types::{pem::PemObject, CertificateDer};

use herald_tests::receivers::{HttpReceiver, SmtpReceiver};
use herald_tests::{wait_until, TempDir, TestAgent, TestServer};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "correct horse battery";

/// A browser-like client of the console: cookies, the server's CA, forms.
struct Console {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

/// A page: final status (after redirects), final URL and body.
struct Page {
    status: u16,
    url: String,
    body: String,
}

impl Page {
    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        between(&self.body, r#"name="csrf" value=""#, "\"")
            .unwrap_or_else(|| panic!("no csrf field on {}:\n{}", self.url, self.body))
    }

    fn page_id(&self) -> Option<String> {
        between(&self.body, r#"<main id="page-"#, "\"")
    }

    fn error(&self) -> Option<String> {
        between(&self.body, r#"id="error">"#, "<")
    }
}

impl Console {
    fn new(server: &TestServer) -> Console {
        let ca = std::fs::read(server.data_dir().join("ca.pem")).expect("read the server CA");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .cookie_store(true)
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        Console {
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
            client,
            base: server.https_url(),
        }
    }

    fn get(&self, path: &str) -> Page {
        let request = self.client.get(format!("{}{path}", self.base));
        self.send(request)
    }

    fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .form(fields);
        self.send(request)
    }

    fn send(&self, request: reqwest::RequestBuilder) -> Page {
        self.runtime.block_on(async {
            let response = request.send().await.expect("console request");
            let status = response.status().as_u16();
            let url = response.url().to_string();
            let body = response.text().await.expect("console body");
            Page { status, url, body }
        })
    }

    /// Posts a form from the page at `form_page` (for its csrf token) and expects it to
    /// be accepted (a redirect to a page without an error).
    fn submit(&self, form_page: &str, path: &str, fields: &[(&str, &str)]) -> Page {
        let csrf = self.get(form_page).csrf();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        let page = self.post(path, &all);
        assert!(
            page.status == 200 && page.error().is_none(),
            "POST {path} was refused ({}): {:?}{}\n{}",
            page.status,
            page.error(),
            if page.error().is_some_and(|e| e.contains("https://")) {
                " (the console must take `http:` webhooks when [forwarding] allow_http is set)"
            } else {
                ""
            },
            page.body
        );
        page
    }
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(text[from..to].to_string())
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body).as_ref())
}

/// `[forwarding]` for loopback receivers, and `[smtp]` for the test relay if there is one.
fn forwarding_config(smtp: Option<&SmtpReceiver>) -> String {
    let mut extra = String::from(
        "[forwarding]\nallow_http = true\nallow_private_targets = true\nfirst_retry_secs = 1\n",
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
    let server = TestServer::start_with_config("forwarded", &forwarding_config(smtp.as_ref()));

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
    let register = console.get("/register");
    let registered = console.post(
        "/register",
        &[
            ("csrf", register.csrf().as_str()),
            ("login", "alice"),
            ("password", PASSWORD),
            ("password2", PASSWORD),
            ("email", "alice@example.org"),
            ("phone", ""),
        ],
    );
    assert_eq!(
        registered.page_id().as_deref(),
        Some("devices"),
        "registration lands on the devices page: {:?}",
        registered.error()
    );
    let link = console.submit("/devices", "/devices/link", &[]);
    let token = between(&link.body, r#"<code id="enroll-token">"#, "</code>")
        .unwrap_or_else(|| panic!("no enrollment token on the link page:\n{}", link.body));
    let mut agent = TestAgent::enroll_with_token(&server, "alices-pc", token.trim());
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
    if smtp.is_some() {
        console.submit(
            "/forwarding",
            "/forwarding",
            &[
                ("kind", "email"),
                ("target", "alice@example.org"),
                ("subscription", ""),
            ],
        );
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
        let mails = smtp.wait_mails_blocking(1, WAIT);
        let mail = &mails[0];
        assert!(mail.tls, "the mail was sent after STARTTLS");
        assert_eq!(mail.rcpt_tos, ["alice@example.org"]);
        assert_eq!(
            mail.header("Subject").as_deref(),
            Some("[Herald] Always fails on alices-pc: failed")
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

    // Results the rules exclude are not forwarded: the webhook takes failures only and
    // this entry always fails, so every webhook request is a failure.
    assert!(webhook
        .requests()
        .iter()
        .all(|r| r.json()["state"] == "failed"));
    agent.kill();
}
