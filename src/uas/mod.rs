//! The UAS core (RFC 3261 8.2): the transaction user of the transaction layer. It validates
//! every new request, answers what the server answers itself (OPTIONS, REGISTER's steps
//! 1-3), hands calls to the B2BUA and MESSAGE/PUBLISH/SUBSCRIBE to presence, and sends
//! in-dialog requests, ACKs and stray 2xx to their dialog's usage with one lookup in the
//! dialog table; what nobody handles gets 481 (unknown dialog) or 501.
//!
//! Owns: the decision of which part of the server a request belongs to, and the REGISTER
//! result counters (`strowger_register_results_total{result}`). Must not touch:
//! transaction state (it only uses `ServerTransaction`), call state (the B2BUA's), the
//! dialog table's entries (the usages register and remove their own).
//!
//! Layer: above the transaction users it dispatches to (B2BUA, presence, registrar, the
//! script's `on_register`), beside `server`, which builds it; nothing below imports it.

mod config;
mod options;
mod validate;

pub use config::SipConfig;
pub use options::options_ok;
pub use validate::{validate, ACCEPTED_SDP_TYPES, SUPPORTED_OPTIONS};

use crate::auth::{AuthOutcome, ChallengeKind, DigestAuth, UserSecrets, Users};
use crate::b2bua::{B2bua, CallRef};
use crate::dialog::{DialogTable, Usage};
use crate::presence::SubscriptionUsage;
use crate::registrar::{RegisterSource, Registrar, RegistrarSection};
use crate::script::{RegisterInfo, RegisterVerdict, ScriptEngine};
use crate::sip::{new_tag, Method, Request, Response};
use crate::transaction::{ServerTransaction, TransactionUser};
use crate::transport::LocalAddrs;
use crate::transport::{Target, TransportKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;

/// The message layer's invariants ([`crate::sip::check_invariants`]) plus: validating a
/// parsed request never panics. For the fuzz target and the mutation test.
#[doc(hidden)]
pub fn check_invariants(data: &[u8]) {
    crate::sip::check_invariants(data);
    if let Ok((crate::sip::SipMessage::Request(req), _)) = crate::sip::parse(data) {
        let _ = validate(&req);
    }
}

/// Final answers to REGISTER as the label of `strowger_register_results_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterResult {
    Ok,
    Challenged,
    Forbidden,
    NotFound,
    IntervalTooBrief,
    BadRequest,
    ServerError,
    Other,
}
crate::label!(
    RegisterResult,
    "result",
    Ok = "ok",
    Challenged = "challenged",
    Forbidden = "forbidden",
    NotFound = "not_found",
    IntervalTooBrief = "interval_too_brief",
    BadRequest = "bad_request",
    ServerError = "server_error",
    Other = "other",
);

impl RegisterResult {
    fn of(status: u16) -> RegisterResult {
        match status {
            200..=299 => RegisterResult::Ok,
            401 | 407 => RegisterResult::Challenged,
            403 => RegisterResult::Forbidden,
            404 => RegisterResult::NotFound,
            423 => RegisterResult::IntervalTooBrief,
            400 => RegisterResult::BadRequest,
            500..=599 => RegisterResult::ServerError,
            _ => RegisterResult::Other,
        }
    }
}

/// The count of each [`RegisterResult`].
type RegisterResults = [std::sync::atomic::AtomicU64; 8];

/// The server's dialog table: calls' legs (INVITE usages) and presence's subscriptions.
pub type Dialogs = DialogTable<Usage<CallRef, SubscriptionUsage>>;

/// The UAS core; installed as the transaction layer's user.
pub struct UasCore {
    /// Every dialog of the server: in-dialog requests, ACKs and stray 2xx go by it.
    dialogs: Arc<Dialogs>,
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
    /// Final answers to REGISTER, indexed like [`RegisterResult`].
    register_results: Arc<RegisterResults>,
}

impl UasCore {
    pub fn new(
        sip: &SipConfig,
        registrar: &RegistrarSection,
        local: &[(TransportKind, SocketAddr)],
        digest: DigestAuth,
        users: Option<Arc<Users>>,
        scripts: ScriptEngine,
        dialogs: Arc<Dialogs>,
    ) -> UasCore {
        UasCore {
            dialogs,
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

    /// Registers `strowger_register_results_total{result}` on `telemetry`, filled at each
    /// scrape.
    pub fn register_metrics(
        &self,
        telemetry: &crate::metrics::Telemetry,
    ) -> Result<(), crate::metrics::Error> {
        use crate::metrics::Label as _;
        let family = telemetry.counters::<RegisterResult>(
            "strowger_register_results_total",
            "Final answers to REGISTER by result",
        )?;
        let results = self.register_results.clone();
        telemetry.on_scrape(move || {
            for r in RegisterResult::ALL {
                family.catch_up(*r, crate::metrics::load(&results[r.index()]));
            }
        });
        Ok(())
    }

    pub fn set_registrar(&self, registrar: Registrar) {
        let _ = self.registrar.set(registrar);
    }

    /// REGISTER (RFC 3261 10.3): steps 1-3 here, the rest in the registrar.
    fn on_register(&self, tx: ServerTransaction, req: Request) {
        let results = self.register_results.clone();
        // Every final answer to a REGISTER is counted by result.
        let respond = move |tx: &ServerTransaction, resp: Response| {
            results[RegisterResult::of(resp.status) as usize]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Challenges and refusals of credentials are answered statelessly (RFC 3261
            // 8.2.7): half of every registration, and all of a flood of wrong passwords,
            // leaves no transaction lingering for 32 s (issue 15).
            let sent = if matches!(resp.status, 401 | 403) {
                tx.respond_and_end(resp)
            } else {
                tx.respond(resp)
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "could not send response");
            }
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
                scripts
                    .on_register(&RegisterInfo {
                        user: user.clone(),
                        aor: aor.clone(),
                        source: crate::transport::peer_text(src.transport, &src.addr),
                        user_agent: req.headers.get("User-Agent").map(str::to_owned),
                        contact: req.headers.get("Contact").map(str::to_owned),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                            .collect(),
                    })
                    .await
            } else {
                RegisterVerdict::Default
            };
            let from_users = matches!(verdict, RegisterVerdict::Default);
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
                // the bindings of its own address of record. Credentials of another known
                // user are checked as theirs: right ones get 403 (authorization, not a
                // guess: nothing counts toward the source's lockout), wrong ones a challenge.
                let outcome = digest.verify(&req, ChallengeKind::Www, src.addr.ip(), |u| {
                    if u == user {
                        return Some(secrets.clone());
                    }
                    from_users
                        .then(|| users.as_ref().and_then(|all| all.get(u).cloned()))
                        .flatten()
                });
                if let AuthOutcome::Ok { user: authed } = &outcome {
                    if *authed != user {
                        tracing::info!(%aor, user = %authed, source = %src.addr, "REGISTER refused: credentials of another user");
                        respond(
                            &tx,
                            req.response(403)
                                .with_reason("Credentials do not match the address of record"),
                        );
                        return;
                    }
                }
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
                connection: src.connection.map(crate::transport::ConnectionId::get),
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
            // One lookup in the dialog table: a call's leg or one of presence's
            // subscriptions.
            if let Err(unmatched) = self.dialogs.on_request(tx, req) {
                let (tx, req) = *unmatched;
                // A dialog nobody here registered: presence may hold it for another node
                // of a shared store (it answers 481 itself when not); else RFC 3261
                // 12.2.2's 481.
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
        self.dialogs.on_ack(ack);
    }

    fn on_cancel(&self, invite: ServerTransaction, cancel: Request) {
        // RFC 3261 9.2: the call ends the INVITE with 487 itself; an INVITE that is not a
        // call (yet) is ended here.
        let taken = self.b2bua.get().is_some_and(|b| b.on_cancel(&cancel));
        if !taken && !invite.is_finished() {
            if let Some(resp) = invite.response(487) {
                Self::respond(&invite, resp);
            }
        }
    }

    fn on_stray_response(&self, resp: Response, _source: Target) {
        self.dialogs.on_stray_response(resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: the shared dialog table costs a call no memory over the B2BUA's own index
    /// (the usage tag fits in a niche of the call's entry).
    #[test]
    fn a_dialog_table_entry_is_no_larger_than_a_calls_entry() {
        assert_eq!(
            std::mem::size_of::<Usage<CallRef, SubscriptionUsage>>(),
            std::mem::size_of::<CallRef>()
        );
    }
}
