//! Herald's benchmark harness: a swarm of simulated agents speaking the real protocol
//! over real QUIC/mTLS against a real `herald-server` process, and the same fan-out
//! against Mosquitto for comparison; and a campaign to a recipient list whose SMS
//! fallbacks go to a stand-in gateway; and shared services reached through Herald's relay
//! next to rathole and a direct connection; and usage ingestion and billing runs in
//! process on the store; and one node against two on one PostgreSQL database.

#![forbid(unsafe_code)]

pub mod billing;
pub mod campaign;
pub mod cluster;
pub mod floor;
pub mod gateway;
pub mod messages;
pub mod mosquitto;
pub mod nodes;
pub mod scenarios;
pub mod stats;
pub mod swarm;
pub mod tunnel;
