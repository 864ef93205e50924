//! A cluster of Strowger nodes behind a SIP load balancer (e.g. Kamailio's dispatcher),
//! sharing one Redis.
//!
//! **Owns**: the `[cluster]` section, this node's name and liveness lease in Redis, the
//! list of nodes and which of them are alive, the per-node hash of call records (opaque
//! bytes: their content is the B2BUA's), and the decision that a node is dead and which
//! survivor ends its calls.
//! **Must not touch**: SIP messages, calls, agents: the layers above keep their own shared
//! state and use this module to know who is alive; the B2BUA hands its records to
//! [`CallRecords`] and ends a dead node's calls in the [`TakeoverHandler`] it gives.
//!
//! Redis layout (prefix `strowger:cluster`; one Redis, standalone or Sentinel):
//! - `<prefix>:node:<name>`: the node's lease, a string (its start time in Unix ms and a
//!   random part) set with `PX` = `cluster.lease_s` and renewed every third of it.
//! - `<prefix>:nodes`: a set of the node names that joined and have not left.
//! - `<prefix>:calls:<name>`: a hash, field = the B2BUA's call id, value = the call's
//!   record; written when a call is established (and when its dialogs change), deleted
//!   when it ends.
//! - `<prefix>:takeover:<name>`: the name of the survivor that took over a dead node's
//!   calls (`SET NX PX` = the lease, so only one acts; it then expires).
//!
//! Liveness: a node is dead when it is in the set and its lease key is gone, i.e. it has
//! not renewed for a whole lease (Redis expires the key, so all survivors agree on it).
//! Every node looks every second; the first to see a dead node claims its records and
//! takes it out of the set in one Lua script, then its handler ends the calls. A node
//! that lost Redis itself (a failed renewal or look, or its own lease found lapsed) takes
//! over nobody until two leases after Redis answered it again: after a Redis outage every
//! live node renews before anyone is judged dead (a node cut off alone for a lease is
//! taken for dead, though, and its calls are ended: the lease is the definition). A node
//! that restarts under its own name ends the calls its previous life left (nobody carries
//! them). A graceful stop deletes the lease and leaves the set when no call record is
//! left; records of calls still up stay, and a survivor ends those calls at its next look.
//!
//! Cost on the call path: none in Redis round trips; a record change is queued on a
//! bounded channel (dropped and counted when full) and one writer task sends what is
//! queued as one HSET and one HDEL in one pipeline. In the background: one `SET` every
//! third of the lease, and one `SMEMBERS` plus one pipelined `MGET`/`HLEN` a second.
//!
//! Metrics (see `metrics.rs`): `strowger_cluster_nodes_alive`,
//! `strowger_cluster_call_records`, `strowger_cluster_nodes_taken_over_total`,
//! `strowger_cluster_calls_taken_over_total`, `strowger_cluster_record_writes_total`,
//! `strowger_cluster_record_errors_total`, `strowger_cluster_lease_failures_total`.

mod config;
mod membership;
mod metrics;
mod node;

pub use config::ClusterConfig;
pub use node::{
    CallRecords, Cluster, ClusterError, ClusterOptions, ClusterStats, Takeover, TakeoverHandler,
    DEFAULT_PREFIX, DEFAULT_SCAN_INTERVAL,
};
