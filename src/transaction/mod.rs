//! API SKELETON (to be implemented): the RFC 3261 section 17 transaction layer with the
//! RFC 6026 fixes. The public items below are the contract the rest of the server is written
//! against; keep their names and signatures.

use crate::sip::{Request, Response, SipMessage};
use crate::transport::{Sender, Target};
use std::sync::Arc;
use std::time::Duration;

/// T1, T2, T4 (RFC 3261 17.1.1.1, table 4); every other timer derives from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    /// Timer B / F / H / J span: 64*T1.
    pub fn timeout_64t1(&self) -> Duration {
        self.t1 * 64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("transaction already has a final response")]
    AlreadyFinal,
    #[error("transaction is gone")]
    Gone,
    #[error("a transaction with this branch already exists")]
    Duplicate,
    #[error("request has no Via branch")]
    NoBranch,
}

/// What a client transaction reports to its user.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A 1xx (never 100 for INVITE? -> 100 is reported too; the user may ignore it).
    Provisional(Response),
    /// A final response. For INVITE 2xx the transaction enters Accepted (RFC 6026) and every
    /// further 2xx retransmission is reported again as `Final`.
    Final(Response),
    /// Timer B or F fired (RFC 3261 17.1.1.2, 17.1.2.2).
    Timeout,
    /// The transport could not send (RFC 3261 17.1.1.2: reported like a 503).
    TransportError(String),
}

/// The layer above: the UAS core. Called from transport/timer tasks; must not block.
pub trait TransactionUser: Send + Sync + 'static {
    /// A new request that created a server transaction (any method but ACK and CANCEL).
    fn on_request(&self, tx: ServerTransaction, req: Request);
    /// An ACK that matched no server transaction: the ACK for a 2xx (RFC 3261 17.2.3, 13.3.1.4),
    /// including ACKs that arrive while the INVITE transaction is in RFC 6026 Accepted.
    fn on_ack(&self, ack: Request, source: Target);
    /// A CANCEL that matched a pending INVITE server transaction (RFC 3261 9.2). The layer has
    /// already answered the CANCEL with 200; the user should end the INVITE with 487.
    fn on_cancel(&self, invite: ServerTransaction, cancel: Request);
    /// A response that matched no client transaction (e.g. a 2xx retransmission after the
    /// INVITE client transaction ended).
    fn on_stray_response(&self, resp: Response, source: Target);
}

/// Handle to a server transaction; cheap to clone.
#[derive(Clone)]
pub struct ServerTransaction {
    _private: Arc<()>,
}

impl ServerTransaction {
    /// Sends a response through the transaction (drives its state machine).
    pub fn respond(&self, resp: Response) -> Result<(), TransactionError> {
        let _ = resp;
        todo!()
    }
    /// Where responses go (RFC 3261 18.2.2), as computed when the request arrived.
    pub fn source(&self) -> Target {
        todo!()
    }
    /// True once a final response was sent.
    pub fn is_finished(&self) -> bool {
        todo!()
    }
    /// The request that created the transaction.
    pub fn request(&self) -> &Request {
        todo!()
    }
}

/// A client transaction; events arrive through `next_event`.
pub struct ClientTransaction {
    _private: (),
}

impl ClientTransaction {
    /// The next event, or None when the transaction has terminated and will report no more.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        todo!()
    }
    /// The branch of the request's top Via.
    pub fn branch(&self) -> &str {
        todo!()
    }
}

/// The transaction layer; a cheap handle.
#[derive(Clone)]
pub struct TransactionLayer {
    _private: Arc<()>,
}

impl TransactionLayer {
    /// Must be called inside a tokio runtime.
    pub fn new(sender: Arc<dyn Sender>, timers: TimerConfig, tu: Arc<dyn TransactionUser>) -> Self {
        let _ = (sender, timers, tu);
        todo!()
    }
    /// Everything the transports read (requests already carry received/rport; for requests
    /// `source` is where responses go, RFC 3261 18.2.2).
    pub fn on_message(&self, msg: SipMessage, source: Target) {
        let _ = (msg, source);
        todo!()
    }
    /// Starts a client transaction; the request must carry its top Via with a fresh branch.
    pub fn send_request(
        &self,
        req: Request,
        target: Target,
    ) -> Result<ClientTransaction, TransactionError> {
        let _ = (req, target);
        todo!()
    }
    /// Sends a message outside any transaction (the ACK for a 2xx, a 2xx retransmission).
    pub fn send_stateless(
        &self,
        msg: &SipMessage,
        target: &Target,
    ) -> Result<(), TransactionError> {
        let _ = (msg, target);
        todo!()
    }
    /// Transactions alive now (server + client).
    pub fn len(&self) -> usize {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// From now on, new dialog-creating requests (no To tag) get 503; in-dialog requests and
    /// everything in flight go on (graceful shutdown).
    pub fn stop_accepting(&self) {
        todo!()
    }
    pub fn timers(&self) -> TimerConfig {
        todo!()
    }
}
