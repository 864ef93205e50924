//! Via handling at the transport edge: `received`/`rport` on inbound requests (RFC 3261
//! 18.2.1, RFC 3581 section 4) and where a response goes (RFC 3261 18.2.2, RFC 3581 4).
//!
//! Owns: the top Via of an inbound request, before anyone else sees it. Must not touch:
//! other headers, and it never takes a destination from the Via host or `maddr`: the
//! server only answers the address a request came from.

use super::{Target, TransportKind};
use crate::sip::{Request, Via};
use std::net::SocketAddr;

/// The default SIP port for UDP and TCP (RFC 3261 19.1.2).
pub const DEFAULT_SIP_PORT: u16 = 5060;

/// Adds `received` and fills `rport` in the top Via of an inbound request. Only
/// `req.base.via[0]` changes: it is what the server copies into its responses.
pub fn process_inbound(req: &mut Request, source: &Target) {
    let Some(via) = req.base.via.first_mut() else {
        return;
    };
    let ip = source.addr.ip().to_canonical();
    // RFC 3581 4: `rport` without a value asks for the source port, and then `received`
    // is added even when the sent-by host is the source address.
    let wants_rport = via.params.get("rport") == Some(None);
    if wants_rport {
        let port = source.addr.port().to_string();
        via.params.set("rport", Some(&port));
    }
    // RFC 3261 18.2.1: `received` when the sent-by host (a name always does) differs from
    // the packet's source address.
    let same_host = via.host.ip().map(|h| h.to_canonical()) == Some(ip);
    if wants_rport || !same_host {
        // RFC 3261 25.1 / RFC 5118 4.5: received carries an IPv6 address without brackets,
        // which is how `IpAddr`'s Display writes it and how `Params` keeps it verbatim.
        let received = ip.to_string();
        via.params.set("received", Some(&received));
    }
}

/// See [`super::response_target`].
pub(crate) fn response_target(via: &Via, source: &Target) -> Target {
    response_target_of(via.rport(), via.port, source)
}

/// See [`super::response_target_of`].
pub(crate) fn response_target_of(
    rport: Option<Option<u16>>,
    sent_by_port: Option<u16>,
    source: &Target,
) -> Target {
    // RFC 3261 18.2.2: over a reliable transport the response goes back on the connection
    // the request came on (and the sender reopens to the source if it has closed).
    if source.transport.is_reliable() {
        return *source;
    }
    // RFC 3581 4: with rport, the source port; RFC 3261 18.2.2: otherwise the sent-by port
    // at the `received` address, which is the source address. `maddr` is ignored on purpose.
    let port = match rport {
        Some(Some(p)) if p != 0 => p,
        // rport asked for but not filled in (process_inbound not run): the source port.
        Some(_) => source.addr.port(),
        None => sent_by_port.unwrap_or(DEFAULT_SIP_PORT),
    };
    Target {
        transport: match source.transport {
            TransportKind::Memory => TransportKind::Memory,
            _ => TransportKind::Udp,
        },
        addr: SocketAddr::new(source.addr.ip(), port),
        connection: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, SipMessage};
    use crate::transport::ConnectionId;

    fn request(via: &str) -> Request {
        let text = format!(
            "OPTIONS sip:s@127.0.0.1 SIP/2.0\r\nVia: {via}\r\nFrom: <sip:a@x>;tag=1\r\n\
             To: <sip:s@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\
             Content-Length: 0\r\n\r\n"
        );
        match parse(text.as_bytes()) {
            Ok((SipMessage::Request(r), _)) => r,
            other => panic!("bad test request: {other:?}"),
        }
    }

    fn udp(addr: &str) -> Target {
        Target {
            transport: TransportKind::Udp,
            addr: addr.parse().unwrap(),
            connection: None,
        }
    }

    #[test]
    fn received_only_when_host_differs() {
        let mut r = request("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("10.0.0.1:5060"));
        assert_eq!(r.base.via[0].received(), None);
        process_inbound(&mut r, &udp("192.0.2.7:5060"));
        assert_eq!(r.base.via[0].received(), Some("192.0.2.7"));
        let mut r = request("SIP/2.0/UDP phone.example;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("192.0.2.7:5060"));
        assert_eq!(r.base.via[0].received(), Some("192.0.2.7"));
    }

    #[test]
    fn rport_filled_and_received_always() {
        let mut r = request("SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("10.0.0.1:40000"));
        let v = &r.base.via[0];
        assert_eq!(v.rport(), Some(Some(40000)));
        assert_eq!(v.received(), Some("10.0.0.1"));
        assert!(v
            .to_string()
            .contains(";rport=40000;branch=z9hG4bK1;received=10.0.0.1"));
        // A value already there is left alone.
        let mut r = request("SIP/2.0/UDP 10.0.0.1:5060;rport=7;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("10.0.0.1:40000"));
        assert_eq!(r.base.via[0].rport(), Some(Some(7)));
    }

    #[test]
    fn ipv6_received_has_no_brackets() {
        let mut r = request("SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("[2001:db8::2]:5062"));
        assert_eq!(r.base.via[0].received(), Some("2001:db8::2"));
        // It re-parses (RFC 5118 4.5).
        let again = Via::parse(&r.base.via[0].to_string()).unwrap();
        assert_eq!(again.received(), Some("2001:db8::2"));
        let mut r = request("SIP/2.0/UDP [2001:db8::2]:5060;branch=z9hG4bK1");
        process_inbound(&mut r, &udp("[2001:db8::2]:5062"));
        assert_eq!(r.base.via[0].received(), None);
    }

    #[test]
    fn only_the_top_via_changes() {
        let mut r = request("SIP/2.0/UDP a.example;rport;branch=z9hG4bK1, SIP/2.0/UDP b.example;rport;branch=z9hG4bK2");
        process_inbound(&mut r, &udp("192.0.2.1:1000"));
        assert_eq!(r.base.via[1].rport(), Some(None));
        assert_eq!(r.base.via[1].received(), None);
    }

    #[test]
    fn targets() {
        let src = udp("192.0.2.1:40000");
        let t = |v: &str| response_target(&Via::parse(v).unwrap(), &src).addr;
        assert_eq!(t("SIP/2.0/UDP h:5070;rport=40000"), src.addr);
        assert_eq!(t("SIP/2.0/UDP h:5070;rport"), src.addr);
        assert_eq!(t("SIP/2.0/UDP h:5070"), "192.0.2.1:5070".parse().unwrap());
        assert_eq!(t("SIP/2.0/UDP h"), "192.0.2.1:5060".parse().unwrap());
        assert_eq!(
            t("SIP/2.0/UDP 10.9.9.9:5070;received=10.1.1.1;maddr=224.0.1.75"),
            "192.0.2.1:5070".parse().unwrap()
        );
        let tcp = Target {
            transport: TransportKind::Tcp,
            addr: "192.0.2.1:40001".parse().unwrap(),
            connection: ConnectionId::new(9),
        };
        let via = Via::parse("SIP/2.0/TCP h:5070;rport=1").unwrap();
        assert_eq!(response_target(&via, &tcp), tcp);
        let mem = Target {
            transport: TransportKind::Memory,
            ..src
        };
        let via = Via::parse("SIP/2.0/UDP h:5070").unwrap();
        assert_eq!(response_target(&via, &mem).transport, TransportKind::Memory);
    }
}
