//! Forwarding to the upstream: the pooled client, header hygiene, the forward itself, and
//! websocket tunnels.

pub mod batch;
pub mod client;
pub mod forward;
pub mod headers;
pub mod path;
pub mod pool;
pub mod tunnel;
