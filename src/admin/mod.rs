//! The admin HTTP endpoint on `http.listen` (hyper, HTTP/1.1, JSON answers).
//!
//! Owns: the HTTP listener and its routes. Must not touch: SIP or call state; it observes
//! through the handles it is given, and its one action, `POST /reload`, goes through the
//! script engine's own reload (the same path as SIGHUP).
//!
//! Endpoints: `GET /healthz` (200 `{"status":"ok"}`), `GET /metrics` (Prometheus text
//! format, see `crate::metrics`), `GET /registrations` (the
//! registrar's bindings as a JSON array: aor, contact, q, expires_at, source, user_agent,
//! ...), `POST /reload` (200
//! `{"reloaded":true,"version":N}`, or 422 `{"reloaded":false,"error":"file:line: ..."}`
//! when the new script does not compile; the running one stays).
//! Config key: `http.listen`.

use crate::registrar::Registrar;
use crate::script::ScriptEngine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct State {
    scripts: ScriptEngine,
    registrar: Registrar,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Binds `listen` and serves until dropped.
pub async fn start(
    listen: SocketAddr,
    scripts: ScriptEngine,
    registrar: Registrar,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let state = State {
        scripts,
        registrar,
        metrics,
    };
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _peer)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    });
    Ok(AdminServer { addr, task })
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// JSON string literal (quotes and escapes) for error texts.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/registrations") => {
            let mut all = state.registrar.bindings();
            all.sort_by(|a, b| a.aor.cmp(&b.aor).then(b.q.total_cmp(&a.q)));
            match serde_json::to_string(&all) {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(r#"{{"error":{}}}"#, quote(&e.to_string())),
                ),
            }
        }
        (&Method::POST, "/reload") => match state.scripts.reload() {
            Ok(()) => {
                let version = state.scripts.current().version();
                tracing::info!(version, "script reloaded (admin API)");
                json(
                    StatusCode::OK,
                    format!(r#"{{"reloaded":true,"version":{version}}}"#),
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "script reload refused; the running version stays");
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(r#"{{"reloaded":false,"error":{}}}"#, quote(&e.to_string())),
                )
            }
        },
        (_, "/healthz" | "/reload" | "/registrations" | "/metrics") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#.into(),
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
    }
}

/// `strowger reload`: asks the server listening on `addr` to reload its script. Returns the
/// server's JSON answer, or an error naming what failed.
pub async fn request_reload(addr: SocketAddr) -> anyhow::Result<String> {
    request(addr, Method::POST, "/reload").await
}

/// `strowger registrations`: the server's bindings, as its JSON text.
pub async fn request_registrations(addr: SocketAddr) -> anyhow::Result<String> {
    request(addr, Method::GET, "/registrations").await
}

/// `GET path` on the admin endpoint (tests, tools): the body of a 2xx.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    request(addr, Method::GET, path).await
}

/// One request to the admin endpoint; the body of a 2xx, else an error with the answer.
async fn request(addr: SocketAddr, method: Method, path: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin endpoint {addr} (http.listen)"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        anyhow::bail!("{path} refused ({status}): {text}")
    }
}
