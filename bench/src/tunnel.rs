//! Tunnels (issue 15): a service on loopback reached four ways in one run: directly (the
//! floor), through rathole (its server and client on loopback), through Herald's relay
//! (a consumer agent's `connect --relay-only` listener, the server, the providing agent)
//! and on Herald's direct path (`connect` dialing the providing agent itself; the server
//! only brokers each tunnel's session). Each path is
//! measured the same way: one bulk transfer (throughput) and HTTP/1.1 request latency at
//! fixed open-loop rates over a pool of keep-alive connections.
//!
//! The service speaks two protocols, told apart by the first four bytes: `BULK` then any
//! number of bytes until the client's end of stream, answered by the count as eight
//! big-endian bytes; or HTTP/1.1 requests without bodies, each answered `200 ok`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::stats::{percentile, us};

/// Magic that starts a bulk transfer.
const BULK: &[u8; 4] = b"BULK";
/// Write size of the bulk sender.
const CHUNK: usize = 256 * 1024;
/// The service's HTTP answer.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";

/// Starts the benchmark's service on a loopback port; it runs until the process ends.
pub async fn service() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream));
        }
    });
    Ok(addr)
}

async fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let head = stream.fill_buf().await?;
    if head.starts_with(BULK) {
        stream.consume(BULK.len());
        let mut buf = vec![0u8; CHUNK];
        let mut count = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            count += n as u64;
        }
        stream.get_mut().write_all(&count.to_be_bytes()).await?;
        return stream.get_mut().shutdown().await;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            stream.get_mut().write_all(OK).await?;
        }
    }
}

/// Sends `bytes` through `addr` to the service and waits for its count: the transfer's
/// duration, checked against what arrived.
pub async fn bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    stream.write_all(BULK).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("the service's count never came back")?;
    let elapsed = start.elapsed();
    let count = u64::from_be_bytes(count);
    if count != bytes {
        bail!("sent {bytes} bytes, the service counted {count}");
    }
    Ok(elapsed)
}

/// HTTP request latencies at `rate` requests a second for `count` requests, open loop:
/// request `i` is due at `i / rate` and its latency is counted from then (from when the
/// timer woke the dispatcher), so a slow answer delays, and is charged to, the requests
/// queued behind it waiting for a free connection.
pub async fn http_latency(
    addr: SocketAddr,
    rate: u32,
    count: usize,
    connections: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (idle_tx, mut idle_rx) = mpsc::unbounded_channel::<usize>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<anyhow::Result<Duration>>();
    let mut lanes = Vec::new();
    for lane in 0..connections {
        let mut stream = BufReader::new(TcpStream::connect(addr).await?);
        stream.get_ref().set_nodelay(true)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        let idle = idle_tx.clone();
        let done = done_tx.clone();
        lanes.push(tx);
        idle_tx.send(lane)?;
        tokio::spawn(async move {
            while let Some(due) = rx.recv().await {
                let result = request(&mut stream).await.map(|()| due.elapsed());
                let failed = result.is_err();
                let _ = done.send(result);
                if failed || idle.send(lane).is_err() {
                    return;
                }
            }
        });
    }
    drop(done_tx);
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    for i in 0..count {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        // Counted from when the dispatcher woke, not from `due`: tokio's timer fires up
        // to a millisecond late, at a phase that differs from run to run, and that is
        // the harness's delay, not the path's. Waiting for a free connection is charged.
        let woke = Instant::now();
        let lane = idle_rx.recv().await.context("every connection failed")?;
        lanes[lane].send(woke)?;
    }
    drop(lanes);
    let mut samples = Vec::with_capacity(count);
    while let Some(result) = done_rx.recv().await {
        samples.push(result?);
    }
    if samples.len() != count {
        bail!("{} of {count} requests were answered", samples.len());
    }
    Ok(samples)
}

async fn request(stream: &mut BufReader<TcpStream>) -> anyhow::Result<()> {
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await?;
    let mut line = String::new();
    let mut length = None;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            bail!("the connection closed mid-answer");
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = Some(v.trim().parse::<usize>()?);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length.context("no content-length")?];
    stream.read_exact(&mut body).await?;
    Ok(())
}

/// One path's figures.
#[derive(Debug, Clone)]
pub struct PathFigures {
    /// Path name.
    pub name: &'static str,
    /// Bulk throughput, MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// (rate, p50, p99) per rate.
    pub latency: Vec<(u32, Duration, Duration)>,
}

/// Measures one path: the bulk transfer, then each rate for `seconds` (at most
/// `max_requests` requests per rate).
pub async fn measure(
    name: &'static str,
    addr: SocketAddr,
    bulk_bytes: u64,
    rates: &[u32],
    seconds: u64,
    max_requests: usize,
) -> anyhow::Result<PathFigures> {
    // Warm the path (handshakes, pools) before timing anything.
    http_latency(addr, 100, 20, 4)
        .await
        .with_context(|| format!("{name}: warm-up"))?;
    let elapsed = bulk(addr, bulk_bytes)
        .await
        .with_context(|| format!("{name}: bulk transfer"))?;
    let mb_per_s = bulk_bytes as f64 / 1e6 / elapsed.as_secs_f64();
    let mut latency = Vec::new();
    for &rate in rates {
        let count = ((u64::from(rate) * seconds) as usize).clamp(10, max_requests);
        let connections = (rate as usize / 50).clamp(2, 64);
        let samples = http_latency(addr, rate, count, connections)
            .await
            .with_context(|| format!("{name}: {rate} requests/s"))?;
        latency.push((rate, percentile(&samples, 0.5), percentile(&samples, 0.99)));
    }
    Ok(PathFigures {
        name,
        mb_per_s,
        latency,
    })
}

/// Prints the figures as a Markdown table, with Herald's ratios against rathole (plain
/// and Noise).
pub fn report(figures: &[PathFigures]) {
    println!("| path | bulk MB/s | {} |", rates_header(figures));
    println!(
        "|---|---:|{}",
        "---:|".repeat(figures.first().map_or(0, |f| f.latency.len()))
    );
    for f in figures {
        let cells: Vec<String> = f
            .latency
            .iter()
            .map(|(_, p50, p99)| format!("{} / {}", us(*p50), us(*p99)))
            .collect();
        println!("| {} | {:.0} | {} |", f.name, f.mb_per_s, cells.join(" | "));
    }
    let find = |name| figures.iter().find(|f| f.name == name);
    for (ours, theirs) in [
        ("herald relay", "rathole"),
        ("herald direct", "rathole"),
        ("herald relay", "rathole noise"),
        ("herald direct", "rathole noise"),
    ] {
        let (Some(herald), Some(rathole)) = (find(ours), find(theirs)) else {
            continue;
        };
        println!(
            "\n{ours} / {theirs}: throughput {:.2}×; p50 latency {}",
            herald.mb_per_s / rathole.mb_per_s,
            herald
                .latency
                .iter()
                .zip(&rathole.latency)
                .map(|((rate, h, _), (_, r, _))| format!(
                    "{:.2}× at {rate}/s",
                    h.as_secs_f64() / r.as_secs_f64()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn rates_header(figures: &[PathFigures]) -> String {
    figures
        .first()
        .map(|f| {
            f.latency
                .iter()
                .map(|(rate, ..)| format!("p50 / p99 at {rate}/s"))
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

/// rathole's server and client on loopback, forwarding a port to `service`.
pub struct Rathole {
    children: Vec<Child>,
    /// The port clients connect to (rathole's server side).
    pub addr: SocketAddr,
}

impl Rathole {
    /// Starts both halves with the `rathole` binary (`cargo install rathole`) and waits
    /// until the forwarded port answers. Plain TCP transport (its default), or with
    /// `noise` its encrypted transport (Noise_NK_25519_ChaChaPoly_BLAKE2s, a key pair
    /// from `rathole --genkey`): the like-for-like peer of an encrypted relay.
    pub async fn start(dir: &Path, service: SocketAddr, noise: bool) -> anyhow::Result<Rathole> {
        let binary = which("rathole").context(
            "rathole is not installed (`cargo install rathole`); it is the peer this benchmark compares with",
        )?;
        let control = crate::cluster::free_port()?;
        let public = crate::cluster::free_port()?;
        std::fs::create_dir_all(dir)?;
        let server = dir.join("rathole-server.toml");
        let client = dir.join("rathole-client.toml");
        let (server_transport, client_transport) = if noise {
            let (private, public) = rathole_keys(&binary)?;
            (
                format!(
                    "[server.transport]\ntype = \"noise\"\n\
                     [server.transport.noise]\nlocal_private_key = \"{private}\"\n"
                ),
                format!(
                    "[client.transport]\ntype = \"noise\"\n\
                     [client.transport.noise]\nremote_public_key = \"{public}\"\n"
                ),
            )
        } else {
            (String::new(), String::new())
        };
        std::fs::write(
            &server,
            format!(
                "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_transport}\
                 [server.services.bench]\ntoken = \"herald-bench\"\nbind_addr = \"127.0.0.1:{public}\"\n"
            ),
        )?;
        std::fs::write(
            &client,
            format!(
                "[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_transport}\
                 [client.services.bench]\ntoken = \"herald-bench\"\nlocal_addr = \"{service}\"\n"
            ),
        )?;
        let spawn = |flag: &str, config: &PathBuf| {
            Command::new(&binary)
                .arg(flag)
                .arg(config)
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let mut rathole = Rathole {
            children: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], public)),
        };
        rathole.children.push(spawn("-s", &server)?);
        rathole.children.push(spawn("-c", &client)?);
        // rathole accepts on the public port as soon as the server starts, and drops the
        // connection until the client's control channel is up: wait for a real answer.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout(Duration::from_secs(2), bulk(rathole.addr, 1024)).await {
                Ok(Ok(_)) => return Ok(rathole),
                _ if Instant::now() > deadline => bail!("rathole did not forward within 20 s"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// A Noise key pair from `rathole --genkey`: (private, public), base64.
fn rathole_keys(binary: &Path) -> anyhow::Result<(String, String)> {
    let output = std::process::Command::new(binary)
        .arg("--genkey")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut after = |label: &str| -> anyhow::Result<String> {
        lines
            .by_ref()
            .skip_while(|l| !l.starts_with(label))
            .nth(1)
            .map(str::to_string)
            .with_context(|| format!("`rathole --genkey` printed no {label}: {text}"))
    };
    let private = after("Private Key")?;
    let public = after("Public Key")?;
    Ok((private, public))
}

impl Drop for Rathole {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Herald's paths: a server, a providing agent sharing the service with a club, and a
/// consumer agent (another user in that club) whose `herald-agent connect` listens on
/// the port clients connect to, through the relay or (on loopback, always reachable)
/// directly to the providing agent.
pub struct HeraldPath {
    cluster: crate::cluster::Cluster,
    children: Vec<Child>,
    /// The consumer's `connect` listener.
    pub addr: SocketAddr,
}

impl HeraldPath {
    /// Starts everything and waits until a bulk probe goes through.
    pub async fn start(
        dir: &Path,
        bin_dir: &Path,
        service: SocketAddr,
        relay_only: bool,
    ) -> anyhow::Result<HeraldPath> {
        let mut cluster = crate::cluster::Cluster::init(dir, bin_dir).await?;
        cluster.start().await?;
        let data = dir.join("server");
        let agent_bin = bin_dir.join("herald-agent");
        let run = |program: &Path, args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(program).args(args).output()?;
            if !out.status.success() {
                bail!(
                    "{} {}: {}",
                    program.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8(out.stdout)?.trim().to_string())
        };
        let data_arg = data.to_str().context("scratch path is not UTF-8")?;
        let server_bin = bin_dir.join("herald-server");
        let mut path = HeraldPath {
            cluster,
            children: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], crate::cluster::free_port()?)),
        };
        let mut states = Vec::new();
        for name in ["provider", "consumer"] {
            let token = run(&server_bin, &["--data-dir", data_arg, "token", "create"])?;
            let state = dir.join(name);
            let state_arg = state
                .to_str()
                .context("scratch path is not UTF-8")?
                .to_string();
            run(
                &agent_bin,
                &["--state-dir", &state_arg, "enroll", &token, "--name", name],
            )?;
            states.push(state_arg);
        }
        // Two users in one club, each owning one agent; written into the database as the
        // console would (the benchmark measures tunnels, not sign-ups).
        {
            let db = rusqlite::Connection::open(data.join("herald.db"))?;
            db.busy_timeout(Duration::from_secs(5))?;
            db.execute_batch(
                "INSERT INTO users (login, password_hash, role, created_at)
                     VALUES ('alice', 'x', 'user', 0), ('bob', 'x', 'user', 0);
                 UPDATE agents SET owner_user_id = (SELECT id FROM users WHERE login = 'alice')
                     WHERE name = 'provider';
                 UPDATE agents SET owner_user_id = (SELECT id FROM users WHERE login = 'bob')
                     WHERE name = 'consumer';
                 INSERT INTO clubs (name, created_by, created_at)
                     SELECT 'bench', id, 0 FROM users WHERE login = 'alice';
                 INSERT INTO club_members (club_id, user_id, role, joined_at)
                     SELECT c.id, u.id, CASE u.login WHEN 'alice' THEN 'owner' ELSE 'member' END, 0
                     FROM clubs c, users u WHERE c.name = 'bench';",
            )?;
        }
        let service_arg = service.to_string();
        run(
            &agent_bin,
            &[
                "--state-dir",
                &states[0],
                "share",
                "add",
                "bench",
                "--to",
                &service_arg,
                "--club",
                "bench",
                // The 1,000 requests/s run keeps 20 connections open at once.
                "--max-connections",
                "128",
            ],
        )?;
        let quiet = |mut command: Command| {
            command
                .env("HERALD_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let mut provider = Command::new(&agent_bin);
        provider.args(["--state-dir", &states[0], "run"]);
        path.children.push(quiet(provider)?);
        let port = path.addr.port().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        // `connect` exits while the share is not yet in the directory: start it again
        // until it listens and a probe goes through.
        loop {
            if path.children.len() < 2 {
                let mut connect = Command::new(&agent_bin);
                connect.args([
                    "--state-dir",
                    &states[1],
                    "connect",
                    "alice/bench",
                    "--local-port",
                    &port,
                ]);
                if relay_only {
                    connect.arg("--relay-only");
                }
                path.children.push(quiet(connect)?);
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), bulk(path.addr, 1024)).await
            {
                return Ok(path);
            }
            if let Ok(Some(_)) = path.children[1].try_wait() {
                path.children.pop();
            }
            if Instant::now() > deadline {
                bail!(
                    "Herald's tunnel did not carry a probe within 30 s (see {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for HeraldPath {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cluster.stop(true);
    }
}

/// A program on `PATH` or in cargo's bin directory.
pub fn which(program: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_service_counts_bulk_bytes_and_answers_requests() {
        let addr = service().await.unwrap();
        bulk(addr, 3 * CHUNK as u64 + 17).await.unwrap();
        let samples = http_latency(addr, 1000, 50, 4).await.unwrap();
        assert_eq!(samples.len(), 50);
    }
}
