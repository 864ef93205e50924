//! The non-INVITE client transaction (RFC 3261 17.1.2, figure 6).
//!
//! Owns: the state machine, pure (input -> state change + actions).
//! Must not touch: sockets, the clock, maps; the driver in `mod.rs` runs the actions.

use super::timers::Timer;
use super::{Action, Actions, ClientEvent, TimerConfig, What};
use crate::sip::{Method, Response};
use bytes::Bytes;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

pub(crate) struct NonInviteClient {
    state: State,
    cfg: TimerConfig,
    reliable: bool,
    method: Method,
    request_bytes: Bytes,
    /// Current Timer E interval.
    e_interval: Duration,
}

impl NonInviteClient {
    /// RFC 3261 17.1.2.2: send the request, start Timer E (unreliable only) and Timer F.
    pub(crate) fn start(
        cfg: TimerConfig,
        reliable: bool,
        method: Method,
        request_bytes: Bytes,
    ) -> (Self, Actions) {
        let mut actions = vec![Action::Send(
            request_bytes.clone(),
            What::Method(method.clone()),
        )];
        if !reliable {
            actions.push(Action::Start(Timer::E, cfg.first_retransmit()));
        }
        actions.push(Action::Start(Timer::F, cfg.timeout_64t1()));
        let m = NonInviteClient {
            state: State::Trying,
            cfg,
            reliable,
            method,
            request_bytes,
            e_interval: cfg.first_retransmit(),
        };
        (m, actions)
    }

    /// Takes the response: it moves into the event that reports it (no copy per response).
    pub(crate) fn on_response(&mut self, resp: Response) -> Actions {
        match (self.state, resp.status) {
            (State::Trying | State::Proceeding, 100..=199) => {
                self.state = State::Proceeding;
                vec![Action::report(ClientEvent::Provisional(resp))]
            }
            (State::Trying | State::Proceeding, 200..=699) => {
                // 17.1.2.2: Completed neither retransmits nor times out, so the request is
                // not needed any more (issue 14: memory of lingering transactions).
                self.request_bytes = Bytes::new();
                let mut actions = vec![
                    Action::report(ClientEvent::Final(resp)),
                    Action::Stop(Timer::E),
                    Action::Stop(Timer::F),
                ];
                let k = self.cfg.timer_k(self.reliable);
                if k.is_zero() {
                    self.state = State::Terminated;
                    actions.push(Action::Terminate);
                } else {
                    // Completed absorbs retransmitted responses until Timer K.
                    self.state = State::Completed;
                    actions.push(Action::Start(Timer::K, k));
                }
                actions
            }
            _ => Vec::new(),
        }
    }

    pub(crate) fn on_timer(&mut self, timer: Timer) -> Actions {
        match (self.state, timer) {
            (State::Trying | State::Proceeding, Timer::E) => {
                // RFC 3261 17.1.2.2: doubling up to T2 in Trying; T2 in Proceeding.
                self.e_interval = if self.state == State::Trying {
                    self.cfg.backoff_capped(self.e_interval)
                } else {
                    self.cfg.t2
                };
                vec![
                    Action::Send(
                        self.request_bytes.clone(),
                        What::Method(self.method.clone()),
                    ),
                    Action::Start(Timer::E, self.e_interval),
                ]
            }
            (State::Trying | State::Proceeding, Timer::F) => {
                self.state = State::Terminated;
                vec![Action::report(ClientEvent::Timeout), Action::Terminate]
            }
            (State::Completed, Timer::K) => {
                self.state = State::Terminated;
                vec![Action::Terminate]
            }
            _ => Vec::new(),
        }
    }

    /// RFC 3261 17.1.2.2: a transport failure ends the transaction and is reported.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn start(reliable: bool) -> NonInviteClient {
        NonInviteClient::start(
            TimerConfig::default(),
            reliable,
            Method::Options,
            Bytes::new(),
        )
        .0
    }

    fn e_interval(a: &Actions) -> Option<Duration> {
        a.iter().find_map(|x| match x {
            Action::Start(Timer::E, d) => Some(*d),
            _ => None,
        })
    }

    #[test]
    fn timer_e_doubles_to_t2_then_t2_in_proceeding() {
        let mut m = start(false);
        let got: Vec<_> = (0..4)
            .map(|_| e_interval(&m.on_timer(Timer::E)).unwrap())
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(got, vec![ms(1000), ms(2000), ms(4000), ms(4000)]);
        let mut m = start(false);
        let resp = super::super::test_util::response_to(&super::super::test_util::options(), 100);
        m.on_response(resp.clone());
        assert_eq!(m.state, State::Proceeding);
        assert_eq!(e_interval(&m.on_timer(Timer::E)), Some(ms(4000)));
    }

    #[test]
    fn completed_then_k() {
        let mut m = start(false);
        let resp = super::super::test_util::response_to(&super::super::test_util::options(), 200);
        let a = m.on_response(resp.clone());
        assert!(a.iter().any(|x| matches!(x, Action::Start(Timer::K, _))));
        assert!(
            a.iter().any(|x| matches!(x, Action::Stop(Timer::E))),
            "E stops"
        );
        assert!(
            a.iter().any(|x| matches!(x, Action::Stop(Timer::F))),
            "F stops"
        );
        assert!(
            m.on_response(resp.clone()).is_empty(),
            "retransmission absorbed"
        );
        assert!(m.on_timer(Timer::E).is_empty());
        assert!(matches!(m.on_timer(Timer::K)[0], Action::Terminate));
        let mut m = start(true);
        assert!(m
            .on_response(resp.clone())
            .iter()
            .any(|x| matches!(x, Action::Terminate)));
    }

    #[test]
    fn timer_f_times_out() {
        let mut m = start(false);
        let a = m.on_timer(Timer::F);
        assert!(matches!(&a[0], Action::Report(ev) if matches!(**ev, ClientEvent::Timeout)));
        assert_eq!(m.state, State::Terminated);
    }
}
