//! The UAS core (RFC 3261 8.2): the transaction user of the transaction layer. It validates
//! every new request, answers what the server answers itself (OPTIONS), and hands calls to
//! the B2BUA and MESSAGE/PUBLISH/SUBSCRIBE (and in-dialog requests no call owns) to
//! presence; what nobody handles gets 481 (unknown dialog) or 501.
//!
//! Owns: the decision of which part of the server a request belongs to. Must not touch:
//! transaction state (it only uses `ServerTransaction`) or call state (the B2BUA's).

mod config;
mod options;
mod validate;

pub use config::SipConfig;
pub use options::options_ok;
pub use validate::{validate, ACCEPTED_SDP_TYPES, SUPPORTED_OPTIONS};

use crate::auth::{AuthOutcome, ChallengeKind, DigestAuth, UserSecrets, Users};
use crate::b2bua::{B2bua, LocalAddrs};
use crate::registrar::{RegisterSource, Registrar, RegistrarSection};
use crate::script::{RegisterInfo, RegisterVerdict, ScriptEngine};
use crate::sip::{new_tag, Method, Request, Response};
use crate::transaction::{ServerTransaction, TransactionUser};
use crate::transport::{Target, TransportKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;

/// REGISTER results as metric labels (`strowger_register_results_total{result}`).
pub const REGISTER_RESULTS: [&str; 8] = [
    "ok",
    "challenged",
    "forbidden",
    "not_found",
    "interval_too_brief",
    "bad_request",
    "server_error",
    "other",
];

fn register_result(status: u16) -> usize {
    match status {
        200..=299 => 0,
        401 | 407 => 1,
        403 => 2,
        404 => 3,
        423 => 4,
        400 => 5,
        500..=599 => 6,
        _ => 7,
    }
}

/// The UAS core; installed as the transaction layer's user.
pub struct UasCore {
    user_agent: String,
    /// The server's bound addresses, for the Contact of its own answers.
    local: LocalAddrs,
    /// Set once the B2BUA exists (it needs the transaction layer, which needs us).
    b2bua: OnceLock<B2bua>,
    registrar: OnceLock<Registrar>,
    /// presence: MESSAGE, PUBLISH, SUBSCRIBE and our subscriptions' in-dialog requests.
    presence: OnceLock<crate::presence::Presence>,
    /// Digest authentication of REGISTER: with the users of `registrar.users_file`, or
    /// credentials that `on_register` gives. Neither: every REGISTER is accepted
    /// (development).
    digest: DigestAuth,
    users: Option<Arc<Users>>,
    scripts: ScriptEngine,
    realm: String,
    /// `sip.domain`: the domain whose addresses of record we register.
    domain: String,
    /// `registrar.unknown_aor_status`.
    unknown_aor_status: u16,
    /// Final answers to REGISTER, indexed like [`REGISTER_RESULTS`].
    register_results: Arc<[std::sync::atomic::AtomicU64; REGISTER_RESULTS.len()]>,
}

impl UasCore {
    pub fn new(
        sip: &SipConfig,
        registrar: &RegistrarSection,
        local: &[(TransportKind, SocketAddr)],
        digest: DigestAuth,
        users: Option<Arc<Users>>,
        scripts: ScriptEngine,
    ) -> UasCore {
        UasCore {
            digest,
            users,
            scripts,
            realm: sip.domain.clone(),
            user_agent: sip.user_agent.clone(),
            local: LocalAddrs::new(local.to_vec()),
            b2bua: OnceLock::new(),
            registrar: OnceLock::new(),
            presence: OnceLock::new(),
            domain: sip.domain.to_ascii_lowercase(),
            unknown_aor_status: registrar.unknown_aor_status,
            register_results: Arc::new(Default::default()),
        }
    }

    /// Final answers to REGISTER so far, indexed like [`REGISTER_RESULTS`].
    pub fn register_results(&self) -> [u64; REGISTER_RESULTS.len()] {
        std::array::from_fn(|i| self.register_results[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set_registrar(&self, registrar: Registrar) {
        let _ = self.registrar.set(registrar);
    }

    /// REGISTER (RFC 3261 10.3): steps 1-3 here, the rest in the registrar.
    fn on_register(&self, tx: ServerTransaction, req: Request) {
        let results = self.register_results.clone();
        // Every final answer to a REGISTER is counted by result.
        let respond = move |tx: &ServerTransaction, resp: Response| {
            results[register_result(resp.status)]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self::respond(tx, resp);
        };
        let Some(registrar) = self.registrar.get().cloned() else {
            respond(&tx, req.response(503));
            return;
        };
        // Step 3: the To header names the address of record, in a domain we serve. A To
        // that is no SIP or SIPS URI (RFC 4475 3.3.4: `isbn:...`) has no domain to name in
        // the phrase; it is refused the same way (step 5: not valid for this registrar).
        let aor_uri = &req.base.to.uri;
        if !aor_uri.scheme.is_sip() {
            let status = self.unknown_aor_status;
            Self::respond(
                &tx,
                req.response(status)
                    .with_reason("Address of record is not a SIP or SIPS URI"),
            );
            return;
        }
        if !self.local.serves(&aor_uri.host, &self.domain) {
            let status = self.unknown_aor_status;
            Self::respond(
                &tx,
                req.response(status)
                    .with_reason(format!("{} Not Served Here", aor_uri.host)),
            );
            return;
        }
        let src = tx.source();
        let user = req.base.to.uri.user.clone().unwrap_or_default();
        // One address of record per user of the domain, whether the phone wrote the
        // domain or the server's IP in its To (registrar.lookup canonicalizes the same way).
        let aor = self.local.canonical_aor(&req.base.to.uri, &self.domain);
        let scripts = self.scripts.current();
        let digest = self.digest.clone();
        let users = self.users.clone();
        let realm = self.realm.clone();
        // Off the transport's task: the script hook and the store write take their time.
        tokio::spawn(async move {
            // The script's say comes first (RFC 3261 10.3 leaves authorization to local
            // policy): it may refuse, or name the credentials to check. Its view of the
            // request is only built when it has the hook.
            let verdict = if scripts.has_on_register() {
                scripts.on_register(&RegisterInfo {
                    user: user.clone(),
                    aor: aor.clone(),
                    source: format!("{}:{}", src.transport, src.addr),
                    user_agent: req.headers.get("User-Agent").map(str::to_owned),
                    contact: req.headers.get("Contact").map(str::to_owned),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                        .collect(),
                })
            } else {
                RegisterVerdict::Default
            };
            let secrets: Option<UserSecrets> = match verdict {
                RegisterVerdict::Reject(code, reason) => {
                    respond(&tx, req.response(code).with_reason(reason));
                    return;
                }
                RegisterVerdict::Failed(_) => {
                    respond(&tx, req.response(500).with_reason("Script Error"));
                    return;
                }
                RegisterVerdict::Credentials {
                    password,
                    ha1_md5,
                    ha1_sha256,
                } => Some(match password {
                    Some(pw) => UserSecrets::from_password(&user, &realm, &pw),
                    None => UserSecrets {
                        ha1_md5: ha1_md5.map(|h| h.to_ascii_lowercase()),
                        ha1_sha256: ha1_sha256.map(|h| h.to_ascii_lowercase()),
                    },
                }),
                RegisterVerdict::Default => users.as_ref().map(|u| {
                    u.get(&user).cloned().unwrap_or(UserSecrets {
                        ha1_md5: None,
                        ha1_sha256: None,
                    })
                }),
            };
            if let Some(secrets) = secrets {
                // RFC 3261 10.3 steps 2 and 4: authenticate, then the user may only change
                // the bindings of its own address of record.
                let outcome = digest.verify(&req, ChallengeKind::Www, src.addr.ip(), |u| {
                    (u == user).then(|| secrets.clone())
                });
                if !matches!(outcome, AuthOutcome::Ok { .. }) {
                    let resp = digest
                        .respond(&req, ChallengeKind::Www, &outcome)
                        .unwrap_or_else(|| req.response(403));
                    respond(&tx, resp);
                    return;
                }
            }
            let source = RegisterSource {
                transport: src.transport,
                addr: src.addr,
                connection: src.connection.map(|c| c.0),
            };
            // The store write is awaited before the 200 (a binding that is answered is kept).
            let resp = registrar.register(&req, source, &aor).await;
            respond(&tx, resp);
        });
    }

    /// presence: set once the presence core exists.
    pub fn set_presence(&self, presence: crate::presence::Presence) {
        let _ = self.presence.set(presence);
    }

    pub fn set_b2bua(&self, b2bua: B2bua) {
        let _ = self.b2bua.set(b2bua);
    }

    /// Contact URI of the server on the transport the request came on.
    fn respond(tx: &ServerTransaction, resp: Response) {
        if let Err(e) = tx.respond(resp) {
            tracing::debug!(error = %e, "could not send response");
        }
    }
}

impl TransactionUser for UasCore {
    fn on_request(&self, tx: ServerTransaction, req: Request) {
        if let Err(resp) = validate(&req) {
            Self::respond(&tx, *resp);
            return;
        }
        let in_dialog = req.base.to.tag().is_some();
        if in_dialog {
            // RFC 3261 12.2.2: a request for a dialog we do not know gets 481.
            let rejected = match self.b2bua.get() {
                Some(b) => b.on_in_dialog(tx, req).err().map(|b| *b),
                None => Some((tx, req)),
            };
            if let Some((tx, req)) = rejected {
                // presence: not a call's dialog; maybe one of our subscriptions (it
                // answers 481 itself when not).
                match self.presence.get() {
                    Some(p) => p.on_in_dialog(tx, req),
                    None => Self::respond(&tx, req.response(481)),
                }
            }
            return;
        }
        match req.method {
            Method::Options => {
                // RFC 3261 11.2: answered as if it were an INVITE we would accept.
                let contact = self.local.contact_uri(&tx.source());
                Self::respond(
                    &tx,
                    options_ok(&req, &contact, &self.user_agent, &new_tag()),
                );
            }
            Method::Register => self.on_register(tx, req),
            Method::Refer => {
                // RFC 3515: a REFER outside a dialog. A transfer is done inside the call
                // it moves; one here has no call to act on.
                let resp = match crate::b2bua::refer_to(&req) {
                    Err(why) => req.response(400).with_reason(why),
                    Ok((uri, _)) if !uri.scheme.is_sip() => req
                        .response(488)
                        .with_reason(format!("Cannot refer to {uri}")),
                    Ok(_) => req
                        .response(403)
                        .with_reason("REFER outside a dialog is not accepted"),
                };
                Self::respond(&tx, resp);
            }
            Method::Invite => match self.b2bua.get() {
                Some(b) => b.on_invite(tx, req),
                None => Self::respond(&tx, req.response(503)),
            },
            // Methods that only exist inside a dialog (RFC 3261 15, RFC 3262, RFC 3311,
            // RFC 6086, RFC 6665 NOTIFY) arriving without a To tag match no dialog.
            Method::Bye | Method::Prack | Method::Update | Method::Info | Method::Notify => {
                Self::respond(&tx, req.response(481));
            }
            // presence: RFC 3428, RFC 3903, RFC 6665.
            Method::Message | Method::Publish | Method::Subscribe
                if self.presence.get().is_some() =>
            {
                if let Some(p) = self.presence.get() {
                    p.on_request(tx, req);
                }
            }
            ref m => {
                // Issue-tracked: out-of-dialog REFER is not built yet; say so plainly.
                let reason = format!("{m} is not handled yet");
                Self::respond(&tx, req.response(501).with_reason(reason));
            }
        }
    }

    fn on_ack(&self, ack: Request, _source: Target) {
        if let Some(b) = self.b2bua.get() {
            b.on_ack(ack);
        }
    }

    fn on_cancel(&self, invite: ServerTransaction, cancel: Request) {
        // RFC 3261 9.2: the call ends the INVITE with 487 itself; an INVITE that is not a
        // call (yet) is ended here.
        let taken = self.b2bua.get().is_some_and(|b| b.on_cancel(&cancel));
        if !taken && !invite.is_finished() {
            let resp = invite.request().response(487);
            Self::respond(&invite, resp);
        }
    }

    fn on_stray_response(&self, resp: Response, _source: Target) {
        if let Some(b) = self.b2bua.get() {
            b.on_stray_response(resp);
        }
    }
}
