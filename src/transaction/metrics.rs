//! The transaction layer's figures: SIP messages in and out by method and status class,
//! retransmissions, live transactions and timeouts. The counters are this layer's own
//! atomics (the hot path is one relaxed add); [`TransactionLayer::register_metrics`] puts
//! its families on the telemetry handle and copies the figures in at each scrape.
//!
//! Metrics: `strowger_sip_requests_total{direction,method}`,
//! `strowger_sip_responses_total{direction,class}`, `strowger_transactions`,
//! `strowger_transaction_timeouts_total`,
//! `strowger_transaction_retransmissions_total{direction="sent"|"received"}`.

use super::{Direction, TransactionLayer};
use crate::metrics::{self, load, Label, Telemetry};
use crate::sip::Method;
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests by method: the 14 of [`Method::ALL`], then "other".
const METHOD_SLOTS: usize = 15;

/// [`Method::ALL`] as a static, so its names are `'static`.
static METHODS: [Method; 14] = Method::ALL;

crate::label!(Direction, "direction", In = "in", Out = "out");

/// A request method as a label value: a position in [`Method::ALL`], or "other".
#[derive(Clone, Copy)]
pub struct MethodLabel(u8);

impl MethodLabel {
    fn of(m: &Method) -> MethodLabel {
        let slot = METHODS
            .iter()
            .position(|x| x == m)
            .unwrap_or(METHOD_SLOTS - 1);
        MethodLabel(slot as u8)
    }
}

impl Label for MethodLabel {
    const NAME: &'static str = "method";
    const ALL: &'static [Self] = &{
        let mut all = [MethodLabel(0); METHOD_SLOTS];
        let mut i = 0;
        while i < METHOD_SLOTS {
            all[i] = MethodLabel(i as u8);
            i += 1;
        }
        all
    };
    fn as_str(self) -> &'static str {
        METHODS
            .get(usize::from(self.0))
            .map_or("other", |m| m.as_str())
    }
    fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A response's status class.
#[derive(Clone, Copy)]
pub enum StatusClass {
    Provisional,
    Success,
    Redirection,
    ClientError,
    ServerError,
    GlobalFailure,
}
crate::label!(
    StatusClass,
    "class",
    Provisional = "1xx",
    Success = "2xx",
    Redirection = "3xx",
    ClientError = "4xx",
    ServerError = "5xx",
    GlobalFailure = "6xx",
);

/// Which way a retransmission went.
#[derive(Clone, Copy)]
pub enum Retransmission {
    /// Sent by Timers A, E and G.
    Sent,
    /// Received and absorbed by a transaction.
    Received,
}
crate::label!(
    Retransmission,
    "direction",
    Sent = "sent",
    Received = "received"
);

/// SIP messages through the transaction layer, counted with relaxed atomic adds only: no
/// lock, no label lookup.
pub(super) struct MessageCounters {
    /// [in, out] x method slot.
    requests: [[AtomicU64; METHOD_SLOTS]; 2],
    /// [in, out] x status class 1xx..6xx.
    responses: [[AtomicU64; 6]; 2],
}

impl Default for MessageCounters {
    fn default() -> MessageCounters {
        MessageCounters {
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
}

impl MessageCounters {
    pub(super) fn request(&self, dir: Direction, method: &Method) {
        self.requests[dir as usize][MethodLabel::of(method).index()]
            .fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn response(&self, dir: Direction, status: u16) {
        let class = usize::from(status / 100).clamp(1, 6) - 1;
        self.responses[dir as usize][class].fetch_add(1, Ordering::Relaxed);
    }
}

impl TransactionLayer {
    /// Registers this layer's families on `telemetry`, filled from its counters at each
    /// scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let requests = telemetry.counters2::<Direction, MethodLabel>(
            "strowger_sip_requests_total",
            "SIP requests by direction and method",
        )?;
        let responses = telemetry.counters2::<Direction, StatusClass>(
            "strowger_sip_responses_total",
            "SIP responses by direction and status class",
        )?;
        let retransmissions = telemetry.counters::<Retransmission>(
            "strowger_transaction_retransmissions_total",
            "Retransmissions sent (Timers A, E, G) and received (absorbed by a transaction)",
        )?;
        let live = telemetry.gauge("strowger_transactions", "Live SIP transactions")?;
        let timeouts = telemetry.counter(
            "strowger_transaction_timeouts_total",
            "Transactions that timed out (Timer B, F or H)",
        )?;
        let refused = telemetry.counter(
            "strowger_transactions_refused_total",
            "Requests outside dialogs refused with 503 because sip.max_transactions were alive",
        )?;
        let layer = self.clone();
        telemetry.on_scrape(move || {
            let shared = &layer.shared;
            for dir in Direction::ALL {
                let d = *dir as usize;
                for m in MethodLabel::ALL {
                    requests.catch_up(*dir, *m, load(&shared.messages.requests[d][m.index()]));
                }
                for c in StatusClass::ALL {
                    responses.catch_up(*dir, *c, load(&shared.messages.responses[d][c.index()]));
                }
            }
            let s = layer.stats();
            retransmissions.catch_up(Retransmission::Sent, s.retransmissions_sent);
            retransmissions.catch_up(Retransmission::Received, s.retransmissions_absorbed);
            live.set(layer.len() as i64);
            metrics::catch_up(&timeouts, s.client_timeouts + s.ack_timeouts);
            metrics::catch_up(&refused, s.refused_table_full);
        });
        Ok(())
    }
}
