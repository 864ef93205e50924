//! The hunt-group metrics: per-group families, registered on the telemetry handle by
//! [`super::HuntGroups::register_metrics`] and brought up to date at each scrape.
//!
//! Metrics: `strowger_huntgroup_waiting{group}`, `strowger_huntgroup_longest_wait_seconds
//! {group}`, `strowger_huntgroup_answered_total{group}`, `strowger_huntgroup_abandoned_total
//! {group}`, `strowger_huntgroup_overflowed_total{group}`, `strowger_huntgroup_agents{group,
//! state}`, `strowger_huntgroup_answer_seconds{group}`.
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
use std::collections::HashMap;

pub(super) struct HuntMetrics {
    waiting: IntGaugeVec,
    longest: GaugeVec,
    answered: IntCounterVec,
    abandoned: IntCounterVec,
    overflowed: IntCounterVec,
    agents: IntGaugeVec,
    answer: HistogramVec,
}

impl HuntMetrics {
    pub fn new(groups: &[String]) -> HuntMetrics {
        // The names and label sets are constants: construction cannot fail.
        let waiting = IntGaugeVec::new(
            Opts::new("strowger_huntgroup_waiting", "Callers queued, per group"),
            &["group"],
        )
        .expect("valid metric");
        let longest = GaugeVec::new(
            Opts::new(
                "strowger_huntgroup_longest_wait_seconds",
                "How long the longest-waiting queued caller has waited",
            ),
            &["group"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["group"]).expect("valid metric")
        };
        let answered = counter(
            "strowger_huntgroup_answered_total",
            "Hunts answered by an agent",
        );
        let abandoned = counter(
            "strowger_huntgroup_abandoned_total",
            "Callers who hung up before an agent answered",
        );
        let overflowed = counter(
            "strowger_huntgroup_overflowed_total",
            "Hunts that reached max_wait and went back to the script",
        );
        let agents = IntGaugeVec::new(
            Opts::new("strowger_huntgroup_agents", "Agents by state, per group"),
            &["group", "state"],
        )
        .expect("valid metric");
        let answer = HistogramVec::new(
            HistogramOpts::new(
                "strowger_huntgroup_answer_seconds",
                "Time from the start of a hunt to an agent's answer",
            )
            .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]),
            &["group"],
        )
        .expect("valid metric");
        // Every series exists from the start (zero), so rates and dashboards work
        // before the first call.
        for g in groups {
            waiting.with_label_values(&[g]).set(0);
            longest.with_label_values(&[g]).set(0.0);
            for m in [&answered, &abandoned, &overflowed] {
                m.with_label_values(&[g]).inc_by(0);
            }
            for s in super::AgentState::ALL {
                agents.with_label_values(&[g, s.name()]).set(0);
            }
            let _ = answer.with_label_values(&[g]);
        }
        HuntMetrics {
            waiting,
            longest,
            answered,
            abandoned,
            overflowed,
            agents,
            answer,
        }
    }

    pub fn answer_seconds(&self, group: &str, secs: f64) {
        self.answer.with_label_values(&[group]).observe(secs);
    }

    pub fn set_group(
        &self,
        group: &str,
        waiting: i64,
        longest: f64,
        counts: [u64; 3],
        by_state: &HashMap<&str, i64>,
    ) {
        self.waiting.with_label_values(&[group]).set(waiting);
        self.longest.with_label_values(&[group]).set(longest);
        for (m, v) in [&self.answered, &self.abandoned, &self.overflowed]
            .into_iter()
            .zip(counts)
        {
            let c = m.with_label_values(&[group]);
            c.inc_by(v.saturating_sub(c.get()));
        }
        for s in super::AgentState::ALL {
            let n = by_state.get(s.name()).copied().unwrap_or(0);
            self.agents.with_label_values(&[group, s.name()]).set(n);
        }
    }

    /// Puts the families on the telemetry handle.
    pub fn register(&self, t: &crate::metrics::Telemetry) -> Result<(), crate::metrics::Error> {
        for c in [&self.answered, &self.abandoned, &self.overflowed] {
            t.register(c)?;
        }
        t.register(&self.waiting)?;
        t.register(&self.longest)?;
        t.register(&self.agents)?;
        t.register(&self.answer)
    }
}
