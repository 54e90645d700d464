//! Harness support for browser services: the user-session helper
//! (`herald-agent session`) as a process with its own `BROWSER`, a stand-in browser that
//! records the URLs it is given, operator-signed orders posted straight to the admin API,
//! agent settings edits, and (as root) a helper running as another local account.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use herald_shared::codec;
use herald_shared::envelope::{Order, Statement};
use serde_json::Value;

use crate::{bin, strip_ansi, wait_until, AcceptAnyServerCert, TestAgent, TestServer, DEADLINE};

/// A running `herald-agent session` for one agent's state directory.
pub struct SessionHelper {
    log: PathBuf,
    child: Option<Child>,
}

/// The uid and gid of `nobody`, standing in for another local account (an SSH user,
/// a service account) in tests that run as root.
pub const NOBODY: u32 = 65534;

/// Whether the tests run as root (as in CI), which running a process as another user
/// needs.
pub fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn append_to(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .expect("open helper log")
}

impl SessionHelper {
    /// Starts the helper for `agent` with `BROWSER` set to `browser`, logging to `log`,
    /// and waits until the agent has accepted it.
    pub fn start(agent: &TestAgent, browser: &str, log: &Path) -> SessionHelper {
        Self::start_on_bus(agent, browser, log, None)
    }

    /// [`SessionHelper::start`], with the desktop's session bus at `bus` (a private
    /// bus's address) instead of whatever the environment names, or none.
    pub fn start_on_bus(
        agent: &TestAgent,
        browser: &str,
        log: &Path,
        bus: Option<&str>,
    ) -> SessionHelper {
        let mut command = Command::new(bin("herald-agent"));
        command
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .arg("session")
            .env("BROWSER", browser)
            .env("HERALD_LOG", "info,herald_agent=debug")
            // No fallback to a real desktop's bus in the runtime directory.
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null())
            .stdout(append_to(log))
            .stderr(append_to(log));
        match bus {
            Some(address) => command.env("DBUS_SESSION_BUS_ADDRESS", address),
            None => command.env_remove("DBUS_SESSION_BUS_ADDRESS"),
        };
        let child = command.spawn().expect("spawn herald-agent session");
        let helper = SessionHelper {
            log: log.to_path_buf(),
            child: Some(child),
        };
        // The daemon registers a helper before it welcomes it, so once the helper logs
        // the welcome, browser jobs find it.
        helper.wait_log("connected to herald-agent");
        helper
    }

    /// Starts `binary session --socket SOCKET` as uid and gid `uid` (the tests must run
    /// as root), with `BROWSER` set to `browser`, logging to `log` (opened here, so
    /// `uid` need not be able to write it). Does not wait for the daemon's answer.
    /// `binary`, `browser` and the socket's directory must be reachable by `uid`.
    pub fn start_as(
        uid: u32,
        binary: &Path,
        socket: &Path,
        browser: &str,
        log: &Path,
    ) -> SessionHelper {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(binary);
        command
            .arg("session")
            .arg("--socket")
            .arg(socket)
            .env("BROWSER", browser)
            .env("HERALD_LOG", "info,herald_agent=debug")
            .env("HOME", "/")
            .current_dir("/")
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(append_to(log))
            .stderr(append_to(log));
        // `binary` is a copy the test has just written.
        let child = crate::spawn_copied_binary(&mut command);
        SessionHelper {
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    /// Waits until the helper's log contains `text`; returns the log.
    pub fn wait_log(&self, text: &str) -> String {
        wait_until(
            &format!("the session helper to log {text:?}"),
            DEADLINE,
            || {
                let log = self.log();
                log.contains(text).then_some(log)
            },
        )
    }

    /// The helper's log, without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for SessionHelper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- session helper log:\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a stand-in browser into `dir`: a shell script that appends its first argument
/// as a line to a record file. Returns the script and the record file.
pub fn recording_browser(dir: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("fake-browser.sh");
    let record = dir.join("opened-urls");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{}'\n",
            record.display()
        ),
    )
    .expect("write fake browser");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("make fake browser executable");
    (script, record)
}

/// Sets `key = value` (TOML) in the `[policy]` table of an agent's `agent.toml`, for an
/// agent that is not running.
pub fn set_policy(agent: &TestAgent, key: &str, value: &str) {
    set_setting(agent, "policy", key, value);
}

/// Sets `key = value` (TOML) in the `[table]` table of an agent's `agent.toml`, adding
/// the table if missing, for an agent that is not running.
pub fn set_setting(agent: &TestAgent, table: &str, key: &str, value: &str) {
    let path = agent.state_dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).expect("read agent.toml");
    let header = format!("[{table}]");
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut done = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if current == header && !done {
                lines.push(format!("{key} = {value}"));
                done = true;
            }
            current = trimmed.to_string();
        } else if current == header && trimmed.split('=').next().map(str::trim) == Some(key) {
            continue;
        }
        lines.push(line.to_string());
    }
    if !done {
        if current != header {
            lines.push(header);
        }
        lines.push(format!("{key} = {value}"));
    }
    std::fs::write(&path, lines.join("\n") + "\n").expect("write agent.toml");
}

/// Signs `order` with the server's operator key and posts it to `/api/v1/jobs` (the
/// server queues any operator-signed order there). Returns the job ids.
pub fn post_order(server: &TestServer, order: &Order) -> Vec<i64> {
    let envelope = server
        .operator_key()
        .sign(&Statement::Order(order.clone()))
        .expect("sign order");
    let bytes = codec::to_bytes(&envelope).expect("encode envelope");
    let body = serde_json::json!({
        "envelope": base64(&bytes),
        "ttl_ms": 600_000u64,
    });
    let (status, answer) = https_request(server, "POST", "/api/v1/jobs", Some(&body));
    assert_eq!(status, 200, "POST /api/v1/jobs: {answer}");
    answer["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids in {answer}"))
        .iter()
        .filter_map(Value::as_i64)
        .collect()
}

/// The admin token `init` wrote to `admin.toml`.
fn admin_token(server: &TestServer) -> String {
    let text =
        std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("read admin.toml");
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "admin_token").then(|| value.trim().trim_matches('"').to_string())
        })
        .expect("admin_token in admin.toml")
}

/// One HTTP/1.1 request to the admin API over TLS (the certificate chain is not what
/// these tests are about). Returns the status and the JSON body (`Null` if none).
fn https_request(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("herald-server").expect("server name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect API");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        tls,
        "{method} {path} HTTP/1.1\r\nHost: herald-server\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        admin_token(server),
        payload.len()
    )
    .expect("send request");
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// Standard base64 with padding (the API's envelope encoding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
