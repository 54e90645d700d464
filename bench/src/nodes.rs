//! `herald-bench nodes` (issue 19): one node against two on one PostgreSQL database,
//! with one node on SQLite as the reference, each measured in the same run against a
//! swarm of the same size.
//!
//! Per configuration: a broadcast to every agent (API call → every agent has the
//! signal), unicast round trips to one agent on the node the API call goes to and, with
//! two nodes, to one on the other node (the job is committed by the first node and
//! reaches the second through PostgreSQL's `NOTIFY`), and, with two nodes, a reconnect:
//! the second node is killed with SIGKILL and the time is taken until every agent it
//! held is connected to the survivor.
//!
//! How the swarm reaches the nodes: every simulated agent is given every node's address
//! (as `public_addr` lists them) and half prefer each node, so the swarm is split evenly.
//! When its node stops answering, an agent connects as the real agent does
//! (`herald_agent::link::connect_preferring`): the address that answered last first,
//! 4 s, then the next. A killed node sends nothing, so its agents notice only when
//! their QUIC idle timeout expires (the agent's: 60 s; `--quick` shortens it to 4 s so
//! that the smoke test stays short, and says so).
//!
//! Each configuration gets a fresh PostgreSQL database on the server `--database-url`
//! names (or what `scripts/pg-cluster.sh` prints; that cluster is left running),
//! dropped afterwards. The swarm's identities are written into the database directly,
//! as for SQLite (`Cluster::enroll`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use herald_shared::envelope::Audience;

use crate::cluster::Cluster;
use crate::stats::{median, ms, percentile};
use crate::swarm::{SimAgent, Swarm};

/// How big and how long.
#[derive(Debug, Clone)]
pub struct NodesPlan {
    /// Simulated agents (split evenly over the nodes).
    pub agents: usize,
    /// Broadcasts per configuration.
    pub broadcast_runs: usize,
    /// Unicast round trips per target agent.
    pub unicast_runs: usize,
    /// The agents' keep-alive interval and QUIC idle timeout when not the real agent's.
    pub idle_timeout: Option<(Duration, Duration)>,
    /// Also measure one node on SQLite, as the reference.
    pub sqlite: bool,
    /// Deadline for any one phase (the reconnect gets the idle timeout on top).
    pub deadline: Duration,
}

impl NodesPlan {
    /// Default swarm size.
    pub const AGENTS: usize = 10_000;

    /// The smoke test's plan: 200 agents, one broadcast, a 4 s idle timeout.
    pub fn quick() -> NodesPlan {
        NodesPlan {
            agents: 200,
            broadcast_runs: 1,
            unicast_runs: 20,
            idle_timeout: Some((Duration::from_secs(1), Duration::from_secs(4))),
            sqlite: true,
            deadline: Duration::from_secs(60),
        }
    }

    fn idle(&self) -> Duration {
        self.idle_timeout
            .map_or(herald_agent::tls::IDLE_TIMEOUT, |(_, idle)| idle)
    }
}

/// Where the server keeps its data, and on how many nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Sqlite,
    Postgres { nodes: usize },
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Sqlite => "1 node, SQLite".into(),
            Setup::Postgres { nodes: 1 } => "1 node, PostgreSQL".into(),
            Setup::Postgres { nodes } => format!("{nodes} nodes, PostgreSQL"),
        }
    }

    fn nodes(self) -> usize {
        match self {
            Setup::Sqlite => 1,
            Setup::Postgres { nodes } => nodes,
        }
    }
}

/// p50 and p99 of some latencies.
#[derive(Debug, Clone, Copy)]
struct Spread {
    p50: Duration,
    p99: Duration,
}

impl Spread {
    fn of(samples: &[Duration]) -> Spread {
        Spread {
            p50: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
        }
    }

    fn cell(self) -> String {
        format!("{} / {} ms", ms(self.p50), ms(self.p99))
    }
}

/// What one node's death cost its agents.
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// The agents that were on the killed node.
    agents: usize,
    /// Kill → the last of them noticed (its session ended).
    noticed: Duration,
    /// Kill → the last of them connected to the survivor.
    all_moved: Duration,
    /// Per agent, its session ending → connected to the survivor.
    gap: Spread,
    /// Connection attempts per moved agent.
    attempts: f64,
}

/// One configuration's figures.
#[derive(Debug, Clone)]
struct Row {
    setup: Setup,
    connect: Duration,
    /// Median over runs of the time until every agent had the broadcast.
    broadcast_all: Duration,
    /// Every agent's latency, over every run.
    broadcast: Spread,
    /// The same, for the agents of each node.
    broadcast_by_node: Vec<Spread>,
    unicast_same: Spread,
    unicast_cross: Option<Spread>,
    moved: Option<Moved>,
}

/// Runs every configuration and prints its lines, then the table and the ratios.
/// `server_url` is a PostgreSQL server on which databases may be created and dropped.
pub async fn nodes(
    root: &Path,
    bin_dir: &Path,
    plan: &NodesPlan,
    server_url: &str,
) -> anyhow::Result<()> {
    let mut setups = Vec::new();
    if plan.sqlite {
        setups.push(Setup::Sqlite);
    }
    setups.extend([Setup::Postgres { nodes: 1 }, Setup::Postgres { nodes: 2 }]);
    let mut rows = Vec::new();
    for (i, setup) in setups.into_iter().enumerate() {
        let dir = root.join(format!("setup-{i}"));
        let database = match setup {
            Setup::Sqlite => None,
            Setup::Postgres { .. } => Some(Database::create(server_url)?),
        };
        let row = measure(
            &dir,
            bin_dir,
            plan,
            setup,
            database.as_ref().map(|d| &*d.url),
        )
        .await;
        if let Some(database) = database {
            // A database left behind does not make the figures wrong: say so, go on.
            if let Err(e) = database.drop_now() {
                eprintln!("herald-bench: {e:#} (drop it by hand)");
            }
        }
        rows.push(row?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    report(plan, &rows);
    Ok(())
}

async fn measure(
    dir: &Path,
    bin_dir: &Path,
    plan: &NodesPlan,
    setup: Setup,
    database_url: Option<&str>,
) -> anyhow::Result<Row> {
    let n = plan.agents;
    println!("\n## {}, {n} agents", setup.name());
    let mut nodes = match database_url {
        None => vec![Cluster::init(dir, bin_dir).await?],
        Some(url) => Cluster::init_nodes(dir, bin_dir, url, setup.nodes()).await?,
    };
    let started = Instant::now();
    let agents = (0..n)
        .map(|_| {
            let agent = SimAgent::generate(nodes[0].fingerprint, herald_agent::tls::KEEP_ALIVE)?;
            match plan.idle_timeout {
                Some((keep_alive, idle)) => agent.with_idle_timeout(keep_alive, idle),
                None => Ok(agent),
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    nodes[0].enroll(&agents)?;
    println!(
        "setup: {n} identities made and enrolled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for node in &mut nodes {
        node.start().await?;
    }
    let quic: Vec<SocketAddr> = nodes.iter().map(|node| node.quic).collect();
    // Agent i prefers node i % nodes (`Swarm::start_on_nodes`).
    let count = nodes.len();
    let home = move |agent: usize| agent % count;

    // === hold ===
    let swarm = if nodes.len() == 1 {
        Swarm::start(agents, quic[0])?
    } else {
        Swarm::start_on_nodes(agents, &quic)?
    };
    let connect = swarm.wait_connected(n, plan.deadline).await?;
    let per_node: Vec<usize> = quic
        .iter()
        .map(|&addr| swarm.observed.connected_to(addr))
        .collect();
    println!(
        "hold: {n} agents connected in {:.2} s; per node: {}",
        connect.as_secs_f64(),
        per_node
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" + ")
    );
    for (i, &count) in per_node.iter().enumerate() {
        let expected = (0..n).filter(|&a| home(a) == i).count();
        anyhow::ensure!(
            count == expected,
            "node {i} holds {count} agents, not its {expected}"
        );
    }
    // As in the other scenarios: the per-connection work (and here each node's record
    // of the agents it holds) settles before anything is measured.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // === broadcast, through node 0 ===
    let mut acked = acked_total(&nodes).await?;
    let mut totals = Vec::new();
    let mut latencies = Vec::new();
    let mut by_node: Vec<Vec<Duration>> = vec![Vec::new(); nodes.len()];
    for _ in 0..plan.broadcast_runs {
        let t0 = Instant::now();
        let jobs = nodes[0].post_job(Audience::All).await?;
        anyhow::ensure!(
            jobs.len() == n,
            "a broadcast made {} jobs, not {n}",
            jobs.len()
        );
        let arrivals = swarm.wait_arrivals(&jobs, plan.deadline).await?;
        let mut last = Duration::ZERO;
        for arrival in &arrivals {
            let latency = arrival.at.duration_since(t0);
            last = last.max(latency);
            latencies.push(latency);
            by_node[home(arrival.agent)].push(latency);
        }
        totals.push(last);
        // The next run starts on quiet nodes: every acknowledgement read.
        acked = wait_acked(&nodes, acked + n as u64, plan.deadline).await?;
    }
    let row_broadcast_all = median(&totals);
    let broadcast = Spread::of(&latencies);
    println!(
        "broadcast: {n} agents, {} runs: all received in {} ms (median; each run: {}); per agent p50 {} ms, p99 {} ms",
        plan.broadcast_runs,
        ms(row_broadcast_all),
        totals.iter().map(|t| ms(*t)).collect::<Vec<_>>().join(", "),
        ms(broadcast.p50),
        ms(broadcast.p99)
    );
    let broadcast_by_node: Vec<Spread> = by_node.iter().map(|l| Spread::of(l)).collect();
    if nodes.len() > 1 {
        for (i, spread) in broadcast_by_node.iter().enumerate() {
            println!(
                "broadcast: agents on node {i}{}: p50 {} ms, p99 {} ms",
                if i == 0 { " (the API's)" } else { "" },
                ms(spread.p50),
                ms(spread.p99)
            );
        }
    }

    // === unicast: to agent 0 (on node 0, the API's) and agent 1 (on node 1) ===
    let targets: Vec<usize> = (0..nodes.len().min(2)).collect();
    if let Some(&cross) = targets.get(1) {
        let links = swarm.observed.links.lock().expect("links lock");
        let on = links
            .iter()
            .rev()
            .find(|l| l.agent == cross)
            .map(|l| l.server);
        anyhow::ensure!(
            on == Some(quic[1]),
            "agent {cross} is not on node 1 ({on:?})"
        );
    }
    let mut trips: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    for _ in 0..plan.unicast_runs {
        // Alternating, so that both see the same conditions.
        for (&target, trips) in targets.iter().zip(&mut trips) {
            let t0 = Instant::now();
            let jobs = nodes[0]
                .post_job(Audience::Agent(ids[target].clone()))
                .await?;
            let arrivals = swarm.wait_arrivals(&jobs, plan.deadline).await?;
            trips.push(arrivals[0].at.duration_since(t0));
        }
    }
    let unicast_same = Spread::of(&trips[0]);
    println!(
        "unicast: API call on node 0 → signal at an agent on node 0, {} runs with {n} idle: p50 {} ms, p99 {} ms",
        plan.unicast_runs,
        ms(unicast_same.p50),
        ms(unicast_same.p99)
    );
    let unicast_cross = trips.get(1).map(|t| Spread::of(t));
    if let Some(cross) = unicast_cross {
        println!(
            "unicast: API call on node 0 → signal at an agent on node 1 (through NOTIFY), {} runs: p50 {} ms, p99 {} ms",
            plan.unicast_runs,
            ms(cross.p50),
            ms(cross.p99)
        );
    }

    // === reconnect: the last node killed ===
    let moved = if nodes.len() > 1 {
        Some(kill_and_move(&mut nodes, &swarm, plan, home).await?)
    } else {
        None
    };

    swarm.stop().await;
    for node in &mut nodes {
        node.stop(false);
    }
    Ok(Row {
        setup,
        connect,
        broadcast_all: row_broadcast_all,
        broadcast,
        broadcast_by_node,
        unicast_same,
        unicast_cross,
        moved,
    })
}

/// Kills the last node with SIGKILL and waits until every agent is on the others.
async fn kill_and_move(
    nodes: &mut [Cluster],
    swarm: &Swarm,
    plan: &NodesPlan,
    home: impl Fn(usize) -> usize,
) -> anyhow::Result<Moved> {
    let n = plan.agents;
    let last = nodes.len() - 1;
    let dead = nodes[last].quic;
    let moving = (0..n).filter(|&a| home(a) == last).count();
    let attempts_before = swarm.observed.attempts.load(Ordering::SeqCst);
    let log_from = swarm.observed.links.lock().expect("links lock").len();
    let killed = Instant::now();
    nodes[last].stop(true);
    let deadline = plan.deadline + plan.idle();
    let mut report = Instant::now();
    loop {
        let notified = swarm.observed.changed.notified();
        let elsewhere: usize = nodes[..last]
            .iter()
            .map(|node| swarm.observed.connected_to(node.quic))
            .sum();
        if elsewhere >= n {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < deadline,
            "reconnect: only {elsewhere} of {n} agents on the surviving nodes {deadline:?} after the kill"
        );
        if report.elapsed() >= Duration::from_secs(10) {
            println!(
                "reconnect: {:.0} s after the kill, {} agents still on the killed node (they notice after the {} s idle timeout), {elsewhere} of {n} on the survivors",
                killed.elapsed().as_secs_f64(),
                swarm.observed.connected_to(dead),
                plan.idle().as_secs()
            );
            report = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
    let attempts = swarm.observed.attempts.load(Ordering::SeqCst) - attempts_before;
    let links = swarm.observed.links.lock().expect("links lock")[log_from..].to_vec();
    let mut noticed = Duration::ZERO;
    let mut all_moved = Duration::ZERO;
    let mut gaps = Vec::with_capacity(moving);
    for agent in (0..n).filter(|&a| home(a) == last) {
        let down = links
            .iter()
            .find(|l| l.agent == agent && !l.up && l.server == dead)
            .with_context(|| format!("agent {agent} never lost the killed node"))?;
        let up = links
            .iter()
            .find(|l| l.agent == agent && l.up && l.at >= down.at)
            .with_context(|| format!("agent {agent} never reached another node"))?;
        noticed = noticed.max(down.at.duration_since(killed));
        all_moved = all_moved.max(up.at.duration_since(killed));
        gaps.push(up.at.duration_since(down.at));
    }
    let moved = Moved {
        agents: moving,
        noticed,
        all_moved,
        gap: Spread::of(&gaps),
        attempts: attempts as f64 / moving.max(1) as f64,
    };
    println!(
        "reconnect: node {last} killed (SIGKILL) holding {moving} agents: all noticed in {:.2} s (QUIC idle timeout {} s), all on the survivor in {:.2} s; per agent, noticed → connected p50 {:.2} s, p99 {:.2} s (the first 4 s: the killed node, tried first); {:.2} attempts per moved agent",
        noticed.as_secs_f64(),
        plan.idle().as_secs(),
        all_moved.as_secs_f64(),
        moved.gap.p50.as_secs_f64(),
        moved.gap.p99.as_secs_f64(),
        moved.attempts
    );
    println!(
        "reconnect: {} connection attempts refused by the survivor's handshake limit",
        nodes[0]
            .metric("herald_agent_handshake_failures_total{reason=\"overload\"}")
            .await?
    );
    Ok(moved)
}

/// Acknowledgements read so far by every node together (each node's relay round-trip
/// histogram counts those of its own agents).
async fn acked_total(nodes: &[Cluster]) -> anyhow::Result<u64> {
    let mut total = 0;
    for node in nodes {
        total += node.signal_rtt().await?.last().map_or(0, |(_, c)| *c);
    }
    Ok(total)
}

/// Waits until the nodes have read `target` acknowledgements in all; returns the count.
async fn wait_acked(nodes: &[Cluster], target: u64, deadline: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    loop {
        let total = acked_total(nodes).await?;
        if total >= target {
            return Ok(total);
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "the nodes read {total} of {target} acknowledgements within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn report(plan: &NodesPlan, rows: &[Row]) {
    let n = plan.agents;
    println!(
        "\n## several nodes: {n} agents, {} broadcast runs, {} unicast runs per target",
        plan.broadcast_runs, plan.unicast_runs
    );
    println!(
        "| configuration | connect {n} | broadcast to {n}: all received (median) | broadcast per agent p50 / p99 | unicast same node p50 / p99 | unicast cross-node p50 / p99 | SIGKILL of a node: all its agents on the survivor |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.2} s | {} ms | {} | {} | {} | {} |",
            row.setup.name(),
            row.connect.as_secs_f64(),
            ms(row.broadcast_all),
            row.broadcast.cell(),
            row.unicast_same.cell(),
            row.unicast_cross.map_or("—".into(), Spread::cell),
            row.moved.map_or("—".into(), |m| format!(
                "{:.2} s ({} agents; all noticed by {:.2} s, then per agent p50 {:.2} / p99 {:.2} s)",
                m.all_moved.as_secs_f64(),
                m.agents,
                m.noticed.as_secs_f64(),
                m.gap.p50.as_secs_f64(),
                m.gap.p99.as_secs_f64()
            )),
        );
    }
    let find = |setup| rows.iter().find(|r| r.setup == setup);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    if let (Some(one), Some(two)) = (
        find(Setup::Postgres { nodes: 1 }),
        find(Setup::Postgres { nodes: 2 }),
    ) {
        println!(
            "ratio: two nodes / one node (PostgreSQL): broadcast all received {:.2}, per agent p50 {:.2}, p99 {:.2}; unicast same node p50 {:.2}, p99 {:.2}",
            ratio(two.broadcast_all, one.broadcast_all),
            ratio(two.broadcast.p50, one.broadcast.p50),
            ratio(two.broadcast.p99, one.broadcast.p99),
            ratio(two.unicast_same.p50, one.unicast_same.p50),
            ratio(two.unicast_same.p99, one.unicast_same.p99)
        );
        if let Some(cross) = two.unicast_cross {
            println!(
                "ratio: cross-node / same node (two nodes): unicast p50 {:.2}, p99 {:.2}",
                ratio(cross.p50, two.unicast_same.p50),
                ratio(cross.p99, two.unicast_same.p99)
            );
        }
        if let [api, other] = two.broadcast_by_node.as_slice() {
            println!(
                "ratio: broadcast, agents on the other node / on the API's node: p50 {:.2}, p99 {:.2}",
                ratio(other.p50, api.p50),
                ratio(other.p99, api.p99)
            );
        }
        if let Some(sqlite) = find(Setup::Sqlite) {
            println!(
                "ratio: one node PostgreSQL / SQLite: broadcast all received {:.2}, unicast p50 {:.2}",
                ratio(one.broadcast_all, sqlite.broadcast_all),
                ratio(one.unicast_same.p50, sqlite.unicast_same.p50)
            );
        }
    }
}

// === the databases ===

/// The PostgreSQL server to make the databases on: `given`, else what
/// `scripts/pg-cluster.sh` prints (it starts a throwaway cluster on loopback, or finds
/// the one already running, and leaves it running).
pub fn postgres_server(given: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = given {
        return Ok(url);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "needs PostgreSQL: {} failed: {} (install the server with `apt-get install postgresql`, or give --database-url)",
        script.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let url = String::from_utf8(output.stdout)?.trim().to_string();
    anyhow::ensure!(
        url.starts_with("postgres://"),
        "{} printed {url:?}, not a postgres:// URL",
        script.display()
    );
    Ok(url)
}

/// A fresh database on the server, for one configuration.
struct Database {
    server: String,
    name: String,
    url: String,
}

impl Database {
    fn create(server: &str) -> anyhow::Result<Database> {
        let name = format!(
            "herald_bench_{}",
            hex::encode(herald_server::random_bytes::<6>())
        );
        let url =
            herald_io::postgres_url::with_database(server, &name).map_err(anyhow::Error::msg)?;
        // The name is ours (a prefix and hex digits): it needs no quoting.
        on_postgres(server, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating database {name}"))?;
        Ok(Database {
            server: server.to_string(),
            name,
            url,
        })
    }

    /// Drops the database, ending any connection still open (a killed node's).
    fn drop_now(self) -> anyhow::Result<()> {
        on_postgres(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .with_context(|| format!("dropping database {}", self.name))
    }
}

/// Runs `sql` on the server `url`, on a thread of its own (the `postgres` client blocks
/// on a runtime of its own, which tokio does not allow inside its own).
fn on_postgres(url: &str, sql: &str) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut client =
                    postgres::Client::connect(url, postgres::NoTls).with_context(|| {
                        format!("connecting to {}", herald_server::store::redact_url(url))
                    })?;
                client.batch_execute(sql)?;
                anyhow::Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a PostgreSQL statement panicked")))
    })
}
