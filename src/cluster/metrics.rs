//! The cluster's families (`strowger_cluster_*`), registered only when `cluster.enabled`
//! (without a cluster the series do not exist), filled from [`ClusterStats`] at each
//! scrape.

use super::{Cluster, ClusterStats};
use crate::metrics::{self, load, Telemetry};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Cluster {
    /// Registers the cluster's families on `telemetry`.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let alive = telemetry.gauge(
            "strowger_cluster_nodes_alive",
            "Cluster nodes whose liveness lease was held at this node's last look (every \
             second; this node included)",
        )?;
        let records = telemetry.gauge(
            "strowger_cluster_call_records",
            "This node's established calls recorded in Redis, so that a survivor can end \
             them should this node die",
        )?;
        let nodes = telemetry.counter(
            "strowger_cluster_nodes_taken_over_total",
            "Dead nodes (lease run out) whose calls this node took over",
        )?;
        let calls = telemetry.counter(
            "strowger_cluster_calls_taken_over_total",
            "Calls of dead nodes (or of this node before a restart) this node ended with a \
             BYE to both parties",
        )?;
        let writes = telemetry.counter(
            "strowger_cluster_record_writes_total",
            "Call-record changes written to Redis (a call is written once established, again \
             when its dialogs change, and removed when it ends)",
        )?;
        let errors = telemetry.counter(
            "strowger_cluster_record_errors_total",
            "Call-record changes that failed (Redis error, tried again) or were dropped \
             (queue full)",
        )?;
        let lease = telemetry.counter(
            "strowger_cluster_lease_failures_total",
            "Renewals of this node's liveness lease that failed (Redis unreachable)",
        )?;
        // The figures only: the scrape must not keep the node's tasks alive.
        let stats: Arc<ClusterStats> = self.inner.shared.stats.clone();
        telemetry.on_scrape(move || {
            let s = &*stats;
            alive.set(s.nodes_alive.load(Ordering::Relaxed) as i64);
            records.set(s.call_records.load(Ordering::Relaxed) as i64);
            metrics::catch_up(&nodes, load(&s.nodes_taken_over));
            metrics::catch_up(&calls, load(&s.calls_taken_over));
            metrics::catch_up(&writes, load(&s.record_writes));
            metrics::catch_up(&errors, load(&s.record_errors));
            metrics::catch_up(&lease, load(&s.lease_failures));
        });
        Ok(())
    }
}
