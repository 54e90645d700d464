//! The scenarios: hold, broadcast, unicast, push messages (`crate::messages`),
//! reconnect storm, agent idle, and the Mosquitto peer (campaigns are their own swarm:
//! `crate::campaign`). Each prints its figures; medians over repeated runs, p50/p99 where it
//! measures latency.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use herald_shared::envelope::Audience;

use crate::cluster::{cpu_time, rss, status_field, udp_receive_drops, Cluster};
use crate::stats::{histogram_quantile, median, ms, percentile, us};
use crate::swarm::{SimAgent, Swarm};

/// How big and how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Simulated agents.
    pub agents: usize,
    /// Broadcast runs.
    pub broadcast_runs: usize,
    /// Unicast round trips.
    pub unicast_runs: usize,
    /// Idle measurement window for the server and the real agent.
    pub idle_window: Duration,
    /// Deadline for any one phase.
    pub deadline: Duration,
}

impl Plan {
    /// The quick smoke-test plan (CI).
    pub fn quick() -> Plan {
        Plan {
            agents: 200,
            broadcast_runs: 3,
            unicast_runs: 20,
            idle_window: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        }
    }
}

/// Figures gathered for the summary and the ratio to the peer.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// Median time until every agent had the broadcast.
    pub broadcast_all: Option<Duration>,
    /// Median time until every Mosquitto subscriber had the message.
    pub mosquitto_all: Option<Duration>,
    /// Median time until every agent had the push message.
    pub messages_received: Option<Duration>,
    /// Median time until the API counted every agent's signed `stored` receipt.
    pub messages_stored: Option<Duration>,
}

/// Which scenarios run against the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Hold, broadcast, unicast, messages, reconnect storm.
    All,
    /// Hold (to connect the swarm), then messages.
    Messages,
}

/// Runs hold and then the `selection` against one swarm of `plan.agents`.
pub async fn swarm_scenarios(
    dir: &Path,
    bin_dir: &Path,
    plan: &Plan,
    selection: Selection,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let n = plan.agents;
    println!("\n## swarm of {n} agents");
    let (mut cluster, agents) = enrolled_cluster(dir, bin_dir, n).await?;
    cluster.start().await?;
    let pid = cluster.pid().context("server pid")?;
    let rss_before = rss(pid)?;

    // === hold ===
    let drops = udp_receive_drops();
    let swarm = Swarm::start(agents, cluster.quic)?;
    let connect_time = swarm.wait_connected(n, plan.deadline).await?;
    // Let the per-connection work settle before measuring memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss(pid)?;
    let cpu_before = cpu_time(pid)?;
    tokio::time::sleep(plan.idle_window).await;
    let cpu_idle = cpu_time(pid)? - cpu_before;
    println!(
        "hold: {n} agents connected in {:.2} s ({:.0} handshakes/s)",
        connect_time.as_secs_f64(),
        n as f64 / connect_time.as_secs_f64()
    );
    print_drops("hold", drops);
    println!(
        "hold: server RSS {:.1} MiB idle before, {:.1} MiB with {n} connections: {:.1} KiB per connection",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 / n as f64
    );
    println!(
        "hold: server CPU while idle {:.2} % of a core (over {:.0} s)",
        100.0 * cpu_idle.as_secs_f64() / plan.idle_window.as_secs_f64(),
        plan.idle_window.as_secs_f64()
    );

    if selection == Selection::Messages {
        crate::messages::messages(&cluster, &swarm, plan, figures).await?;
        swarm.stop().await;
        cluster.stop(false);
        return Ok(());
    }

    // === broadcast ===
    let rtt_before = cluster.signal_rtt().await?;
    let drops = udp_receive_drops();
    let mut totals = Vec::new();
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    let mut rtt = rtt_before.clone();
    for _ in 0..plan.broadcast_runs {
        let t0 = Instant::now();
        let ids = cluster.post_job(Audience::All).await?;
        let arrivals = swarm.wait_arrivals(&ids, plan.deadline).await?;
        let run: Vec<Duration> = arrivals.iter().map(|a| a.at.duration_since(t0)).collect();
        totals.push(run.iter().copied().max().unwrap_or_default());
        latencies.extend(run);
        // Done when the server has read every agent's acknowledgement (the next run
        // starts on a quiet relay; the unicast runs count none of these).
        rtt = cluster
            .signal_rtt_count_reaches(&rtt, n, plan.deadline)
            .await?;
        acked.push(t0.elapsed());
    }
    let all = median(&totals);
    figures.broadcast_all = Some(all);
    println!(
        "broadcast: {n} agents, {} runs: all received in {} ms (median); per agent p50 {} ms, p99 {} ms",
        plan.broadcast_runs,
        ms(all),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0))
    );
    println!(
        "broadcast: all acknowledged (every ack read by the server, polled every 10 ms) in {} ms (median)",
        ms(median(&acked))
    );
    println!(
        "broadcast: each run, all received / all acknowledged: {}",
        totals
            .iter()
            .zip(&acked)
            .map(|(r, a)| format!("{} / {} ms", ms(*r), ms(*a)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let quantile = |q| {
        histogram_quantile(&rtt_before, &rtt, q).context("the server recorded no acknowledgements")
    };
    println!(
        "broadcast: relay round trip (signal → ack, server side): p50 {} ms, p99 {} ms",
        ms(quantile(0.5)?),
        ms(quantile(0.99)?)
    );
    print_drops("broadcast", drops);

    // === unicast ===
    let target = Audience::Agent(herald_shared::agent_id(&first_key(&cluster)?));
    let rtt_before = cluster.signal_rtt().await?;
    let mut trips = Vec::new();
    for _ in 0..plan.unicast_runs {
        let t0 = Instant::now();
        let ids = cluster.post_job(target.clone()).await?;
        let arrivals = swarm.wait_arrivals(&ids, plan.deadline).await?;
        trips.push(arrivals[0].at.duration_since(t0));
    }
    println!(
        "unicast: API call → signal at the agent, {} runs with {n} idle: p50 {} ms, p99 {} ms",
        plan.unicast_runs,
        ms(percentile(&trips, 50.0)),
        ms(percentile(&trips, 99.0))
    );
    let rtt = cluster.signal_rtt().await?;
    let quantile = |q| {
        histogram_quantile(&rtt_before, &rtt, q).context("the server recorded no acknowledgements")
    };
    let relay_p50 = quantile(0.5)?;
    println!(
        "unicast: relay round trip (signal → ack, server side), {} runs with {n} idle: p50 {} µs, p99 {} µs",
        plan.unicast_runs,
        us(relay_p50),
        us(quantile(0.99)?)
    );
    let floor = crate::floor::quinn_round_trips(plan.unicast_runs).await?;
    println!(
        "unicast: bare quinn round trip (both ends in this process), {} runs: p50 {} µs, p99 {} µs; ratio relay/quinn p50 = {:.2}",
        plan.unicast_runs,
        us(percentile(&floor, 50.0)),
        us(percentile(&floor, 99.0)),
        relay_p50.as_secs_f64() / percentile(&floor, 50.0).as_secs_f64()
    );

    // === messages ===
    crate::messages::messages(&cluster, &swarm, plan, figures).await?;

    // === reconnect storm ===
    let attempts_before = swarm.observed.attempts.load(Ordering::SeqCst);
    let drops = udp_receive_drops();
    cluster.stop(false);
    let down = Instant::now();
    let mut report = Instant::now();
    while swarm.observed.connected.load(Ordering::SeqCst) > 0 {
        anyhow::ensure!(
            down.elapsed() < plan.deadline,
            "reconnect storm: {} agents still saw the stopped server after {:?}",
            swarm.observed.connected.load(Ordering::SeqCst),
            plan.deadline
        );
        if report.elapsed() >= Duration::from_secs(10) {
            println!(
                "reconnect: {} agents have not yet seen the server stop after {:.0} s",
                swarm.observed.connected.load(Ordering::SeqCst),
                down.elapsed().as_secs_f64()
            );
            report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "reconnect: every agent saw the server stop, {:.2} s after it exited",
        down.elapsed().as_secs_f64()
    );
    let sessions_before = swarm.observed.sessions.load(Ordering::SeqCst);
    cluster.start().await?;
    let restarted = Instant::now();
    let mut peak_rate = 0usize;
    let mut last = sessions_before;
    let mut last_tick = Instant::now();
    while swarm.observed.connected.load(Ordering::SeqCst) < n {
        anyhow::ensure!(
            restarted.elapsed() < plan.deadline,
            "reconnect storm: only {} of {n} back after {:?}",
            swarm.observed.connected.load(Ordering::SeqCst),
            plan.deadline
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last_tick.elapsed() >= Duration::from_secs(1) {
            let now = swarm.observed.sessions.load(Ordering::SeqCst);
            peak_rate =
                peak_rate.max(((now - last) as f64 / last_tick.elapsed().as_secs_f64()) as usize);
            last = now;
            last_tick = Instant::now();
        }
    }
    let back = restarted.elapsed();
    let now = swarm.observed.sessions.load(Ordering::SeqCst);
    peak_rate =
        peak_rate.max(((now - last) as f64 / last_tick.elapsed().as_secs_f64().max(0.05)) as usize);
    let attempts = swarm.observed.attempts.load(Ordering::SeqCst) - attempts_before;
    println!(
        "reconnect: server restarted with {n} agents: all back in {:.2} s; peak {peak_rate} handshakes/s; {:.2} attempts per agent",
        back.as_secs_f64(),
        attempts as f64 / n as f64
    );
    println!(
        "reconnect: {} connection attempts refused by the server's handshake limit",
        cluster
            .metric("herald_agent_handshake_failures_total{reason=\"overload\"}")
            .await?
    );
    print_drops("reconnect", drops);
    swarm.stop().await;
    cluster.stop(false);
    Ok(())
}

/// A server initialised in `dir` (not started) with `n` simulated agents, named
/// `sim-0` to `sim-{n-1}`, enrolled in its database; the agents are not connected yet.
pub async fn enrolled_cluster(
    dir: &Path,
    bin_dir: &Path,
    n: usize,
) -> anyhow::Result<(Cluster, Vec<SimAgent>)> {
    let cluster = Cluster::init(dir, bin_dir).await?;
    let started = Instant::now();
    let agents = (0..n)
        .map(|_| SimAgent::generate(cluster.fingerprint, herald_agent::tls::KEEP_ALIVE))
        .collect::<anyhow::Result<Vec<_>>>()?;
    cluster.enroll(&agents)?;
    println!(
        "setup: {n} identities made and enrolled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((cluster, agents))
}

/// How many UDP datagrams the kernel dropped (full receive buffers) since `before`.
pub(crate) fn print_drops(phase: &str, before: Option<u64>) {
    if let (Some(before), Some(now)) = (before, udp_receive_drops()) {
        println!(
            "{phase}: UDP datagrams dropped for full receive buffers: {}",
            now.saturating_sub(before)
        );
    }
}

fn first_key(cluster: &Cluster) -> anyhow::Result<Vec<u8>> {
    let db = rusqlite::Connection::open(cluster.dir.join("server").join("herald.db"))?;
    Ok(db.query_row(
        "SELECT public_key FROM agents WHERE name = 'sim-0'",
        [],
        |r| r.get(0),
    )?)
}

/// The real `herald-agent`, connected and idle: memory, CPU time and wake-ups.
pub async fn agent_idle(dir: &Path, bin_dir: &Path, plan: &Plan) -> anyhow::Result<()> {
    // The agent as shipped (`cargo build --profile dist -p herald-agent`) if it is built,
    // else the one beside the benchmark (always for a debug benchmark: the smoke test).
    let dist = bin_dir.join("../dist/herald-agent");
    let (agent_bin, build) = if !cfg!(debug_assertions) && dist.is_file() {
        (dist, "dist profile")
    } else {
        (
            bin_dir.join("herald-agent"),
            "not the dist profile: build it with `cargo build --profile dist -p herald-agent`",
        )
    };
    println!("\n## real herald-agent, idle ({build})");
    let mut cluster = Cluster::init(dir, bin_dir).await?;
    cluster.start().await?;
    let data = dir.join("server");
    let token = std::process::Command::new(bin_dir.join("herald-server"))
        .arg("--data-dir")
        .arg(&data)
        .args(["token", "create"])
        .output()?;
    anyhow::ensure!(token.status.success(), "token create failed");
    let token = String::from_utf8(token.stdout)?.trim().to_string();
    let state = dir.join("agent");
    let enrolled = std::process::Command::new(&agent_bin)
        .arg("--state-dir")
        .arg(&state)
        .args(["enroll", &token, "--name", "idle"])
        .output()?;
    anyhow::ensure!(
        enrolled.status.success(),
        "enroll failed: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut agent = std::process::Command::new(&agent_bin)
        .arg("--state-dir")
        .arg(&state)
        .arg("run")
        .env("HERALD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = agent.id();
    let start = Instant::now();
    loop {
        let agents: Vec<herald_server::model::AgentInfo> =
            cluster.client().get("/api/v1/agents").await?;
        if agents.iter().any(|a| a.online) {
            break;
        }
        anyhow::ensure!(start.elapsed() < plan.deadline, "agent did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Measure after start-up work is done.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = cpu_time(pid)?;
    let switches = |pid| -> anyhow::Result<u64> {
        Ok(status_field(pid, "voluntary_ctxt_switches:")?
            + status_field(pid, "nonvoluntary_ctxt_switches:")?)
    };
    let wake0 = switches(pid)?;
    tokio::time::sleep(plan.idle_window).await;
    let cpu = cpu_time(pid)? - cpu0;
    let wakes = switches(pid)? - wake0;
    let rss = rss(pid)?;
    let hwm = status_field(pid, "VmHWM:")? * 1024;
    // Private memory against pages of the (shared, evictable) executable and libraries.
    let anon = status_field(pid, "RssAnon:")? * 1024;
    let file = status_field(pid, "RssFile:")? * 1024;
    let _ = agent.kill();
    let _ = agent.wait();
    let secs = plan.idle_window.as_secs_f64();
    println!(
        "agent idle: RSS {:.1} MiB (peak {:.1} MiB; private {:.1} MiB, mapped files {:.1} MiB); CPU {:.3} % of a core; {:.2} wake-ups/s (over {secs:.0} s)",
        rss as f64 / 1048576.0,
        hwm as f64 / 1048576.0,
        anon as f64 / 1048576.0,
        file as f64 / 1048576.0,
        100.0 * cpu.as_secs_f64() / secs,
        wakes as f64 / secs
    );
    cluster.stop(false);
    Ok(())
}

/// The same fan-out through Mosquitto with TLS, if it is installed.
pub async fn mosquitto(dir: &Path, plan: &Plan, figures: &mut Figures) -> anyhow::Result<()> {
    println!("\n## mosquitto (TLS, QoS 1), {} subscribers", plan.agents);
    if let Err((need, limit)) = crate::mosquitto::open_files_for(plan.agents)? {
        println!(
            "mosquitto: {} subscribers need about {need} open files (one TCP socket each), the limit here is {limit}; skipping the peer column",
            plan.agents
        );
        return Ok(());
    }
    let Some(broker) = crate::mosquitto::Broker::start(dir)? else {
        println!("mosquitto not installed (apt-get install mosquitto); skipping the peer column");
        return Ok(());
    };
    let runs = crate::mosquitto::fanout(&broker, plan.agents, plan.broadcast_runs).await?;
    let totals: Vec<Duration> = runs.iter().map(|r| r.all_received).collect();
    let latencies: Vec<Duration> = runs
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    let all = median(&totals);
    figures.mosquitto_all = Some(all);
    println!(
        "mosquitto: {} subscribers, {} runs: all received in {} ms (median); per subscriber p50 {} ms, p99 {} ms",
        plan.agents,
        runs.len(),
        ms(all),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0))
    );
    Ok(())
}
