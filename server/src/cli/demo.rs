//! `herald-server demo`: a throwaway server and one local agent in this process, a
//! schedule that runs a program every few seconds, and its results streamed to the
//! terminal until Ctrl-C. Everything lives in a temporary directory removed at the end.

use std::path::PathBuf;
use std::time::Duration;

use herald_shared::schedule::{self, Missed};

use crate::cli::catalog::{CatalogAddArgs, CatalogCommand};
use crate::cli::{Context, DemoArgs, ScheduleAddArgs};
use crate::config::{self, AdminConfig};
use crate::model::JobInfo;
use crate::model::Role;
use crate::serve::{self, Overrides};
use crate::store::Store;

/// The demo's program: prints who and when, through a shell only because the demo wants
/// a one-liner (orders name an absolute program, here `/bin/sh`).
const DEMO_SCRIPT: &str =
    "echo \"hello from $(uname -n): up $(cut -d' ' -f1 /proc/uptime)s, $(date -u +%H:%M:%S) UTC\"";

/// Runs the demo; the error is a sentence for the user.
pub async fn run(args: DemoArgs) -> Result<std::process::ExitCode, String> {
    schedule::parse_duration(&args.every).map_err(|e| format!("--every: {e}"))?;
    let dir = std::env::temp_dir().join(format!("herald-demo-{}", std::process::id()));
    let result = demo(&dir, &args).await;
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| std::process::ExitCode::SUCCESS)
}

async fn demo(dir: &std::path::Path, args: &DemoArgs) -> Result<(), String> {
    let data_dir = dir.join("server");
    let state_dir = dir.join("agent");
    let loopback = "127.0.0.1:0".parse().expect("valid literal");
    crate::init::init(&crate::init::InitOptions {
        data_dir: data_dir.clone(),
        public_addr: "127.0.0.1:4433".into(),
        quic_listen: loopback,
        http_listen: loopback,
        database_url: None,
    })
    .map_err(|e| e.to_string())?;
    let running = serve::start(&data_dir, &Overrides::default())
        .await
        .map_err(|e| e.to_string())?;
    // The ports were chosen by the OS; point the admin configuration at them.
    let admin_path: PathBuf = data_dir.join(config::ADMIN_CONFIG);
    let mut admin = AdminConfig::load(&admin_path).map_err(|e| e.to_string())?;
    admin.server_url = format!("https://{}", running.http_addr);
    admin.public_addr = running.quic_addr.to_string();
    config::save_toml(&admin_path, &admin).map_err(|e| e.to_string())?;
    let context = Context::new(admin, None).map_err(|e| e.to_string())?;

    println!(
        "Herald demo: server on udp/{} and https://{}",
        running.quic_addr, running.http_addr
    );
    let token = context
        .create_token(vec!["demo".into()], 1, "10m")
        .await
        .map_err(|e| e.to_string())?;
    let agent_id = herald_agent::enroll(&state_dir, &token, Some("demo-agent"))
        .await
        .map_err(|e| e.to_string())?;
    println!("agent demo-agent enrolled as {agent_id}");
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_dir = state_dir.clone();
    let agent = tokio::spawn(async move {
        let shutdown = async {
            let _ = agent_stopped.await;
        };
        herald_agent::run(&agent_dir, herald_agent::Options::default(), shutdown).await
    });

    let (id, when) = context
        .add_schedule(ScheduleAddArgs {
            to: "group:demo".into(),
            cron: None,
            tz: "UTC".into(),
            every: Some(args.every.clone()),
            at: None,
            missed: Missed::Skip,
            splay: None,
            timeout: "30s".into(),
            ttl: "1m".into(),
            user: None,
            open: None,
            command: vec!["/bin/sh".into(), "-c".into(), DEMO_SCRIPT.into()],
        })
        .await
        .map_err(|e| e.to_string())?;
    let password = console_account(&context, &data_dir, &agent_id)
        .await
        .map_err(|e| format!("setting up the console: {e}"))?;
    println!(
        "web console: https://{}/  log in as demo / {password} (an admin; the browser will \
         warn: the certificate is this demo's own CA)",
        running.http_addr
    );
    println!(
        "schedule {id}: {} on group:demo; results follow (Ctrl-C to stop)\n",
        when.describe()
    );

    let mut events = running.relay.subscribe();
    let mut shown = std::collections::HashSet::new();
    let mut count = 0u32;
    let stop = serve::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = events.recv() => {
                let Ok(event) = event else { continue };
                if event.job_id == 0 || shown.contains(&event.job_id) {
                    continue;
                }
                let Ok(job) = context.client().get::<JobInfo>(&format!("/api/v1/jobs/{}", event.job_id)).await else {
                    continue;
                };
                if !job.is_final() {
                    continue;
                }
                shown.insert(job.id);
                print_result(&job);
                count += 1;
                if args.count.is_some_and(|n| count >= n) {
                    break;
                }
            }
        }
    }
    println!("\nstopping demo");
    let _ = stop_agent.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    running.stop().await;
    Ok(())
}

/// Publishes the demo's program as a catalog entry and makes a console account that
/// owns the demo agent, so the console shows a device, a service to subscribe it to and
/// the history. Returns the account's password.
async fn console_account(
    context: &Context,
    data_dir: &std::path::Path,
    agent_id: &str,
) -> Result<String, String> {
    context
        .catalog(CatalogCommand::Add(Box::new(CatalogAddArgs {
            name: "hello".into(),
            title: "Say hello".into(),
            description: "Prints the machine's name, uptime and the time.".into(),
            to: "all".into(),
            min_interval: "1s".into(),
            valid: "1d".into(),
            timeout: Some("30s".into()),
            page: false,
            open: None,
            command: vec!["/bin/sh".into(), "-c".into(), DEMO_SCRIPT.into()],
        })))
        .await
        .map_err(|e| e.to_string())?;
    let password = hex::encode(crate::random_bytes::<8>());
    let hash = crate::console::auth::hash_password(&password).map_err(|e| e.to_string())?;
    let store = Store::open(data_dir).map_err(|e| e.to_string())?;
    let user = store
        .add_user("demo", &hash, Role::Admin, "", "", crate::now_ms())
        .map_err(|e| e.to_string())?;
    store
        .set_agent_owner(agent_id, user)
        .map_err(|e| e.to_string())?;
    Ok(password)
}

fn print_result(job: &JobInfo) {
    let when = job
        .finished_at
        .map(schedule::format_time)
        .unwrap_or_default();
    let output = job.stdout.trim_end();
    let exit = job
        .exit_code
        .map(|c| format!("exit {c}"))
        .unwrap_or_else(|| job.error.clone().unwrap_or_default());
    println!(
        "[{when}] job {} on {}: {} ({exit})  {output}",
        job.id, job.agent_name, job.state
    );
}
