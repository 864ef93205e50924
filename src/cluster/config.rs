//! `[cluster]`: several Strowger nodes behind one SIP load balancer, sharing one Redis.

use crate::config_section::{check_range, InvalidValue};
use serde::{Deserialize, Serialize};

/// `[cluster]`: the one switch that makes a node part of a cluster.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// On: every shared state lives in Redis (`redis.url`, whatever `registrar.store`
    /// says): registrations, presence, agents, and also the hunt groups' queues and agent
    /// claims, and a compact record of each established call so that a surviving node can
    /// end the calls of a node that died.
    pub enabled: bool,
    /// This node's name, unique in the cluster and stable across restarts. Empty: the
    /// first `sip.listen` address (e.g. `udp:10.0.0.11:5060`).
    pub node: String,
    /// Seconds a node's liveness lease (and each agent claim it holds) lasts without being
    /// renewed; renewed every third of it. A node silent this long is dead: its agents come
    /// back and its calls are ended by a survivor.
    pub lease_s: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node: String::new(),
            lease_s: 10,
        }
    }
}

impl ClusterConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_range("lease_s", self.lease_s, 3, 3600)?;
        if self.node.len() > 128
            || self
                .node
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"')
        {
            return Err(InvalidValue::new(
                "node",
                "a node name is at most 128 characters without spaces or quotes",
            ));
        }
        Ok(())
    }
}
