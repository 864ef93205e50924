//! The INVITE client transaction (RFC 3261 17.1.1, figure 5, as changed by RFC 6026
//! figure 5: the Accepted state) and the ACK for non-2xx finals (17.1.1.3).
//!
//! Owns: the state machine, pure (input -> state change + actions).
//! Must not touch: sockets, the clock, maps; the driver in `mod.rs` runs the actions.

use super::timers::{backoff, Timer};
use super::{Action, Actions, ClientEvent, TimerConfig, What};
use crate::sip::{CSeq, Headers, Method, Request, Response};
use bytes::Bytes;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Calling,
    Proceeding,
    Completed,
    Accepted,
    Terminated,
}

pub(crate) struct InviteClient {
    state: State,
    cfg: TimerConfig,
    reliable: bool,
    /// The INVITE as sent: retransmitted by Timer A, and read back to build the ACK of a
    /// non-2xx final (rare: a parse then costs less than keeping the parsed request, ~2 KB,
    /// for the whole ringing time and 32 s after; issue 14). Emptied once a final came.
    request_bytes: Bytes,
    /// Current Timer A interval.
    a_interval: Duration,
    /// The ACK sent for the non-2xx final, sent again for its retransmissions.
    ack: Option<Bytes>,
}

impl InviteClient {
    /// RFC 3261 17.1.1.2: send the INVITE, start Timer A (unreliable only) and Timer B.
    pub(crate) fn start(cfg: TimerConfig, reliable: bool, request: &Request) -> (Self, Actions) {
        let request_bytes = request.to_bytes();
        let mut actions = vec![Action::Send(
            request_bytes.clone(),
            What::Method(Method::Invite),
        )];
        if !reliable {
            actions.push(Action::Start(Timer::A, cfg.first_retransmit()));
        }
        actions.push(Action::Start(Timer::B, cfg.timeout_64t1()));
        let m = InviteClient {
            state: State::Calling,
            cfg,
            reliable,
            request_bytes,
            a_interval: cfg.first_retransmit(),
            ack: None,
        };
        (m, actions)
    }

    /// Takes the response: it moves into the event that reports it (no copy per response).
    pub(crate) fn on_response(&mut self, resp: Response) -> Actions {
        let status = resp.status;
        match (self.state, status) {
            (State::Calling | State::Proceeding, 100..=199) => {
                let was_calling = self.state == State::Calling;
                self.state = State::Proceeding;
                let mut actions = vec![Action::report(ClientEvent::Provisional(resp))];
                if was_calling {
                    // 17.1.1.2: no retransmissions in Proceeding, and Timer B only times
                    // out the Calling state.
                    actions.extend([Action::Stop(Timer::A), Action::Stop(Timer::B)]);
                }
                actions
            }
            // RFC 6026 7.2: a 2xx moves to Accepted; Timer M absorbs the window in which
            // further 2xx (from other forks or retransmissions) arrive, each passed up.
            (State::Calling | State::Proceeding, 200..=299) => {
                self.state = State::Accepted;
                self.request_bytes = Bytes::new();
                vec![
                    Action::report(ClientEvent::Final(resp)),
                    Action::Stop(Timer::A),
                    Action::Stop(Timer::B),
                    Action::Start(Timer::M, self.cfg.timer_lm()),
                ]
            }
            (State::Accepted, 200..=299) => vec![Action::report(ClientEvent::Final(resp))],
            // RFC 3261 17.1.1.2: 300-699 -> ACK, report, Completed with Timer D.
            (State::Calling | State::Proceeding, 300..=699) => {
                let request = std::mem::take(&mut self.request_bytes);
                let mut actions = Vec::with_capacity(5);
                match crate::sip::parse(&request) {
                    Ok((crate::sip::SipMessage::Request(invite), _)) => {
                        let ack = build_ack(&invite, &resp).to_bytes();
                        self.ack = Some(ack.clone());
                        actions.push(Action::Send(ack, What::Method(Method::Ack)));
                    }
                    // We wrote it; should it not read back (a bug), the final still counts.
                    _ => tracing::error!("an INVITE we sent does not parse; no ACK for its final"),
                }
                actions.extend([
                    Action::report(ClientEvent::Final(resp)),
                    Action::Stop(Timer::A),
                    Action::Stop(Timer::B),
                ]);
                let d = self.cfg.timer_d(self.reliable);
                if d.is_zero() {
                    self.state = State::Terminated;
                    actions.push(Action::Terminate);
                } else {
                    self.state = State::Completed;
                    actions.push(Action::Start(Timer::D, d));
                }
                actions
            }
            // Retransmitted final: ACK again, do not report (17.1.1.2).
            (State::Completed, 300..=699) => match &self.ack {
                Some(ack) => vec![Action::Send(ack.clone(), What::Method(Method::Ack))],
                None => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    pub(crate) fn on_timer(&mut self, timer: Timer) -> Actions {
        match (self.state, timer) {
            (State::Calling, Timer::A) => {
                self.a_interval = backoff(self.a_interval);
                vec![
                    Action::Send(self.request_bytes.clone(), What::Method(Method::Invite)),
                    Action::Start(Timer::A, self.a_interval),
                ]
            }
            (State::Calling, Timer::B) => {
                self.state = State::Terminated;
                vec![Action::report(ClientEvent::Timeout), Action::Terminate]
            }
            (State::Completed, Timer::D) | (State::Accepted, Timer::M) => {
                self.state = State::Terminated;
                vec![Action::Terminate]
            }
            _ => Vec::new(),
        }
    }

    /// RFC 3261 17.1.1.2 (and RFC 6026 figure 5): a transport failure ends the transaction
    /// and is reported.
    pub(crate) fn on_transport_error(&mut self, err: String) -> Actions {
        if self.state == State::Terminated {
            return Vec::new();
        }
        self.state = State::Terminated;
        vec![
            Action::report(ClientEvent::TransportError(err)),
            Action::Terminate,
        ]
    }
}

/// The ACK for a non-2xx final (RFC 3261 17.1.1.3): the INVITE's Request-URI, Call-ID,
/// From, CSeq number and top Via; To from the response; the INVITE's Route headers.
pub(crate) fn build_ack(invite: &Request, resp: &Response) -> Request {
    let mut headers = Headers::new();
    for route in invite.headers.get_all("Route") {
        headers.push("Route", route);
    }
    let mut base = invite.base.clone();
    base.via.truncate(1);
    base.to = resp.base.to.clone();
    base.cseq = CSeq {
        seq: invite.base.cseq.seq,
        method: Method::Ack,
    };
    Request {
        method: Method::Ack,
        uri: invite.uri.clone(),
        version: invite.version.clone(),
        base,
        max_forwards: Some(invite.max_forwards.unwrap_or(70)),
        headers,
        body: Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{invite, response_to};
    use super::*;

    fn kinds(a: &Actions) -> Vec<String> {
        a.iter()
            .map(|x| format!("{x:?}").chars().take(12).collect())
            .collect()
    }

    #[test]
    fn calling_to_completed_builds_ack() {
        let req = invite();
        let (mut m, a) = InviteClient::start(TimerConfig::default(), false, &req);
        assert_eq!(a.len(), 3);
        assert_eq!(m.state, State::Calling);
        let a = m.on_response(response_to(&req, 180));
        assert!(matches!(&a[0], Action::Report(ev) if matches!(**ev, ClientEvent::Provisional(_))));
        assert_eq!(m.state, State::Proceeding);
        // Timers A and B stop once Proceeding (nothing wakes up for them), and do nothing
        // should they fire.
        assert!(a.iter().any(|x| matches!(x, Action::Stop(Timer::A))));
        assert!(a.iter().any(|x| matches!(x, Action::Stop(Timer::B))));
        assert!(m.on_timer(Timer::A).is_empty());
        let again = m.on_response(response_to(&req, 183));
        assert!(
            !again.iter().any(|x| matches!(x, Action::Stop(_))),
            "stopped once"
        );
        let a = m.on_response(response_to(&req, 486));
        assert_eq!(m.state, State::Completed, "{:?}", kinds(&a));
        let Action::Send(ack, _) = &a[0] else {
            panic!()
        };
        let (msg, _) = crate::sip::parse(ack).unwrap();
        let crate::sip::SipMessage::Request(ack) = msg else {
            panic!()
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.base.cseq.method, Method::Ack);
        assert_eq!(ack.base.via.len(), 1);
        assert_eq!(ack.base.to.tag(), Some("totag"));
        assert_eq!(ack.headers.get("Route"), Some("<sip:proxy.example;lr>"));
        assert!(ack.headers.get("Contact").is_none());
        assert!(matches!(m.on_timer(Timer::D)[0], Action::Terminate));
    }

    #[test]
    fn reliable_completed_terminates_at_once() {
        let req = invite();
        let (mut m, a) = InviteClient::start(TimerConfig::default(), true, &req);
        assert!(!a.iter().any(|x| matches!(x, Action::Start(Timer::A, _))));
        let a = m.on_response(response_to(&req, 500));
        assert!(matches!(a.last(), Some(Action::Terminate)));
    }

    #[test]
    fn accepted_reports_every_2xx() {
        let req = invite();
        let (mut m, _) = InviteClient::start(TimerConfig::default(), false, &req);
        let a = m.on_response(response_to(&req, 200));
        assert_eq!(m.state, State::Accepted);
        assert!(matches!(&a[0], Action::Report(ev) if matches!(**ev, ClientEvent::Final(_))));
        let a = m.on_response(response_to(&req, 200));
        assert!(matches!(&a[0], Action::Report(ev) if matches!(**ev, ClientEvent::Final(_))));
        assert!(m.on_response(response_to(&req, 180)).is_empty());
        assert!(matches!(m.on_timer(Timer::M)[0], Action::Terminate));
        assert_eq!(m.state, State::Terminated);
    }
}
