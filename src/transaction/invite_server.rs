//! The INVITE server transaction (RFC 3261 17.2.1, figure 7, as changed by RFC 6026
//! figure 7: the Accepted state after a 2xx).
//!
//! Owns: the state machine, pure (input -> state change + actions).
//! Must not touch: sockets, the clock, maps; the driver in `mod.rs` runs the actions.

use super::timers::Timer;
use super::{Action, Actions, ClientEvent, TimerConfig, TransactionError, What};
use bytes::Bytes;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
    Terminated,
}

pub(crate) struct InviteServer {
    state: State,
    cfg: TimerConfig,
    reliable: bool,
    /// The last response sent, for retransmitted INVITEs and Timer G.
    last: Option<(Bytes, u16)>,
    /// Current Timer G interval.
    g_interval: Duration,
}

impl InviteServer {
    /// A new transaction in Proceeding; the driver then sends 100 Trying through
    /// `on_tu_response` (RFC 3261 17.2.1).
    pub(crate) fn new(cfg: TimerConfig, reliable: bool) -> Self {
        InviteServer {
            state: State::Proceeding,
            cfg,
            reliable,
            last: None,
            g_interval: cfg.first_retransmit(),
        }
    }

    /// True once a final response was sent.
    pub(crate) fn is_finished(&self) -> bool {
        self.state != State::Proceeding
    }

    /// The last provisional sent while no final has gone (at least the 100 Trying).
    pub(crate) fn last_provisional(&self) -> Option<&Bytes> {
        match (self.state, &self.last) {
            (State::Proceeding, Some((bytes, _))) => Some(bytes),
            _ => None,
        }
    }

    /// A response from the TU.
    pub(crate) fn on_tu_response(
        &mut self,
        status: u16,
        bytes: Bytes,
    ) -> Result<Actions, TransactionError> {
        let send = Action::Send(bytes.clone(), What::Status(status));
        match (self.state, status) {
            (State::Proceeding, 100..=199) => {
                self.last = Some((bytes, status));
                Ok(vec![send])
            }
            // RFC 6026 8.5: 2xx -> Accepted with Timer L; the TU retransmits the 2xx.
            (State::Proceeding, 200..=299) => {
                self.state = State::Accepted;
                // Accepted answers nothing itself (8.6): the 2xx need not be kept for the
                // 32 s of Timer L (issue 14).
                self.last = None;
                Ok(vec![send, Action::Start(Timer::L, self.cfg.timer_lm())])
            }
            // RFC 6026 8.7: the TU's 2xx retransmissions go out through Accepted.
            (State::Accepted, 200..=299) => Ok(vec![send]),
            // RFC 3261 17.2.1: 300-699 -> Completed, Timer G (unreliable) and Timer H.
            (State::Proceeding, 300..=699) => {
                self.state = State::Completed;
                self.last = Some((bytes, status));
                let mut actions = vec![send];
                if !self.reliable {
                    self.g_interval = self.cfg.first_retransmit();
                    actions.push(Action::Start(Timer::G, self.g_interval));
                }
                actions.push(Action::Start(Timer::H, self.cfg.timeout_64t1()));
                Ok(actions)
            }
            (State::Terminated, _) => Err(TransactionError::Gone),
            _ => Err(TransactionError::AlreadyFinal),
        }
    }

    /// A retransmission of the INVITE.
    pub(crate) fn on_retransmission(&mut self) -> Actions {
        match (self.state, &self.last) {
            // RFC 3261 17.2.1: Proceeding and Completed answer with the last response.
            (State::Proceeding | State::Completed, Some((b, s))) => {
                vec![Action::Send(b.clone(), What::Status(*s))]
            }
            // RFC 6026 8.6: Accepted absorbs them (the TU retransmits the 2xx itself).
            _ => Vec::new(),
        }
    }

    /// An ACK matching the transaction.
    pub(crate) fn on_ack(&mut self) -> Actions {
        match self.state {
            State::Completed => {
                let i = self.cfg.timer_i(self.reliable);
                if i.is_zero() {
                    self.state = State::Terminated;
                    vec![Action::Terminate]
                } else {
                    // RFC 3261 17.2.1: Confirmed absorbs ACK retransmissions until Timer I,
                    // and sends nothing more.
                    self.state = State::Confirmed;
                    self.last = None;
                    // 17.2.1: Confirmed no longer retransmits (G) nor waits for the ACK (H).
                    vec![
                        Action::Stop(Timer::G),
                        Action::Stop(Timer::H),
                        Action::Start(Timer::I, i),
                    ]
                }
            }
            // RFC 6026 8.7: an ACK in Accepted goes to the TU (it is the 2xx's ACK).
            State::Accepted => vec![Action::PassAck],
            _ => Vec::new(),
        }
    }

    pub(crate) fn on_timer(&mut self, timer: Timer) -> Actions {
        match (self.state, timer) {
            (State::Completed, Timer::G) => {
                self.g_interval = self.cfg.backoff_capped(self.g_interval);
                let mut actions = Vec::with_capacity(2);
                if let Some((b, s)) = &self.last {
                    actions.push(Action::Send(b.clone(), What::Status(*s)));
                }
                actions.push(Action::Start(Timer::G, self.g_interval));
                actions
            }
            // Timer H: no ACK came (RFC 3261 17.2.1): a transaction failure, reported so the
            // driver counts and logs it.
            (State::Completed, Timer::H) => {
                self.state = State::Terminated;
                vec![Action::report(ClientEvent::Timeout), Action::Terminate]
            }
            (State::Confirmed, Timer::I) | (State::Accepted, Timer::L) => {
                self.state = State::Terminated;
                vec![Action::Terminate]
            }
            _ => Vec::new(),
        }
    }

    /// RFC 3261 17.2.4 / RFC 6026 8.8: a failure to send ends the transaction, except in
    /// Accepted where the TU keeps retransmitting its 2xx until Timer L.
    pub(crate) fn on_transport_error(&mut self) -> Actions {
        match self.state {
            State::Terminated | State::Accepted => Vec::new(),
            _ => {
                self.state = State::Terminated;
                vec![Action::Terminate]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(a: &Actions, t: Timer) -> Option<Duration> {
        a.iter().find_map(|x| match x {
            Action::Start(k, d) if *k == t => Some(*d),
            _ => None,
        })
    }

    #[test]
    fn completed_confirmed_terminated() {
        let mut m = InviteServer::new(TimerConfig::default(), false);
        assert!(m.on_retransmission().is_empty(), "nothing sent yet");
        m.on_tu_response(100, Bytes::from_static(b"100")).unwrap();
        assert_eq!(m.on_retransmission().len(), 1);
        let a = m.on_tu_response(486, Bytes::from_static(b"486")).unwrap();
        assert_eq!(m.state, State::Completed);
        assert_eq!(starts(&a, Timer::G), Some(Duration::from_millis(500)));
        assert_eq!(starts(&a, Timer::H), Some(Duration::from_secs(32)));
        assert!(matches!(
            m.on_tu_response(200, Bytes::new()),
            Err(TransactionError::AlreadyFinal)
        ));
        let ms = |n| Duration::from_millis(n);
        let g: Vec<_> = (0..5)
            .map(|_| starts(&m.on_timer(Timer::G), Timer::G).unwrap())
            .collect();
        assert_eq!(g, vec![ms(1000), ms(2000), ms(4000), ms(4000), ms(4000)]);
        let a = m.on_ack();
        assert_eq!(m.state, State::Confirmed);
        assert_eq!(starts(&a, Timer::I), Some(Duration::from_secs(5)));
        assert!(m.on_timer(Timer::G).is_empty(), "G stops in Confirmed");
        assert!(m.on_ack().is_empty(), "ACK retransmission absorbed");
        assert!(m.on_retransmission().is_empty());
        assert!(matches!(m.on_timer(Timer::I)[0], Action::Terminate));
    }

    #[test]
    fn timer_h_and_reliable_ack() {
        let mut m = InviteServer::new(TimerConfig::default(), true);
        let a = m.on_tu_response(404, Bytes::new()).unwrap();
        assert_eq!(starts(&a, Timer::G), None, "no Timer G over TCP");
        assert!(
            matches!(m.on_ack()[0], Action::Terminate),
            "Timer I is 0 over TCP"
        );
        let mut m = InviteServer::new(TimerConfig::default(), false);
        m.on_tu_response(404, Bytes::new()).unwrap();
        assert!(matches!(m.on_timer(Timer::H)[1], Action::Terminate));
        assert_eq!(m.state, State::Terminated);
    }

    #[test]
    fn accepted() {
        let mut m = InviteServer::new(TimerConfig::default(), false);
        let a = m.on_tu_response(200, Bytes::new()).unwrap();
        assert_eq!(m.state, State::Accepted);
        assert_eq!(starts(&a, Timer::L), Some(Duration::from_secs(32)));
        assert!(m.on_retransmission().is_empty(), "absorbed, not answered");
        assert!(matches!(m.on_ack()[0], Action::PassAck));
        assert!(matches!(
            m.on_tu_response(200, Bytes::new()).unwrap()[0],
            Action::Send(..)
        ));
        assert!(m.on_tu_response(486, Bytes::new()).is_err());
        assert!(m.on_transport_error().is_empty());
        assert!(matches!(m.on_timer(Timer::L)[0], Action::Terminate));
    }
}
