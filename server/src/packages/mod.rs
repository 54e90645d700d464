//! Packages on the server's side: what drives a release out to the agents subscribed to
//! it. The signed metadata is the vendor's (`herald_shared::release`), the rows are the
//! store's (`store::releases`), the HTTP routes are the API's (`api::releases`); this
//! folder holds the logic that runs on its own:
//!
//! - `rollout.rs`: the rollout driver, which opens wave after wave, counts outcomes and
//!   halts a rollout past its failure threshold.

pub mod rollout;
