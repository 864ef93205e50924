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

use rusqlite::Connection;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

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
        async move {
            sent.map_err(|_| E::from(WorkerGone))?;
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
