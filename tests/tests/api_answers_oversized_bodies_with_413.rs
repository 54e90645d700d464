//! A request body over the API's limit gets an HTTP 413 with a message the client can
//! read, not a connection cut in the middle of the upload.

use std::sync::Arc;

use herald_tests::{AcceptAnyServerCert, TestServer};

/// The admin token `init` wrote into the data directory's `admin.toml`.
fn admin_token(server: &TestServer) -> String {
    let text = std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("admin.toml");
    text.lines()
        .find_map(|l| l.strip_prefix("admin_token = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("admin_token in admin.toml")
}

#[test]
fn a_ten_megabyte_body_gets_413_with_a_message() {
    let server = TestServer::start("oversized");
    let token = admin_token(&server);
    let url = format!("{}/api/v1/jobs", server.https_url());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, body) = runtime.block_on(async {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new())
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .expect("HTTP client");
        let response = client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(vec![b' '; 10 * 1024 * 1024])
            .send()
            .await
            .expect("an HTTP answer, not a cut connection");
        let status = response.status().as_u16();
        (status, response.text().await.expect("the answer's body"))
    });
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("10485760 bytes") && body.contains("at most 2097152 bytes"),
        "{body}"
    );
    // The server is fine afterwards.
    server.cli_ok(&["agents", "list"]);
}
