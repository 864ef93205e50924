//! One simulated user agent: a task reading its memory endpoint and answering requests as
//! its [`Behaviour`] says, and async methods that place calls, register and hang up.

use super::log::{next_seq, wire_headers, Direction, LogEntry};
use super::{Behaviour, CallOutcome, DeviceSpec, IncomingCall, Registration, Side, SimError};
use crate::sip::{
    new_branch, new_call_id, new_tag, parse, BaseHeaders, CSeq, Headers, Host, Method, NameAddr,
    Request, Response, SipMessage, Uri, Via,
};
use crate::transport::{MemoryEndpoint, MemoryNetwork};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// RFC 3261 17.1.2.2 Timer F (64*T1): how long a non-INVITE request waits for its answer.
const TIMER_F: Duration = Duration::from_secs(32);

/// A simulated phone or trunk. Cheap to clone; the device stops when the last clone is
/// dropped (or at [`Device::stop`]), which frees its address.
#[derive(Clone)]
pub struct Device {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name())
            .field("addr", &self.shared.addr)
            .finish()
    }
}

/// A call of a device, either end: hang it up, cancel it, wait for its end.
#[derive(Clone)]
pub struct Call {
    device: Device,
    call_id: String,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("device", &self.device.name())
            .field("call_id", &self.call_id)
            .finish()
    }
}

struct Shared {
    spec: DeviceSpec,
    name: String,
    addr: SocketAddr,
    network: MemoryNetwork,
    started: Instant,
    state: Mutex<State>,
    /// Bumped after every message in or out, for the waiters of [`Shared::wait_until`].
    changed: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(t) = self.task.get_mut().take() {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    log: Vec<LogEntry>,
    /// Requests this device sent, by top Via branch and method (a CANCEL shares its
    /// INVITE's branch, RFC 3261 9.1).
    clients: HashMap<(String, Method), ClientTx>,
    /// Requests this device answered, by branch and method, for retransmissions.
    servers: HashMap<(String, Method), ServerTx>,
    /// By Call-ID: a device is in at most one dialog per call (the server is a B2BUA).
    dialogs: HashMap<String, Dialog>,
    incoming: Vec<IncomingCall>,
    register_call_id: String,
    register_cseq: u32,
    registration: Option<Registration>,
}

struct ClientTx {
    request: Request,
    dest: SocketAddr,
    sent: Instant,
    provisional: Vec<u16>,
    last_final: Option<(Response, Instant)>,
    /// The ACK sent for an INVITE's final answer, sent again when the answer is.
    ack: Option<Bytes>,
}

struct ServerTx {
    request: Request,
    source: SocketAddr,
    to_tag: String,
    last: Option<Bytes>,
    final_sent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Caller,
    Callee,
}

struct Dialog {
    role: Role,
    invite_branch: String,
    /// Our From (caller) or To (callee), with our tag.
    local: NameAddr,
    /// The other end; its tag once known.
    remote: NameAddr,
    remote_target: Option<Uri>,
    /// Route headers for requests in the dialog, in the order to send (RFC 3261 12.1).
    route_set: Vec<String>,
    cseq: u32,
    /// Where the dialog's messages came from: the fallback destination.
    peer: SocketAddr,
    answered: bool,
    acked: bool,
    cancelled: bool,
    ended_by: Option<Side>,
    incoming: Option<usize>,
}

impl Device {
    /// Starts a device on `network`; with `spec.register`, registers and fails unless the
    /// registrar says 2xx.
    pub async fn start(network: &MemoryNetwork, spec: DeviceSpec) -> Result<Device, SimError> {
        let endpoint = network
            .try_endpoint(spec.addr)
            .map_err(|_| SimError::AddrInUse(spec.addr))?;
        let addr = endpoint.local_addr();
        let name = if spec.name.is_empty() {
            spec.user.clone()
        } else {
            spec.name.clone()
        };
        let shared = Arc::new(Shared {
            name,
            addr,
            network: network.clone(),
            started: Instant::now(),
            state: Mutex::new(State {
                register_call_id: new_call_id(&addr.ip().to_string()),
                ..State::default()
            }),
            changed: watch::channel(0).0,
            task: Mutex::new(None),
            spec,
        });
        let task = tokio::spawn(run(Arc::downgrade(&shared), endpoint));
        *shared.task.lock() = Some(task.abort_handle());
        let device = Device { shared };
        if device.shared.spec.register && !device.shared.spec.trunk {
            let r = device.register(device.shared.spec.expires).await?;
            if !(200..300).contains(&r.status) {
                return Err(SimError::NotRegistered {
                    status: r.status,
                    reason: r.reason,
                });
            }
        }
        Ok(device)
    }

    /// Its name in logs (the spec's name, else its user).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn user(&self) -> &str {
        &self.shared.spec.user
    }

    pub fn spec(&self) -> &DeviceSpec {
        &self.shared.spec
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `sip:<user>@<domain>`.
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.shared.spec.user, self.shared.spec.domain)
    }

    /// When it started, on the tokio clock.
    pub fn started(&self) -> Instant {
        self.shared.started
    }

    /// Time since it started, on the tokio clock.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Stops reading its endpoint and frees its address; later calls fail or time out.
    pub fn stop(&self) {
        if let Some(t) = self.shared.task.lock().take() {
            t.abort();
        }
    }

    /// The answer to its last REGISTER.
    pub fn registration(&self) -> Option<Registration> {
        self.shared.state.lock().registration.clone()
    }

    /// Registers its Contact for `expires` seconds (0: unregisters) and returns the
    /// registrar's answer, whatever it is (RFC 3261 10.2).
    pub async fn register(&self, expires: u32) -> Result<Registration, SimError> {
        let s = &self.shared;
        let spec = &s.spec;
        let aor = NameAddr::new(parse_uri(&self.aor())?);
        let (call_id, seq) = {
            let mut st = s.state.lock();
            st.register_cseq += 1;
            (st.register_call_id.clone(), st.register_cseq)
        };
        let mut from = aor.clone();
        from.set_tag(&new_tag());
        let mut headers = Headers::new();
        headers.push("Contact", s.contact());
        headers.push("Expires", expires.to_string());
        headers.push("User-Agent", "strowger-simulate");
        // 10.2: the Request-URI names the domain of the registrar, not the user.
        let ruri = parse_uri(&format!("sip:{}", spec.domain))?;
        let req = s.request(Method::Register, ruri, from, aor, call_id, seq, headers);
        let resp = s.transact(req, spec.server, TIMER_F).await?;
        let granted = resp
            .headers
            .get("Contact")
            .and_then(|c| NameAddr::parse(c).ok())
            .and_then(|c| c.params.value("expires").and_then(|e| e.parse().ok()))
            .or_else(|| resp.headers.get("Expires").and_then(|e| e.parse().ok()));
        let r = Registration {
            status: resp.status,
            reason: resp.reason.clone(),
            expires: granted,
            at: s.started.elapsed(),
        };
        s.state.lock().registration = Some(r.clone());
        Ok(r)
    }

    /// Sends an INVITE (with SDP and the extra `headers`) to `to` — a user made
    /// `sip:<to>@<domain>`, or a full URI — through the server, and returns at once; see
    /// [`Call::outcome`].
    pub async fn dial(&self, to: &str, headers: &[(String, String)]) -> Result<Call, SimError> {
        let s = &self.shared;
        let target = if to.contains(':') {
            to.to_owned()
        } else {
            format!("sip:{to}@{}", s.spec.domain)
        };
        let ruri = parse_uri(&target)?;
        let mut from = NameAddr::new(parse_uri(&self.aor())?);
        from.set_tag(&new_tag());
        let to_addr = NameAddr::new(ruri.clone());
        let call_id = new_call_id(&s.addr.ip().to_string());
        let mut extra = Headers::new();
        extra.push("Contact", s.contact());
        extra.push("Allow", ALLOW);
        extra.push("User-Agent", "strowger-simulate");
        for (n, v) in headers {
            extra.push(n, v.clone());
        }
        extra.push("Content-Type", "application/sdp");
        let mut req = s.request(
            Method::Invite,
            ruri,
            from.clone(),
            to_addr.clone(),
            call_id.clone(),
            1,
            extra,
        );
        req.body = s.sdp();
        let branch = req.base.branch().to_owned();
        s.state.lock().dialogs.insert(
            call_id.clone(),
            Dialog {
                role: Role::Caller,
                invite_branch: branch,
                local: from,
                remote: to_addr,
                remote_target: None,
                route_set: Vec::new(),
                cseq: 1,
                peer: s.spec.server,
                answered: false,
                acked: false,
                cancelled: false,
                ended_by: None,
                incoming: None,
            },
        );
        s.start_client(req, s.spec.server);
        Ok(Call {
            device: self.clone(),
            call_id,
        })
    }

    /// [`dial`](Self::dial) and wait for the final answer (ACKed; a 200 leaves the call up).
    pub async fn call(
        &self,
        to: &str,
        headers: &[(String, String)],
    ) -> Result<CallOutcome, SimError> {
        self.dial(to, headers).await?.outcome().await
    }

    /// Everything it sent and received so far, in order.
    pub fn log(&self) -> Vec<LogEntry> {
        self.shared.state.lock().log.clone()
    }

    /// The INVITEs that started calls to it, in order.
    pub fn incoming(&self) -> Vec<IncomingCall> {
        self.shared.state.lock().incoming.clone()
    }

    /// Waits (up to `within`) until it has had `n` incoming calls; returns the `n`th.
    pub async fn wait_incoming(
        &self,
        n: usize,
        within: Duration,
    ) -> Result<IncomingCall, SimError> {
        let n = n.max(1);
        self.shared
            .wait_until(within, |st| st.incoming.get(n - 1).cloned())
            .await
            .ok_or(SimError::Timeout {
                method: format!("incoming INVITE #{n}"),
                waited: within,
            })
    }

    /// A handle on one of its calls (e.g. an incoming one, to hang it up).
    pub fn call_handle(&self, call_id: &str) -> Result<Call, SimError> {
        if !self.shared.state.lock().dialogs.contains_key(call_id) {
            return Err(SimError::NoSuchCall(call_id.to_owned()));
        }
        Ok(Call {
            device: self.clone(),
            call_id: call_id.to_owned(),
        })
    }

    /// Its own messages as ladder lines (see [`super::ladder`]).
    pub fn ladder(&self) -> String {
        super::ladder(&[self])
    }
}

impl Call {
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Waits for the final answer to the call's INVITE (following provisionals), up to the
    /// device's patience. Ask again and the same outcome comes back.
    pub async fn outcome(&self) -> Result<CallOutcome, SimError> {
        let s = &self.device.shared;
        let key = {
            let st = s.state.lock();
            let d = st
                .dialogs
                .get(&self.call_id)
                .ok_or_else(|| SimError::NoSuchCall(self.call_id.clone()))?;
            if d.role != Role::Caller {
                return Err(SimError::NotCaller(self.call_id.clone()));
            }
            (d.invite_branch.clone(), Method::Invite)
        };
        let patience = s.spec.patience;
        let got = s
            .wait_until(patience, |st| {
                let tx = st.clients.get(&key)?;
                let (resp, at) = tx.last_final.as_ref()?;
                Some((
                    resp.clone(),
                    at.duration_since(tx.sent),
                    tx.provisional.clone(),
                ))
            })
            .await;
        let Some((resp, elapsed, provisional)) = got else {
            return Err(SimError::Timeout {
                method: "INVITE".into(),
                waited: patience,
            });
        };
        let headers = wire_headers(&resp.to_bytes());
        Ok(CallOutcome {
            status: resp.status,
            reason: resp.reason,
            provisional,
            headers,
            elapsed,
            call: self.clone(),
        })
    }

    /// Cancels the call while it rings (RFC 3261 9.1: only once a provisional answer has
    /// come). `None`: the INVITE already had its final answer, nothing to cancel; else the
    /// status of the answer to the CANCEL.
    pub async fn cancel(&self) -> Result<Option<u16>, SimError> {
        let s = &self.device.shared;
        let key = self.caller_key()?;
        let waited = s
            .wait_until(s.spec.patience, |st| {
                let tx = st.clients.get(&key)?;
                (tx.last_final.is_some() || !tx.provisional.is_empty())
                    .then(|| tx.last_final.is_some())
            })
            .await;
        match waited {
            None => {
                return Err(SimError::Timeout {
                    method: "INVITE (a provisional answer before CANCEL)".into(),
                    waited: s.spec.patience,
                })
            }
            Some(true) => return Ok(None),
            Some(false) => {}
        }
        let (cancel, dest) = {
            let mut st = s.state.lock();
            let tx = st.clients.get(&key).ok_or(SimError::Stopped)?;
            // 9.1: the INVITE's Request-URI, Call-ID, From, To (no tag), CSeq number and
            // its one Via (same branch), and its Route headers.
            let inv = &tx.request;
            let mut headers = Headers::new();
            for r in inv.headers.get_all("Route") {
                headers.push("Route", r);
            }
            let cancel = Request {
                method: Method::Cancel,
                uri: inv.uri.clone(),
                version: "2.0".into(),
                base: BaseHeaders {
                    via: inv.base.via.clone(),
                    from: inv.base.from.clone(),
                    to: inv.base.to.clone(),
                    call_id: inv.base.call_id.clone(),
                    cseq: CSeq {
                        seq: inv.base.cseq.seq,
                        method: Method::Cancel,
                    },
                },
                max_forwards: Some(70),
                headers,
                body: Bytes::new(),
            };
            let dest = tx.dest;
            if let Some(d) = st.dialogs.get_mut(&self.call_id) {
                d.cancelled = true;
            }
            (cancel, dest)
        };
        let resp = s.transact(cancel, dest, TIMER_F).await?;
        Ok(Some(resp.status))
    }

    /// Hangs up an answered call with a BYE (RFC 3261 15.1.1); the status of its answer.
    pub async fn hangup(&self) -> Result<u16, SimError> {
        let s = &self.device.shared;
        let (req, dest) = s.in_dialog(&self.call_id, Method::Bye, Headers::new(), true)?;
        let resp = s.transact(req, dest, TIMER_F).await?;
        Ok(resp.status)
    }

    /// Waits (up to `within`) for the call to end, by either side; returns which.
    pub async fn wait_ended(&self, within: Duration) -> Result<Side, SimError> {
        self.device
            .shared
            .wait_until(within, |st| {
                st.dialogs.get(&self.call_id).and_then(|d| d.ended_by)
            })
            .await
            .ok_or(SimError::Timeout {
                method: "the end of the call (BYE)".into(),
                waited: within,
            })
    }

    /// Who ended it, if it has ended.
    pub fn ended_by(&self) -> Option<Side> {
        let st = self.device.shared.state.lock();
        st.dialogs.get(&self.call_id).and_then(|d| d.ended_by)
    }

    /// Answered and not ended.
    pub fn is_up(&self) -> bool {
        let st = self.device.shared.state.lock();
        st.dialogs
            .get(&self.call_id)
            .is_some_and(|d| d.answered && d.ended_by.is_none())
    }

    fn caller_key(&self) -> Result<(String, Method), SimError> {
        let st = self.device.shared.state.lock();
        let d = st
            .dialogs
            .get(&self.call_id)
            .ok_or_else(|| SimError::NoSuchCall(self.call_id.clone()))?;
        if d.role != Role::Caller {
            return Err(SimError::NotCaller(self.call_id.clone()));
        }
        Ok((d.invite_branch.clone(), Method::Invite))
    }
}

const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, INFO, UPDATE, MESSAGE, PRACK";

/// Reads the endpoint until the device goes. Holds the device weakly, so that dropping
/// the last [`Device`] ends it.
async fn run(weak: Weak<Shared>, mut endpoint: MemoryEndpoint) {
    while let Some((from, data)) = endpoint.recv().await {
        let Some(shared) = weak.upgrade() else { break };
        shared.on_datagram(from, data);
    }
}

fn parse_uri(s: &str) -> Result<Uri, SimError> {
    Uri::parse(s).map_err(|source| SimError::BadUri {
        uri: s.to_owned(),
        source,
    })
}

/// The address a URI's host and port name on the memory network, if it is an IP address.
fn uri_addr(uri: &Uri) -> Option<SocketAddr> {
    Some(SocketAddr::new(uri.host.ip()?, uri.port.unwrap_or(5060)))
}

impl Shared {
    fn now(&self) -> (Duration, Instant) {
        let now = Instant::now();
        (now.duration_since(self.started), now)
    }

    fn note(
        &self,
        st: &mut State,
        direction: Direction,
        peer: SocketAddr,
        message: SipMessage,
        raw: Bytes,
    ) {
        let (at, instant) = self.now();
        st.log.push(LogEntry {
            at,
            instant,
            seq: next_seq(),
            direction,
            peer,
            message,
            raw,
        });
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Sends a message, logging it (with the state locked by the caller).
    fn send_locked(&self, st: &mut State, to: SocketAddr, message: SipMessage) -> Bytes {
        let raw = message.to_bytes();
        self.note(st, Direction::Sent, to, message, raw.clone());
        // A datagram to nobody is dropped, as over UDP; the waiter times out.
        self.network.deliver(self.addr, to, raw.clone());
        raw
    }

    fn resend_locked(&self, st: &mut State, to: SocketAddr, raw: Bytes) {
        if let Ok((message, _)) = parse(&raw) {
            self.note(st, Direction::Sent, to, message, raw.clone());
        }
        self.network.deliver(self.addr, to, raw);
    }

    fn contact(&self) -> String {
        // `transport=memory`: a server that also has sockets still reaches us in memory.
        format!("<sip:{}@{};transport=memory>", self.spec.user, self.addr)
    }

    /// The fixed session description every call offers and answers (RFC 4566).
    fn sdp(&self) -> Bytes {
        let ip = self.addr.ip();
        let family = if ip.is_ipv6() { "IP6" } else { "IP4" };
        let port = 20_000 + (self.addr.port() % 10_000) * 2;
        Bytes::from(format!(
            "v=0\r\no=- 1 1 IN {family} {ip}\r\ns=-\r\nc=IN {family} {ip}\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
        ))
    }

    /// A request with a fresh branch (RFC 3261 8.1.1).
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        method: Method,
        uri: Uri,
        from: NameAddr,
        to: NameAddr,
        call_id: String,
        seq: u32,
        headers: Headers,
    ) -> Request {
        let mut params = crate::sip::Params::new();
        params.set("branch", Some(&new_branch()));
        // RFC 3581: answers come back to the source address, as they do anyway here.
        params.set("rport", None);
        let via = Via {
            version: "2.0".into(),
            transport: "UDP".into(),
            host: Host::from(self.addr.ip()),
            port: Some(self.addr.port()),
            params,
        };
        Request {
            method: method.clone(),
            uri,
            version: "2.0".into(),
            base: BaseHeaders {
                via: vec![via],
                from: from.into(),
                to: to.into(),
                call_id,
                cseq: CSeq { seq, method },
            },
            max_forwards: Some(70),
            headers,
            body: Bytes::new(),
        }
    }

    /// Sends a request and opens its client transaction.
    fn start_client(&self, req: Request, dest: SocketAddr) -> (String, Method) {
        let key = (req.base.branch().to_owned(), req.method.clone());
        let mut st = self.state.lock();
        self.send_locked(&mut st, dest, SipMessage::Request(req.clone()));
        st.clients.insert(
            key.clone(),
            ClientTx {
                request: req,
                dest,
                sent: Instant::now(),
                provisional: Vec::new(),
                last_final: None,
                ack: None,
            },
        );
        drop(st);
        self.bump();
        key
    }

    /// Sends a request and waits for its final answer.
    async fn transact(
        &self,
        req: Request,
        dest: SocketAddr,
        within: Duration,
    ) -> Result<Response, SimError> {
        let method = req.method.to_string();
        let key = self.start_client(req, dest);
        self.wait_until(within, |st| {
            st.clients
                .get(&key)
                .and_then(|t| t.last_final.as_ref().map(|(r, _)| r.clone()))
        })
        .await
        .ok_or(SimError::Timeout {
            method,
            waited: within,
        })
    }

    /// Waits until `f` finds something in the state, or `within` passes (tokio clock).
    async fn wait_until<T>(
        &self,
        within: Duration,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        // Subscribe before looking, so that a change between the look and the wait wakes us.
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f(&self.state.lock()) {
                return Some(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return f(&self.state.lock()),
            }
        }
    }

    /// A request in the dialog of `call_id` (RFC 3261 12.2.1.1) and where it goes.
    /// `ending`: a BYE, which needs the call answered and ends it now.
    fn in_dialog(
        &self,
        call_id: &str,
        method: Method,
        headers: Headers,
        ending: bool,
    ) -> Result<(Request, SocketAddr), SimError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let d = st
            .dialogs
            .get_mut(call_id)
            .ok_or_else(|| SimError::NoSuchCall(call_id.to_owned()))?;
        if !d.answered || d.ended_by.is_some() {
            return Err(SimError::NotUp(call_id.to_owned()));
        }
        d.cseq += 1;
        let target = d
            .remote_target
            .clone()
            .unwrap_or_else(|| d.remote.uri.clone());
        let mut all = Headers::new();
        for r in &d.route_set {
            all.push("Route", r.clone());
        }
        for h in headers.iter() {
            all.push(&h.name, h.value.clone());
        }
        // 12.2.1.1 / 16.12: the first Route (loose routing) or else the remote target.
        let dest = d
            .route_set
            .first()
            .and_then(|r| NameAddr::parse(r).ok())
            .and_then(|r| uri_addr(&r.uri))
            .or_else(|| uri_addr(&target))
            .unwrap_or(d.peer);
        let (local, remote, seq) = (d.local.clone(), d.remote.clone(), d.cseq);
        let incoming = d.incoming;
        if ending {
            d.ended_by = Some(Side::Local);
            if let Some(i) = incoming {
                let at = self.started.elapsed();
                if let Some(inc) = st.incoming.get_mut(i) {
                    inc.ended_by = Some(Side::Local);
                    inc.ended_at = Some(at);
                }
            }
        }
        drop(guard);
        let req = self.request(method, target, local, remote, call_id.to_owned(), seq, all);
        Ok((req, dest))
    }

    fn on_datagram(self: &Arc<Self>, from: SocketAddr, data: Bytes) {
        let Ok((message, _)) = parse(&data) else {
            // Not SIP: nothing a phone could answer (RFC 3261 18.3 drops it too).
            return;
        };
        {
            let mut st = self.state.lock();
            self.note(
                &mut st,
                Direction::Received,
                from,
                message.clone(),
                data.clone(),
            );
            match message {
                SipMessage::Response(resp) => self.on_response(&mut st, resp),
                SipMessage::Request(req) => self.on_request(&mut st, from, req, &data),
            }
        }
        self.bump();
    }

    fn on_response(self: &Arc<Self>, st: &mut State, resp: Response) {
        let key = (resp.base.branch().to_owned(), resp.base.cseq.method.clone());
        let Some(tx) = st.clients.get_mut(&key) else {
            return; // 17.1.3: matches no transaction; dropped.
        };
        if resp.is_provisional() {
            if tx.last_final.is_none() {
                tx.provisional.push(resp.status);
            }
            return;
        }
        if tx.last_final.is_some() {
            // A retransmitted final answer: the ACK again (17.1.1.3, 13.2.2.4).
            if let Some(ack) = tx.ack.clone() {
                let dest = tx.dest;
                self.resend_locked(st, dest, ack);
            }
            return;
        }
        tx.last_final = Some((resp.clone(), Instant::now()));
        if key.1 != Method::Invite {
            return;
        }
        let invite = tx.request.clone();
        let invite_dest = tx.dest;
        let call_id = resp.base.call_id.clone();
        if !resp.is_success() {
            // 17.1.1.3: the ACK for a non-2xx answer is part of the INVITE transaction:
            // same branch, Request-URI and From; the answer's To (with its tag).
            let ack = Request {
                method: Method::Ack,
                uri: invite.uri.clone(),
                version: "2.0".into(),
                base: BaseHeaders {
                    via: invite.base.via.clone(),
                    from: invite.base.from.clone(),
                    to: resp.base.to.clone(),
                    call_id: call_id.clone(),
                    cseq: CSeq {
                        seq: invite.base.cseq.seq,
                        method: Method::Ack,
                    },
                },
                max_forwards: Some(70),
                headers: {
                    let mut h = Headers::new();
                    for r in invite.headers.get_all("Route") {
                        h.push("Route", r);
                    }
                    h
                },
                body: Bytes::new(),
            };
            let raw = self.send_locked(st, invite_dest, SipMessage::Request(ack));
            if let Some(tx) = st.clients.get_mut(&key) {
                tx.ack = Some(raw);
            }
            if let Some(d) = st.dialogs.get_mut(&call_id) {
                // A 487 after our CANCEL is our own doing.
                let by = if d.cancelled {
                    Side::Local
                } else {
                    Side::Remote
                };
                d.ended_by.get_or_insert(by);
            }
            return;
        }
        // 2xx: the dialog is up (12.1.2): remote tag, target, route set (reversed).
        let Some(d) = st.dialogs.get_mut(&call_id) else {
            return;
        };
        d.remote = (*resp.base.to).clone();
        d.remote_target = resp
            .headers
            .get("Contact")
            .and_then(|c| NameAddr::parse(c).ok())
            .map(|c| c.uri);
        d.route_set = resp
            .headers
            .list("Record-Route")
            .into_iter()
            .rev()
            .collect();
        d.answered = true;
        d.acked = true;
        let cancelled = d.cancelled;
        let target = d.remote_target.clone().unwrap_or(invite.uri.clone());
        let dest = d
            .route_set
            .first()
            .and_then(|r| NameAddr::parse(r).ok())
            .and_then(|r| uri_addr(&r.uri))
            .or_else(|| uri_addr(&target))
            .unwrap_or(invite_dest);
        let mut headers = Headers::new();
        for r in &d.route_set {
            headers.push("Route", r.clone());
        }
        // 13.2.2.4: the ACK for a 2xx is its own transaction: a new branch, the INVITE's
        // CSeq number.
        let ack = self.request(
            Method::Ack,
            target,
            d.local.clone(),
            d.remote.clone(),
            call_id.clone(),
            invite.base.cseq.seq,
            headers,
        );
        let raw = self.send_locked(st, dest, SipMessage::Request(ack));
        if let Some(tx) = st.clients.get_mut(&key) {
            tx.ack = Some(raw);
        }
        if cancelled {
            // 9.1: the 200 crossed our CANCEL; the call is up, so it is ended with a BYE.
            let me = self.clone();
            tokio::spawn(async move {
                if let Ok((bye, dest)) = me.in_dialog(&call_id, Method::Bye, Headers::new(), true) {
                    let _ = me.transact(bye, dest, TIMER_F).await;
                }
            });
        }
    }

    fn on_request(self: &Arc<Self>, st: &mut State, from: SocketAddr, req: Request, raw: &Bytes) {
        let key = (req.base.branch().to_owned(), req.method.clone());
        if req.method != Method::Ack {
            // 17.2.1 / 17.2.2: a retransmission gets the last answer again.
            if let Some(tx) = st.servers.get(&key) {
                if let Some(last) = tx.last.clone() {
                    let to = tx.source;
                    self.resend_locked(st, to, last);
                }
                return;
            }
        }
        let call_id = req.base.call_id.clone();
        let known = st
            .dialogs
            .get(&call_id)
            .is_some_and(|d| d.ended_by.is_none());
        match req.method {
            Method::Invite if req.base.to.tag().is_none() => self.on_invite(st, from, req, raw),
            // A re-INVITE or UPDATE: the same session again (RFC 3264 8, RFC 3311).
            Method::Invite | Method::Update if known => {
                let tag = req.base.to.tag().unwrap_or("").to_owned();
                self.respond(st, from, &req, 200, &tag, true);
            }
            Method::Invite | Method::Update => self.respond(st, from, &req, 481, "", false),
            Method::Ack => self.on_ack(st, &req),
            Method::Bye => {
                if !known {
                    // 15.1.2: no such dialog.
                    return self.respond(st, from, &req, 481, "", false);
                }
                let at = self.started.elapsed();
                if let Some(d) = st.dialogs.get_mut(&call_id) {
                    d.ended_by = Some(Side::Remote);
                    if let Some(i) = d.incoming {
                        if let Some(inc) = st.incoming.get_mut(i) {
                            inc.ended_by = Some(Side::Remote);
                            inc.ended_at = Some(at);
                        }
                    }
                }
                self.respond(st, from, &req, 200, "", false);
            }
            Method::Cancel => self.on_cancel(st, from, &req),
            Method::Options | Method::Notify | Method::Info | Method::Message | Method::Prack => {
                self.respond(st, from, &req, 200, "", false)
            }
            Method::Register | Method::Subscribe | Method::Publish | Method::Refer => {
                // 8.2.1: a method this user agent does not take.
                self.respond(st, from, &req, 405, "", false)
            }
            Method::Other(_) => self.respond(st, from, &req, 501, "", false),
        }
    }

    /// Answers `req` (RFC 3261 8.2.6): its To tag for dialog-forming answers, Contact and
    /// SDP on an answered INVITE, Allow on a 405; remembered for retransmissions.
    fn respond(
        &self,
        st: &mut State,
        to: SocketAddr,
        req: &Request,
        status: u16,
        to_tag: &str,
        with_sdp: bool,
    ) {
        let mut resp = req.response(status);
        if !to_tag.is_empty() {
            resp.set_to_tag(to_tag);
        } else if status >= 200 && req.base.to.tag().is_none() && req.method != Method::Cancel {
            resp.set_to_tag(&new_tag());
        }
        if matches!(req.method, Method::Invite | Method::Update) && (status < 300) {
            resp.headers.push("Contact", self.contact());
        }
        if status == 405 || (req.method == Method::Options && status == 200) {
            resp.headers.push("Allow", ALLOW);
        }
        if with_sdp {
            resp.headers.push("Content-Type", "application/sdp");
            resp.body = self.sdp();
        }
        let raw = self.send_locked(st, to, SipMessage::Response(resp));
        let key = (req.base.branch().to_owned(), req.method.clone());
        let tx = st.servers.entry(key).or_insert_with(|| ServerTx {
            request: req.clone(),
            source: to,
            to_tag: to_tag.to_owned(),
            last: None,
            final_sent: false,
        });
        tx.last = Some(raw);
        tx.final_sent |= status >= 200;
        if req.method == Method::Invite && status >= 200 {
            if let Some(i) = st.dialogs.get(&req.base.call_id).and_then(|d| d.incoming) {
                if let Some(inc) = st.incoming.get_mut(i) {
                    inc.final_status.get_or_insert(status);
                }
            }
        }
    }

    /// A new INVITE: a call to this device (RFC 3261 13.3.1).
    fn on_invite(self: &Arc<Self>, st: &mut State, from: SocketAddr, req: Request, raw: &Bytes) {
        let call_id = req.base.call_id.clone();
        let to_tag = new_tag();
        let branch = req.base.branch().to_owned();
        st.servers.insert(
            (branch.clone(), Method::Invite),
            ServerTx {
                request: req.clone(),
                source: from,
                to_tag: to_tag.clone(),
                last: None,
                final_sent: false,
            },
        );
        let index = st.incoming.len();
        st.incoming.push(IncomingCall {
            call_id: call_id.clone(),
            ruri: req.uri.to_string(),
            number: req.uri.user.clone(),
            from: req.base.from.to_string(),
            to: req.base.to.to_string(),
            headers: wire_headers(raw),
            at: self.started.elapsed(),
            final_status: None,
            answered_at: None,
            ended_by: None,
            ended_at: None,
        });
        let mut local = (*req.base.to).clone();
        local.set_tag(&to_tag);
        // 12.1.1: the callee's route set is the Record-Route in order.
        st.dialogs.insert(
            call_id.clone(),
            Dialog {
                role: Role::Callee,
                invite_branch: branch.clone(),
                local,
                remote: (*req.base.from).clone(),
                remote_target: req
                    .headers
                    .get("Contact")
                    .and_then(|c| NameAddr::parse(c).ok())
                    .map(|c| c.uri),
                route_set: req.headers.list("Record-Route"),
                cseq: 0,
                peer: from,
                answered: false,
                acked: false,
                cancelled: false,
                ended_by: None,
                incoming: Some(index),
            },
        );
        match self.spec.on_invite.clone() {
            Behaviour::Busy => self.respond(st, from, &req, 486, &to_tag, false),
            Behaviour::Reject(status) => self.respond(st, from, &req, status, &to_tag, false),
            Behaviour::Ring => self.respond(st, from, &req, 180, &to_tag, false),
            Behaviour::Answer { after }
            | Behaviour::AnswerThenHangUp { after, .. }
            | Behaviour::AnswerThenRefer { after, .. } => {
                self.respond(st, from, &req, 180, &to_tag, false);
                if after.is_zero() {
                    self.answer(st, &branch);
                } else {
                    let weak = Arc::downgrade(self);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        if let Some(me) = weak.upgrade() {
                            {
                                let mut st = me.state.lock();
                                me.answer(&mut st, &branch);
                            }
                            me.bump();
                        }
                    });
                }
            }
        }
    }

    /// Answers a ringing INVITE with 200 and SDP, unless it has been answered otherwise
    /// (cancelled); schedules the hang-up of `AnswerThenHangUp`.
    fn answer(self: &Arc<Self>, st: &mut State, branch: &str) {
        let Some(tx) = st.servers.get(&(branch.to_owned(), Method::Invite)) else {
            return;
        };
        if tx.final_sent {
            return;
        }
        let (req, source, tag) = (tx.request.clone(), tx.source, tx.to_tag.clone());
        self.respond(st, source, &req, 200, &tag, true);
        let call_id = req.base.call_id.clone();
        let at = self.started.elapsed();
        if let Some(d) = st.dialogs.get_mut(&call_id) {
            d.answered = true;
            if let Some(i) = d.incoming {
                if let Some(inc) = st.incoming.get_mut(i) {
                    inc.answered_at = Some(at);
                }
            }
        }
        if let Behaviour::AnswerThenHangUp { hold, .. } = self.spec.on_invite {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let Some(me) = weak.upgrade() else { return };
                // Only if the call is still up (the far end may have hung up first).
                if let Ok((bye, dest)) = me.in_dialog(&call_id, Method::Bye, Headers::new(), true) {
                    let _ = me.transact(bye, dest, TIMER_F).await;
                }
            });
        }
    }

    fn on_ack(self: &Arc<Self>, st: &mut State, req: &Request) {
        let Some(d) = st.dialogs.get_mut(&req.base.call_id) else {
            return;
        };
        // An ACK for a non-2xx answer (17.2.1) only ends that transaction.
        if d.role != Role::Callee || !d.answered || d.acked {
            return;
        }
        d.acked = true;
        let Behaviour::AnswerThenRefer { target, .. } = &self.spec.on_invite else {
            return;
        };
        let target = if target.contains(':') {
            target.clone()
        } else {
            format!("sip:{target}@{}", self.spec.domain)
        };
        let call_id = req.base.call_id.clone();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(me) = weak.upgrade() else { return };
            // RFC 3515 2.1: Refer-To names the target; RFC 3892: Referred-By names us.
            let mut h = Headers::new();
            h.push("Refer-To", format!("<{target}>"));
            h.push(
                "Referred-By",
                format!("<sip:{}@{}>", me.spec.user, me.spec.domain),
            );
            h.push("Contact", me.contact());
            if let Ok((refer, dest)) = me.in_dialog(&call_id, Method::Refer, h, false) {
                let _ = me.transact(refer, dest, TIMER_F).await;
            }
        });
    }

    /// RFC 3261 9.2: 200 to the CANCEL and 487 to the INVITE it matches, if that INVITE
    /// has had no final answer; 481 when it matches none.
    fn on_cancel(&self, st: &mut State, from: SocketAddr, req: &Request) {
        let key = (req.base.branch().to_owned(), Method::Invite);
        let Some(tx) = st.servers.get(&key) else {
            return self.respond(st, from, req, 481, "", false);
        };
        let pending = !tx.final_sent;
        let (invite, source, tag) = (tx.request.clone(), tx.source, tx.to_tag.clone());
        self.respond(st, from, req, 200, &tag, false);
        if pending {
            self.respond(st, source, &invite, 487, &tag, false);
            let at = self.started.elapsed();
            if let Some(d) = st.dialogs.get_mut(&invite.base.call_id) {
                d.ended_by = Some(Side::Remote);
                if let Some(i) = d.incoming {
                    if let Some(inc) = st.incoming.get_mut(i) {
                        inc.ended_by = Some(Side::Remote);
                        inc.ended_at = Some(at);
                    }
                }
            }
        }
    }
}
