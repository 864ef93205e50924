//! The call core's figures. Counters are the B2BUA's own atomics ([`super::B2buaStats`],
//! [`RouteStats`]) and histograms it observes directly; [`super::B2bua::register_metrics`]
//! puts the families on the telemetry handle.
//!
//! Metrics: `strowger_calls_active`, `strowger_calls_total`, `strowger_calls_answered_total`,
//! `strowger_calls_failed_total{class}`, `strowger_call_setup_seconds{stage="18x"|"200"}`,
//! `strowger_call_duration_seconds`, `strowger_route_calls_total{route,result}` (routes
//! from `call.routes` only), `strowger_dial_outcomes_total{outcome}`,
//! `strowger_transfers_total{kind="blind"|"attended"|"server",result="attempted"|
//! "succeeded"|"failed"}`.

use super::B2bua;
use crate::metrics::{self, histogram, load, Histograms, Label, Telemetry};
use prometheus::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a dial ended, as the label of `strowger_dial_outcomes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialResult {
    Answered,
    Busy,
    NoAnswer,
    Declined,
    NotFound,
    /// The caller hung up while it rang.
    Cancelled,
    Rejected,
    Failed,
}
crate::label!(
    DialResult,
    "outcome",
    Answered = "answered",
    Busy = "busy",
    NoAnswer = "no_answer",
    Declined = "declined",
    NotFound = "not_found",
    Cancelled = "cancelled",
    Rejected = "rejected",
    Failed = "failed",
);

impl DialResult {
    /// A dial that ended with `status` (`cancelled`: the caller hung up while it rang).
    pub fn of(status: u16, cancelled: bool) -> DialResult {
        match status {
            _ if cancelled => DialResult::Cancelled,
            200..=299 => DialResult::Answered,
            486 | 600 => DialResult::Busy,
            408 | 480 => DialResult::NoAnswer,
            603 => DialResult::Declined,
            404 | 484 | 604 => DialResult::NotFound,
            300..=499 | 601..=699 => DialResult::Rejected,
            _ => DialResult::Failed,
        }
    }
}

/// The index in [`super::B2buaStats::dial_outcomes`] of a dial that ended with `status`.
pub(crate) fn dial_outcome(status: u16, cancelled: bool) -> usize {
    DialResult::of(status, cancelled).index()
}

/// Which stage of call set-up `strowger_call_setup_seconds` measures.
#[derive(Clone, Copy, Debug)]
pub enum SetupStage {
    /// INVITE to the first 18x relayed to the caller.
    Ringing,
    /// INVITE to the 200 of an answered call.
    Answered,
}
crate::label!(SetupStage, "stage", Ringing = "18x", Answered = "200");

/// A call's final status class, for unanswered calls.
#[derive(Clone, Copy, Debug)]
pub enum FailureClass {
    Redirection,
    ClientError,
    ServerError,
    GlobalFailure,
}
crate::label!(
    FailureClass,
    "class",
    Redirection = "3xx",
    ClientError = "4xx",
    ServerError = "5xx",
    GlobalFailure = "6xx",
);

/// What became of the calls of a route (`strowger_route_calls_total{route,result}`).
#[derive(Clone, Copy, Debug)]
pub enum RouteResult {
    Started,
    Answered,
    Failed(FailureClass),
}

impl RouteResult {
    fn as_str(self) -> &'static str {
        match self {
            RouteResult::Started => "started",
            RouteResult::Answered => "answered",
            RouteResult::Failed(class) => class.as_str(),
        }
    }
}

/// Transfers by kind.
#[derive(Clone, Copy, Debug)]
pub enum TransferLabel {
    Blind,
    Attended,
    Server,
}
crate::label!(
    TransferLabel,
    "kind",
    Blind = "blind",
    Attended = "attended",
    Server = "server"
);

/// Transfers by result.
#[derive(Clone, Copy, Debug)]
pub enum TransferResult {
    Attempted,
    Succeeded,
    Failed,
}
crate::label!(
    TransferResult,
    "result",
    Attempted = "attempted",
    Succeeded = "succeeded",
    Failed = "failed",
);

/// The histograms a call observes as it goes (not registered until
/// [`B2bua::register_metrics`]; observing is lock-free).
pub(crate) struct CallHistograms {
    pub setup: Histograms<SetupStage>,
    pub duration: Histogram,
}

impl CallHistograms {
    pub fn new() -> CallHistograms {
        CallHistograms {
            setup: Histograms::new(
                "strowger_call_setup_seconds",
                "Time from INVITE to the first 18x (stage=18x) and to the 200 (stage=200)",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0],
            ),
            duration: histogram(
                "strowger_call_duration_seconds",
                "Time from answer to hang-up of answered calls",
                vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                ],
            ),
        }
    }
}

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

impl B2bua {
    /// Registers the call core's families on `telemetry`, filled from its counters at each
    /// scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let h = &self.inner.histograms;
        telemetry.register(&h.duration)?;
        telemetry.register(h.setup.family())?;
        let active = telemetry.gauge("strowger_calls_active", "Calls ringing or up")?;
        let total = telemetry.counter("strowger_calls_total", "Calls started (INVITEs)")?;
        let answered = telemetry.counter("strowger_calls_answered_total", "Calls answered")?;
        let failed = telemetry.counters::<FailureClass>(
            "strowger_calls_failed_total",
            "Calls that ended unanswered, by final status class",
        )?;
        let dials = telemetry.counters::<DialResult>(
            "strowger_dial_outcomes_total",
            "Dials (call:dial and the like) by outcome",
        )?;
        let transfers = telemetry.counters2::<TransferLabel, TransferResult>(
            "strowger_transfers_total",
            "Call transfers by kind (blind, attended, server) and result \
             (attempted, succeeded, failed)",
        )?;
        let routes = telemetry.counter_vec(
            "strowger_route_calls_total",
            "Calls a script tagged with a route (call.routes), by result",
            &["route", "result"],
        )?;
        let expiries = telemetry.counter(
            "strowger_session_timer_expiries_total",
            "Calls ended because a leg's RFC 4028 session expired unrefreshed (or its refresh \
             got 408/481)",
        )?;
        let too_brief = telemetry.counter(
            "strowger_session_timer_too_brief_total",
            "INVITEs refused with 422 (Session-Expires below call.min_se_s)",
        )?;
        let gone = telemetry.counter(
            "strowger_keepalive_ended_total",
            "Calls ended because a party answered its in-dialog keep-alive OPTIONS \
             (call.keepalive_s) with nothing, 408 or 481",
        )?;
        let refused = telemetry.counter(
            "strowger_overload_refused_total",
            "New calls refused with 503 and Retry-After because the server was overloaded",
        )?;
        let fraction = prometheus::Gauge::new(
            "strowger_overload_refused_ratio",
            "Fraction of new calls refused now for overload (0 to 0.95; from measured queue delays)",
        )?;
        telemetry.register(&fraction)?;
        let delays = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "strowger_overload_queue_delay_seconds",
                "Smallest wait seen in the last 100 ms window, by queue: socket (UDP datagrams \
                 before they are read), sip (the SIP thread's lateness), script (new calls \
                 waiting for a Lua VM); above call.overload_delay_ms new calls are shed",
            ),
            &["queue"],
        )?;
        telemetry.register(&delays)?;
        let b2bua = self.clone();
        telemetry.on_scrape(move || {
            let s = b2bua.stats();
            active.set(b2bua.active_calls() as i64);
            if let Some(o) = &b2bua.inner.overload {
                metrics::catch_up(&refused, o.refused_total());
                fraction.set(o.refused_fraction());
                for (q, d) in o.last_delays() {
                    let name = match q {
                        crate::overload::Queue::Sip => "sip",
                        crate::overload::Queue::Script => "script",
                        crate::overload::Queue::Socket => "socket",
                    };
                    delays
                        .with_label_values(&[name])
                        .set(d.map_or(0.0, |d| d.as_secs_f64()));
                }
            }
            metrics::catch_up(&total, load(&s.calls_started));
            metrics::catch_up(&answered, load(&s.answered));
            metrics::catch_up(&expiries, load(&s.session_expiries));
            metrics::catch_up(&too_brief, load(&s.session_too_brief));
            metrics::catch_up(&gone, load(&s.parties_gone));
            for c in FailureClass::ALL {
                failed.catch_up(*c, load(&s.failed_by_class[c.index()]));
            }
            for d in DialResult::ALL {
                dials.catch_up(*d, load(&s.dial_outcomes[d.index()]));
            }
            for k in TransferLabel::ALL {
                for r in TransferResult::ALL {
                    transfers.catch_up(*k, *r, load(&s.transfers[k.index()][r.index()]));
                }
            }
            // Route names are configured (`call.routes`, bounded there), so this family's
            // `route` label is resolved at scrape time.
            let r = b2bua.routes();
            for (i, name) in r.names.iter().enumerate() {
                let c = |result: RouteResult, value: &AtomicU64| {
                    let child = routes.with_label_values(&[name, result.as_str()]);
                    metrics::catch_up(&child, load(value))
                };
                c(RouteResult::Started, &r.started[i]);
                c(RouteResult::Answered, &r.answered[i]);
                for (class, value) in FailureClass::ALL.iter().zip(&r.failed[i]) {
                    c(RouteResult::Failed(*class), value);
                }
            }
        });
        Ok(())
    }
}
