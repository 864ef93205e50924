//! RFC 3263 server location: the ordered list of transport targets to try for a SIP URI
//! that the server sends a request to. Section 4.1 (which transport) and 4.2 (which
//! address and port) are done here; 4.3 (on a timeout, a 503 or a transport failure, try
//! the next target) is the caller's, which gets the whole list.
//!
//! Owns: the NAPTR → SRV → AAAA/A walk, its ordering rules (NAPTR order and preference,
//! SRV priority and RFC 2782 weighted choice), and the resolver built from the `[dns]`
//! section (`dns.servers`, `dns.timeout_ms`; [`super::config::DnsConfig`]). Answers are
//! cached for their TTL by hickory-resolver's own response cache (negative answers too,
//! per their SOA), so dialling the same domain per call does not query per call.
//! Must not touch: sending, connections, transactions.
//!
//! The walk asks a [`RecordSource`]: [`Dns`] (hickory-resolver) in the server, an
//! in-memory table in the unit tests; the random source of the SRV weights is injectable
//! ([`Locator::with_pick`]) so the tests are deterministic.

use super::config::DnsConfig;
use super::local::{LocalAddrs, ResolveError};
use super::{Target, TransportKind};
use crate::sip::{Host, Scheme, Uri};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Most targets one look-up returns: enough for every address of a few SRV targets on two
/// transports; past it a caller would spend its whole Timer B on one URI anyway.
pub const MAX_TARGETS: usize = 16;
/// The port of a `sip:` URI without one and without SRV (RFC 3261 19.1.2).
const SIP_PORT: u16 = 5060;
/// RFC 3261 19.1.2: the default port of TLS.
const SIPS_PORT: u16 = 5061;
/// Attempts per query and server (the resolver's own retry); with `dns.timeout_ms` = 2 s a
/// dead server costs a call 4 s, well inside Timer B (32 s).
const ATTEMPTS: usize = 2;

/// A NAPTR record (RFC 3403), as the walk needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    /// `s`: the replacement is an SRV name (the only flag RFC 3263 4.1 uses).
    pub flags: String,
    /// `SIP+D2U`, `SIP+D2T`, `SIPS+D2T`, ...
    pub services: String,
    /// The SRV name to look up next, without the final dot.
    pub replacement: String,
}

/// An SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Host name without the final dot; `"."` (kept as `""`) says the service is not there.
    pub target: String,
}

/// A query that got no usable answer (timeout, SERVFAIL, refused, a name DNS cannot
/// carry). "No such records" (NXDOMAIN, or the name has none of that type) is not an
/// error: it is an empty list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Where the walk gets its records. Names are given without the final dot and are
/// absolute (RFC 3263 names are never completed with search domains).
pub trait RecordSource: Send + Sync + 'static {
    fn naptr(&self, name: &str) -> impl Future<Output = Result<Vec<Naptr>, LookupError>> + Send;
    fn srv(&self, name: &str) -> impl Future<Output = Result<Vec<Srv>, LookupError>> + Send;
    /// AAAA and A records of `name` (and the hosts file's entries, for the real resolver).
    fn ips(&self, name: &str) -> impl Future<Output = Result<Vec<IpAddr>, LookupError>> + Send;
}

/// Draws a number in `0..=max`, uniformly, for the SRV weights.
pub type Pick = Arc<dyn Fn(u32) -> u32 + Send + Sync>;

/// RFC 3263 locator over a record source (hickory-resolver by default).
pub struct Locator<S = Dns> {
    source: S,
    pick: Pick,
}

impl<S> fmt::Debug for Locator<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Locator")
    }
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting up the DNS resolver: {0}")]
pub struct DnsSetupError(String);

impl Locator<Dns> {
    /// The locator of the `[dns]` section.
    pub fn new(config: &DnsConfig) -> Result<Locator, DnsSetupError> {
        Ok(Locator::with_source(Dns::new(config)?))
    }

    /// One locator for the whole process with the default `[dns]` (the system's resolver),
    /// for the [`LocalAddrs`] that were given none (tests, tools); the server gives its
    /// own, built from the configuration.
    pub fn system_default() -> Arc<Locator> {
        static DEFAULT: OnceLock<Arc<Locator>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                let config = DnsConfig::default();
                let dns = Dns::new(&config).unwrap_or_else(|e| {
                    tracing::warn!("{e}; names are looked up at 127.0.0.1:53");
                    Dns::loopback(&config)
                });
                Arc::new(Locator::with_source(dns))
            })
            .clone()
    }
}

impl<S: RecordSource> Locator<S> {
    pub fn with_source(source: S) -> Locator<S> {
        Locator {
            source,
            pick: Arc::new(|max| rand::random_range(0..=max)),
        }
    }

    /// Replaces the random draw of the SRV weights (tests).
    pub fn with_pick(mut self, pick: Pick) -> Locator<S> {
        self.pick = pick;
        self
    }

    /// The targets to try for `uri`, best first (RFC 3263 4.1, 4.2). Never empty when Ok.
    ///
    /// - an IP host: that address, the `transport` parameter or UDP, the port or 5060;
    /// - a name with a port: its AAAA/A records on that port (no SRV: 4.2);
    /// - a name with a `transport` parameter: SRV `_sip._udp`/`_sip._tcp`, else AAAA/A:5060;
    /// - a bare name: NAPTR (SIP+D2U, SIP+D2T for the transports we listen on), each
    ///   replacement's SRV; else SRV for each transport we listen on, UDP first; else
    ///   AAAA/A:5060 over UDP.
    ///
    /// A `sips:` URI (RFC 3261 26.2, RFC 5630) goes over TLS only: `SIPS+D2T` NAPTRs,
    /// `_sips._tcp` SRV, port 5061; a `transport` parameter other than `tls` or `tcp` (TLS
    /// runs on TCP) cannot be secured and is an error. Outgoing TLS needs no `tls:`
    /// listener (a trunk over TLS from a server without one).
    pub async fn locate(&self, uri: &Uri, local: &LocalAddrs) -> Result<Vec<Target>, ResolveError> {
        let secure = match uri.scheme {
            Scheme::Sip => false,
            Scheme::Sips => true,
            _ => return Err(ResolveError::BadUri(uri.to_string())),
        };
        let mut param = transport_param(uri)?;
        if secure {
            match param {
                None | Some(TransportKind::Tls) | Some(TransportKind::Tcp) => {
                    param = Some(TransportKind::Tls)
                }
                Some(other) => {
                    return Err(ResolveError::Insecure(format!(
                        "{uri}: a sips: URI cannot be reached over {other}"
                    )))
                }
            }
        }
        let default_port = |t: Option<TransportKind>| match t {
            Some(TransportKind::Tls) | Some(TransportKind::Wss) => SIPS_PORT,
            _ => SIP_PORT,
        };
        let name = match &uri.host {
            Host::Ipv4(a) => {
                return ip_target(
                    IpAddr::V4(*a),
                    uri.port.or(Some(default_port(param))),
                    param,
                    local,
                )
            }
            Host::Ipv6(a) => {
                return ip_target(
                    IpAddr::V6(*a),
                    uri.port.or(Some(default_port(param))),
                    param,
                    local,
                )
            }
            Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        };
        let mut walk = Walk {
            targets: Vec::new(),
            local,
            domain: &name,
        };
        match (uri.port, param) {
            // 4.2: an explicit port means no SRV.
            (Some(port), param) => {
                let transport = usable(param.unwrap_or(TransportKind::Udp), local)?;
                self.add_host(&mut walk, transport, &name, port).await?;
            }
            // 4.2: the transport is known; its SRV, else the name itself on 5060 (5061
            // for TLS).
            (None, Some(transport)) => {
                let transport = usable(transport, local)?;
                let found = match srv_name(transport, &name) {
                    Some(srv) => self.add_srv(&mut walk, transport, &srv).await?,
                    None => false,
                };
                if !found {
                    self.add_host(&mut walk, transport, &name, default_port(Some(transport)))
                        .await?;
                }
            }
            (None, None) => self.locate_bare(&mut walk, &name).await?,
        }
        if walk.targets.is_empty() {
            return Err(ResolveError::Unresolvable(name));
        }
        Ok(walk.targets)
    }

    /// 4.1 for a name with neither port nor transport: NAPTR, else SRV per transport, else
    /// AAAA/A on UDP:5060.
    async fn locate_bare(&self, walk: &mut Walk<'_>, name: &str) -> Result<(), ResolveError> {
        let naptrs = self
            .source
            .naptr(name)
            .await
            .map_err(|e| lookup_failed("NAPTR", name, e))?;
        // A replacement whose look-up fails costs only itself when others give targets:
        // the caller has something to try. With none, the failure is the answer (a
        // fall-back to more queries of a failing server would only add timeouts).
        let mut failed = None;
        // A sip: URI is not upgraded to TLS by a SIPS NAPTR: the peer's certificate was
        // never asked for, and a failing verification would lose a call that works.
        for (transport, replacement) in usable_naptrs(naptrs, walk.local)
            .into_iter()
            .filter(|(t, _)| *t != TransportKind::Tls)
        {
            if let Err(e) = self.add_srv(walk, transport, &replacement).await {
                tracing::debug!("{e}");
                failed.get_or_insert(e);
            }
        }
        if !walk.targets.is_empty() {
            return Ok(());
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // No usable NAPTR: SRV for each transport we can use, in our order of preference.
        let mut found = false;
        for transport in [TransportKind::Udp, TransportKind::Tcp] {
            if walk.local.has(transport) {
                let srv = srv_name(transport, name).expect("UDP and TCP have SRV names");
                found |= self.add_srv(walk, transport, &srv).await?;
            }
        }
        if !found {
            let transport = usable(TransportKind::Udp, walk.local)?;
            self.add_host(walk, transport, name, SIP_PORT).await?;
        }
        Ok(())
    }

    /// Adds the targets of SRV `name`, in RFC 2782 order. Whether SRV records were found
    /// (a lone `.` target counts: the service is decidedly not available, so no fall-back to
    /// the address records).
    async fn add_srv(
        &self,
        walk: &mut Walk<'_>,
        transport: TransportKind,
        name: &str,
    ) -> Result<bool, ResolveError> {
        let records = self
            .source
            .srv(name)
            .await
            .map_err(|e| lookup_failed("SRV", name, e))?;
        if records.is_empty() {
            return Ok(false);
        }
        // As with NAPTR replacements: a target that cannot be resolved is skipped, and
        // its failure reported only when no target is left.
        let mut failed = None;
        for srv in order_srv(records, &*self.pick) {
            if walk.full() {
                break;
            }
            if let Err(e) = self.add_host(walk, transport, &srv.target, srv.port).await {
                tracing::debug!("{e}");
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) if walk.targets.is_empty() => Err(e),
            _ => Ok(true),
        }
    }

    /// Adds the AAAA/A addresses of `host` on `port`: those of an IP family we listen on
    /// for `transport` first, so that a v4-only server does not try v6 first.
    async fn add_host(
        &self,
        walk: &mut Walk<'_>,
        transport: TransportKind,
        host: &str,
        port: u16,
    ) -> Result<(), ResolveError> {
        let mut ips = self
            .source
            .ips(host)
            .await
            .map_err(|e| lookup_failed("AAAA/A", host, e))?;
        let local = walk.local;
        let reachable = |ip: &IpAddr| {
            local
                .towards(transport, &SocketAddr::new(*ip, port))
                .is_some()
        };
        ips.sort_by_key(|ip| !reachable(ip));
        for ip in ips {
            if transport == TransportKind::Tls {
                // RFC 5922 7.2: the peer's certificate must name the SIP domain the URI
                // gave, not the SRV target or the address.
                super::tls::remember_server_name(SocketAddr::new(ip, port), walk.domain);
            }
            walk.push(Target {
                transport,
                addr: SocketAddr::new(ip, port),
                connection: None,
            });
        }
        Ok(())
    }
}

/// The list being built.
struct Walk<'a> {
    targets: Vec<Target>,
    local: &'a LocalAddrs,
    /// The URI's domain: what a TLS peer's certificate must name.
    domain: &'a str,
}

impl Walk<'_> {
    fn full(&self) -> bool {
        self.targets.len() >= MAX_TARGETS
    }

    fn push(&mut self, target: Target) {
        if !self.full() && !self.targets.contains(&target) {
            self.targets.push(target);
        }
    }
}

fn lookup_failed(kind: &str, name: &str, e: LookupError) -> ResolveError {
    ResolveError::Lookup {
        query: format!("{kind} {name}"),
        message: e.0,
    }
}

/// The URI's `transport` parameter, if any (RFC 3263 4.1: it wins over everything).
fn transport_param(uri: &Uri) -> Result<Option<TransportKind>, ResolveError> {
    match uri.params.value("transport") {
        None => Ok(None),
        Some(t) if t.eq_ignore_ascii_case("udp") => Ok(Some(TransportKind::Udp)),
        Some(t) if t.eq_ignore_ascii_case("tcp") => Ok(Some(TransportKind::Tcp)),
        Some(t) if t.eq_ignore_ascii_case("memory") => Ok(Some(TransportKind::Memory)),
        Some(t) if t.eq_ignore_ascii_case("tls") => Ok(Some(TransportKind::Tls)),
        Some(t) if t.eq_ignore_ascii_case("ws") => Ok(Some(TransportKind::Ws)),
        Some(t) if t.eq_ignore_ascii_case("wss") => Ok(Some(TransportKind::Wss)),
        Some(_) => Err(ResolveError::BadUri(uri.to_string())),
    }
}

fn usable(transport: TransportKind, local: &LocalAddrs) -> Result<TransportKind, ResolveError> {
    // A server on the in-memory network only (`strowger test`, simulated phones and
    // trunks) reaches every address over it: a dial plan's `sip:1000@127.0.0.1:5080` lands
    // on the simulated phone at that address.
    if local.memory_only() {
        return Ok(TransportKind::Memory);
    }
    // The TLS client side is always there; a listener is needed only to be reached.
    if local.has(transport) || transport == TransportKind::Tls {
        Ok(transport)
    } else {
        Err(ResolveError::NoTransport(transport))
    }
}

/// 4.1/4.2 for a numeric host: no DNS; the transport parameter or UDP, the port or 5060.
fn ip_target(
    ip: IpAddr,
    port: Option<u16>,
    param: Option<TransportKind>,
    local: &LocalAddrs,
) -> Result<Vec<Target>, ResolveError> {
    let transport = usable(param.unwrap_or(TransportKind::Udp), local)?;
    Ok(vec![Target {
        transport,
        addr: SocketAddr::new(ip, port.unwrap_or(SIP_PORT)),
        connection: None,
    }])
}

/// The SRV name of `transport` for `domain` (RFC 3263 4.2: `_sip._udp`, `_sip._tcp`); the
/// in-process transport has none.
fn srv_name(transport: TransportKind, domain: &str) -> Option<String> {
    match transport {
        TransportKind::Udp => Some(format!("_sip._udp.{domain}")),
        TransportKind::Tcp => Some(format!("_sip._tcp.{domain}")),
        TransportKind::Memory | TransportKind::Ws | TransportKind::Wss => None,
        TransportKind::Tls => Some(format!("_sips._tcp.{domain}")),
    }
}

/// The NAPTR service field of a transport we can use (RFC 3263 4.1); SCTP and WebSocket
/// services have none here and are discarded.
fn naptr_transport(services: &str) -> Option<TransportKind> {
    if services.eq_ignore_ascii_case("SIP+D2U") {
        Some(TransportKind::Udp)
    } else if services.eq_ignore_ascii_case("SIP+D2T") {
        Some(TransportKind::Tcp)
    } else if services.eq_ignore_ascii_case("SIPS+D2T") {
        Some(TransportKind::Tls)
    } else {
        None
    }
}

/// The NAPTR records to follow, in order: those for a transport `local` listens on, with
/// the `s` flag (the next look-up is SRV, RFC 3263 4.1) and a replacement, sorted by order
/// then preference (RFC 3403 4.1). Each gives its transport and SRV name.
pub fn usable_naptrs(mut records: Vec<Naptr>, local: &LocalAddrs) -> Vec<(TransportKind, String)> {
    records.sort_by_key(|r| (r.order, r.preference));
    records
        .into_iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s") && !r.replacement.is_empty())
        .filter_map(|r| {
            let transport = naptr_transport(&r.services)?;
            local.has(transport).then_some((transport, r.replacement))
        })
        .collect()
}

/// SRV records in the order to try them (RFC 2782): by priority, lowest first; within a
/// priority a weighted random order: repeatedly draw `r` in `0..=sum of weights left` and
/// take the first record whose running sum of weights reaches `r`, weight-0 records placed
/// first so they are taken only when `r` is 0. Records with the target `.` are dropped.
/// `pick(max)` draws in `0..=max`.
pub fn order_srv(mut records: Vec<Srv>, pick: &dyn Fn(u32) -> u32) -> Vec<Srv> {
    records.retain(|r| !r.target.is_empty());
    // Stable: weight-0 records first within each priority, otherwise as received.
    records.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let end = rest
            .iter()
            .position(|r| r.priority != first.priority)
            .unwrap_or(rest.len());
        let mut group: Vec<Srv> = rest[..end].to_vec();
        rest = &rest[end..];
        while !group.is_empty() {
            let sum: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let r = pick(sum).min(sum);
            let mut running = 0u32;
            let i = group
                .iter()
                .position(|rec| {
                    running += u32::from(rec.weight);
                    running >= r
                })
                .unwrap_or(group.len() - 1);
            ordered.push(group.remove(i));
        }
    }
    ordered
}

/// hickory-resolver as the record source: queries to `dns.servers` or the system's
/// resolvers, over UDP with TCP for truncated answers, answers cached for their TTL.
pub struct Dns {
    resolver: hickory_resolver::TokioResolver,
}

impl Dns {
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsSetupError> {
        use hickory_resolver::config::{ResolverConfig, ServerOrderingStrategy};
        let servers = config.server_addrs();
        let (resolver_config, mut opts) = if servers.is_empty() {
            match hickory_resolver::system_conf::read_system_conf() {
                Ok(system) => system,
                // A host without a usable resolv.conf: the local name server, as the C
                // library assumes (resolv.conf(5)), rather than a server that cannot dial
                // names at all.
                Err(e) => {
                    tracing::warn!(
                        "dns.servers is empty and /etc/resolv.conf gives no name server ({e}); \
                         names are looked up at 127.0.0.1:53"
                    );
                    return Ok(Dns::loopback(config));
                }
            }
        } else {
            let mut opts = hickory_resolver::config::ResolverOpts::default();
            // The operator's order: the first server is the main one, the others spares.
            opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
            (
                ResolverConfig::from_name_servers(
                    servers.iter().map(|a| name_server(*a)).collect(),
                ),
                opts,
            )
        };
        opts.timeout = Duration::from_millis(config.timeout_ms);
        opts.attempts = ATTEMPTS;
        Self::build(resolver_config, opts)
    }

    /// The resolver of a host without a usable `/etc/resolv.conf`: the local name server
    /// on port 53.
    pub fn loopback(config: &DnsConfig) -> Dns {
        let mut opts = hickory_resolver::config::ResolverOpts::default();
        opts.timeout = Duration::from_millis(config.timeout_ms);
        opts.attempts = ATTEMPTS;
        let servers = vec![name_server(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53))];
        Self::build(
            hickory_resolver::config::ResolverConfig::from_name_servers(servers),
            opts,
        )
        .expect("a resolver of one loopback server always builds")
    }

    fn build(
        config: hickory_resolver::config::ResolverConfig,
        opts: hickory_resolver::config::ResolverOpts,
    ) -> Result<Dns, DnsSetupError> {
        let provider = hickory_resolver::net::runtime::TokioRuntimeProvider::default();
        let resolver = hickory_resolver::Resolver::builder_with_config(config, provider)
            .with_options(opts)
            .build()
            .map_err(|e| DnsSetupError(e.to_string()))?;
        Ok(Dns { resolver })
    }

    /// Records of `kind` at `name` ("no records" is an empty list).
    async fn lookup(
        &self,
        name: &str,
        kind: hickory_resolver::proto::rr::RecordType,
    ) -> Result<Vec<hickory_resolver::proto::rr::RData>, LookupError> {
        let fqdn = fqdn(name)?;
        match self.resolver.lookup(fqdn, kind).await {
            Ok(lookup) => Ok(lookup.answers().iter().map(|r| r.data.clone()).collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(LookupError(e.to_string())),
        }
    }
}

/// A name server on `addr`: UDP, and TCP for truncated answers (RFC 7766).
fn name_server(addr: SocketAddr) -> hickory_resolver::config::NameServerConfig {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// `name` as an absolute DNS name: SIP URIs carry full domain names, never completed with
/// the host's search domains.
fn fqdn(name: &str) -> Result<hickory_resolver::proto::rr::Name, LookupError> {
    hickory_resolver::proto::rr::Name::from_ascii(format!("{name}."))
        .map_err(|e| LookupError(format!("not a DNS name: {e}")))
}

/// A name from DNS as the walk keeps it: lower case, no final dot (the root is "").
fn plain_name(name: &hickory_resolver::proto::rr::Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

impl RecordSource for Dns {
    async fn naptr(&self, name: &str) -> Result<Vec<Naptr>, LookupError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let records = self.lookup(name, RecordType::NAPTR).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::NAPTR(n) => Some(Naptr {
                    order: n.order,
                    preference: n.preference,
                    flags: String::from_utf8_lossy(&n.flags).into_owned(),
                    services: String::from_utf8_lossy(&n.services).into_owned(),
                    replacement: plain_name(&n.replacement),
                }),
                _ => None,
            })
            .collect())
    }

    async fn srv(&self, name: &str) -> Result<Vec<Srv>, LookupError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let records = self.lookup(name, RecordType::SRV).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::SRV(s) => Some(Srv {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: plain_name(&s.target),
                }),
                _ => None,
            })
            .collect())
    }

    async fn ips(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        let fqdn = fqdn(name)?;
        match self.resolver.lookup_ip(fqdn).await {
            Ok(found) => Ok(found.iter().collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(LookupError(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
