//! Tunnels: the providing end (a stream the server opens on the link, checked against
//! the share table, spliced to the share's local address) and the byte pump both ends
//! use.
//!
//! # What a provider does with a stream the server opens
//!
//! 1. Reads one [`TunnelOffer`] (at most [`DEFAULT_FRAME_LIMIT`] bytes, within
//!    [`OFFER_READ_TIMEOUT`]); anything else ends the stream.
//! 2. Looks the share up in the table *as it is now* and checks the offer
//!    ([`crate::shares::check_offer`]: the share exists, the consumer is vouched for one
//!    of its clubs or it is public, its connection cap is not reached).
//! 3. Connects to the share's address from the table — the offer carries none — within
//!    [`CONNECT_TIMEOUT`].
//! 4. Answers [`OfferAnswer::Accepted`] or [`OfferAnswer::Refused`] with the reason (and
//!    logs a refusal), records the session, and for an accepted one moves bytes both ways
//!    until both sides finish, either fails, or nothing moves for the idle timeout.
//!
//! # Limits
//!
//! A share's `--rate-limit` is a token bucket per direction shared by all its tunnels
//! ([`Bucket`], a quarter of a second's worth of burst); its `--max-connections` is
//! counted here ([`Loads`]), so it holds across reconnections of the link.
//!
//! # Signed counters
//!
//! Both ends of a session sign what they counted ([`splice_metered`]): every
//! `[peers] usage_interval_secs` while it is open and once when it closes, each a
//! [`SessionUsage`] with the whole count so far, put in the agent's report outbox (sent
//! until the server stores it, across restarts). The server bills the lower of both
//! ends' counts, so neither it nor a peer can bill more than this agent counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use herald_io::wire;
use herald_shared::codec::{self, DEFAULT_FRAME_LIMIT};
use herald_shared::peers::{
    DirectOffer, End, Offer, OfferAnswer, SessionUsage, TunnelOffer, IDLE_RESET,
};

use crate::inbox::Inbox;
use crate::shares::{self, Role, Share, Shares};
use crate::sync::lock;

/// How long the server has to send its offer once it opened a stream.
pub const OFFER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the local service has to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes moved per read.
pub const CHUNK: usize = 64 * 1024;
/// The outcome of a tunnel closed for idleness (here or, by [`IDLE_RESET`], by the
/// providing end).
const IDLE: &str = "idle";

// === Bucket ===

/// A token bucket: `rate` bytes a second with a burst of a quarter second. Time is
/// passed in. A take larger than what is left goes into debt, which the caller waits
/// off, so a chunk is never split and the average rate still holds.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let capacity = (rate as f64 / 4.0).max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    /// The rate it was made with.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `n` bytes' worth; returns how long to wait before moving them.
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.capacity);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

/// One direction's limiter, shared by a share's tunnels.
pub type Limiter = Arc<Mutex<Bucket>>;

async fn throttle(limiter: Option<&Limiter>, n: usize) {
    if let Some(limiter) = limiter {
        let wait = lock(limiter).take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

// === Loads ===

/// Open tunnels and rate limiters per share.
#[derive(Default)]
pub struct Loads {
    shares: Mutex<HashMap<String, Load>>,
}

struct Load {
    active: u32,
    /// Consumer → provider, provider → consumer.
    limiters: Option<(Limiter, Limiter)>,
}

/// An admitted tunnel: holds its place under the share's cap until dropped.
pub struct Permit<'a> {
    loads: &'a Loads,
    share: String,
    /// The share's limiters (up, down), if it has a rate limit.
    pub limiters: Option<(Limiter, Limiter)>,
}

impl Loads {
    /// Checks `offer` against `share` (the table's row now) and the open tunnels; on
    /// success takes a place under the cap and returns it with the address to connect to.
    pub fn admit(
        &self,
        share: Option<&Share>,
        offer: &TunnelOffer,
    ) -> Result<(Permit<'_>, SocketAddr), String> {
        let mut loads = lock(&self.shares);
        let active = loads.get(&offer.share).map_or(0, |l| l.active);
        let to = shares::check_offer(share, offer, active)?;
        let share = share.expect("check_offer refuses a missing share");
        let load = loads.entry(share.name.clone()).or_insert(Load {
            active: 0,
            limiters: None,
        });
        // A share removed and added again with another rate gets fresh buckets.
        let current = load.limiters.as_ref().map(|(up, _)| lock(up).rate());
        if current != share.rate_limit {
            let now = Instant::now();
            load.limiters = share.rate_limit.map(|rate| {
                (
                    Arc::new(Mutex::new(Bucket::new(rate, now))),
                    Arc::new(Mutex::new(Bucket::new(rate, now))),
                )
            });
        }
        load.active += 1;
        Ok((
            Permit {
                loads: self,
                share: share.name.clone(),
                limiters: load.limiters.clone(),
            },
            to,
        ))
    }

    /// Tunnels open for a share.
    pub fn active(&self, share: &str) -> u32 {
        lock(&self.shares).get(share).map_or(0, |l| l.active)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut loads = lock(&self.loads.shares);
        if let Some(load) = loads.get_mut(&self.share) {
            load.active = load.active.saturating_sub(1);
            if load.active == 0 {
                loads.remove(&self.share);
            }
        }
    }
}

// === splice ===

/// What a splice moved and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the QUIC stream and written to the TCP connection.
    pub from_stream: u64,
    /// Bytes read from the TCP connection and written to the QUIC stream.
    pub to_stream: u64,
    /// `closed`, `idle` or `failed: …`.
    pub outcome: String,
}

/// Bytes a splice has moved so far, readable while it runs.
#[derive(Debug, Default)]
pub struct Moved {
    /// Read from the QUIC stream and written to the TCP connection.
    pub from_stream: AtomicU64,
    /// Read from the TCP connection and written to the QUIC stream.
    pub to_stream: AtomicU64,
}

/// Limits on a splice, and where it counts what it moved.
#[derive(Default, Clone)]
pub struct Limits {
    /// Counted as bytes move (the totals are also in [`Spliced`]).
    pub moved: Arc<Moved>,
    /// On bytes from the stream to TCP.
    pub from_stream: Option<Limiter>,
    /// On bytes from TCP to the stream.
    pub to_stream: Option<Limiter>,
    /// Close when nothing moves either way for this long.
    pub idle: Option<Duration>,
}

/// Moves bytes between a TCP connection and a QUIC stream pair until both directions
/// have finished (each end's finish is passed on), one fails (the other is reset), or
/// nothing moves for `limits.idle`.
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    limits: Limits,
) -> Spliced {
    let _ = tcp.set_nodelay(true);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let from_stream = &limits.moved.from_stream;
    let to_stream = &limits.moved.to_stream;
    let inbound = async {
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    throttle(limits.from_stream.as_ref(), chunk.bytes.len()).await;
                    tcp_write
                        .write_all(&chunk.bytes)
                        .await
                        .map_err(|e| format!("local write: {e}"))?;
                    from_stream.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    touch();
                }
                Ok(None) => {
                    let _ = tcp_write.shutdown().await;
                    return Ok::<(), String>(());
                }
                Err(quinn::ReadError::Reset(code)) if code == IDLE_RESET.into() => {
                    return Err(IDLE.to_string())
                }
                Err(e) => return Err(format!("tunnel read: {e}")),
            }
        }
    };
    let outbound = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tcp_read
                .read(&mut buf)
                .await
                .map_err(|e| format!("local read: {e}"))?;
            if n == 0 {
                let _ = send.finish();
                return Ok::<(), String>(());
            }
            throttle(limits.to_stream.as_ref(), n).await;
            send.write_all(&buf[..n])
                .await
                .map_err(|e| format!("tunnel write: {e}"))?;
            to_stream.fetch_add(n as u64, Ordering::Relaxed);
            touch();
        }
    };
    let idle = async {
        let Some(idle) = limits.idle else {
            return std::future::pending().await;
        };
        loop {
            let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
            let due = quiet_since + idle;
            let now = started.elapsed();
            if now >= due {
                return;
            }
            tokio::time::sleep(due - now).await;
        }
    };
    let outcome = tokio::select! {
        r = async { tokio::try_join!(inbound, outbound) } => match r {
            Ok(_) => "closed".to_string(),
            Err(e) if e == IDLE => e,
            Err(e) => format!("failed: {e}"),
        },
        () = idle => IDLE.to_string(),
    };
    if outcome != "closed" {
        let code = if outcome == IDLE { IDLE_RESET } else { 0 };
        let _ = send.reset(code.into());
        let _ = recv.stop(code.into());
    } else {
        // Let the last bytes reach the peer before the stream is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
    Spliced {
        from_stream: from_stream.load(Ordering::Relaxed),
        to_stream: to_stream.load(Ordering::Relaxed),
        outcome,
    }
}

// === Signed counters ===

/// Signs one end's counters of a session into the agent's report outbox.
pub struct Meter<'a> {
    /// The outbox (and the identity key that signs).
    pub inbox: &'a Inbox,
    /// The server's session id.
    pub session: i64,
    /// Which end this agent is.
    pub end: End,
    /// How often to sign while the session is open.
    pub interval: Duration,
    /// Told the outbox seq of each count signed: the daemon sends it at once; the CLI
    /// leaves it to the daemon, which reads the outbox every few seconds.
    pub queued: &'a (dyn Fn(u64) + Send + Sync),
}

impl Meter<'_> {
    fn sign(&self, seq: u32, from_stream: u64, to_stream: u64, opened: Instant, last: bool) {
        let (bytes_up, bytes_down) = match self.end {
            End::Provider => (from_stream, to_stream),
            End::Consumer => (to_stream, from_stream),
        };
        let usage = SessionUsage {
            agent_id: String::new(),
            session: self.session,
            end: self.end,
            seq,
            bytes_up,
            bytes_down,
            requests: 1,
            seconds: opened.elapsed().as_millis().div_ceil(1000) as u64,
            last,
            at: herald_io::now_ms(),
        };
        match self.inbox.queue_usage(usage) {
            Ok(seq) => (self.queued)(seq),
            Err(e) => warn!(
                session = self.session,
                "cannot sign the counters of a tunnel session: {e}"
            ),
        }
    }
}

/// [`splice`], signing its counters with `meter` every interval while it runs and once
/// when it ends (see the module docs).
pub async fn splice_metered(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    limits: Limits,
    meter: &Meter<'_>,
) -> Spliced {
    let opened = Instant::now();
    let moved = limits.moved.clone();
    let splice = splice(tcp, send, recv, limits);
    tokio::pin!(splice);
    let start = tokio::time::Instant::now() + meter.interval;
    let mut tick = tokio::time::interval_at(start, meter.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    let spliced = loop {
        tokio::select! {
            spliced = &mut splice => break spliced,
            _ = tick.tick() => {
                let from = moved.from_stream.load(Ordering::Relaxed);
                let to = moved.to_stream.load(Ordering::Relaxed);
                meter.sign(seq, from, to, opened, false);
                seq += 1;
            }
        }
    };
    meter.sign(seq, spliced.from_stream, spliced.to_stream, opened, true);
    spliced
}

// === provider ===

/// What the providing end needs from the agent.
pub struct Provider<'a> {
    /// The share table.
    pub shares: &'a Shares,
    /// Open tunnels per share.
    pub loads: &'a Loads,
    /// Idle timeout.
    pub idle: Duration,
    /// Signs the counters of each session (the provider's end).
    pub inbox: &'a Inbox,
    /// How often while a session is open.
    pub usage_interval: Duration,
    /// Told the outbox seq of each count signed.
    pub queued: &'a (dyn Fn(u64) + Send + Sync),
    /// Direct connections: who is expected, and the port the endpoint listens on
    /// (`None` while the agent takes no direct connections).
    pub direct: Option<(&'a crate::direct::Expectations, u16)>,
}

/// Serves one stream the server opened on the link: reads the offer; a relayed one is
/// checked against the share table, connected and spliced (see the module docs), a
/// direct one checked and expected ([`crate::direct`]).
pub async fn provide(provider: Provider<'_>, send: SendStream, mut recv: RecvStream) {
    match read_offer(&mut recv).await {
        Some(Offer::Tunnel(offer)) => serve(provider, offer, send, recv).await,
        Some(Offer::Direct(direct)) => expect_direct(provider, direct, send).await,
        None => {}
    }
}

/// Reads the first frame of a stream the server opened (either kind of offer).
async fn read_offer(recv: &mut RecvStream) -> Option<Offer> {
    let read = async {
        let mut header = [0u8; codec::HEADER_LEN];
        match recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let len = codec::frame_len(header, DEFAULT_FRAME_LIMIT).map_err(|e| e.to_string())?;
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload)
            .await
            .map_err(|e| e.to_string())?;
        Offer::decode(&payload, DEFAULT_FRAME_LIMIT)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(OFFER_READ_TIMEOUT, read).await {
        Ok(Ok(offer)) => offer,
        Ok(Err(e)) => {
            warn!("a stream from the server carried no valid tunnel offer: {e}");
            let _ = recv.stop(0u32.into());
            None
        }
        Err(_) => {
            warn!(
                "a stream from the server carried no tunnel offer within {} s",
                OFFER_READ_TIMEOUT.as_secs()
            );
            let _ = recv.stop(0u32.into());
            None
        }
    }
}

/// Checks a direct offer and expects its consumer; answers `Expecting` or `Refused`.
async fn expect_direct(provider: Provider<'_>, direct: DirectOffer, mut send: SendStream) {
    let offer = &direct.offer;
    let consumer = shares::describe(&offer.consumer);
    let expected = match provider.direct {
        None => Err("this device takes no direct connections now".to_string()),
        Some((expectations, port)) => match provider.shares.get(&offer.share) {
            Err(e) => {
                warn!("cannot read the share table: {e}");
                Err("the device cannot read its share table".to_string())
            }
            Ok(share) => {
                let active = provider.loads.active(&offer.share);
                crate::direct::expect(
                    expectations,
                    share.as_ref(),
                    active,
                    &direct,
                    Instant::now(),
                )
                .map(|()| port)
            }
        },
    };
    let answer = match expected {
        Ok(port) => {
            info!(session = offer.session, share = %offer.share, %consumer, from = %direct.consumer_address, port, "expecting a direct tunnel");
            OfferAnswer::Expecting { port }
        }
        Err(reason) => {
            warn!(session = offer.session, share = %offer.share, %consumer, "direct tunnel refused: {reason}");
            let now = herald_io::now_ms();
            let recorded = provider
                .shares
                .open_session(Role::Provided, offer.session, &offer.share, &consumer, now)
                .and_then(|id| {
                    provider
                        .shares
                        .close_session(id, 0, 0, &format!("refused: {reason}"), now)
                });
            if let Err(e) = recorded {
                warn!("cannot record a refused direct tunnel: {e}");
            }
            OfferAnswer::Refused(reason)
        }
    };
    let _ = wire::write_frame(&mut send, &answer, DEFAULT_FRAME_LIMIT).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Serves one offer on `send`/`recv`: checks it against the share table as it
/// is now, connects, answers, and splices (steps 2-4 of the module docs). A relayed
/// offer's stream comes from the server; a direct one's from the consumer agent.
pub async fn serve(
    provider: Provider<'_>,
    offer: TunnelOffer,
    mut send: SendStream,
    recv: RecvStream,
) {
    let consumer = shares::describe(&offer.consumer);
    let now = herald_io::now_ms();
    let record = provider
        .shares
        .open_session(Role::Provided, offer.session, &offer.share, &consumer, now)
        .map_err(|e| warn!("cannot record tunnel session {}: {e}", offer.session))
        .ok();
    let close = |up: u64, down: u64, outcome: &str| {
        if let Some(id) = record {
            if let Err(e) =
                provider
                    .shares
                    .close_session(id, up, down, outcome, herald_io::now_ms())
            {
                warn!(
                    "cannot record the end of tunnel session {}: {e}",
                    offer.session
                );
            }
        }
    };
    let admitted = async {
        let share = provider.shares.get(&offer.share).map_err(|e| {
            warn!("cannot read the share table: {e}");
            "the device cannot read its share table".to_string()
        })?;
        let (permit, to) = provider.loads.admit(share.as_ref(), &offer)?;
        let not_answering = || format!("the local service at {to} is not answering");
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
            Ok(Ok(tcp)) => Ok((permit, tcp)),
            Ok(Err(e)) => {
                debug!(%to, "local service: {e}");
                Err(not_answering())
            }
            Err(_) => Err(not_answering()),
        }
    };
    let (permit, tcp) = match admitted.await {
        Ok(admitted) => admitted,
        Err(reason) => {
            warn!(session = offer.session, share = %offer.share, %consumer, "tunnel refused: {reason}");
            close(0, 0, &format!("refused: {reason}"));
            let answer = OfferAnswer::Refused(reason);
            let _ = wire::write_frame(&mut send, &answer, DEFAULT_FRAME_LIMIT).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return;
        }
    };
    if let Err(e) = wire::write_frame(&mut send, &OfferAnswer::Accepted, DEFAULT_FRAME_LIMIT).await
    {
        close(0, 0, &format!("failed: {e}"));
        return;
    }
    info!(session = offer.session, share = %offer.share, %consumer, "tunnel open");
    let limits = Limits {
        from_stream: permit.limiters.as_ref().map(|(up, _)| up.clone()),
        to_stream: permit.limiters.as_ref().map(|(_, down)| down.clone()),
        idle: Some(provider.idle),
        ..Limits::default()
    };
    let meter = Meter {
        inbox: provider.inbox,
        session: offer.session,
        end: End::Provider,
        interval: provider.usage_interval,
        queued: provider.queued,
    };
    let spliced = splice_metered(tcp, send, recv, limits, &meter).await;
    drop(permit);
    info!(
        session = offer.session,
        share = %offer.share,
        up = spliced.from_stream,
        down = spliced.to_stream,
        outcome = %spliced.outcome,
        "tunnel closed"
    );
    close(spliced.from_stream, spliced.to_stream, &spliced.outcome);
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::peers::Consumer;

    #[test]
    fn the_bucket_holds_the_rate_after_its_burst() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(1000, t0);
        // The burst (a quarter second) passes at once.
        assert_eq!(bucket.take(250, t0), Duration::ZERO);
        // Then each byte costs a millisecond.
        assert_eq!(bucket.take(500, t0), Duration::from_millis(500));
        // Time paid the debt; the next take waits only for itself.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(bucket.take(100, t1), Duration::from_millis(100));
        // A long pause refills no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(bucket.take(250, t2), Duration::ZERO);
        assert!(bucket.take(1, t2) > Duration::ZERO);
    }

    #[test]
    fn the_cap_counts_open_tunnels_and_frees_them_on_drop() {
        let share = Share::new(
            "web",
            "127.0.0.1:8080",
            false,
            true,
            vec![],
            None,
            Some(2),
            Some(4096),
        )
        .unwrap();
        let offer = TunnelOffer {
            session: 1,
            share: "web".into(),
            consumer: Consumer::Agent {
                agent_id: "a".into(),
                user: None,
            },
            clubs: vec![],
        };
        let loads = Loads::default();
        let (first, to) = loads.admit(Some(&share), &offer).unwrap();
        assert_eq!(to, share.to);
        let (second, _) = loads.admit(Some(&share), &offer).unwrap();
        // Both tunnels share the share's buckets.
        let (a, b) = (
            first.limiters.clone().unwrap(),
            second.limiters.clone().unwrap(),
        );
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let refused = loads.admit(Some(&share), &offer).err().unwrap();
        assert!(refused.contains("already carries 2"), "{refused}");
        drop(first);
        assert_eq!(loads.active("web"), 1);
        assert!(loads.admit(Some(&share), &offer).is_ok());
        drop(second);
        assert_eq!(loads.active("web"), 0);
    }
}
