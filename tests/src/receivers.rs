//! Receivers for forwarded results and campaign fallbacks, on loopback only: an HTTP
//! server that records each request and answers as the test says (or never), a real
//! SMTP server with STARTTLS (Python's `aiosmtpd`, under a certificate from a throwaway
//! test CA) that records the mail it accepts, and an SMS gateway stand-in that answers
//! with message ids and calls the server back with delivery reports. All run beside the
//! test, so synchronous and async tests can use them alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

/// Largest request head the HTTP receiver reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the HTTP receiver reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// How the HTTP receiver answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status code.
    Status(u16),
    /// Read the request, then never answer (and keep the connection open).
    Hang,
}

/// One request the HTTP receiver read.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers in the order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// Body bytes, exactly as received.
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value (names compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// An HTTP/1.1 server on `127.0.0.1` that records requests. The n-th request (from 0)
/// is answered by `replies[n]`, later ones by `then`.
pub struct HttpReceiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    count: watch::Receiver<usize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpReceiver {
    /// Starts a receiver with a script of replies.
    pub fn start(replies: Vec<Reply>, then: Reply) -> HttpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0usize);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let recorded = requests.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let count_tx = Arc::new(count_tx);
                let mut next = 0usize;
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let recorded = recorded.clone();
                        let count_tx = count_tx.clone();
                        let replies = replies.clone();
                        let ordinal = next;
                        next += 1;
                        tokio::spawn(async move {
                            serve_one(stream, recorded, count_tx, replies, then, ordinal).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops the hanging connections too.
        });
        HttpReceiver {
            addr,
            requests,
            count,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// A receiver that answers every request with `status`.
    pub fn answering(status: u16) -> HttpReceiver {
        HttpReceiver::start(Vec::new(), Reply::Status(status))
    }

    /// A receiver that reads requests and never answers.
    pub fn hanging() -> HttpReceiver {
        HttpReceiver::start(Vec::new(), Reply::Hang)
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The requests read so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` requests were read; panics after `deadline`.
    pub async fn wait_requests(&self, n: usize, deadline: Duration) -> Vec<Request> {
        let mut count = self.count.clone();
        let waited = tokio::time::timeout(deadline, count.wait_for(|c| *c >= n)).await;
        match waited {
            Ok(Ok(_)) => self.requests(),
            _ => panic!(
                "timed out after {deadline:?} waiting for {n} request(s) at {}; got {}",
                self.addr,
                self.requests().len()
            ),
        }
    }

    /// [`HttpReceiver::wait_requests`] for synchronous tests.
    pub fn wait_requests_blocking(&self, n: usize, deadline: Duration) -> Vec<Request> {
        let what = format!("{n} request(s) at {}", self.addr);
        crate::wait_until(&what, deadline, || {
            let requests = self.requests();
            (requests.len() >= n).then_some(requests)
        })
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_one(
    mut stream: tokio::net::TcpStream,
    recorded: Arc<Mutex<Vec<Request>>>,
    count: Arc<watch::Sender<usize>>,
    replies: Vec<Reply>,
    then: Reply,
    ordinal: usize,
) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    recorded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request);
    count.send_modify(|c| *c += 1);
    match replies.get(ordinal).copied().unwrap_or(then) {
        Reply::Status(code) => {
            let body = format!("receiver answers {code}\n");
            let response = format!(
                "HTTP/1.1 {code} Test\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Reply::Hang => std::future::pending::<()>().await,
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_BODY {
        return None;
    }
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(64 * 1024)];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    body.truncate(length);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

// === SMTP ===

/// One mail the SMTP receiver accepted.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Mail {
    /// Envelope sender.
    pub mail_from: String,
    /// Envelope recipients.
    pub rcpt_tos: Vec<String>,
    /// The message as received (headers and body).
    pub data: String,
    /// The session had switched to TLS (STARTTLS) before the mail was sent.
    pub tls: bool,
}

impl Mail {
    /// A header's (unfolded) value.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self
            .data
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .replace("\r\n ", " ")
            .replace("\r\n\t", " ");
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }

    /// The body (after the header block).
    pub fn body(&self) -> String {
        self.data
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }

    /// The body's text: decoded if it was sent quoted-printable (as lettre does for
    /// long lines), else as it is.
    pub fn text(&self) -> String {
        let body = self.body();
        let quoted = self
            .header("Content-Transfer-Encoding")
            .is_some_and(|e| e.eq_ignore_ascii_case("quoted-printable"));
        if !quoted {
            return body;
        }
        let joined = body.replace("=\r\n", "");
        let bytes = joined.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'=')
                .then(|| bytes.get(i + 1..i + 3))
                .flatten()
                .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
            match escaped {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The Python side of [`SmtpReceiver`]: aiosmtpd with STARTTLS required, writing each
/// accepted mail as JSON into the spool directory; it exits when its stdin closes (the
/// test ended, however it ended).
const SMTP_SCRIPT: &str = r#"
import json, os, ssl, sys
from aiosmtpd.controller import Controller

cert, key, port, spool = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)

class Handler:
    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": envelope.content.decode("utf-8", "replace"),
            "tls": session.ssl is not None,
        }
        path = os.path.join(spool, "%04d.json" % self.count)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 Accepted by the test receiver"

controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                        tls_context=context, require_starttls=True)
controller.start()
print("ready", flush=True)
try:
    sys.stdin.read()
finally:
    controller.stop()
"#;

/// Whether Python's `aiosmtpd` can be imported.
pub fn aiosmtpd_available() -> bool {
    Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A real SMTP server on `127.0.0.1` requiring STARTTLS, with a certificate for
/// `127.0.0.1` and `localhost` from a test CA ([`SmtpReceiver::ca_file`]).
pub struct SmtpReceiver {
    child: Child,
    port: u16,
    spool: PathBuf,
    ca_file: PathBuf,
}

impl SmtpReceiver {
    /// Starts the server with its files under `dir`. Returns `None`, after printing
    /// `skipped: aiosmtpd not installed (pip install aiosmtpd)`, where aiosmtpd is
    /// missing.
    pub fn start(dir: &Path) -> Option<SmtpReceiver> {
        if !aiosmtpd_available() {
            println!("skipped: aiosmtpd not installed (pip install aiosmtpd)");
            return None;
        }
        let dir = dir.join("smtp");
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool).expect("create smtp spool");
        let (ca_pem, cert_pem, key_pem) = test_certificates();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write ca.pem");
        std::fs::write(dir.join("cert.pem"), cert_pem).expect("write cert.pem");
        std::fs::write(dir.join("key.pem"), key_pem).expect("write key.pem");
        std::fs::write(dir.join("smtpd.py"), SMTP_SCRIPT).expect("write smtpd.py");
        // Probe a free port; aiosmtpd needs a concrete one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("probe a port")
            .port();
        let log = std::fs::File::create(dir.join("smtpd.log")).expect("smtpd log");
        let mut child = Command::new("python3")
            .arg(dir.join("smtpd.py"))
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"))
            .arg(port.to_string())
            .arg(&spool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn python3");
        // Wait for "ready" (the controller has bound and answered its own probe).
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = ready_tx.send(line);
        });
        match ready_rx.recv_timeout(crate::DEADLINE) {
            Ok(line) if line.trim() == "ready" => {}
            other => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("smtpd.log")).unwrap_or_default();
                panic!("aiosmtpd did not start ({other:?}):\n{log}");
            }
        }
        Some(SmtpReceiver {
            child,
            port,
            spool,
            ca_file,
        })
    }

    /// The port (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PEM of the CA that issued the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The mails accepted so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.spool)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }

    /// Waits until `n` mails arrived; panics after `deadline`. (The mails are files
    /// written by another process, so this looks every 50 ms.)
    pub async fn wait_mails(&self, n: usize, deadline: Duration) -> Vec<Mail> {
        let start = Instant::now();
        loop {
            let mails = self.mails();
            if mails.len() >= n {
                return mails;
            }
            if start.elapsed() > deadline {
                panic!("timed out after {deadline:?} waiting for {n} mail(s); got {mails:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`SmtpReceiver::wait_mails`] for synchronous tests.
    pub fn wait_mails_blocking(&self, n: usize, deadline: Duration) -> Vec<Mail> {
        crate::wait_until(&format!("{n} mail(s)"), deadline, || {
            let mails = self.mails();
            (mails.len() >= n).then_some(mails)
        })
    }
}

impl Drop for SmtpReceiver {
    fn drop(&mut self) {
        // Closing stdin stops the server; kill in case it does not.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for `127.0.0.1` and `localhost` (ECDSA P-256,
/// which both Python's OpenSSL and rustls accept): (CA PEM, certificate PEM, key PEM).
pub fn test_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Herald test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(DnType::CommonName, "Herald test SMTP");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

// === SMS gateway ===

/// Path the SMS gateway takes sends on.
const SMS_PATH: &str = "/sms";
/// How long the gateway keeps trying to deliver one report (the server may be down for
/// a restart meanwhile).
const REPORT_PATIENCE: Duration = Duration::from_secs(60);

/// One SMS the gateway took.
#[derive(Debug, Clone)]
pub struct Sms {
    /// The id the gateway answered with (`gw-1`, `gw-2`, ... in arrival order).
    pub id: String,
    /// The number, as the server sent it.
    pub to: String,
    /// The text.
    pub text: String,
    /// When it arrived (Unix ms).
    pub at: i64,
}

/// A delivery report the gateway posted to the server, with the server's answer.
#[derive(Debug, Clone)]
pub struct SentReport {
    /// The SMS's id.
    pub id: String,
    /// `delivered` or `failed`.
    pub status: String,
    /// The answer's status code.
    pub answer_status: u16,
    /// The answer's body (JSON, or a string if it was not).
    pub answer: serde_json::Value,
}

/// Where and how delivery reports go.
#[derive(Clone)]
struct Callback {
    url: String,
    secret: String,
    client: reqwest::Client,
}

#[derive(Default)]
struct GatewayState {
    messages: Vec<Sms>,
    failing: std::collections::HashSet<String>,
    held: std::collections::HashSet<String>,
    callback: Option<Callback>,
    reports: Vec<SentReport>,
}

/// A stand-in for a carrier's SMS gateway, on `127.0.0.1`: it takes sends as JSON
/// (`{"to": ..., "text": ...}` on `POST /sms`, the `[sms]` section
/// [`SmsGateway::config`] writes), records them, answers `{"id": "gw-N"}`, and then
/// posts a delivery report for each to the server's `/api/v1/sms/reports` with the
/// shared secret (over HTTPS, trusting the server's CA): `delivered`, or `failed` for
/// the numbers [`SmsGateway::fail`] names. Answers to numbers [`SmsGateway::hold`]
/// names wait until [`SmsGateway::release`] (for killing the server mid-send).
/// [`SmsGateway::post_report`] posts any report a test makes up.
pub struct SmsGateway {
    addr: SocketAddr,
    state: Arc<Mutex<GatewayState>>,
    released: watch::Sender<u64>,
    handle: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SmsGateway {
    /// Starts the gateway (reports go nowhere until [`SmsGateway::report_to`]).
    pub fn start() -> SmsGateway {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("gateway runtime");
        let handle = runtime.handle().clone();
        let state = Arc::new(Mutex::new(GatewayState::default()));
        let (released, _) = watch::channel(0u64);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let shared = state.clone();
        let release = released.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(take_sms(stream, shared.clone(), release.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        SmsGateway {
            addr,
            state,
            released,
            handle,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The send URL.
    pub fn url(&self) -> String {
        format!("http://{}{SMS_PATH}", self.addr)
    }

    /// The `[sms]` section for this gateway: JSON bodies, the id at `/id`, and delivery
    /// reports authenticated by `secret`. (The server needs `[forwarding] allow_http`
    /// for the plain-HTTP URL.)
    pub fn config(&self, secret: &str) -> String {
        format!(
            "[sms]\nurl = {:?}\nbody_format = \"json\"\nbody = '{{\"to\": \"{{to}}\", \"text\": \"{{text}}\"}}'\nid_pointer = \"/id\"\nreport_secret = {secret:?}\n",
            self.url()
        )
    }

    /// Sends delivery reports to `server` with `secret` from now on (reports of SMS
    /// taken before wait for this).
    pub fn report_to(&self, server: &crate::TestServer, secret: &str) {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(crate::console_client::server_tls(server))
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("report client");
        self.lock().callback = Some(Callback {
            url: format!("{}/api/v1/sms/reports", server.https_url()),
            secret: secret.to_string(),
            client,
        });
    }

    /// Reports SMS to `number` as failed (from the next send on).
    pub fn fail(&self, number: &str) {
        self.lock().failing.insert(number.to_string());
    }

    /// Holds the answer to sends to `number` (they are recorded at once) until
    /// [`SmsGateway::release`].
    pub fn hold(&self, number: &str) {
        self.lock().held.insert(number.to_string());
    }

    /// Answers every held send, and holds no more.
    pub fn release(&self) {
        self.lock().held.clear();
        self.released.send_modify(|generation| *generation += 1);
    }

    /// The SMS taken so far, in arrival order.
    pub fn messages(&self) -> Vec<Sms> {
        self.lock().messages.clone()
    }

    /// Waits until `n` SMS were taken; panics after `deadline`.
    pub fn wait_messages(&self, n: usize, deadline: Duration) -> Vec<Sms> {
        crate::wait_until(&format!("{n} SMS at the gateway"), deadline, || {
            let messages = self.messages();
            (messages.len() >= n).then_some(messages)
        })
    }

    /// The delivery reports posted so far, with the server's answers.
    pub fn reports(&self) -> Vec<SentReport> {
        self.lock().reports.clone()
    }

    /// Waits until `n` delivery reports were answered; panics after `deadline`.
    pub fn wait_reports(&self, n: usize, deadline: Duration) -> Vec<SentReport> {
        crate::wait_until(&format!("{n} delivery reports answered"), deadline, || {
            let reports = self.reports();
            (reports.len() >= n).then_some(reports)
        })
    }

    /// Posts `body` to the report URL with `Authorization: Bearer secret`, as a gateway
    /// (or an impostor) would; returns the answer's status and body. Needs
    /// [`SmsGateway::report_to`] first.
    pub fn post_report(&self, secret: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let mut callback = self
            .lock()
            .callback
            .clone()
            .expect("report_to before post_report");
        callback.secret = secret.to_string();
        let body = body.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(post_once(&callback, &body).await);
        });
        match rx.recv_timeout(crate::DEADLINE) {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => panic!("posting a delivery report failed: {e}"),
            Err(_) => panic!(
                "no answer to a delivery report within {:?}",
                crate::DEADLINE
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GatewayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SmsGateway {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes one send: records it, answers with its id (after a hold, if its number is
/// held), then reports it.
async fn take_sms(
    mut stream: tokio::net::TcpStream,
    state: Arc<Mutex<GatewayState>>,
    released: watch::Sender<u64>,
) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let fields: Option<(String, String)> =
        serde_json::from_slice::<serde_json::Value>(&request.body)
            .ok()
            .and_then(|v| {
                Some((
                    v["to"].as_str()?.to_string(),
                    v["text"].as_str()?.to_string(),
                ))
            });
    let Some((to, text)) = fields.filter(|_| request.method == "POST" && request.path == SMS_PATH)
    else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let (id, status, hold) = {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("gw-{}", state.messages.len() + 1);
        let status = if state.failing.contains(&to) {
            "failed"
        } else {
            "delivered"
        };
        // Subscribed under the lock, so a release after this point is seen.
        let hold = state.held.contains(&to).then(|| released.subscribe());
        state.messages.push(Sms {
            id: id.clone(),
            to,
            text,
            at: crate::now_ms(),
        });
        (id, status, hold)
    };
    if let Some(mut hold) = hold {
        let generation = *hold.borrow_and_update();
        let _ = hold.wait_for(|g| *g != generation).await;
    }
    let body = format!("{{\"id\": \"{id}\"}}");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    drop(stream);
    report(state, id, status).await;
}

/// Posts one delivery report, retrying while the server cannot be reached.
async fn report(state: Arc<Mutex<GatewayState>>, id: String, status: &str) {
    let start = Instant::now();
    let body = serde_json::json!({"id": id, "status": status, "detail": "test gateway"});
    let mut pause = Duration::from_millis(50);
    while start.elapsed() < REPORT_PATIENCE {
        let callback = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .callback
            .clone();
        if let Some(callback) = callback {
            if let Ok((answer_status, answer)) = post_once(&callback, &body).await {
                if answer_status < 500 {
                    state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .reports
                        .push(SentReport {
                            id,
                            status: status.to_string(),
                            answer_status,
                            answer,
                        });
                    return;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

async fn post_once(
    callback: &Callback,
    body: &serde_json::Value,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let response = callback
        .client
        .post(&callback.url)
        .bearer_auth(&callback.secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let answer = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, answer))
}
