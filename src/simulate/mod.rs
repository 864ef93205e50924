//! Simulated SIP phones and trunks on a [`MemoryNetwork`]: what `strowger test` dials and
//! is dialled by. A device talks SIP over the memory network only, exactly as a real phone
//! would over UDP, so the dial plan under test runs in the real engine.
//!
//! Owns: the devices' user-agent behaviour (registering, placing, answering, refusing,
//! cancelling, hanging up and transferring calls) and their message logs. Must not touch:
//! the engine's internals; a device knows the server only as an address.
//!
//! Time is tokio's clock only (never the wall clock), so that on a paused runtime a 20 s
//! ring passes at once. The memory network never loses a datagram, so devices do not
//! retransmit (the server's transactions still do, RFC 3261 17: a device answers a
//! retransmitted request again with the same answer, 17.2.1 and 17.2.2).
//!
//! [`MemoryNetwork`]: crate::transport::MemoryNetwork

mod device;
mod log;

pub use device::{Call, Device};
pub use log::{ladder, Direction, LogEntry};

use std::net::SocketAddr;
use std::time::Duration;

/// What a device does with a new incoming INVITE. Every answering behaviour sends 180
/// Ringing first (RFC 3261 13.3.1.1), then the 200 with a fixed SDP offer/answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Rings, then answers `after` later.
    Answer { after: Duration },
    /// 486 Busy Here at once.
    Busy,
    /// Rings and never answers; a CANCEL gets 200 and the INVITE 487 (RFC 3261 9.2).
    Ring,
    /// This final status at once (e.g. 603 Decline, 503).
    Reject(u16),
    /// Answers `after` later, then hangs up (BYE) `hold` after answering.
    AnswerThenHangUp { after: Duration, hold: Duration },
    /// Answers `after` later and, once the ACK is in, transfers the caller with a REFER to
    /// `target` (a number, made `sip:<target>@<domain>`, or a full URI; RFC 3515).
    AnswerThenRefer { after: Duration, target: String },
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour::Answer {
            after: Duration::ZERO,
        }
    }
}

/// How to build a [`Device`]. `Default` is an unregistered phone `phone@strowger.test` on a
/// free port of 127.0.0.1 that answers at once and sends to 127.0.0.1:5060.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The device's name in logs and ladders (the user when empty).
    pub name: String,
    /// The user part of its address of record (`sip:<user>@<domain>`).
    pub user: String,
    pub domain: String,
    /// Its own address on the memory network (port 0: a free port).
    pub addr: SocketAddr,
    /// Where its out-of-dialog requests go (REGISTER, new INVITEs): the server, or another
    /// device when two talk directly.
    pub server: SocketAddr,
    /// REGISTER at start (Expires `expires`) and wait for the answer.
    pub register: bool,
    pub expires: u32,
    pub on_invite: Behaviour,
    /// A carrier rather than a phone: never registers, answers any number it is sent (the
    /// Request-URI's user is recorded in [`IncomingCall::number`]).
    pub trunk: bool,
    /// How long an outgoing INVITE waits for its final answer.
    pub patience: Duration,
}

impl Default for DeviceSpec {
    fn default() -> Self {
        DeviceSpec {
            name: String::new(),
            user: "phone".into(),
            domain: "strowger.test".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: SocketAddr::from(([127, 0, 0, 1], 5060)),
            register: false,
            expires: 3600,
            on_invite: Behaviour::default(),
            trunk: false,
            patience: Duration::from_secs(300),
        }
    }
}

impl DeviceSpec {
    /// A phone that registers as `user` with the server at `server`.
    pub fn phone(user: &str, server: SocketAddr) -> DeviceSpec {
        DeviceSpec {
            user: user.into(),
            server,
            register: true,
            ..DeviceSpec::default()
        }
    }

    /// A carrier named `name`: no registration, answers any number at once.
    pub fn trunk(name: &str, server: SocketAddr) -> DeviceSpec {
        DeviceSpec {
            user: name.into(),
            server,
            trunk: true,
            ..DeviceSpec::default()
        }
    }

    pub fn at(mut self, addr: SocketAddr) -> DeviceSpec {
        self.addr = addr;
        self
    }

    pub fn server(mut self, server: SocketAddr) -> DeviceSpec {
        self.server = server;
        self
    }

    pub fn named(mut self, name: &str) -> DeviceSpec {
        self.name = name.into();
        self
    }

    pub fn domain(mut self, domain: &str) -> DeviceSpec {
        self.domain = domain.into();
        self
    }

    pub fn register(mut self, register: bool) -> DeviceSpec {
        self.register = register;
        self
    }

    pub fn on_invite(mut self, behaviour: Behaviour) -> DeviceSpec {
        self.on_invite = behaviour;
        self
    }

    pub fn patience(mut self, patience: Duration) -> DeviceSpec {
        self.patience = patience;
        self
    }
}

/// Which end of a dialog ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This device (its BYE or CANCEL).
    Local,
    /// The other end (a BYE or CANCEL received).
    Remote,
}

/// The answer to a REGISTER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub status: u16,
    pub reason: String,
    /// The expiry the registrar granted (the Contact's `expires`, else Expires).
    pub expires: Option<u32>,
    /// When the answer came, since the device started.
    pub at: Duration,
}

/// An INVITE that started a call to this device, as it arrived, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingCall {
    pub call_id: String,
    /// The Request-URI.
    pub ruri: String,
    /// The Request-URI's user part (the number a trunk was sent).
    pub number: Option<String>,
    pub from: String,
    pub to: String,
    /// Every header as it arrived, in order (compact names expanded).
    pub headers: Vec<(String, String)>,
    /// When it arrived, since the device started.
    pub at: Duration,
    /// The final status this device gave (200 when it answered).
    pub final_status: Option<u16>,
    pub answered_at: Option<Duration>,
    pub ended_by: Option<Side>,
    pub ended_at: Option<Duration>,
}

impl IncomingCall {
    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = crate::sip::canonical_name(name);
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_str())
    }
}

/// What became of an outgoing call once its final answer came.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    pub status: u16,
    pub reason: String,
    /// The provisional statuses seen before the final one, in order (e.g. 100, 180).
    pub provisional: Vec<u16>,
    /// The final response's headers, in order.
    pub headers: Vec<(String, String)>,
    /// From sending the INVITE to the final answer, on the tokio clock.
    pub elapsed: Duration,
    /// The call: hang it up or wait for the far end's BYE.
    pub call: Call,
}

impl CallOutcome {
    pub fn answered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What can go wrong when driving a device.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("memory address {0} is in use")]
    AddrInUse(SocketAddr),
    #[error("bad URI {uri:?}: {source}")]
    BadUri {
        uri: String,
        source: crate::sip::UriError,
    },
    #[error("no final answer to {method} within {waited:?}")]
    Timeout { method: String, waited: Duration },
    #[error("registration refused: {status} {reason}")]
    NotRegistered { status: u16, reason: String },
    #[error("no call {0} on this device")]
    NoSuchCall(String),
    #[error("call {0} is not answered (or has ended): cancel it instead")]
    NotUp(String),
    #[error("call {0} was not placed by this device")]
    NotCaller(String),
    #[error("the device has stopped")]
    Stopped,
}

#[cfg(test)]
mod tests;
