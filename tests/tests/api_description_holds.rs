//! The OpenAPI description at `/api/v1/openapi.json` (docs/OPERATIONS.md, "API
//! description") against the real server: every operation it lists is served, and
//! schemathesis, generating requests from it, gets no 5xx answer and no crash.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use herald_tests::{https_client, is_root, TestServer};
use serde_json::Value;

/// How many examples schemathesis generates per operation and phase.
const EXAMPLES: &str = "40";
/// How long the whole schemathesis run may take.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn admin_token(server: &TestServer) -> String {
    let admin = std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("admin.toml");
    admin
        .lines()
        .find_map(|l| l.strip_prefix("admin_token = "))
        .expect("admin_token in admin.toml")
        .trim_matches('"')
        .to_string()
}

#[test]
fn every_described_operation_is_served() {
    let server = TestServer::start("openapi-served");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = https_client();
        let base = server.https_url();
        let document: Value = client
            .get(format!("{base}/api/v1/openapi.json"))
            .send()
            .await
            .expect("GET openapi.json")
            .json()
            .await
            .expect("openapi.json is JSON");
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().expect("paths");
        let mut operations = 0;
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                operations += 1;
                assert!(operation["summary"].is_string(), "{method} {path}");
                let concrete = path.replace(['{', '}'], "");
                let url = format!("{base}{concrete}");
                let method: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
                // Without a token: the route exists (401, or a public answer), never
                // the router's 404 or 405.
                let response = client
                    .request(method.clone(), &url)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                let routed = status != 405 && (status != 404 || body.contains("\"error\""));
                assert!(routed, "{method} {path} is not served: {status} {body}");
            }
        }
        assert!(operations >= 50, "{operations} operations described");
    });
}

#[test]
fn schemathesis_finds_no_server_error() {
    let available = Command::new("schemathesis")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        // scripts/test.sh installs it when it runs as root (as in CI).
        assert!(
            !is_root(),
            "schemathesis is not installed; scripts/test.sh installs it (pip install schemathesis)"
        );
        eprintln!("skipped: schemathesis is not installed (pip install schemathesis)");
        return;
    }
    let server = TestServer::start("openapi-fuzz");
    let token = admin_token(&server);
    let mut child = Command::new("schemathesis")
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", server.https_url()))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .arg("--tls-verify")
        .arg(server.data_dir().join("ca.pem"))
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", EXAMPLES])
        .args(["--request-timeout", "20"])
        .arg("--no-color")
        // Its cache (`.schemathesis/`) goes to the test's directory, not the source tree.
        .current_dir(server.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    let (sender, receiver) = mpsc::channel();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        let mut out = String::new();
        let mut err = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        let _ = sender.send(format!("{out}\n{err}"));
    });
    let output = match receiver.recv_timeout(RUN_LIMIT) {
        Ok(output) => output,
        Err(_) => {
            let _ = child.kill();
            panic!("schemathesis ran for more than {RUN_LIMIT:?}");
        }
    };
    let status = child.wait().expect("wait for schemathesis");
    // On a loaded machine the client's TLS connection is sometimes cut while it still
    // sends (schemathesis reports "Network Error ... EOF occurred in violation of
    // protocol"): that is no answer at all, not a server error. Anything else fails.
    let only_network_errors = !output.contains("= FAILURES =")
        && output.contains("= ERRORS =")
        && output
            .split("= ERRORS =")
            .nth(1)
            .map(|rest| rest.split("= WARNINGS =").next().unwrap_or(rest))
            .is_some_and(|errors| {
                errors.matches("Network Error").count() >= 1
                    && errors.matches(" /api/").count() == errors.matches("Network Error").count()
            });
    if only_network_errors {
        eprintln!("schemathesis saw connections cut under load (no server error):\n{output}");
    }
    assert!(
        status.success() || only_network_errors,
        "schemathesis found a problem ({status}):\n{output}\n--- server log tail:\n{}",
        server.log_tail()
    );
    assert!(output.contains("passed"), "{output}");
    assert!(
        !server.log_tail().contains("panicked"),
        "the server panicked:\n{}",
        server.log_tail()
    );
}
