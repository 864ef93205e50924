//! SIP over WebSocket and secure WebSocket (RFC 7118): the HTTP upgrade with the `sip`
//! subprotocol and the allowed origins, then one SIP message per WebSocket message, pings.
//!
//! Owns: the WebSocket side of a connection (tokio-tungstenite does the protocol). Must not
//! touch: the connection table ([`super::tcp`] owns it), TLS ([`super::tls`]), parsing.

use super::tcp::{Activity, End, ForgetGuard, Io};
use super::{Target, TransportKind, TransportLimits};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// The subprotocol SIP uses (RFC 7118 4.1, IANA WebSocket Subprotocol Name Registry).
const SUBPROTOCOL: &str = "sip";

/// Why an upgrade is refused: the HTTP status and the reason put in the body.
type Refusal = (StatusCode, &'static str);

/// The HTTP refusal of an upgrade, with the reason in the body.
fn refusal((status, reason): Refusal) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(reason.to_string()));
    *resp.status_mut() = status;
    resp
}

/// Whether an upgrade request may become a SIP WebSocket: it offers the `sip`
/// subprotocol (RFC 7118 4.1) and, when origins are configured, its `Origin` is one of
/// them (RFC 6455 10.2: a browser's page from elsewhere must not register here).
fn check_upgrade(req: &Request, allowed_origins: &[String]) -> Result<(), Refusal> {
    let offers_sip = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL));
    if !offers_sip {
        return Err((
            StatusCode::BAD_REQUEST,
            "the \"sip\" WebSocket subprotocol is required (RFC 7118 4.1)",
        ));
    }
    if !allowed_origins.is_empty() {
        let origin = req.headers().get("origin").and_then(|v| v.to_str().ok());
        let allowed = origin.is_some_and(|o| {
            allowed_origins
                .iter()
                .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(o))
        });
        if !allowed {
            return Err((
                StatusCode::FORBIDDEN,
                "origin not allowed (ws.allowed_origins)",
            ));
        }
    }
    Ok(())
}

/// The server side of the upgrade on `stream` (plain TCP for `ws:`, TLS for `wss:`).
// The callback's error type is tungstenite's HTTP response, large but not ours to shrink.
#[allow(clippy::result_large_err)]
pub(crate) async fn accept<S: Io>(
    stream: S,
    limits: &TransportLimits,
) -> io::Result<WebSocketStream<S>> {
    let allowed = &limits.ws_allowed_origins;
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        check_upgrade(req, allowed).map_err(refusal)?;
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(resp)
    };
    // A SIP message is one WebSocket message (RFC 7118 5): the message bound is ours.
    let config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size));
    tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(io::Error::other)
}

/// Runs one WebSocket connection: a writer task (queued messages and pings) and the
/// reader here. Only reads count as activity, so a peer that stops answering pings is
/// closed after the idle timeout even while we keep writing to it.
pub(crate) async fn drive<S: Io>(
    guard: ForgetGuard,
    ws: WebSocketStream<S>,
    kind: TransportKind,
    peer: SocketAddr,
    local: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let (mut sink, mut stream) = ws.split();
    let shared = guard.tcp.shared.clone();
    let activity = Activity::new();
    let ping_every = shared.limits.ws_ping_interval;
    let writer_shared = shared.clone();
    let mut write_task = guard.tcp.handle.spawn(async move {
        let mut ping = (!ping_every.is_zero()).then(|| {
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every)
        });
        loop {
            let tick = async {
                match &mut ping {
                    Some(p) => {
                        p.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let msg = tokio::select! {
                data = rx.recv() => match data {
                    // SIP is text; a body that is not UTF-8 goes in a binary message
                    // (RFC 7118 5: either kind may carry SIP).
                    Some(d) if std::str::from_utf8(&d).is_ok() => match Utf8Bytes::try_from(d) {
                        Ok(t) => Message::Text(t),
                        Err(_) => continue,
                    },
                    Some(d) => Message::Binary(d),
                    None => break,
                },
                _ = tick => Message::Ping(Bytes::new()),
            };
            let is_ping = matches!(msg, Message::Ping(_));
            if let Err(e) = sink.send(msg).await {
                tracing::debug!(%peer, error = %e, "websocket write failed");
                writer_shared
                    .counters
                    .send_errors
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !is_ping {
                writer_shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = sink.close().await;
    });
    let _abort_writer = super::tcp::AbortOnDrop(write_task.abort_handle());
    let source = Target {
        transport: kind,
        addr: peer,
        connection: Some(guard.id),
    };
    let idle = shared.limits.idle_timeout;
    let read = async {
        loop {
            let waited = activity.idle_for();
            if waited >= idle {
                return End::Idle;
            }
            match tokio::time::timeout(idle - waited, stream.next()).await {
                Err(_) => continue,
                Ok(None) => return End::Eof,
                Ok(Some(Err(e))) => {
                    tracing::debug!(%peer, error = %e, "websocket read failed");
                    if matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)) {
                        shared
                            .counters
                            .tcp_oversize_closed
                            .fetch_add(1, Ordering::Relaxed);
                        return End::Oversize;
                    }
                    return End::ReadError;
                }
                Ok(Some(Ok(msg))) => {
                    activity.touch();
                    let data: &[u8] = match &msg {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        Message::Close(_) => return End::Closed,
                        // A ping is answered by tungstenite; a pong says the peer is there.
                        _ => continue,
                    };
                    // CRLF keep-alives (RFC 5626 3.5.1) carry no message.
                    if data.iter().all(|&c| c == b'\r' || c == b'\n') {
                        continue;
                    }
                    shared.deliver(data, source, local);
                }
            }
        }
    };
    let end = tokio::select! {
        end = read => end,
        _ = &mut write_task => End::WriteEnded,
    };
    tracing::debug!(%peer, conn = guard.id.get(), transport = %kind, reason = ?end, "websocket connection ending");
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(protocol: Option<&str>, origin: Option<&str>) -> Request {
        let mut b = Request::builder().uri("/").header("host", "127.0.0.1");
        if let Some(p) = protocol {
            b = b.header("sec-websocket-protocol", p);
        }
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_sip_subprotocol_is_required() {
        assert!(check_upgrade(&upgrade(Some("sip"), None), &[]).is_ok());
        assert!(check_upgrade(&upgrade(Some("chat, SIP"), None), &[]).is_ok());
        let e = check_upgrade(&upgrade(Some("chat"), None), &[]).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(check_upgrade(&upgrade(None, None), &[]).is_err());
    }

    #[test]
    fn only_allowed_origins_when_configured() {
        let allowed = vec!["https://phone.example.com/".to_string()];
        assert!(check_upgrade(
            &upgrade(Some("sip"), Some("https://phone.example.com")),
            &allowed
        )
        .is_ok());
        let e = check_upgrade(
            &upgrade(Some("sip"), Some("https://evil.example")),
            &allowed,
        )
        .unwrap_err();
        assert_eq!(e.0, StatusCode::FORBIDDEN);
        assert!(check_upgrade(&upgrade(Some("sip"), None), &allowed).is_err());
        // No list: any origin (a softphone sends none).
        assert!(check_upgrade(&upgrade(Some("sip"), Some("https://evil.example")), &[]).is_ok());
    }
}
