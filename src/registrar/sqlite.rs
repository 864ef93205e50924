//! The embedded store: one SQLite file, `<storage.dir>/registrations.sqlite`, on its own
//! thread (`crate::storage::SqliteWorker`: why, and what survives a kill -9).

use super::store::{Binding, BindingStore, BoxFuture, StoreError};
use crate::storage::{OpenError, SqliteWorker, WorkerGone};
use rusqlite::{params, Connection, OptionalExtension as _};
use std::path::Path;

/// Bindings in a local SQLite database file.
pub struct SqliteStore {
    worker: SqliteWorker,
}

impl From<WorkerGone> for StoreError {
    fn from(_: WorkerGone) -> StoreError {
        StoreError::WorkerGone
    }
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> StoreError {
        match e {
            OpenError::Dir { path, source } => StoreError::Dir { path, source },
            OpenError::Sqlite(e) => StoreError::Sqlite(e),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT NOT NULL,
    contact TEXT NOT NULL,
    q REAL NOT NULL,
    expires_at INTEGER NOT NULL,
    call_id TEXT NOT NULL,
    cseq INTEGER NOT NULL,
    path TEXT NOT NULL,
    instance TEXT,
    reg_id INTEGER,
    source TEXT NOT NULL,
    connection INTEGER,
    user_agent TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (aor, contact)
);
CREATE INDEX IF NOT EXISTS bindings_expires ON bindings (expires_at);
";

const COLUMNS: &str = "aor, contact, q, expires_at, call_id, cseq, path, instance, reg_id, \
                       source, connection, user_agent, updated_at";

impl SqliteStore {
    /// Opens (creating when needed) `dir/registrations.sqlite`, creating `dir` too.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let worker = SqliteWorker::open(dir, "registrations.sqlite", SCHEMA, "registrar-sqlite")?;
        Ok(SqliteStore { worker })
    }

    /// Runs `f` on the store thread and waits for its result without blocking the runtime.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        Box::pin(self.worker.run(f))
    }
}

fn row_to_binding(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Binding, String)> {
    let path: String = row.get(6)?;
    Ok((
        Binding {
            aor: row.get(0)?,
            contact: row.get(1)?,
            q: row.get::<_, f64>(2)? as f32,
            expires_at: row.get::<_, i64>(3)?.max(0) as u64,
            call_id: row.get(4)?,
            cseq: row.get::<_, i64>(5)?.clamp(0, u32::MAX as i64) as u32,
            path: Vec::new(),
            instance: row.get(7)?,
            reg_id: row
                .get::<_, Option<i64>>(8)?
                .and_then(|v| u32::try_from(v).ok()),
            source: row.get(9)?,
            connection: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
            user_agent: row.get(11)?,
            updated_at: row.get::<_, i64>(12)?.max(0) as u64,
        },
        path,
    ))
}

fn read_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Binding>, StoreError> {
    let rows = stmt.query_map(params, row_to_binding)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut b, path) = row?;
        // Path is a list; kept as a JSON array in one column.
        b.path = serde_json::from_str(&path)?;
        out.push(b);
    }
    Ok(out)
}

impl BindingStore for SqliteStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Binding>, StoreError>> {
        self.run(|conn| {
            let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM bindings"))?;
            read_rows(&mut stmt, [])
        })
    }

    fn load_aor<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>> {
        let aor = aor.to_owned();
        self.run(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM bindings WHERE aor = ?1"))?;
            read_rows(&mut stmt, [aor])
        })
    }

    fn replace_aor<'a>(
        &'a self,
        aor: &'a str,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let aor = aor.to_owned();
        let bindings = bindings.to_vec();
        self.run(move |conn| {
            // One transaction per REGISTER: the AOR's old rows and new rows change together
            // or not at all (RFC 3261 10.3 step 7).
            let tx = conn.transaction()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM bindings WHERE aor = ?1")?;
                del.execute([&aor])?;
                let mut ins = tx.prepare_cached(&format!(
                    "INSERT INTO bindings ({COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ))?;
                for b in &bindings {
                    let path = serde_json::to_string(&b.path)?;
                    ins.execute(params![
                        aor,
                        b.contact,
                        b.q as f64,
                        b.expires_at as i64,
                        b.call_id,
                        b.cseq as i64,
                        path,
                        b.instance,
                        b.reg_id.map(|v| v as i64),
                        b.source,
                        b.connection.map(|v| v as i64),
                        b.user_agent,
                        b.updated_at as i64,
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn remove_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached("DELETE FROM bindings WHERE expires_at <= ?1")?;
            let n = stmt.execute([now as i64])?;
            Ok(n as u64)
        })
    }
}

impl SqliteStore {
    /// How many rows the file holds (tests and the admin CLI).
    pub async fn stored_count(&self) -> Result<u64, StoreError> {
        self.run(|conn| {
            let n: Option<i64> = conn
                .query_row("SELECT COUNT(*) FROM bindings", [], |r| r.get(0))
                .optional()?;
            Ok(n.unwrap_or(0).max(0) as u64)
        })
        .await
    }
}
