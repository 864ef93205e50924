//! `[trunks.<name>]`: SIP trunks to carriers, one table each.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};
use crate::sip::{Host, Scheme, Uri};
use crate::transport::tls::ClientIdentity;

/// Most trunks (each name is a metric label value).
pub const MAX_TRUNKS: usize = 256;

/// `[trunks.<name>]`: one trunk. Where it is (`uri`, or `host`/`port`/`transport`), how
/// the PBX authenticates to it, whether it registers, what it presents, and how calls
/// from it are recognised.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TrunkConfig {
    /// The carrier's SIP URI (`sip:sip.carrier.example`, `sip:192.0.2.10:5080;transport=tcp`,
    /// `sips:sip.carrier.example`); its host is located per RFC 3263 like any dialled
    /// domain. Or `host`/`port`/`transport`.
    pub uri: String,
    pub host: String,
    /// 0: the URI's port, else located (SRV) or 5060.
    pub port: u16,
    /// "", "udp", "tcp" or "tls".
    pub transport: String,
    /// A URI every request to the trunk is sent through (a pre-loaded Route, RFC 3261 8.1.2).
    pub outbound_proxy: String,
    /// Digest credentials the carrier challenges for (RFC 3261 22.2).
    pub username: String,
    pub password: String,
    /// Instead of `password`: H(username:realm:password) for MD5 and/or SHA-256 (then
    /// `realm` is required: an HA1 is bound to it).
    pub ha1_md5: String,
    pub ha1_sha256: String,
    /// Answer only challenges of this realm ("": any realm the trunk offers).
    pub realm: String,
    /// REGISTER to the trunk (RFC 3261 10) and keep the registration up.
    pub register: bool,
    /// The registration interval asked for, seconds.
    pub expires: u32,
    /// The user and domain of the From of requests to the trunk ("": the caller ID (or
    /// `username`) and the trunk's host).
    pub from_user: String,
    pub from_domain: String,
    /// How the caller's identity is passed (RFC 3325): "pai" (P-Asserted-Identity),
    /// "ppi" (P-Preferred-Identity) or "none".
    pub caller_id: String,
    /// The Privacy header of outgoing calls (RFC 3323): "none" or "id" (the From made
    /// anonymous, the identity header kept for the carrier).
    pub privacy: String,
    /// Most calls at once through the trunk (0: no limit).
    pub max_channels: u32,
    /// Source addresses (IPs or CIDRs) whose calls come from this trunk.
    pub inbound: Vec<String>,
    /// Seconds between OPTIONS pings (0: off); a trunk that stops answering is down.
    pub ping_interval_s: u64,
    /// Client certificate chain and key (PEM) presented to the trunk's TLS server (mutual
    /// TLS); both or neither, only on a TLS trunk.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        TrunkConfig {
            uri: String::new(),
            host: String::new(),
            port: 0,
            transport: String::new(),
            outbound_proxy: String::new(),
            username: String::new(),
            password: String::new(),
            ha1_md5: String::new(),
            ha1_sha256: String::new(),
            realm: String::new(),
            register: false,
            expires: 3600,
            from_user: String::new(),
            from_domain: String::new(),
            caller_id: "pai".into(),
            privacy: "none".into(),
            max_channels: 0,
            inbound: Vec::new(),
            ping_interval_s: 0,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// How the caller's identity goes to a trunk (RFC 3325).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityHeader {
    Asserted,
    Preferred,
    None,
}

impl IdentityHeader {
    pub fn parse(s: &str) -> Option<IdentityHeader> {
        match s {
            "pai" => Some(IdentityHeader::Asserted),
            "ppi" => Some(IdentityHeader::Preferred),
            "none" => Some(IdentityHeader::None),
            _ => None,
        }
    }

    /// The header's name, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            IdentityHeader::Asserted => Some("P-Asserted-Identity"),
            IdentityHeader::Preferred => Some("P-Preferred-Identity"),
            IdentityHeader::None => None,
        }
    }
}

/// An inbound source: an address or a network (`203.0.113.0/24`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Option<Network> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)),
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let shift = width - u32::from(self.prefix);
        if shift >= 128 {
            return true;
        }
        (bits(ip) >> shift) == (bits(self.addr) >> shift)
    }
}

/// Checks every trunk; keys are relative to `[trunks]` (`carrier1.uri`).
pub fn check_trunks(trunks: &BTreeMap<String, TrunkConfig>) -> Result<(), InvalidValue> {
    if trunks.len() > MAX_TRUNKS {
        return Err(InvalidValue::new(
            "",
            format!("at most {MAX_TRUNKS} trunks (got {})", trunks.len()),
        ));
    }
    for (name, t) in trunks {
        // Trunk names are metric labels and Lua arguments: keep them plain.
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(InvalidValue::new(
                name.as_str(),
                "a trunk name is 1-64 lower-case letters, digits, - and _",
            ));
        }
        t.check().map_err(|e| e.within(name))?;
    }
    // One client certificate per server name (the TLS context looks them up by name):
    // two trunks behind one host with different certificates cannot both be served.
    let mut identities: BTreeMap<String, (&str, &TrunkConfig)> = BTreeMap::new();
    for (name, t) in trunks {
        let Some((server, _)) = t.tls_identity() else {
            continue;
        };
        if let Some((other, o)) = identities.get(&server) {
            if (o.tls_cert.trim(), o.tls_key.trim()) != (t.tls_cert.trim(), t.tls_key.trim()) {
                return Err(InvalidValue::new(
                    format!("{name}.tls_cert"),
                    format!(
                        "trunk {other:?} reaches {server} too, with another client certificate: \
                         one certificate per TLS server"
                    ),
                ));
            }
        }
        identities.insert(server, (name.as_str(), t));
    }
    Ok(())
}

fn is_hex_of(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn plain(key: &str, v: &str) -> Result<(), InvalidValue> {
    if v.chars()
        .any(|c| c.is_control() || c.is_whitespace() || "<>\"@:;".contains(c))
    {
        return Err(InvalidValue::new(
            key,
            format!("{v:?} must be a plain token (no spaces, quotes, <>, @, : or ;)"),
        ));
    }
    Ok(())
}

/// Whether requests to `uri` go over TLS: `sips:` or `;transport=tls`.
fn is_tls(uri: &Uri) -> bool {
    uri.scheme == Scheme::Sips
        || uri
            .params
            .value("transport")
            .is_some_and(|t| t.eq_ignore_ascii_case("tls"))
}

/// The name a TLS server at `host` is verified against and looked up by: a domain in
/// lower case, an IP address without brackets.
fn server_name(host: &Host) -> String {
    match host {
        Host::Domain(d) => d.to_ascii_lowercase(),
        Host::Ipv4(a) => a.to_string(),
        Host::Ipv6(a) => a.to_string(),
    }
}

impl TrunkConfig {
    /// Whether the trunk is reached over TLS (`sips:` or `transport=tls`; through its
    /// outbound proxy when it has one).
    pub fn uses_tls(&self) -> bool {
        self.target_uri().is_ok_and(|u| is_tls(&u)) || self.proxy_uri().is_some_and(|p| is_tls(&p))
    }

    /// The client certificate for mutual TLS and the server name it is presented to: the
    /// first hop's host (the outbound proxy's when set, else the trunk's), the end of the
    /// TLS connection. `None` without `tls_cert`.
    pub fn tls_identity(&self) -> Option<(String, ClientIdentity)> {
        if self.tls_cert.trim().is_empty() || self.tls_key.trim().is_empty() {
            return None;
        }
        let hop = self.proxy_uri().or_else(|| self.target_uri().ok())?;
        Some((
            server_name(&hop.host),
            ClientIdentity {
                cert: self.tls_cert.trim().into(),
                key: self.tls_key.trim().into(),
            },
        ))
    }

    /// `tls_cert`/`tls_key`: both or neither, and only where the first hop is TLS (else
    /// the certificate would never be presented, silently).
    fn check_tls(&self, uri: &Uri, key: &str) -> Result<(), InvalidValue> {
        for (k, v) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if v.chars().any(char::is_control) {
                return Err(InvalidValue::new(
                    k,
                    "a file path without control characters",
                ));
            }
        }
        let (cert, tls_key) = (
            !self.tls_cert.trim().is_empty(),
            !self.tls_key.trim().is_empty(),
        );
        match (cert, tls_key) {
            (true, false) => {
                return Err(InvalidValue::new(
                    "tls_key",
                    "tls_cert is set: tls_key must name its private key file",
                ))
            }
            (false, true) => {
                return Err(InvalidValue::new(
                    "tls_cert",
                    "tls_key is set: tls_cert must name the client certificate file",
                ))
            }
            (false, false) => return Ok(()),
            (true, true) => {}
        }
        let first_hop_tls = match self.proxy_uri() {
            Some(proxy) => is_tls(&proxy),
            None => is_tls(uri),
        };
        if !first_hop_tls {
            let fix = if self.proxy_uri().is_some() {
                "make outbound_proxy sips: (or add ;transport=tls to it)"
            } else if key == "host" {
                "set transport = \"tls\""
            } else {
                "make uri sips: (or add ;transport=tls to it)"
            };
            return Err(InvalidValue::new(
                "tls_cert",
                format!("a client certificate is presented over TLS only: {fix}"),
            ));
        }
        Ok(())
    }

    /// The trunk's URI: `uri`, or one built from `host`, `port` and `transport`.
    pub fn target_uri(&self) -> Result<Uri, String> {
        if !self.uri.trim().is_empty() {
            let uri = Uri::parse(self.uri.trim()).map_err(|e| format!("{e}"))?;
            if !matches!(uri.scheme, Scheme::Sip | Scheme::Sips) {
                return Err("a trunk URI is sip: or sips:".into());
            }
            return Ok(uri);
        }
        let host = self.host.trim();
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let mut text = format!("sip:{host}");
        if self.port != 0 {
            text.push_str(&format!(":{}", self.port));
        }
        if !self.transport.is_empty() {
            text.push_str(&format!(";transport={}", self.transport));
        }
        Uri::parse(&text).map_err(|e| format!("{e}"))
    }

    /// The outbound proxy as a URI, if set.
    pub fn proxy_uri(&self) -> Option<Uri> {
        let p = self.outbound_proxy.trim();
        (!p.is_empty()).then(|| Uri::parse(p).ok()).flatten()
    }

    /// The source networks of `inbound` (already checked).
    pub fn networks(&self) -> Vec<Network> {
        self.inbound
            .iter()
            .filter_map(|s| Network::parse(s))
            .collect()
    }

    /// Checks one trunk; keys are relative to the trunk (`uri`).
    pub fn check(&self) -> Result<(), InvalidValue> {
        let has_uri = !self.uri.trim().is_empty();
        let has_host = !self.host.trim().is_empty();
        match (has_uri, has_host) {
            (false, false) => {
                return Err(InvalidValue::new(
                    "uri",
                    "a trunk needs `uri` (e.g. \"sip:sip.carrier.example\") or `host`",
                ))
            }
            (true, true) => {
                return Err(InvalidValue::new(
                    "host",
                    "give `uri` or `host`/`port`/`transport`, not both",
                ))
            }
            (true, false) if self.port != 0 || !self.transport.is_empty() => {
                return Err(InvalidValue::new(
                    if self.port != 0 { "port" } else { "transport" },
                    "`port` and `transport` go with `host`; put them in `uri` instead",
                ))
            }
            _ => {}
        }
        if !matches!(self.transport.as_str(), "" | "udp" | "tcp" | "tls") {
            return Err(InvalidValue::new(
                "transport",
                format!("{:?}: expected \"udp\", \"tcp\" or \"tls\"", self.transport),
            ));
        }
        let key = if has_uri { "uri" } else { "host" };
        let uri = self
            .target_uri()
            .map_err(|e| InvalidValue::new(key, format!("not a usable SIP URI: {e}")))?;
        if uri.user.is_some() {
            return Err(InvalidValue::new(
                key,
                "the trunk URI names the carrier, not a user (dial plans give the number)",
            ));
        }
        if let Some(t) = uri.params.value("transport") {
            if !["udp", "tcp", "tls"]
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k))
            {
                return Err(InvalidValue::new(
                    key,
                    format!("transport={t}: only udp, tcp and tls are supported"),
                ));
            }
            // RFC 3261 26.2: every hop of a sips: request is TLS.
            if uri.scheme == Scheme::Sips && !t.eq_ignore_ascii_case("tls") {
                return Err(InvalidValue::new(
                    key,
                    format!("transport={t}: a sips: URI goes over TLS only"),
                ));
            }
        }
        if !self.outbound_proxy.trim().is_empty() {
            match Uri::parse(self.outbound_proxy.trim()) {
                Ok(u) if matches!(u.scheme, Scheme::Sip | Scheme::Sips) => {}
                _ => {
                    return Err(InvalidValue::new(
                        "outbound_proxy",
                        format!("{:?} is not a sip: or sips: URI", self.outbound_proxy),
                    ))
                }
            }
        }
        self.check_tls(&uri, key)?;
        plain("username", &self.username)?;
        if self.realm.chars().any(|c| c.is_control() || c == '"') {
            return Err(InvalidValue::new(
                "realm",
                "no quotes or control characters",
            ));
        }
        let has_ha1 = !self.ha1_md5.is_empty() || !self.ha1_sha256.is_empty();
        if !self.ha1_md5.is_empty() && !is_hex_of(&self.ha1_md5, 32) {
            return Err(InvalidValue::new("ha1_md5", "32 hex digits (an MD5 HA1)"));
        }
        if !self.ha1_sha256.is_empty() && !is_hex_of(&self.ha1_sha256, 64) {
            return Err(InvalidValue::new(
                "ha1_sha256",
                "64 hex digits (a SHA-256 HA1)",
            ));
        }
        if has_ha1 && !self.password.is_empty() {
            return Err(InvalidValue::new(
                "password",
                "give `password` or the HA1s, not both",
            ));
        }
        if has_ha1 && self.realm.is_empty() {
            return Err(InvalidValue::new(
                "realm",
                "an HA1 is bound to a realm: set `realm` to the carrier's",
            ));
        }
        let has_secret = has_ha1 || !self.password.is_empty();
        if has_secret && self.username.is_empty() {
            return Err(InvalidValue::new(
                "username",
                "credentials need a `username`",
            ));
        }
        if self.register {
            if !has_secret {
                return Err(InvalidValue::new(
                    "register",
                    "a registering trunk needs `username` and `password` (or an HA1)",
                ));
            }
            check_range("expires", self.expires, 60, 86_400)?;
        }
        plain("from_user", &self.from_user)?;
        plain("from_domain", &self.from_domain)?;
        if IdentityHeader::parse(&self.caller_id).is_none() {
            return Err(InvalidValue::new(
                "caller_id",
                format!(
                    "{:?}: expected \"pai\", \"ppi\" or \"none\"",
                    self.caller_id
                ),
            ));
        }
        if !matches!(self.privacy.as_str(), "none" | "id") {
            return Err(InvalidValue::new(
                "privacy",
                format!("{:?}: expected \"none\" or \"id\"", self.privacy),
            ));
        }
        for (i, s) in self.inbound.iter().enumerate() {
            if Network::parse(s).is_none() {
                return Err(InvalidValue::entry(
                    "inbound",
                    i,
                    format!("{s:?} is not an IP address or CIDR (\"203.0.113.0/24\")"),
                ));
            }
        }
        if self.ping_interval_s != 0 {
            check_range("ping_interval_s", self.ping_interval_s, 5, MAX_TIMEOUT_S)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trunk(f: impl FnOnce(&mut TrunkConfig)) -> TrunkConfig {
        let mut t = TrunkConfig {
            uri: "sip:sip.carrier.example".into(),
            ..TrunkConfig::default()
        };
        f(&mut t);
        t
    }

    #[test]
    fn networks_match_addresses_and_prefixes() {
        let n = Network::parse("203.0.113.0/24").unwrap();
        assert!(n.contains("203.0.113.77".parse().unwrap()));
        assert!(n.contains("::ffff:203.0.113.1".parse().unwrap()));
        assert!(!n.contains("203.0.114.1".parse().unwrap()));
        assert!(!n.contains("2001:db8::1".parse().unwrap()));
        let one = Network::parse("198.51.100.7").unwrap();
        assert!(one.contains("198.51.100.7".parse().unwrap()));
        assert!(!one.contains("198.51.100.8".parse().unwrap()));
        let v6 = Network::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "host.example", "::/129"] {
            assert!(Network::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_trunk_is_a_uri_or_a_host() {
        assert!(trunk(|_| {}).check().is_ok());
        let h = trunk(|t| {
            t.uri.clear();
            t.host = "192.0.2.10".into();
            t.port = 5080;
            t.transport = "tcp".into();
        });
        h.check().unwrap();
        assert_eq!(
            h.target_uri().unwrap().to_string(),
            "sip:192.0.2.10:5080;transport=tcp"
        );
        let cases: Vec<(TrunkConfig, &str)> = vec![
            (trunk(|t| t.uri.clear()), "uri"),
            (trunk(|t| t.host = "x".into()), "host"),
            (trunk(|t| t.port = 5060), "port"),
            (trunk(|t| t.uri = "sip:+1555@carrier.example".into()), "uri"),
            (
                trunk(|t| t.uri = "sips:carrier.example;transport=udp".into()),
                "uri",
            ),
            (trunk(|t| t.uri = "tel:+15551234".into()), "uri"),
            (
                trunk(|t| t.uri = "sip:c.example;transport=sctp".into()),
                "uri",
            ),
            (
                trunk(|t| t.outbound_proxy = "proxy".into()),
                "outbound_proxy",
            ),
            (trunk(|t| t.password = "s".into()), "username"),
            (
                trunk(|t| {
                    t.username = "pbx".into();
                    t.ha1_md5 = "00".into();
                }),
                "ha1_md5",
            ),
            (
                trunk(|t| {
                    t.username = "pbx".into();
                    t.ha1_md5 = "0".repeat(32);
                }),
                "realm",
            ),
            (trunk(|t| t.register = true), "register"),
            (
                trunk(|t| {
                    t.register = true;
                    t.username = "pbx".into();
                    t.password = "s".into();
                    t.expires = 10;
                }),
                "expires",
            ),
            (trunk(|t| t.caller_id = "rpid".into()), "caller_id"),
            (trunk(|t| t.privacy = "header".into()), "privacy"),
            (
                trunk(|t| t.inbound = vec!["10.0.0.0/8".into(), "x".into()]),
                "inbound",
            ),
            (trunk(|t| t.ping_interval_s = 1), "ping_interval_s"),
            (trunk(|t| t.from_user = "a b".into()), "from_user"),
        ];
        for (t, key) in cases {
            let e = t.check().expect_err(key);
            assert_eq!(e.key, key, "{t:?}: {e}");
        }
        let e = trunk(|t| t.inbound = vec!["10.0.0.0/8".into(), "x".into()])
            .check()
            .unwrap_err();
        assert_eq!(e.index, Some(1));
    }

    #[test]
    fn tls_trunks_and_client_certificates() {
        let tls = |uri: &str| {
            trunk(|t| {
                t.uri = uri.into();
                t.tls_cert = "pbx.crt".into();
                t.tls_key = "pbx.key".into();
            })
        };
        for ok in [
            "sips:carrier.example",
            "sip:carrier.example;transport=tls",
            "sips:carrier.example;transport=TLS",
        ] {
            let t = tls(ok);
            t.check().unwrap();
            assert!(t.uses_tls(), "{ok}");
        }
        let (name, id) = tls("sips:Carrier.Example:5061").tls_identity().unwrap();
        assert_eq!(name, "carrier.example");
        assert_eq!(id.cert, std::path::PathBuf::from("pbx.crt"));
        let (name, _) = tls("sips:[2001:db8::1]").tls_identity().unwrap();
        assert_eq!(name, "2001:db8::1");
        // Through a TLS outbound proxy: the certificate goes to the proxy.
        let mut t = tls("sips:carrier.example");
        t.outbound_proxy = "sips:sbc.example.net".into();
        t.check().unwrap();
        assert_eq!(t.tls_identity().unwrap().0, "sbc.example.net");
        t.outbound_proxy = "sip:sbc.example.net".into();
        let e = t.check().unwrap_err();
        assert_eq!(e.key, "tls_cert");
        assert!(e.message.contains("outbound_proxy"), "{e}");

        for (t, key) in [
            (tls("sip:carrier.example"), "tls_cert"),
            (tls("sip:carrier.example;transport=tcp"), "tls_cert"),
            (trunk(|t| t.tls_cert = "pbx.crt".into()), "tls_key"),
            (
                trunk(|t| {
                    t.uri = "sips:carrier.example".into();
                    t.tls_key = "pbx.key".into();
                }),
                "tls_cert",
            ),
        ] {
            let e = t.check().expect_err(key);
            assert_eq!(e.key, key, "{t:?}: {e}");
        }
        assert!(tls("sip:carrier.example")
            .check()
            .unwrap_err()
            .message
            .contains("make uri sips:"));
        // host/port/transport form.
        let h = trunk(|t| {
            t.uri.clear();
            t.host = "192.0.2.10".into();
            t.transport = "tls".into();
            t.tls_cert = "c".into();
            t.tls_key = "k".into();
        });
        h.check().unwrap();
        assert_eq!(h.tls_identity().unwrap().0, "192.0.2.10");
        let mut h2 = h.clone();
        h2.transport = "tcp".into();
        assert!(h2
            .check()
            .unwrap_err()
            .message
            .contains("transport = \"tls\""));
        // A plain trunk has no identity; sips: without a certificate is fine.
        assert!(trunk(|_| {}).tls_identity().is_none());
        assert!(!trunk(|_| {}).uses_tls());
        let plain_sips = trunk(|t| t.uri = "sips:carrier.example".into());
        plain_sips.check().unwrap();
        assert!(plain_sips.tls_identity().is_none());

        // Two trunks to one TLS server with different certificates: refused.
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), tls("sips:carrier.example"));
        m.insert("b".to_string(), tls("sips:CARRIER.example;transport=tls"));
        check_trunks(&m).unwrap();
        m.get_mut("b").unwrap().tls_cert = "other.crt".into();
        let e = check_trunks(&m).unwrap_err();
        assert_eq!(e.key, "b.tls_cert", "{e}");
    }

    #[test]
    fn trunk_names_are_plain() {
        let mut m = BTreeMap::new();
        m.insert("Carrier 1".to_string(), trunk(|_| {}));
        assert!(check_trunks(&m).is_err());
        let mut m = BTreeMap::new();
        m.insert("carrier-1".to_string(), trunk(|t| t.max_channels = 30));
        check_trunks(&m).unwrap();
        m.insert("carrier-2".to_string(), trunk(|t| t.uri.clear()));
        assert_eq!(check_trunks(&m).unwrap_err().key, "carrier-2.uri");
    }
}
