//! Page-mode MESSAGE (RFC 3428) outside any dialog: the script's `on_message` may refuse
//! or name targets; by default the message goes to every registered contact of the
//! recipient at once, and the first 2xx is the sender's answer (RFC 3428 7: a proxy
//! forks MESSAGE like any non-INVITE request; the sender gets one final response).
//!
//! Each fork is a new request of ours (a B2BUA regenerates requests: new Call-ID, tags,
//! Via, CSeq), reaching a registered phone where its REGISTER came from (NAT) and through
//! its Path. (MESSAGE inside a call's dialog is relayed by the call itself, `b2bua::call`.)

use super::{bump, respond, Inner};
use super::{MessageInfo, MessageVerdict};
use crate::sip::{new_tag, Headers, Method, NameAddr, Request, Uri};
use crate::transaction::{ClientEvent, ServerTransaction};
use crate::transport::resolve;
use crate::transport::Target;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Headers that describe the message and go on with it; never topology.
const CARRIED: &[&str] = &[
    "Content-Type",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Date",
    "Subject",
    "Priority",
    "In-Reply-To",
    "Reply-To",
    "Expires",
];

pub(crate) async fn route(inner: Arc<Inner>, tx: ServerTransaction, req: Request) {
    let failed = |inner: &Inner, tx: &ServerTransaction, resp: crate::sip::Response| {
        bump(&inner.stats.messages_failed);
        respond(tx, resp);
    };
    // RFC 3428 7: a body larger than we accept gets 413.
    if req.body.len() > inner.cfg.max_message_size {
        failed(
            &inner,
            &tx,
            req.response(413).with_reason(format!(
                "Message larger than {} bytes",
                inner.cfg.max_message_size
            )),
        );
        return;
    }
    let scripts = &inner.scripts;
    let mut targets: Option<Vec<String>> = None;
    if scripts.has_on_message() {
        let src = tx.source();
        let info = MessageInfo {
            from: req.base.from.uri.to_text(),
            to: req.base.to.uri.to_text(),
            ruri: req.uri.to_text(),
            user: req.uri.user.clone(),
            source: crate::transport::peer_text(src.transport, &src.addr),
            content_type: req.headers.get("Content-Type").map(str::to_owned),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
        };
        match scripts.on_message(&info).await {
            MessageVerdict::Default => {}
            MessageVerdict::Reject(code, reason) => {
                failed(&inner, &tx, req.response(code).with_reason(reason));
                return;
            }
            MessageVerdict::Route(list) => targets = Some(list),
            MessageVerdict::Failed(_) => {
                failed(&inner, &tx, req.response(500).with_reason("Script Error"));
                return;
            }
        }
    }
    let targets = match targets {
        Some(t) => t,
        None => {
            let Some(aor) = inner.resource(&req) else {
                failed(
                    &inner,
                    &tx,
                    req.response(404).with_reason("Not a user of this domain"),
                );
                return;
            };
            let contacts = inner.location.lookup(&aor);
            if contacts.is_empty() {
                // A user we know (users file) who is not registered is only away: 480.
                let user = req.uri.user.as_deref().unwrap_or("");
                let known = inner.users.as_ref().is_some_and(|u| u.get(user).is_some());
                let status = if known { 480 } else { 404 };
                failed(&inner, &tx, req.response(status));
                return;
            }
            contacts
        }
    };
    if targets.is_empty() {
        failed(&inner, &tx, req.response(480));
        return;
    }
    let (events, mut rx) = mpsc::unbounded_channel::<(usize, ClientEvent)>();
    let mut pending = 0usize;
    let mut finals: Vec<(u16, String)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        match fork(&inner, &req, t).await {
            Ok((out, target)) => {
                let events = events.clone();
                let sink = Box::new(move |ev| {
                    let _ = events.send((i, ev));
                });
                match inner.layer.send_request_with(&out, target, sink) {
                    Ok(()) => pending += 1,
                    Err(e) => finals.push((503, e.to_string())),
                }
            }
            Err((status, reason)) => finals.push((status, reason)),
        }
    }
    drop(events);
    // Each fork ends within 64*T1 (Timer F), so this loop is bounded by the transaction
    // layer; the channel closes once every sink is gone.
    while pending > 0 {
        let Some((_, ev)) = rx.recv().await else {
            break;
        };
        match ev {
            ClientEvent::Provisional(_) => continue,
            ClientEvent::Final(resp) if resp.is_success() => {
                // The first 2xx wins (200 or 202 as the recipient said, RFC 3428 7).
                bump(&inner.stats.messages_routed);
                let r = req.response(resp.status).with_reason(resp.reason.clone());
                respond(&tx, r);
                return;
            }
            ClientEvent::Final(resp) => finals.push((resp.status, resp.reason.clone())),
            ClientEvent::Timeout => finals.push((408, "Request Timeout".into())),
            ClientEvent::TransportError(e) => finals.push((503, e)),
        }
        pending -= 1;
    }
    let (status, reason) = best(&finals);
    failed(&inner, &tx, req.response(status).with_reason(reason));
}

/// RFC 3261 16.7 step 6 in short: a 6xx if any, else the lowest class; 503 becomes 500
/// (it is about us, not the recipient); none at all: 480.
fn best(finals: &[(u16, String)]) -> (u16, String) {
    if let Some(six) = finals.iter().find(|(s, _)| *s >= 600) {
        return six.clone();
    }
    match finals.iter().min_by_key(|(s, _)| s / 100) {
        Some((503, _)) => (500, "Server Internal Error".into()),
        Some(r) => r.clone(),
        None => (480, "Temporarily Unavailable".into()),
    }
}

/// The MESSAGE we send to `target` for `req`, and where it goes.
async fn fork(
    inner: &Inner,
    req: &Request,
    target: &str,
) -> Result<(Request, Target), (u16, String)> {
    let uri =
        Uri::parse(target.trim()).map_err(|e| (400, format!("Bad target {target:?}: {e}")))?;
    let flow = inner.flows.flow(target.trim());
    let dest = match &flow {
        Some((t, _)) => *t,
        None => resolve(&uri, &inner.local)
            .await
            .map_err(|e| (503, e.to_string()))?,
    };
    let mut headers = Headers::new();
    if let Some((_, path)) = &flow {
        for hop in path {
            headers.push("Route", hop.clone());
        }
    }
    for name in CARRIED {
        for v in req.headers.get_all(name) {
            headers.push(name, v);
        }
    }
    let mut from = (*req.base.from).clone();
    from.set_tag(&new_tag());
    let mut to: NameAddr = (*req.base.to).clone();
    to.params.remove("tag");
    let mut out = inner
        .local
        .new_request(Method::Message, uri, from, to, &dest);
    out.max_forwards = Some(req.max_forwards.unwrap_or(70).saturating_sub(1));
    out.headers = headers;
    out.body = req.body.clone();
    Ok((out, dest))
}

#[cfg(test)]
mod tests {
    use super::best;

    #[test]
    fn best_final() {
        assert_eq!(best(&[]).0, 480);
        assert_eq!(best(&[(486, "Busy".into()), (404, "nf".into())]).0, 486);
        assert_eq!(best(&[(503, "x".into())]).0, 500);
        assert_eq!(best(&[(404, "x".into()), (603, "d".into())]).0, 603);
    }
}
