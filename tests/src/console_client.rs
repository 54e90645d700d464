//! A browser-like HTTP client of the web console for end-to-end tests that need no real
//! browser: cookies, the server's CA, forms with their CSRF tokens.

use std::time::Duration;

use rustls::pki_types::{pem::PemObject, CertificateDer};

use crate::TestServer;

/// A browser-like client of the console: cookies, the server's CA, forms.
pub struct Console {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

/// A page: final status (after redirects), final URL and body.
pub struct Page {
    /// Status.
    pub status: u16,
    /// URL.
    pub url: String,
    /// Body.
    pub body: String,
}

impl Page {
    /// The value of the first hidden `csrf` field.
    pub fn csrf(&self) -> String {
        between(&self.body, r#"name="csrf" value=""#, "\"")
            .unwrap_or_else(|| panic!("no csrf field on {}:\n{}", self.url, self.body))
    }

    /// The page id (`<main id="page-NAME">`).
    pub fn page_id(&self) -> Option<String> {
        between(&self.body, r#"<main id="page-"#, "\"")
    }

    /// The error message shown on the page, if any.
    pub fn error(&self) -> Option<String> {
        between(&self.body, r#"id="error">"#, "<")
    }
}

impl Console {
    /// A client of `server`'s console, trusting only the server's CA.
    pub fn new(server: &TestServer) -> Console {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(server_tls(server))
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

    /// Registers `login` (logged in afterwards, on the devices page) and links a device
    /// named `device` with the personal token the console hands out; returns the
    /// enrolled agent, not started.
    pub fn register_with_device(
        &self,
        server: &TestServer,
        login: &str,
        email: &str,
        phone: &str,
        device: &str,
    ) -> crate::TestAgent {
        self.register(login, email, phone);
        let link = self.submit("/devices", "/devices/link", &[]);
        let token = between(&link.body, r#"<code id="enroll-token">"#, "</code>")
            .unwrap_or_else(|| panic!("no enrollment token on the link page:\n{}", link.body));
        crate::TestAgent::enroll_with_token(server, device, token.trim())
    }

    /// Registers `login`, who is logged in afterwards, on the devices page.
    pub fn register(&self, login: &str, email: &str, phone: &str) {
        const PASSWORD: &str = "a good long password";
        let register = self.get("/register");
        let registered = self.post(
            "/register",
            &[
                ("csrf", register.csrf().as_str()),
                ("login", login),
                ("password", PASSWORD),
                ("password2", PASSWORD),
                ("email", email),
                ("phone", phone),
            ],
        );
        assert_eq!(
            registered.page_id().as_deref(),
            Some("devices"),
            "registration lands on the devices page: {:?}",
            registered.error()
        );
    }

    /// GET an admin API resource with the admin token from the server's `admin.toml`.
    pub fn admin_get(&self, server: &TestServer, path: &str) -> Page {
        let admin =
            std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("read admin.toml");
        let token = admin
            .lines()
            .find_map(|l| l.strip_prefix("admin_token = "))
            .expect("admin_token in admin.toml")
            .trim_matches('"');
        let request = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token);
        self.send(request)
    }

    /// GET, following redirects.
    pub fn get(&self, path: &str) -> Page {
        let request = self.client.get(format!("{}{path}", self.base));
        self.send(request)
    }

    /// POST a form, following redirects.
    pub fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .form(fields);
        self.send(request)
    }

    /// Sends a request on the client's runtime.
    pub fn send(&self, request: reqwest::RequestBuilder) -> Page {
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
    pub fn submit(&self, form_page: &str, path: &str, fields: &[(&str, &str)]) -> Page {
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

/// A TLS client configuration that trusts only `server`'s CA (its `ca.pem`), for
/// clients of its HTTPS API and console.
pub fn server_tls(server: &TestServer) -> rustls::ClientConfig {
    let ca = std::fs::read(server.data_dir().join("ca.pem")).expect("read the server CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// The text between the first `start` and the next `end`.
pub fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(text[from..to].to_string())
}
