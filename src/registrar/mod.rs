//! The registrar (RFC 3261 section 10) and its location service.
//!
//! Owns: REGISTER processing after authentication (10.3 steps 4-8), the bindings of every
//! address of record, their expiry, and their storage (`SqliteStore` embedded, `RedisStore`
//! shared between nodes). Must not touch: transports, transactions, authentication, the
//! decision whether an AOR is ours (the caller makes it), configuration loading.
//!
//! Every binding lives in an in-memory cache (`lookup` never waits on disk or network);
//! the store is the durability layer, written before the 200 goes out and read once at
//! start-up, so registrations survive a restart, even kill -9.
//!
//! With a shared store (Redis) other nodes write too: a phone registers on one node and
//! is called through another. The registrar then follows the store's change notifications
//! (`BindingStore::watch`): a sync task re-reads each AOR another node changed and installs
//! it into the cache like a REGISTER would, and re-reads everything when notifications may
//! have been lost. The cache thus lags the store by one notification round trip.
//!
//! Reachability (`keepalive`): contacts that stopped answering the keep-alive OPTIONS are
//! marked unreachable in memory only (never in the store: it is this node's view of the
//! network, and a restart simply starts from "reachable"). `lookup` and
//! `binding_for_contact` skip them until they answer again or REGISTER again.
//!
//! Config keys (`[registrar]`: [`RegistrarSection`], checked in `config.rs`; wired by the
//! server):
//! - `registrar.min_expires` (60): shorter non-zero requests get 423 (10.3 step 7).
//! - `registrar.max_expires` (3600): longer requests are shortened to it.
//! - `registrar.default_expires` (3600): for a Contact with no expires at all.
//! - `registrar.store` = "embedded" (default) | "redis".
//! - `storage.dir` (`data/`): where the embedded store keeps `registrations.sqlite`.
//! - `redis.url`: the Redis server of `registrar.store = "redis"`.
//! - `registrar.keepalive_interval_s` (0 = off): see `keepalive`.

mod config;
mod contact;
mod hooks;
mod keepalive;
mod metrics;
mod redis_store;
mod sqlite;
mod store;

pub use config::{RegistrarSection, RegistrarStore};
pub use contact::{
    parse_contacts, parse_delta_seconds, parse_qvalue, same_uri, ContactError, ContactSet,
    ContactSpec,
};
pub use hooks::LocationService;
pub use keepalive::{Keepalive, KeepaliveConfig, KeepaliveStats};
pub use metrics::BindingEvent;
pub use redis_store::RedisStore;
pub use sqlite::SqliteStore;
pub use store::{Binding, BindingStore, BoxFuture, StoreError, StoreEvent, StoreEvents};

use crate::sip::{new_tag, Request, Response, Uri};
use crate::transport::TransportKind;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Registrar policy (RFC 3261 10.3 step 7 leaves the numbers to the registrar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarConfig {
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
    /// Bindings one address of record may have (0: no bound).
    pub max_contacts: usize,
}

impl Default for RegistrarConfig {
    /// The defaults of `[registrar]` (one set of defaults for the file and the layer).
    fn default() -> RegistrarConfig {
        RegistrarSection::default().policy()
    }
}

/// Where a REGISTER came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterSource {
    pub transport: TransportKind,
    pub addr: SocketAddr,
    /// The TCP connection it arrived on (`ConnectionId.0`).
    pub connection: Option<u64>,
}

/// Counters of what the registrar did, for metrics and tests.
#[derive(Debug, Default)]
pub struct RegistrarStats {
    /// New bindings.
    pub registered: AtomicU64,
    /// Existing bindings rewritten by a REGISTER.
    pub refreshed: AtomicU64,
    /// Bindings removed by a REGISTER (expires 0 or `*`).
    pub removed: AtomicU64,
    /// Bindings that lapsed.
    pub expired: AtomicU64,
    /// Store writes that failed (each answered 500).
    pub store_errors: AtomicU64,
    /// REGISTERs refused with 503 for `max_contacts`.
    pub too_many_contacts: AtomicU64,
}

/// How many locks serialize REGISTERs: two REGISTERs of one AOR run one after the other
/// (read, decide, write the store, update the cache); different AORs rarely share one.
const LOCK_STRIPES: usize = 64;

struct Inner {
    cfg: RegistrarConfig,
    store: Arc<dyn BindingStore>,
    cache: RwLock<HashMap<String, Vec<Binding>>>,
    /// Contact URI -> AOR, so that a request to a registered contact can be sent where the
    /// REGISTER came from (NAT: received/rport, the TCP connection). Kept with `cache`.
    by_contact: RwLock<HashMap<String, String>>,
    count: AtomicUsize,
    /// (expires_at, aor) of every binding written; stale entries are harmless (the expiry
    /// pass re-checks the AOR).
    due: Mutex<BTreeSet<(u64, String)>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    stats: RegistrarStats,
    /// A store expiry pass failed: retry it on the next tick even when nothing is due.
    store_dirty: std::sync::atomic::AtomicBool,
    /// Some binding was ever registered over a connection that ends it (WebSocket, or an
    /// RFC 5626 flow with `reg-id`): until then a closed connection needs no look.
    flow_bindings: std::sync::atomic::AtomicBool,
    /// Per lock stripe, how many REGISTERs this node applied: a full re-read of a shared
    /// store compares them to know which AORs may be newer in the cache than in its
    /// snapshot.
    writes: Vec<AtomicU64>,
    /// Contact URI -> when (unix seconds) it was found unreachable (a keep-alive ping
    /// timed out). Memory only; an entry exists only for a bound contact. Lock order:
    /// `cache`, then `by_contact`, then this one, never the other way round.
    unreachable: Mutex<HashMap<String, u64>>,
    /// Dropped with the last registrar clone, which ends the sync task even while no
    /// notification arrives.
    _sync_stop: tokio::sync::oneshot::Sender<()>,
}

/// The registrar: cheap to clone, shared by every task that handles REGISTER or looks
/// bindings up.
#[derive(Clone)]
pub struct Registrar {
    inner: Arc<Inner>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 10.3 step 7: an update from a known Call-ID whose CSeq is not above the stored one;
/// the whole request fails.
struct OutOfOrder;

impl Registrar {
    /// Loads every stored binding into the cache and starts the expiry task, and for a
    /// shared store the task that follows other nodes' writes. Needs a tokio runtime; the
    /// tasks end when the last clone of the registrar is dropped.
    pub async fn start(
        cfg: RegistrarConfig,
        store: Arc<dyn BindingStore>,
    ) -> Result<Registrar, StoreError> {
        // Subscribe before reading: a change made between the read and the subscription
        // would otherwise never reach the cache.
        let events = if store.shared() {
            store.watch().await
        } else {
            None
        };
        let now = unix_now();
        let mut cache: HashMap<String, Vec<Binding>> = HashMap::new();
        let mut due = BTreeSet::new();
        let mut count = 0;
        for b in store.load_all().await? {
            if b.expires_at <= now {
                continue; // lapsed while we were down; the first expiry pass deletes it
            }
            due.insert((b.expires_at, b.aor.clone()));
            count += 1;
            cache.entry(b.aor.clone()).or_default().push(b);
        }
        // Lapsed while we were down: gone from the store before anyone asks.
        store.remove_expired(now).await?;
        let by_contact = cache
            .values()
            .flatten()
            .map(|b| (b.contact.clone(), b.aor.clone()))
            .collect();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let inner = Arc::new(Inner {
            cfg,
            store,
            cache: RwLock::new(cache),
            by_contact: RwLock::new(by_contact),
            count: AtomicUsize::new(count),
            due: Mutex::new(due),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            stats: RegistrarStats::default(),
            store_dirty: std::sync::atomic::AtomicBool::new(false),
            flow_bindings: std::sync::atomic::AtomicBool::new(false),
            writes: (0..LOCK_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            unreachable: Mutex::new(HashMap::new()),
            _sync_stop: stop_tx,
        });
        tokio::spawn(expiry_task(Arc::downgrade(&inner)));
        if let Some(events) = events {
            tokio::spawn(sync_task(Arc::downgrade(&inner), events, stop_rx));
        }
        Ok(Registrar { inner })
    }

    pub fn config(&self) -> &RegistrarConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> &RegistrarStats {
        &self.inner.stats
    }

    /// Live, reachable bindings of `aor`, highest q first, then the most recently written
    /// first. A contact marked unreachable (see [`mark_reachable`](Self::mark_reachable))
    /// is left out: ringing a phone that does not answer pings only delays the others.
    pub fn lookup(&self, aor: &str) -> Vec<Binding> {
        let now = unix_now();
        let mut out: Vec<Binding> = match self.inner.cache.read().get(aor) {
            Some(list) => list
                .iter()
                .filter(|b| b.expires_at > now)
                .cloned()
                .collect(),
            None => return Vec::new(),
        };
        {
            let unreachable = self.inner.unreachable.lock();
            if !unreachable.is_empty() {
                out.retain(|b| !unreachable.contains_key(&b.contact));
            }
        }
        sort_bindings(&mut out);
        out
    }

    /// Every live binding (for the CLI and admin API), by AOR, reachable or not.
    pub fn bindings(&self) -> Vec<Binding> {
        let now = unix_now();
        let mut out: Vec<Binding> = self
            .inner
            .cache
            .read()
            .values()
            .flatten()
            .filter(|b| b.expires_at > now)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.aor.cmp(&b.aor));
        out
    }

    /// The live, reachable binding whose Contact is `contact` (as registered), if any:
    /// where a request to that device must go.
    pub fn binding_for_contact(&self, contact: &str) -> Option<Binding> {
        if !self.is_reachable(contact) {
            return None;
        }
        self.inner.binding(contact, unix_now())
    }

    /// Records whether `contact` answers keep-alive pings. Unreachable contacts are left
    /// out of `lookup` and `binding_for_contact` until marked reachable again or
    /// refreshed by a REGISTER. A contact that is not bound is ignored (no mark outlives
    /// its binding).
    pub fn mark_reachable(&self, contact: &str, reachable: bool) {
        self.inner.mark(contact, reachable, unix_now(), |_| true);
    }

    /// False while `contact` is marked unreachable; true otherwise (also when not bound).
    pub fn is_reachable(&self, contact: &str) -> bool {
        !self.inner.unreachable.lock().contains_key(contact)
    }

    /// How many bound contacts are marked unreachable now.
    pub fn unreachable_count(&self) -> usize {
        self.inner.unreachable.lock().len()
    }

    /// How many bindings the cache holds (lapsed ones leave within a second).
    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Handles an authenticated REGISTER for `aor` (canonical `sip:user@host`, as
    /// `Uri::aor` gives it): RFC 3261 10.3 steps 5-8. The answer is final: 200 with the
    /// current bindings, 400 naming a defect, 423 with Min-Expires, or 500 when the
    /// request is out of order or the store failed (then nothing changed).
    pub async fn register(&self, req: &Request, source: RegisterSource, aor: &str) -> Response {
        let cfg = &self.inner.cfg;
        let set = match parse_contacts(&req.headers, cfg.default_expires) {
            Ok(s) => s,
            Err(e) => return final_response(req, 400, Some(e.to_string())),
        };
        // 10.3 step 7: a non-zero interval below our minimum gets 423 and Min-Expires.
        if let ContactSet::List(list) = &set {
            if list
                .iter()
                .any(|c| c.expires > 0 && c.expires < cfg.min_expires)
            {
                let mut r = final_response(req, 423, None);
                r.headers.push("Min-Expires", cfg.min_expires.to_string());
                return r;
            }
        }

        let stripe = stripe_of(aor);
        let _guard = self.inner.locks[stripe].lock().await;
        let now = unix_now();
        let current = match self.current(aor, now).await {
            Ok(c) => c,
            Err(e) => return self.store_failed(req, e),
        };
        let path: Vec<String> = req.headers.list("Path");
        let template = Binding {
            aor: aor.to_owned(),
            contact: String::new(),
            q: 1.0,
            expires_at: 0,
            call_id: req.base.call_id.clone(),
            cseq: req.base.cseq.seq,
            path: path.clone(),
            instance: None,
            reg_id: None,
            source: crate::transport::peer_text(source.transport, &source.addr),
            connection: source.connection,
            user_agent: req.headers.get("User-Agent").map(str::to_owned),
            updated_at: now,
        };
        let outcome = apply(&current, &set, &template, cfg.max_expires, now);
        let (new, counts) = match outcome {
            Ok(x) => x,
            Err(OutOfOrder) => {
                return final_response(
                    req,
                    500,
                    Some("Out-of-order REGISTER: CSeq not above the stored one".into()),
                )
            }
        };

        // A bound on the bindings of one address: each is a leg of every call to it (one
        // INVITE to a fleet of 2,500 would be 2,500 datagrams). Refused like Kamailio's
        // max_contacts; removing or refreshing bindings is always allowed.
        if cfg.max_contacts > 0 && new.len() > cfg.max_contacts && new.len() > current.len() {
            self.inner
                .stats
                .too_many_contacts
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                aor,
                contacts = new.len(),
                max = cfg.max_contacts,
                "REGISTER refused: too many contacts"
            );
            return final_response(req, 503, Some("Too many registered contacts".into()));
        }
        if !matches!(set, ContactSet::Query) || current.len() != new.len() {
            // The store first: a 200 promises the binding survives a restart.
            if let Err(e) = self.inner.store.replace_aor(aor, &new).await {
                return self.store_failed(req, e);
            }
        }
        self.inner.install(aor, new.clone());
        self.inner.writes[stripe].fetch_add(1, Ordering::Relaxed);
        // A phone that just registered is alive, whatever its last ping said.
        if let ContactSet::List(specs) = &set {
            let mut unreachable = self.inner.unreachable.lock();
            if !unreachable.is_empty() {
                // The text form is the one `apply` stored as the binding's contact.
                for spec in specs.iter().filter(|s| s.expires > 0) {
                    let contact = spec.uri.to_text();
                    if unreachable.remove(&contact).is_some() {
                        tracing::info!(aor, %contact, "contact registered again; reachable");
                    }
                }
            }
        }
        let st = &self.inner.stats;
        st.registered.fetch_add(counts.added, Ordering::Relaxed);
        st.refreshed.fetch_add(counts.refreshed, Ordering::Relaxed);
        st.removed.fetch_add(counts.removed, Ordering::Relaxed);

        // 10.3 step 8: the 200 lists every current binding with its remaining time.
        let mut resp = final_response(req, 200, None);
        let mut listed = new;
        sort_bindings(&mut listed);
        for b in &listed {
            resp.headers.push("Contact", contact_value(b, now));
        }
        // RFC 3327 5.3: the registrar echoes the Path it stored when the UA supports it.
        if !path.is_empty() && supports(req, "path") {
            for p in &path {
                resp.headers.push("Path", p.clone());
            }
        }
        resp.headers.push("Date", http_date(unix_now()));
        resp
    }

    /// A connection closed: the bindings registered over it that can be reached only
    /// through it go (RFC 7118 5: a WebSocket client's `.invalid` Contact; RFC 5626 4.4.1:
    /// an outbound flow, a binding with `reg-id`). Other TCP bindings stay: a phone
    /// without outbound is reached by a new connection to its Contact. Returns how many
    /// went.
    pub async fn connection_closed(&self, source: RegisterSource) -> usize {
        let Some(id) = source.connection else {
            return 0;
        };
        // Most servers never see such a binding: no scan of every binding per closed TCP
        // connection then.
        if !self.inner.flow_bindings.load(Ordering::Relaxed) {
            return 0;
        }
        let text = crate::transport::peer_text(source.transport, &source.addr);
        let websocket = source.transport.is_websocket();
        let on_flow = |b: &Binding| {
            b.connection == Some(id) && b.source == text && (websocket || b.reg_id.is_some())
        };
        let aors: Vec<String> = self
            .inner
            .cache
            .read()
            .iter()
            .filter(|(_, list)| list.iter().any(on_flow))
            .map(|(aor, _)| aor.clone())
            .collect();
        let mut removed = 0;
        for aor in aors {
            let stripe = stripe_of(&aor);
            let _guard = self.inner.locks[stripe].lock().await;
            let now = unix_now();
            let Ok(current) = self.current(&aor, now).await else {
                continue;
            };
            let new: Vec<Binding> = current.iter().filter(|b| !on_flow(b)).cloned().collect();
            let gone = current.len() - new.len();
            if gone == 0 {
                continue;
            }
            if let Err(e) = self.inner.store.replace_aor(&aor, &new).await {
                tracing::warn!(aor, error = %e, "registrar: removing the bindings of a closed connection failed");
                continue;
            }
            self.inner.install(&aor, new);
            self.inner.writes[stripe].fetch_add(1, Ordering::Relaxed);
            self.inner
                .stats
                .removed
                .fetch_add(gone as u64, Ordering::Relaxed);
            tracing::info!(aor, transport = %source.transport, peer = %source.addr, bindings = gone, "connection closed; its bindings removed");
            removed += gone;
        }
        removed
    }

    /// The AOR's live bindings before this REGISTER: from the store when other nodes
    /// share it (they may have changed it), otherwise from the cache.
    async fn current(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError> {
        let mut list = if self.inner.store.shared() {
            self.inner.store.load_aor(aor).await?
        } else {
            self.inner
                .cache
                .read()
                .get(aor)
                .cloned()
                .unwrap_or_default()
        };
        list.retain(|b| b.expires_at > now);
        Ok(list)
    }

    fn store_failed(&self, req: &Request, e: StoreError) -> Response {
        self.inner
            .stats
            .store_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "registrar store failed; REGISTER answered 500");
        final_response(req, 500, Some("Location service unavailable".into()))
    }
}

impl Inner {
    /// The live binding of `contact`, reachable or not.
    fn binding(&self, contact: &str, now: u64) -> Option<Binding> {
        let aor = self.by_contact.read().get(contact).cloned()?;
        self.cache
            .read()
            .get(&aor)?
            .iter()
            .find(|b| b.contact == contact && b.expires_at > now)
            .cloned()
    }

    /// Sets or clears the unreachable mark of a bound contact; says whether it changed.
    /// A mark is set only while `still(binding)` holds for the contact's live binding:
    /// the keep-alive passes "not registered again since the ping left", and the check
    /// and the mark happen under the cache and index locks, so that a REGISTER (which
    /// installs, then clears marks) either is seen or clears the mark after it.
    fn mark(
        &self,
        contact: &str,
        reachable: bool,
        now: u64,
        still: impl FnOnce(&Binding) -> bool,
    ) -> bool {
        if reachable {
            return self.unreachable.lock().remove(contact).is_some();
        }
        // Lock order: cache, by_contact, unreachable (as the expiry pass takes them).
        let cache = self.cache.read();
        let index = self.by_contact.read();
        let Some(aor) = index.get(contact) else {
            return false;
        };
        let live = cache.get(aor).and_then(|l| {
            l.iter()
                .find(|b| b.contact == contact && b.expires_at > now)
        });
        if !live.is_some_and(still) {
            return false;
        }
        let mut unreachable = self.unreachable.lock();
        if unreachable.contains_key(contact) {
            return false;
        }
        unreachable.insert(contact.to_owned(), now);
        true
    }

    /// Puts the AOR's new binding set into the cache and queues its expiries.
    fn install(&self, aor: &str, list: Vec<Binding>) {
        if list
            .iter()
            .any(|b| b.connection.is_some() && (b.reg_id.is_some() || b.source.starts_with("ws")))
        {
            self.flow_bindings.store(true, Ordering::Relaxed);
        }
        {
            let mut due = self.due.lock();
            for b in &list {
                due.insert((b.expires_at, aor.to_owned()));
            }
        }
        let new_contacts: Vec<String> = list.iter().map(|b| b.contact.clone()).collect();
        let mut cache = self.cache.write();
        let new_len = list.len();
        let old = if list.is_empty() {
            cache.remove(aor)
        } else {
            cache.insert(aor.to_owned(), list)
        };
        drop(cache);
        let old_len = old.as_ref().map_or(0, |l| l.len());
        {
            let mut index = self.by_contact.write();
            let mut gone = Vec::new();
            for b in old.iter().flatten() {
                if index.get(&b.contact).is_some_and(|a| a == aor) {
                    index.remove(&b.contact);
                    if !new_contacts.contains(&b.contact) {
                        gone.push(b.contact.as_str());
                    }
                }
            }
            for c in new_contacts {
                index.insert(c, aor.to_owned());
            }
            // No mark outlives its binding (lock order: by_contact, then unreachable).
            if !gone.is_empty() {
                let mut unreachable = self.unreachable.lock();
                for c in gone {
                    unreachable.remove(c);
                }
            }
        }
        if new_len >= old_len {
            self.count.fetch_add(new_len - old_len, Ordering::Relaxed);
        } else {
            self.count.fetch_sub(old_len - new_len, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Counts {
    added: u64,
    refreshed: u64,
    removed: u64,
}

/// Applies the REGISTER to the AOR's current bindings (10.3 steps 6 and 7, RFC 5626 6);
/// returns the new set, or the refusal that aborts the whole request.
fn apply(
    current: &[Binding],
    set: &ContactSet,
    template: &Binding,
    max_expires: u32,
    now: u64,
) -> Result<(Vec<Binding>, Counts), OutOfOrder> {
    let mut counts = Counts::default();
    // Updates from a Call-ID we know must be newer than what they replace; otherwise the
    // request is older than one we already applied and must not undo it (10.3 step 7).
    let in_order = |b: &Binding| b.call_id != template.call_id || template.cseq > b.cseq;
    match set {
        ContactSet::Query => Ok((current.to_vec(), counts)),
        ContactSet::Wildcard => {
            if !current.iter().all(in_order) {
                return Err(OutOfOrder);
            }
            counts.removed = current.len() as u64;
            Ok((Vec::new(), counts))
        }
        ContactSet::List(specs) => {
            // (binding, None when it is an old one, Some(refreshed) when this request
            // wrote it): a Contact listed twice replaces its own earlier entry, with no
            // CSeq check and without being counted twice.
            let mut next: Vec<(Binding, Option<bool>)> =
                current.iter().cloned().map(|b| (b, None)).collect();
            for spec in specs {
                let mut matched_old = 0u64;
                let mut i = 0;
                while i < next.len() {
                    let (b, fresh) = &next[i];
                    if same_binding(b, spec) {
                        match fresh {
                            None if !in_order(b) => return Err(OutOfOrder),
                            None => matched_old += 1,
                            Some(true) => {
                                counts.refreshed -= 1;
                                matched_old += 1;
                            }
                            Some(false) => counts.added -= 1,
                        }
                        next.remove(i);
                    } else {
                        i += 1;
                    }
                }
                if spec.expires == 0 {
                    counts.removed += matched_old;
                    continue;
                }
                if matched_old > 0 {
                    counts.refreshed += 1;
                    // Several old bindings folded into one (same device, new URI).
                    counts.removed += matched_old - 1;
                } else {
                    counts.added += 1;
                }
                let expires = spec.expires.min(max_expires);
                let mut b = template.clone();
                b.contact = spec.uri.to_text();
                b.q = spec.q;
                b.expires_at = now + expires as u64;
                b.instance = spec.instance.clone();
                b.reg_id = spec.reg_id;
                next.push((b, Some(matched_old > 0)));
            }
            let out: Vec<Binding> = next.into_iter().map(|(b, _)| b).collect();
            Ok((out, counts))
        }
    }
}

/// Whether a stored binding is the one a Contact of the REGISTER speaks about: the same
/// device (RFC 5626 6: same `+sip.instance` and `reg-id`) or the same URI (RFC 3261 10.3
/// step 7, compared by 19.1.4).
fn same_binding(b: &Binding, spec: &ContactSpec) -> bool {
    if spec.instance.is_some() && b.instance == spec.instance && b.reg_id == spec.reg_id {
        return true;
    }
    match Uri::parse(&b.contact) {
        Ok(u) => same_uri(&u, &spec.uri),
        Err(_) => b.contact == spec.uri.to_text(),
    }
}

fn sort_bindings(list: &mut [Binding]) {
    list.sort_by(|a, b| {
        b.q.partial_cmp(&a.q)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.updated_at.cmp(&a.updated_at))
    });
}

fn supports(req: &Request, option: &str) -> bool {
    req.headers
        .list("Supported")
        .iter()
        .any(|o| o.eq_ignore_ascii_case(option))
}

/// `<uri>;expires=N;q=Q` plus the device identity of RFC 5626.
fn contact_value(b: &Binding, now: u64) -> String {
    let mut s = format!(
        "<{}>;expires={};q={}",
        b.contact,
        b.expires_at.saturating_sub(now),
        format_q(b.q)
    );
    if let Some(i) = &b.instance {
        s.push_str(&format!(";+sip.instance=\"{i}\""));
    }
    if let Some(r) = b.reg_id {
        s.push_str(&format!(";reg-id={r}"));
    }
    s
}

/// A qvalue as the grammar wants it: at most three decimals, no trailing zeros.
fn format_q(q: f32) -> String {
    let thousandths = (q.clamp(0.0, 1.0) * 1000.0).round() as u32;
    if thousandths == 1000 {
        return "1".into();
    }
    let s = format!("0.{thousandths:03}");
    let s = s.trim_end_matches('0');
    if s == "0." {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// A final response to the REGISTER with a To tag (the registrar is the UAS).
fn final_response(req: &Request, status: u16, reason: Option<String>) -> Response {
    let mut r = req.response(status);
    if let Some(reason) = reason {
        r = r.with_reason(reason);
    }
    r.set_to_tag(&new_tag());
    r
}

fn stripe_of(aor: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    aor.hash(&mut h);
    (h.finish() as usize) % LOCK_STRIPES
}

/// RFC 1123 date for the Date header (RFC 3261 20.17), e.g. `Sat, 13 Nov 2010 23:29:00 GMT`.
fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar, computed
    // in 400-year eras).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Removes lapsed bindings from the cache and the store, once a second, until the
/// registrar is dropped.
async fn expiry_task(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        expire_once(&inner, unix_now()).await;
    }
}

async fn expire_once(inner: &Inner, now: u64) {
    let aors: Vec<String> = {
        let mut due = inner.due.lock();
        let mut aors = Vec::new();
        while let Some(first) = due.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, aor)) = due.pop_first() {
                aors.push(aor);
            }
        }
        aors
    };
    if aors.is_empty() && !inner.store_dirty.load(Ordering::Relaxed) {
        return;
    }
    let mut expired = 0u64;
    for aor in &aors {
        // Same lock as REGISTER, so a REGISTER in flight does not reinstate what we drop.
        let _guard = inner.locks[stripe_of(aor)].lock().await;
        let mut cache = inner.cache.write();
        if let Some(list) = cache.get_mut(aor) {
            let before = list.len();
            {
                let mut index = inner.by_contact.write();
                let mut unreachable = inner.unreachable.lock();
                for b in list.iter().filter(|b| b.expires_at <= now) {
                    if index.get(&b.contact).is_some_and(|a| a == aor) {
                        index.remove(&b.contact);
                        unreachable.remove(&b.contact);
                    }
                }
            }
            list.retain(|b| b.expires_at > now);
            let gone = before - list.len();
            if list.is_empty() {
                cache.remove(aor);
            }
            expired += gone as u64;
            inner.count.fetch_sub(gone, Ordering::Relaxed);
        }
    }
    inner.stats.expired.fetch_add(expired, Ordering::Relaxed);
    match inner.store.remove_expired(now).await {
        Ok(_) => inner.store_dirty.store(false, Ordering::Relaxed),
        Err(e) => {
            // The rows stay until a later pass; start-up filters lapsed bindings anyway.
            tracing::warn!(error = %e, "registrar: removing lapsed bindings from the store failed");
            inner.store_dirty.store(true, Ordering::Relaxed);
        }
    }
}

/// After a failed re-read, how long to wait before trying everything again.
const RESYNC_RETRY: Duration = Duration::from_secs(1);

/// Applies other nodes' changes to the cache until the registrar is dropped.
async fn sync_task(
    inner: Weak<Inner>,
    mut events: StoreEvents,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // A failed re-read loses a change; only a full re-read is sure to make up for it.
    let mut resync_pending = false;
    loop {
        let event = tokio::select! {
            _ = &mut stop => return,
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => return, // the store stopped watching
            },
            _ = tokio::time::sleep(RESYNC_RETRY), if resync_pending => StoreEvent::Resync,
        };
        let Some(inner) = inner.upgrade() else { return };
        let result = match &event {
            StoreEvent::Changed(aor) => reload_aor(&inner, aor).await,
            StoreEvent::Resync => resync(&inner).await,
        };
        match result {
            Ok(()) => {
                if event == StoreEvent::Resync {
                    resync_pending = false;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "registrar: reading another node's change failed; re-reading everything");
                resync_pending = true;
            }
        }
    }
}

/// Replaces the cached bindings of `aor` with the store's.
async fn reload_aor(inner: &Inner, aor: &str) -> Result<(), StoreError> {
    // The REGISTER lock: a REGISTER of ours in flight must not be overwritten by an older
    // read, nor overwrite a newer one.
    let _guard = inner.locks[stripe_of(aor)].lock().await;
    let mut list = inner.store.load_aor(aor).await?;
    let now = unix_now();
    list.retain(|b| b.expires_at > now);
    inner.install(aor, list);
    Ok(())
}

/// Makes the cache equal to the store: every stored AOR installed, every cached AOR the
/// store no longer has removed.
async fn resync(inner: &Inner) -> Result<(), StoreError> {
    // Taken before the read: a stripe whose count moved had a REGISTER of ours that the
    // snapshot may predate; those AORs are read again under their lock. Others' changes
    // after the snapshot arrive as notifications queued behind this re-read.
    let before: Vec<u64> = inner
        .writes
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .collect();
    let mut stored: HashMap<String, Vec<Binding>> = HashMap::new();
    for b in inner.store.load_all().await? {
        stored.entry(b.aor.clone()).or_default().push(b);
    }
    let mut aors: BTreeSet<String> = inner.cache.read().keys().cloned().collect();
    aors.extend(stored.keys().cloned());
    for aor in aors {
        let stripe = stripe_of(&aor);
        let _guard = inner.locks[stripe].lock().await;
        let mut list = if inner.writes[stripe].load(Ordering::Relaxed) != before[stripe] {
            inner.store.load_aor(&aor).await?
        } else {
            stored.remove(&aor).unwrap_or_default()
        };
        let now = unix_now();
        list.retain(|b| b.expires_at > now);
        inner.install(&aor, list);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
