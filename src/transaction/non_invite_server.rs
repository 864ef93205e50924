//! The non-INVITE server transaction (RFC 3261 17.2.2, figure 8).
//!
//! Owns: the state machine, pure (input -> state change + actions).
//! Must not touch: sockets, the clock, maps; the driver in `mod.rs` runs the actions.

use super::timers::Timer;
use super::{Action, Actions, TimerConfig, TransactionError, What};
use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

pub(crate) struct NonInviteServer {
    state: State,
    cfg: TimerConfig,
    reliable: bool,
    last: Option<(Bytes, u16)>,
}

impl NonInviteServer {
    pub(crate) fn new(cfg: TimerConfig, reliable: bool) -> Self {
        NonInviteServer {
            state: State::Trying,
            cfg,
            reliable,
            last: None,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.state, State::Completed | State::Terminated)
    }

    pub(crate) fn on_tu_response(
        &mut self,
        status: u16,
        bytes: Bytes,
    ) -> Result<Actions, TransactionError> {
        match self.state {
            State::Trying | State::Proceeding => {
                let mut actions = vec![Action::Send(bytes.clone(), What::Status(status))];
                self.last = Some((bytes, status));
                if status < 200 {
                    self.state = State::Proceeding;
                } else {
                    // RFC 3261 17.2.2: Completed absorbs retransmissions until Timer J.
                    let j = self.cfg.timer_j(self.reliable);
                    if j.is_zero() {
                        self.state = State::Terminated;
                        actions.push(Action::Terminate);
                    } else {
                        self.state = State::Completed;
                        actions.push(Action::Start(Timer::J, j));
                    }
                }
                Ok(actions)
            }
            State::Completed => Err(TransactionError::AlreadyFinal),
            State::Terminated => Err(TransactionError::Gone),
        }
    }

    /// A retransmission of the request: absorbed in Trying, answered with the last
    /// response in Proceeding and Completed (RFC 3261 17.2.2).
    pub(crate) fn on_retransmission(&mut self) -> Actions {
        match (self.state, &self.last) {
            (State::Proceeding | State::Completed, Some((b, s))) => {
                vec![Action::Send(b.clone(), What::Status(*s))]
            }
            _ => Vec::new(),
        }
    }

    pub(crate) fn on_timer(&mut self, timer: Timer) -> Actions {
        match (self.state, timer) {
            (State::Completed, Timer::J) => {
                self.state = State::Terminated;
                vec![Action::Terminate]
            }
            _ => Vec::new(),
        }
    }

    /// RFC 3261 17.2.4: a failure to send ends the transaction.
    pub(crate) fn on_transport_error(&mut self) -> Actions {
        if self.state == State::Terminated {
            return Vec::new();
        }
        self.state = State::Terminated;
        vec![Action::Terminate]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trying_proceeding_completed() {
        let mut m = NonInviteServer::new(TimerConfig::default(), false);
        assert!(m.on_retransmission().is_empty(), "Trying absorbs");
        m.on_tu_response(180, Bytes::from_static(b"1")).unwrap();
        assert_eq!(m.state, State::Proceeding);
        assert_eq!(m.on_retransmission().len(), 1);
        let a = m.on_tu_response(200, Bytes::from_static(b"2")).unwrap();
        assert!(matches!(a[1], Action::Start(Timer::J, d) if d.as_secs() == 32));
        assert!(m.is_finished());
        let Action::Send(b, _) = &m.on_retransmission()[0] else {
            panic!()
        };
        assert_eq!(&b[..], b"2");
        assert!(m.on_tu_response(500, Bytes::new()).is_err());
        assert!(matches!(m.on_timer(Timer::J)[0], Action::Terminate));
        let mut m = NonInviteServer::new(TimerConfig::default(), true);
        let a = m.on_tu_response(200, Bytes::new()).unwrap();
        assert!(matches!(a[1], Action::Terminate), "Timer J is 0 over TCP");
    }
}
