//! SIP trunks to carriers: where each one is, how the PBX proves itself to it, what it
//! presents, how many calls it may carry, and whether it is up and registered.
//!
//! Owns: the trunks of `[trunks.<name>]` (config in `config.rs`), their channel counts
//! (`max_channels`), their health and registration state, and the digest client of each
//! (`auth::DigestClient`). Must not touch: the calls themselves (the B2BUA asks a trunk for
//! a channel, its request URI and identity headers, and answers its challenges with the
//! trunk's client), sockets.
//!
//! ## Config keys (`[trunks.<name>]`: [`TrunkConfig`])
//! `uri` (or `host`/`port`/`transport`), `outbound_proxy`, `username`, `password` (or
//! `ha1_md5`/`ha1_sha256` with `realm`), `realm`, `register`, `expires`, `from_user`,
//! `from_domain`, `caller_id` (pai|ppi|none), `privacy` (none|id), `max_channels`,
//! `inbound` (IPs and CIDRs), `ping_interval_s`, `tls_cert`/`tls_key` (a client certificate
//! for mutual TLS, presented to the trunk's first hop).
//!
//! The tasks that keep trunks registered (`register.rs`, RFC 3261 10.2) and ping them
//! (`health.rs`, OPTIONS) are started by the server with [`Trunks::start`]; both send
//! through the transaction layer (which retransmits and times out), never on sockets.

mod config;
mod health;
mod register;

pub use config::{check_trunks, IdentityHeader, Network, TrunkConfig, MAX_TRUNKS};
pub use register::{refresh_delay, retry_delay, Action, Outcome, Outgoing, Registration};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::auth::{ClientCredentials, ClientSecret, DigestClient};
use crate::sip::{
    new_call_id, new_tag, BaseHeaders, CSeq, Headers, Method, NameAddr, Request, Uri,
};
use crate::transaction::TransactionLayer;
use crate::transport::{LocalAddrs, Target};

/// Why a trunk cannot take a call now: the script tells these apart (`outcome.status`
/// 503 with these reasons, `outcome.source == "local"`) and fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("Trunk Down")]
    Down,
    #[error("Trunk Busy")]
    Full,
}

/// Calls through a trunk, by how they ended (metric `strowger_trunk_calls_total`).
#[derive(Debug, Default)]
pub struct TrunkCounters {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    /// Refused here: the trunk was down or at `max_channels`.
    pub refused: AtomicU64,
    /// Challenges answered with the trunk's credentials.
    pub challenges_answered: AtomicU64,
    /// Challenges not answerable or answered and refused again.
    pub auth_failures: AtomicU64,
    /// REGISTER attempts that ended registered (200) / not (error, timeout, refused).
    pub registrations_ok: AtomicU64,
    pub registrations_failed: AtomicU64,
}

/// Where a trunk's registration stands (`GET /trunks`). Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegistrationStatus {
    /// When the registration the carrier granted lapses (while registered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When the next attempt goes out (after a failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<u64>,
    /// The status of the last final response to a REGISTER (408 for a timeout, 503 for a
    /// transport error, as RFC 3261 8.1.3.1 has them seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
}

/// A trunk as `GET /trunks` shows it (and `strowger trunks` reads it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrunkView {
    pub name: String,
    pub uri: String,
    /// Answering pings (always true without `ping_interval_s`).
    pub up: bool,
    /// Whether it registers at all (`register`).
    pub register: bool,
    pub registered: bool,
    /// Channels in use, and the most (0: no limit).
    pub channels: u32,
    pub max_channels: u32,
    pub registration: RegistrationStatus,
    pub calls: CallCounts,
    pub auth_failures: u64,
}

/// Calls through a trunk by how they ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallCounts {
    pub answered: u64,
    pub failed: u64,
    pub refused: u64,
}

/// One trunk.
#[derive(Debug)]
pub struct Trunk {
    name: String,
    config: TrunkConfig,
    uri: Uri,
    proxy: Option<Uri>,
    networks: Vec<Network>,
    identity: IdentityHeader,
    client: Option<DigestClient>,
    channels: AtomicU32,
    /// Answering pings (true when pings are off).
    up: AtomicBool,
    registered: AtomicBool,
    registration: Mutex<RegistrationStatus>,
    pub counters: TrunkCounters,
}

/// A call's hold on one of a trunk's channels; dropping it frees the channel.
#[derive(Debug)]
pub struct Channel(Arc<Trunk>);

impl Channel {
    pub fn trunk(&self) -> &Arc<Trunk> {
        &self.0
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.0.channels.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Trunk {
    /// Builds a trunk from its checked config (`None` when it does not pass the check).
    pub fn new(name: &str, config: &TrunkConfig) -> Option<Trunk> {
        config.check().ok()?;
        let uri = config.target_uri().ok()?;
        let secret = if !config.password.is_empty() {
            Some(ClientSecret::Password(config.password.clone()))
        } else if !config.ha1_md5.is_empty() || !config.ha1_sha256.is_empty() {
            let some = |s: &String| (!s.is_empty()).then(|| s.to_ascii_lowercase());
            Some(ClientSecret::Ha1 {
                md5: some(&config.ha1_md5),
                sha256: some(&config.ha1_sha256),
            })
        } else {
            None
        };
        let client = secret.map(|secret| {
            DigestClient::new(ClientCredentials {
                username: config.username.clone(),
                secret,
                realm: (!config.realm.is_empty()).then(|| config.realm.clone()),
            })
        });
        Some(Trunk {
            name: name.to_string(),
            uri,
            proxy: config.proxy_uri(),
            networks: config.networks(),
            identity: IdentityHeader::parse(&config.caller_id)?,
            client,
            channels: AtomicU32::new(0),
            up: AtomicBool::new(true),
            registered: AtomicBool::new(false),
            registration: Mutex::new(RegistrationStatus::default()),
            counters: TrunkCounters::default(),
            config: config.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &TrunkConfig {
        &self.config
    }

    /// The carrier's URI (no user).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Where requests go first: the outbound proxy, else the trunk itself.
    pub fn next_hop(&self) -> &Uri {
        self.proxy.as_ref().unwrap_or(&self.uri)
    }

    /// The outbound proxy, if any (a Route header to pre-load, RFC 3261 8.1.2).
    pub fn proxy(&self) -> Option<&Uri> {
        self.proxy.as_ref()
    }

    /// The digest client answering this trunk's challenges, when it has credentials.
    pub fn client(&self) -> Option<&DigestClient> {
        self.client.as_ref()
    }

    /// The Request-URI of a call to `user` (a number) through the trunk: the trunk's URI
    /// with that user (its parameters, e.g. transport, kept).
    pub fn request_uri(&self, user: &str) -> Uri {
        let mut uri = self.uri.clone();
        uri.user = Some(user.to_string());
        uri
    }

    /// The domain presented in From: `from_domain`, else the trunk's host.
    pub fn from_domain(&self) -> String {
        if self.config.from_domain.is_empty() {
            self.uri.host.to_string()
        } else {
            self.config.from_domain.clone()
        }
    }

    /// The From of a call through the trunk presenting `caller_id` (a user part), with the
    /// trunk's privacy policy applied (RFC 3323 4.1.1.3: an anonymous From when the
    /// identity is withheld; the identity header still tells the carrier).
    pub fn from(&self, caller_id: &str, privacy: bool) -> NameAddr {
        let text = if privacy {
            "\"Anonymous\" <sip:anonymous@anonymous.invalid>".to_string()
        } else {
            let user = if self.config.from_user.is_empty() {
                caller_id
            } else {
                &self.config.from_user
            };
            format!("<sip:{user}@{}>", self.from_domain())
        };
        // The parts were checked at load (plain tokens) or come from a checked caller ID.
        NameAddr::parse(&text).unwrap_or_else(|_| NameAddr::new(self.request_uri(caller_id)))
    }

    /// The identity header (name, value) of a call presenting `caller_id`, per `caller_id`
    /// policy (RFC 3325 9.1 / 9.2).
    pub fn identity(&self, caller_id: &str) -> Option<(&'static str, String)> {
        self.identity
            .header()
            .map(|h| (h, format!("<sip:{caller_id}@{}>", self.from_domain())))
    }

    /// Whether calls presenting through this trunk withhold the caller's identity by
    /// default (`privacy = "id"`).
    pub fn privacy(&self) -> bool {
        self.config.privacy == "id"
    }

    /// Whether a request from `ip` comes from this trunk (`inbound`).
    pub fn is_source(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// Takes a channel for a call, or says why not (down, or at `max_channels`).
    pub fn seize(self: &Arc<Self>) -> Result<Channel, Unavailable> {
        if !self.is_up() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Unavailable::Down);
        }
        let max = self.config.max_channels;
        let taken = self
            .channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Channel(self.clone())),
            Err(_) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(Unavailable::Full)
            }
        }
    }

    /// Channels in use.
    pub fn channels(&self) -> u32 {
        self.channels.load(Ordering::Acquire)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Health as the pings see it; returns whether it changed.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::AcqRel) != up
    }

    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Release);
    }

    /// What `GET /trunks` shows of the trunk.
    pub fn view(&self) -> TrunkView {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TrunkView {
            name: self.name.clone(),
            uri: self.uri.to_text(),
            up: self.is_up(),
            register: self.config.register,
            registered: self.is_registered(),
            channels: self.channels(),
            max_channels: self.config.max_channels,
            registration: self.registration(),
            calls: CallCounts {
                answered: n(&c.answered),
                failed: n(&c.failed),
                refused: n(&c.refused),
            },
            auth_failures: n(&c.auth_failures),
        }
    }

    /// Where the registration stands (all `None` for a trunk that does not register).
    pub fn registration(&self) -> RegistrationStatus {
        self.registration.lock().clone()
    }

    pub(crate) fn set_registration(&self, status: RegistrationStatus) {
        *self.registration.lock() = status;
    }

    /// The address of record the trunk registers: `sip:{username}@{from_domain or host}`.
    pub fn aor(&self) -> Uri {
        let mut uri = Uri::sip(None, self.uri.host.clone(), None);
        if !self.config.from_domain.is_empty() {
            if let Ok(h) = crate::sip::Host::parse(&self.config.from_domain) {
                uri.host = h;
            }
        }
        if !self.config.username.is_empty() {
            uri.user = Some(self.config.username.clone());
        }
        uri
    }

    /// Our Contact towards `target` as the trunk sees it: our address with the user part
    /// `username` and the parameter `line=<trunk name>` (the carrier sends calls to this
    /// URI; [`Trunks::from_line`] recognises them).
    pub fn contact(&self, local: &LocalAddrs, target: &Target) -> Uri {
        let text = local.contact_uri(target);
        let mut uri = Uri::parse(&text).unwrap_or_else(|_| self.uri.clone());
        if !self.config.username.is_empty() {
            uri.user = Some(self.config.username.clone());
        }
        uri.params.set("line", Some(&self.name));
        uri
    }

    /// A request outside any dialog to the trunk (RFC 3261 8.1.1): Request-URI the trunk's
    /// URI, From `from` with a fresh tag, To `to`, a fresh Call-ID and CSeq 1 (a caller
    /// keeping a registration's sets its own), our Via towards `target` (the next hop), a
    /// Route to the outbound proxy when there is one (RFC 3261 8.1.2, loose routing).
    pub(crate) fn new_request(
        &self,
        method: Method,
        from: Uri,
        to: Uri,
        local: &LocalAddrs,
        target: &Target,
    ) -> Request {
        let mut from = NameAddr::new(from);
        from.set_tag(&new_tag());
        let mut headers = Headers::new();
        if let Some(proxy) = &self.proxy {
            let mut hop = proxy.clone();
            if !hop.params.has("lr") {
                hop.params.set("lr", None);
            }
            headers.push("Route", format!("<{hop}>"));
        }
        Request {
            method: method.clone(),
            uri: self.uri.clone(),
            version: "2.0".into(),
            base: BaseHeaders {
                via: vec![local.via(target)],
                from: from.into(),
                to: NameAddr::new(to).into(),
                call_id: Trunk::call_id(local, target),
                cseq: CSeq { seq: 1, method },
            },
            max_forwards: Some(70),
            headers,
            body: bytes::Bytes::new(),
        }
    }

    /// A fresh Call-ID on the address we use towards `target`.
    pub(crate) fn call_id(local: &LocalAddrs, target: &Target) -> String {
        let host = local
            .towards(target.transport, &target.addr)
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "strowger".into());
        new_call_id(&host)
    }

    /// A fresh From tag.
    pub(crate) fn tag() -> String {
        new_tag()
    }
}

/// Every configured trunk, by name.
#[derive(Debug, Default, Clone)]
pub struct Trunks {
    by_name: BTreeMap<String, Arc<Trunk>>,
}

impl Trunks {
    /// The trunks of a checked configuration.
    pub fn new(config: &BTreeMap<String, TrunkConfig>) -> Trunks {
        Trunks {
            by_name: config
                .iter()
                .filter_map(|(name, c)| Some((name.clone(), Arc::new(Trunk::new(name, c)?))))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Trunk>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Trunk>> {
        self.by_name.values()
    }

    /// The trunk a request from `ip` comes from (its `inbound` sources; the first by
    /// name when several list it).
    pub fn from_source(&self, ip: IpAddr) -> Option<&Arc<Trunk>> {
        self.by_name.values().find(|t| t.is_source(ip))
    }

    /// The trunk a request's URI names with its `line` parameter: the Contact the trunk
    /// registered (`sip:{username}@{our address};line=<name>`), which the carrier echoes as
    /// the Request-URI of calls to us.
    pub fn from_line(&self, line: &str) -> Option<&Arc<Trunk>> {
        self.by_name.get(line).filter(|t| t.config.register)
    }

    /// Starts the registration task of every trunk with `register = true` and the
    /// OPTIONS pings of every trunk with `ping_interval_s`; they send through `layer`.
    /// Needs a tokio runtime. Dropping the handle ends the tasks at once;
    /// [`TrunkTasks::shutdown`] unregisters first.
    pub fn start(&self, layer: TransactionLayer, local: LocalAddrs) -> TrunkTasks {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for trunk in self.iter() {
            if trunk.config.register {
                tasks.push(tokio::spawn(register::run(
                    trunk.clone(),
                    layer.clone(),
                    local.clone(),
                    stopped.clone(),
                )));
            }
            if trunk.config.ping_interval_s > 0 {
                tasks.push(tokio::spawn(health::run(
                    trunk.clone(),
                    Duration::from_secs(trunk.config.ping_interval_s),
                    layer.clone(),
                    local.clone(),
                    stopped.clone(),
                )));
            }
        }
        if !tasks.is_empty() {
            tracing::info!(
                tasks = tasks.len(),
                "trunk registration and ping tasks started"
            );
        }
        TrunkTasks { stop, tasks }
    }

    /// Registers the trunk metrics (read from the trunks' own atomics at each scrape):
    /// `strowger_trunk_registered`, `_up`, `_channels` (gauges), `strowger_trunk_calls_total
    /// {result}`, `_auth_failures_total`, `_registrations_total{result}`, each by `trunk`.
    pub fn register_metrics(
        &self,
        t: &crate::metrics::Telemetry,
    ) -> Result<(), crate::metrics::Error> {
        if self.is_empty() {
            return Ok(());
        }
        let registered = t.gauge_vec(
            "strowger_trunk_registered",
            "1 while the trunk's registration is in force (register = true), else 0",
            &["trunk"],
        )?;
        let up = t.gauge_vec(
            "strowger_trunk_up",
            "1 while the trunk answers OPTIONS pings (always 1 without ping_interval_s)",
            &["trunk"],
        )?;
        let channels = t.gauge_vec(
            "strowger_trunk_channels",
            "Calls in progress through the trunk (channels in use)",
            &["trunk"],
        )?;
        let calls = t.counter_vec(
            "strowger_trunk_calls_total",
            "Calls through the trunk by outcome: answered, failed, refused (down or full)",
            &["trunk", "result"],
        )?;
        let auth = t.counter_vec(
            "strowger_trunk_auth_failures_total",
            "Challenges from the trunk that could not be answered or whose answer was refused",
            &["trunk"],
        )?;
        let regs = t.counter_vec(
            "strowger_trunk_registrations_total",
            "REGISTER attempts to the trunk by result: ok (200), failed (error, timeout)",
            &["trunk", "result"],
        )?;
        let trunks = self.clone();
        t.on_scrape(move || {
            use crate::metrics::{catch_up, load};
            for trunk in trunks.iter() {
                let name = trunk.name();
                let c = &trunk.counters;
                registered
                    .with_label_values(&[name])
                    .set(i64::from(trunk.is_registered()));
                up.with_label_values(&[name]).set(i64::from(trunk.is_up()));
                channels
                    .with_label_values(&[name])
                    .set(i64::from(trunk.channels()));
                for (result, n) in [
                    ("answered", &c.answered),
                    ("failed", &c.failed),
                    ("refused", &c.refused),
                ] {
                    catch_up(&calls.with_label_values(&[name, result]), load(n));
                }
                catch_up(&auth.with_label_values(&[name]), load(&c.auth_failures));
                for (result, n) in [
                    ("ok", &c.registrations_ok),
                    ("failed", &c.registrations_failed),
                ] {
                    catch_up(&regs.with_label_values(&[name, result]), load(n));
                }
            }
        });
        Ok(())
    }
}

/// The running registration and ping tasks. Dropping it aborts them;
/// [`shutdown`](Self::shutdown) lets registered trunks unregister first.
pub struct TrunkTasks {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TrunkTasks {
    /// Graceful stop: the pings end, each registered trunk sends REGISTER with Expires: 0
    /// (RFC 3261 10.2.2) and waits for its answer, for `within` at most.
    pub async fn shutdown(mut self, within: Duration) {
        let _ = self.stop.send(true);
        let all = async {
            for t in &mut self.tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("trunks not all unregistered within the drain time");
        }
        // Dropped here: whatever is left is aborted.
    }
}

impl Drop for TrunkTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trunks(f: impl FnOnce(&mut TrunkConfig)) -> Trunks {
        let mut c = TrunkConfig {
            uri: "sip:sip.carrier.example;transport=tcp".into(),
            inbound: vec!["192.0.2.0/28".into()],
            ..TrunkConfig::default()
        };
        f(&mut c);
        Trunks::new(&BTreeMap::from([("carrier1".to_string(), c)]))
    }

    #[test]
    fn channels_are_bounded_and_given_back() {
        let t = trunks(|c| c.max_channels = 2);
        let trunk = t.get("carrier1").unwrap();
        let a = trunk.seize().unwrap();
        let b = trunk.seize().unwrap();
        assert_eq!(trunk.seize().unwrap_err(), Unavailable::Full);
        assert_eq!(trunk.channels(), 2);
        drop(a);
        let c = trunk.seize().unwrap();
        drop((b, c));
        assert_eq!(trunk.channels(), 0);
        trunk.set_up(false);
        assert_eq!(trunk.seize().unwrap_err(), Unavailable::Down);
        assert_eq!(trunk.counters.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn request_uri_from_and_identity() {
        let t = trunks(|c| c.from_user = "pbx1".into());
        let trunk = t.get("carrier1").unwrap();
        assert_eq!(
            trunk.request_uri("+15551234").to_string(),
            "sip:+15551234@sip.carrier.example;transport=tcp"
        );
        assert_eq!(
            trunk.from("1001", false).to_string(),
            "<sip:pbx1@sip.carrier.example>"
        );
        assert!(trunk
            .from("1001", true)
            .to_string()
            .contains("anonymous.invalid"));
        assert_eq!(
            trunk.identity("+15550000"),
            Some((
                "P-Asserted-Identity",
                "<sip:+15550000@sip.carrier.example>".to_string()
            ))
        );
        assert!(trunk.is_source("192.0.2.9".parse().unwrap()));
        assert!(!trunk.is_source("192.0.2.17".parse().unwrap()));
        assert_eq!(
            t.from_source("192.0.2.1".parse().unwrap())
                .map(|t| t.name()),
            Some("carrier1")
        );
        let none = trunks(|c| c.caller_id = "none".into());
        assert_eq!(none.get("carrier1").unwrap().identity("1"), None);
    }

    #[test]
    fn register_identity_contact_line_and_route() {
        use crate::transport::TransportKind;
        let t = trunks(|c| {
            c.username = "pbx".into();
            c.password = "s".into();
            c.register = true;
            c.outbound_proxy = "sip:proxy.carrier.example:5070".into();
        });
        let trunk = t.get("carrier1").unwrap();
        assert_eq!(trunk.aor().to_string(), "sip:pbx@sip.carrier.example");
        let local = LocalAddrs::new(vec![
            (TransportKind::Udp, "192.0.2.1:5060".parse().unwrap()),
            (TransportKind::Tcp, "192.0.2.1:5061".parse().unwrap()),
        ]);
        let target = Target {
            transport: TransportKind::Tcp,
            addr: "198.51.100.7:5070".parse().unwrap(),
            connection: None,
        };
        assert_eq!(
            trunk.contact(&local, &target).to_string(),
            "sip:pbx@192.0.2.1:5061;transport=tcp;line=carrier1"
        );
        assert_eq!(t.from_line("carrier1").map(|t| t.name()), Some("carrier1"));
        assert!(t.from_line("other").is_none());
        let mut req =
            trunk.new_request(Method::Register, trunk.aor(), trunk.aor(), &local, &target);
        req.base.from.set_tag("tag1");
        req.base.cseq.seq = 7;
        let text = String::from_utf8(req.to_bytes().to_vec()).unwrap();
        assert!(
            text.starts_with("REGISTER sip:sip.carrier.example;transport=tcp SIP/2.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Route: <sip:proxy.carrier.example:5070;lr>\r\n"),
            "{text}"
        );
        assert!(text.contains("CSeq: 7 REGISTER\r\n"), "{text}");
        assert!(
            text.contains("From: <sip:pbx@sip.carrier.example>;tag=tag1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Via: SIP/2.0/TCP 192.0.2.1:5061;branch=z9hG4bK"),
            "{text}"
        );
        // A trunk that does not register gave out no line contact.
        let plain = trunks(|_| {});
        assert!(plain.from_line("carrier1").is_none());
        let from_domain = trunks(|c| c.from_domain = "pbx.example".into());
        assert_eq!(
            from_domain.get("carrier1").unwrap().aor().to_string(),
            "sip:pbx.example"
        );
    }
}
