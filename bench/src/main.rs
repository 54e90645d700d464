//! `herald-bench`: parse arguments, run the scenarios, print the figures.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use herald_bench::campaign::CampaignPlan;
use herald_bench::scenarios::{self, Figures, Plan, Selection};

/// Herald's benchmarks: a swarm of simulated agents against a real server, and the same
/// fan-out through Mosquitto.
#[derive(Debug, Parser)]
#[command(name = "herald-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario, for each swarm size.
    All {
        /// Small sizes and short windows: a smoke test that finishes in well under two minutes.
        #[arg(long)]
        quick: bool,
        /// Swarm sizes (repeatable), e.g. --agents 1000 --agents 10000.
        #[arg(long = "agents")]
        agents: Vec<usize>,
        /// Broadcast runs per size.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Idle measurement window in seconds.
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
    },
    /// Push messages only: one message to all agents, until every signed `stored`
    /// receipt is committed; next to Mosquitto's QoS-1 fan-out.
    Messages {
        /// Swarm sizes (repeatable), e.g. --agents 1000 --agents 10000.
        #[arg(long = "agents")]
        agents: Vec<usize>,
        /// Messages sent per size (one after another).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// A campaign to a recipient list (issue 14): --agents rows name simulated agents,
    /// the rest phone numbers whose SMS fallback goes at once to a stand-in gateway in
    /// this process; ingest time, time until every agent's `stored` receipt is in,
    /// fallback SMS per second at the gateway.
    Campaign {
        /// Rows in the list [default: 100000; 2000 with --quick].
        #[arg(long)]
        rows: Option<usize>,
        /// Rows naming a simulated agent (one agent each) [default: 10000; 200 with
        /// --quick].
        #[arg(long)]
        agents: Option<usize>,
        /// Campaigns sent, one after another.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// A small list (2,000 rows, 200 agents): a smoke test.
        #[arg(long)]
        quick: bool,
        /// `[forwarding] fallback_concurrency` for the server [default: the server's].
        #[arg(long)]
        fallback_concurrency: Option<usize>,
    },
    /// One node against two on one PostgreSQL database (issue 19), with one node on
    /// SQLite as the reference: broadcast to all, unicast to an agent on the API's node
    /// and on the other, every agent of a SIGKILLed node back on the survivor.
    Nodes {
        /// Simulated agents, split evenly over the nodes [default: 10000; 200 with
        /// --quick].
        #[arg(long)]
        agents: Option<usize>,
        /// Broadcasts per configuration [default: 3; 1 with --quick].
        #[arg(long)]
        runs: Option<usize>,
        /// Unicast round trips per target agent [default: 200; 20 with --quick].
        #[arg(long)]
        unicast_runs: Option<usize>,
        /// 200 agents, one broadcast, 20 unicasts, and a 4 s QUIC idle timeout (instead
        /// of the agent's 60 s) so that a killed node's agents notice soon: a smoke test
        /// that finishes in under a minute.
        #[arg(long)]
        quick: bool,
        /// A PostgreSQL server on which the benchmark may create and drop databases
        /// [default: what scripts/pg-cluster.sh prints, which starts one on loopback].
        #[arg(long)]
        database_url: Option<String>,
        /// Leave out the one-node SQLite reference.
        #[arg(long)]
        no_sqlite: bool,
    },
    /// Usage events ingested per second through the store's batch path, and `billing
    /// run` time for one month (issue 16), in process on a fresh SQLite database.
    Billing {
        /// Events in the month.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Accounts the events are spread over.
        #[arg(long, default_value_t = 100_000)]
        accounts: usize,
        /// Events per ingest call (one transaction each).
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Scratch directory for the database [default: a new one under the system's
        /// temporary directory].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A shared service reached directly, through rathole, through Herald's relay and on
    /// Herald's direct path: one bulk transfer and HTTP latency at fixed request rates
    /// (issue 15).
    Tunnel {
        /// Bulk transfer size in MiB.
        #[arg(long, default_value_t = 1024)]
        bulk_mib: u64,
        /// Request rates (repeatable).
        #[arg(long = "rate", default_values_t = [1, 100, 1000])]
        rates: Vec<u32>,
        /// Seconds per rate (at most 10,000 requests per rate).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Leave Herald out (measure only the floor and rathole).
        #[arg(long)]
        no_herald: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                // The swarm's agents connect to several nodes with the agent's own code,
                // which warns once per agent for every node that does not answer.
                .unwrap_or_else(|_| "warn,herald_agent::link=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (selection, quick, agents, runs, idle_seconds) = match Cli::parse().command {
        Command::All {
            quick,
            agents,
            runs,
            idle_seconds,
        } => (Selection::All, quick, agents, runs, idle_seconds),
        // One second of idle measurement: hold only connects the swarm here.
        Command::Messages { agents, runs } => (Selection::Messages, false, agents, runs, 1),
        Command::Campaign {
            rows,
            agents,
            runs,
            quick,
            fallback_concurrency,
        } => {
            let plan = CampaignPlan {
                rows: rows.unwrap_or(if quick {
                    CampaignPlan::QUICK_ROWS
                } else {
                    CampaignPlan::ROWS
                }),
                agents: agents.unwrap_or(if quick {
                    CampaignPlan::QUICK_AGENTS
                } else {
                    CampaignPlan::AGENTS
                }),
                runs: runs.max(1),
                fallback_concurrency,
                deadline: Duration::from_secs(if quick { 60 } else { 600 }),
            };
            return finish(run_campaign(plan).await);
        }
        Command::Billing {
            events,
            accounts,
            batch,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("herald-bench-billing-{}", std::process::id()))
            });
            let plan = herald_bench::billing::BillingPlan {
                events,
                accounts: accounts.max(1),
                batch: batch.max(1),
            };
            return finish(
                tokio::task::spawn_blocking(move || herald_bench::billing::run(plan, &dir))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("benchmark panicked: {e}"))),
            );
        }
        Command::Nodes {
            agents,
            runs,
            unicast_runs,
            quick,
            database_url,
            no_sqlite,
        } => {
            let mut plan = herald_bench::nodes::NodesPlan::quick();
            if !quick {
                plan.agents = herald_bench::nodes::NodesPlan::AGENTS;
                plan.broadcast_runs = 3;
                plan.unicast_runs = 200;
                plan.idle_timeout = None;
                plan.deadline = Duration::from_secs(600);
            }
            plan.agents = agents.unwrap_or(plan.agents).max(2);
            plan.broadcast_runs = runs.unwrap_or(plan.broadcast_runs).max(1);
            plan.unicast_runs = unicast_runs.unwrap_or(plan.unicast_runs).max(1);
            plan.sqlite = !no_sqlite;
            return finish(run_nodes(plan, database_url).await);
        }
        Command::Tunnel {
            bulk_mib,
            rates,
            seconds,
            no_herald,
        } => return finish(run_tunnel(bulk_mib << 20, &rates, seconds, !no_herald).await),
    };
    let plans: Vec<Plan> = if quick {
        vec![Plan::quick()]
    } else {
        let sizes = if agents.is_empty() {
            vec![1_000, 10_000]
        } else {
            agents
        };
        sizes
            .into_iter()
            .map(|n| Plan {
                agents: n,
                broadcast_runs: runs,
                unicast_runs: 200,
                idle_window: Duration::from_secs(idle_seconds.min(10)),
                deadline: Duration::from_secs(600),
            })
            .collect()
    };
    finish(run(plans, selection, quick, idle_seconds).await)
}

async fn run_tunnel(bulk: u64, rates: &[u32], seconds: u64, herald: bool) -> anyhow::Result<()> {
    use herald_bench::tunnel;
    const MAX_REQUESTS: usize = 10_000;
    let (bin_dir, root) = prepare()?;
    let dir = root.join("tunnel");
    let service = tunnel::service().await?;
    let mut figures =
        vec![tunnel::measure("direct", service, bulk, rates, seconds, MAX_REQUESTS).await?];
    for (name, noise) in [("rathole", false), ("rathole noise", true)] {
        let rathole =
            tunnel::Rathole::start(&dir.join(name.replace(' ', "-")), service, noise).await?;
        figures
            .push(tunnel::measure(name, rathole.addr, bulk, rates, seconds, MAX_REQUESTS).await?);
    }
    if herald {
        for (name, relay_only) in [("herald relay", true), ("herald direct", false)] {
            let path = tunnel::HeraldPath::start(
                &dir.join(name.replace(' ', "-")),
                &bin_dir,
                service,
                relay_only,
            )
            .await?;
            figures
                .push(tunnel::measure(name, path.addr, bulk, rates, seconds, MAX_REQUESTS).await?);
        }
    }
    tunnel::report(&figures);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The binaries' directory and a scratch directory; prints the header line.
fn prepare() -> anyhow::Result<(PathBuf, PathBuf)> {
    raise_fd_limit();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("cannot find the binaries' directory"))?;
    let root = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    println!(
        "# herald-bench ({} build), {} cores",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    Ok((bin_dir, root))
}

async fn run_nodes(
    plan: herald_bench::nodes::NodesPlan,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let server = herald_bench::nodes::postgres_server(database_url)?;
    let (bin_dir, root) = prepare()?;
    let result = herald_bench::nodes::nodes(&root.join("nodes"), &bin_dir, &plan, &server).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run_campaign(plan: CampaignPlan) -> anyhow::Result<()> {
    let (bin_dir, root) = prepare()?;
    let result = herald_bench::campaign::campaign(&root.join("campaign"), &bin_dir, &plan).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run(
    plans: Vec<Plan>,
    selection: Selection,
    quick: bool,
    idle_seconds: u64,
) -> anyhow::Result<()> {
    let (bin_dir, root) = prepare()?;
    let result = async {
        for (i, plan) in plans.iter().enumerate() {
            let mut figures = Figures::default();
            scenarios::swarm_scenarios(
                &root.join(format!("swarm-{i}")),
                &bin_dir,
                plan,
                selection,
                &mut figures,
            )
            .await?;
            scenarios::mosquitto(&root.join(format!("mosquitto-{i}")), plan, &mut figures).await?;
            if let (Some(herald), Some(peer)) = (figures.broadcast_all, figures.mosquitto_all) {
                println!(
                    "ratio: broadcast to {} — Herald/Mosquitto = {:.2}",
                    plan.agents,
                    herald.as_secs_f64() / peer.as_secs_f64()
                );
            }
            if let (Some(received), Some(stored), Some(peer)) = (
                figures.messages_received,
                figures.messages_stored,
                figures.mosquitto_all,
            ) {
                println!(
                    "ratio: message to {} — Herald/Mosquitto = {:.2} (all received), {:.2} (all signed receipts committed, against Mosquitto's all received)",
                    plan.agents,
                    received.as_secs_f64() / peer.as_secs_f64(),
                    stored.as_secs_f64() / peer.as_secs_f64()
                );
            }
        }
        if selection == Selection::Messages {
            return Ok(());
        }
        let mut idle = plans.first().cloned().unwrap_or_else(Plan::quick);
        idle.idle_window = Duration::from_secs(if quick { 3 } else { idle_seconds });
        scenarios::agent_idle(&root.join("agent-idle"), &bin_dir, &idle).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// Many connections need many file descriptors for the peer (one TCP socket each); raise
/// the soft limit to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
