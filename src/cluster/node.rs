//! This node in the cluster: its lease, the watch over the other nodes, and the writer of
//! its call records. The Redis side of `membership.rs`'s decisions.
//!
//! Three tasks, ended when the last [`Cluster`] handle is dropped (which is what a crash
//! looks like to the others) or by [`Cluster::stop`] (a graceful leave):
//! - the lease: `SET <prefix>:node:<name> <value> PX <lease> GET` every third of the
//!   lease (every second while renewals fail); a nil answer means the lease had lapsed
//!   (Redis unreachable for a lease, say), and the name goes back into the node set;
//! - the watch: every `scan_interval`, `SMEMBERS <prefix>:nodes`, then `MGET` of their
//!   lease keys and `HLEN` of our own records in one pipeline; a member without its lease
//!   key is dead, and its calls are claimed by one Lua script (see [`TAKE_SCRIPT`]) and
//!   handed to the [`TakeoverHandler`], unless this node itself lost Redis less than two
//!   leases ago (see `Gate`);
//! - the writer: [`CallRecords::put`]/[`CallRecords::remove`] only queue on a bounded
//!   channel (a full queue drops the change and counts it: a call never waits on Redis);
//!   one task writes what is queued as one HSET and one HDEL in one pipeline, and keeps
//!   what failed to try again every second (newer changes win).

use super::membership::{judge, renewal_interval, Batch, Gate, RecordOp, Writes};
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The keys' prefix unless told otherwise.
pub const DEFAULT_PREFIX: &str = "strowger:cluster";
/// How often the other nodes' leases are looked at.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// A Redis operation that takes longer than this has failed (the task tries again at its
/// next round rather than hang).
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Record changes queued between a call and the writer; beyond, changes are dropped and
/// counted.
const QUEUE: usize = 4096;
/// Changes the writer keeps while Redis fails; beyond, new ones are dropped and counted.
const MAX_PENDING: usize = 65_536;
/// How long the writer gathers changes before it writes them.
const WRITE_WINDOW: Duration = Duration::from_millis(50);
/// Most changes in one pipeline.
const MAX_BATCH: usize = 1024;
/// The writer's pause after a failed write, and the lease's while renewals fail.
const RETRY: Duration = Duration::from_secs(1);
/// The longest pause between two attempts to reconnect to Redis.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Claims a dead node's calls, atomically. KEYS: 1 its lease, 2 the takeover lock, 3 its
/// call records, 4 the node set. ARGV: 1 our name, 2 the lock's PX in ms, 3 the dead
/// node's name. Nil when the node has a lease again (it restarted) or another survivor
/// holds the lock; otherwise the records (field, value, ...), which are deleted with the
/// node's set entry in the same step, so exactly one survivor ends each call.
const TAKE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
local recs = redis.call('HGETALL', KEYS[3])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[3])
return recs
"#;

/// Our own records from before a restart, claimed like a dead node's. KEYS: 1 our call
/// records.
const OWN_SCRIPT: &str = r#"
local recs = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return recs
"#;

/// A graceful leave. KEYS: 1 our lease, 2 our call records, 3 the node set. ARGV: 1 our
/// name, 2 our lease value. The lease goes (if it is still ours); the set entry goes only
/// when no call record is left, so that a survivor ends the calls still up at once.
const LEAVE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
local n = redis.call('HLEN', KEYS[2])
if n == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return n
"#;

/// What can go wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster (redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cluster (redis): no answer within {0:?}")]
    Timeout(Duration),
    #[error("cluster: the node name is empty")]
    NoName,
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout(OP_TIMEOUT)),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// How to join the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `redis.url`.
    pub redis_url: String,
    /// This node's name (`cluster.node`, or the first SIP address).
    pub node: String,
    /// `cluster.lease_s`.
    pub lease: Duration,
    /// The keys' prefix ([`DEFAULT_PREFIX`]; tests use their own).
    pub prefix: String,
    /// How often the others' leases are looked at ([`DEFAULT_SCAN_INTERVAL`]).
    pub scan_interval: Duration,
}

impl ClusterOptions {
    pub fn new(redis_url: &str, node: &str, lease: Duration) -> ClusterOptions {
        ClusterOptions {
            redis_url: redis_url.to_owned(),
            node: node.to_owned(),
            lease,
            prefix: DEFAULT_PREFIX.to_owned(),
            scan_interval: DEFAULT_SCAN_INTERVAL,
        }
    }
}

/// The calls of a node that is gone, for the layer that owns them to end.
#[derive(Debug)]
pub struct Takeover {
    /// The dead node's name.
    pub node: String,
    /// True for this node's own records from before it restarted (killed, then started
    /// again under the same name): nobody carries those calls any more either.
    pub restarted: bool,
    /// (call id, record) as [`CallRecords::put`] stored them.
    pub calls: Vec<(String, Vec<u8>)>,
}

/// Ends the calls of a [`Takeover`]. Runs on the watch task: it must start what it does
/// (send requests) and return, not wait for answers. The records are already gone from
/// Redis when it runs.
pub type TakeoverHandler = Arc<dyn Fn(Takeover) + Send + Sync>;

/// Counters of this node's part in the cluster (`strowger_cluster_*`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Nodes whose lease was alive at the last scan (this one included).
    pub nodes_alive: AtomicU64,
    /// Dead nodes this node took over.
    pub nodes_taken_over: AtomicU64,
    /// Calls of dead nodes (or of this node's previous life) handed to the handler.
    pub calls_taken_over: AtomicU64,
    /// This node's call records in Redis at the last scan.
    pub call_records: AtomicU64,
    /// Record changes written.
    pub record_writes: AtomicU64,
    /// Record changes that failed (Redis error or timeout; kept and tried again) or were
    /// dropped (queue full).
    pub record_errors: AtomicU64,
    /// Lease renewals (and scans) that failed.
    pub lease_failures: AtomicU64,
    /// Unix seconds of the last "queue full" warning (one a minute at most).
    full_warned: AtomicU64,
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn lease(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn calls(&self, node: &str) -> String {
        format!("{}:calls:{node}", self.prefix)
    }
    fn lock(&self, node: &str) -> String {
        format!("{}:takeover:{node}", self.prefix)
    }
}

/// What the tasks share.
pub(super) struct Shared {
    keys: Keys,
    name: String,
    lease: Duration,
    /// Our lease key's value: start time (Unix ms) and a random part, so that another
    /// process renewing the same name shows (a configuration error).
    value: String,
    con: ConnectionManager,
    pub(super) stats: Arc<ClusterStats>,
    handler: TakeoverHandler,
    scan_interval: Duration,
    /// Closed from Redis failing us until a lease after it answered again ([`Gate`]).
    gate: parking_lot::Mutex<Gate>,
}

/// This node's membership: a cheap handle. Dropping the last one stops the tasks without
/// a word to Redis (the lease then runs out: what a crash looks like); [`Cluster::stop`]
/// leaves gracefully.
#[derive(Clone)]
pub struct Cluster {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) shared: Arc<Shared>,
    records: CallRecords,
    stop: watch::Sender<bool>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// Where the layer that owns the calls puts their records (a clone of the cluster's
/// queue; cheap to clone).
#[derive(Clone)]
pub struct CallRecords {
    tx: mpsc::Sender<RecordOp>,
    stats: Arc<ClusterStats>,
}

impl CallRecords {
    /// Stores (or replaces) the record of `call_id`. Never waits: the change is queued
    /// for the writer task; a full queue drops it (counted, warned once a minute).
    pub fn put(&self, call_id: &str, record: Vec<u8>) {
        self.queue(RecordOp {
            call_id: call_id.into(),
            record: Some(record),
        });
    }

    /// Removes the record of `call_id` (the call ended here).
    pub fn remove(&self, call_id: &str) {
        self.queue(RecordOp {
            call_id: call_id.into(),
            record: None,
        });
    }

    fn queue(&self, op: RecordOp) {
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                self.stats.record_errors.fetch_add(1, Ordering::Relaxed);
                let now = unix_ms() / 1000;
                let last = self.stats.full_warned.load(Ordering::Relaxed);
                if now >= last + 60
                    && self
                        .stats
                        .full_warned
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(call = %op.call_id, "cluster call-record queue full (Redis too slow?); record changes dropped");
                }
            }
            // The cluster has stopped (shutdown): nothing is recorded any more.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Turns a flat HGETALL answer (field, value, field, value...) into pairs.
fn pairs(flat: Vec<Vec<u8>>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((String::from_utf8_lossy(&k).into_owned(), v));
    }
    out
}

impl Cluster {
    /// Joins the cluster: writes our lease and name, ends the calls our previous life left
    /// (see [`Takeover::restarted`]) through `handler`, and starts the lease, watch and
    /// writer tasks. Needs a tokio runtime; fails when Redis does not answer.
    pub async fn start(
        opts: ClusterOptions,
        handler: TakeoverHandler,
    ) -> Result<Cluster, ClusterError> {
        if opts.node.is_empty() {
            return Err(ClusterError::NoName);
        }
        let client = redis::Client::open(opts.redis_url.as_str())?;
        // The manager reconnects by itself after a connection loss; at least every
        // second while Redis is away, so that a node is back soon after Redis is.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_max_delay(RECONNECT_MAX)
            .set_connection_timeout(Some(OP_TIMEOUT));
        let con = bounded(client.get_connection_manager_with_config(config)).await?;
        let stats = Arc::new(ClusterStats::default());
        let shared = Arc::new(Shared {
            keys: Keys {
                prefix: opts.prefix.clone(),
            },
            name: opts.node.clone(),
            lease: opts.lease,
            value: format!("{} {:08x}", unix_ms(), rand::random::<u32>()),
            con,
            stats: stats.clone(),
            handler,
            scan_interval: opts.scan_interval,
            // Two leases: reconnecting, a renewal that timed out and the next one fit in
            // it even at the shortest lease.
            gate: parking_lot::Mutex::new(Gate::new(opts.lease * 2)),
        });
        let previous = shared.join().await?;
        if let Some(v) = previous {
            // A restart within the lease, or (a configuration error) another node running
            // under the same name: the renewals will tell.
            tracing::warn!(node = %shared.name, previous = %v, "this node's lease was still held when it started (a restart within cluster.lease_s, or another node with the same name)");
        }
        shared.take_own_records().await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, _) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(renew_loop(shared.clone(), stop.subscribe())),
            tokio::spawn(scan_loop(shared.clone(), stop.subscribe())),
            tokio::spawn(write_loop(shared.clone(), rx, stop.subscribe())),
        ];
        tracing::info!(node = %shared.name, lease_s = opts.lease.as_secs(), "joined the cluster");
        Ok(Cluster {
            inner: Arc::new(Inner {
                shared,
                records: CallRecords { tx, stats },
                stop,
                tasks: parking_lot::Mutex::new(tasks),
            }),
        })
    }

    /// This node's name in the cluster.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The queue for call records (what the B2BUA holds).
    pub fn records(&self) -> CallRecords {
        self.inner.records.clone()
    }

    pub fn stats(&self) -> &ClusterStats {
        &self.inner.shared.stats
    }

    /// Leaves gracefully: the tasks stop (queued record changes written first, within
    /// a few seconds), the lease is deleted at once, and the name leaves the node set when
    /// no call record is left. Records of calls still up stay, and the next scan of a
    /// survivor ends those calls (BYE to both parties), since no process carries them any
    /// more once this one exits.
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for mut t in tasks {
            // The writer flushes first; the others end at once.
            if tokio::time::timeout(OP_TIMEOUT * 2, &mut t).await.is_err() {
                tracing::warn!("a cluster task did not stop in time");
                t.abort();
            }
        }
        let s = &self.inner.shared;
        let mut con = s.con.clone();
        let left: Result<u64, _> = bounded(
            redis::Script::new(LEAVE_SCRIPT)
                .key(s.keys.lease(&s.name))
                .key(s.keys.calls(&s.name))
                .key(s.keys.nodes())
                .arg(&s.name)
                .arg(&s.value)
                .invoke_async(&mut con),
        )
        .await;
        match left {
            Ok(0) => tracing::info!(node = %s.name, "left the cluster"),
            Ok(n) => {
                tracing::warn!(node = %s.name, calls = n, "left the cluster with calls up; a surviving node ends them")
            }
            Err(e) => {
                tracing::warn!(node = %s.name, error = %e, "could not leave the cluster cleanly; the lease runs out")
            }
        }
    }
}

impl Shared {
    /// Our lease and our name in the set, in one MULTI; the lease's previous value, if
    /// it was still there.
    async fn join(&self) -> Result<Option<String>, ClusterError> {
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.keys.lease(&self.name))
            .arg(&self.value)
            .arg("PX")
            .arg(ms(self.lease))
            .arg("GET")
            .cmd("SADD")
            .arg(self.keys.nodes())
            .arg(&self.name)
            .ignore();
        let (previous,): (Option<String>,) = bounded(pipe.query_async(&mut con)).await?;
        Ok(previous)
    }

    /// Calls recorded by this node's previous life: whoever carried them is gone (our
    /// lease is ours again, so no survivor will take them), so they are ended here.
    async fn take_own_records(&self) -> Result<(), ClusterError> {
        let mut con = self.con.clone();
        let flat: Vec<Vec<u8>> = bounded(
            redis::Script::new(OWN_SCRIPT)
                .key(self.keys.calls(&self.name))
                .invoke_async(&mut con),
        )
        .await?;
        let calls = pairs(flat);
        if !calls.is_empty() {
            tracing::warn!(node = %self.name, calls = calls.len(), "calls of this node's previous life (killed?) found; ending them");
            self.hand_over(self.name.clone(), true, calls);
        }
        Ok(())
    }

    fn hand_over(&self, node: String, restarted: bool, calls: Vec<(String, Vec<u8>)>) {
        self.stats
            .calls_taken_over
            .fetch_add(calls.len() as u64, Ordering::Relaxed);
        (self.handler)(Takeover {
            node,
            restarted,
            calls,
        });
    }

    /// Renews our lease; tells when it had lapsed or another process holds the name.
    async fn renew(&self) -> Result<(), ClusterError> {
        let mut con = self.con.clone();
        let previous: Option<String> = bounded(
            redis::cmd("SET")
                .arg(self.keys.lease(&self.name))
                .arg(&self.value)
                .arg("PX")
                .arg(ms(self.lease))
                .arg("GET")
                .query_async(&mut con),
        )
        .await?;
        self.answered();
        match previous {
            Some(v) if v == self.value => {}
            Some(v) => {
                tracing::error!(node = %self.name, other = %v, "another process renews this node's lease: two nodes share the name cluster.node");
            }
            None => {
                // A survivor may have ended our calls meanwhile and taken our name out of
                // the set: back in it. And others may have lapsed as we did.
                self.trouble();
                self.answered();
                tracing::warn!(node = %self.name, "this node's lease had lapsed (Redis unreachable for cluster.lease_s?); its calls may have been ended by another node");
                bounded(
                    redis::cmd("SADD")
                        .arg(self.keys.nodes())
                        .arg(&self.name)
                        .query_async::<()>(&mut con),
                )
                .await?;
            }
        }
        Ok(())
    }

    fn trouble(&self) {
        self.gate.lock().trouble();
    }

    fn answered(&self) {
        self.gate.lock().answered(tokio::time::Instant::now());
    }

    /// One look at the cluster: the nodes alive, and the dead nodes' calls taken over.
    async fn scan(&self) -> Result<(), ClusterError> {
        let mut con = self.con.clone();
        let members: Vec<String> = bounded(
            redis::cmd("SMEMBERS")
                .arg(self.keys.nodes())
                .query_async(&mut con),
        )
        .await?;
        self.answered();
        let mut pipe = redis::pipe();
        if !members.is_empty() {
            let keys: Vec<String> = members.iter().map(|m| self.keys.lease(m)).collect();
            pipe.cmd("MGET").arg(keys);
        }
        pipe.cmd("HLEN").arg(self.keys.calls(&self.name));
        let (leases, records): (Vec<Option<String>>, u64) = if members.is_empty() {
            let (n,): (u64,) = bounded(pipe.query_async(&mut con)).await?;
            (Vec::new(), n)
        } else {
            bounded(pipe.query_async(&mut con)).await?
        };
        let alive: Vec<bool> = leases.iter().map(Option::is_some).collect();
        let j = judge(&self.name, &members, &alive);
        self.stats
            .nodes_alive
            .store(j.alive as u64, Ordering::Relaxed);
        self.stats.call_records.store(records, Ordering::Relaxed);
        if !j.dead.is_empty() && !self.gate.lock().is_open(tokio::time::Instant::now()) {
            tracing::debug!(dead = ?j.dead, "leases gone, but Redis answers this node again since less than a lease: not taking over yet");
            return Ok(());
        }
        for dead in j.dead {
            self.take_over(&dead).await?;
        }
        Ok(())
    }

    /// Claims a dead node's calls (if no other survivor did) and hands them over.
    async fn take_over(&self, dead: &str) -> Result<(), ClusterError> {
        let mut con = self.con.clone();
        let claimed: Option<Vec<Vec<u8>>> = bounded(
            redis::Script::new(TAKE_SCRIPT)
                .key(self.keys.lease(dead))
                .key(self.keys.lock(dead))
                .key(self.keys.calls(dead))
                .key(self.keys.nodes())
                .arg(&self.name)
                .arg(ms(self.lease))
                .arg(dead)
                .invoke_async(&mut con),
        )
        .await?;
        let Some(flat) = claimed else {
            return Ok(());
        };
        let calls = pairs(flat);
        self.stats.nodes_taken_over.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %dead, by = %self.name, calls = calls.len(), "node's lease ran out: it left the cluster; its calls are ended here");
        if !calls.is_empty() {
            self.hand_over(dead.to_owned(), false, calls);
        }
        Ok(())
    }

    /// Writes a batch: one HSET and one HDEL in one pipeline.
    async fn write(&self, w: &Writes) -> Result<(), ClusterError> {
        let key = self.keys.calls(&self.name);
        let mut pipe = redis::pipe();
        if !w.puts.is_empty() {
            let cmd = pipe.cmd("HSET").arg(&key);
            for (id, record) in &w.puts {
                cmd.arg(&**id).arg(record.as_slice());
            }
            cmd.ignore();
        }
        if !w.removes.is_empty() {
            let cmd = pipe.cmd("HDEL").arg(&key);
            for id in &w.removes {
                cmd.arg(&**id);
            }
            cmd.ignore();
        }
        let mut con = self.con.clone();
        bounded(pipe.query_async::<()>(&mut con)).await
    }
}

async fn renew_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let every = renewal_interval(shared.lease);
    let mut failing = false;
    loop {
        // While failing, sooner: the lease is running out.
        let pause = if failing { every.min(RETRY) } else { every };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        match shared.renew().await {
            Ok(()) => {
                if failing {
                    tracing::info!(node = %shared.name, "lease renewed again");
                }
                failing = false;
            }
            Err(e) => {
                shared.trouble();
                shared.stats.lease_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %shared.name, error = %e, "renewing this node's cluster lease failed; the others take it for dead once cluster.lease_s has passed");
                failing = true;
            }
        }
    }
}

async fn scan_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(shared.scan_interval) => {}
        }
        match shared.scan().await {
            Ok(()) => failing = false,
            Err(e) => {
                shared.trouble();
                // Once per outage: the renewals warn too.
                if !failing {
                    tracing::warn!(node = %shared.name, error = %e, "looking at the other nodes' leases failed");
                }
                failing = true;
            }
        }
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<RecordOp>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Batch::default();
    let mut stopping = false;
    loop {
        if batch.is_empty() && !stopping {
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => batch.add(op),
                    None => return,
                },
                _ = stop.changed() => stopping = true,
            }
            // Gather what comes in the next WRITE_WINDOW into the same pipeline: under load
            // one write per window instead of one per change (a record only matters a lease
            // later, when a node died).
            if !stopping {
                tokio::select! {
                    _ = tokio::time::sleep(WRITE_WINDOW) => {}
                    _ = stop.changed() => stopping = true,
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) if batch.len() < MAX_PENDING || batch.has(&op.call_id) => batch.add(op),
                Ok(_) => {
                    shared.stats.record_errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let w = batch.take();
        let n = w.len() as u64;
        match shared.write(&w).await {
            Ok(()) => {
                shared.stats.record_writes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                shared.stats.record_errors.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(node = %shared.name, error = %e, changes = n, "writing call records to Redis failed; trying again");
                batch.restore(w);
                if stopping {
                    // One try at shutdown: the lease goes anyway.
                    return;
                }
                tokio::select! {
                    _ = stop.changed() => stopping = true,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgetall_answers_pair_up() {
        let flat = vec![
            b"c1".to_vec(),
            b"r1".to_vec(),
            b"c2".to_vec(),
            b"r2".to_vec(),
        ];
        assert_eq!(
            pairs(flat),
            vec![("c1".into(), b"r1".to_vec()), ("c2".into(), b"r2".to_vec())]
        );
        // An odd answer (impossible from HGETALL) loses the lone field, no panic.
        assert_eq!(pairs(vec![b"c1".to_vec()]), vec![]);
    }

    #[test]
    fn key_names() {
        let k = Keys { prefix: "p".into() };
        assert_eq!(k.lease("n1"), "p:node:n1");
        assert_eq!(k.nodes(), "p:nodes");
        assert_eq!(k.calls("n1"), "p:calls:n1");
        assert_eq!(k.lock("n1"), "p:takeover:n1");
    }
}
