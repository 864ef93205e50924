//! Where agent state lives across restarts: the same choice as registrations
//! (`registrar.store`). The embedded default is `<storage.dir>/huntgroups.sqlite` (its own
//! file, so the registrar's schema is untouched); with Redis every node reads and writes
//! one hash, `<prefix>:agents` (default prefix `strowger:hunt`), field = agent, value = the
//! record as JSON.
//!
//! Only what must survive is stored: the agent's administrative state (available, paused,
//! logged out), its answered-call count with the reset period it belongs to, and when its
//! last call ended. Ringing, in-call and wrap-up are facts of running calls and are not.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The administrative state an agent is put in (by login, logout, pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    /// Logged in and not paused: rung when otherwise free.
    #[default]
    Available,
    Paused,
    LoggedOut,
}

impl Presence {
    pub fn name(self) -> &'static str {
        match self {
            Presence::Available => "available",
            Presence::Paused => "paused",
            Presence::LoggedOut => "logged-out",
        }
    }
}

/// One agent's durable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent: String,
    pub presence: Presence,
    /// Answered calls in reset period `period`.
    pub answered: u64,
    pub period: u64,
    /// Unix seconds when the agent's last call ended (0 = never).
    pub last_end: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentStoreError {
    #[error("hunt-group store (sqlite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("hunt-group store (redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("hunt-group store: stored agent is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("hunt-group store directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hunt-group store: worker gone")]
    WorkerGone,
}

/// The storage interface: read everything at start (and, for a shared store, now and
/// then), write one agent when it changes.
pub trait AgentStore: Send + Sync + 'static {
    fn load(&self) -> BoxFuture<'_, Result<Vec<AgentRecord>, AgentStoreError>>;
    fn save(&self, record: AgentRecord) -> BoxFuture<'_, Result<(), AgentStoreError>>;
    /// One agent's record (a cluster reads it afresh before changing it).
    fn load_one<'a>(
        &'a self,
        agent: &'a str,
    ) -> BoxFuture<'a, Result<Option<AgentRecord>, AgentStoreError>> {
        Box::pin(async move { Ok(self.load().await?.into_iter().find(|r| r.agent == agent)) })
    }
    /// Whether other nodes write the same store (then it is re-read periodically).
    fn shared(&self) -> bool {
        false
    }
}

/// `<dir>/huntgroups.sqlite`. SQLite calls block, so they run on the blocking pool under
/// a mutex (one writer, as SQLite wants); the mutex is never held across an `.await`.
pub struct SqliteAgentStore {
    worker: crate::storage::SqliteWorker,
}

impl From<crate::storage::WorkerGone> for AgentStoreError {
    fn from(_: crate::storage::WorkerGone) -> AgentStoreError {
        AgentStoreError::WorkerGone
    }
}

impl From<crate::storage::OpenError> for AgentStoreError {
    fn from(e: crate::storage::OpenError) -> AgentStoreError {
        match e {
            crate::storage::OpenError::Dir { path, source } => {
                AgentStoreError::Dir { path, source }
            }
            crate::storage::OpenError::Sqlite(e) => AgentStoreError::Sqlite(e),
        }
    }
}

impl SqliteAgentStore {
    pub fn open(dir: &Path) -> Result<SqliteAgentStore, AgentStoreError> {
        let worker = crate::storage::SqliteWorker::open(
            dir,
            "huntgroups.sqlite",
            "CREATE TABLE IF NOT EXISTS agents (
                agent TEXT PRIMARY KEY,
                record TEXT NOT NULL
            );",
            "huntgroup-sqlite",
        )?;
        Ok(SqliteAgentStore { worker })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, AgentStoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, AgentStoreError>> {
        Box::pin(self.worker.run(f))
    }
}

impl AgentStore for SqliteAgentStore {
    fn load(&self) -> BoxFuture<'_, Result<Vec<AgentRecord>, AgentStoreError>> {
        self.run(|conn| {
            let mut stmt = conn.prepare("SELECT record FROM agents ORDER BY agent")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
    }

    fn save(&self, record: AgentRecord) -> BoxFuture<'_, Result<(), AgentStoreError>> {
        self.run(move |conn| {
            let json = serde_json::to_string(&record)?;
            conn.execute(
                "INSERT INTO agents (agent, record) VALUES (?1, ?2)
                 ON CONFLICT(agent) DO UPDATE SET record = excluded.record",
                rusqlite::params![record.agent, json],
            )?;
            Ok(())
        })
    }
}

/// One Redis hash shared by every node.
pub struct RedisAgentStore {
    con: redis::aio::ConnectionManager,
    key: String,
}

impl RedisAgentStore {
    /// Connects with the default key prefix `strowger:hunt`.
    pub async fn connect(url: &str) -> Result<RedisAgentStore, AgentStoreError> {
        RedisAgentStore::connect_with_prefix(url, "strowger:hunt").await
    }

    pub async fn connect_with_prefix(
        url: &str,
        prefix: &str,
    ) -> Result<RedisAgentStore, AgentStoreError> {
        let client = redis::Client::open(url)?;
        let con = client.get_connection_manager().await?;
        Ok(RedisAgentStore {
            con,
            key: format!("{prefix}:agents"),
        })
    }
}

impl AgentStore for RedisAgentStore {
    fn load(&self) -> BoxFuture<'_, Result<Vec<AgentRecord>, AgentStoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let values: Vec<String> = redis::cmd("HVALS")
                .arg(&self.key)
                .query_async(&mut con)
                .await?;
            let mut out: Vec<AgentRecord> = values
                .iter()
                .map(|v| serde_json::from_str(v))
                .collect::<Result<_, _>>()?;
            out.sort_by(|a, b| a.agent.cmp(&b.agent));
            Ok(out)
        })
    }

    fn save(&self, record: AgentRecord) -> BoxFuture<'_, Result<(), AgentStoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let json = serde_json::to_string(&record)?;
            let _: i64 = redis::cmd("HSET")
                .arg(&self.key)
                .arg(&record.agent)
                .arg(json)
                .query_async(&mut con)
                .await?;
            Ok(())
        })
    }

    fn load_one<'a>(
        &'a self,
        agent: &'a str,
    ) -> BoxFuture<'a, Result<Option<AgentRecord>, AgentStoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let value: Option<String> = redis::cmd("HGET")
                .arg(&self.key)
                .arg(agent)
                .query_async(&mut con)
                .await?;
            Ok(value.map(|v| serde_json::from_str(&v)).transpose()?)
        })
    }

    fn shared(&self) -> bool {
        true
    }
}
