//! The notifier task: owns every publication and subscription, answers PUBLISH and
//! SUBSCRIBE, sends NOTIFY, follows the call watch for the dialog event package, and
//! expires what lapses. One task, so no lock guards presence state.

use super::body::{self, DialogView};
use super::store::{
    PresenceEvent, PresenceEvents, PresenceStore, RemoteCall, StoredPublication, StoredSubscription,
};
use super::{bump, parse_event, respond, Inner, Package, PublishResult};
use crate::dialog::watch::{CallChange, CallPhase};
use crate::dialog::{Dialog, DialogParts, DialogState};
use crate::sip::{new_tag, Method, NameAddr, Request, Uri};
use crate::transaction::{ClientEvent, ServerTransaction};
use crate::transport::{ConnectionId, ListenAddr, Target};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// How long an ended call stays in dialog-info documents (as `terminated`), so that a
/// subscriber whose NOTIFY was coalesced still sees how it ended.
const KEEP_TERMINATED: Duration = Duration::from_secs(5);

pub(crate) enum Ev {
    Publish(ServerTransaction, Request),
    /// Authorised by the script; the package already checked.
    Subscribe(ServerTransaction, Request, Package),
    InDialog(ServerTransaction, Request),
    /// The script routed this SUBSCRIBE to another server (`relay`).
    SubscribeRoute(ServerTransaction, Request, Package, String),
    /// A client transaction of a relayed subscription reported.
    RelayClient {
        id: u64,
        event: ClientEvent,
    },
    NotifyDone {
        key: String,
        seq: u32,
        event: ClientEvent,
    },
    Stop,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Instant of a unix time (seconds), for timers.
fn instant_of(unix: u64) -> Instant {
    Instant::now() + Duration::from_secs(unix.saturating_sub(unix_now()))
}

/// A publication, kept under its stable id (`StoredPublication::id`).
struct Publication {
    /// The current entity-tag.
    etag: String,
    resource: String,
    package: Package,
    content_type: String,
    body: String,
    expires_at: u64,
}

struct Sub {
    package: Package,
    event_id: Option<String>,
    resource: String,
    dialog: Dialog,
    contact: String,
    expires_at: u64,
    version: u32,
    /// CSeq of the NOTIFY awaiting its answer: one at a time per subscriber, so they
    /// arrive in order and a slow subscriber gets coalesced state rather than a queue.
    in_flight: Option<u32>,
    /// The state changed since the last NOTIFY.
    dirty: bool,
    last_sent: Option<Instant>,
    /// Ending: the reason of the `terminated` NOTIFY (RFC 6665 4.1.3 / 4.2.2).
    ending: Option<&'static str>,
    /// The `terminated` NOTIFY went out: the subscription ends with its answer.
    final_sent: bool,
}

impl Sub {
    fn stored(&self, key: &str, owner: &str) -> StoredSubscription {
        let d = &self.dialog;
        StoredSubscription {
            key: key.to_owned(),
            package: self.package.as_str().to_owned(),
            event_id: self.event_id.clone(),
            resource: self.resource.clone(),
            call_id: d.call_id().to_owned(),
            local_tag: d.local_tag().to_owned(),
            remote_tag: d.remote_tag().to_owned(),
            local_uri: d.local_uri_text().to_owned(),
            remote_uri: d.remote_uri_text().to_owned(),
            remote_target: d.remote_target_text().to_owned(),
            route_set: d.route_set().map(str::to_owned).collect(),
            local_seq: d.local_seq,
            flow: crate::transport::peer_text(d.flow.transport, &d.flow.addr),
            connection: d.flow.connection.map(ConnectionId::get),
            contact: self.contact.clone(),
            expires_at: self.expires_at,
            version: self.version,
            owner: owner.to_owned(),
        }
    }

    /// A stored subscription as this node's: its CSeq and version stepped well past what
    /// the last writer may have sent without recording it (so the subscriber never sees
    /// CSeq go back), and due for a NOTIFY with the current state (which may have changed
    /// while nobody here served it).
    fn adopt(s: StoredSubscription) -> Option<(String, Sub)> {
        let (key, mut sub) = Sub::restore(s)?;
        sub.dialog.local_seq = sub.dialog.local_seq.saturating_add(100);
        sub.version = sub.version.saturating_add(100);
        sub.dirty = true;
        Some((key, sub))
    }

    fn restore(s: StoredSubscription) -> Option<(String, Sub)> {
        let package = Package::from_name(&s.package)?;
        let flow: ListenAddr = s.flow.parse().ok()?;
        // What was stored must still parse (a hand-edited or damaged store is skipped).
        NameAddr::parse(&s.local_uri).ok()?;
        NameAddr::parse(&s.remote_uri).ok()?;
        Uri::parse(&s.remote_target).ok()?;
        let route_set: Vec<String> = s
            .route_set
            .iter()
            .filter_map(|r| NameAddr::parse(r).ok().map(|_| r.clone()))
            .collect();
        let dialog = Dialog::from_parts(
            &DialogParts {
                call_id: &s.call_id,
                local_tag: &s.local_tag,
                remote_tag: &s.remote_tag,
                local_uri: &s.local_uri,
                remote_uri: &s.remote_uri,
                remote_target: &s.remote_target,
                route_set: &route_set,
            },
            s.local_seq,
            None,
            DialogState::Confirmed,
            Target {
                transport: flow.kind,
                addr: flow.addr,
                connection: s.connection.and_then(ConnectionId::new),
            },
        );
        Some((
            s.key,
            Sub {
                package,
                event_id: s.event_id,
                resource: s.resource,
                dialog,
                contact: s.contact,
                expires_at: s.expires_at,
                version: s.version,
                in_flight: None,
                dirty: false,
                last_sent: None,
                ending: None,
                final_sent: false,
            },
        ))
    }
}

/// A call as the dialog package sees it.
struct CallView {
    change: CallChange,
    /// One of this node's calls (not told by another node).
    local: bool,
    caller_aor: String,
    callee_aor: String,
    ended_at: Option<Instant>,
}

pub(crate) struct Notifier {
    inner: Arc<Inner>,
    store: Arc<dyn PresenceStore>,
    rx: mpsc::UnboundedReceiver<Ev>,
    calls_rx: Option<broadcast::Receiver<CallChange>>,
    pubs: HashMap<String, Publication>,
    subs: HashMap<String, Sub>,
    /// Subscriptions other nodes serve (shared store only).
    foreign: HashMap<String, StoredSubscription>,
    calls: HashMap<Arc<str>, CallView>,
    /// The other nodes' changes (shared store only).
    store_rx: Option<PresenceEvents>,
    /// Subscriptions the script routed to other servers.
    relays: super::relay::Relays,
    /// (package, resource) -> subscription keys: a change finds its subscribers without
    /// walking every subscription.
    index: HashMap<(Package, String), HashSet<String>>,
    /// Keys of subscriptions with a NOTIFY to send (dirty), waiting for the rate limit or
    /// for the answer to the one in flight.
    pending: HashSet<String>,
    /// The unix second of the last expiry scan: lapsed state is looked for once a second,
    /// not on every event.
    last_scan: u64,
}

pub(crate) fn sub_key(call_id: &str, local_tag: &str) -> String {
    format!("{call_id};{local_tag}")
}

/// An Expires header as delta-seconds; `Err` when present but not a number.
/// The interval a SUBSCRIBE or PUBLISH gets (RFC 6665 4.2.1.1, RFC 3903 6 step 4): what it
/// asks, or the default; below the minimum 423 with Min-Expires (0 stays 0: it ends);
/// above the maximum cut to it. Err: the answer to send instead.
fn granted_expires(
    cfg: &super::PresenceConfig,
    req: &Request,
) -> Result<u32, Box<crate::sip::Response>> {
    let Ok(asked) = expires_of(req) else {
        return Err(Box::new(
            req.response(400).with_reason("Bad Expires header"),
        ));
    };
    let expires = asked.unwrap_or(cfg.default_expires);
    if expires != 0 && expires < cfg.min_expires {
        let mut r = req.response(423);
        r.headers.push("Min-Expires", cfg.min_expires.to_string());
        return Err(Box::new(r));
    }
    Ok(expires.min(cfg.max_expires))
}

/// The Expires header's delta-seconds (RFC 3261 20.19, parsed like the registrar's).
fn expires_of(req: &Request) -> Result<Option<u32>, ()> {
    match req.headers.get("Expires") {
        None => Ok(None),
        Some(v) => crate::registrar::parse_delta_seconds(v).map(Some).ok_or(()),
    }
}

impl Notifier {
    pub(crate) fn new(
        inner: Arc<Inner>,
        store: Arc<dyn PresenceStore>,
        rx: mpsc::UnboundedReceiver<Ev>,
        calls_rx: Option<broadcast::Receiver<CallChange>>,
        pubs: Vec<StoredPublication>,
        subs: Vec<StoredSubscription>,
        store_rx: Option<PresenceEvents>,
    ) -> Notifier {
        let now = unix_now();
        let mut n = Notifier {
            inner,
            store,
            rx,
            calls_rx,
            pubs: HashMap::new(),
            subs: HashMap::new(),
            foreign: HashMap::new(),
            calls: HashMap::new(),
            store_rx,
            relays: Default::default(),
            index: HashMap::new(),
            pending: HashSet::new(),
            last_scan: 0,
        };
        for p in pubs {
            let Some(package) = Package::from_name(&p.package) else {
                continue;
            };
            if p.expires_at <= now {
                drop(n.store.remove_publication(p.key()));
                continue;
            }
            n.pubs.insert(
                p.key().to_owned(),
                Publication {
                    etag: p.etag,
                    resource: p.resource,
                    package,
                    content_type: p.content_type,
                    body: p.body,
                    expires_at: p.expires_at,
                },
            );
        }
        for s in subs {
            let key = s.key.clone();
            if s.expires_at <= now {
                drop(n.store.remove_subscription(&key));
                continue;
            }
            // Another node's (shared store): kept to take over if its subscriber comes
            // to us; it sends the NOTIFYs.
            if !s.owner.is_empty() && s.owner != n.inner.node {
                n.foreign.insert(key, s);
                continue;
            }
            // Ours: after a restart every subscriber hears the current state once.
            if let Some((key, sub)) = Sub::adopt(s) {
                n.insert_sub(key, sub);
            }
        }
        n.update_call_interest();
        n
    }

    pub(crate) fn publications(&self) -> usize {
        self.pubs.len()
    }

    pub(crate) fn subscriptions(&self) -> usize {
        self.subs.len()
    }

    pub(crate) async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                _ = &mut stop => break,
                ev = self.rx.recv() => match ev {
                    Some(Ev::Stop) | None => break,
                    Some(ev) => self.on_event(ev).await,
                },
                change = recv_call(&mut self.calls_rx) => match change {
                    CallRecv::Change(c) => {
                        self.announce(&c);
                        self.on_call(c, true);
                    }
                    CallRecv::Lagged => self.resync_calls(),
                    CallRecv::Closed => {}
                },
                ev = recv_store(&mut self.store_rx) => self.on_store_event(ev).await,
                _ = sleep_until(deadline) => {}
            }
            self.tick();
        }
        // Whatever is in flight is forgotten; the store keeps the state for the next start.
        let keys: Vec<String> = self.subs.keys().cloned().collect();
        for k in keys {
            self.remove_sub(&k);
        }
    }

    async fn on_event(&mut self, ev: Ev) {
        match ev {
            Ev::Publish(tx, req) => self.on_publish(tx, req).await,
            Ev::Subscribe(tx, req, package) => self.on_subscribe(tx, req, package).await,
            Ev::InDialog(tx, req) => self.on_in_dialog(tx, req).await,
            Ev::SubscribeRoute(tx, req, package, target) => {
                self.relays
                    .start(&self.inner, tx, req, package, target)
                    .await
            }
            Ev::RelayClient { id, event } => self.relays.on_client(&self.inner, id, event),
            Ev::NotifyDone { key, seq, event } => self.on_notify_done(key, seq, event),
            Ev::Stop => {}
        }
    }

    // ---- PUBLISH (RFC 3903) ---------------------------------------------------------

    async fn on_publish(&mut self, tx: ServerTransaction, req: Request) {
        let stats = &self.inner.stats;
        let reject = |tx: &ServerTransaction, resp: crate::sip::Response| {
            bump(&stats.publish[PublishResult::Rejected as usize]);
            respond(tx, resp);
        };
        let Some(event) = req.headers.get("Event") else {
            reject(&tx, req.response(400).with_reason("Missing Event header"));
            return;
        };
        let (name, _) = parse_event(event);
        // RFC 3903 6 step 2: a package we do not compose gets 489.
        let Some(package) = Package::from_name(&name).filter(|p| p.publishable()) else {
            let mut r = req.response(489);
            r.headers.push("Allow-Events", "presence, message-summary");
            reject(&tx, r);
            return;
        };
        // Step 1: the resource must be one of ours.
        let Some(resource) = self.inner.resource(&req) else {
            reject(
                &tx,
                req.response(404).with_reason("Not a user of this domain"),
            );
            return;
        };
        // Step 4: the interval.
        let expires = match granted_expires(&self.inner.cfg, &req) {
            Ok(e) => e,
            Err(r) => return reject(&tx, *r),
        };
        let content_type = req.headers.get("Content-Type").map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let wanted = body::content_type(package);
        // Step 5: a body must be of the package's type.
        if !req.body.is_empty() && content_type.as_deref() != Some(wanted) {
            let mut r = req.response(415);
            r.headers.push("Accept", wanted);
            reject(&tx, r);
            return;
        }
        let text = String::from_utf8_lossy(&req.body).into_owned();
        let now = unix_now();
        match req.headers.get("SIP-If-Match").map(str::trim) {
            None => {
                // Initial publication: it needs state, and removing nothing is an error.
                if req.body.is_empty() || expires == 0 {
                    reject(
                        &tx,
                        req.response(400)
                            .with_reason("Initial PUBLISH needs a body and a non-zero Expires"),
                    );
                    return;
                }
                let etag = new_tag();
                let p = Publication {
                    etag: etag.clone(),
                    resource: resource.clone(),
                    package,
                    content_type: wanted.to_owned(),
                    body: text,
                    expires_at: now + u64::from(expires),
                };
                if !self.persist_publication(&etag, &p).await {
                    reject(&tx, req.response(500).with_reason("Storage Error"));
                    return;
                }
                self.pubs.insert(etag.clone(), p);
                bump(&self.inner.stats.publish[PublishResult::Created as usize]);
                respond(&tx, ok_with_etag(&req, Some(&etag), expires));
                self.touch(package, &resource);
            }
            Some(tag) => {
                // Step 3: the entity-tag must name a publication of this resource and
                // package; else 412 Conditional Request Failed.
                let id = self
                    .pubs
                    .iter()
                    .find(|(_, p)| p.etag == tag && p.resource == resource && p.package == package)
                    .map(|(id, _)| id.clone());
                let Some((id, mut p)) = id.and_then(|id| self.pubs.remove(&id).map(|p| (id, p)))
                else {
                    bump(&self.inner.stats.publish[PublishResult::UnknownEtag as usize]);
                    respond(&tx, req.response(412));
                    return;
                };
                if expires == 0 {
                    // Removal (RFC 3903 4.5).
                    if let Err(e) = self.store.remove_publication(&id).await {
                        tracing::warn!(error = %e, "presence: store write failed");
                    }
                    bump(&self.inner.stats.publish[PublishResult::Removed as usize]);
                    respond(&tx, ok_with_etag(&req, None, 0));
                    self.touch(package, &resource);
                    return;
                }
                // Refresh (no body) or modification (body); either way a new entity-tag
                // (RFC 3903 6 step 7).
                let modified = !req.body.is_empty();
                if modified {
                    p.body = text;
                }
                p.expires_at = now + u64::from(expires);
                let etag = new_tag();
                p.etag = etag.clone();
                // One record rewritten (under its id): never the old and new at once.
                self.persist_publication(&id, &p).await;
                self.pubs.insert(id, p);
                let result = if modified {
                    PublishResult::Modified
                } else {
                    PublishResult::Refreshed
                };
                bump(&self.inner.stats.publish[result as usize]);
                respond(&tx, ok_with_etag(&req, Some(&etag), expires));
                if modified {
                    self.touch(package, &resource);
                }
            }
        }
    }

    async fn persist_publication(&self, id: &str, p: &Publication) -> bool {
        let stored = StoredPublication {
            id: id.to_owned(),
            etag: p.etag.clone(),
            resource: p.resource.clone(),
            package: p.package.as_str().to_owned(),
            content_type: p.content_type.clone(),
            body: p.body.clone(),
            expires_at: p.expires_at,
        };
        match self.store.put_publication(&stored).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "presence: store write failed");
                false
            }
        }
    }

    // ---- SUBSCRIBE (RFC 6665 4.2.1) -------------------------------------------------

    async fn on_subscribe(&mut self, tx: ServerTransaction, req: Request, package: Package) {
        let Some(resource) = self.inner.resource(&req) else {
            respond(&tx, req.response(404));
            return;
        };
        let expires = match granted_expires(&self.inner.cfg, &req) {
            Ok(e) => e,
            Err(r) => return respond(&tx, *r),
        };
        let event_id = req.headers.get("Event").and_then(|e| parse_event(e).1);
        let tag = new_tag();
        let source = tx.source();
        let mut dialog = Dialog::uas(&req, &tag, source);
        dialog.state = DialogState::Confirmed;
        let contact = self.inner.local.contact(&source);
        let key = sub_key(dialog.call_id(), &tag);
        let sub = Sub {
            package,
            event_id,
            resource,
            dialog,
            contact: contact.clone(),
            expires_at: unix_now() + u64::from(expires),
            version: 0,
            in_flight: None,
            dirty: true,
            last_sent: None,
            // Expires 0 is a fetch: one NOTIFY with the state, and the end (4.2.1.1).
            ending: (expires == 0).then_some("timeout"),
            final_sent: false,
        };
        if expires > 0 {
            if let Err(e) = self
                .store
                .put_subscription(&sub.stored(&key, &self.inner.node))
                .await
            {
                tracing::warn!(error = %e, "presence: store write failed");
                respond(&tx, req.response(500).with_reason("Storage Error"));
                return;
            }
        }
        let mut ok = req.response(200);
        ok.set_to_tag(&tag);
        // The 2xx makes the dialog: a record-routing proxy in front stays on its path
        // (RFC 3261 12.1.1, RFC 6665 4.1.3).
        for rr in req.headers.get_all("Record-Route") {
            ok.headers.push("Record-Route", rr);
        }
        ok.headers.push("Expires", expires.to_string());
        ok.headers.push("Contact", contact);
        respond(&tx, ok);
        self.insert_sub(key.clone(), sub);
        // RFC 6665 4.2.1.2: the initial NOTIFY goes out at once.
        self.send_notify(&key);
    }

    async fn on_in_dialog(&mut self, tx: ServerTransaction, req: Request) {
        let Some((tx, req)) = self.relays.on_in_dialog(&self.inner, tx, req) else {
            return;
        };
        let tag = req.base.to.tag().unwrap_or("");
        let key = sub_key(&req.base.call_id, tag);
        let mut stored = self.foreign.remove(&key);
        if stored.is_none() && !self.subs.contains_key(&key) && self.store.shared() {
            // Another node's news of the subscription may not have reached us yet (the
            // store's change feed lags under load): the store itself has it.
            if let Ok(Some(s)) = self.store.load_subscription(&key).await {
                if s.owner != self.inner.node {
                    stored = Some(s);
                }
            }
        }
        if let Some(stored) = stored {
            // Another node's subscriber refreshes through us: we serve it from now on.
            if let Some((k, sub)) = Sub::adopt(stored) {
                let record = sub.stored(&k, &self.inner.node);
                drop(self.store.take_subscription(&record));
                self.insert_sub(k, sub);
            }
        }
        let Some(sub) = self.subs.get_mut(&key) else {
            // RFC 3261 12.2.2.
            respond(&tx, req.response(481));
            return;
        };
        if req.method != Method::Subscribe {
            let mut r = req.response(405);
            r.headers.push("Allow", "SUBSCRIBE");
            respond(&tx, r);
            return;
        }
        if !sub.dialog.accept_remote_cseq(&req) {
            respond(&tx, req.response(500).with_reason("CSeq out of order"));
            return;
        }
        let (name, _) = parse_event(req.headers.get("Event").unwrap_or(""));
        if Package::from_name(&name) != Some(sub.package) {
            let mut r = req.response(489);
            r.headers.push("Allow-Events", sub.package.as_str());
            respond(&tx, r);
            return;
        }
        let cfg = &self.inner.cfg;
        let Ok(asked) = expires_of(&req) else {
            respond(&tx, req.response(400).with_reason("Bad Expires header"));
            return;
        };
        let expires = asked.unwrap_or(cfg.default_expires);
        if expires != 0 && expires < cfg.min_expires {
            let mut r = req.response(423);
            r.headers.push("Min-Expires", cfg.min_expires.to_string());
            respond(&tx, r);
            return;
        }
        let expires = expires.min(cfg.max_expires);
        sub.dialog.refresh_target(&req.headers);
        sub.dirty = true;
        self.pending.insert(key.clone());
        let Some(sub) = self.subs.get_mut(&key) else {
            return;
        };
        if expires == 0 {
            // Unsubscribe (RFC 6665 4.2.1.4): 200, then a last NOTIFY, terminated.
            sub.ending = Some("timeout");
            sub.expires_at = unix_now();
        } else {
            // Refresh (4.2.1.2): a NOTIFY follows it too.
            sub.expires_at = unix_now() + u64::from(expires);
            let stored = sub.stored(&key, &self.inner.node);
            if let Err(e) = self.store.put_subscription(&stored).await {
                tracing::warn!(error = %e, "presence: store write failed");
            }
        }
        let mut ok = req.response(200);
        ok.headers.push("Expires", expires.to_string());
        if let Some(sub) = self.subs.get(&key) {
            ok.headers.push("Contact", sub.contact.clone());
        }
        // The NOTIFY (the last one, for an unsubscribe) goes out from `tick`, after any
        // NOTIFY still awaiting its answer.
        respond(&tx, ok);
    }

    // ---- NOTIFY (RFC 6665 4.2.2) ----------------------------------------------------

    /// The current body of a package for a resource.
    fn body_for(&self, package: Package, resource: &str, version: u32) -> String {
        let now = unix_now();
        let mut published: Vec<(&str, u64)> = self
            .pubs
            .values()
            .filter(|p| p.package == package && p.resource == resource && p.expires_at > now)
            .map(|p| (p.body.as_str(), p.expires_at))
            .collect();
        match package {
            Package::Presence => {
                published.sort_by_key(|(_, e)| *e);
                let docs: Vec<&str> = published.iter().map(|(b, _)| *b).collect();
                body::compose_pidf(resource, &docs)
            }
            Package::MessageSummary => {
                // The latest publication wins (one mailbox, one state).
                let latest = published.iter().max_by_key(|(_, e)| *e).map(|(b, _)| *b);
                body::message_summary(resource, latest)
            }
            Package::Dialog => {
                let mut dialogs: Vec<DialogView> = Vec::new();
                for c in self.calls.values() {
                    let ch = &c.change;
                    if c.callee_aor == resource {
                        dialogs.push(DialogView {
                            id: ch.id.to_string(),
                            call_id: ch.call_id.to_string(),
                            local_tag: ch.our_tag.to_string(),
                            remote_tag: ch.caller_tag.to_string(),
                            direction: "recipient",
                            state: ch.phase.as_str(),
                            local_identity: ch.callee.to_string(),
                            remote_identity: ch.caller.to_string(),
                        });
                    }
                    if c.caller_aor == resource {
                        dialogs.push(DialogView {
                            id: format!("{}-out", ch.id),
                            call_id: ch.call_id.to_string(),
                            local_tag: ch.caller_tag.to_string(),
                            remote_tag: ch.our_tag.to_string(),
                            direction: "initiator",
                            state: ch.phase.as_str(),
                            local_identity: ch.caller.to_string(),
                            remote_identity: ch.callee.to_string(),
                        });
                    }
                }
                dialogs.sort_by(|a, b| a.id.cmp(&b.id));
                body::dialog_info(resource, version, &dialogs)
            }
        }
    }

    fn send_notify(&mut self, key: &str) {
        self.send_notify_cached(key, &mut HashMap::new());
    }

    /// `send_notify` with the bodies already composed in this round: one presence or
    /// message-summary document per resource however many watch it (dialog-info carries
    /// each subscription's own version, so it is built per subscription).
    fn send_notify_cached(&mut self, key: &str, cache: &mut HashMap<(Package, String), String>) {
        let Some((package, resource, version)) = self
            .subs
            .get(key)
            .map(|s| (s.package, s.resource.clone(), s.version))
        else {
            return;
        };
        let body = if package == Package::Dialog {
            self.body_for(package, &resource, version)
        } else {
            cache
                .entry((package, resource.clone()))
                .or_insert_with(|| self.body_for(package, &resource, version))
                .clone()
        };
        let Some(sub) = self.subs.get_mut(key) else {
            return;
        };
        sub.version = version;
        let now = unix_now();
        let state = match sub.ending {
            Some(reason) => format!("terminated;reason={reason}"),
            None => format!("active;expires={}", sub.expires_at.saturating_sub(now)),
        };
        let flow = sub.dialog.flow;
        let via = self.inner.local.via(&flow);
        let mut req = sub
            .dialog
            .request(Method::Notify, via, Some(&sub.contact.clone()));
        let event = match &sub.event_id {
            Some(id) => format!("{};id={id}", package.as_str()),
            None => package.as_str().to_owned(),
        };
        req.headers.push("Event", event);
        req.headers.push("Subscription-State", state);
        req.headers
            .push("Content-Type", body::content_type(package));
        req.body = body.into();
        let seq = req.base.cseq.seq;
        sub.in_flight = Some(seq);
        sub.final_sent = sub.ending.is_some();
        sub.dirty = false;
        self.pending.remove(key);
        sub.last_sent = Some(Instant::now());
        sub.version = version.wrapping_add(1);
        let stored = (sub.ending.is_none()).then(|| sub.stored(key, &self.inner.node));
        let events = self.inner.events.clone();
        let k = key.to_owned();
        let sink = Box::new(move |event: ClientEvent| {
            let _ = events.send(Ev::NotifyDone {
                key: k.clone(),
                seq,
                event,
            });
        });
        bump(&self.inner.stats.notifies_sent);
        if let Err(e) = self.inner.layer.send_request_with(&req, flow, sink) {
            tracing::debug!(error = %e, "presence: NOTIFY not sent");
            self.end_sub(key, true);
            return;
        }
        // The CSeq and version move on with every NOTIFY; recorded without waiting (the
        // store keeps the order of writes).
        if let Some(stored) = stored {
            drop(self.store.put_subscription(&stored));
        }
    }

    fn on_notify_done(&mut self, key: String, seq: u32, event: ClientEvent) {
        let Some(sub) = self.subs.get_mut(&key) else {
            return;
        };
        if sub.in_flight != Some(seq) {
            return;
        }
        match event {
            ClientEvent::Provisional(_) => {}
            ClientEvent::Final(resp) if resp.is_success() => {
                sub.in_flight = None;
                if sub.final_sent {
                    self.end_sub(&key, false);
                }
            }
            ClientEvent::Final(resp) => {
                // RFC 6665 4.2.2: a NOTIFY answered with an error (481 above all) or not
                // answered at all ends the subscription.
                tracing::debug!(status = resp.status, sub = %key, "presence: NOTIFY refused; subscription ends");
                self.end_sub(&key, true);
            }
            ClientEvent::Timeout | ClientEvent::TransportError(_) => {
                tracing::debug!(sub = %key, "presence: NOTIFY unanswered; subscription ends");
                self.end_sub(&key, true);
            }
        }
    }

    /// Adds one of our subscriptions (gauge, index, pending NOTIFY).
    fn insert_sub(&mut self, key: String, sub: Sub) {
        self.inner.stats.subscriptions[sub.package.index()].fetch_add(1, Ordering::Relaxed);
        let dialog = sub.package == Package::Dialog;
        self.index
            .entry((sub.package, sub.resource.clone()))
            .or_default()
            .insert(key.clone());
        if sub.dirty {
            self.pending.insert(key.clone());
        }
        self.inner.index_dialog(&key);
        if let Some(old) = self.subs.insert(key, sub) {
            self.inner.stats.subscriptions[old.package.index()].fetch_sub(1, Ordering::Relaxed);
        }
        if dialog {
            self.update_call_interest();
        }
    }

    /// Our calls are only watched while somebody here subscribes to the dialog package
    /// (or other nodes may, through a shared store): calls then build nothing for nobody.
    /// When watching starts, the calls in progress are read so the first NOTIFY is right.
    fn update_call_interest(&mut self) {
        let Some(flag) = self.inner.call_interest.clone() else {
            return;
        };
        let want = self.store.shared()
            || self.inner.stats.subscriptions[Package::Dialog.index()].load(Ordering::Relaxed) > 0;
        if want == flag.load(Ordering::Relaxed) {
            return;
        }
        flag.store(want, Ordering::Relaxed);
        if want {
            self.resync_calls();
        } else {
            // Nobody looks; what we knew will be read again when somebody does.
            self.calls.retain(|_, c| !c.local);
        }
    }

    /// Forgets one of our subscriptions (not the store's record).
    fn remove_sub(&mut self, key: &str) -> Option<Sub> {
        let sub = self.subs.remove(key)?;
        self.inner.unindex_dialog(key);
        self.inner.stats.subscriptions[sub.package.index()].fetch_sub(1, Ordering::Relaxed);
        let ik = (sub.package, sub.resource.clone());
        if let Some(keys) = self.index.get_mut(&ik) {
            keys.remove(key);
            if keys.is_empty() {
                self.index.remove(&ik);
            }
        }
        self.pending.remove(key);
        if sub.package == Package::Dialog {
            self.update_call_interest();
        }
        Some(sub)
    }

    fn end_sub(&mut self, key: &str, failed: bool) {
        // The failure is counted before the subscription count goes down, so that a
        // reader who sees the subscription gone also sees why.
        if failed && self.subs.contains_key(key) {
            bump(&self.inner.stats.notifies_failed);
        }
        if self.remove_sub(key).is_some() {
            drop(self.store.remove_subscription(key));
        }
    }

    /// The state of (package, resource) changed: its subscribers get a NOTIFY.
    fn touch(&mut self, package: Package, resource: &str) {
        let Some(keys) = self.index.get(&(package, resource.to_owned())) else {
            return;
        };
        for k in keys {
            if let Some(s) = self.subs.get_mut(k) {
                s.dirty = true;
                self.pending.insert(k.clone());
            }
        }
    }

    // ---- the dialog event package from our own calls (RFC 4235) ----------------------

    fn on_call(&mut self, change: CallChange, local: bool) {
        let cfg = &self.inner.cfg;
        let addrs = &self.inner.local;
        let caller_aor = addrs.canonical_aor(&change.caller, &cfg.domain);
        let callee_aor = addrs.canonical_aor(&change.callee, &cfg.domain);
        let ended = change.phase == CallPhase::Terminated;
        let id = change.id.clone();
        self.touch(Package::Dialog, &caller_aor);
        self.touch(Package::Dialog, &callee_aor);
        self.calls.insert(
            id,
            CallView {
                change,
                local,
                caller_aor,
                callee_aor,
                ended_at: ended.then(Instant::now),
            },
        );
    }

    /// Changes of our own calls were lost (the watch's buffer overran): the B2BUA's list
    /// of calls in progress says which ended and which are up, so no lamp stays lit for a
    /// call that is over.
    fn resync_calls(&mut self) {
        let Some(live) = self.inner.live_calls.as_ref().map(|f| f()) else {
            return;
        };
        let up: HashSet<&str> = live.iter().map(|c| &*c.id).collect();
        let gone: Vec<CallChange> = self
            .calls
            .iter()
            .filter(|(id, c)| c.local && c.ended_at.is_none() && !up.contains(&***id))
            .map(|(_, c)| CallChange {
                phase: CallPhase::Terminated,
                ..c.change.clone()
            })
            .collect();
        for c in gone {
            self.on_call(c, true);
        }
        for now in live {
            let change = match self.calls.get(&*now.id) {
                Some(c) if c.change.phase == now.phase => continue,
                Some(c) => CallChange {
                    phase: now.phase,
                    ..c.change.clone()
                },
                None => now,
            };
            self.on_call(change, true);
        }
    }

    // ---- other nodes (shared store) ------------------------------------------------

    /// Tells the other nodes about a call change of ours.
    fn announce(&self, c: &CallChange) {
        if !self.store.shared() {
            return;
        }
        self.store.announce_call(&RemoteCall {
            id: c.id.to_string(),
            phase: c.phase.as_str().to_owned(),
            call_id: c.call_id.to_string(),
            caller_tag: c.caller_tag.to_string(),
            our_tag: c.our_tag.to_string(),
            caller: c.caller.to_string(),
            callee: c.callee.to_string(),
        });
    }

    /// A call change another node announced.
    fn on_remote_call(&mut self, rc: RemoteCall) {
        let (Ok(caller), Ok(callee)) = (Uri::parse(&rc.caller), Uri::parse(&rc.callee)) else {
            return;
        };
        let phase = match rc.phase.as_str() {
            "trying" => CallPhase::Trying,
            "early" => CallPhase::Early,
            "confirmed" => CallPhase::Confirmed,
            _ => CallPhase::Terminated,
        };
        self.on_call(
            CallChange {
                id: Arc::from(rc.id.as_str()),
                phase,
                call_id: Arc::from(rc.call_id.as_str()),
                caller_tag: Arc::from(rc.caller_tag.as_str()),
                our_tag: Arc::from(rc.our_tag.as_str()),
                caller: Arc::new(caller),
                callee: Arc::new(callee),
            },
            false,
        );
    }

    async fn on_store_event(&mut self, ev: Option<PresenceEvent>) {
        let Some(ev) = ev else { return };
        match ev {
            PresenceEvent::Publication(id) => match self.store.load_publication(&id).await {
                Ok(found) => {
                    if let Some(old) = self.pubs.remove(&id) {
                        self.touch(old.package, &old.resource);
                    }
                    if let Some(p) = found {
                        self.install_publication(p);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence: store read failed"),
            },
            PresenceEvent::Subscription(key) => match self.store.load_subscription(&key).await {
                Ok(Some(s)) if s.owner != self.inner.node => {
                    // Another node took it over: it sends the NOTIFYs now.
                    self.remove_sub(&key);
                    self.foreign.insert(key, s);
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.foreign.remove(&key);
                }
                Err(e) => tracing::warn!(error = %e, "presence: store read failed"),
            },
            PresenceEvent::Calls(calls) => {
                for rc in calls {
                    self.on_remote_call(rc);
                }
            }
            PresenceEvent::Resync => match self.store.load().await {
                Ok((pubs, subs)) => {
                    self.pubs.clear();
                    for p in pubs {
                        self.install_publication(p);
                    }
                    self.foreign = subs
                        .into_iter()
                        .filter(|s| s.owner != self.inner.node)
                        .map(|s| (s.key.clone(), s))
                        .collect();
                    // Whatever changed meanwhile: every subscriber hears the state.
                    for (k, s) in self.subs.iter_mut() {
                        s.dirty = true;
                        self.pending.insert(k.clone());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence: store re-read failed"),
            },
        }
    }

    fn install_publication(&mut self, p: StoredPublication) {
        let Some(package) = Package::from_name(&p.package) else {
            return;
        };
        if p.expires_at <= unix_now() {
            return;
        }
        self.touch(package, &p.resource);
        self.pubs.insert(
            p.key().to_owned(),
            Publication {
                etag: p.etag,
                resource: p.resource,
                package,
                content_type: p.content_type,
                body: p.body,
                expires_at: p.expires_at,
            },
        );
    }

    // ---- time -----------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let interval = self.inner.cfg.min_notify_interval;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for k in &self.pending {
            let Some(s) = self.subs.get(k) else { continue };
            if s.in_flight.is_none() && !s.final_sent {
                match (s.ending, s.last_sent) {
                    (None, Some(t)) => consider(t + interval),
                    _ => consider(Instant::now()),
                }
            }
        }
        // Expiry (publications, subscriptions, ended calls, relays) is looked for once a
        // second while there is anything that can lapse.
        let anything = !self.pubs.is_empty()
            || !self.subs.is_empty()
            || !self.foreign.is_empty()
            || !self.calls.is_empty()
            || self.relays.len() > 0;
        if anything {
            consider(instant_of(self.last_scan.max(unix_now()) + 1));
        }
        next
    }

    /// Expires what lapsed (once a second) and sends the NOTIFYs that are due.
    fn tick(&mut self) {
        let now = unix_now();
        if now != self.last_scan {
            self.last_scan = now;
            self.expire(now);
        }
        let at = Instant::now();
        let interval = self.inner.cfg.min_notify_interval;
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|k| {
                self.subs.get(*k).is_some_and(|s| {
                    s.dirty
                        && !s.final_sent
                        && s.in_flight.is_none()
                        && (s.ending.is_some() || s.last_sent.is_none_or(|t| at >= t + interval))
                })
            })
            .cloned()
            .collect();
        let mut cache = HashMap::new();
        for key in due {
            self.send_notify_cached(&key, &mut cache);
        }
    }

    fn expire(&mut self, now: u64) {
        let expired: Vec<String> = self
            .pubs
            .iter()
            .filter(|(_, p)| p.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            if let Some(p) = self.pubs.remove(&id) {
                drop(self.store.remove_publication(&id));
                self.touch(p.package, &p.resource);
            }
        }
        for (k, s) in self.subs.iter_mut() {
            if s.ending.is_none() && s.expires_at <= now {
                // RFC 6665 4.2.2: at expiry, a last NOTIFY says so.
                s.ending = Some("timeout");
                s.dirty = true;
                self.pending.insert(k.clone());
            }
        }
        self.foreign.retain(|_, s| s.expires_at > now);
        self.relays.expire(&self.inner);
        let at = Instant::now();
        self.calls
            .retain(|_, c| c.ended_at.is_none_or(|t| at < t + KEEP_TERMINATED));
    }
}

enum CallRecv {
    Change(CallChange),
    /// Changes were lost: re-read the calls in progress.
    Lagged,
    Closed,
}

async fn recv_call(rx: &mut Option<broadcast::Receiver<CallChange>>) -> CallRecv {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(c) => CallRecv::Change(c),
        Err(broadcast::error::RecvError::Lagged(n)) => {
            tracing::warn!(
                lost = n,
                "presence: fell behind the call watch; re-reading the calls in progress"
            );
            CallRecv::Lagged
        }
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            CallRecv::Closed
        }
    }
}

async fn recv_store(rx: &mut Option<PresenceEvents>) -> Option<PresenceEvent> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    let ev = r.recv().await;
    if ev.is_none() {
        *rx = None;
    }
    ev
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// 200 to a PUBLISH: the new entity-tag and the granted interval (RFC 3903 6 step 8).
fn ok_with_etag(req: &Request, etag: Option<&str>, expires: u32) -> crate::sip::Response {
    let mut r = req.response(200);
    if let Some(e) = etag {
        r.headers.push("SIP-ETag", e);
    }
    r.headers.push("Expires", expires.to_string());
    r
}
