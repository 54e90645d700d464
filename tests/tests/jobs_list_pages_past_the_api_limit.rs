//! `jobs list` shows as many jobs as `--limit` asks for, paging past the API's 1,000
//! rows a call, and says when there are more than it shows.

use herald_tests::{TestAgent, TestServer};
use serde_json::Value;

fn ids(list: &Value) -> Vec<i64> {
    list.as_array()
        .expect("jobs list is an array")
        .iter()
        .map(|j| j["id"].as_i64().expect("job id"))
        .collect()
}

#[test]
fn jobs_list_pages_past_the_api_limit() {
    if herald_tests::sqlite_only("copies job rows straight into herald.db") {
        return;
    }
    let server = TestServer::start("jobs-paging");
    let _agent = TestAgent::enroll(&server, "box", &[]);
    let first = server.run_job("agent:box", &[], &["/bin/true"])[0];
    {
        // 1,100 more rows like it, straight into the database (the CLI would take minutes).
        let db = rusqlite::Connection::open(server.db_path()).expect("open herald.db");
        for _ in 0..1100 {
            db.execute(
                "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at, deliver_after, expires_at)
                 SELECT agent_id, order_id, schedule_id, state, created_at, deliver_after, expires_at
                 FROM jobs WHERE id = ?1",
                [first],
            )
            .expect("copy a job row");
        }
    }

    let out = server.cli(&["jobs", "list", "--limit", "1050", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let got = ids(&list);
    assert_eq!(got.len(), 1050);
    assert!(
        got.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there are more"), "{stderr}");

    let out = server.cli(&["jobs", "list", "--limit", "5000", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(ids(&list).len(), 1101);
    assert_eq!(*ids(&list).last().expect("oldest"), first);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("there are more"));

    let text = server.cli(&["jobs", "list"]);
    assert!(String::from_utf8_lossy(&text.stderr).contains("showing the newest 50 jobs"));
}
