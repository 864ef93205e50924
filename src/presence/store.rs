//! Durable presence state: published documents (RFC 3903) and subscriptions (RFC 6665),
//! so that both survive a restart. Behind a small trait like the registrar's bindings;
//! the embedded implementation is one SQLite file, `<storage.dir>/presence.sqlite`.
//!
//! The notifier keeps everything in memory; the store is written before a PUBLISH or
//! SUBSCRIBE is answered and read once at start-up. Writes are queued to the store's own
//! thread in call order, so a later write of the same key always lands last.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum PresenceStoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored presence record is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("storage directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("presence store worker stopped")]
    WorkerGone,
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// A change another node made to a shared store (or told through it).
#[derive(Debug, Clone)]
pub enum PresenceEvent {
    /// This publication changed: read it again (gone: removed).
    Publication(String),
    /// This subscription changed: read it again.
    Subscription(String),
    /// Calls on another node changed (busy-lamp fields across nodes), in order.
    Calls(Vec<RemoteCall>),
    /// Notifications may have been lost: read everything again.
    Resync,
}

pub type PresenceEvents = tokio::sync::mpsc::UnboundedReceiver<PresenceEvent>;

/// A call change as it travels between nodes (`b2bua::watch::CallChange` in text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCall {
    pub id: String,
    pub phase: String,
    pub call_id: String,
    pub caller_tag: String,
    pub our_tag: String,
    pub caller: String,
    pub callee: String,
}

/// One publication of an event state compositor (RFC 3903 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPublication {
    /// The name it is stored under, kept from its first entity-tag on: a refresh or
    /// modification (which get new entity-tags) rewrites one record, so other nodes never
    /// see the old and the new document at once.
    #[serde(default)]
    pub id: String,
    /// The current entity-tag (SIP-ETag).
    pub etag: String,
    /// The presentity / account, canonical `sip:user@domain`.
    pub resource: String,
    /// Event package name ("presence", "message-summary").
    pub package: String,
    pub content_type: String,
    pub body: String,
    /// Unix seconds.
    pub expires_at: u64,
}

impl StoredPublication {
    /// The name it is stored under.
    pub fn key(&self) -> &str {
        if self.id.is_empty() {
            &self.etag
        } else {
            &self.id
        }
    }
}

/// One subscription as the notifier's dialog (RFC 6665 4.2, RFC 3261 12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// `<Call-ID>;<our tag>`.
    pub key: String,
    pub package: String,
    /// The Event header's `id` parameter, repeated in every NOTIFY (RFC 6665 8.2.1).
    pub event_id: Option<String>,
    pub resource: String,
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    pub local_uri: String,
    pub remote_uri: String,
    pub remote_target: String,
    pub route_set: Vec<String>,
    pub local_seq: u32,
    /// Where the subscriber is reached: `udp:1.2.3.4:5060` (the SUBSCRIBE's source, which
    /// also works behind NAT), and the TCP connection if any.
    pub flow: String,
    pub connection: Option<u64>,
    pub contact: String,
    pub expires_at: u64,
    /// The last RFC 4235 version sent.
    pub version: u32,
    /// The node that sends its NOTIFYs (`PresenceStore::node`); with a shared store the
    /// others keep it only to take it over when its subscriber refreshes through them.
    #[serde(default)]
    pub owner: String,
}

/// Storage of presence state. A write is queued when its method is called (in call
/// order); the returned future only reports the outcome, so a caller that does not need it
/// may drop the future and the write still happens.
pub trait PresenceStore: Send + Sync + 'static {
    /// Everything stored (the caller drops what has expired).
    #[allow(clippy::type_complexity)]
    fn load(
        &self,
    ) -> BoxFuture<'_, Result<(Vec<StoredPublication>, Vec<StoredSubscription>), PresenceStoreError>>;
    fn put_publication(
        &self,
        p: &StoredPublication,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>>;
    /// Removes the publication stored under `id` (`StoredPublication::key`).
    fn remove_publication(&self, id: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>>;
    /// Stores `s`, unless the stored record names another owner than `s` does: another
    /// node took the subscription over meanwhile (`take_subscription`), and its record
    /// stays. A write so dropped is not an error.
    fn put_subscription(
        &self,
        s: &StoredSubscription,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>>;
    /// Stores `s` whoever owned the record: this node serves the subscription from now on.
    fn take_subscription(
        &self,
        s: &StoredSubscription,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.put_subscription(s)
    }
    /// Removes the subscription, unless another node owns it and it has not expired.
    fn remove_subscription(&self, key: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>>;

    /// This node's name in subscription ownership.
    fn node(&self) -> &str {
        "local"
    }

    /// True when other nodes share the store (Redis).
    fn shared(&self) -> bool {
        false
    }

    /// One publication (for a change another node reported).
    fn load_publication<'a>(
        &'a self,
        _etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredPublication>, PresenceStoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// One subscription (for a change another node reported).
    fn load_subscription<'a>(
        &'a self,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredSubscription>, PresenceStoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Tells the other nodes about a call change of ours.
    fn announce_call(&self, _call: &RemoteCall) {}

    /// The other nodes' changes, from now on (None: no other nodes).
    fn watch(&self) -> BoxFuture<'_, Option<PresenceEvents>> {
        Box::pin(async { None })
    }
}

/// The embedded store: `presence.sqlite`, one table of JSON records, written by one thread
/// (SQLite calls block; the runtime's workers never wait on disk). WAL with
/// synchronous=NORMAL, like the registrar's file: survives kill -9.
pub struct SqlitePresenceStore {
    worker: crate::storage::SqliteWorker,
}

impl From<crate::storage::WorkerGone> for PresenceStoreError {
    fn from(_: crate::storage::WorkerGone) -> PresenceStoreError {
        PresenceStoreError::WorkerGone
    }
}

impl From<crate::storage::OpenError> for PresenceStoreError {
    fn from(e: crate::storage::OpenError) -> PresenceStoreError {
        match e {
            crate::storage::OpenError::Dir { path, source } => {
                PresenceStoreError::Dir { path, source }
            }
            crate::storage::OpenError::Sqlite(e) => PresenceStoreError::Sqlite(e),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS presence (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
";

impl SqlitePresenceStore {
    /// Opens (creating when needed) `dir/presence.sqlite`.
    pub fn open(dir: &Path) -> Result<SqlitePresenceStore, PresenceStoreError> {
        let worker =
            crate::storage::SqliteWorker::open(dir, "presence.sqlite", SCHEMA, "presence-sqlite")?;
        Ok(SqlitePresenceStore { worker })
    }

    /// Queues `f` now (so writes keep their order) and returns its result's future.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, PresenceStoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, PresenceStoreError>> {
        Box::pin(self.worker.run(f))
    }

    fn put(
        &self,
        kind: &'static str,
        key: String,
        expires_at: u64,
        data: Result<String, serde_json::Error>,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.run(move |conn| {
            let data = data?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO presence (kind, key, expires_at, data) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(rusqlite::params![kind, key, expires_at as i64, data])?;
            Ok(())
        })
    }

    fn remove(
        &self,
        kind: &'static str,
        key: &str,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let key = key.to_owned();
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM presence WHERE kind = ?1 AND key = ?2")?
                .execute(rusqlite::params![kind, key])?;
            Ok(())
        })
    }
}

impl PresenceStore for SqlitePresenceStore {
    fn load(
        &self,
    ) -> BoxFuture<'_, Result<(Vec<StoredPublication>, Vec<StoredSubscription>), PresenceStoreError>>
    {
        self.run(|conn| {
            let mut pubs = Vec::new();
            let mut subs = Vec::new();
            let mut stmt = conn.prepare("SELECT kind, data FROM presence")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (kind, data) = row?;
                match kind.as_str() {
                    "pub" => pubs.push(serde_json::from_str(&data)?),
                    "sub" => subs.push(serde_json::from_str(&data)?),
                    _ => {}
                }
            }
            Ok((pubs, subs))
        })
    }

    fn put_publication(
        &self,
        p: &StoredPublication,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.put(
            "pub",
            p.key().to_owned(),
            p.expires_at,
            serde_json::to_string(p),
        )
    }

    fn remove_publication(&self, id: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.remove("pub", id)
    }

    fn put_subscription(
        &self,
        s: &StoredSubscription,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.put("sub", s.key.clone(), s.expires_at, serde_json::to_string(s))
    }

    fn remove_subscription(&self, key: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.remove("sub", key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlitePresenceStore::open(dir.path()).unwrap();
        let mut p = StoredPublication {
            id: "e1".into(),
            etag: "e1".into(),
            resource: "sip:a@x".into(),
            package: "presence".into(),
            content_type: "application/pidf+xml".into(),
            body: "<presence/>".into(),
            expires_at: 10,
        };
        store.put_publication(&p).await.unwrap();
        p.body = "<presence>2</presence>".into();
        store.put_publication(&p).await.unwrap();
        let (pubs, subs) = store.load().await.unwrap();
        assert_eq!(pubs, vec![p.clone()]);
        assert!(subs.is_empty());
        store.remove_publication("e1").await.unwrap();
        drop(store);
        let again = SqlitePresenceStore::open(dir.path()).unwrap();
        assert!(again.load().await.unwrap().0.is_empty());
    }
}
