//! The binding record and the storage interface the registrar writes through.
//!
//! The registrar keeps every binding in memory (lookups never touch the store); a store
//! is only the durability layer, written before a REGISTER is answered and read once at
//! start-up. A store that several nodes write (`shared`) also says which AORs the other
//! nodes changed (`watch`), so that every node's memory follows the common store.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// A boxed, sendable future: the trait's async methods return these so that the trait
/// stays object safe (`Arc<dyn BindingStore>`) without an extra macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One binding of an address of record to a contact address (RFC 3261 10.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// The canonical address of record, `sip:user@host`.
    pub aor: String,
    /// The Contact URI as text.
    pub contact: String,
    /// Preference, 0..=1 (RFC 3261 20.10); 1.0 when the Contact had no q.
    pub q: f32,
    /// When the binding lapses, unix seconds.
    pub expires_at: u64,
    /// Call-ID and CSeq of the REGISTER that last wrote the binding (RFC 3261 10.3 step 7
    /// orders updates by them).
    pub call_id: String,
    pub cseq: u32,
    /// The Path header values of the REGISTER, first one first (RFC 3327).
    pub path: Vec<String>,
    /// `+sip.instance` without its quotes (RFC 5626 4.1), e.g. `<urn:uuid:...>`.
    pub instance: Option<String>,
    /// `reg-id` (RFC 5626 4.2), kept only when the Contact has an instance.
    pub reg_id: Option<u32>,
    /// Where the REGISTER came from: `udp:1.2.3.4:5060`, `tcp:[::1]:5070`.
    pub source: String,
    /// The TCP connection the REGISTER arrived on (`ConnectionId.0`).
    pub connection: Option<u64>,
    pub user_agent: Option<String>,
    /// When the binding was last written, unix seconds.
    pub updated_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored binding is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("storage directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The store's worker thread is gone (it panicked or the store is shutting down).
    #[error("store worker stopped")]
    WorkerGone,
    /// A network step did not finish in time (the server hangs or packets are dropped).
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// A change another node made to a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// The bindings of this AOR changed: read them again.
    Changed(String),
    /// Notifications may have been lost (the subscription dropped and came back): read
    /// every binding again.
    Resync,
}

/// The receiving end of `BindingStore::watch`.
pub type StoreEvents = tokio::sync::mpsc::UnboundedReceiver<StoreEvent>;

/// Durable storage of bindings. Implementations must make `replace_aor` atomic: after a
/// crash either every binding of the AOR is the old set or every one is the new set
/// (RFC 3261 10.3 step 7: updates are committed all or nothing).
pub trait BindingStore: Send + Sync + 'static {
    /// Every stored binding, including ones that may have lapsed (the caller filters).
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Binding>, StoreError>>;

    /// The stored bindings of one AOR.
    fn load_aor<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>>;

    /// Replaces every binding of `aor` with `bindings` (empty: removes the AOR), atomically.
    fn replace_aor<'a>(
        &'a self,
        aor: &'a str,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes every binding with `expires_at <= now`; returns how many went.
    fn remove_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// True when other nodes write the same store (Redis): the registrar then re-reads an
    /// AOR from the store before changing it, so that it does not overwrite their bindings
    /// with its cached copy.
    fn shared(&self) -> bool {
        false
    }

    /// Starts following the writes of other nodes. Returns `None` when the store has no
    /// other writers (SQLite). Once the future is ready, every later change by another node
    /// is reported (the subscription is in place), so that a caller that reads the store
    /// afterwards misses nothing. The events stop when the receiver is dropped.
    fn watch(&self) -> BoxFuture<'_, Option<StoreEvents>> {
        Box::pin(async { None })
    }
}
