//! Prometheus metrics (`GET /metrics` on the admin endpoint), read from the counters each
//! layer keeps. Hot paths only add to atomics (or observe pre-resolved histogram
//! children); label lookups happen at scrape time.
//!
//! Owns: metric names and the mapping from the layers' counters. Must not touch: any
//! behaviour; it only reads (`stats()`, `count()`, `active_calls()`).
//!
//! Metrics: `strowger_registrar_bindings` (gauge), `strowger_registrar_events_total{event=
//! "registered"|"refreshed"|"removed"|"expired"|"store_error"}`, `strowger_calls_active`,
//! `strowger_calls_total`, `strowger_calls_answered_total`,
//! `strowger_calls_failed_total{class}`, `strowger_call_setup_seconds{stage="18x"|"200"}`
//! and `strowger_call_duration_seconds` (histograms), `strowger_route_calls_total{route,
//! result}` (routes from `call.routes` only), `strowger_dial_outcomes_total{outcome}`,
//! `strowger_script_errors_total{hook}`, `strowger_script_hook_duration_seconds{hook}`,
//! `strowger_transaction_retransmissions_total{direction}`,
//! `strowger_transfers_total{kind="blind"|"attended"|"server",result="attempted"|
//! "succeeded"|"failed"}`, `strowger_register_results_total{result}` (ok, challenged, forbidden, not_found,
//! interval_too_brief, bad_request, server_error, other),
//! `strowger_sip_malformed_total{action="answered"|"dropped"}`,
//! `strowger_sip_requests_total{direction,method}`, `strowger_sip_responses_total{direction,
//! class}`, `strowger_transactions`, `strowger_transaction_timeouts_total`,
//! `strowger_auth_failures_total`, `strowger_process_cpu_seconds_total`,
//! `strowger_process_resident_memory_bytes`, `strowger_process_open_fds`,
//! `strowger_admin_unauthorized_total`; hunt groups (rendered by `crate::huntgroup` and
//! appended through [`Sources::extra_text`]): `strowger_huntgroup_waiting`,
//! `strowger_huntgroup_longest_wait_seconds`, `strowger_huntgroup_answered_total`,
//! `strowger_huntgroup_abandoned_total`, `strowger_huntgroup_overflowed_total`,
//! `strowger_huntgroup_agents{group,state}`, `strowger_huntgroup_answer_seconds`.
//! `strowger_admin_unauthorized_total`.
//! Presence: `strowger_presence_subscriptions{package}` (gauge),
//! `strowger_presence_notifies_total{result="sent"|"failed"}`,
//! `strowger_presence_publish_total{result="created"|"refreshed"|"modified"|"removed"|
//! "unknown_etag"|"rejected"}`, `strowger_messages_total{result="routed"|"failed"}`.

use crate::sip::Method;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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

/// Labelled histogram children resolved once: observing is then lock-free (the
/// prometheus crate's `with_label_values` takes a read lock and hashes the labels).
pub struct Children {
    vec: HistogramVec,
    children: Vec<Histogram>,
}

impl Children {
    fn new(name: &str, help: &str, label: &str, values: &[&str], buckets: Vec<f64>) -> Children {
        let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
            .expect("constant histogram options are valid");
        let children = values.iter().map(|v| vec.with_label_values(&[v])).collect();
        Children { vec, children }
    }

    /// Observes `secs` in the child with label value number `i` (clamped to the last).
    pub fn observe(&self, i: usize, secs: f64) {
        self.children[i.min(self.children.len() - 1)].observe(secs);
    }
}

/// `strowger_call_setup_seconds{stage}`: INVITE to the first 18x relayed to the caller
/// (`stage="18x"`) and to the 200 of answered calls (`stage="200"`).
pub static CALL_SETUP: LazyLock<Children> = LazyLock::new(|| {
    Children::new(
        "strowger_call_setup_seconds",
        "Time from INVITE to the first 18x (stage=18x) and to the 200 (stage=200)",
        "stage",
        &["18x", "200"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0],
    )
});
/// [`CALL_SETUP`] child indexes.
pub const SETUP_18X: usize = 0;
pub const SETUP_200: usize = 1;

/// Answer to hang-up of answered calls, seconds.
pub static CALL_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "strowger_call_duration_seconds",
            "Time from answer to hang-up of answered calls",
        )
        .buckets(vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
        ]),
    )
    .expect("constant histogram options are valid")
});

/// Script hooks as metric labels (a fixed set: labels stay bounded); anything else is
/// counted as "other".
pub const HOOKS: [&str; 7] = [
    "on_invite",
    "on_register",
    "on_call_end",
    "on_message",
    "on_subscribe",
    "on_refer",
    "other",
];

/// The index of `hook` in [`HOOKS`].
pub fn hook_index(hook: &str) -> usize {
    HOOKS
        .iter()
        .position(|h| *h == hook)
        .unwrap_or(HOOKS.len() - 1)
}

/// `strowger_script_hook_duration_seconds{hook}`: time a hook run spent executing Lua
/// (waits on dials and lookups not included: those are the call's, not the script's).
pub static HOOK_DURATION: LazyLock<Children> = LazyLock::new(|| {
    Children::new(
        "strowger_script_hook_duration_seconds",
        "Time a hook run spent executing Lua (waits on dials excluded)",
        "hook",
        &HOOKS,
        vec![
            0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
            0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
        ],
    )
});

/// Dial outcomes as metric labels, see [`dial_outcome`].
pub const DIAL_OUTCOMES: [&str; 8] = [
    "answered",
    "busy",
    "no_answer",
    "declined",
    "not_found",
    "cancelled",
    "rejected",
    "failed",
];

/// The [`DIAL_OUTCOMES`] index of a dial that ended with `status` (`cancelled`: the caller
/// hung up while it rang).
pub fn dial_outcome(status: u16, cancelled: bool) -> usize {
    match status {
        _ if cancelled => 5,
        200..=299 => 0,
        486 | 600 => 1,
        408 | 480 => 2,
        603 => 3,
        404 | 484 | 604 => 4,
        300..=499 | 601..=699 => 6,
        _ => 7,
    }
}

/// Retransmissions sent by the transaction layer (Timers A, E and G), process-wide like
/// [`SIP`].
pub static RETRANSMISSIONS_SENT: AtomicU64 = AtomicU64::new(0);

/// Route names a script may tag a call with (`call.routes`), and per route the calls
/// started, answered and failed by class; indexes are positions in `call.routes`.
#[derive(Debug, Default)]
pub struct RouteStats {
    names: Vec<String>,
    started: Vec<AtomicU64>,
    answered: Vec<AtomicU64>,
    failed: Vec<[AtomicU64; 4]>,
}

impl RouteStats {
    pub fn new(names: &[String]) -> RouteStats {
        RouteStats {
            names: names.to_vec(),
            started: names.iter().map(|_| AtomicU64::new(0)).collect(),
            answered: names.iter().map(|_| AtomicU64::new(0)).collect(),
            failed: names
                .iter()
                .map(|_| [const { AtomicU64::new(0) }; 4])
                .collect(),
        }
    }

    /// The index of a configured route name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn name(&self, i: usize) -> Option<&str> {
        self.names.get(i).map(String::as_str)
    }

    /// A call tagged with route `i` ended: answered, or failed with `status`.
    pub fn call_ended(&self, i: usize, answered: bool, status: u16) {
        let Some(started) = self.started.get(i) else {
            return;
        };
        started.fetch_add(1, Ordering::Relaxed);
        if answered {
            self.answered[i].fetch_add(1, Ordering::Relaxed);
        } else if (300..700).contains(&status) {
            self.failed[i][usize::from(status / 100 - 3)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where the figures come from, read at every scrape.
pub trait Sources: Send + Sync + 'static {
    fn bindings(&self) -> u64;
    /// (registered, refreshed, removed, expired, store errors)
    fn registrar_events(&self) -> [u64; 5];
    fn calls_active(&self) -> u64;
    fn calls_started(&self) -> u64;
    fn calls_answered(&self) -> u64;
    /// Failed hook runs by hook, indexed like [`HOOKS`].
    fn script_errors(&self) -> [u64; HOOKS.len()];
    /// Dials by outcome, indexed like [`DIAL_OUTCOMES`].
    fn dial_outcomes(&self) -> [u64; DIAL_OUTCOMES.len()];
    /// Retransmitted requests absorbed by server transactions.
    fn retransmissions_received(&self) -> u64;
    /// The per-route call counters (`call.routes`).
    fn routes(&self) -> &RouteStats;
    /// Transfers by kind (blind, attended, server) and result (attempted, succeeded,
    /// failed).
    fn transfers(&self) -> [[u64; 3]; 3];
    /// Final answers to REGISTER, indexed like [`crate::uas::REGISTER_RESULTS`].
    fn register_results(&self) -> [u64; crate::uas::REGISTER_RESULTS.len()];
    /// (answered with 400/505, dropped)
    fn malformed(&self) -> [u64; 2];
    fn transactions(&self) -> u64;
    /// Client transactions that timed out (Timer B/F) plus Timer H.
    fn transaction_timeouts(&self) -> u64;
    /// Calls that ended without an answer, by final status class 3xx..6xx.
    fn calls_failed(&self) -> [u64; 4];
    /// Digest answers that were wrong (wrong password, unknown user) or throttled.
    fn auth_failures(&self) -> u64;
    /// More series in the text format, appended as they are (the hunt groups'
    /// `strowger_huntgroup_*`, from their own registry).
    fn extra_text(&self) -> String {
        String::new()
    }

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
    script_errors: IntCounterVec,
    dial_outcomes: IntCounterVec,
    retransmissions: IntCounterVec,
    route_calls: IntCounterVec,
    register_results: IntCounterVec,
    transfers: IntCounterVec,
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
            script_errors: vec(
                "strowger_script_errors_total",
                "Hook runs that failed (Lua error, budget, memory), by hook",
                "hook",
            )?,
            dial_outcomes: vec(
                "strowger_dial_outcomes_total",
                "Dials (call:dial and the like) by outcome",
                "outcome",
            )?,
            retransmissions: vec(
                "strowger_transaction_retransmissions_total",
                "Retransmissions sent (Timers A, E, G) and received (absorbed by a transaction)",
                "direction",
            )?,
            register_results: vec(
                "strowger_register_results_total",
                "Final answers to REGISTER by result",
                "result",
            )?,
            transfers: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "strowger_transfers_total",
                        "Call transfers by kind (blind, attended, server) and result \
                         (attempted, succeeded, failed)",
                    ),
                    &["kind", "result"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
            route_calls: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "strowger_route_calls_total",
                        "Calls a script tagged with a route (call.routes), by result",
                    ),
                    &["route", "result"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
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
        for (hook, value) in HOOKS.iter().zip(s.script_errors()) {
            catch_up(&self.script_errors.with_label_values(&[hook]), value);
        }
        for (outcome, value) in DIAL_OUTCOMES.iter().zip(s.dial_outcomes()) {
            catch_up(&self.dial_outcomes.with_label_values(&[outcome]), value);
        }
        catch_up(
            &self.retransmissions.with_label_values(&["sent"]),
            load(&RETRANSMISSIONS_SENT),
        );
        catch_up(
            &self.retransmissions.with_label_values(&["received"]),
            s.retransmissions_received(),
        );
        for (result, value) in crate::uas::REGISTER_RESULTS
            .iter()
            .zip(s.register_results())
        {
            catch_up(&self.register_results.with_label_values(&[result]), value);
        }
        for (kind, results) in ["blind", "attended", "server"].iter().zip(s.transfers()) {
            for (result, value) in ["attempted", "succeeded", "failed"].iter().zip(results) {
                catch_up(&self.transfers.with_label_values(&[kind, result]), value);
            }
        }
        let routes = s.routes();
        for (i, name) in routes.names.iter().enumerate() {
            let c = |result: &str, value: &AtomicU64| {
                catch_up(
                    &self.route_calls.with_label_values(&[name, result]),
                    load(value),
                )
            };
            c("started", &routes.started[i]);
            c("answered", &routes.answered[i]);
            for (class, value) in ["3xx", "4xx", "5xx", "6xx"].iter().zip(&routes.failed[i]) {
                c(class, value);
            }
        }
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
        for collector in [
            &CALL_SETUP.vec as &dyn prometheus::core::Collector,
            &*CALL_DURATION,
            &HOOK_DURATION.vec,
        ] {
            families.extend(collector.collect());
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        text.push_str(&self.sources.extra_text());
        text
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
