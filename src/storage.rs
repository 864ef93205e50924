//! Embedded storage shared by the stores of every layer (registrations, hunt-group agents,
//! presence): one SQLite file per kind of state under `storage.dir`, each owned by a
//! dedicated thread.
//!
//! SQLite calls block, so one thread owns the connection and the async side sends it
//! jobs; the runtime's workers never wait on disk. One thread is also what SQLite wants for
//! writes (a single writer at a time), and jobs run in the order they were queued, so
//! writes keep their order. WAL with synchronous=NORMAL survives kill -9 of the process (a
//! commit is in the WAL before it returns; only power loss can lose the last commits) and
//! makes a commit cost a write, not an fsync.
//!
//! Owns: the connections and their threads. Must not touch: what is stored (each store
//! owns its schema and rows).
//!
//! Config keys: `[storage]` `dir` and `[redis]` `url` ([`StorageConfig`], [`RedisConfig`]:
//! where every layer's store lives; `registrar.store` chooses between them).

use crate::config_section::InvalidValue;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// `[storage]`: the embedded store.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the embedded database files (created when missing).
    pub dir: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { dir: "data".into() }
    }
}

impl StorageConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        if self.dir.trim().is_empty() {
            return Err(InvalidValue::new("dir", "must not be empty"));
        }
        Ok(())
    }
}

/// `[redis]`: used when `registrar.store = "redis"`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
        }
    }
}

impl RedisConfig {
    /// The URL's form (checked even when Redis is not used, so a typo shows before the day
    /// `registrar.store` is switched).
    pub fn check(&self) -> Result<(), InvalidValue> {
        use redis::IntoConnectionInfo as _;
        match self.url.as_str().into_connection_info() {
            Ok(_) => Ok(()),
            Err(e) => Err(InvalidValue::new(
                "url",
                format!("{:?} is not a Redis URL ({e})", self.url),
            )),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

thread_local! {
    /// Set by [`hold_clock_while_storing`].
    static HOLD_CLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test mode (`strowger test`): store operations started on this thread are awaited in a
/// blocking task, which keeps a paused tokio clock from jumping ahead while SQLite works on
/// its thread (otherwise a REGISTER would seem to take seconds of virtual time).
pub fn hold_clock_while_storing() {
    HOLD_CLOCK.with(|c| c.set(true));
}

/// A SQLite connection on its own thread.
pub struct SqliteWorker {
    jobs: mpsc::Sender<Job>,
}

/// Why a store file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("storage directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// The worker thread is gone (it panicked, or the store is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerGone;

impl SqliteWorker {
    /// Opens (creating `dir` and the file when needed) `dir/file` with WAL, runs `schema`
    /// (idempotent DDL) and starts the thread `name`.
    pub fn open(
        dir: &Path,
        file: &str,
        schema: &str,
        name: &str,
    ) -> Result<SqliteWorker, OpenError> {
        let dir_error = |source| OpenError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_error)?;
        let conn = Connection::open(dir.join(file))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Another process (a second node on the same dir, the CLI) may hold the write lock
        // for a moment; wait instead of failing the request.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(schema)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut conn = conn;
                // Ends when the store (the only sender) is dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(dir_error)?;
        Ok(SqliteWorker { jobs: tx })
    }

    /// Queues `f` now (so writes keep their order) and returns its result's future.
    pub fn run<T, E>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> impl Future<Output = Result<T, E>> + Send + 'static
    where
        T: Send + 'static,
        E: From<WorkerGone> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let sent = self.jobs.send(Box::new(move |conn: &mut Connection| {
            let _ = tx.send(f(conn));
        }));
        let hold = HOLD_CLOCK.with(|c| c.get());
        async move {
            sent.map_err(|_| E::from(WorkerGone))?;
            if hold {
                // A running blocking task stops tokio's paused clock from auto-advancing.
                return tokio::task::spawn_blocking(move || rx.blocking_recv())
                    .await
                    .map_err(|_| E::from(WorkerGone))?
                    .map_err(|_| E::from(WorkerGone))?;
            }
            rx.await.map_err(|_| E::from(WorkerGone))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum E {
        Gone,
        Sql(#[allow(dead_code)] rusqlite::Error),
    }
    impl From<WorkerGone> for E {
        fn from(_: WorkerGone) -> E {
            E::Gone
        }
    }

    #[test]
    fn sections_check_their_values() {
        assert!(StorageConfig::default().check().is_ok());
        assert!(RedisConfig::default().check().is_ok());
        let dir = StorageConfig { dir: " ".into() };
        assert_eq!(dir.check().unwrap_err().key, "dir");
        let url = RedisConfig {
            url: "http://127.0.0.1/".into(),
        };
        assert_eq!(url.check().unwrap_err().key, "url");
    }

    #[tokio::test]
    async fn jobs_run_in_order_on_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let w = SqliteWorker::open(
            dir.path(),
            "t.sqlite",
            "CREATE TABLE IF NOT EXISTS t (v INTEGER);",
            "t",
        )
        .unwrap();
        for v in 0..3 {
            // Queued at once; not awaited: the read below comes after it.
            drop(w.run(move |c| c.execute("INSERT INTO t VALUES (?1)", [v]).map_err(E::Sql)));
        }
        let got: Vec<i64> = w
            .run(|c| {
                let mut s = c
                    .prepare("SELECT v FROM t ORDER BY rowid")
                    .map_err(E::Sql)?;
                let rows = s.query_map([], |r| r.get(0)).map_err(E::Sql)?;
                rows.collect::<Result<_, _>>().map_err(E::Sql)
            })
            .await
            .unwrap();
        assert_eq!(got, [0, 1, 2]);
        assert!(matches!(E::from(WorkerGone), E::Gone));
    }
}

// ---- Redis: the change feed between nodes ---------------------------------------------

/// A Redis subscribe that does not answer in this long counts as failed.
const SUBSCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Re-subscribing backs off from this...
const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// ...to at most this.
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// A subscription connection that carries nothing is pinged this often; a ping unanswered
/// within PING_TIMEOUT means the connection is dead (a half-open TCP connection would
/// otherwise keep a node deaf to the others for good).
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why subscribing to a change channel failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis subscribe timed out")]
    Timeout,
}

/// Follows the Redis channel on which the nodes sharing a store announce their writes as
/// `<origin> <note>`: every note of another node becomes `parse(note)` (None: ignored),
/// and whenever the subscription had to be made again (notes may have been lost
/// meanwhile) `resync()` is sent, so the receiver re-reads everything. Subscribes before
/// returning (the caller's first read of the store cannot miss a change); when Redis is
/// unreachable now, keeps trying with backoff. Ends when the receiver is dropped. `what`
/// names the store in logs.
pub async fn follow_changes<E: Send + 'static>(
    client: redis::Client,
    channel: String,
    origin: String,
    what: &'static str,
    parse: impl Fn(&str) -> Option<E> + Send + Sync + 'static,
    resync: impl Fn() -> E + Send + Sync + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<E> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let first = match subscribe(&client, &channel).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "{what}: redis subscription failed; retrying");
            None
        }
    };
    let feed = ChangeFeed {
        client,
        channel,
        origin,
        what,
        tx,
        parse: Box::new(parse),
        resync: Box::new(resync),
    };
    tokio::spawn(feed.run(first));
    rx
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<redis::aio::PubSub, SubscribeError> {
    let attempt = async {
        let mut p = client.get_async_pubsub().await?;
        p.subscribe(channel).await?;
        Ok::<_, SubscribeError>(p)
    };
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, attempt)
        .await
        .map_err(|_| SubscribeError::Timeout)?
}

/// Turns another node's note into an event.
type ParseNote<E> = Box<dyn Fn(&str) -> Option<E> + Send + Sync>;

struct ChangeFeed<E> {
    client: redis::Client,
    channel: String,
    origin: String,
    what: &'static str,
    tx: tokio::sync::mpsc::UnboundedSender<E>,
    parse: ParseNote<E>,
    resync: Box<dyn Fn() -> E + Send + Sync>,
}

/// Why `ChangeFeed::follow` returned.
enum Ended {
    /// The receiver is gone: stop.
    Receiver,
    /// The connection is gone: subscribe again.
    Connection,
}

impl<E: Send + 'static> ChangeFeed<E> {
    async fn run(self, first: Option<redis::aio::PubSub>) {
        let mut current = first;
        let mut backoff = BACKOFF_MIN;
        loop {
            let pubsub = match current.take() {
                Some(p) => p,
                None => {
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    match subscribe(&self.client, &self.channel).await {
                        Ok(p) => {
                            tracing::info!("{}: redis subscription restored", self.what);
                            backoff = BACKOFF_MIN;
                            // Published while we were away is lost: re-read everything.
                            if self.tx.send((self.resync)()).is_err() {
                                return;
                            }
                            p
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "{}: redis subscribe failed", self.what);
                            continue;
                        }
                    }
                }
            };
            match self.follow(pubsub).await {
                Ended::Receiver => return,
                Ended::Connection => {
                    tracing::warn!("{}: redis subscription lost; re-subscribing", self.what);
                }
            }
        }
    }

    /// Forwards notes until the connection or the receiver goes away.
    async fn follow(&self, pubsub: redis::aio::PubSub) -> Ended {
        use futures_core::Stream;
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate; we just subscribed
        loop {
            tokio::select! {
                _ = self.tx.closed() => return Ended::Receiver,
                msg = std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)) => {
                    let Some(msg) = msg else { return Ended::Connection };
                    if let Some(ev) = self.foreign(msg.get_payload_bytes()) {
                        if self.tx.send(ev).is_err() {
                            return Ended::Receiver;
                        }
                    }
                }
                _ = ping.tick() => {
                    // Messages that arrive meanwhile wait in the stream's queue.
                    let pong = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>());
                    if !matches!(pong.await, Ok(Ok(_))) {
                        return Ended::Connection;
                    }
                }
            }
        }
    }

    /// A note written by another node (`None` for our own writes and for anything that is
    /// not `<origin> <note>`: another program on the channel).
    fn foreign(&self, payload: &[u8]) -> Option<E> {
        let text = std::str::from_utf8(payload).ok()?;
        let (origin, note) = text.split_once(' ')?;
        if origin == self.origin || note.is_empty() {
            return None;
        }
        (self.parse)(note)
    }
}
