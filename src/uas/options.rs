//! OPTIONS answered by the server itself (RFC 3261 11.2, RFC 3840 feature tags).

use super::validate::{ACCEPTED_SDP_TYPES, SUPPORTED_OPTIONS};
use crate::sip::{Method, Request, Response};

/// The 200 to an OPTIONS addressed to the server: Allow with all 14 methods, Accept,
/// Accept-Encoding, Accept-Language, Supported, and a Contact carrying RFC 3840 feature
/// tags. No body (the seed digest: OPTIONS carries none).
pub fn options_ok(req: &Request, contact_uri: &str, user_agent: &str, to_tag: &str) -> Response {
    let mut r = req.response(200);
    r.set_to_tag(to_tag);
    let h = &mut r.headers;
    h.push("Allow", Method::allow_list());
    h.push("Accept", ACCEPTED_SDP_TYPES.join(", "));
    h.push("Accept-Encoding", "identity");
    h.push("Accept-Language", "en");
    h.push("Supported", SUPPORTED_OPTIONS.join(", "));
    // RFC 3840 9: a B2BUA relays audio and video bodies untouched; the methods tag lists
    // what it accepts.
    h.push(
        "Contact",
        format!(
            "<{contact_uri}>;audio;video;methods=\"{}\"",
            Method::ALL
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    h.push("Server", user_agent);
    r
}
