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
//! `inbound` (IPs and CIDRs), `ping_interval_s`.

mod config;

pub use config::{check_trunks, IdentityHeader, Network, TrunkConfig, MAX_TRUNKS};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::{ClientCredentials, ClientSecret, DigestClient};
use crate::sip::{NameAddr, Uri};

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
}
