//! Subscriptions the script routes elsewhere (`req:route(uri)` in `on_subscribe`, e.g.
//! message-summary to a voicemail server): relayed as a B2BUA relays calls. The
//! subscriber's dialog (A, we are its notifier) and ours with the server (B, we are its
//! subscriber) are separate dialogs; SUBSCRIBEs (initial, refresh, unsubscribe) go A → B
//! and their answers back, NOTIFYs go B → A and their answers back (so a subscriber's 481
//! ends the server's subscription too, RFC 6665 4.2.2).
//!
//! Relays live in the notifier task's memory only: after a restart the subscriber's next
//! refresh gets 481 and it subscribes again (RFC 6665 4.1.2.2).

use super::notifier::{sub_key, Ev};
use super::{respond, Inner, Package};
use crate::dialog::Dialog;
use crate::sip::{new_tag, Headers, Method, Request, Response, Uri};
use crate::transaction::{ClientEvent, ServerTransaction};
use crate::transport::resolve;
use crate::transport::Target;
use std::collections::HashMap;
use std::sync::Arc;

/// Headers of a SUBSCRIBE or NOTIFY that go on to the other dialog.
const CARRIED: &[&str] = &[
    "Event",
    "Expires",
    "Accept",
    "Subscription-State",
    "Content-Type",
    "Content-Disposition",
    "Content-Encoding",
];

fn carry(from: &Headers, to: &mut Headers) {
    for name in CARRIED {
        for v in from.get_all(name) {
            to.push(name, v);
        }
    }
}

struct Relay {
    /// The subscriber's dialog (we are the UAS).
    a: Dialog,
    a_contact: String,
    /// Ours with the server, once its 2xx came.
    b: Option<Dialog>,
    b_key: String,
    /// The subscription ended (a terminated NOTIFY went to A): remove after its answer.
    ending: bool,
    /// Unix seconds after which it is dropped even without a terminated NOTIFY.
    until: u64,
}

/// What a client transaction of the relay is for.
enum Purpose {
    /// A SUBSCRIBE to the server; its answer goes to A.
    Subscribe {
        a_key: String,
        server: ServerTransaction,
        orig: Request,
        /// The initial one: its 2xx makes dialog B from `sent`.
        sent: Option<Box<(Request, Target)>>,
    },
    /// A NOTIFY to A; its answer goes back to the server.
    Notify {
        a_key: String,
        server: ServerTransaction,
        orig: Request,
    },
}

#[derive(Default)]
pub(crate) struct Relays {
    by_a: HashMap<String, Relay>,
    /// Our dialog with the server -> A's key.
    by_b: HashMap<String, String>,
    clients: HashMap<u64, Purpose>,
    next: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Relays {
    pub(crate) fn len(&self) -> usize {
        self.by_a.len()
    }

    fn send(&mut self, inner: &Arc<Inner>, req: Request, target: Target, purpose: Purpose) -> bool {
        self.next += 1;
        let id = self.next;
        let events = inner.events.clone();
        let sink = Box::new(move |event| {
            let _ = events.send(Ev::RelayClient { id, event });
        });
        match inner.layer.send_request_with(&req, target, sink) {
            Ok(()) => {
                self.clients.insert(id, purpose);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "presence: relayed request not sent");
                false
            }
        }
    }

    /// A new SUBSCRIBE the script routed to `target`.
    pub(crate) async fn start(
        &mut self,
        inner: &Arc<Inner>,
        tx: ServerTransaction,
        req: Request,
        package: Package,
        target: String,
    ) {
        let Ok(uri) = Uri::parse(target.trim()) else {
            respond(&tx, req.response(500).with_reason("Bad route target"));
            return;
        };
        let flow = inner.flows.flow(target.trim());
        let dest = match &flow {
            Some((t, _)) => *t,
            None => match resolve(&uri, &inner.local).await {
                Ok(t) => t,
                Err(e) => {
                    respond(&tx, req.response(503).with_reason(e.to_string()));
                    return;
                }
            },
        };
        let mut headers = Headers::new();
        if let Some((_, path)) = &flow {
            for hop in path {
                headers.push("Route", hop.clone());
            }
        }
        headers.push("Contact", inner.local.contact(&dest));
        carry(&req.headers, &mut headers);
        if !headers.has("Event") {
            headers.push("Event", package.as_str());
        }
        let mut from = (*req.base.from).clone();
        let b_tag = new_tag();
        from.set_tag(&b_tag);
        let mut to = (*req.base.to).clone();
        to.params.remove("tag");
        let mut b_req = inner
            .local
            .new_request(Method::Subscribe, uri, from, to, &dest);
        b_req.max_forwards = Some(req.max_forwards.unwrap_or(70).saturating_sub(1));
        b_req.headers = headers;
        b_req.body = req.body.clone();
        let a_tag = new_tag();
        let source = tx.source();
        let mut a = Dialog::uas(&req, &a_tag, source);
        a.state = crate::dialog::DialogState::Confirmed;
        let a_key = sub_key(a.call_id(), &a_tag);
        let b_key = sub_key(&b_req.base.call_id, &b_tag);
        self.by_a.insert(
            a_key.clone(),
            Relay {
                a,
                a_contact: inner.local.contact(&source),
                b: None,
                b_key: b_key.clone(),
                ending: false,
                until: unix_now() + u64::from(inner.cfg.max_expires) + 64,
            },
        );
        inner.index_dialog(&a_key);
        inner.index_dialog(&b_key);
        self.by_b.insert(b_key, a_key.clone());
        let purpose = Purpose::Subscribe {
            a_key: a_key.clone(),
            server: tx.clone(),
            orig: req.clone(),
            sent: Some(Box::new((b_req.clone(), dest))),
        };
        if !self.send(inner, b_req, dest, purpose) {
            self.remove(inner, &a_key);
            respond(&tx, req.response(503));
        }
    }

    /// An in-dialog request of a relayed subscription; given back when none matches.
    pub(crate) fn on_in_dialog(
        &mut self,
        inner: &Arc<Inner>,
        tx: ServerTransaction,
        req: Request,
    ) -> Option<(ServerTransaction, Request)> {
        let key = sub_key(&req.base.call_id, req.base.to.tag().unwrap_or(""));
        if let Some(a_key) = self.by_b.get(&key).cloned() {
            self.relay_notify(inner, &a_key, tx, req);
            return None;
        }
        if self.by_a.contains_key(&key) {
            self.relay_subscribe(inner, &key, tx, req);
            return None;
        }
        Some((tx, req))
    }

    /// A → B: a refresh or unsubscribe.
    fn relay_subscribe(
        &mut self,
        inner: &Arc<Inner>,
        a_key: &str,
        tx: ServerTransaction,
        req: Request,
    ) {
        let Some(relay) = self.by_a.get_mut(a_key) else {
            return;
        };
        if req.method != Method::Subscribe {
            let mut r = req.response(405);
            r.headers.push("Allow", "SUBSCRIBE");
            respond(&tx, r);
            return;
        }
        let Some(b) = relay.b.as_mut() else {
            // RFC 6665 4.1.2.2 lets the subscriber retry; the server has not answered yet.
            respond(
                &tx,
                req.response(500)
                    .with_reason("Subscription not established yet"),
            );
            return;
        };
        relay.a.refresh_target(&req.headers);
        let flow = b.flow;
        let contact = inner.local.contact(&flow);
        let mut out = b.request(Method::Subscribe, inner.local.via(&flow), Some(&contact));
        carry(&req.headers, &mut out.headers);
        let purpose = Purpose::Subscribe {
            a_key: a_key.to_owned(),
            server: tx.clone(),
            orig: req.clone(),
            sent: None,
        };
        if !self.send(inner, out, flow, purpose) {
            respond(&tx, req.response(503));
        }
    }

    /// B → A: a NOTIFY from the server.
    fn relay_notify(
        &mut self,
        inner: &Arc<Inner>,
        a_key: &str,
        tx: ServerTransaction,
        req: Request,
    ) {
        let Some(relay) = self.by_a.get_mut(a_key) else {
            respond(&tx, req.response(481));
            return;
        };
        if req.method != Method::Notify {
            let mut r = req.response(405);
            r.headers.push("Allow", "NOTIFY");
            respond(&tx, r);
            return;
        }
        if let Some(b) = relay.b.as_mut() {
            b.refresh_target(&req.headers);
        }
        if req
            .headers
            .get("Subscription-State")
            .is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("terminated"))
        {
            relay.ending = true;
        }
        let flow = relay.a.flow;
        let contact = relay.a_contact.clone();
        let mut out = relay
            .a
            .request(Method::Notify, inner.local.via(&flow), Some(&contact));
        carry(&req.headers, &mut out.headers);
        out.body = req.body.clone();
        let purpose = Purpose::Notify {
            a_key: a_key.to_owned(),
            server: tx.clone(),
            orig: req.clone(),
        };
        if !self.send(inner, out, flow, purpose) {
            respond(&tx, req.response(503));
        }
    }

    /// What one of the relay's client transactions reported.
    pub(crate) fn on_client(&mut self, inner: &Inner, id: u64, event: ClientEvent) {
        if matches!(event, ClientEvent::Provisional(_)) {
            return;
        }
        let Some(purpose) = self.clients.remove(&id) else {
            return;
        };
        let (status, resp) = match event {
            ClientEvent::Final(r) => (r.status, Some(r)),
            ClientEvent::Timeout => (408, None),
            ClientEvent::TransportError(_) => (503, None),
            ClientEvent::Provisional(_) => return,
        };
        match purpose {
            Purpose::Subscribe {
                a_key,
                server,
                orig,
                sent,
            } => {
                let ok = (200..300).contains(&status);
                let initial = sent.is_some();
                let mut r = answer(&orig, status, resp.as_ref());
                if let Some(relay) = self.by_a.get_mut(&a_key) {
                    r.set_to_tag(relay.a.local_tag());
                    if ok {
                        r.headers.push("Contact", relay.a_contact.clone());
                        if let (Some(sent), Some(resp)) = (sent, resp.as_ref()) {
                            let (sent, target) = *sent;
                            relay.b = Some(Dialog::uac(&sent, resp, target));
                        }
                        if let Some(e) = resp
                            .as_ref()
                            .and_then(|r| r.headers.get("Expires"))
                            .and_then(|e| e.trim().parse::<u64>().ok())
                        {
                            relay.until = unix_now() + e + 64;
                        }
                    }
                }
                let _ = server.respond(r);
                // A failed initial SUBSCRIBE, or a refresh the server no longer knows or
                // never answered: no subscription. (Other refusals, e.g. 423, leave it.)
                if !ok && (initial || matches!(status, 408 | 481)) {
                    self.remove(inner, &a_key);
                }
            }
            Purpose::Notify {
                a_key,
                server,
                orig,
            } => {
                let mut r = answer(&orig, status, resp.as_ref());
                r.headers = Headers::new();
                let _ = server.respond(r);
                let ended = self.by_a.get(&a_key).is_none_or(|r| r.ending);
                if ended || !(200..300).contains(&status) {
                    self.remove(inner, &a_key);
                }
            }
        }
    }

    /// Drops relays past their time (their server never said terminated).
    pub(crate) fn expire(&mut self, inner: &Inner) {
        let now = unix_now();
        let gone: Vec<String> = self
            .by_a
            .iter()
            .filter(|(_, r)| r.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(inner, &k);
        }
    }

    fn remove(&mut self, inner: &Inner, a_key: &str) {
        if let Some(r) = self.by_a.remove(a_key) {
            self.by_b.remove(&r.b_key);
            inner.unindex_dialog(a_key);
            inner.unindex_dialog(&r.b_key);
        }
    }
}

/// The answer for the other side: status, reason and the headers that describe it.
fn answer(orig: &Request, status: u16, resp: Option<&Response>) -> Response {
    let mut r = orig.response(status);
    if let Some(resp) = resp {
        r.reason = resp.reason.clone();
        for name in ["Expires", "Min-Expires", "Allow-Events", "Retry-After"] {
            for v in resp.headers.get_all(name) {
                r.headers.push(name, v);
            }
        }
    }
    r
}
