//! Forwarding to the upstream: the pooled client, header hygiene, the forward itself.

pub mod batch;
pub mod client;
pub mod forward;
pub mod headers;
pub mod path;
pub mod pool;
