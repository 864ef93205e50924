//! Telemetry: the one handle every layer registers its Prometheus families on, and the text
//! exposition `GET /metrics` serves (admin endpoint).
//!
//! Owns: the registry, the label trait, the family types and the process figures
//! (`strowger_process_cpu_seconds_total`, `strowger_process_resident_memory_bytes`,
//! `strowger_process_open_fds`). Must not touch: any layer's counters or behaviour. It
//! imports no other module of the crate: each layer defines its own families (names, help,
//! label types) in its own `metrics` part, keeps its own counters, and registers both here
//! when `server` builds the handle at start. Hot paths only add to atomics or observe
//! pre-resolved children; figures a layer keeps in its own atomics are copied in by the
//! scrape callback the layer registers ([`Telemetry::on_scrape`]).
//!
//! Where each family is defined: `transaction` (`strowger_sip_requests_total`,
//! `strowger_sip_responses_total`, `strowger_transactions`,
//! `strowger_transaction_timeouts_total`, `strowger_transaction_retransmissions_total`),
//! `auth` (`strowger_auth_failures_total`), `registrar` (`strowger_registrar_bindings`,
//! `strowger_registrar_events_total`), `huntgroup` (`strowger_huntgroup_*`), `trunk`
//! (`strowger_trunk_*`: registered, up, channels, calls, auth failures, registrations),
//! `script`
//! (`strowger_script_errors_total`, `strowger_script_hook_duration_seconds`), `b2bua`
//! (`strowger_calls_*`, `strowger_call_setup_seconds`, `strowger_call_duration_seconds`,
//! `strowger_route_calls_total`, `strowger_dial_outcomes_total`, `strowger_transfers_total`),
//! `presence` (`strowger_presence_*`, `strowger_messages_total`), `uas`
//! (`strowger_register_results_total`), `admin` (`strowger_admin_unauthorized_total`),
//! `server` (`strowger_sip_malformed_total`).

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A label's values as a type: an enum whose variants are the label's (bounded) values.
pub trait Label: Copy + Send + Sync + 'static {
    /// The label's name in the exposition (`"result"`, `"direction"`, ...).
    const NAME: &'static str;
    /// Every value, in [`Label::index`] order.
    const ALL: &'static [Self];
    /// The value as exposed.
    fn as_str(self) -> &'static str;
    /// The position in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Implements [`Label`] for a fieldless enum: `label!(Dir, "direction", In = "in", Out =
/// "out")`. Variants are listed in declaration order (their index).
#[macro_export]
macro_rules! label {
    ($ty:ty, $name:literal, $($v:ident = $s:literal),+ $(,)?) => {
        impl $crate::metrics::Label for $ty {
            const NAME: &'static str = $name;
            const ALL: &'static [Self] = &[$(<$ty>::$v),+];
            fn as_str(self) -> &'static str {
                match self { $(<$ty>::$v => $s),+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

/// A counter family with one label, its children resolved once (an increment is one
/// atomic add: no label lookup, no lock).
#[derive(Clone)]
pub struct Counters<L: Label> {
    children: Arc<[IntCounter]>,
    _label: PhantomData<L>,
}

impl<L: Label> Counters<L> {
    pub fn inc(&self, l: L) {
        self.children[l.index()].inc();
    }
    /// Brings the child up to `value`, a monotonic count the layer keeps itself.
    pub fn catch_up(&self, l: L, value: u64) {
        catch_up(&self.children[l.index()], value);
    }
}

/// A counter family with two labels, children resolved once.
#[derive(Clone)]
pub struct Counters2<A: Label, B: Label> {
    children: Arc<[IntCounter]>,
    _label: PhantomData<(A, B)>,
}

impl<A: Label, B: Label> Counters2<A, B> {
    pub fn inc(&self, a: A, b: B) {
        self.children[a.index() * B::ALL.len() + b.index()].inc();
    }
    pub fn catch_up(&self, a: A, b: B, value: u64) {
        catch_up(&self.children[a.index() * B::ALL.len() + b.index()], value);
    }
}

/// A histogram family with one label, children resolved once (the prometheus crate's
/// `with_label_values` takes a read lock and hashes the labels; this does neither).
#[derive(Clone)]
pub struct Histograms<L: Label> {
    vec: HistogramVec,
    children: Arc<[Histogram]>,
    _label: PhantomData<L>,
}

impl<L: Label> Histograms<L> {
    /// A family not registered yet (see [`Telemetry::register`]).
    pub fn new(name: &str, help: &str, buckets: Vec<f64>) -> Histograms<L> {
        let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[L::NAME])
            .expect("constant histogram options are valid");
        Histograms {
            children: L::ALL
                .iter()
                .map(|l| vec.with_label_values(&[l.as_str()]))
                .collect(),
            vec,
            _label: PhantomData,
        }
    }
    /// The family, for [`Telemetry::register`].
    pub fn family(&self) -> &HistogramVec {
        &self.vec
    }
    pub fn observe(&self, l: L, secs: f64) {
        self.children[l.index()].observe(secs);
    }
}

/// A histogram without labels, not registered yet (see [`Telemetry::register`]).
pub fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("constant histogram options are valid")
}

type Scrape = Box<dyn Fn() + Send + Sync>;

struct Inner {
    registry: Registry,
    /// Run before every gather: layers copy the figures they keep in their own atomics.
    scrapes: Mutex<Vec<Scrape>>,
    process: ProcessFigures,
}

/// The telemetry handle: built once by `server` at start and handed to every layer, which
/// registers its families on it. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

/// Failures registering a family (a name registered twice is a programming error, but it is
/// reported rather than panicking so that start-up says which).
pub type Error = prometheus::Error;

impl Telemetry {
    pub fn new() -> Result<Telemetry, Error> {
        let registry = Registry::new();
        let process = ProcessFigures::new(&registry)?;
        Ok(Telemetry {
            inner: Arc::new(Inner {
                registry,
                scrapes: Mutex::new(Vec::new()),
                process,
            }),
        })
    }

    /// Registers a family the layer built itself (histograms it observes from the start).
    pub fn register<C: Collector + Clone + 'static>(&self, c: &C) -> Result<(), Error> {
        self.inner.registry.register(Box::new(c.clone()))
    }

    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, Error> {
        let c = IntCounter::new(name, help)?;
        self.register(&c)?;
        Ok(c)
    }

    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, Error> {
        let g = IntGauge::new(name, help)?;
        self.register(&g)?;
        Ok(g)
    }

    /// A counter family whose label values are `L`'s.
    pub fn counters<L: Label>(&self, name: &str, help: &str) -> Result<Counters<L>, Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), &[L::NAME])?;
        self.register(&vec)?;
        Ok(Counters {
            children: L::ALL
                .iter()
                .map(|l| vec.with_label_values(&[l.as_str()]))
                .collect(),
            _label: PhantomData,
        })
    }

    /// A counter family with two labels, `A`'s and `B`'s values.
    pub fn counters2<A: Label, B: Label>(
        &self,
        name: &str,
        help: &str,
    ) -> Result<Counters2<A, B>, Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), &[A::NAME, B::NAME])?;
        self.register(&vec)?;
        let children = A::ALL
            .iter()
            .flat_map(|a| {
                let vec = &vec;
                B::ALL
                    .iter()
                    .map(move |b| vec.with_label_values(&[a.as_str(), b.as_str()]))
            })
            .collect();
        Ok(Counters2 {
            children,
            _label: PhantomData,
        })
    }

    /// A counter family with labels whose values are only known at run time (configured
    /// names, e.g. `call.routes`): the layer bounds them.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.register(&vec)?;
        Ok(vec)
    }

    /// A gauge family with labels whose values are only known at run time.
    pub fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<prometheus::IntGaugeVec, Error> {
        let vec = prometheus::IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.register(&vec)?;
        Ok(vec)
    }

    /// Runs `f` before every scrape (a layer copies the figures it keeps in its own
    /// atomics into its families).
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        self.inner.scrapes.lock().push(Box::new(f));
    }

    /// The text exposition format, with every figure read now.
    pub fn render(&self) -> String {
        // Callbacks are registered at start; the lock is only taken here and there.
        for f in self.inner.scrapes.lock().iter() {
            f();
        }
        self.inner.process.update();
        let families = self.inner.registry.gather();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Brings a Prometheus counter up to a monotonic source value.
pub fn catch_up(counter: &IntCounter, value: u64) {
    let have = counter.get();
    if value > have {
        counter.inc_by(value - have);
    }
}

/// Reads an atomic counter.
pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// CPU, memory and descriptors of this process.
struct ProcessFigures {
    cpu: prometheus::Counter,
    rss: IntGauge,
    fds: IntGauge,
}

impl ProcessFigures {
    fn new(registry: &Registry) -> Result<ProcessFigures, Error> {
        let cpu = prometheus::Counter::new(
            "strowger_process_cpu_seconds_total",
            "CPU time of the server process (user + system)",
        )?;
        let rss = IntGauge::new("strowger_process_resident_memory_bytes", "Resident memory")?;
        let fds = IntGauge::new("strowger_process_open_fds", "Open file descriptors")?;
        registry.register(Box::new(cpu.clone()))?;
        registry.register(Box::new(rss.clone()))?;
        registry.register(Box::new(fds.clone()))?;
        Ok(ProcessFigures { cpu, rss, fds })
    }

    fn update(&self) {
        let (cpu, rss, fds) = process_figures();
        let have = self.cpu.get();
        if cpu > have {
            self.cpu.inc_by(cpu - have);
        }
        self.rss.set(rss as i64);
        self.fds.set(fds as i64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Dir {
        In,
        Out,
    }
    crate::label!(Dir, "direction", In = "in", Out = "out");

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Class {
        Ok,
        Failed,
    }
    crate::label!(Class, "class", Ok = "2xx", Failed = "other");

    #[test]
    fn families_render_with_their_label_values() {
        let t = Telemetry::new().unwrap();
        let c = t.counters::<Dir>("x_total", "X").unwrap();
        let c2 = t.counters2::<Dir, Class>("y_total", "Y").unwrap();
        c.inc(Dir::Out);
        c.catch_up(Dir::In, 5);
        c.catch_up(Dir::In, 3); // monotonic: never goes down
        c2.inc(Dir::In, Class::Failed);
        let text = t.render();
        assert!(text.contains("x_total{direction=\"in\"} 5"), "{text}");
        assert!(text.contains("x_total{direction=\"out\"} 1"), "{text}");
        assert!(
            text.contains("y_total{class=\"other\",direction=\"in\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("y_total{class=\"2xx\",direction=\"out\"} 0"),
            "{text}"
        );
        assert!(text.contains("strowger_process_open_fds"), "{text}");
        assert!(
            t.counters::<Dir>("x_total", "again").is_err(),
            "a name is registered once"
        );
    }
}
