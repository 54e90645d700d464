//! Several nodes on one PostgreSQL database (docs/SCALE-OUT.md).
//!
//! Each node keeps its own QUIC and HTTPS listeners; agents connect to any of them.
//! What one node does for an agent connected to another reaches it through
//! PostgreSQL's `NOTIFY`: "agent X has work" (the node holding X reads X's pending jobs
//! from the store, as after any poke), "job J changed" (waiters and the forwarder), "the
//! keys changed" (every node's QUIC handshake admits an agent enrolled anywhere), and
//! "the scheduler, rollouts or fallbacks have something new" (for whichever node leads
//! them). Each node records the agents it holds, valid while its heartbeat is fresh.
//!
//! One node at a time runs each of the scheduler, the rollout driver, the forwarding
//! queue and the meter: the holder of that role's PostgreSQL advisory lock, which the
//! database lets go when the holder's connection ends (its process died or lost the
//! network). Another node takes the lock within [`LEAD_POLL`]. The scheduler cannot fire
//! an occurrence twice even when two nodes briefly both think they lead: a firing moves
//! the schedule from the fire time it read, in the same transaction as its jobs.
//!
//! On SQLite the server is the only node: it leads everything and tells no one.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::relay::{ClusterNote, Relay};
use crate::store::{LeaderLocks, NodeRow, Store};
use crate::Millis;

/// How often a node records that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// A node whose heartbeat is older than this is dead: the agents it held are no longer
/// counted, and `nodes list` leaves it out.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often a node that does not lead a role tries to take it, and a leader checks it
/// still holds it.
pub const LEAD_POLL: Duration = Duration::from_secs(1);

/// Largest notice payload sent (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7000;

/// The wake-ups the leaders' loops wait on, shared by every node: a change made through
/// one node's API reaches the loop on whichever node leads.
#[derive(Clone, Default)]
pub struct Wakes {
    /// The scheduler's.
    pub scheduler: Arc<Notify>,
    /// The rollout driver's.
    pub rollouts: Arc<Notify>,
    /// The forwarder's fallbacks.
    pub fallbacks: Arc<Notify>,
}

/// This node, as the others see it.
#[derive(Clone)]
pub struct Node {
    store: Store,
    relay: Arc<Relay>,
    row: Arc<Mutex<NodeRow>>,
    clustered: bool,
}

impl Node {
    /// This node: `id` (stable for its data directory), its addresses.
    pub fn new(
        store: Store,
        relay: Arc<Relay>,
        id: String,
        quic_addr: String,
        http_addr: String,
    ) -> Node {
        let clustered = store.postgres_url().is_some();
        Node {
            store,
            relay,
            row: Arc::new(Mutex::new(NodeRow {
                id,
                quic_addr,
                http_addr,
                started_at: crate::now_ms(),
                heartbeat_at: 0,
                roles: Vec::new(),
                agents: 0,
            })),
            clustered,
        }
    }

    /// This node's id.
    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeRow> {
        self.row.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the node's background work: the heartbeat, and in a cluster the notices
    /// both ways. `local` are the wake-ups this node's API pokes, `wakes` those the
    /// leaders' loops wait on: in a cluster a poke goes round through the database, so
    /// that it reaches the leader wherever it runs.
    pub fn start(
        &self,
        local: Wakes,
        wakes: Wakes,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), crate::store::StoreError> {
        let id = self.id();
        self.store.node_forget_agents(&id)?;
        let node = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = node.heartbeats() => {}
                () = stopped => {}
            }
        });
        if !self.clustered {
            // One node: the API's pokes are the loops' own.
            return Ok(());
        }
        let (notices, incoming) = mpsc::unbounded_channel();
        self.store.listen_to_nodes(notices)?;
        let notes = self
            .relay
            .join_cluster()
            .expect("a relay joins one cluster");
        tokio::spawn(self.clone().publish(notes, local));
        tokio::spawn(self.clone().receive(incoming, wakes));
        Ok(())
    }

    async fn heartbeats(&self) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let row = self.lock().clone();
            let now = crate::now_ms();
            if let Err(e) = self.store.node_heartbeat(&row, now) {
                warn!(error = %e, "cluster: heartbeat not recorded");
            }
            if self.clustered {
                let alive_after = now.saturating_sub(LEASE.as_millis() as Millis);
                match self.store.agents_elsewhere(&row.id, alive_after) {
                    Ok(agents) => self.relay.connected_elsewhere(agents),
                    Err(e) => warn!(error = %e, "cluster: other nodes' agents not read"),
                }
            }
        }
    }

    /// Sends on what the relay says the other nodes must hear, and the API's pokes of
    /// the leaders' loops, batching what is waiting into as few notices as fit.
    async fn publish(self, mut notes: mpsc::UnboundedReceiver<ClusterNote>, local: Wakes) {
        let id = self.id();
        loop {
            let first = tokio::select! {
                note = notes.recv() => match note {
                    Some(note) => Some(note),
                    None => return,
                },
                () = local.scheduler.notified() => { self.send(&id, "s", ""); None }
                () = local.rollouts.notified() => { self.send(&id, "r", ""); None }
                () = local.fallbacks.notified() => { self.send(&id, "f", ""); None }
            };
            let Some(first) = first else { continue };
            let mut batch = vec![first];
            while let Ok(note) = notes.try_recv() {
                batch.push(note);
            }
            let mut work = BTreeSet::new();
            let mut events = BTreeSet::new();
            let mut online = Vec::new();
            let mut offline = Vec::new();
            let mut keys = false;
            for note in batch {
                match note {
                    ClusterNote::Work(agent) => {
                        work.insert(agent);
                    }
                    ClusterNote::Event(job) => {
                        events.insert(job.to_string());
                    }
                    ClusterNote::Keys => keys = true,
                    ClusterNote::Online(agent, since) => online.push((agent, since)),
                    ClusterNote::Offline(agent) => offline.push(agent),
                }
            }
            if !online.is_empty() || !offline.is_empty() {
                if let Err(e) = self.store.node_presence(&id, &online, &offline) {
                    warn!(error = %e, "cluster: which agents this node holds not recorded");
                }
            }
            if keys {
                self.send(&id, "k", "");
            }
            for part in packed(work.into_iter()) {
                self.send(&id, "a", &part);
            }
            for part in packed(events.into_iter()) {
                self.send(&id, "e", &part);
            }
        }
    }

    fn send(&self, id: &str, kind: &str, body: &str) {
        if let Err(e) = self.store.notify_nodes(&format!("{id} {kind} {body}")) {
            warn!(error = %e, kind, "cluster: notice not sent");
        }
    }

    /// Acts on the other nodes' notices.
    async fn receive(self, mut incoming: mpsc::UnboundedReceiver<String>, wakes: Wakes) {
        let id = self.id();
        while let Some(notice) = incoming.recv().await {
            if notice == crate::store::RESYNC {
                // Notices may have been missed: look at everything again.
                self.relay.poke_all_here();
                self.reload_keys();
                wakes.scheduler.notify_one();
                wakes.rollouts.notify_one();
                wakes.fallbacks.notify_one();
                continue;
            }
            let mut parts = notice.splitn(3, ' ');
            let (Some(from), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let body = parts.next().unwrap_or("");
            match kind {
                "s" => wakes.scheduler.notify_one(),
                "r" => wakes.rollouts.notify_one(),
                "f" => wakes.fallbacks.notify_one(),
                "k" if from != id => self.reload_keys(),
                "a" if from != id => {
                    for agent in body.split(',') {
                        self.relay.poke_here(agent);
                    }
                }
                "e" if from != id => {
                    for job in body.split(',').filter_map(|j| j.parse().ok()) {
                        self.relay.job_changed_here(job);
                    }
                }
                _ => {}
            }
        }
    }

    fn reload_keys(&self) {
        if let Err(e) = self.relay.reload_keys() {
            warn!(error = %e, "cluster: agent keys not reloaded");
        }
    }

    /// Runs `work` while this node leads `role` (at once on SQLite): takes the role's
    /// lock when it is free, starts `work`, and stops it if the lock is lost.
    pub fn lead<F, Fut>(
        &self,
        role: &'static str,
        work: F,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let node = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = node.lead_until_stopped(role, work) => {}
                () = stopped => {}
            }
            node.set_role(role, false);
        })
    }

    async fn lead_until_stopped<F, Fut>(&self, role: &'static str, work: F)
    where
        F: Fn() -> Fut + Sync,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if !self.clustered {
            self.set_role(role, true);
            work().await;
            return;
        }
        loop {
            let locks = match self.store.leader_locks() {
                Ok(Some(locks)) => locks,
                Ok(None) => return,
                Err(e) => {
                    warn!(role, error = %e, "cluster: no connection for leader locks; retrying");
                    tokio::time::sleep(LEAD_POLL).await;
                    continue;
                }
            };
            self.lead_with(role, &work, &locks).await;
        }
    }

    /// Leads `role` on `locks`' connection until it is lost.
    async fn lead_with<F, Fut>(&self, role: &'static str, work: &F, locks: &LeaderLocks)
    where
        F: Fn() -> Fut + Sync,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut tick = tokio::time::interval(LEAD_POLL);
        loop {
            tick.tick().await;
            match tokio::task::block_in_place(|| locks.try_lead(role)) {
                Ok(true) => break,
                Ok(false) => continue,
                Err(e) => {
                    warn!(role, error = %e, "cluster: leader lock unreachable");
                    return;
                }
            }
        }
        info!(role, "cluster: this node leads {role}");
        self.set_role(role, true);
        let mut running = tokio::spawn(work());
        loop {
            tokio::select! {
                _ = &mut running => break,
                _ = tick.tick() => {
                    if !tokio::task::block_in_place(|| locks.alive()) {
                        warn!(role, "cluster: lost the leader lock; {role} stops here");
                        running.abort();
                        break;
                    }
                }
            }
        }
        self.set_role(role, false);
    }

    fn set_role(&self, role: &str, held: bool) {
        let mut row = self.lock();
        row.roles.retain(|r| r != role);
        if held {
            row.roles.push(role.to_string());
            row.roles.sort();
        }
    }

    /// The live nodes (this one alone on SQLite, with its agents counted here).
    pub fn list(&self, now: Millis) -> Result<Vec<NodeRow>, crate::store::StoreError> {
        let mut nodes = self
            .store
            .nodes(now.saturating_sub(LEASE.as_millis() as Millis))?;
        if !self.clustered {
            let row = self.lock().clone();
            nodes.retain(|n| n.id == row.id);
            for node in &mut nodes {
                node.agents = self.relay.online_count() as u64;
                node.roles = row.roles.clone();
            }
        }
        Ok(nodes)
    }
}

impl Node {
    /// Appends this node's metrics: which node it is, and which roles it leads (each
    /// node's `/metrics` is its own; a cluster is scraped node by node).
    pub fn render_metrics(&self, text: &mut String) {
        use crate::metrics::{family, Kind};
        let row = self.lock().clone();
        family(
            text,
            "herald_node_info",
            Kind::Gauge,
            "Always 1; the label names this node of the cluster.",
            [(&[("node", row.id.as_str())][..], 1)],
        );
        let labels: Vec<[(&str, &str); 1]> = ROLES.iter().map(|role| [("role", *role)]).collect();
        family(
            text,
            "herald_node_leader",
            Kind::Gauge,
            "1 for each role this node leads now (scheduler, rollouts, forwarding, meter).",
            labels.iter().map(|label| {
                let held = row.roles.iter().any(|r| r == label[0].1);
                (&label[..], u64::from(held))
            }),
        );
    }
}

/// The leader roles, one node each.
pub const ROLES: [&str; 4] = ["forwarding", "meter", "rollouts", "scheduler"];

/// `items` joined by commas into payloads that fit a notice.
fn packed(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    for item in items {
        if !part.is_empty() && part.len() + 1 + item.len() > MAX_PAYLOAD {
            parts.push(std::mem::take(&mut part));
        }
        if !part.is_empty() {
            part.push(',');
        }
        part.push_str(&item);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_packed_under_the_payload_limit_and_keep_every_item() {
        let items: Vec<String> = (0..2000).map(|i| format!("agent-{i:06}")).collect();
        let parts = packed(items.clone().into_iter());
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let back: Vec<String> = parts
            .iter()
            .flat_map(|p| p.split(',').map(str::to_string))
            .collect();
        assert_eq!(back, items);
        assert!(packed(std::iter::empty()).is_empty());
    }
}
