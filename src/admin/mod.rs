//! The admin HTTP endpoint on `http.listen` (hyper, HTTP/1.1, JSON answers).
//!
//! The operator's control plane: every action calls the owning module's API and never its
//! maps or statics. `POST /reload` is the script engine's own reload (the same path as
//! SIGHUP), `POST /drain` the drain hook the server gives it (the transaction layer's
//! `stop_accepting`), `POST /calls/{id}/transfer` the B2BUA's `transfer`, agent state the
//! hunt groups' `set_state`, `GET /registrations` the registrar's `bindings`, `GET /metrics`
//! the telemetry handle's `render`.
//!
//! Owns: the HTTP listener, its routes, their bearer-token check and its 401 counter
//! (`strowger_admin_unauthorized_total`, registered on the telemetry handle). Must not
//! touch: SIP, call state or any module's internals; nothing below imports it.
//!
//! Endpoints: `GET /healthz` (200 `{"status":"ok"}`: alive), `GET /readyz` (200
//! `{"ready":true}` while serving, 503 `{"ready":false}` once draining), `GET /metrics`
//! (Prometheus text format, see `crate::metrics`), `GET /registrations` (the
//! registrar's bindings as a JSON array: aor, contact, q, expires_at, source, user_agent,
//! ...), `POST /reload` (200
//! `{"reloaded":true,"version":N,"tls":"reloaded"}`, or 422 `{"reloaded":false,"error":"file:line: ..."}`
//! when the new script does not compile; the running one stays. It also re-reads
//! `tls.cert`/`tls.key`: `"tls"` is `"reloaded"`, `"none"` without `tls.cert`, or
//! `"refused"` with `"tls_error"` (then 422 too) when the new pair fails its checks and the
//! running certificate stays), `POST /drain` (200
//! `{"draining":true,"unanswered":N}`: new dialog-creating requests get 503 from then on,
//! the requests in flight finish), `GET /calls` (calls in progress: both legs' Call-IDs,
//! state, route, duration), `GET /calls/{id}/trace` (the call's SIP messages in order as
//! a ladder: `{"id","started","ended","dropped","messages":[{"t","dir","leg","peer",
//! "line"}]}`, or text with `?format=text`; `{id}` is the call's id or the SIP Call-ID of
//! either leg; 404 when unknown), `POST /calls/{id}/transfer` (body `{"target":"sip:..",
//! "party":"caller"|"callee"}`: connects that party, the caller by default, to the target
//! and releases the other; answers when the target answered (200) or failed (409), with
//! `{"answered","status","reason"}`; 404 for an unknown call), `GET /huntgroups` (each
//! hunt group's queue, counters and agents), `POST /huntgroups/agent`
//! (`{"agent":..,"state":..}`: login, logout, pause), `GET /trunks` (each trunk's
//! `trunk::TrunkView`: up, registered, channels, registration expiry or next retry and
//! last status, calls by outcome, auth failures).
//!
//! Access: `/registrations`, `/calls`, `/trunks`, `/calls/{id}/trace`, `/calls/{id}/transfer`,
//! `/huntgroups*`, `/reload` and `/drain` need `Authorization: Bearer <http.token>`;
//! a missing or wrong token gets 401 (with `WWW-Authenticate: Bearer`) and is counted
//! ([`AdminServer::unauthorized`], metric `strowger_admin_unauthorized_total`). With `http.token` empty they
//! answer 403, unless the endpoint is bound to a loopback address (development default):
//! then no token is needed. `/healthz`, `/readyz` and `/metrics` are always open.
//! Config keys: `http.listen`, `http.token` ([`HttpConfig`], in `config.rs`).

mod config;
pub use config::HttpConfig;

use crate::registrar::Registrar;
use crate::script::ScriptEngine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What `POST /drain` calls: stops taking new calls and returns how many requests still
/// owe an answer.
pub type DrainHook = Box<dyn Fn() -> usize + Send + Sync>;

/// `GET /calls`: the calls in progress as a JSON array (built by the server from the call
/// core, so this module needs no knowledge of calls).
pub type CallsHook = Box<dyn Fn() -> String + Send + Sync>;

/// `GET /calls/{id}/trace`: the call's SIP ladder, if the call is known (in progress or
/// recently ended) and tracing is on.
pub type TraceHook = Box<dyn Fn(&str) -> Option<crate::trace::TraceView> + Send + Sync>;

/// `POST /calls/{id}/transfer`: (call id, target, to the caller?) -> the outcome of
/// ringing the target (`None`: no such call).
pub type TransferHook = Box<
    dyn Fn(
            String,
            String,
            bool,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Option<crate::b2bua::DialOutcome>> + Send>,
        > + Send
        + Sync,
>;

/// What the admin endpoint needs besides the handles it observes.
pub struct AdminOptions {
    /// `http.token`; empty = none.
    pub token: String,
    /// `http.open_local_writes`.
    pub open_local_writes: bool,
    /// `http.max_connections`.
    pub max_connections: usize,
    /// `http.read_timeout_s`.
    pub read_timeout: Duration,
    /// Called by `POST /drain`.
    pub drain: DrainHook,
    /// Called by `GET /calls`.
    pub calls: CallsHook,
    /// Called by `GET /calls/{id}/trace`.
    pub trace: TraceHook,
    /// Called by `POST /calls/{id}/transfer`.
    pub transfer: TransferHook,
    /// `GET /huntgroups`, `POST /huntgroups/agent` (None: no hunt groups configured).
    pub huntgroups: Option<crate::huntgroup::HuntGroups>,
    /// `GET /trunks` (empty: no trunks configured).
    pub trunks: crate::trunk::Trunks,
    /// Reloaded by `POST /reload` with the script (None: no TLS context).
    pub tls: Option<Arc<crate::transport::TlsContext>>,
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl AdminServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests this endpoint refused with 401.
    pub fn unauthorized(&self) -> u64 {
        self.shared.unauthorized.load(Ordering::Relaxed)
    }

    /// Whether `/readyz` answers 503 (after `POST /drain` or [`Self::set_draining`]).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Marks the server as draining (graceful shutdown): `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection shares.
struct Shared {
    /// SHA-256 of `http.token`, or None when it is empty.
    token: Option<[u8; 32]>,
    /// Bound to a loopback address: no token needed when none is configured.
    loopback: bool,
    drain: DrainHook,
    calls: CallsHook,
    trace: TraceHook,
    transfer: TransferHook,
    huntgroups: Option<crate::huntgroup::HuntGroups>,
    trunks: crate::trunk::Trunks,
    tls: Option<Arc<crate::transport::TlsContext>>,
    draining: AtomicBool,
    unauthorized: AtomicU64,
    open_local_writes: bool,
    /// The listen address, for the Origin check.
    addr: SocketAddr,
    /// `http.read_timeout_s`: also how long a request body may take.
    read_timeout: Duration,
}

#[derive(Clone)]
struct State {
    scripts: ScriptEngine,
    registrar: Registrar,
    telemetry: crate::metrics::Telemetry,
    shared: Arc<Shared>,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut out = [0u8; 32];
    out.copy_from_slice(sha2::Sha256::digest(data).as_slice());
    out
}

/// Binds `listen` and serves until dropped.
pub async fn start(
    listen: SocketAddr,
    options: AdminOptions,
    scripts: ScriptEngine,
    registrar: Registrar,
    telemetry: crate::metrics::Telemetry,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        token: (!options.token.is_empty()).then(|| sha256(options.token.as_bytes())),
        loopback: addr.ip().is_loopback(),
        drain: options.drain,
        calls: options.calls,
        trace: options.trace,
        transfer: options.transfer,
        huntgroups: options.huntgroups,
        trunks: options.trunks,
        tls: options.tls,
        draining: AtomicBool::new(false),
        unauthorized: AtomicU64::new(0),
        open_local_writes: options.open_local_writes,
        addr,
        read_timeout: options.read_timeout,
    });
    if shared.token.is_none() {
        if shared.loopback {
            tracing::warn!(%addr, "http.token is not set: the admin API is open to local clients (loopback only)");
        } else {
            tracing::warn!(%addr, "http.token is not set: the admin API is disabled (only /healthz, /readyz and /metrics answer)");
        }
    }
    let refused = shared.clone();
    telemetry
        .counter(
            "strowger_admin_unauthorized_total",
            "Admin API requests refused with 401 (missing or wrong bearer token)",
        )
        .map(|c| {
            telemetry.on_scrape(move || {
                crate::metrics::catch_up(&c, refused.unauthorized.load(Ordering::Relaxed))
            })
        })
        .map_err(std::io::Error::other)?;
    let state = State {
        scripts,
        registrar,
        telemetry: telemetry.clone(),
        shared: shared.clone(),
    };
    let refused_conns = Arc::new(AtomicU64::new(0));
    let counted = refused_conns.clone();
    telemetry
        .counter(
            "strowger_admin_connections_refused_total",
            "Admin connections closed at once because http.max_connections were open",
        )
        .map(|c| {
            telemetry
                .on_scrape(move || crate::metrics::catch_up(&c, counted.load(Ordering::Relaxed)))
        })
        .map_err(std::io::Error::other)?;
    let limits = ConnLimits {
        open: Arc::new(tokio::sync::Semaphore::new(options.max_connections)),
        refused: refused_conns,
        read_timeout: options.read_timeout,
    };
    let task = tokio::spawn(accept_loop(listener, state, limits));
    Ok(AdminServer { addr, shared, task })
}

/// The admin listener's bounds on connections (issue 15).
struct ConnLimits {
    open: Arc<tokio::sync::Semaphore>,
    refused: Arc<AtomicU64>,
    read_timeout: Duration,
}

/// Accepts admin connections: at most `max_connections` at once (more are closed at once),
/// each with a header-read timeout. An accept error (out of descriptors) backs off instead
/// of spinning, and is logged once per streak.
async fn accept_loop(listener: TcpListener, state: State, limits: ConnLimits) {
    let mut backoff = Duration::ZERO;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                if backoff.is_zero() {
                    tracing::warn!(error = %e, "admin listener cannot accept; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Ok(permit) = limits.open.clone().try_acquire_owned() else {
            limits.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("admin connection closed: http.max_connections open");
            drop(stream);
            continue;
        };
        let state = state.clone();
        let read_timeout = limits.read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    if req.uri().path().starts_with("/huntgroups") {
                        return Ok::<_, Infallible>(hunt_route(&state, req).await);
                    }
                    Ok::<_, Infallible>(route_async(&state, req).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(io, service);
            // hyper starts the header timeout whenever it waits for a request's head, so
            // it also closes a connection that sends nothing; a slow body is bounded where
            // it is read (`read_json`).
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
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

/// Why a state-changing request looks like a web page's (cross-site request forgery,
/// issue 15): a browser names the page's origin in `Origin` (and `Sec-Fetch-Site`), and a
/// page can send only form content types without asking first. The CLI, curl and
/// scripts send neither. None: not refused.
fn cross_site(shared: &Shared, headers: &hyper::HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none") {
        return Some("a cross-site browser request (Sec-Fetch-Site)".into());
    }
    if let Some(origin) = headers.get(hyper::header::ORIGIN) {
        let own = [
            format!("http://{}", shared.addr),
            format!("http://localhost:{}", shared.addr.port()),
        ];
        let origin = origin.to_str().unwrap_or("");
        if !own.iter().any(|o| o == origin) {
            return Some(format!("Origin {origin:?} is not this endpoint"));
        }
    }
    let form = text("content-type").is_some_and(|t| {
        let t = t
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        matches!(
            t.as_str(),
            "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
        )
    });
    form.then(|| "a form Content-Type (send application/json or none)".into())
}

/// Whether a request with `headers` may use the protected endpoint `path`: None if so,
/// else the refusal to send.
fn refuse(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Option<Response<Full<Bytes>>> {
    use subtle::ConstantTimeEq as _;
    let writes = method != Method::GET && method != Method::HEAD;
    if writes {
        if let Some(why) = cross_site(shared, headers) {
            tracing::warn!(path, why, "admin request refused: looks cross-site");
            return Some(json(
                StatusCode::FORBIDDEN,
                format!(r#"{{"error":{}}}"#, quote(&format!("refused: {why}"))),
            ));
        }
    }
    let Some(expected) = &shared.token else {
        if shared.loopback && (!writes || shared.open_local_writes) {
            return None;
        }
        if shared.loopback {
            return Some(json(
                StatusCode::FORBIDDEN,
                r#"{"error":"http.token is not set: set it (and send Authorization: Bearer <token>), or set http.open_local_writes = true to allow POSTs from this host without one"}"#.into(),
            ));
        }
        return Some(json(
            StatusCode::FORBIDDEN,
            r#"{"error":"http.token is not set: the admin API is disabled"}"#.into(),
        ));
    };
    let given = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // Both sides hashed first: the comparison takes the same time whatever the lengths.
    let ok = given.is_some_and(|t| bool::from(sha256(t.as_bytes()).ct_eq(expected)));
    if ok {
        return None;
    }
    shared.unauthorized.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        path,
        token_given = given.is_some(),
        "admin request refused: missing or wrong bearer token"
    );
    let error = if given.is_some() {
        r#"{"error":"wrong bearer token"}"#
    } else {
        r#"{"error":"missing bearer token (Authorization: Bearer <http.token>)"}"#
    };
    let mut r = json(StatusCode::UNAUTHORIZED, error.into());
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

/// The call id of a `/calls/{id}/trace` path.
fn trace_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/calls/")?.strip_suffix("/trace")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// `GET /calls/{id}/trace`: JSON, or the ladder as text with `?format=text`.
fn trace(state: &State, req: &Request<Incoming>, id: &str) -> Response<Full<Bytes>> {
    let Some(view) = (state.shared.trace)(id) else {
        return json(
            StatusCode::NOT_FOUND,
            format!(
                r#"{{"error":{}}}"#,
                quote(&format!(
                    "no trace of call {id} (unknown, ended long ago, or call.trace = false)"
                ))
            ),
        );
    };
    let text = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "format=text"));
    if text {
        let mut r = Response::new(Full::new(Bytes::from(crate::trace::render_text(&view))));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return r;
    }
    match serde_json::to_string(&view) {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(r#"{{"error":{}}}"#, quote(&e.to_string())),
        ),
    }
}

/// The call id of a `/calls/{id}/transfer` path.
fn transfer_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/calls/")?.strip_suffix("/transfer")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// A JSON request body of at most 64 KiB, or the 400 that says what was expected.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
    within: Duration,
) -> Result<T, Response<Full<Bytes>>> {
    use http_body_util::BodyExt as _;
    let bad = |why: String| {
        json(
            StatusCode::BAD_REQUEST,
            format!(r#"{{"error":{}}}"#, quote(&why)),
        )
    };
    let collect = http_body_util::Limited::new(req.into_body(), 64 * 1024).collect();
    let body = tokio::time::timeout(within, collect)
        .await
        .map_err(|_| bad("body not received within http.read_timeout_s".into()))?
        .map_err(|_| bad("body unreadable or over 64 KiB".into()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| bad(format!("expected {expected}: {e}")))
}

/// `POST /reload`: the new version loads on threads of its own (or, with the VMs on the
/// SIP thread, on that thread); this waits without holding a runtime worker.
async fn reload(state: &State) -> Response<Full<Bytes>> {
    let (mut status, mut body) = match state.scripts.reload().await {
        Ok(()) => {
            let version = state.scripts.current().version();
            tracing::info!(version, "script reloaded (admin API)");
            (
                StatusCode::OK,
                format!(r#"{{"reloaded":true,"version":{version}"#),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "script reload refused; the running version stays");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(r#"{{"reloaded":false,"error":{}"#, quote(&e.to_string())),
            )
        }
    };
    // The certificate too, whatever became of the script: they are independent, and a
    // renewed certificate must not wait for a script fix.
    match tls_reload(state.shared.tls.as_deref()) {
        Ok(what) => body.push_str(&format!(r#","tls":"{what}""#)),
        Err(e) => {
            status = StatusCode::UNPROCESSABLE_ENTITY;
            body.push_str(&format!(
                r#","tls":"refused","tls_error":{}"#,
                quote(&e.to_string())
            ));
        }
    }
    body.push('}');
    json(status, body)
}

/// Re-reads the TLS certificate and key: `"reloaded"`, `"none"` (no `tls.cert`), or why
/// the new pair was refused (the running one stays).
fn tls_reload(
    tls: Option<&crate::transport::TlsContext>,
) -> Result<&'static str, crate::transport::tls::TlsError> {
    let Some(tls) = tls.filter(|t| !t.files().cert.as_os_str().is_empty()) else {
        return Ok("none");
    };
    match tls.reload() {
        Ok(()) => {
            if let Some(cert) = tls.certificate() {
                tracing::info!(subject = %cert.subject, expires = %crate::transport::tls::utc(cert.not_after), "TLS certificate reloaded (admin API)");
            }
            Ok("reloaded")
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS certificate reload refused; the running certificate stays");
            Err(e)
        }
    }
}

/// Routes that wait (read a body, wait for a call, reload); the rest answer at once.
async fn route_async(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::POST && req.uri().path() == "/reload" {
        if let Some(refusal) = refuse(&state.shared, req.method(), "/reload", req.headers()) {
            return refusal;
        }
        return reload(state).await;
    }
    let Some(id) = transfer_id(req.uri().path()).map(str::to_owned) else {
        return route(state, req);
    };
    if let Some(refusal) = refuse(&state.shared, req.method(), req.uri().path(), req.headers()) {
        return refusal;
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#.into(),
        );
    }
    #[derive(serde::Deserialize)]
    struct Ask {
        target: String,
        #[serde(default)]
        party: Option<String>,
    }
    let ask: Ask = match read_json(
        req,
        r#"{"target": "sip:...", "party": "caller"|"callee"}"#,
        state.shared.read_timeout,
    )
    .await
    {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    let to_caller = match ask.party.as_deref() {
        None | Some("caller") => true,
        Some("callee") => false,
        Some(other) => {
            return json(
                StatusCode::BAD_REQUEST,
                format!(
                    r#"{{"error":{}}}"#,
                    quote(&format!(
                        "party must be \"caller\" or \"callee\", not {other:?}"
                    ))
                ),
            )
        }
    };
    match (state.shared.transfer)(id.clone(), ask.target, to_caller).await {
        None => json(
            StatusCode::NOT_FOUND,
            format!(r#"{{"error":{}}}"#, quote(&format!("no call {id}"))),
        ),
        Some(o) => {
            let code = if o.answered {
                StatusCode::OK
            } else {
                StatusCode::CONFLICT
            };
            json(
                code,
                format!(
                    r#"{{"answered":{},"status":{},"reason":{}}}"#,
                    o.answered,
                    o.status,
                    quote(&o.reason)
                ),
            )
        }
    }
}

// ---- hunt groups (issue 6) -------------------------------------------------------------

/// `GET /huntgroups`: every group with its queue (waiting, longest wait), counters
/// (answered, abandoned, overflowed) and agents with their states.
/// `POST /huntgroups/agent` with `{"agent":"1001","state":"paused"}` (`available`/`login`,
/// `paused`/`pause`, `logged-out`/`logout`): 200 `{"agent":..,"state":..}`, 404 for an
/// agent in no group, 400 for a bad body or state. Both need the bearer token.
async fn hunt_route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if let Some(refusal) = refuse(&state.shared, req.method(), &path, req.headers()) {
        return refusal;
    }
    let groups = state.shared.huntgroups.clone();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/huntgroups") => {
            let list = groups.map(|g| g.snapshot()).unwrap_or_default();
            json(
                StatusCode::OK,
                serde_json::to_string(&list).unwrap_or_else(|_| "[]".into()),
            )
        }
        (Method::POST, "/huntgroups/agent") => {
            let Some(groups) = groups else {
                return json(
                    StatusCode::NOT_FOUND,
                    r#"{"error":"no hunt groups are configured"}"#.into(),
                );
            };
            #[derive(serde::Deserialize)]
            struct Change {
                agent: String,
                state: String,
            }
            let change: Change =
                match read_json(req, r#"{"agent":..,"state":..}"#, state.shared.read_timeout).await
                {
                    Ok(c) => c,
                    Err(refusal) => return refusal,
                };
            match groups.set_state(&change.agent, &change.state).await {
                Ok(()) => json(
                    StatusCode::OK,
                    serde_json::json!({"agent": change.agent, "state": change.state}).to_string(),
                ),
                Err(e) => {
                    let status = match e {
                        crate::huntgroup::HuntError::UnknownAgent(_) => StatusCode::NOT_FOUND,
                        crate::huntgroup::HuntError::UnknownState(_) => StatusCode::BAD_REQUEST,
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    json(status, format!(r#"{{"error":{}}}"#, quote(&e.to_string())))
                }
            }
        }
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
    }
}

fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let protected = matches!(
        (req.method(), path),
        (&Method::GET, "/registrations" | "/calls" | "/trunks")
            | (&Method::POST, "/reload" | "/drain")
    ) || trace_id(path).is_some();
    if protected {
        if let Some(refusal) = refuse(&state.shared, req.method(), path, req.headers()) {
            return refusal;
        }
    }
    if let Some(id) = trace_id(path) {
        if req.method() == Method::GET {
            return trace(state, &req, id);
        }
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#.into(),
        );
    }
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        (&Method::GET, "/readyz") => {
            if state.shared.draining.load(Ordering::Acquire) {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"ready":false}"#.into())
            } else {
                json(StatusCode::OK, r#"{"ready":true}"#.into())
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(state.telemetry.render())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/calls") => json(StatusCode::OK, (state.shared.calls)()),
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
        (&Method::GET, "/trunks") => {
            let list: Vec<crate::trunk::TrunkView> =
                state.shared.trunks.iter().map(|t| t.view()).collect();
            match serde_json::to_string(&list) {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(r#"{{"error":{}}}"#, quote(&e.to_string())),
                ),
            }
        }
        (&Method::POST, "/drain") => {
            state.shared.draining.store(true, Ordering::Release);
            let unanswered = (state.shared.drain)();
            tracing::info!(unanswered, "draining (admin API): new calls get 503");
            json(
                StatusCode::OK,
                format!(r#"{{"draining":true,"unanswered":{unanswered}}}"#),
            )
        }
        (
            _,
            "/healthz" | "/readyz" | "/reload" | "/drain" | "/registrations" | "/metrics"
            | "/calls" | "/trunks",
        ) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#.into(),
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
    }
}

/// `strowger reload`: asks the server listening on `addr` to reload its script. Returns the
/// server's JSON answer, or an error naming what failed. `token`: `http.token` (empty =
/// none sent).
pub async fn request_reload(addr: SocketAddr, token: &str) -> anyhow::Result<String> {
    success(addr, Method::POST, "/reload", token).await
}

/// `strowger registrations` and `strowger trunks`: one of the server's lists
/// (`"/registrations"`, `"/trunks"`), as its JSON text.
pub async fn request_list(
    addr: SocketAddr,
    path: &'static str,
    token: &str,
) -> anyhow::Result<String> {
    success(addr, Method::GET, path, token).await
}

/// `strowger drain`: the server stops taking new calls; its JSON answer
/// (`{"draining":true,"unanswered":N}`).
pub async fn request_drain(addr: SocketAddr, token: &str) -> anyhow::Result<String> {
    success(addr, Method::POST, "/drain", token).await
}

/// `GET path` on the admin endpoint (tests, tools), without a token: the body of a 2xx.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    success(addr, Method::GET, path, "").await
}

/// The body of a 2xx, else an error with the status and the answer.
async fn success(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
) -> anyhow::Result<String> {
    let token = (!token.is_empty()).then_some(token);
    let resp = send(addr, method, path, token).await?;
    let status = resp.status();
    if status.is_success() {
        Ok(resp.into_body())
    } else {
        anyhow::bail!("{path} refused ({status}): {}", resp.into_body())
    }
}

/// One request to the admin endpoint, with `Authorization: Bearer <token>` when given: the
/// whole answer, whatever its status.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<Response<String>> {
    send_body(addr, method, path, token, Bytes::new()).await
}

/// Like [`send`], with a (JSON) body.
pub async fn send_body(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> anyhow::Result<Response<String>> {
    use anyhow::Context as _;
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin endpoint {addr} (http.listen)"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if !body.is_empty() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(
        parts,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(token: &str, loopback: bool) -> Shared {
        Shared {
            token: (!token.is_empty()).then(|| sha256(token.as_bytes())),
            loopback,
            drain: Box::new(|| 0),
            calls: Box::new(|| "[]".into()),
            trace: Box::new(|_| None),
            transfer: Box::new(|_, _, _| Box::pin(async { None })),
            huntgroups: None,
            trunks: crate::trunk::Trunks::default(),
            tls: None,
            draining: AtomicBool::new(false),
            unauthorized: AtomicU64::new(0),
            open_local_writes: false,
            addr: "127.0.0.1:9090".parse().unwrap(),
            read_timeout: Duration::from_secs(10),
        }
    }

    fn headers(authorization: Option<&str>) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        if let Some(v) = authorization {
            h.insert(hyper::header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    fn status(s: &Shared, authorization: Option<&str>) -> Option<StatusCode> {
        refuse(s, &Method::GET, "/registrations", &headers(authorization)).map(|r| r.status())
    }

    fn post(s: &Shared, extra: &[(&str, &str)]) -> Option<StatusCode> {
        let mut h = headers(None);
        for (k, v) in extra {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        refuse(s, &Method::POST, "/drain", &h).map(|r| r.status())
    }

    /// Issue 15: with no token on loopback, GETs are open but POSTs need the operator's
    /// opt-in, and a browser's cross-site request is refused even then.
    #[test]
    fn writes_without_a_token_need_the_opt_in_and_no_browser() {
        let mut s = shared("", true);
        assert_eq!(post(&s, &[]), Some(StatusCode::FORBIDDEN));
        s.open_local_writes = true;
        assert_eq!(post(&s, &[]), None);
        assert_eq!(post(&s, &[("content-type", "application/json")]), None);
        assert_eq!(post(&s, &[("origin", "http://127.0.0.1:9090")]), None);
        let forbidden = Some(StatusCode::FORBIDDEN);
        assert_eq!(post(&s, &[("origin", "https://evil.example")]), forbidden);
        assert_eq!(post(&s, &[("origin", "null")]), forbidden);
        assert_eq!(post(&s, &[("sec-fetch-site", "cross-site")]), forbidden);
        for t in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            assert_eq!(post(&s, &[("content-type", t)]), forbidden, "{t}");
        }
        // With a token the browser checks apply too (before the token is looked at).
        let s = shared("abc", true);
        assert_eq!(
            post(
                &s,
                &[
                    ("origin", "https://evil.example"),
                    ("authorization", "Bearer abc")
                ]
            ),
            forbidden
        );
        assert_eq!(post(&s, &[("authorization", "Bearer abc")]), None);
        assert_eq!(s.unauthorized.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_token_off_loopback_disables_the_api() {
        let s = shared("", false);
        assert_eq!(status(&s, None), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(&s, Some("Bearer x")), Some(StatusCode::FORBIDDEN));
        assert_eq!(s.unauthorized.load(Ordering::Relaxed), 0);
        let s = shared("", true);
        assert_eq!(status(&s, None), None);
    }

    #[test]
    fn bearer_token_checked() {
        for loopback in [true, false] {
            let s = shared("abc", loopback);
            assert_eq!(status(&s, Some("Bearer abc")), None);
            assert_eq!(status(&s, Some("bearer abc")), None);
            assert_eq!(status(&s, None), Some(StatusCode::UNAUTHORIZED));
            assert_eq!(
                status(&s, Some("Bearer ab")),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(
                status(&s, Some("Bearer abcd")),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(
                status(&s, Some("Basic abc")),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(status(&s, Some("abc")), Some(StatusCode::UNAUTHORIZED));
            assert_eq!(s.unauthorized.load(Ordering::Relaxed), 5);
        }
    }
}
