//! Metrics an operator can alert on (OPERATIONS.md, "Metrics"): with `[metrics] listen`
//! set, a separate plain-HTTP listener serves `GET /metrics` and nothing else; the text
//! parses as Prometheus exposition format; and the counters and gauges move with what
//! happens: a job that succeeds and one that fails, a push message and its receipt,
//! durable commits, a handshake with an unusable certificate and a revoked agent's
//! reconnection. A bad `[metrics] listen` stops `serve` with exit code 64.
//!
//! Also the `--json` of the waiting commands: `run --wait --json`, `package install
//! --wait --json` and `open --wait --json` print one JSON document with each job's
//! outcome, and exit as they do without `--json`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use herald_shared::protocol::SERVER_NAME;
use herald_tests::{bin, free_port, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

// === a strict reader of the Prometheus text format ===

/// One series: the sample's name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

/// Parses Prometheus text exposition format 0.0.4, failing on anything a scraper would
/// reject or that breaks the conventions: a sample before its family's `# TYPE`, a family
/// typed twice, a bad name, label or value, a duplicate series, a counter whose name
/// does not end in `_total`, a histogram without `+Inf`, `_sum` and `_count`.
fn parse_exposition(text: &str) -> Result<BTreeMap<Series, f64>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    if !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let value = parts.next().unwrap_or("");
            check_name(name).map_err(at)?;
            match keyword {
                "HELP" if value.is_empty() => return Err(at("empty HELP".into())),
                "HELP" => {}
                "TYPE" => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&value) {
                        return Err(at(format!("unknown type {value}")));
                    }
                    if value == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter's name must end in _total".into()));
                    }
                    if types.insert(name.to_string(), value.to_string()).is_some() {
                        return Err(at("family typed twice".into()));
                    }
                }
                _ => return Err(at("unknown comment keyword".into())),
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            return Err(at("stray line".into()));
        }
        let (series, value) = parse_sample(line).map_err(at)?;
        let family = family_of(&series.0, &types)
            .ok_or_else(|| at("sample before its family's TYPE".into()))?;
        if types[&family] == "histogram"
            && series.0.ends_with("_bucket")
            && !series.1.contains_key("le")
        {
            return Err(at("bucket without le".into()));
        }
        if samples.insert(series, value).is_some() {
            return Err(at("duplicate series".into()));
        }
    }
    for (name, kind) in &types {
        if kind == "histogram" {
            for suffix in ["_sum", "_count"] {
                if !samples.keys().any(|(n, _)| *n == format!("{name}{suffix}")) {
                    return Err(format!("histogram {name} has no {suffix}"));
                }
            }
            let inf = samples
                .iter()
                .find(|((n, l), _)| *n == format!("{name}_bucket") && l["le"] == "+Inf")
                .map(|(_, v)| *v);
            let count = samples
                .iter()
                .find(|((n, _), _)| *n == format!("{name}_count"))
                .map(|(_, v)| *v);
            if inf.is_none() || inf != count {
                return Err(format!(
                    "histogram {name}: +Inf bucket {inf:?} != count {count:?}"
                ));
            }
        }
    }
    Ok(samples)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

/// The family a sample belongs to: its own name, or a histogram's minus its suffix.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        (types.get(base).map(String::as_str) == Some("histogram")).then(|| base.to_string())
    })
}

fn parse_sample(line: &str) -> Result<(Series, f64), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "no value".to_string())?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = inner.find('=').ok_or("label without =")?;
            let label = &inner[..eq];
            check_name(label)?;
            let mut value = String::new();
            let mut chars = inner[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?
                .char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            inner = &inner[eq + 1 + 1 + end + 1..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().map_err(|_| format!("bad value {other:?}"))?,
    };
    Ok(((name.to_string(), labels), value))
}

/// The value of one series, if present.
fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples.get(&(name.to_string(), labels)).copied()
}

// === plain HTTP to the metrics listener ===

/// A response: status code, headers (lower-case names) and body.
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn http(addr: SocketAddr, method: &str, path: &str) -> Response {
    let mut stream =
        TcpStream::connect_timeout(&addr, DEADLINE).expect("connect to the metrics listener");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked")),
        "the test reader does not decode chunked bodies: {head}"
    );
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Scrapes the listener and parses what it says.
fn scrape(addr: SocketAddr) -> BTreeMap<Series, f64> {
    let response = http(addr, "GET", "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    parse_exposition(&response.body).unwrap_or_else(|e| {
        panic!(
            "/metrics is not valid exposition format: {e}\n{}",
            response.body
        )
    })
}

/// Scrapes until `check` holds, or fails naming `what` with the last scrape.
fn scrape_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&BTreeMap<Series, f64>) -> bool,
) -> BTreeMap<Series, f64> {
    wait_until(what, DEADLINE, || {
        let samples = scrape(addr);
        check(&samples).then_some(samples)
    })
}

// === the CLI's --json ===

/// Parses a command's whole stdout as one JSON document.
fn json_doc(output: &Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not one JSON document ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

// === a handshake the server refuses ===

/// Tries a QUIC handshake with an ECDSA client certificate (agents' keys are Ed25519,
/// so the server cannot take it); returns once the attempt has ended either way.
fn handshake_with_a_bad_certificate(quic: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        endpoint.set_default_client_config(herald_tests::raw_quic_client(
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ));
        let connecting = endpoint.connect(quic, SERVER_NAME).expect("start connect");
        match tokio::time::timeout(DEADLINE, connecting).await {
            Ok(Ok(connection)) => {
                // TLS 1.3 clients finish before the server checks their certificate;
                // the server's refusal then closes the connection.
                let _ = tokio::time::timeout(DEADLINE, connection.closed()).await;
            }
            Ok(Err(_)) => {}
            Err(_) => panic!("the handshake neither finished nor failed within {DEADLINE:?}"),
        }
        endpoint.wait_idle().await;
    });
}

// === the test ===

#[test]
fn metrics_for_alerts() {
    let metrics_port = free_port();
    let server = TestServer::start_with_config(
        "metrics",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let listener: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    let agent = TestAgent::start(&server, "alpha");
    let target = format!("agent:{}", agent.name);

    // The listener answers GET /metrics only, as Prometheus text.
    let response = http(listener, "GET", "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for path in ["/", "/api/v1/agents", "/healthz", "/metrics/x"] {
        assert_eq!(http(listener, "GET", path).status, 404, "GET {path}");
    }
    assert_eq!(http(listener, "POST", "/metrics").status, 405);
    let start = scrape(listener);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&start, "herald_build_info", &[("version", version)]),
        Some(1.0)
    );
    assert_eq!(
        value(&start, "herald_jobs", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(value(&start, "herald_agents_enrolled", &[]), Some(1.0));

    // `run --wait --json`: one document with the job's outcome; the program's exit code.
    let ok = server.cli(&[
        "run",
        "--to",
        "all",
        "--wait",
        "--json",
        "--",
        "/bin/echo",
        "hello",
    ]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let doc = json_doc(&ok, "run --wait --json");
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["jobs"][0]["state"], "succeeded", "{doc}");
    assert_eq!(doc["jobs"][0]["exit_code"], 0, "{doc}");
    assert_eq!(doc["jobs"][0]["stdout"], "hello\n", "{doc}");
    assert_eq!(doc["jobs"][0]["agent_id"], agent.id.as_str(), "{doc}");

    let failed = server.cli(&[
        "run",
        "--to",
        &target,
        "--wait",
        "--json",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(
        failed.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let doc = json_doc(&failed, "a failing run --wait --json");
    assert_eq!(doc["ok"], false, "{doc}");
    assert_eq!(doc["jobs"][0]["state"], "failed", "{doc}");
    assert_eq!(doc["jobs"][0]["exit_code"], 7, "{doc}");
    assert_eq!(doc["jobs"][0]["stdout"], "out\n", "{doc}");
    assert_eq!(doc["jobs"][0]["stderr"], "err\n", "{doc}");
    let usage = server.cli(&["run", "--to", "all", "--json", "--", "/bin/true"]);
    assert_eq!(
        usage.status.code(),
        Some(64),
        "--json without --wait is a usage error"
    );
    assert!(
        String::from_utf8_lossy(&usage.stderr).contains("--wait"),
        "{}",
        String::from_utf8_lossy(&usage.stderr)
    );

    // A push message, stored by the agent, which reports a receipt.
    let (sender_key, _) = server.add_sender("cards", false);
    let sent = server.json(&[
        "message",
        "send",
        "--sender-key",
        sender_key.to_str().expect("UTF-8 path"),
        "--to",
        &target,
        "--title",
        "Payment due",
        "--body",
        "Friday.",
    ]);
    assert!(sent["id"].is_string(), "{sent}");

    let after_jobs = scrape_until(
        listener,
        "the jobs, the message and its receipt to be counted",
        |s| value(s, "herald_message_receipts", &[("state", "stored")]).is_some_and(|v| v >= 1.0),
    );
    assert_eq!(
        value(&after_jobs, "herald_jobs", &[("state", "failed")]),
        Some(1.0)
    );
    assert!(value(&after_jobs, "herald_jobs", &[("state", "succeeded")]).is_some_and(|v| v >= 1.0));
    assert_eq!(
        value(&after_jobs, "herald_messages", &[("state", "live")]),
        Some(1.0)
    );
    assert_eq!(
        value(&after_jobs, "herald_agents_connected", &[]),
        Some(1.0)
    );
    // Creating jobs, storing results and the message: durable commits, timed.
    let commits = value(&after_jobs, "herald_db_commit_seconds_count", &[]).unwrap_or(0.0);
    assert!(commits >= 3.0, "durable commits counted: {commits}");
    assert!(value(
        &after_jobs,
        "herald_db_commit_seconds_bucket",
        &[("le", "1")]
    )
    .is_some());
    assert!(value(&after_jobs, "herald_signal_ack_seconds_count", &[]).is_some_and(|v| v >= 2.0));

    // `package install --wait --json`: the install's outcome in one document.
    install_with_json(&server, &target);

    // `open --wait --json`: the outcome of the visit (here: no browser on the agent's
    // side, so it fails), with the same exit rule as without --json.
    let open = server.cli(&[
        "open",
        "--to",
        &target,
        "--timeout",
        "5s",
        "--wait",
        "--json",
        "https://example.org/form",
    ]);
    let doc = json_doc(&open, "open --wait --json");
    let state = doc["jobs"][0]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("{doc}"))
        .to_string();
    assert_eq!(open.status.success(), state == "succeeded", "{doc}");
    assert_eq!(doc["ok"], state == "succeeded", "{doc}");
    assert!(
        doc["jobs"][0]["outcome"].is_string() || doc["jobs"][0]["error"].is_string(),
        "the visit's outcome or error is in the document: {doc}"
    );

    // A certificate the server cannot take, then a revoked agent reconnecting.
    let quic: SocketAddr = format!("127.0.0.1:{}", server.quic_port)
        .parse()
        .expect("addr");
    handshake_with_a_bad_certificate(quic);
    scrape_until(listener, "the bad certificate to be counted", |s| {
        value(
            s,
            "herald_agent_handshake_failures_total",
            &[("reason", "bad_certificate")],
        )
        .is_some_and(|v| v >= 1.0)
    });
    server.cli_ok(&["agents", "revoke", &agent.name]);
    let end = scrape_until(
        listener,
        "the revoked agent's reconnection to be counted",
        |s| {
            value(
                s,
                "herald_agent_handshake_failures_total",
                &[("reason", "revoked")],
            )
            .is_some_and(|v| v >= 1.0)
        },
    );
    assert_eq!(value(&end, "herald_agents_enrolled", &[]), Some(0.0));
    assert_eq!(
        value(
            &end,
            "herald_agent_handshake_failures_total",
            &[("reason", "overload")]
        ),
        Some(0.0),
        "every reason is listed from the start"
    );
}

/// Publishes a script package and installs it with `--wait --json`.
fn install_with_json(server: &TestServer, target: &str) {
    let (vendor_key, _) = server.add_vendor("acme", "acme-*");
    let dir = server.dir.path().join("build");
    std::fs::create_dir_all(&dir).expect("build dir");
    let artifact = dir.join("acme-tool");
    std::fs::write(&artifact, "#!/bin/sh\necho acme-tool 1.0.0\n").expect("write artifact");
    std::fs::set_permissions(
        &artifact,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .expect("make the artifact executable");
    server.cli_ok(&[
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        vendor_key.to_str().expect("UTF-8 path"),
        "acme-tool",
        "1.0.0",
        artifact.to_str().expect("UTF-8 path"),
    ]);
    let install = server.cli(&[
        "package",
        "install",
        "--to",
        target,
        "acme-tool",
        "1.0.0",
        "--wait",
        "--json",
    ]);
    let doc = json_doc(&install, "package install --wait --json");
    assert_eq!(doc["jobs"][0]["state"], "succeeded", "{doc}");
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["skipped"], serde_json::json!([]), "{doc}");
    assert!(install.status.success(), "{doc}");
}

/// A `[metrics] listen` that is not an address stops `serve` at start with exit code 64
/// and says what is wrong.
#[test]
fn a_bad_metrics_address_is_refused_at_start() {
    let mut server = TestServer::start("metrics-bad");
    server.kill();
    let config = server.data_dir().join("herald.toml");
    let mut text = std::fs::read_to_string(&config).expect("read herald.toml");
    text.push_str("\n[metrics]\nlisten = \"metrics.example:9464\"\n");
    std::fs::write(&config, text).expect("write herald.toml");
    let (code, stderr) = serve_exit(&server.data_dir());
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr
            .contains("[metrics] listen = \"metrics.example:9464\" is not an IP address and port"),
        "{stderr}"
    );
}

/// Runs `serve` on `data_dir` and waits (with a deadline) for it to exit.
fn serve_exit(data_dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald-server");
    let status = wait_until("serve to exit", DEADLINE, || {
        child.try_wait().expect("wait")
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code(), stderr)
}

#[test]
fn the_reader_rejects_what_prometheus_would() {
    assert!(parse_exposition("# TYPE a gauge\na 1\n").is_ok());
    assert!(parse_exposition("a 1\n").is_err(), "sample before TYPE");
    assert!(
        parse_exposition("# TYPE a counter\na 1\n").is_err(),
        "counter without _total"
    );
    assert!(
        parse_exposition("# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n").is_err(),
        "duplicate"
    );
    assert!(
        parse_exposition("# TYPE a gauge\na{x=1} 1\n").is_err(),
        "unquoted label"
    );
    assert!(
        parse_exposition("# TYPE a gauge\na one\n").is_err(),
        "bad value"
    );
    let ok = parse_exposition("# TYPE a gauge\na{x=\"q\\\"\\\\\\n\",y=\"\"} 2\n").expect("escapes");
    assert_eq!(value(&ok, "a", &[("x", "q\"\\\n"), ("y", "")]), Some(2.0));
    assert!(
        parse_exposition("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n")
            .is_err(),
        "+Inf disagrees with count"
    );
}
