//! Events, presence and messaging: the server as event state compositor (PUBLISH, RFC
//! 3903), notifier (SUBSCRIBE/NOTIFY, RFC 6665) for presence (RFC 3856, PIDF bodies RFC
//! 3863), for the dialog event package generated from the server's own calls (RFC 4235:
//! busy-lamp fields with no extra component) and for message-summary (RFC 3842), and the
//! router of page-mode MESSAGE (RFC 3428).
//!
//! Owns: publications, subscriptions (their dialogs, NOTIFY sending, rate limit, expiry),
//! MESSAGE routing, and their storage (`store`: `presence.sqlite` under `storage.dir`).
//! Must not touch: calls (it only reads the dialog layer's call watch, `dialog::watch`,
//! which the B2BUA posts to; it imports no B2BUA type), bindings (it reads contacts
//! through `LocationService`/`ContactFlows`), transactions (it uses `ServerTransaction`
//! and `TransactionLayer::send_request[_with]`), other usages' dialogs (it registers its
//! subscriptions' dialogs in the dialog table through the `Subscriptions` view).
//!
//! Layer: a transaction user beside the B2BUA; below the script engine, which runs
//! `on_message`/`on_subscribe` behind presence's own [`PresenceHooks`] port (`hooks.rs`),
//! and below the UAS core that dispatches to it.
//!
//! Design: PUBLISH, SUBSCRIBE (after the script's `on_subscribe`), in-dialog SUBSCRIBE
//! and the outcomes of our NOTIFYs are events of one notifier task that owns all the
//! state (no lock); call changes arrive on the call watch's broadcast. A MESSAGE is
//! routed by a task of its own (it waits on its forks, nothing else).
//!
//! Config keys (`[presence]`, [`PresenceSection`] in `config.rs`): `max_message_size` (MESSAGE bodies above it get 413),
//! `min_expires` (423 below it), `max_expires` (cut to it), `default_expires` (no
//! Expires), `min_notify_interval_ms` (changes within it are coalesced into one NOTIFY to
//! that subscriber), `authenticate` (digest for PUBLISH, SUBSCRIBE and MESSAGE with the
//! users of `registrar.users_file`; a PUBLISH only for one's own state); storage:
//! `storage.dir`, or `redis.url` with `registrar.store = "redis"`.
//!
//! Lua: `on_message(req)` and `on_subscribe(req)` (see `script::presence`).
//!
//! Metrics (through `metrics::PresenceFigures`): `strowger_presence_subscriptions
//! {package}`, `strowger_presence_notifies_total{result="sent"|"failed"}`,
//! `strowger_presence_publish_total{result}`, `strowger_messages_total{result="routed"|
//! "failed"}`.
//!
//! Several nodes (`registrar.store = "redis"`): publications and subscriptions live in
//! Redis (`RedisPresenceStore`) and every node follows the others' changes; a
//! subscription's NOTIFYs are sent by the node that owns it (where it was made or last
//! refreshed), and calls on one node light the lamps watched through another.
//!
//! A subscription the script routes elsewhere (`req:route(uri)`, e.g. message-summary to
//! a voicemail server) is relayed B2BUA-style (`relay`); a voicemail server can also
//! PUBLISH message-summary here.
//!
//! Not done: relayed subscriptions are not stored (lost on restart: the subscriber's
//! refresh gets 481 and it subscribes again) nor shared between nodes; partial PIDF
//! composition beyond concatenating the sources' elements; watcher info (RFC 3857).

pub mod body;
mod config;
mod hooks;
mod message;
mod metrics;
mod notifier;
mod redis_store;
mod relay;
pub mod store;

pub use config::PresenceSection;
pub use hooks::{MessageInfo, MessageVerdict, PresenceHooks, SubscribeInfo, SubscribeVerdict};
pub use redis_store::RedisPresenceStore;
pub use store::{
    PresenceEvent, PresenceStore, PresenceStoreError, RemoteCall, SqlitePresenceStore,
    StoredPublication, StoredSubscription,
};

use crate::auth::Users;
use crate::dialog::watch::CallChange;
use crate::dialog::{DialogId, DialogUsage, Unmatched, UsageIndex};
use crate::registrar::LocationService;
use crate::sip::{new_tag, Method, Request, Response};
use crate::transaction::{ServerTransaction, TransactionLayer};
use crate::transport::{ContactFlows, LocalAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// The event packages we serve (RFC 6665 7.2: anything else gets 489).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Package {
    Presence,
    Dialog,
    MessageSummary,
}

impl Package {
    pub const ALL: [Package; 3] = [Package::Presence, Package::Dialog, Package::MessageSummary];

    pub fn as_str(self) -> &'static str {
        match self {
            Package::Presence => "presence",
            Package::Dialog => "dialog",
            Package::MessageSummary => "message-summary",
        }
    }

    pub fn from_name(name: &str) -> Option<Package> {
        Package::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Packages whose state a PUBLISH may set (the dialog package is ours alone).
    fn publishable(self) -> bool {
        matches!(self, Package::Presence | Package::MessageSummary)
    }
}

/// The Allow-Events value (RFC 6665 8.2.2).
pub fn allow_events() -> String {
    Package::ALL
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An Event header: the package name and the `id` parameter (RFC 6665 8.2.1).
fn parse_event(value: &str) -> (String, Option<String>) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let id = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("id")
            .then(|| v.trim().to_owned())
    });
    (name, id)
}

/// Presence policy (`[presence]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConfig {
    pub domain: String,
    pub max_message_size: usize,
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
    pub min_notify_interval: Duration,
}

impl Default for PresenceConfig {
    /// The defaults of `[presence]` (one set of defaults for the file and the core).
    fn default() -> Self {
        PresenceSection::default().policy("localhost")
    }
}

/// Counters (relaxed atomics), read by `/metrics`.
#[derive(Debug, Default)]
pub struct PresenceStats {
    /// Active subscriptions by package (`Package::ALL` order): a gauge.
    pub subscriptions: [AtomicU64; 3],
    pub notifies_sent: AtomicU64,
    /// NOTIFYs answered with an error or not at all (each ended its subscription).
    pub notifies_failed: AtomicU64,
    /// PUBLISH outcomes, indexed like [`PublishResult`].
    pub publish: [AtomicU64; 6],
    pub messages_routed: AtomicU64,
    pub messages_failed: AtomicU64,
}

pub use metrics::PublishResult;

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What the presence module needs from the server around it.
pub struct PresenceParts {
    pub config: PresenceConfig,
    pub layer: TransactionLayer,
    pub local: LocalAddrs,
    pub scripts: Arc<dyn PresenceHooks>,
    pub location: Arc<dyn LocationService>,
    pub flows: Arc<dyn ContactFlows>,
    /// The users file: a MESSAGE to a known user with no device gets 480, to an unknown
    /// one 404.
    pub users: Option<Arc<Users>>,
    pub store: Arc<dyn PresenceStore>,
    /// The B2BUA's call watch (None: no dialog event package from calls).
    pub calls: Option<broadcast::Receiver<CallChange>>,
    /// The B2BUA's calls in progress, read when call changes were lost (None: never).
    pub live_calls: Option<LiveCalls>,
    /// The call watch's switch (`CallWatch::interest`): off while no dialog-package
    /// subscription needs our calls (None: always on).
    pub call_interest: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `presence.authenticate`: digest for PUBLISH, SUBSCRIBE and MESSAGE (None: off).
    pub auth: Option<(crate::auth::DigestAuth, Arc<Users>)>,
    /// This node's name, stable across restarts (e.g. its first SIP address): which node
    /// sends a subscription's NOTIFYs when several share a store.
    pub node: String,
    /// The dialog table, where our subscriptions' dialogs are registered.
    pub dialogs: Arc<dyn UsageIndex<SubscriptionUsage>>,
}

pub(crate) struct Inner {
    cfg: PresenceConfig,
    layer: TransactionLayer,
    local: LocalAddrs,
    scripts: Arc<dyn PresenceHooks>,
    location: Arc<dyn LocationService>,
    flows: Arc<dyn ContactFlows>,
    users: Option<Arc<Users>>,
    stats: PresenceStats,
    events: mpsc::UnboundedSender<notifier::Ev>,
    node: String,
    live_calls: Option<LiveCalls>,
    call_interest: Option<Arc<std::sync::atomic::AtomicBool>>,
    auth: Option<(crate::auth::DigestAuth, Arc<Users>)>,
    dialogs: Arc<dyn UsageIndex<SubscriptionUsage>>,
}

/// Presence's subscription usage in the dialog table: a request in one of our
/// subscriptions' dialogs (or a relayed one's) goes to the notifier task.
#[derive(Clone)]
pub struct SubscriptionUsage(mpsc::UnboundedSender<notifier::Ev>);

impl DialogUsage for SubscriptionUsage {
    fn on_request(&self, tx: ServerTransaction, req: Request) -> Result<(), Unmatched> {
        self.0
            .send(notifier::Ev::InDialog(tx, req))
            .map_err(|e| match e.0 {
                notifier::Ev::InDialog(tx, req) => Box::new((tx, req)),
                _ => unreachable!("we sent InDialog"),
            })
    }
}

/// Lists the calls in progress (`B2bua::calls`).
pub type LiveCalls = Arc<dyn Fn() -> Vec<CallChange> + Send + Sync>;

impl Inner {
    /// Registers the dialog of a subscription key (`Call-ID;local-tag`, see
    /// `notifier::sub_key`) in the dialog table.
    pub(crate) fn index_dialog(&self, key: &str) {
        if let Some((call_id, tag)) = key.rsplit_once(';') {
            self.dialogs.insert(
                DialogId::new(call_id, tag),
                SubscriptionUsage(self.events.clone()),
            );
        }
    }

    /// Unregisters what [`Self::index_dialog`] registered.
    pub(crate) fn unindex_dialog(&self, key: &str) {
        if let Some((call_id, tag)) = key.rsplit_once(';') {
            self.dialogs
                .remove_if(&DialogId::new(call_id, tag), &mut |_| true);
        }
    }

    /// Whether a request's Request-URI is a user of ours; its canonical AOR then.
    fn resource(&self, req: &Request) -> Option<String> {
        if req.uri.user.is_none() || !self.local.serves(&req.uri.host, &self.cfg.domain) {
            return None;
        }
        Some(self.local.canonical_aor(&req.uri, &self.cfg.domain))
    }
}

/// The presence core; a cheap handle. The notifier task stops when the last handle is
/// dropped or `stop` is called.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

/// Answers `resp` on `tx`, with a To tag when the request had none (RFC 3261 8.2.6.2).
pub(crate) fn respond(tx: &ServerTransaction, mut resp: Response) {
    if resp.status >= 200 {
        resp.set_to_tag(&new_tag());
    }
    if let Err(e) = tx.respond(resp) {
        tracing::debug!(error = %e, "presence: could not send response");
    }
}

impl Presence {
    /// Loads the stored state (dropping what expired while we were down) and starts the
    /// notifier.
    pub async fn start(parts: PresenceParts) -> Result<Presence, PresenceStoreError> {
        // Follow the other nodes before reading, so no change between falls in the gap.
        let store_rx = parts.store.watch().await;
        let (pubs, subs) = parts.store.load().await?;
        let (events, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let inner = Arc::new(Inner {
            cfg: parts.config,
            layer: parts.layer,
            local: parts.local,
            scripts: parts.scripts,
            location: parts.location,
            flows: parts.flows,
            users: parts.users,
            stats: PresenceStats::default(),
            events,
            node: parts.node,
            live_calls: parts.live_calls,
            dialogs: parts.dialogs,
            call_interest: parts.call_interest,
            auth: parts.auth,
        });
        let n = notifier::Notifier::new(
            inner.clone(),
            parts.store,
            rx,
            parts.calls,
            pubs,
            subs,
            store_rx,
        );
        tracing::info!(
            publications = n.publications(),
            subscriptions = n.subscriptions(),
            "presence ready"
        );
        tokio::spawn(n.run(stop_rx));
        Ok(Presence {
            inner,
            _stop: Arc::new(stop_tx),
        })
    }

    pub fn stats(&self) -> &PresenceStats {
        &self.inner.stats
    }

    /// Stops the notifier now (server shutdown): no NOTIFY goes out after this, and the
    /// stored state stays as it is for the next start.
    pub fn stop(&self) {
        let _ = self.inner.events.send(notifier::Ev::Stop);
    }

    /// MESSAGE, PUBLISH or SUBSCRIBE outside any dialog (already validated).
    pub fn on_request(&self, tx: ServerTransaction, req: Request) {
        if !self.authenticated(&tx, &req) {
            return;
        }
        match req.method {
            Method::Message => {
                tokio::spawn(message::route(self.inner.clone(), tx, req));
            }
            Method::Publish => {
                let _ = self.inner.events.send(notifier::Ev::Publish(tx, req));
            }
            Method::Subscribe => self.on_subscribe(tx, req),
            _ => respond(&tx, req.response(501)),
        }
    }

    /// A request inside a dialog the dialog table does not know: maybe a subscription
    /// another node holds in a shared store, refreshed through us (we take it over); the
    /// notifier answers 481 otherwise.
    pub fn on_in_dialog(&self, tx: ServerTransaction, req: Request) {
        let _ = self.inner.events.send(notifier::Ev::InDialog(tx, req));
    }

    /// `presence.authenticate`: the request must prove its user (RFC 3261 22: 401 from us
    /// as the UAS of PUBLISH and SUBSCRIBE, 407 for MESSAGE, which we pass on), and a
    /// PUBLISH may only set that user's own state (RFC 3903 6 step 2: the ESC authorises
    /// publishers). False when the request has been answered.
    fn authenticated(&self, tx: &ServerTransaction, req: &Request) -> bool {
        use crate::auth::{AuthOutcome, ChallengeKind};
        let Some((digest, users)) = &self.inner.auth else {
            return true;
        };
        let kind = if req.method == Method::Message {
            ChallengeKind::Proxy
        } else {
            ChallengeKind::Www
        };
        let outcome = digest.verify(req, kind, tx.source().addr.ip(), |u| users.get(u).cloned());
        let AuthOutcome::Ok { user } = outcome else {
            let resp = digest
                .respond(req, kind, &outcome)
                .unwrap_or_else(|| req.response(403));
            if req.method == Method::Publish {
                bump(&self.inner.stats.publish[PublishResult::Rejected as usize]);
            }
            respond(tx, resp);
            return false;
        };
        if req.method == Method::Publish && req.uri.user.as_deref() != Some(user.as_str()) {
            bump(&self.inner.stats.publish[PublishResult::Rejected as usize]);
            respond(
                tx,
                req.response(403)
                    .with_reason("You may only publish your own state"),
            );
            return false;
        }
        true
    }

    fn on_subscribe(&self, tx: ServerTransaction, req: Request) {
        // RFC 6665 7.2.1: a package we do not serve gets 489 with Allow-Events.
        let Some(event) = req.headers.get("Event") else {
            respond(&tx, req.response(400).with_reason("Missing Event header"));
            return;
        };
        let (name, _) = parse_event(event);
        let Some(package) = Package::from_name(&name) else {
            let mut r = req.response(489);
            r.headers.push("Allow-Events", allow_events());
            respond(&tx, r);
            return;
        };
        let Some(resource) = self.inner.resource(&req) else {
            respond(
                &tx,
                req.response(404).with_reason("Not a user of this domain"),
            );
            return;
        };
        // RFC 6665 7.2.1 / RFC 3261 21.4.7: a body type the subscriber cannot take: 406.
        let ct = body::content_type(package);
        let accepts = req.headers.list("Accept");
        if !accepts.is_empty()
            && !accepts.iter().any(|a| {
                let media = a.split(';').next().unwrap_or("").trim();
                media.eq_ignore_ascii_case(ct) || media == "*/*"
            })
        {
            let mut r = req.response(406);
            r.headers.push("Accept", ct);
            respond(&tx, r);
            return;
        }
        let inner = self.inner.clone();
        // Off the transport's task: the script's say first (authorise or refuse).
        tokio::spawn(async move {
            let scripts = &inner.scripts;
            if scripts.has_on_subscribe() {
                let src = tx.source();
                let info = SubscribeInfo {
                    package: package.as_str().to_owned(),
                    resource,
                    subscriber: req.base.from.uri.to_text(),
                    user: req.uri.user.clone(),
                    source: crate::transport::peer_text(src.transport, &src.addr),
                    expires: req
                        .headers
                        .get("Expires")
                        .and_then(|v| v.trim().parse().ok()),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                        .collect(),
                };
                match scripts.on_subscribe(&info).await {
                    SubscribeVerdict::Default => {}
                    SubscribeVerdict::Reject(code, reason) => {
                        respond(&tx, req.response(code).with_reason(reason));
                        return;
                    }
                    SubscribeVerdict::Failed(_) => {
                        respond(&tx, req.response(500).with_reason("Script Error"));
                        return;
                    }
                    SubscribeVerdict::Route(target) => {
                        let _ = inner
                            .events
                            .send(notifier::Ev::SubscribeRoute(tx, req, package, target));
                        return;
                    }
                }
            }
            let _ = inner.events.send(notifier::Ev::Subscribe(tx, req, package));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_header_and_packages() {
        assert_eq!(
            parse_event("Presence ; id=7"),
            ("presence".to_owned(), Some("7".to_owned()))
        );
        assert_eq!(Package::from_name("DIALOG"), Some(Package::Dialog));
        assert_eq!(Package::from_name("conference"), None);
        assert!(!Package::Dialog.publishable());
        assert_eq!(allow_events(), "presence, dialog, message-summary");
    }
}
