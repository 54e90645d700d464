//! Crashes around a running job (DESIGN.md, "Delivery semantics"):
//!
//! * the agent is killed (SIGKILL) while a job runs: after it restarts, the job is
//!   reported `interrupted` and the program is not run a second time;
//! * the server is killed while a job runs: the result waits in the agent's outbox and
//!   arrives exactly once after the server is back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herald_tests::{strip_ansi, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// Number of results in the agent's local outbox.
fn results_waiting(agent: &TestAgent) -> u64 {
    agent.status()["results_waiting"]
        .as_u64()
        .expect("status --json has results_waiting")
}

/// Lines of a file (empty if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Kills a job process the test caused (left behind when its agent was SIGKILLed), by
/// the pid the job wrote itself, when dropped.
struct Orphan(Option<i32>);

impl Drop for Orphan {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        // Only if it is still our `sleep` (pids are reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("sleep") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn killed_agent_reports_running_job_interrupted_and_does_not_rerun_it() {
    let started = Instant::now();
    let server = TestServer::start("crash-agent");
    let mut agent = TestAgent::start(&server, "crashy");
    let target = format!("agent:{}", agent.name);

    let runs = server.dir.path().join("runs.txt");
    let pid_file = server.dir.path().join("job.pid");
    let pid_tmp = server.dir.path().join("job.pid.tmp");
    // Count each run, publish the pid atomically, then block (exec keeps the pid).
    let script = format!(
        "echo run >> {runs}; echo $$ > {tmp}; mv {tmp} {pid}; exec /bin/sleep 60",
        runs = shell_quote(&runs),
        tmp = shell_quote(&pid_tmp),
        pid = shell_quote(&pid_file),
    );
    let ids = server.run_job(&target, &[], &["/bin/sh", "-c", &script]);
    assert_eq!(ids.len(), 1, "one job for one agent");
    let job_id = ids[0];

    // The job really runs: the server says so and the program has started.
    server.wait_job_state(job_id, "running", DEADLINE);
    let pid: i32 = wait_until("the job to write its pid", DEADLINE, || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    });
    let _orphan = Orphan(Some(pid));
    assert_eq!(lines(&runs), ["run"]);

    // Crash the agent mid-job, then bring it back.
    agent.kill();
    agent.spawn();

    let job = server.wait_job_state(job_id, "interrupted", DEADLINE);
    assert_eq!(job["exit_code"], Value::Null, "{job}");
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("not re-run")),
        "interrupted job explains itself: {job}"
    );
    agent.wait_online(&server);
    // Interrupted means stopped: the restarted agent killed what the dead one left.
    wait_until("the orphaned job program to be killed", DEADLINE, || {
        let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("sleep"))
            .unwrap_or(false);
        (!alive).then_some(())
    });

    // A later job on the same agent completes; by then a re-run of the interrupted job
    // (which recovery would start before connecting) would have written its line.
    let later = server.cli(&["run", "--to", &target, "--wait", "--", "/bin/echo", "later"]);
    assert!(
        later.status.success(),
        "follow-up job failed: {}",
        String::from_utf8_lossy(&later.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&later.stdout), "later\n");

    assert_eq!(
        lines(&runs),
        ["run"],
        "the interrupted program ran a second time"
    );
    let job = server.job(job_id);
    assert_eq!(job["state"], "interrupted", "final state is kept: {job}");
    wait_until("the agent outbox to drain", DEADLINE, || {
        (results_waiting(&agent) == 0).then_some(())
    });
    // The agent spawned programs twice in all: the interrupted job and the follow-up.
    let log = strip_ansi(&agent.log());
    assert_eq!(
        log.matches("herald_agent::exec: job started").count(),
        2,
        "only the first job and the follow-up were started:\n{log}"
    );
    eprintln!("agent-crash test took {:?}", started.elapsed());
}

/// Waits until a restarted server's admin API answers (the harness's `spawn` waits for a
/// "serving" line in the appended log; this also covers an older harness that matched the
/// previous run's line and returned before the new process listened).
fn wait_for_api(server: &TestServer) {
    wait_until("the restarted server's API to answer", DEADLINE, || {
        server
            .cli(&["agents", "list", "--json"])
            .status
            .success()
            .then_some(())
    });
}

/// Lines in the server log recording that a result for `job_id` was stored now.
fn stored_result_lines(log: &Path, job_id: i64) -> usize {
    let needle = format!("job_id={job_id} ");
    lines(log)
        .iter()
        .map(|l| strip_ansi(l))
        .filter(|l| l.contains(" result ") || l.ends_with(" result"))
        .filter(|l| l.contains(&needle) && l.contains("stored=true"))
        .count()
}

/// Upper bound for a result to come back after a server restart, allowing for the
/// agent's QUIC idle timeout (60 s) to notice the dead connection.
const SLOW_RESULT_DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn result_made_while_server_is_down_arrives_exactly_once() {
    let started = Instant::now();
    let mut server = TestServer::start("crash-server");
    let agent = TestAgent::start(&server, "patient");
    let target = format!("agent:{}", agent.name);

    let runs = server.dir.path().join("runs.txt");
    let go: PathBuf = server.dir.path().join("go");
    let script = format!(
        "echo run >> {runs}; while [ ! -e {go} ]; do /bin/sleep 0.05; done; echo made while the server was down",
        runs = shell_quote(&runs),
        go = shell_quote(&go),
    );
    let ids = server.run_job(&target, &[], &["/bin/sh", "-c", &script]);
    assert_eq!(ids.len(), 1);
    let job_id = ids[0];
    server.wait_job_state(job_id, "running", DEADLINE);

    // The server dies while the job runs; the job finishes on the agent meanwhile.
    server.kill();
    std::fs::write(&go, b"").expect("create go file");
    wait_until("the result to wait in the agent outbox", DEADLINE, || {
        (results_waiting(&agent) == 1).then_some(())
    });
    assert!(
        agent.log().contains("job finished"),
        "agent log:\n{}",
        agent.log()
    );

    // The server comes back; the result is delivered and acknowledged. The wait allows
    // for the agent's QUIC idle timeout (60 s), so that the exactly-once checks below
    // run even while reconnection is slow; promptness is asserted last.
    let back = Instant::now();
    server.spawn();
    wait_for_api(&server);
    let job = server.wait_job_state(job_id, "succeeded", SLOW_RESULT_DEADLINE);
    let arrival = back.elapsed();
    eprintln!("result arrived {arrival:?} after the server restarted");
    assert_eq!(job["exit_code"], 0, "{job}");
    assert_eq!(job["stdout"], "made while the server was down\n", "{job}");
    assert_eq!(job["agent_id"], agent.id.as_str());
    wait_until("the agent outbox to drain", DEADLINE, || {
        (results_waiting(&agent) == 0).then_some(())
    });

    // Exactly once: one job, one run, one stored result.
    let jobs = server.json(&["jobs", "list"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
    assert_eq!(lines(&runs), ["run"], "the program ran more than once");
    assert_eq!(
        stored_result_lines(&server.log_path(), job_id),
        1,
        "the result was not stored exactly once; server log:\n{}",
        server.log_tail()
    );
    let again = server.job(job_id);
    assert_eq!(again["state"], "succeeded");
    assert_eq!(again["finished_at"], job["finished_at"]);

    // Agents "reconnect by themselves" after a server restart (docs/OPERATIONS.md):
    // the result must not wait for the old connection's idle timeout.
    assert!(
        arrival < DEADLINE,
        "the result arrived {arrival:?} after the server restarted (limit {DEADLINE:?}): \
         the agent kept its dead connection until the QUIC idle timeout instead of \
         reconnecting to the restarted server"
    );
    eprintln!("server-crash test took {:?}", started.elapsed());
}
