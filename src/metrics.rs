//! Prometheus metrics (`GET /metrics` on the admin endpoint), read from the counters each
//! layer keeps; the first set, to be extended by the observability issue.
//!
//! Owns: metric names and the mapping from the layers' counters. Must not touch: any
//! behaviour; it only reads (`stats()`, `count()`, `active_calls()`).
//!
//! Metrics: `strowger_registrar_bindings` (gauge), `strowger_registrar_events_total{event=
//! "registered"|"refreshed"|"removed"|"expired"|"store_error"}`, `strowger_calls_active`,
//! `strowger_calls_total`, `strowger_calls_answered_total`,
//! `strowger_calls_failed_total{class}`, `strowger_call_setup_seconds` (histogram),
//! `strowger_script_errors_total`, `strowger_sip_malformed_total{action="answered"|"dropped"}`,
//! `strowger_sip_requests_total{direction,method}`, `strowger_sip_responses_total{direction,
//! class}`, `strowger_transactions`, `strowger_transaction_timeouts_total`,
//! `strowger_auth_failures_total`, `strowger_process_cpu_seconds_total`,
//! `strowger_process_resident_memory_bytes`, `strowger_process_open_fds`,
//! `strowger_admin_unauthorized_total`.
//! Presence: `strowger_presence_subscriptions{package}` (gauge),
//! `strowger_presence_notifies_total{result="sent"|"failed"}`,
//! `strowger_presence_publish_total{result="created"|"refreshed"|"modified"|"removed"|
//! "unknown_etag"|"rejected"}`, `strowger_messages_total{result="routed"|"failed"}`.

use crate::sip::Method;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

/// Requests by method: the 14 of the seed, then "other".
const METHOD_SLOTS: usize = 15;

/// SIP messages through the transaction layer (and the B2BUA's end-to-end ACKs), counted
/// on the hot path with relaxed atomic adds only: no lock, no label lookup.
pub struct SipCounters {
    /// [in, out] x method slot.
    requests: [[AtomicU64; METHOD_SLOTS]; 2],
    /// [in, out] x status class 1xx..6xx.
    responses: [[AtomicU64; 6]; 2],
}

#[derive(Clone, Copy)]
pub enum Dir {
    In = 0,
    Out = 1,
}

impl SipCounters {
    const fn new() -> SipCounters {
        SipCounters {
            requests: [
                [const { AtomicU64::new(0) }; METHOD_SLOTS],
                [const { AtomicU64::new(0) }; METHOD_SLOTS],
            ],
            responses: [
                [const { AtomicU64::new(0) }; 6],
                [const { AtomicU64::new(0) }; 6],
            ],
        }
    }
    pub fn request(&self, dir: Dir, method: &Method) {
        let slot = Method::ALL
            .iter()
            .position(|m| m == method)
            .unwrap_or(METHOD_SLOTS - 1);
        self.requests[dir as usize][slot].fetch_add(1, Ordering::Relaxed);
    }
    pub fn response(&self, dir: Dir, status: u16) {
        let class = usize::from(status / 100).clamp(1, 6) - 1;
        self.responses[dir as usize][class].fetch_add(1, Ordering::Relaxed);
    }
}

/// Process-wide SIP message counters (one server per process in production; tests that
/// run several only read them as "at least").
pub static SIP: SipCounters = SipCounters::new();

/// INVITE to 200 of answered calls, seconds.
pub static CALL_SETUP: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "strowger_call_setup_seconds",
            "Time from INVITE to the 200 of answered calls",
        )
        .buckets(vec![
            0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
        ]),
    )
    .expect("constant histogram options are valid")
});

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
    /// Client transactions that timed out (Timer B/F) plus Timer H.
    fn transaction_timeouts(&self) -> u64;
    /// Calls that ended without an answer, by final status class 3xx..6xx.
    fn calls_failed(&self) -> [u64; 4];
    /// Digest answers that were wrong (wrong password, unknown user) or throttled.
    fn auth_failures(&self) -> u64;
    /// presence: None when the server has no presence core.
    fn presence(&self) -> Option<PresenceFigures> {
        None
    }
}

/// presence: the figures of the presence core at one scrape.
#[derive(Debug, Clone, Default)]
pub struct PresenceFigures {
    /// Active subscriptions by package name.
    pub subscriptions: Vec<(&'static str, u64)>,
    pub notifies_sent: u64,
    pub notifies_failed: u64,
    /// PUBLISH outcomes by result label.
    pub publish: Vec<(&'static str, u64)>,
    pub messages_routed: u64,
    pub messages_failed: u64,
}

/// presence: its metric families.
struct PresenceMetrics {
    subscriptions: prometheus::IntGaugeVec,
    notifies: IntCounterVec,
    publish: IntCounterVec,
    messages: IntCounterVec,
}

impl PresenceMetrics {
    fn new(registry: &Registry) -> prometheus::Result<PresenceMetrics> {
        let subscriptions = prometheus::IntGaugeVec::new(
            Opts::new(
                "strowger_presence_subscriptions",
                "Active subscriptions by event package",
            ),
            &["package"],
        )?;
        registry.register(Box::new(subscriptions.clone()))?;
        let vec = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let v = IntCounterVec::new(Opts::new(name, help), &["result"])?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        Ok(PresenceMetrics {
            subscriptions,
            notifies: vec(
                "strowger_presence_notifies_total",
                "NOTIFYs sent, and those answered with an error or not at all",
            )?,
            publish: vec(
                "strowger_presence_publish_total",
                "PUBLISH requests by outcome",
            )?,
            messages: vec(
                "strowger_messages_total",
                "MESSAGE requests delivered (a 2xx came back) or failed",
            )?,
        })
    }

    fn update(&self, f: &PresenceFigures) {
        for (package, n) in &f.subscriptions {
            self.subscriptions
                .with_label_values(&[package])
                .set(*n as i64);
        }
        catch_up(&self.notifies.with_label_values(&["sent"]), f.notifies_sent);
        catch_up(
            &self.notifies.with_label_values(&["failed"]),
            f.notifies_failed,
        );
        for (result, n) in &f.publish {
            catch_up(&self.publish.with_label_values(&[result]), *n);
        }
        catch_up(
            &self.messages.with_label_values(&["routed"]),
            f.messages_routed,
        );
        catch_up(
            &self.messages.with_label_values(&["failed"]),
            f.messages_failed,
        );
    }
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
    transaction_timeouts: IntCounter,
    calls_failed: IntCounterVec,
    auth_failures: IntCounter,
    sip_requests: IntCounterVec,
    sip_responses: IntCounterVec,
    cpu: prometheus::Counter,
    rss: IntGauge,
    fds: IntGauge,
    admin_unauthorized: IntCounter,
    presence: PresenceMetrics,
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
            transaction_timeouts: counter(
                "strowger_transaction_timeouts_total",
                "Transactions that timed out (Timer B, F or H)",
            )?,
            calls_failed: vec(
                "strowger_calls_failed_total",
                "Calls that ended unanswered, by final status class",
                "class",
            )?,
            auth_failures: counter(
                "strowger_auth_failures_total",
                "Digest authentication failures (wrong credentials or throttled)",
            )?,
            sip_requests: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "strowger_sip_requests_total",
                        "SIP requests by direction and method",
                    ),
                    &["direction", "method"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
            sip_responses: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "strowger_sip_responses_total",
                        "SIP responses by direction and status class",
                    ),
                    &["direction", "class"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
            cpu: {
                let c = prometheus::Counter::new(
                    "strowger_process_cpu_seconds_total",
                    "CPU time of the server process (user + system)",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            rss: gauge("strowger_process_resident_memory_bytes", "Resident memory")?,
            fds: gauge("strowger_process_open_fds", "Open file descriptors")?,
            admin_unauthorized: counter(
                "strowger_admin_unauthorized_total",
                "Admin API requests refused with 401 (missing or wrong bearer token)",
            )?,
            presence: PresenceMetrics::new(&registry)?,
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
        catch_up(&self.transaction_timeouts, s.transaction_timeouts());
        for (class, value) in ["3xx", "4xx", "5xx", "6xx"].iter().zip(s.calls_failed()) {
            catch_up(&self.calls_failed.with_label_values(&[class]), value);
        }
        catch_up(&self.auth_failures, s.auth_failures());
        for (d, dir) in ["in", "out"].iter().enumerate() {
            for (slot, counter) in SIP.requests[d].iter().enumerate() {
                let name = Method::ALL.get(slot).map_or("other", |m| m.as_str());
                catch_up(
                    &self.sip_requests.with_label_values(&[dir, name]),
                    counter.load(Ordering::Relaxed),
                );
            }
            for (c, counter) in SIP.responses[d].iter().enumerate() {
                let class = ["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"][c];
                catch_up(
                    &self.sip_responses.with_label_values(&[dir, class]),
                    counter.load(Ordering::Relaxed),
                );
            }
        }
        let (cpu, rss, fds) = process_figures();
        let have = self.cpu.get();
        if cpu > have {
            self.cpu.inc_by(cpu - have);
        }
        self.rss.set(rss as i64);
        catch_up(
            &self.admin_unauthorized,
            load(&crate::admin::ADMIN_UNAUTHORIZED),
        );
        self.fds.set(fds as i64);
        if let Some(p) = s.presence() {
            self.presence.update(&p);
        }
        let mut families = self.registry.gather();
        families.extend(prometheus::core::Collector::collect(&*CALL_SETUP));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// CPU seconds, resident bytes and open descriptors of this process, from /proc (Linux;
/// zeros elsewhere).
fn process_figures() -> (f64, u64, u64) {
    let ticks = 100.0; // USER_HZ: 100 on every Linux the server targets
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (cpu, rss, fds)
}

/// Reads an atomic counter.
pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}
