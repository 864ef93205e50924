//! A cluster of Strowger nodes behind a SIP load balancer (e.g. Kamailio's dispatcher),
//! sharing one Redis.
//!
//! **Owns**: the `[cluster]` section, this node's name and liveness lease in Redis, the
//! list of nodes and which of them are alive.
//! **Must not touch**: SIP messages, calls, agents: the layers above keep their own shared
//! state and use this module to know who is alive.

mod config;

pub use config::ClusterConfig;
