//! The server: wires transports, the transaction layer and the UAS core together, and
//! runs them until a signal asks for a graceful shutdown.
//!
//! Owns: start-up order and shutdown (drain) policy, and the wiring of the one-way layers
//! (`tests/architecture.rs` lists them): it builds the telemetry handle every layer
//! registers its metrics on, the dialog table the B2BUA and presence register their
//! usages in, installs the call traces as the transaction layer's message observer, and
//! implements the ports lower layers define (`LocationService`, `ContactFlows`, the hunt
//! groups' `Directory`), and hands the script engine to the transaction users as the hook
//! ports they define (the B2BUA's `CallHooks`, presence's `PresenceHooks`). Must not touch: message handling itself, which belongs to the
//! layers it wires.
//!
//! Config keys used: `sip.listen`, `sip.domain`, `sip.timers`, `sip.max_message_size`,
//! `sip.user_agent`, `sip.tcp_idle_timeout_s`, `shutdown.drain_timeout_s`,
//! `registrar.keepalive_interval_s` (starts the registrar's keep-alive pings when not 0;
//! taken as given here, `Config` loading validates it), `call.records_file` (opened here,
//! so a file that cannot be written stops start-up), `storage.dir` and `[presence]` (the
//! presence core, started here), `[dns]` (the RFC 3263 locator every sender shares),
//! `[trunks.<name>]` (the trunks; their registration and ping tasks start here once
//! answers can reach the transaction layer), `[tls]` and the trunks' `tls_cert`/`tls_key`
//! (the TLS context, built at every start and reloaded with the script on SIGHUP), `[ws]`,
//! `[cluster]` with `redis.url` (this node's membership, joined here when
//! `cluster.enabled`, left at shutdown).

use crate::auth::{DigestAuth, Users};
use crate::b2bua::{B2bua, B2buaParts, CallRef, RecordWriter};
use crate::config::Config;
use crate::metrics::{Label as _, Telemetry};
use crate::presence::SubscriptionUsage;
use crate::registrar::LocationService;
use crate::registrar::{
    BindingStore, Keepalive, KeepaliveConfig, RedisStore, Registrar, RegistrarStore, SqliteStore,
};
use crate::script::{EngineOptions, ScriptEngine};
use crate::sip::{error_response, SipMessage};
use crate::transaction::TransactionLayer;
use crate::transport::{
    response_target, ContactFlows, Inbound, InboundSink, ListenAddr, LocalAddrs, Sender,
    TlsContext, TransportKind, TransportLimits, Transports,
};
use crate::uas::UasCore;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Counters of what the server did with input it could not use.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Malformed requests answered with 400 (or 505).
    pub malformed_answered: AtomicU64,
    /// Messages dropped because they could not be parsed or answered.
    pub malformed_dropped: AtomicU64,
}

/// What became of a malformed message (`strowger_sip_malformed_total{action}`).
#[derive(Clone, Copy, Debug)]
pub enum Malformed {
    /// Answered statelessly with 400 (or 505).
    Answered,
    Dropped,
}
crate::label!(
    Malformed,
    "action",
    Answered = "answered",
    Dropped = "dropped"
);

impl ServerStats {
    fn register_metrics(self: &Arc<Self>, t: &Telemetry) -> Result<(), crate::metrics::Error> {
        let family =
            t.counters::<Malformed>("strowger_sip_malformed_total", "Malformed SIP messages")?;
        let stats = self.clone();
        t.on_scrape(move || {
            for m in Malformed::ALL {
                let n = match m {
                    Malformed::Answered => &stats.malformed_answered,
                    Malformed::Dropped => &stats.malformed_dropped,
                };
                family.catch_up(*m, crate::metrics::load(n));
            }
        });
        Ok(())
    }
}

/// Hands what the transports read to the transaction layer, and answers malformed requests
/// statelessly (RFC 3261 8.2: there is no transaction for a message we cannot parse).
struct Dispatcher {
    layer: OnceLock<TransactionLayer>,
    sender: OnceLock<Transports>,
    /// Told when a connection closes (its WebSocket and outbound-flow bindings go).
    registrar: OnceLock<crate::registrar::Registrar>,
    stats: Arc<ServerStats>,
    /// At most one warning per second about malformed input (a flood must not flood the
    /// log); every message is still counted and logged at debug.
    last_warn: AtomicU64,
}

impl Dispatcher {
    fn warn_malformed(&self, peer: SocketAddr, reason: &dyn std::fmt::Display, answered: bool) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warn.load(Ordering::Relaxed);
        if now > last
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %peer,
                %reason,
                answered,
                total_answered = self.stats.malformed_answered.load(Ordering::Relaxed),
                total_dropped = self.stats.malformed_dropped.load(Ordering::Relaxed),
                "malformed SIP (at most one such line per second; all are counted in strowger_sip_malformed_total)"
            );
        }
    }
}

impl InboundSink for Dispatcher {
    fn connection_closed(&self, connection: crate::transport::Target) {
        let Some(registrar) = self.registrar.get().cloned() else {
            return;
        };
        let source = crate::registrar::RegisterSource {
            transport: connection.transport,
            addr: connection.addr,
            connection: connection
                .connection
                .map(crate::transport::ConnectionId::get),
        };
        // Called on the connection's task as it ends: the store write happens apart.
        tokio::spawn(async move {
            registrar.connection_closed(source).await;
        });
    }

    fn undelivered(&self, target: crate::transport::Target, data: bytes::Bytes, why: &str) {
        let Some(layer) = self.layer.get() else {
            return;
        };
        // Our own request (a response has no transaction waiting on its delivery).
        if let Ok((SipMessage::Request(req), _)) = crate::sip::parse(&data) {
            tracing::debug!(peer = %target.addr, transport = %target.transport, method = %req.method, %why, "request not delivered");
            layer.on_undelivered(&req, why);
        }
    }

    fn screen(
        &self,
        data: &[u8],
        source: &crate::transport::Target,
        queued: Option<Duration>,
    ) -> bool {
        self.layer
            .get()
            .is_none_or(|layer| layer.screen(data, source, queued))
    }

    fn deliver(&self, inbound: Inbound) {
        let (Some(layer), Some(sender)) = (self.layer.get(), self.sender.get()) else {
            return;
        };
        match inbound.message {
            Ok(SipMessage::Request(req)) => {
                // Responses go where RFC 3261 18.2.2 says: the server transaction keeps
                // this target as its "source".
                let target = match req.base.top_via() {
                    Some(via) => response_target(via, &inbound.source),
                    None => inbound.source,
                };
                layer.on_message(SipMessage::Request(req), target);
            }
            Ok(msg @ SipMessage::Response(_)) => layer.on_message(msg, inbound.source),
            Err(err) => match error_response(&err) {
                Some(resp) => {
                    tracing::debug!(peer = %inbound.source.addr, reason = %err, "answering malformed request");
                    let target = match resp.base.top_via() {
                        Some(via) => response_target(via, &inbound.source),
                        None => inbound.source,
                    };
                    if let Err(e) = sender.send(&target, resp.to_bytes()) {
                        tracing::debug!(error = %e, "could not answer malformed request");
                    }
                    self.stats
                        .malformed_answered
                        .fetch_add(1, Ordering::Relaxed);
                    self.warn_malformed(inbound.source.addr, &err, true);
                }
                None => {
                    tracing::debug!(peer = %inbound.source.addr, reason = %err, "dropping malformed message");
                    self.stats.malformed_dropped.fetch_add(1, Ordering::Relaxed);
                    self.warn_malformed(inbound.source.addr, &err, false);
                }
            },
        }
    }
}

/// A running server.
pub struct ServerHandle {
    transports: Transports,
    layer: TransactionLayer,
    b2bua: B2bua,
    scripts: ScriptEngine,
    admin: crate::admin::AdminServer,
    registrar: Registrar,
    /// The keep-alive pings, when `registrar.keepalive_interval_s` is set; dropping it
    /// stops them.
    keepalive: Option<Keepalive>,
    /// The trunks' registration and ping tasks (when a trunk registers or is pinged);
    /// dropping it stops them.
    trunk_tasks: Option<crate::trunk::TrunkTasks>,
    stats: Arc<ServerStats>,
    /// The hunt groups, when `[huntgroups.*]` are configured.
    huntgroups: Option<crate::huntgroup::HuntGroups>,
    presence: crate::presence::Presence,
    /// Every dialog of the server (calls' legs, subscriptions).
    dialogs: Arc<crate::uas::Dialogs>,
    /// `[trunks.<name>]`.
    trunks: crate::trunk::Trunks,
    /// The certificates of TLS and WSS (listeners, outgoing connections).
    tls: Arc<TlsContext>,
    /// This node's membership (`cluster.enabled`); dropping it without `shutdown` is what
    /// a crash looks like to the other nodes.
    cluster: Option<crate::cluster::Cluster>,
}

impl ServerHandle {
    /// The trunks (empty when none is configured).
    pub fn trunks(&self) -> &crate::trunk::Trunks {
        &self.trunks
    }

    /// The TLS context: the server certificate in use, outgoing TLS configurations.
    pub fn tls(&self) -> &Arc<TlsContext> {
        &self.tls
    }

    /// Dialogs in the server's dialog table: two per bridged call, one per subscription.
    pub fn dialogs(&self) -> usize {
        self.dialogs.len()
    }

    /// The hunt groups, when any are configured.
    pub fn huntgroups(&self) -> Option<&crate::huntgroup::HuntGroups> {
        self.huntgroups.as_ref()
    }

    /// The addresses actually bound (port 0 in the config becomes a real port).
    pub fn local_addrs(&self) -> Vec<(TransportKind, SocketAddr)> {
        self.transports.local_addrs()
    }

    /// The first bound address of a transport.
    pub fn addr(&self, kind: TransportKind) -> Option<SocketAddr> {
        self.local_addrs()
            .into_iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| a)
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    pub fn transactions(&self) -> usize {
        self.layer.len()
    }

    /// Calls in progress (ringing or up).
    pub fn active_calls(&self) -> u64 {
        self.b2bua.active_calls()
    }

    pub fn b2bua(&self) -> &B2bua {
        &self.b2bua
    }

    pub fn scripts(&self) -> &ScriptEngine {
        &self.scripts
    }

    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// presence: the presence core (its counters).
    pub fn presence(&self) -> &crate::presence::Presence {
        &self.presence
    }

    /// The keep-alive pings, when on.
    pub fn keepalive(&self) -> Option<&Keepalive> {
        self.keepalive.as_ref()
    }

    /// Where the admin HTTP endpoint listens (`http.listen`, port 0 resolved).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// The admin HTTP endpoint (its counters, whether it is draining).
    pub fn admin(&self) -> &crate::admin::AdminServer {
        &self.admin
    }

    /// Graceful shutdown: new requests get 503, transactions in flight get up to `drain`
    /// to finish, then the transports close.
    pub async fn shutdown(self, drain: Duration) {
        // No new pings while draining: they would only keep the layer busy.
        if let Some(k) = self.keepalive {
            k.stop();
        }
        // Trunks unregister (Expires: 0) while the transports are still open; bounded by
        // the drain time (and at most 5 s: a silent carrier must not hold the stop).
        if let Some(t) = self.trunk_tasks {
            t.shutdown(drain.min(Duration::from_secs(5))).await;
        }
        self.layer.stop_accepting();
        self.admin.set_draining();
        // presence: no NOTIFY after this; the stored state is the next start's.
        self.presence.stop();
        // Wait for the requests still owing an answer (an INVITE ringing, a REGISTER being
        // stored), not for answered transactions lingering for retransmissions.
        let deadline = tokio::time::Instant::now() + drain;
        while self.layer.unanswered() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.layer.unanswered();
        if left > 0 {
            tracing::warn!(left, "drain time over; closing with requests unanswered");
        }
        // cluster: out of the cluster before the transports close, so that the others
        // need not wait for the lease (and end at once any call still up here).
        if let Some(c) = &self.cluster {
            c.stop().await;
        }
        self.transports.shutdown();
    }
}

/// Binds every configured transport and starts serving.
/// What a datagram meets in the server, without sockets: for the fuzz target
/// `fuzz/fuzz_targets/handler.rs` (not an API; see `fuzz/README.md`).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::transport::MemoryNetwork;

    /// The transports (attached to a memory network), the dispatcher, the transaction layer
    /// and the UAS core with its dialog table, wired as [`start`] wires them, without the
    /// B2BUA, registrar and presence: a datagram sent to `addr` on the network is parsed,
    /// gets its Via processing, a malformed request its stateless 400, a request its
    /// transaction (matching, merged-request check, CANCEL, ACK), validation and dialog
    /// lookup; new INVITEs and REGISTERs get 503, requests inside dialogs 481.
    pub struct MessageHandler {
        pub transports: Transports,
        pub layer: TransactionLayer,
        pub dialogs: Arc<crate::uas::Dialogs>,
    }

    impl MessageHandler {
        /// Must be called inside a tokio runtime.
        pub async fn new(
            config: &Config,
            scripts: ScriptEngine,
            network: &MemoryNetwork,
            addr: SocketAddr,
        ) -> anyhow::Result<MessageHandler> {
            let dispatcher = Arc::new(Dispatcher {
                layer: OnceLock::new(),
                sender: OnceLock::new(),
                stats: Arc::new(ServerStats::default()),
                last_warn: AtomicU64::new(0),
                registrar: OnceLock::new(),
            });
            let limits = TransportLimits {
                max_message_size: config.sip.max_message_size,
                ..TransportLimits::default()
            };
            let transports = Transports::bind(&[], limits, dispatcher.clone()).await?;
            transports.attach_memory(network, addr);
            let (digest, users) = load_auth(config)?;
            let dialogs = Arc::new(crate::uas::Dialogs::new());
            let core = Arc::new(UasCore::new(
                &config.sip,
                &config.registrar,
                &transports.local_addrs(),
                digest,
                users,
                scripts,
                dialogs.clone(),
            ));
            let sender: Arc<dyn Sender> = Arc::new(transports.clone());
            let layer = TransactionLayer::new(sender, config.sip.timers.to_timers(), core);
            layer.set_max_transactions(config.sip.max_transactions);
            let _ = dispatcher.layer.set(layer.clone());
            let _ = dispatcher.sender.set(transports.clone());
            Ok(MessageHandler {
                transports,
                layer,
                dialogs,
            })
        }
    }
}

pub async fn start(config: &Config) -> anyhow::Result<ServerHandle> {
    let listen: Vec<ListenAddr> = config
        .sip
        .listen
        .iter()
        .map(|s| {
            s.parse::<ListenAddr>()
                .map_err(|e| anyhow::anyhow!("sip.listen entry {s:?}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let stats = Arc::new(ServerStats::default());
    let dispatcher = Arc::new(Dispatcher {
        layer: OnceLock::new(),
        sender: OnceLock::new(),
        stats: stats.clone(),
        last_warn: AtomicU64::new(0),
        registrar: OnceLock::new(),
    });
    let tls = load_tls(config)?;
    let limits = TransportLimits {
        max_message_size: config.sip.max_message_size,
        idle_timeout: Duration::from_secs(config.sip.tcp_idle_timeout_s),
        udp_recv_buffer: config.sip.udp_recv_buffer_kb * 1024,
        message_timeout: Duration::from_secs(config.sip.tcp_message_timeout_s),
        udp_loss_percent: config.sip.udp_loss_percent,
        max_connections: config.sip.tcp_max_connections,
        max_connections_per_source: config.sip.tcp_max_connections_per_source,
        tls: Some(tls.clone()),
        handshake_timeout: config.tls.handshake_timeout(),
        max_handshakes: config.tls.max_handshakes,
        ws_allowed_origins: config.ws.origins(),
        ws_ping_interval: config.ws.ping_interval(),
    };
    if config.sip.udp_loss_percent > 0 {
        tracing::warn!(
            percent = config.sip.udp_loss_percent,
            "sip.udp_loss_percent is set: UDP datagrams are dropped at random (a loss rehearsal, not for production)"
        );
    }
    let transports = Transports::bind(&listen, limits, dispatcher.clone())
        .await
        .context("binding sip.listen")?;
    let scripts = ScriptEngine::load(EngineOptions {
        path: config.script.path.clone().into(),
        memory_limit: config.script.memory_limit_kb.saturating_mul(1024),
        instruction_limit: config.script.instruction_limit,
        time_limit: Duration::from_millis(config.script.time_limit_ms),
        pool_size: config.script.vm_pool_size,
        routes: config.call.routes.clone(),
    })
    .with_context(|| format!("loading script {}", config.script.path))?;
    let registrar = start_registrar(config).await?;
    let _ = dispatcher.registrar.set(registrar.clone());
    let huntgroups = start_huntgroups(config).await?;
    if let Some(h) = &huntgroups {
        scripts.set_huntgroups(h.clone());
    }
    // RFC 3263 server location of the server's own requests (dialled URIs, presence) with
    // the `[dns]` resolver: one instance, so one TTL cache, shared by every user.
    let locator = Arc::new(crate::transport::Locator::new(&config.dns).context("dns")?);
    let local = LocalAddrs::new(transports.local_addrs()).with_locator(locator);
    let location = Arc::new(Location {
        registrar: registrar.clone(),
        domain: config.sip.domain.to_ascii_lowercase(),
        local: local.clone(),
    });
    scripts.set_location(location.clone());
    let timers = config.sip.timers.to_timers();
    let (digest, users) = load_auth(config)?;
    // One dialog table: the B2BUA registers calls' legs, presence its subscriptions.
    let dialogs = Arc::new(crate::uas::Dialogs::new());
    let core = Arc::new(UasCore::new(
        &config.sip,
        &config.registrar,
        &transports.local_addrs(),
        digest.clone(),
        users.clone(),
        scripts.clone(),
        dialogs.clone(),
    ));
    let sender: Arc<dyn Sender> = Arc::new(transports.clone());
    let layer = TransactionLayer::new(sender.clone(), timers, core.clone());
    let keepalive = (config.registrar.keepalive_interval_s > 0).then(|| {
        registrar.start_keepalive(
            KeepaliveConfig::new(
                Duration::from_secs(config.registrar.keepalive_interval_s),
                config.sip.domain.clone(),
            ),
            layer.clone(),
            local.clone(),
        )
    });
    let records = if config.call.records_file.is_empty() {
        None
    } else {
        Some(
            RecordWriter::open(std::path::Path::new(&config.call.records_file))
                .context("call.records_file")?,
        )
    };
    let traces = config.call.trace.then(|| {
        crate::trace::CallTraces::new(config.call.trace_max_messages, config.call.trace_keep_ended)
    });
    if let Some(t) = &traces {
        layer.set_observer(Arc::new(t.clone()));
    }
    let presence_users = users.clone(); // presence
    layer.set_max_transactions(config.sip.max_transactions);
    let pike = (config.sip.pike_requests > 0).then(|| {
        let p = Arc::new(crate::pike::Pike::new(
            config.sip.pike_requests,
            Duration::from_secs(config.sip.pike_block_s),
            config.sip.pike_max_sources,
        ));
        layer.set_pike(p.clone());
        p
    });
    let overload = (config.call.overload_delay_ms > 0).then(|| {
        let o = Arc::new(crate::overload::Overload::new(
            Duration::from_millis(config.call.overload_delay_ms),
            OVERLOAD_WINDOW,
            tokio::time::Instant::now(),
        ));
        tokio::spawn(probe_lateness(
            Arc::downgrade(&o),
            transports.clone(),
            scripts.clone(),
        ));
        layer.set_overload(o.clone(), config.call.overload_retry_after_s);
        o
    });
    let trunks = crate::trunk::Trunks::new(&config.trunks);
    let b2bua = B2bua::new(B2buaParts {
        layer: layer.clone(),
        sender,
        // The dial plan's call hooks; a reload swaps the version inside the engine.
        scripts: Arc::new(scripts.clone()),
        local,
        timers,
        default_ring_timeout: Duration::from_secs(config.call.ring_timeout_s),
        keepalive: (config.call.keepalive_s > 0)
            .then(|| Duration::from_secs(config.call.keepalive_s)),
        overload: overload.clone(),
        flows: Some(location.clone()),
        location: Some(location.clone()),
        auth: users.map(|u| (digest.clone(), u)),
        records,
        routes: Arc::new(crate::b2bua::RouteStats::new(&config.call.routes)),
        traces,
        dialogs: Arc::new(crate::dialog::Invites(dialogs.clone())),
        trunks: trunks.clone(),
        session_timers: crate::dialog::session_timer::SessionTimerConfig {
            session_expires: config.call.session_expires_s,
            min_se: config.call.min_se_s,
        },
    });
    core.set_b2bua(b2bua.clone());
    if let Some(h) = &huntgroups {
        b2bua.track_busy();
        h.set_directory(Arc::new(HuntDirectory {
            location: location.clone(),
            b2bua: b2bua.clone(),
        }));
    }
    core.set_registrar(registrar.clone());
    // presence: its own file under storage.dir, the call watch for busy-lamp fields.
    let presence = start_presence(
        config,
        &layer,
        &transports,
        &scripts,
        location.clone(),
        (presence_users, digest.clone()),
        (
            &b2bua,
            Arc::new(crate::dialog::Subscriptions(dialogs.clone())),
        ),
    )
    .await?;
    core.set_presence(presence.clone());
    let cluster = start_cluster(config, &b2bua, &transports).await?;
    let http: SocketAddr = config
        .http
        .listen
        .parse()
        .with_context(|| format!("http.listen {:?}", config.http.listen))?;
    // One telemetry handle; each layer registers its own families on it.
    let telemetry = (|| -> Result<Telemetry, crate::metrics::Error> {
        let t = Telemetry::new()?;
        layer.register_metrics(&t)?;
        digest.register_metrics(&t)?;
        registrar.register_metrics(&t)?;
        scripts.register_metrics(&t)?;
        b2bua.register_metrics(&t)?;
        presence.register_metrics(&t)?;
        core.register_metrics(&t)?;
        stats.register_metrics(&t)?;
        if let Some(h) = &huntgroups {
            h.register_metrics(&t)?;
        }
        trunks.register_metrics(&t)?;
        if let Some(c) = &cluster {
            c.register_metrics(&t)?;
        }
        {
            let closed = t.counter_vec(
                "strowger_tcp_closed_total",
                "TCP connections closed by the server for a bound: a message over \
                 sip.max_message_size (oversize), not complete within \
                 sip.tcp_message_timeout_s (slow), refused at accept past \
                 sip.tcp_max_connections (total) or sip.tcp_max_connections_per_source \
                 (per_source)",
                &["reason"],
            )?;
            let udp_drops = t.counter(
                "strowger_udp_receive_drops_total",
                "UDP datagrams the kernel dropped because a SIP socket's receive queue was \
                 full (sip.udp_recv_buffer_kb)",
            )?;
            let transports = transports.clone();
            t.on_scrape(move || {
                crate::metrics::catch_up(&udp_drops, transports.udp_receive_drops());
                let s = transports.stats();
                let c = |reason: &str, n: u64| {
                    crate::metrics::catch_up(&closed.with_label_values(&[reason]), n)
                };
                c("oversize", s.tcp_oversize_closed);
                c("slow", s.tcp_slow_closed);
                c("total", s.tcp_refused_total);
                c("per_source", s.tcp_refused_per_source);
            });
        }
        {
            // Per transport (udp, tcp, tls, ws, wss): what the transport dashboard shows.
            let open = t.gauge_vec(
                "strowger_transport_connections",
                "Connections open now (TCP, TLS, WS, WSS; accepted and outgoing)",
                &["transport"],
            )?;
            let handshakes = t.counter_vec(
                "strowger_transport_handshakes_failed_total",
                "TLS handshakes and WebSocket upgrades that failed or timed out \
                 (tls.handshake_timeout_ms), or were refused because tls.max_handshakes \
                 were in progress (reason refused)",
                &["transport", "reason"],
            )?;
            let messages = t.counter_vec(
                "strowger_transport_messages_total",
                "SIP messages read (in) and handed to the transport to send (out)",
                &["transport", "direction"],
            )?;
            let transports = transports.clone();
            let bound: Vec<crate::transport::TransportKind> =
                transports.local_addrs().iter().map(|(k, _)| *k).collect();
            t.on_scrape(move || {
                for (kind, k) in transports.stats().per_transport {
                    // Only transports in use: an unused one would be a row of zeros.
                    if !bound.contains(&kind) && k.sent == 0 && k.connections_open == 0 {
                        continue;
                    }
                    let name = kind.to_string();
                    open.with_label_values(&[name.as_str()])
                        .set(k.connections_open as i64);
                    let c = |vec: &prometheus::IntCounterVec, label: &str, n: u64| {
                        crate::metrics::catch_up(&vec.with_label_values(&[name.as_str(), label]), n)
                    };
                    if kind.has_handshake() {
                        c(&handshakes, "failed", k.handshakes_failed);
                        c(&handshakes, "refused", k.handshakes_refused);
                    }
                    c(&messages, "in", k.received);
                    c(&messages, "out", k.sent);
                }
            });
        }
        if let Some(p) = pike.clone() {
            let dropped = t.counter(
                "strowger_pike_dropped_total",
                "Requests outside dialogs dropped because their source was blocked (sip.pike_requests)",
            )?;
            let blocks = t.counter(
                "strowger_pike_blocks_total",
                "Times a source address was blocked for sending too many requests",
            )?;
            t.on_scrape(move || {
                crate::metrics::catch_up(&dropped, p.dropped_total());
                crate::metrics::catch_up(&blocks, p.blocks_total());
            });
        }
        Ok(t)
    })()
    .context("setting up metrics")?;
    let drain_layer = layer.clone();
    let admin_options = crate::admin::AdminOptions {
        token: config.http.token.clone(),
        open_local_writes: config.http.open_local_writes,
        max_connections: config.http.max_connections,
        read_timeout: std::time::Duration::from_secs(config.http.read_timeout_s),
        // `POST /drain`: the same first step as a graceful shutdown, without the stop.
        drain: Box::new(move || {
            drain_layer.stop_accepting();
            drain_layer.unanswered()
        }),
        calls: {
            let b2bua = b2bua.clone();
            Box::new(move || {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let list: Vec<serde_json::Value> = b2bua
                    .calls()
                    .into_iter()
                    .map(|c| {
                        let duration = c.answered.map_or(0.0, |a| now - a);
                        let mut v = serde_json::to_value(&c).unwrap_or_default();
                        v["duration_s"] = serde_json::json!(duration);
                        v["age_s"] = serde_json::json!(now - c.started);
                        v
                    })
                    .collect();
                serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
            })
        },
        trace: {
            let b2bua = b2bua.clone();
            Box::new(move |id| b2bua.trace(id))
        },
        transfer: {
            let b2bua = b2bua.clone();
            Box::new(move |id, target, to_caller| {
                let b2bua = b2bua.clone();
                Box::pin(async move { b2bua.transfer(&id, target, to_caller).await })
            })
        },
        huntgroups: huntgroups.clone(),
        trunks: trunks.clone(),
        tls: Some(tls.clone()),
    };
    let admin = crate::admin::start(
        http,
        admin_options,
        scripts.clone(),
        registrar.clone(),
        telemetry,
    )
    .await
    .with_context(|| format!("binding http.listen {http}"))?;
    tracing::info!(addr = %admin.addr(), "admin HTTP listening");
    let _ = dispatcher.layer.set(layer.clone());
    let _ = dispatcher.sender.set(transports.clone());
    for (kind, addr) in transports.local_addrs() {
        tracing::info!(%kind, %addr, "listening");
    }
    // Once answers can reach the layer: the first REGISTERs and pings go out now.
    let trunk_tasks = (!trunks.is_empty())
        .then(|| trunks.start(layer.clone(), LocalAddrs::new(transports.local_addrs())));
    Ok(ServerHandle {
        transports,
        layer,
        b2bua,
        scripts,
        admin,
        registrar,
        keepalive,
        trunk_tasks,
        stats,
        huntgroups,
        presence,
        dialogs,
        trunks,
        tls,
        cluster,
    })
}

/// The TLS context: `[tls]`'s certificate (when set) and roots, and each trunk's client
/// certificate by the name of the server it is presented to. Built at every start, TLS
/// configured or not: a dial plan may dial a `sips:` URI, which needs the client side.
/// A file that fails `tls::check_files` stops the start with the file and the problem.
fn load_tls(config: &Config) -> anyhow::Result<Arc<TlsContext>> {
    let tls = TlsContext::load(config.tls.files()).context("tls.cert, tls.key, tls.ca")?;
    if let Some(cert) = tls.certificate() {
        log_certificate(&cert, "TLS certificate loaded");
    }
    for (name, trunk) in &config.trunks {
        if let Some((server, identity)) = trunk.tls_identity() {
            tls.add_client_identity(&server, &identity)
                .with_context(|| format!("trunks.{name}.tls_cert, tls_key"))?;
            tracing::info!(trunk = %name, %server, cert = %identity.cert.display(), "TLS client certificate loaded");
        }
    }
    Ok(Arc::new(tls))
}

/// Logs the certificate in use; a warning when it expires within
/// [`crate::transport::tls::EXPIRY_WARNING`].
fn log_certificate(cert: &crate::transport::tls::CertSummary, what: &str) {
    use crate::transport::tls::{utc, EXPIRY_WARNING};
    let left = cert.expires_in(std::time::SystemTime::now());
    tracing::info!(subject = %cert.subject, names = ?cert.sans, expires = %utc(cert.not_after), "{what}");
    if left < EXPIRY_WARNING {
        tracing::warn!(
            subject = %cert.subject,
            expires = %utc(cert.not_after),
            days_left = left.as_secs() / 86_400,
            "the TLS certificate expires soon: renew it and reload (SIGHUP or strowger reload)"
        );
    }
}

/// Re-reads `tls.cert`/`tls.key` (SIGHUP): a pair that fails its checks is refused and the
/// running one stays; established connections are not touched either way.
fn reload_tls(tls: &TlsContext) {
    match tls.reload() {
        Ok(()) => {
            if let Some(cert) = tls.certificate() {
                log_certificate(&cert, "TLS certificate reloaded");
            }
        }
        Err(e) => tracing::error!(
            error = %e,
            "TLS certificate reload refused; the running certificate stays"
        ),
    }
}

// ---- cluster (issue 18) ----------------------------------------------------------------

/// cluster: joins the cluster when `cluster.enabled` (None otherwise: nothing of it runs,
/// no Redis connection, nothing per call): this node's lease in Redis, the watch over the
/// other nodes, whose calls the B2BUA ends when they die, and the B2BUA's call records.
/// The node's name is `cluster.node`, or the first SIP address as presence names it.
async fn start_cluster(
    config: &Config,
    b2bua: &B2bua,
    transports: &Transports,
) -> anyhow::Result<Option<crate::cluster::Cluster>> {
    use crate::cluster::{Cluster, ClusterOptions, TakeoverHandler};
    if !config.cluster.enabled {
        return Ok(None);
    }
    let node = if config.cluster.node.is_empty() {
        transports
            .local_addrs()
            .first()
            .map(|(k, a)| format!("{k}:{a}"))
            .unwrap_or_default()
    } else {
        config.cluster.node.clone()
    };
    let handler: TakeoverHandler = {
        let b2bua = b2bua.clone();
        Arc::new(move |t| {
            b2bua.take_over(&t);
        })
    };
    let options = ClusterOptions::new(
        &config.redis.url,
        &node,
        Duration::from_secs(config.cluster.lease_s),
    );
    let cluster = Cluster::start(options, handler)
        .await
        .with_context(|| format!("joining the cluster through redis.url {}", config.redis.url))?;
    b2bua.set_cluster(cluster.records());
    Ok(Some(cluster))
}

// ---- hunt groups (issue 6) -------------------------------------------------------------

/// Where registrations, presence and agents live: `registrar.store`, or Redis whatever it
/// says when `cluster.enabled` (the one switch of a cluster).
fn shared_store(config: &Config) -> RegistrarStore {
    if config.cluster.enabled {
        RegistrarStore::Redis
    } else {
        config.registrar.store
    }
}

/// Opens the agent-state store beside the registrar's (`registrar.store`: SQLite file
/// `<storage.dir>/huntgroups.sqlite`, or Redis under `strowger:hunt`) and builds the
/// configured groups; None when no group is configured. With `cluster.enabled` the
/// queues, agent claims and round-robin cursors are the cluster's, in Redis too.
async fn start_huntgroups(config: &Config) -> anyhow::Result<Option<crate::huntgroup::HuntGroups>> {
    use crate::huntgroup::{
        AgentStore, HuntGroups, RedisAgentStore, RedisSharedHunt, SharedHunt, SqliteAgentStore,
    };
    if config.huntgroups.is_empty() {
        return Ok(None);
    }
    let shared: Option<Arc<dyn SharedHunt>> = if config.cluster.enabled {
        // The node's name, or its first listen address (only a label in claims: each
        // start adds a random suffix, so equal names do not collide).
        let node = if config.cluster.node.is_empty() {
            config.sip.listen.first().cloned().unwrap_or_default()
        } else {
            config.cluster.node.clone()
        };
        let lease = Duration::from_secs(config.cluster.lease_s);
        Some(Arc::new(
            RedisSharedHunt::connect(&config.redis.url, "strowger:hunt", &node, lease)
                .await
                .with_context(|| format!("connecting to redis.url {}", config.redis.url))?,
        ))
    } else {
        None
    };
    let store: Arc<dyn AgentStore> =
        match shared_store(config) {
            RegistrarStore::Embedded => {
                let dir = std::path::Path::new(&config.storage.dir);
                Arc::new(SqliteAgentStore::open(dir).with_context(|| {
                    format!("opening the hunt-group store in {}", dir.display())
                })?)
            }
            RegistrarStore::Redis => Arc::new(
                RedisAgentStore::connect(&config.redis.url)
                    .await
                    .with_context(|| format!("connecting to redis.url {}", config.redis.url))?,
            ),
        };
    let clustered = shared.is_some();
    let groups = HuntGroups::start_with(
        &config.huntgroups,
        &config.sip.domain.to_ascii_lowercase(),
        store,
        shared,
    )
    .await
    .context("loading hunt-group agent state")?;
    tracing::info!(groups = ?groups.names(), clustered, "hunt groups ready");
    Ok(Some(groups))
}

/// Registered contacts (the registrar) and calls in progress (the B2BUA) for hunting.
struct HuntDirectory {
    location: Arc<Location>,
    b2bua: B2bua,
}

impl crate::huntgroup::Directory for HuntDirectory {
    fn contacts(&self, aor: &str) -> Vec<String> {
        self.location.lookup(aor)
    }
    fn on_call(&self, uris: &[String]) -> bool {
        self.b2bua.on_call(uris)
    }
}

/// presence: opens `storage.dir/presence.sqlite` (Redis with `registrar.store = "redis"`)
/// and starts the presence core.
async fn start_presence(
    config: &Config,
    layer: &TransactionLayer,
    transports: &Transports,
    scripts: &ScriptEngine,
    location: Arc<Location>,
    (users, digest): (Option<Arc<Users>>, DigestAuth),
    (b2bua, dialogs): (
        &B2bua,
        Arc<crate::dialog::Subscriptions<CallRef, SubscriptionUsage>>,
    ),
) -> anyhow::Result<crate::presence::Presence> {
    use crate::presence::{Presence, PresenceParts, SqlitePresenceStore};
    let store: Arc<dyn crate::presence::PresenceStore> = match shared_store(config) {
        RegistrarStore::Embedded => {
            let dir = std::path::Path::new(&config.storage.dir);
            Arc::new(
                SqlitePresenceStore::open(dir)
                    .with_context(|| format!("opening the presence store in {}", dir.display()))?,
            )
        }
        RegistrarStore::Redis => Arc::new(
            crate::presence::RedisPresenceStore::connect(&config.redis.url)
                .await
                .with_context(|| format!("connecting to redis.url {}", config.redis.url))?,
        ),
    };
    let node = transports
        .local_addrs()
        .first()
        .map(|(k, a)| format!("{k}:{a}"))
        .unwrap_or_default();
    Presence::start(PresenceParts {
        config: config.presence.policy(&config.sip.domain),
        layer: layer.clone(),
        local: location.local.clone(),
        scripts: Arc::new(scripts.clone()),
        location: location.clone(),
        flows: location,
        users: users.clone(),
        store,
        calls: Some(b2bua.call_watch().subscribe()),
        auth: users
            .clone()
            .filter(|_| config.presence.authenticate)
            .map(|u| (digest, u)),
        live_calls: Some({
            let b2bua = b2bua.clone();
            Arc::new(move || b2bua.call_changes())
        }),
        call_interest: Some(b2bua.call_watch().interest()),
        node,
        dialogs,
    })
    .await
    .context("loading presence state")
}

/// Digest authentication (always ready: `on_register` may give credentials) and the
/// users of `registrar.users_file` when it is set.
fn load_auth(config: &Config) -> anyhow::Result<(DigestAuth, Option<Arc<Users>>)> {
    let realm = config.sip.domain.clone();
    let digest = DigestAuth::new(config.auth.digest(realm.clone()));
    let path = config.registrar.users_file.trim();
    if path.is_empty() {
        tracing::warn!(
            "registrar.users_file is not set: REGISTER is accepted without authentication \
             unless on_register gives credentials"
        );
        return Ok((digest, None));
    }
    let users = Users::load(std::path::Path::new(path), &realm)
        .with_context(|| format!("registrar.users_file {path}"))?;
    tracing::info!(users = users.len(), "digest authentication of REGISTER on");
    Ok((digest, Some(Arc::new(users))))
}

/// Opens the configured binding store (`registrar.store`) and loads the registrar.
async fn start_registrar(config: &Config) -> anyhow::Result<Registrar> {
    let store: Arc<dyn BindingStore> = match shared_store(config) {
        RegistrarStore::Embedded => {
            let dir = std::path::Path::new(&config.storage.dir);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating storage.dir {}", dir.display()))?;
            Arc::new(
                SqliteStore::open(dir)
                    .with_context(|| format!("opening the registrar store in {}", dir.display()))?,
            )
        }
        RegistrarStore::Redis => Arc::new(
            RedisStore::connect(&config.redis.url)
                .await
                .with_context(|| format!("connecting to redis.url {}", config.redis.url))?,
        ),
    };
    let registrar = Registrar::start(config.registrar.policy(), store)
        .await
        .context("loading registrations")?;
    tracing::info!(bindings = registrar.count(), "registrar ready");
    Ok(registrar)
}

/// The registrar as the dial plan and the B2BUA see it.
struct Location {
    registrar: Registrar,
    /// `sip.domain` and the server's own addresses: an address in any of them is the
    /// domain's.
    domain: String,
    local: LocalAddrs,
}

impl LocationService for Location {
    fn lookup(&self, aor: &str) -> Vec<String> {
        let Ok(uri) = crate::sip::Uri::parse(aor.trim()) else {
            return Vec::new();
        };
        // The same canonical form the UAS core registers under.
        let aor = self.local.canonical_aor(&uri, &self.domain);
        self.registrar
            .lookup(&aor)
            .into_iter()
            .map(|b| b.contact)
            .collect()
    }
}

impl ContactFlows for Location {
    fn flow(&self, contact: &str) -> Option<(crate::transport::Target, Vec<String>)> {
        let b = self.registrar.binding_for_contact(contact)?;
        let source: ListenAddr = b.source.parse().ok()?;
        // Where the REGISTER came from is used when the contact cannot be reached as
        // written: over TCP (the phone's own connection, RFC 5626 style), and behind NAT,
        // seen as a Contact IP other than the source IP (a private address). A phone
        // whose Contact IP is the one it registered from is reached at its Contact.
        let contact_ip = crate::sip::Uri::parse(contact)
            .ok()
            .and_then(|u| u.host.ip());
        let natted = contact_ip != Some(source.addr.ip());
        if b.connection.is_none() && !natted {
            return if b.path.is_empty() {
                None
            } else {
                // Path without NAT: still route through the edge proxy (RFC 3327).
                Some((
                    crate::transport::Target {
                        transport: source.kind,
                        addr: source.addr,
                        connection: None,
                    },
                    b.path,
                ))
            };
        }
        Some((
            crate::transport::Target {
                transport: source.kind,
                addr: source.addr,
                connection: b.connection.and_then(crate::transport::ConnectionId::new),
            },
            b.path,
        ))
    }
}

/// Runs the server until SIGINT or SIGTERM, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let server = start(&config).await?;
    wait_for_stop(&server).await?;
    tracing::info!(
        calls = server.active_calls(),
        dialogs = server.b2bua().dialogs(),
        transactions = server.transactions(),
        "shutting down"
    );
    server
        .shutdown(Duration::from_secs(config.shutdown.drain_timeout_s))
        .await;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM; SIGHUP reloads the script meanwhile (new calls use the new
/// version, calls in progress keep theirs; a script that does not compile is refused and
/// the running one stays) and the TLS certificate (new handshakes use the new one).
async fn wait_for_stop(server: &ServerHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                match server.scripts.reload().await {
                    Ok(()) => tracing::info!(version = server.scripts.current().version(), "script reloaded"),
                    Err(e) => tracing::error!(error = %e, "script reload refused; the running version stays"),
                }
                reload_tls(&server.tls);
            }
        }
    }
}

/// How often the overload detector's refused fraction moves.
const OVERLOAD_WINDOW: Duration = Duration::from_millis(100);

/// Feeds the overload detector how late this runtime runs a timer (the SIP thread busy
/// past its capacity makes every message wait as long) and how long datagrams stood in the
/// UDP sockets' queues before they were read, and how full the script VMs are; ends
/// with the server.
async fn probe_lateness(
    overload: std::sync::Weak<crate::overload::Overload>,
    transports: Transports,
    scripts: ScriptEngine,
) {
    const TICK: Duration = Duration::from_millis(10);
    loop {
        let asked = tokio::time::Instant::now();
        tokio::time::sleep(TICK).await;
        let now = tokio::time::Instant::now();
        let Some(o) = overload.upgrade() else {
            return;
        };
        let late = now.duration_since(asked).saturating_sub(TICK);
        o.observe(crate::overload::Queue::Sip, late, now);
        if let Some(waited) = transports.take_udp_queue_delay() {
            o.observe(crate::overload::Queue::Socket, waited, now);
        }
        if let Some(waited) = scripts.take_queue_delay() {
            o.observe(crate::overload::Queue::Script, waited, now);
        }
        o.note_script_memory(scripts.memory().highest_share);
    }
}
