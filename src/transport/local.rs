//! How the server names itself on each transport and where its own requests go: the
//! bound addresses (Via, Contact, which host is ours), the locator that turns a SIP URI
//! into transport targets (RFC 3263, in `locate.rs`), and where a registered contact's
//! flow is. Every transaction user that sends requests of its own (B2BUA, presence,
//! registrar keep-alive) shares these, so they live here, below all of them.

use super::locate::Locator;
use super::{Target, TransportKind};
use crate::sip::{new_branch, Host, Params, Uri, Via};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("not a SIP URI: {0}")]
    BadUri(String),
    #[error("cannot resolve {0}")]
    Unresolvable(String),
    #[error("no {0} transport is configured")]
    NoTransport(TransportKind),
    /// RFC 3261 26.2, RFC 5630: a `sips:` target that cannot be reached over TLS hops.
    #[error("{0}")]
    Insecure(String),
    /// A DNS query got no usable answer (timeout, SERVFAIL, ...): which one, and why.
    #[error("DNS {query} failed: {message}")]
    Lookup { query: String, message: String },
}

/// The server's bound addresses, for Via and Contact, and the locator its own requests
/// are sent with.
#[derive(Debug, Clone)]
pub struct LocalAddrs {
    addrs: Vec<(TransportKind, SocketAddr)>,
    /// `None`: [`Locator::system_default`].
    locator: Option<Arc<Locator>>,
}

impl LocalAddrs {
    pub fn new(addrs: Vec<(TransportKind, SocketAddr)>) -> LocalAddrs {
        LocalAddrs {
            addrs,
            locator: None,
        }
    }

    /// The same addresses, locating targets with `locator` (the server's, from `[dns]`).
    pub fn with_locator(mut self, locator: Arc<Locator>) -> LocalAddrs {
        self.locator = Some(locator);
        self
    }

    /// The targets to try for `uri`, best first (RFC 3263 4.1, 4.2; see
    /// [`Locator::locate`]). Trying the next on failure (4.3) is the caller's.
    pub async fn locate(&self, uri: &Uri) -> Result<Vec<Target>, ResolveError> {
        match &self.locator {
            Some(locator) => locator.locate(uri, self).await,
            None => Locator::system_default().locate(uri, self).await,
        }
    }

    /// The local address to use towards `remote` on `kind`: same transport and IP family
    /// (the other family when there is no listener of this one: a WebSocket client's
    /// address is whatever its connection came from).
    pub fn towards(&self, kind: TransportKind, remote: &SocketAddr) -> Option<SocketAddr> {
        let mut of_kind = self.addrs.iter().filter(|(k, _)| *k == kind);
        let same_family = |a: &&(TransportKind, SocketAddr)| a.1.is_ipv4() == remote.is_ipv4();
        of_kind
            .clone()
            .find(same_family)
            .or_else(|| of_kind.next().filter(|_| kind.is_websocket()))
            // Outgoing TLS without a tls: listener leaves from our TCP (else any) address:
            // that is what Via and Contact name (answers come back on the connection).
            .or_else(|| {
                (kind == TransportKind::Tls)
                    .then(|| {
                        self.addrs
                            .iter()
                            .filter(|(k, _)| *k == TransportKind::Tcp)
                            .find(same_family)
                            .or_else(|| self.addrs.iter().find(same_family))
                    })
                    .flatten()
            })
            .map(|(_, a)| *a)
    }

    pub fn has(&self, kind: TransportKind) -> bool {
        self.addrs.iter().any(|(k, _)| *k == kind)
    }

    /// Whether the server is on the in-memory network only (no sockets).
    pub fn memory_only(&self) -> bool {
        !self.addrs.is_empty() && self.addrs.iter().all(|(k, _)| *k == TransportKind::Memory)
    }

    /// A fresh Via for a request we send to `target` (RFC 3261 8.1.1.7, with rport so that
    /// answers find us through NAT, RFC 3581).
    /// A new request outside any dialog towards `dest` (RFC 3261 8.1.1): our Via, a fresh
    /// Call-ID on the address we use towards it, CSeq 1, Max-Forwards 70, no headers or
    /// body yet. `from` carries its tag already.
    pub fn new_request(
        &self,
        method: crate::sip::Method,
        uri: crate::sip::Uri,
        from: crate::sip::NameAddr,
        to: crate::sip::NameAddr,
        dest: &Target,
    ) -> crate::sip::Request {
        let host = self
            .towards(dest.transport, &dest.addr)
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "strowger".into());
        crate::sip::Request {
            method: method.clone(),
            uri,
            version: "2.0".into(),
            base: crate::sip::BaseHeaders {
                via: vec![self.via(dest)],
                from: from.into(),
                to: to.into(),
                call_id: crate::sip::new_call_id(&host),
                cseq: crate::sip::CSeq { seq: 1, method },
            },
            max_forwards: Some(70),
            headers: crate::sip::Headers::new(),
            body: bytes::Bytes::new(),
        }
    }

    pub fn via(&self, target: &Target) -> Via {
        let local = self
            .towards(target.transport, &target.addr)
            .unwrap_or_else(|| SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5060));
        let mut params = Params::new();
        params.set("branch", Some(&new_branch()));
        params.set("rport", None);
        Via {
            version: "2.0".into(),
            transport: target.transport.via_name().into(),
            host: Host::from(local.ip()),
            port: Some(local.port()),
            params,
        }
    }

    /// Our Contact URI on the transport and family of `target`, as a bare URI.
    pub fn contact_uri(&self, target: &Target) -> String {
        let mut out = String::with_capacity(48);
        self.write_contact_uri(target, &mut out);
        out
    }

    /// Appends our Contact URI to `out`, piece by piece rather than with `format!`: twice
    /// per call (issue 14).
    fn write_contact_uri(&self, target: &Target, out: &mut String) {
        let local = self
            .towards(target.transport, &target.addr)
            .unwrap_or_else(|| SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5060));
        out.push_str("sip:");
        // Writing into a String cannot fail.
        let _ = Host::from(local.ip()).write_to(out);
        let _ = crate::sip::write_port(out, local.port());
        match target.transport {
            TransportKind::Udp | TransportKind::Memory => {}
            // Over TLS, WS and WSS a sip: URI with the transport (what phones expect; a
            // sips: Contact only in a sips: dialog, see `contact_in`).
            t => {
                out.push_str(";transport=");
                out.push_str(t.as_str());
            }
        }
    }

    /// Our Contact header value for a dialog begun with `ruri` (RFC 3261 12.1.1: in a
    /// dialog whose request was a sips: URI, the Contact is a sips: URI too).
    pub fn contact_in(&self, target: &Target, ruri: &Uri) -> String {
        if ruri.scheme == crate::sip::Scheme::Sips && target.transport.is_secure() {
            let local = self
                .towards(target.transport, &target.addr)
                .unwrap_or_else(|| SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5061));
            let host = Host::from(local.ip());
            return match target.transport {
                TransportKind::Tls => format!("<sips:{host}:{}>", local.port()),
                t => format!("<sips:{host}:{};transport={t}>", local.port()),
            };
        }
        self.contact(target)
    }

    /// Our Contact header value (`<uri>`) on the transport and family of `target`.
    pub fn contact(&self, target: &Target) -> String {
        let mut out = String::with_capacity(50);
        out.push('<');
        self.write_contact_uri(target, &mut out);
        out.push('>');
        out
    }

    /// Whether `host` is the server's: `domain` or one of its own addresses.
    pub fn serves(&self, host: &Host, domain: &str) -> bool {
        match host {
            Host::Domain(d) => d.eq_ignore_ascii_case(domain),
            other => other.ip().is_some_and(|ip| self.is_own_ip(ip)),
        }
    }

    /// The address of record a URI names: `sip:user@domain` for a user at the server
    /// (by domain or by one of its IPs), so that both spellings are one user; else the
    /// URI's own AOR. The UAS core registers and `registrar.lookup` looks up with this.
    pub fn canonical_aor(&self, uri: &crate::sip::Uri, domain: &str) -> String {
        match &uri.user {
            Some(user) if self.serves(&uri.host, domain) => format!("sip:{user}@{domain}"),
            _ => uri.aor(),
        }
    }

    /// Whether `ip` is one of the server's own addresses.
    pub fn is_own_ip(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|(_, a)| a.ip() == ip)
    }
}

/// The first target of [`LocalAddrs::locate`]: where a request to `uri` goes when the
/// caller does not fail over (RFC 3263 4.3) to the others.
pub async fn resolve(uri: &Uri, local: &LocalAddrs) -> Result<Target, ResolveError> {
    local
        .locate(uri)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ResolveError::Unresolvable(uri.host.to_string()))
}

/// Where a registered contact is reached: the transport target its REGISTER came from and
/// its Path (RFC 5626's flow, RFC 3327). Implemented over the registrar by the server; the
/// B2BUA and presence route requests to registered phones through it.
pub trait ContactFlows: Send + Sync + 'static {
    fn flow(&self, contact: &str) -> Option<(Target, Vec<String>)>;
}
