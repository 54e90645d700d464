//! Sending one delivery or confirmation code: e-mail through the `[smtp]` relay
//! (lettre, rustls), a signed webhook POST, or an SMS through the `[sms]` gateway
//! (reqwest, rustls). Every send is bounded by the attempt timeout and reports an
//! [`Attempt`]; nothing here retries.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{SmtpConfig, SmtpTls};

use crate::model::{excerpt, CodeMessage, Kind, Outgoing};

use super::message::{self, SmsTemplate};
use super::queue::Attempt;
use super::Settings;

/// Header carrying the webhook signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Herald-Signature";
/// User agent of webhook and gateway requests.
const USER_AGENT: &str = concat!("herald-server/", env!("CARGO_PKG_VERSION"));
/// How much of an error response body an attempt's detail quotes (the rest is not
/// read).
const RESPONSE_EXCERPT_BYTES: usize = 200;
/// How long the excerpt of an error response body is waited for: the status already
/// says the attempt failed.
const RESPONSE_EXCERPT_TIME: Duration = Duration::from_secs(2);
/// Limit on connecting to a webhook or the SMS gateway (within the attempt timeout): a
/// host that does not even accept the connection gives its slot back soon.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Signs a webhook body: the value of [`SIGNATURE_HEADER`].
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// The e-mail relay: a transport and the sender address.
struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// Everything that sends: built once from the settings.
pub(crate) struct Senders {
    /// For webhooks: refuses private addresses unless allowed.
    webhook: Result<reqwest::Client, String>,
    /// For the operator's SMS gateway.
    gateway: Result<reqwest::Client, String>,
    /// `None`: no `[smtp]` section. `Some(Err)`: the section cannot be used (why).
    mailer: Option<Result<Mailer, String>>,
    sms: Option<SmsTemplate>,
    allow_http: bool,
    allow_private_targets: bool,
    timeout: Duration,
}

impl Senders {
    /// Builds the clients. A part that cannot be built fails its deliveries with the
    /// reason instead of stopping the forwarder (the configuration was checked at
    /// start, so this means, e.g., that `ca_file` disappeared since).
    pub(crate) fn new(settings: &Settings) -> Senders {
        let webhook = http_client(
            settings.timeout,
            (!settings.allow_private_targets).then_some(PublicOnly),
        );
        let gateway = http_client(settings.timeout, None);
        Senders {
            webhook,
            gateway,
            mailer: settings
                .smtp
                .as_ref()
                .map(|smtp| mailer(smtp, settings.timeout)),
            sms: settings.sms.as_ref().map(SmsTemplate::new),
            allow_http: settings.allow_http,
            allow_private_targets: settings.allow_private_targets,
            timeout: settings.timeout,
        }
    }

    /// Makes one attempt, within the timeout.
    pub(crate) async fn send(&self, out: &Outgoing) -> Attempt {
        if !out.rule_exists {
            return Attempt::refused("the forwarding rule was deleted");
        }
        if !out.rule_confirmed && out.kind.is_none_or(Kind::needs_confirmation) {
            return Attempt::refused("the forwarding rule is not confirmed");
        }
        let send = async {
            match out.kind {
                Some(Kind::Email) => {
                    let subject = out.facts.email_subject();
                    self.email(&out.target, &subject, out.facts.email_body())
                        .await
                }
                Some(Kind::Webhook) => self.webhook(out).await,
                Some(Kind::Sms) => self.sms(&out.target, &out.facts.sms_text()).await,
                None => Attempt::refused("unknown destination kind"),
            }
        };
        self.bounded(send).await
    }

    /// Sends a confirmation code, within the timeout.
    pub(crate) async fn send_code(&self, code: &CodeMessage) -> Attempt {
        let send = async {
            match code.kind {
                Kind::Email => {
                    self.email(
                        &code.target,
                        message::CODE_EMAIL_SUBJECT,
                        message::code_email_body(&code.code),
                    )
                    .await
                }
                Kind::Sms => self.sms(&code.target, &message::code_sms(&code.code)).await,
                Kind::Webhook => Attempt::refused("webhook rules have no code"),
            }
        };
        self.bounded(send).await
    }

    /// Like [`Senders::bounded`], for a send that also returns the gateway's id.
    pub(super) async fn bounded_with_id(
        &self,
        send: impl std::future::Future<Output = (Attempt, Option<String>)>,
    ) -> (Attempt, Option<String>) {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(done) => done,
            Err(_) => (
                Attempt::unanswered(format!("no answer within {} s", self.timeout.as_secs_f32())),
                None,
            ),
        }
    }

    pub(super) async fn bounded(
        &self,
        send: impl std::future::Future<Output = Attempt>,
    ) -> Attempt {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(attempt) => attempt,
            Err(_) => {
                Attempt::unanswered(format!("no answer within {} s", self.timeout.as_secs_f32()))
            }
        }
    }

    pub(super) async fn email(&self, target: &str, subject: &str, body: String) -> Attempt {
        let mailer = match &self.mailer {
            None => return Attempt::refused("e-mail is not set up on this server (no [smtp])"),
            Some(Err(reason)) => return Attempt::refused(reason.clone()),
            Some(Ok(mailer)) => mailer,
        };
        let message = match build_email(mailer.from.clone(), target, subject, body) {
            Ok(message) => message,
            Err(reason) => return Attempt::refused(reason),
        };
        match mailer.transport.send(message).await {
            Ok(reply) => Attempt::sent(format!(
                "SMTP {} {}",
                reply.code(),
                reply.message().next().unwrap_or_default()
            )),
            Err(e) => Attempt::failed(format!("SMTP: {}", error_chain(&e))),
        }
    }

    async fn webhook(&self, out: &Outgoing) -> Attempt {
        let client = match &self.webhook {
            Ok(client) => client,
            Err(reason) => return Attempt::refused(reason.clone()),
        };
        let Some(secret) = out.secret.as_deref() else {
            return Attempt::refused("the webhook rule has no secret");
        };
        if let Err(reason) = super::check_target("webhook", &out.target, self.allow_http) {
            return Attempt::refused(reason);
        }
        let url = match reqwest::Url::parse(&out.target) {
            Ok(url) => url,
            Err(e) => return Attempt::refused(format!("bad URL: {e}")),
        };
        // Literal addresses skip the resolver, so they are checked here.
        if !self.allow_private_targets {
            if let Some(ip) = literal_ip(&url) {
                if !is_public(ip) {
                    return Attempt::refused(format!(
                        "{ip} is not a public address (set [forwarding] allow_private_targets)"
                    ));
                }
            }
        }
        let body = out.facts.webhook_body();
        let request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(secret, &body))
            .body(body);
        http_attempt(request).await
    }

    async fn sms(&self, target: &str, text: &str) -> Attempt {
        self.sms_with_id(target, text).await.0
    }

    /// Sends an SMS; with `[sms] id_pointer`, also returns the gateway's id for it
    /// (from its answer), which its delivery reports name.
    pub(super) async fn sms_with_id(&self, target: &str, text: &str) -> (Attempt, Option<String>) {
        let Some(template) = &self.sms else {
            return (
                Attempt::refused("SMS is not set up on this server (no [sms])"),
                None,
            );
        };
        let client = match &self.gateway {
            Ok(client) => client,
            Err(reason) => return (Attempt::refused(reason.clone()), None),
        };
        let request = template.render(target, text);
        let method = match reqwest::Method::from_bytes(request.method.as_bytes()) {
            Ok(method) => method,
            Err(_) => {
                return (
                    Attempt::refused(format!("bad method {:?}", request.method)),
                    None,
                )
            }
        };
        let mut builder = client.request(method, &request.url);
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        http_send(builder, template.id_pointer()).await
    }
}

/// A plain-text e-mail. The subject is made one line without control characters
/// here too (lettre would encode a CR or LF rather than end the header with it, but the
/// subject is ours to keep to one line); the recipient must parse as one address.
pub(super) fn build_email(
    from: Mailbox,
    target: &str,
    subject: &str,
    body: String,
) -> Result<Message, String> {
    let to: Mailbox = target
        .parse()
        .map_err(|e| format!("bad address {target:?}: {e}"))?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(message::header_text(subject))
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot build the message: {e}"))
}

/// Sends a request: a 2xx status is delivered, anything else failed.
async fn http_attempt(request: reqwest::RequestBuilder) -> Attempt {
    http_send(request, None).await.0
}

/// Sends a request; on a 2xx answer with `id_pointer`, the string or number at that
/// JSON pointer in the answer's body is returned with it.
async fn http_send(
    request: reqwest::RequestBuilder,
    id_pointer: Option<&str>,
) -> (Attempt, Option<String>) {
    match request.send().await {
        Ok(mut response) => {
            let status = response.status();
            if status.is_success() {
                let sent = Attempt::sent(format!("HTTP {}", status.as_u16()));
                let Some(pointer) = id_pointer else {
                    return (sent, None);
                };
                let mut body = Vec::new();
                while body.len() < MAX_ID_ANSWER {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        Ok(None) | Err(_) => break,
                    }
                }
                let id = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| match v.pointer(pointer) {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    })
                    .filter(|id| !id.is_empty() && id.len() <= 200);
                let sent = match &id {
                    Some(id) => Attempt::sent(format!("HTTP {} id {id}", status.as_u16())),
                    None => Attempt::sent(format!(
                        "HTTP {} (no message id at {pointer} in the answer: no delivery report will match)",
                        status.as_u16()
                    )),
                };
                return (sent, id);
            }
            // Only the start of the body, and only briefly: an endpoint could send an
            // endless one. Dropping the response drops the rest unread.
            let mut body = Vec::new();
            let read = async {
                while body.len() < RESPONSE_EXCERPT_BYTES {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            let _ = tokio::time::timeout(RESPONSE_EXCERPT_TIME, read).await;
            drop(response);
            let excerpt = excerpt(&body, RESPONSE_EXCERPT_BYTES);
            let excerpt = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
            let attempt = if excerpt.is_empty() {
                Attempt::failed(format!("HTTP {}", status.as_u16()))
            } else {
                Attempt::failed(format!("HTTP {}: {excerpt}", status.as_u16()))
            };
            (attempt, None)
        }
        // Without the URL: a webhook URL may itself be a secret (and the logs are the
        // operator's). Only a connection that was never made surely carried nothing.
        Err(e) if e.is_connect() => (Attempt::failed(error_chain(&e.without_url())), None),
        Err(e) => (Attempt::unanswered(error_chain(&e.without_url())), None),
    }
}

/// Longest gateway answer read for its message id.
const MAX_ID_ANSWER: usize = 64 * 1024;

/// An error with its causes ("error sending request: connection refused").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// An HTTP client: web roots, no redirects (a redirect would re-post the result
/// somewhere the rule did not name), no proxy, bounded time.
fn http_client(timeout: Duration, resolver: Option<PublicOnly>) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crate::pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(timeout));
    if let Some(resolver) = resolver {
        builder = builder.dns_resolver(Arc::new(resolver));
    }
    builder
        .build()
        .map_err(|e| format!("HTTP client setup: {}", error_chain(&e)))
}

/// The e-mail relay from `[smtp]`.
fn mailer(smtp: &SmtpConfig, timeout: Duration) -> Result<Mailer, String> {
    let from: Mailbox = smtp
        .from
        .parse()
        .map_err(|e| format!("[smtp] from {:?}: {e}", smtp.from))?;
    let tls = match smtp.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::Starttls => Tls::Required(tls_parameters(smtp)?),
        SmtpTls::Tls => Tls::Wrapper(tls_parameters(smtp)?),
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.as_str())
        .port(smtp.port())
        .tls(tls)
        .timeout(Some(timeout));
    if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    Ok(Mailer {
        transport: builder.build(),
        from,
    })
}

/// TLS to the relay: web roots plus the CAs of `ca_file`, host name checked.
fn tls_parameters(smtp: &SmtpConfig) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(smtp.host.clone());
    if let Some(path) = &smtp.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("[smtp] ca_file {}: {e}", path.display()))?;
        let cert = Certificate::from_pem(&pem)
            .map_err(|e| format!("[smtp] ca_file {}: {e}", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build_rustls()
        .map_err(|e| format!("[smtp] TLS setup: {e}"))
}

/// Checks that a file holds at least one PEM certificate.
pub(crate) fn check_ca_file(path: &std::path::Path) -> Result<(), String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

// === impl PublicOnly ===

/// A resolver that drops loopback, private, link-local and other non-public addresses,
/// so a webhook cannot reach into the server's own network.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} has no public address (set [forwarding] allow_private_targets)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether an address is on the public internet (not loopback, private, link-local,
/// shared, multicast, documentation or unspecified). An IPv6 address that carries an
/// IPv4 address (IPv4-mapped, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by that
/// IPv4 address; the IPv6 ranges that embed one less plainly or reach only a local
/// network (IPv4-compatible `::/96`, IPv4-translated `::ffff:0:0/96`, local-use NAT64
/// `64:ff9b:1::/48`, Teredo `2001::/32`, site-local `fec0::/10`) are not public.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_ipv4(v6) {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // ::/96, IPv4-compatible (deprecated; also holds :: and ::1).
                || s[..6] == [0; 6]
                // ::ffff:0:0/96, IPv4-translated.
                || s[..6] == [0, 0, 0, 0, 0xffff, 0]
                // 64:ff9b:1::/48, local-use NAT64 (the IPv4 address sits where the
                // local prefix length says).
                || s[..3] == [0x64, 0xff9b, 1]
                // 2001::/32, Teredo (the client's IPv4 address is obfuscated inside).
                || s[..2] == [0x2001, 0]
                // 2001:db8::/32, documentation.
                || s[..2] == [0x2001, 0x0db8]
                // 100::/64, discard-only.
                || s[..4] == [0x100, 0, 0, 0]
                // fc00::/7 unique local, fe80::/10 link-local, fec0::/10 site-local.
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0)
        }
    }
}

/// The IPv4 address an IPv6 address carries in a well-known place: IPv4-mapped
/// `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, and 6to4 `2002:AABB:CCDD::/48`.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let octets = v6.octets();
    let last = || std::net::Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(v4)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(last())
    } else if s[0] == 0x2002 {
        Some(std::net::Ipv4Addr::new(
            octets[2], octets[3], octets[4], octets[5],
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex_over_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "198.18.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_that_embed_a_private_ipv4_address_are_not_public() {
        for ip in [
            // NAT64, well-known prefix.
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::169.254.169.254",
            "64:ff9b::192.168.0.1",
            // 6to4: 2002:AABB:CCDD:: carries AA.BB.CC.DD.
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101:1::1",
            // IPv4-compatible (deprecated) and IPv4-translated.
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "::ffff:0:8.8.8.8",
            // Local-use NAT64, whatever it carries.
            "64:ff9b:1::808:808",
            "64:ff9b:1:a00::1",
            // Teredo, whatever it carries.
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001::f5ff:fffe",
            // Site-local, discard-only.
            "fec0::1",
            "feff::1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_that_embed_a_public_ipv4_address_are_judged_by_it() {
        for ip in [
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:4860:4860::8888",
            "2a00:1450::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        assert_eq!(
            embedded_ipv4("2002:c0a8:101::1".parse().unwrap()),
            Some("192.168.1.1".parse().unwrap())
        );
        assert_eq!(
            embedded_ipv4("64:ff9b::a00:1".parse().unwrap()),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(embedded_ipv4("2606:4700::1".parse().unwrap()), None);
    }

    #[test]
    fn a_subject_cannot_add_headers() {
        let from: Mailbox = "Herald <herald@example.org>".parse().unwrap();
        let message = build_email(
            from,
            "ann@example.org",
            "[Herald] Scan\r\nBcc: evil@example.org\r\n\r\nbody: failed (job 1)",
            "text\n".into(),
        )
        .unwrap();
        let formatted = String::from_utf8(message.formatted()).unwrap();
        let head = formatted.split("\r\n\r\n").next().unwrap();
        assert!(
            !head
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc")),
            "{head}"
        );
        assert!(
            head.contains("Subject: [Herald] Scan Bcc: evil@example.org body: failed (job 1)"),
            "{head}"
        );
        // A recipient is exactly one address.
        for target in [
            "a@example.org, b@example.org",
            "a@example.org\r\nBcc: b@x.org",
        ] {
            let from: Mailbox = "herald@example.org".parse().unwrap();
            assert!(
                build_email(from, target, "s", String::new()).is_err(),
                "{target}"
            );
        }
    }
}
