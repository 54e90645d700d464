//! `/healthz` and `/readyz` answer without a token, for load balancers and
//! orchestrators: healthz says the process is up; readyz commits a write to the
//! database and checks the QUIC endpoint, and answers 503 with the reason while the
//! database takes no writes.

use herald_tests::{wait_until, TestServer, DEADLINE};
use rusqlite::Connection;

/// GET `path` without a token: status and JSON body.
fn get(server: &TestServer, path: &str) -> (u16, serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = herald_tests::https_client()
            .get(format!("{}{path}", server.https_url()))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    })
}

#[test]
fn readyz_fails_when_the_database_is_unwritable() {
    if herald_tests::sqlite_only("holds herald.db's SQLite write lock") {
        return;
    }
    let server = TestServer::start("readyz");
    assert_eq!(get(&server, "/healthz").0, 200);
    let (status, body) = get(&server, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "writable");
    assert_eq!(body["quic"], "serving");

    // Another process holds the database's write lock: no write can be committed.
    let db = Connection::open(server.db_path()).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (status, body) = get(&server, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    let reason = body["database"].as_str().unwrap_or_default();
    assert!(reason.starts_with("not writable"), "{body}");
    // Liveness is not readiness: the process is still up.
    assert_eq!(get(&server, "/healthz").0, 200);

    db.execute_batch("ROLLBACK").unwrap();
    wait_until("ready again", DEADLINE, || {
        (get(&server, "/readyz").0 == 200).then_some(())
    });
}
