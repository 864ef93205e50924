//! The SIP of transfers: Refer-To and Replaces parsed (RFC 3515, RFC 3891), the NOTIFYs
//! of a REFER's implicit subscription built (RFC 3515 2.4.4, RFC 3420 sipfrag), a hold
//! offer turned into a resume (RFC 3264 8).

use crate::b2bua::B2buaInner;
use crate::dialog::Dialog;
use crate::sip::{Method, NameAddr, Request, Uri};
use bytes::Bytes;

/// `%XX` escapes of a URI header value (RFC 3261 19.1.1).
pub(super) fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Replaces value (RFC 3891 6.1): Call-ID, to-tag, from-tag.
pub fn parse_replaces(v: &str) -> Option<(String, String, String)> {
    let mut parts = v.split(';');
    let call_id = parts.next()?.trim().to_owned();
    let (mut to, mut from) = (None, None);
    for p in parts {
        let (k, val) = p.split_once('=')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "to-tag" => to = Some(val.trim().to_owned()),
            "from-tag" => from = Some(val.trim().to_owned()),
            _ => {}
        }
    }
    (!call_id.is_empty()).then_some((call_id, to?, from?))
}

/// The Refer-To of a REFER: its URI without headers, and the Replaces among its headers.
/// Errors are the 400's reason.
pub fn refer_to(req: &Request) -> Result<(Uri, Option<String>), &'static str> {
    let values: Vec<String> = req.headers.list("Refer-To");
    if values.is_empty() {
        return Err("Missing Refer-To");
    }
    // RFC 3515 2.1: exactly one Refer-To.
    if values.len() > 1 {
        return Err("Exactly one Refer-To allowed");
    }
    let na = NameAddr::parse(&values[0]).map_err(|_| "Bad Refer-To")?;
    let mut uri = na.uri;
    let mut replaces = None;
    if let Some(h) = uri.headers.take() {
        for kv in h.split('&') {
            if let Some((k, v)) = kv.split_once('=') {
                if k.eq_ignore_ascii_case("Replaces") {
                    replaces = Some(unescape(v));
                }
            }
        }
    }
    Ok((uri, replaces))
}

/// A hold offer made sendrecv, with its `o=` version one higher (RFC 3264 8: a new offer
/// in the same session).
pub(super) fn resume_sdp(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len() + 2);
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        let line = match line {
            "a=sendonly" | "a=inactive" | "a=recvonly" => "a=sendrecv".to_owned(),
            l if l.starts_with("o=") => {
                let mut f: Vec<String> = l.split(' ').map(str::to_owned).collect();
                if let Some(v) = f.get_mut(2).and_then(|v| v.parse::<u64>().ok()) {
                    f[2] = (v + 1).to_string();
                }
                f.join(" ")
            }
            l => l.to_owned(),
        };
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// NOTIFY for the REFER subscription of `d` (RFC 3515 2.4.4-2.4.6, RFC 3420 sipfrag).
pub(super) fn build_notify(
    d: &mut Dialog,
    event_id: u32,
    status_line: &str,
    last: bool,
    contact: &str,
    inner: &B2buaInner,
) -> Request {
    let via = inner.local.via(&d.flow);
    let mut n = d.request(Method::Notify, via, Some(contact));
    n.headers.push("Event", format!("refer;id={event_id}"));
    n.headers.push(
        "Subscription-State",
        if last {
            "terminated;reason=noresource".to_owned()
        } else {
            "active;expires=60".to_owned()
        },
    );
    n.headers
        .push("Content-Type", "message/sipfrag;version=2.0");
    n.body = Bytes::from(format!("{status_line}\r\n"));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_offer_resumes_as_sendrecv_with_a_new_version() {
        let sdp = "v=0\r\no=b 1 7 IN IP4 127.0.0.1\r\ns=-\r\nm=audio 9 RTP/AVP 0\r\na=sendonly\r\n";
        let r = resume_sdp(sdp);
        assert!(r.contains("o=b 1 8 IN IP4"), "{r}");
        assert!(r.contains("a=sendrecv") && !r.contains("sendonly"), "{r}");
    }

    #[test]
    fn replaces_and_escapes() {
        assert_eq!(
            parse_replaces("abc@h;to-tag=t1;from-tag=f1"),
            Some(("abc@h".into(), "t1".into(), "f1".into()))
        );
        assert_eq!(parse_replaces("abc@h;to-tag=t1"), None);
        assert_eq!(unescape("a%3Bto-tag%3Dx"), "a;to-tag=x");
        assert_eq!(unescape("100%"), "100%");
    }
}
