//! The console on a certificate of the operator's choosing and behind reverse proxies
//! (`[https]` in herald.toml): a real `herald-server`, a real agent, real Chromium and
//! plain TCP and TLS clients on loopback.
//!
//! - The HTTPS listener presents the configured certificate to clients that ask for a
//!   name it covers, Herald's own to the rest; agents, which pin Herald's CA, still
//!   enroll, run jobs over QUIC and download artifacts from the server. The files are
//!   read again on SIGHUP, and a broken file keeps the certificate in use.
//! - Unusable `[https]` settings stop `serve` with a message and exit code 64.
//! - Behind a trusted proxy the login throttle counts each client by the address the
//!   proxy puts in `X-Forwarded-For`; from anyone else that header means nothing.
//!
//! The browser test skips (and says so) when Chromium or chromedriver is not installed.
//! Chromium trusts the test CA through an NSS database in a home of the test's own
//! (`certutil`, Debian's `libnss3-tools`), which is how a person adds a CA on Linux;
//! Chromium's SPKI allow-list would skip the chain and name checks this test is about.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use herald_tests::browser::{self, Browser, Trust};
use herald_tests::{
    bin, free_port, wait_until, AcceptAnyServerCert, TempDir, TestAgent, TestServer, DEADLINE,
};

/// What the console says to a throttled login (console/auth.rs `TOO_MANY`).
const TOO_MANY: &str = "too many failed logins";
/// Failed logins from one address that lock it out (console/auth.rs).
const MAX_ADDRESS_FAILURES: usize = 20;
/// The log line of a SIGHUP reload that failed (serve.rs).
const RELOAD_FAILED: &str = "SIGHUP: kept the [https] certificate in use";
/// The name the test certificates are issued for.
const HOST: &str = "localhost";

// === certificates ===

/// A CA of the test's own and a leaf it issued for `localhost` and 127.0.0.1, as PEM
/// files (the leaf file holds the chain: leaf, then CA).
struct Issued {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    leaf: Vec<u8>,
}

fn issue(dir: &Path, tag: &str) -> Issued {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Test public CA {tag}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(vec![HOST.to_string(), "127.0.0.1".to_string()]).expect("leaf");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("console {tag}"));
    let leaf = params.signed_by(&key, &issuer).expect("leaf certificate");
    let paths = Issued {
        ca: dir.join(format!("{tag}-ca.pem")),
        cert: dir.join(format!("{tag}.pem")),
        key: dir.join(format!("{tag}.key")),
        leaf: leaf.der().to_vec(),
    };
    std::fs::write(&paths.ca, ca.pem()).expect("write CA");
    std::fs::write(&paths.cert, format!("{}{}", leaf.pem(), ca.pem())).expect("write chain");
    std::fs::write(&paths.key, key.serialize_pem()).expect("write key");
    paths
}

/// The first certificate of a PEM file, as DER.
fn first_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).expect("read PEM");
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM certificate")
        .to_vec()
}

/// A TLS handshake with `127.0.0.1:port`, asking for `name` (an IP address sends no
/// SNI); returns the leaf certificate the server presented, or the handshake error.
fn handshake(port: u16, name: &str, verify: rustls::ClientConfig) -> Result<Vec<u8>, String> {
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let mut tls = rustls::ClientConnection::new(Arc::new(verify), server_name).expect("TLS client");
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(DEADLINE)).expect("timeout");
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(tls
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a server certificate")
        .to_vec())
}

fn tls_client(verifier: Option<&Path>) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions");
    match verifier {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(first_der(ca)))
                .expect("CA root");
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(AcceptAnyServerCert::new())
            .with_no_client_auth(),
    }
}

/// The leaf the server presents for `name`, whatever it is.
fn presented(server: &TestServer, name: &str) -> Vec<u8> {
    handshake(server.http_port, name, tls_client(None)).expect("TLS handshake")
}

fn hang_up(server: &TestServer) {
    let pid = server.pid().expect("server running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("send SIGHUP");
}

fn https_section(issued: &Issued, extra: &str) -> String {
    format!(
        "[https]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
        issued.cert.display(),
        issued.key.display()
    )
}

#[test]
fn console_serves_the_configured_certificate() {
    let files = TempDir::new("console-cert-files");
    let first = issue(files.path(), "first");
    let server = TestServer::start_with_config("console-cert", &https_section(&first, ""));
    let herald_leaf = first_der(&server.data_dir().join("server.pem"));
    let herald_ca = server.data_dir().join("ca.pem");

    // Asked for the certificate's name: the configured certificate, which a client
    // trusting only that CA accepts and one trusting only Herald's CA refuses.
    assert_eq!(presented(&server, HOST), first.leaf);
    assert_eq!(
        handshake(server.http_port, HOST, tls_client(Some(&first.ca))),
        Ok(first.leaf.clone())
    );
    let refused = handshake(server.http_port, HOST, tls_client(Some(&herald_ca)));
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "a client trusting only Herald's CA: {refused:?}"
    );
    // By IP address (no SNI), as the admin CLI and agents on `public_url` connect:
    // Herald's certificate, so both keep working.
    assert_eq!(presented(&server, "127.0.0.1"), herald_leaf);
    assert_eq!(
        handshake(server.http_port, "127.0.0.1", tls_client(Some(&herald_ca))),
        Ok(herald_leaf.clone())
    );

    // Agents, pinning Herald's CA, enroll and run a job over QUIC, and download an
    // artifact from the server's HTTPS endpoint.
    let agent = TestAgent::start(&server, "a1");
    let ids = server.run_job("agent:a1", &[], &["/bin/echo", "over QUIC"]);
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "over QUIC\n", "{job:#}");
    install_from_the_server(&server, &agent);

    // Real Chromium, trusting only the test CA (and the system's), loads the console
    // by name, and refuses Herald's certificate on the bare address.
    if browser::installed() {
        let b = Browser::start(
            server.dir.path(),
            "public-ca",
            &format!("https://{HOST}:{}", server.http_port),
            Trust::Ca(&first.ca),
        )
        .expect("browser");
        b.goto("/login");
        b.wait_page("page-login");
        // Chromium shows its certificate error page instead (or WebDriver refuses).
        let shown = b
            .try_goto(&format!("https://127.0.0.1:{}/login", server.http_port))
            .map(|()| (b.page_id(), b.body_text()));
        assert!(
            match &shown {
                Err(e) => e.contains("insecure certificate"),
                Ok((page, text)) => page.is_empty() && text.contains("ERR_CERT_AUTHORITY_INVALID"),
            },
            "Chromium must not trust Herald's CA: {shown:?}"
        );
    }

    // New files and a SIGHUP: the new certificate from the next handshake on.
    let second = issue(files.path(), "second");
    std::fs::rename(&second.key, &first.key).expect("replace key");
    std::fs::rename(&second.cert, &first.cert).expect("replace certificate");
    hang_up(&server);
    wait_until("the reloaded certificate", DEADLINE, || {
        (presented(&server, HOST) == second.leaf).then_some(())
    });
    // A broken file and a SIGHUP: the failure is logged, the certificate stays.
    std::fs::write(&first.cert, "not a certificate\n").expect("break the certificate");
    hang_up(&server);
    let log = wait_until("the failed reload in the log", DEADLINE, || {
        let log = std::fs::read_to_string(server.log_path()).ok()?;
        log.contains(RELOAD_FAILED).then_some(log)
    });
    assert!(
        log.contains(&first.cert.display().to_string()),
        "the log names the broken file: {}",
        server.log_tail()
    );
    assert_eq!(presented(&server, HOST), second.leaf);
    assert_eq!(presented(&server, "127.0.0.1"), herald_leaf);
}

/// Publishes a small package with the server storing the bytes, installs it on
/// `agent` and checks that it succeeded: the agent downloaded it over HTTPS from
/// `public_url`, trusting only Herald's CA.
fn install_from_the_server(server: &TestServer, agent: &TestAgent) {
    let (vendor_key, _) = server.add_vendor("acme", "acme-*");
    let artifact = server.dir.path().join("acme-tool");
    std::fs::write(&artifact, "#!/bin/sh\necho acme-tool 1.0.0\n").expect("write artifact");
    let path = |p: &Path| p.to_str().expect("UTF-8 test paths").to_string();
    server.cli_ok(&[
        "package",
        "publish",
        "--vendor-key",
        &path(&vendor_key),
        "acme-tool",
        "1.0.0",
        &path(&artifact),
        "--quiet",
    ]);
    let out = server.cli_ok(&[
        "package",
        "install",
        "--to",
        &format!("agent:{}", agent.name),
        "acme-tool",
        "1.0.0",
        "--timeout",
        "60s",
        "--wait",
    ]);
    assert!(
        out.contains(": succeeded"),
        "install from the server's endpoint: {out}\n{}",
        agent.log()
    );
}

// === refused settings ===

/// Initialises a data directory, puts `top` at the start of its herald.toml and
/// `extra` at the end, and runs `serve`; returns what it printed, after checking it
/// exited with 64.
fn refused_serve(dir: &Path, top: &str, extra: &str) -> String {
    let data = dir.join("server");
    let quic = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let init = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(&data)
        .args(["init", "--public-addr", &quic, "--quic-listen", &quic])
        .args(["--http-listen", &http])
        .output()
        .expect("run init");
    assert!(init.status.success(), "init: {init:?}");
    let config = data.join("herald.toml");
    let mut text = top.to_string();
    text.push_str(&std::fs::read_to_string(&config).expect("read herald.toml"));
    text.push('\n');
    text.push_str(extra);
    std::fs::write(&config, text).expect("write herald.toml");
    let mut child = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(&data)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let status = wait_until("serve to give up", DEADLINE, || {
        child.try_wait().expect("wait for serve")
    });
    let mut output = String::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut stream = stream;
        stream.read_to_string(&mut output).expect("read output");
    }
    assert_eq!(status.code(), Some(64), "{extra}\n{output}");
    let _ = std::fs::remove_dir_all(&data);
    output
}

#[test]
fn unusable_https_settings_stop_the_server_with_a_message() {
    let dir = TempDir::new("console-cert-refused");
    let one = issue(dir.path(), "one");
    let two = issue(dir.path(), "two");
    let files = |cert: &Path, key: &Path| {
        format!(
            "[https]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    // (start of herald.toml, end of herald.toml, what the error must say)
    let cases = [
        (
            String::new(),
            format!("[https]\ncert_file = \"{}\"\n", one.cert.display()),
            "cert_file and key_file go together".to_string(),
        ),
        (
            String::new(),
            files(&one.cert, &two.key),
            format!(
                "is not the private key of the certificate in {}",
                one.cert.display()
            ),
        ),
        (
            String::new(),
            files(&one.key, &one.key),
            format!("{}: not a PEM certificate", one.key.display()),
        ),
        (
            String::new(),
            files(&dir.path().join("missing.pem"), &one.key),
            "cannot read".to_string(),
        ),
        (
            String::new(),
            "[https]\ntrusted_proxies = [\"10.0.0.0/33\"]\n".to_string(),
            "trusted proxy \"10.0.0.0/33\" is not an address or a network".to_string(),
        ),
        (
            String::new(),
            "[https]\nplain_http_listen = \"0.0.0.0:8080\"\n".to_string(),
            "is not a loopback address".to_string(),
        ),
        // Agents would download from a name the public certificate covers.
        (
            format!("public_url = \"https://{HOST}:8443\"\n"),
            files(&one.cert, &one.key),
            "set [https] agent_url".to_string(),
        ),
    ];
    for (top, extra, message) in cases {
        let output = refused_serve(dir.path(), &top, &extra);
        assert!(
            output.contains(&message),
            "{extra}: wanted {message:?} in\n{output}"
        );
    }
}

// === client addresses behind proxies ===

/// One request over the plain-HTTP loopback listener, as a proxy on the same machine
/// sends it (`Connection: close`); returns the status, the raw headers and the body.
fn plain_request(port: u16, head: &str, body: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect to plain HTTP");
    tcp.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let request = format!(
        "{head}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).expect("send request");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read answer");
    let (headers, body) = answer.split_once("\r\n\r\n").expect("a whole HTTP answer");
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {headers}"));
    (status, headers.to_string(), body.to_string())
}

/// A console client over the plain-HTTP loopback listener, with the login form's
/// CSRF cookie and token.
struct Proxy {
    port: u16,
    csrf: String,
}

impl Proxy {
    fn new(port: u16) -> Proxy {
        let (status, headers, _) = plain_request(port, "GET /login HTTP/1.1", "");
        assert_eq!(status, 200, "GET /login over plain HTTP: {headers}");
        let csrf = headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| v.trim().strip_prefix("__Host-herald_csrf="))
            .and_then(|v| v.split(';').next())
            .expect("the login form's CSRF cookie")
            .to_string();
        Proxy { port, csrf }
    }

    /// A failed login for `login`, forwarded for `client` (no header if `None`): the
    /// status and whether the answer is the throttle's.
    fn fail_login(&self, login: &str, client: Option<&str>) -> (u16, bool) {
        let mut head = format!(
            "POST /login HTTP/1.1\r\nCookie: __Host-herald_csrf={}\r\n\
             Content-Type: application/x-www-form-urlencoded",
            self.csrf
        );
        if let Some(client) = client {
            head.push_str(&format!("\r\nX-Forwarded-For: {client}"));
        }
        let body = format!("csrf={}&login={login}&password=not+the+password", self.csrf);
        let (status, _, body) = plain_request(self.port, &head, &body);
        (status, body.contains(TOO_MANY))
    }
}

fn proxied_server(name: &str, trusted: &str) -> (TestServer, u16) {
    let port = free_port();
    let server = TestServer::start_with_config(
        name,
        &format!(
            "[https]\ntrusted_proxies = [{trusted}]\nplain_http_listen = \"127.0.0.1:{port}\"\n"
        ),
    );
    (server, port)
}

#[test]
fn console_behind_a_trusted_proxy_throttles_per_client() {
    let (_server, port) = proxied_server("console-proxy", "\"127.0.0.1/32\"");
    let proxy = Proxy::new(port);
    const A: &str = "198.51.100.7";
    const B: &str = "203.0.113.9";
    // A's failures (each for another login, so no login lock gets in the way),
    // with whatever A itself wrote into the header left of what the proxy added.
    for n in 0..MAX_ADDRESS_FAILURES {
        let (status, throttled) =
            proxy.fail_login(&format!("ghost-a{n}"), Some(&format!("10.9.9.9, {A}")));
        assert_eq!((status, throttled), (401, false), "attempt {n} from A");
    }
    assert_eq!(
        proxy.fail_login("ghost-a-last", Some(A)),
        (429, true),
        "A is locked out"
    );
    // B, and requests from the proxy host itself, are still checked.
    assert_eq!(
        proxy.fail_login("ghost-b", Some(B)),
        (401, false),
        "B may try"
    );
    assert_eq!(
        proxy.fail_login("ghost-c", None),
        (401, false),
        "the proxy host may try"
    );
    // A cannot escape by claiming to be someone else to the left of its own address.
    assert_eq!(
        proxy.fail_login("ghost-a-again", Some(&format!("{B}, {A}"))),
        (429, true)
    );
}

#[test]
fn an_untrusted_proxy_s_forwarded_for_is_ignored() {
    let (_server, port) = proxied_server("console-untrusted-proxy", "\"10.0.0.0/8\"");
    let proxy = Proxy::new(port);
    // Every attempt claims another client; all count against 127.0.0.1.
    for n in 0..MAX_ADDRESS_FAILURES {
        let claimed = format!("198.51.100.{n}");
        let (status, throttled) = proxy.fail_login(&format!("ghost-{n}"), Some(&claimed));
        assert_eq!((status, throttled), (401, false), "attempt {n}");
    }
    assert_eq!(
        proxy.fail_login("ghost-last", Some("203.0.113.250")),
        (429, true),
        "127.0.0.1 is locked out whatever the header says"
    );
}
