//! Prometheus metrics (`GET /metrics` on the admin endpoint), read from the counters each
//! layer keeps; the first set, to be extended by the observability issue.
//!
//! Owns: metric names and the mapping from the layers' counters. Must not touch: any
//! behaviour; it only reads (`stats()`, `count()`, `active_calls()`).
//!
//! Metrics: `strowger_registrar_bindings` (gauge), `strowger_registrar_events_total{event=
//! "registered"|"refreshed"|"removed"|"expired"|"store_error"}`, `strowger_calls_active`,
//! `strowger_calls_total`, `strowger_calls_answered_total`, `strowger_script_errors_total`,
//! `strowger_sip_malformed_total{action="answered"|"dropped"}`, `strowger_transactions`.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the figures come from, read at every scrape.
pub trait Sources: Send + Sync + 'static {
    fn bindings(&self) -> u64;
    /// (registered, refreshed, removed, expired, store errors)
    fn registrar_events(&self) -> [u64; 5];
    fn calls_active(&self) -> u64;
    fn calls_started(&self) -> u64;
    fn calls_answered(&self) -> u64;
    fn script_errors(&self) -> u64;
    /// (answered with 400/505, dropped)
    fn malformed(&self) -> [u64; 2];
    fn transactions(&self) -> u64;
}

/// The registry and its metrics.
pub struct Metrics {
    registry: Registry,
    sources: Box<dyn Sources>,
    bindings: IntGauge,
    registrar_events: IntCounterVec,
    calls_active: IntGauge,
    calls_total: IntCounter,
    calls_answered: IntCounter,
    script_errors: IntCounter,
    malformed: IntCounterVec,
    transactions: IntGauge,
}

/// Brings a Prometheus counter up to a monotonic source value.
fn catch_up(counter: &IntCounter, value: u64) {
    let have = counter.get();
    if value > have {
        counter.inc_by(value - have);
    }
}

impl Metrics {
    pub fn new(sources: Box<dyn Sources>) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        Ok(Metrics {
            bindings: gauge("strowger_registrar_bindings", "Live registrar bindings")?,
            registrar_events: vec(
                "strowger_registrar_events_total",
                "Registrar binding events",
                "event",
            )?,
            calls_active: gauge("strowger_calls_active", "Calls ringing or up")?,
            calls_total: counter("strowger_calls_total", "Calls started (INVITEs)")?,
            calls_answered: counter("strowger_calls_answered_total", "Calls answered")?,
            script_errors: counter(
                "strowger_script_errors_total",
                "Hook runs that failed (Lua error, budget, memory)",
            )?,
            malformed: vec(
                "strowger_sip_malformed_total",
                "Malformed SIP messages",
                "action",
            )?,
            transactions: gauge("strowger_transactions", "Live SIP transactions")?,
            registry,
            sources,
        })
    }

    /// The text exposition format, with every figure read now.
    pub fn render(&self) -> String {
        let s = &self.sources;
        self.bindings.set(s.bindings() as i64);
        for (event, value) in [
            "registered",
            "refreshed",
            "removed",
            "expired",
            "store_error",
        ]
        .iter()
        .zip(s.registrar_events())
        {
            catch_up(&self.registrar_events.with_label_values(&[event]), value);
        }
        self.calls_active.set(s.calls_active() as i64);
        catch_up(&self.calls_total, s.calls_started());
        catch_up(&self.calls_answered, s.calls_answered());
        catch_up(&self.script_errors, s.script_errors());
        let [answered, dropped] = s.malformed();
        catch_up(&self.malformed.with_label_values(&["answered"]), answered);
        catch_up(&self.malformed.with_label_values(&["dropped"]), dropped);
        self.transactions.set(s.transactions() as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Reads an atomic counter.
pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}
