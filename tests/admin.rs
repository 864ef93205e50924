//! The admin HTTP API's access rules and drain: the bearer token of `http.token` guards
//! `/registrations`, `/reload` and `/drain` (401s counted), the health endpoints and
//! `/metrics` stay open, and `POST /drain` turns `/readyz` to 503 and new calls away.

mod common;

use common::*;
use hyper::{Method, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use strowger::admin::send;

const TOKEN: &str = "s3cret-Token_42";

async fn status_of(addr: SocketAddr, method: Method, path: &str, token: Option<&str>) -> u16 {
    send(addr, method, path, token)
        .await
        .expect("admin endpoint answers")
        .status()
        .as_u16()
}

/// An OPTIONS outside any dialog, over UDP: the final status.
async fn options(server: &TestServer) -> u16 {
    let peer = UdpPeer::bind("127.0.0.1").await;
    let msg = request(
        "OPTIONS",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("opt"),
        "",
        "",
    );
    peer.send(server.udp, msg.as_bytes()).await;
    let resp = peer
        .recv_final(Duration::from_secs(5))
        .await
        .expect("OPTIONS answered");
    status(&resp)
}

#[tokio::test]
async fn the_token_guards_the_admin_api_and_refusals_are_counted() {
    let mut config = test_config();
    config.http.token = TOKEN.into();
    let server = start_with(config).await;
    let admin = server.handle.admin_addr();

    // No token: 401 with a challenge and a JSON error.
    let resp = send(admin, Method::GET, "/registrations", None)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let body: serde_json::Value = serde_json::from_str(resp.body()).expect("JSON error");
    assert!(body["error"].is_string(), "{body}");

    // A wrong token (also one that is a prefix of the right one): 401.
    assert_eq!(
        status_of(admin, Method::GET, "/registrations", Some("wrong")).await,
        401
    );
    assert_eq!(
        status_of(admin, Method::GET, "/registrations", Some(&TOKEN[..5])).await,
        401
    );
    // Actions too, and a refused drain drains nothing.
    assert_eq!(status_of(admin, Method::POST, "/reload", None).await, 401);
    assert_eq!(
        status_of(admin, Method::POST, "/drain", Some("wrong")).await,
        401
    );
    assert_eq!(status_of(admin, Method::GET, "/readyz", None).await, 200);
    assert!(!server.handle.admin().is_draining());
    // Call lists and ladders show who calls whom: guarded too.
    assert_eq!(status_of(admin, Method::GET, "/calls", None).await, 401);
    assert_eq!(
        status_of(admin, Method::GET, "/calls/abc/trace", None).await,
        401
    );
    assert_eq!(
        status_of(admin, Method::GET, "/calls/abc/trace", Some(TOKEN)).await,
        404,
        "an unknown call has no trace"
    );

    // The right token: 200, the bindings as JSON.
    let resp = send(admin, Method::GET, "/registrations", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.body());
    let list: serde_json::Value = serde_json::from_str(resp.body()).unwrap();
    assert!(list.is_array(), "{list}");
    assert_eq!(
        status_of(admin, Method::POST, "/reload", Some(TOKEN)).await,
        200
    );
    // The trunks' state is guarded too (an empty list without [trunks.*]).
    assert_eq!(status_of(admin, Method::GET, "/trunks", None).await, 401);
    assert_eq!(
        strowger::admin::request_list(admin, "/trunks", TOKEN)
            .await
            .unwrap(),
        "[]"
    );
    assert_eq!(
        status_of(admin, Method::POST, "/trunks", Some(TOKEN)).await,
        405
    );
    // The client helpers send the token.
    let text = strowger::admin::request_list(admin, "/registrations", TOKEN)
        .await
        .unwrap();
    assert!(text.starts_with('['), "{text}");
    let err = strowger::admin::request_list(admin, "/registrations", "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    // Open endpoints need none.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            status_of(admin, Method::GET, path, None).await,
            200,
            "{path}"
        );
    }

    // Every 401 counted: 8 above plus the helper's.
    assert_eq!(server.handle.admin().unauthorized(), 9);
    // And exposed: this server's own count (no process-wide static).
    let metrics = strowger::admin::get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("\nstrowger_admin_unauthorized_total 9\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn drain_turns_readyz_to_503_and_new_calls_away() {
    let mut config = test_config();
    config.http.token = TOKEN.into();
    let server = start_with(config).await;
    let admin = server.handle.admin_addr();

    let resp = send(admin, Method::GET, "/readyz", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), r#"{"ready":true}"#);
    assert_ne!(options(&server).await, 503, "not draining yet");

    let resp = send(admin, Method::POST, "/drain", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.body());
    let body: serde_json::Value = serde_json::from_str(resp.body()).unwrap();
    assert_eq!(body["draining"], true, "{body}");
    assert!(body["unanswered"].is_u64(), "{body}");

    let resp = send(admin, Method::GET, "/readyz", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.body(), r#"{"ready":false}"#);
    assert!(server.handle.admin().is_draining());
    // Alive all the same.
    assert_eq!(status_of(admin, Method::GET, "/healthz", None).await, 200);
    // A new request outside a dialog: 503.
    assert_eq!(options(&server).await, 503);
    // Draining twice is harmless.
    assert_eq!(
        status_of(admin, Method::POST, "/drain", Some(TOKEN)).await,
        200
    );
}

#[tokio::test]
async fn without_a_token_a_loopback_endpoint_is_open() {
    // test_config(): http.listen on 127.0.0.1, http.token empty.
    let server = start_server().await;
    let admin = server.handle.admin_addr();
    assert_eq!(
        status_of(admin, Method::GET, "/registrations", None).await,
        200
    );
    // A token sent anyway is not checked: there is none to check against.
    assert_eq!(
        status_of(admin, Method::GET, "/registrations", Some("any")).await,
        200
    );
    assert_eq!(server.handle.admin().unauthorized(), 0);
    // But not POSTs (a web page in a browser on this host could send them, issue 15):
    // 403 until the operator opts in with http.open_local_writes.
    let r = send(admin, Method::POST, "/drain", None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.body().contains("http.open_local_writes"), "{}", r.body());
    assert_eq!(options(&server).await, 200, "nothing drained");
    // Wrong methods and unknown paths.
    assert_eq!(status_of(admin, Method::GET, "/drain", None).await, 405);
    assert_eq!(status_of(admin, Method::POST, "/readyz", None).await, 405);
    assert_eq!(status_of(admin, Method::GET, "/nope", None).await, 404);
}

/// Issue 15: idle or slow connections cannot take the admin listener down. Over
/// `http.max_connections` a connection is closed at once (and counted); one that sends
/// no request head within `http.read_timeout_s` is closed, freeing its place.
#[tokio::test]
async fn admin_connections_are_bounded_and_idle_ones_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = test_config();
    config.http.max_connections = 4;
    config.http.read_timeout_s = 1;
    let server = start_with(config).await;
    let admin = server.handle.admin_addr();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Let the listener take all four before the fifth comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_end(&mut buf))
        .await
        .expect("the fifth connection is closed, not left hanging");
    assert!(
        n.is_err() || buf.is_empty(),
        "over the limit, no answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // The idle four are closed by the header timeout (bounded wait), and /healthz answers.
    for mut c in idle {
        let mut b = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await;
        assert!(
            closed.is_ok(),
            "an idle connection is closed within the read timeout"
        );
    }
    assert_eq!(status_of(admin, Method::GET, "/healthz", None).await, 200);
    let metrics = strowger::admin::get(admin, "/metrics").await.unwrap();
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("strowger_admin_connections_refused_total"))
        .expect("the refusal counter is exported");
    assert!(refused.ends_with(" 1"), "{refused}");
}
