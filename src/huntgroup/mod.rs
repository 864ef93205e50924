//! Call-centre hunt groups: agents and their states, the seven hunting strategies, the
//! queue of callers waiting without media, and the hunt itself (ring, skip on no answer,
//! pause after repeated misses, wrap-up after a call, overflow after `max_wait`).
//!
//! **Owns**: agent state (durable part in an [`AgentStore`]: SQLite file
//! `<storage.dir>/huntgroups.sqlite`, or a Redis hash when `registrar.store = "redis"` or
//! `cluster.enabled`), the per-group queues and round-robin cursors (this node's, or with
//! `cluster.enabled` the cluster's through the [`SharedHunt`] port), the
//! `strowger_huntgroup_*` metrics.
//! **Must not touch**: SIP messages, transactions, dialogs, the Lua VMs. A hunt talks to
//! its call through [`HuntLeg`] (implemented over the B2BUA's `CallControl` port in
//! `src/script/huntgroup.rs`); registered contacts and "is this address on any call" come
//! through [`Directory`] (implemented by the server over the registrar and the B2BUA).
//!
//! # Config keys (`[huntgroups.<name>]`, see [`HuntGroupConfig`] in `config.rs`)
//! `strategy`, `members`, `ring_timeout`, `max_wait`, `wrap_up`, `weights`, `max_missed`,
//! `queue_announce`, `calls_reset_s`.
//!
//! # Agents
//! An agent is a member string as configured: an extension (`"1001"`, rung at the
//! registered contacts of `sip:1001@<sip.domain>`) or a SIP URI. Its state is global: an
//! agent in two groups paused in one is paused in both. States shown to operators:
//! `available`, `ringing`, `in-call` (on any call through this server, also one not from a
//! group), `wrap-up`, `paused`, `logged-out`. Only `available` agents are rung.
//! Login/logout/pause set the durable *presence* (`available`, `paused`, `logged-out`).
//!
//! # Queueing (no media)
//! A caller for whom no agent is available stays queued: its INVITE stays pending and it
//! gets `182 Queued` (RFC 3261 21.1.3) at once and every `queue_announce` seconds, with
//! `Warning: 399 strowger "queue position N"` (RFC 3261 20.43) and `X-Queue-Position: N`.
//! The caller that goes first is the longest-waiting one of the highest `priority`
//! (larger number first). A CANCEL while queued is counted as abandoned; after `max_wait`
//! the hunt returns with `overflow = true` and the script decides.
//!
//! # Across a cluster (`cluster.enabled`)
//! Every node hunts with the same queue, the same agent states and the same strategy
//! order, kept in Redis by [`RedisSharedHunt`] (layout in `shared.rs`; the hunting side in
//! `cluster.rs`). Without a cluster none of it runs and a node hunts alone, as above.
//! - **One queue per group**: a sorted set scored by priority, then arrival time (Unix
//!   ms, so first come first served whichever node a caller came in through). Positions
//!   in 182 are ranks in it. Only the ticket at its head may take agents. Each ticket has
//!   a lease its hunt renews while it waits; a dead node's tickets lapse and are dropped
//!   by the next node that reads the queue, so they do not block it for more than a lease.
//! - **Claims**: an agent is taken with `SET <prefix>:claim:<agent> NX PX <lease>` before
//!   it is rung; whoever does not get the claim does not ring. The holder renews it every
//!   third of `cluster.lease_s` while the agent rings and while it is on the call; after
//!   the call it becomes a wrap-up claim lasting `wrap_up`, not renewed. Releases and
//!   changes are compare-and-set Lua scripts (only while the value is still ours). An
//!   agent with any claim is not available anywhere; a dead node stops renewing, so its
//!   agents come back after at most a lease. ring-all rings the agents it could claim,
//!   and waits when it claimed none.
//! - **Busy everywhere**: an agent on a call through a node that is no group call of that
//!   node's (a direct call, or being rung by one) gets a *busy* claim from that node,
//!   checked every 0.5 s and renewed like the others, removed when the call ends. Cheaper
//!   than a shared call index: one `SET NX` per such call, nothing per message.
//! - **Strategy order**: the round-robin cursor is `<prefix>:cursor:<group>` (read, then
//!   written after a claim: a rare lost update only moves the turn, never rings twice);
//!   least-recent and fewest-calls read every agent's record afresh at pick time, and
//!   each change of a record (answered, call end, pause) is a read-modify-write of the
//!   stored record, so no node's stale copy overwrites another's count. Unanswered rings
//!   in a row are counted in `<prefix>:missed` (HINCRBY), so `max_missed` is cluster-wide.
//! - **Snapshots and metrics** (`GET /huntgroups`, `huntgroup.agents`, the scrape) are
//!   synchronous and cheap: each node reads the queues (length, oldest arrival) and every
//!   agent's claim and misses in one Lua call every 0.5 s, and shows those: waiting and
//!   longest wait are the cluster's, and an agent claimed by another node is `ringing`,
//!   `in-call` or `wrap-up` here too. Answered/abandoned/overflowed stay per node (sum
//!   them across nodes).
//! - **Redis failures**: every Redis call has a 1 s bound; on failure the hunt logs a
//!   warning (at most one per 10 s) and goes on with this node's own view (its local
//!   queue, agents unclaimed) for 2 s before it tries Redis again, so a caller is still
//!   answered, at worst by an agent that another node rings too. Claims and tickets it
//!   could not release lapse after the lease.
//!
//! # Metrics (label `group` = configured group names; `state` = the six states)
//! `strowger_huntgroup_waiting`, `strowger_huntgroup_longest_wait_seconds`,
//! `strowger_huntgroup_answered_total`, `strowger_huntgroup_abandoned_total`,
//! `strowger_huntgroup_overflowed_total`, `strowger_huntgroup_agents{group,state}`,
//! `strowger_huntgroup_answer_seconds` (histogram: hunt start to answer).

mod cluster;
mod config;
mod metrics;
pub mod shared;
pub mod store;
pub mod strategy;

pub use config::{check_huntgroups, HuntGroupConfig};
pub use shared::{RedisSharedHunt, SharedError, SharedHunt};
pub use store::{
    AgentRecord, AgentStore, AgentStoreError, Presence, RedisAgentStore, SqliteAgentStore,
};
pub use strategy::Strategy;

use parking_lot::{Mutex, RwLock};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
pub use store::BoxFuture;
use strategy::Candidate;
use tokio::sync::watch;
use tokio::time::Instant;

/// Shared-store re-read interval (Redis: other nodes' logins and pauses).
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// A waiting caller re-checks at least this often (agents freed by calls that are not the
/// group's own end without telling us).
const POLL_EVERY: Duration = Duration::from_millis(500);

/// An agent's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Available,
    Ringing,
    InCall,
    WrapUp,
    Paused,
    LoggedOut,
}

impl AgentState {
    pub const ALL: [AgentState; 6] = [
        AgentState::Available,
        AgentState::Ringing,
        AgentState::InCall,
        AgentState::WrapUp,
        AgentState::Paused,
        AgentState::LoggedOut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AgentState::Available => "available",
            AgentState::Ringing => "ringing",
            AgentState::InCall => "in-call",
            AgentState::WrapUp => "wrap-up",
            AgentState::Paused => "paused",
            AgentState::LoggedOut => "logged-out",
        }
    }
}

/// Registered contacts and calls in progress, as hunting needs them.
pub trait Directory: Send + Sync + 'static {
    /// The live contacts of an address of record, best first.
    fn contacts(&self, aor: &str) -> Vec<String>;
    /// Whether any of these addresses (AORs or contact URIs) is on a call.
    fn on_call(&self, uris: &[String]) -> bool;
}

/// What a hunt does to its call: implemented over the script's call control.
pub trait HuntLeg: Send + Sync + 'static {
    /// Rings `targets` in parallel for at most `timeout`; says which target answered.
    fn ring(&self, targets: Vec<String>, timeout: Duration) -> BoxFuture<'static, Rung>;
    /// Tells the waiting caller its queue position (182 Queued).
    fn queued(&self, position: usize);
    /// Whether the caller has gone (CANCEL) or the call has otherwise ended.
    fn is_gone(&self) -> bool;
    /// Resolves when the call ends (before or after an answer).
    fn ended(&self) -> BoxFuture<'static, ()>;
}

/// The result of one ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rung {
    pub answered: bool,
    pub status: u16,
    pub reason: String,
    /// Index into the rung targets of the one that answered.
    pub winner: Option<usize>,
}

/// Per-call overrides (`call:hunt(name, opts)`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HuntOptions {
    pub strategy: Option<Strategy>,
    pub ring_timeout: Option<Duration>,
    pub max_wait: Option<Duration>,
    /// Larger goes first; default 0.
    pub priority: i64,
}

/// How a hunt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct HuntOutcome {
    pub answered: bool,
    pub status: u16,
    pub reason: String,
    /// The agent who answered.
    pub agent: Option<String>,
    /// Whether the caller had to wait in the queue (got 182).
    pub queued: bool,
    /// Seconds from the start of the hunt to its end.
    pub waited: f64,
    /// `max_wait` passed without an answer.
    pub overflow: bool,
    /// The caller hung up (CANCEL) before an answer.
    pub abandoned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HuntError {
    #[error("no hunt group named {0:?}")]
    UnknownGroup(String),
    #[error("no agent {0:?} in any hunt group")]
    UnknownAgent(String),
    #[error("unknown agent state {0:?} (expected available, paused or logged-out)")]
    UnknownState(String),
    #[error(transparent)]
    Store(#[from] AgentStoreError),
}

#[derive(Debug, Clone)]
enum Member {
    /// An extension: the AOR whose contacts are rung.
    Extension {
        agent: String,
        aor: String,
    },
    Uri {
        agent: String,
    },
}

impl Member {
    fn agent(&self) -> &str {
        match self {
            Member::Extension { agent, .. } | Member::Uri { agent } => agent,
        }
    }
}

#[derive(Default)]
struct GroupStats {
    answered: AtomicU64,
    abandoned: AtomicU64,
    overflowed: AtomicU64,
}

struct Group {
    name: String,
    strategy: Strategy,
    members: Vec<Member>,
    weights: Vec<u32>,
    ring_timeout: Duration,
    max_wait: Duration,
    wrap_up: Duration,
    max_missed: u32,
    announce: Duration,
    reset_s: u64,
    stats: GroupStats,
}

struct Agent {
    rec: AgentRecord,
    ringing: u32,
    in_call: u32,
    wrap_until: Option<Instant>,
    missed: u32,
}

impl Agent {
    fn state(&self, engaged: bool, now: Instant) -> AgentState {
        match self.rec.presence {
            Presence::LoggedOut => AgentState::LoggedOut,
            Presence::Paused => AgentState::Paused,
            Presence::Available if self.in_call > 0 || engaged => AgentState::InCall,
            Presence::Available if self.ringing > 0 => AgentState::Ringing,
            Presence::Available if self.wrap_until.is_some_and(|t| t > now) => AgentState::WrapUp,
            Presence::Available => AgentState::Available,
        }
    }

    fn answered_in(&self, period: u64) -> u64 {
        if self.rec.period == period {
            self.rec.answered
        } else {
            0
        }
    }
}

/// A change to an agent's durable record.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    /// One more answered call, counted in reset period `period`.
    Answered {
        period: u64,
    },
    /// A call ended at Unix seconds `at`.
    Ended {
        at: f64,
    },
    Presence(Presence),
}

impl Change {
    fn apply(self, rec: &mut AgentRecord) {
        match self {
            Change::Answered { period } => {
                if rec.period != period {
                    rec.period = period;
                    rec.answered = 0;
                }
                rec.answered += 1;
            }
            Change::Ended { at } => rec.last_end = rec.last_end.max(at),
            Change::Presence(p) => rec.presence = p,
        }
    }
}

struct Ticket {
    id: u64,
    priority: i64,
    since: Instant,
}

struct State {
    agents: HashMap<String, Agent>,
    queues: HashMap<String, Vec<Ticket>>,
    cursors: HashMap<String, usize>,
    rng: StdRng,
    next_ticket: u64,
    /// Cluster: the claims this node holds (agent → value), renewed by the cluster loop.
    held: HashMap<String, String>,
    /// Cluster: the last read of the shared queues and claims (for snapshots, scrapes).
    view: Option<shared::ClusterView>,
}

/// Per member of a group: its agent, the URIs to ring, whether it is on a call here.
type Reach = [(String, Vec<String>, bool)];

impl State {
    /// The earliest end of a wrap-up among `reach` still to come.
    fn wake(&self, reach: &Reach, now: Instant) -> Option<Instant> {
        reach
            .iter()
            .filter_map(|(agent, _, _)| self.agents.get(agent)?.wrap_until)
            .filter(|t| *t > now)
            .min()
    }

    /// Chooses by `strategy` among the available agents of `reach` (those with somewhere
    /// to ring, free here and not `blocked` elsewhere), preferring those not yet `tried`
    /// in this hunt, and marks them ringing. `cursor` is the round-robin position; `at`
    /// is now and the current `fewest-calls` period. Empty when nobody is available.
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &mut self,
        g: &Group,
        strategy: Strategy,
        reach: &Reach,
        blocked: &HashSet<String>,
        tried: &mut HashSet<String>,
        cursor: &mut usize,
        (now, period): (Instant, u64),
    ) -> Vec<(String, Vec<String>)> {
        let available: Vec<Candidate> = reach
            .iter()
            .enumerate()
            .filter_map(|(index, (agent, uris, engaged))| {
                let a = self.agents.get(agent)?;
                let free = !uris.is_empty()
                    && !blocked.contains(agent)
                    && a.state(*engaged, now) == AgentState::Available;
                free.then(|| Candidate {
                    index,
                    last_end: a.rec.last_end,
                    answered: a.answered_in(period),
                    weight: g.weights.get(index).copied().unwrap_or(1),
                })
            })
            .collect();
        if available.is_empty() {
            return Vec::new();
        }
        let untried: Vec<Candidate> = available
            .iter()
            .filter(|c| !tried.contains(&reach[c.index].0))
            .cloned()
            .collect();
        let pool = if untried.is_empty() {
            // Everyone free has been tried once in this hunt: start another round.
            tried.clear();
            available
        } else {
            untried
        };
        let picks = strategy::select(strategy, &pool, cursor, &mut self.rng);
        let mut picked = Vec::new();
        for i in picks {
            let Some((agent, uris, _)) = reach.get(i) else {
                continue;
            };
            if let Some(a) = self.agents.get_mut(agent) {
                a.ringing += 1;
            }
            picked.push((agent.clone(), uris.clone()));
        }
        picked
    }

    /// 1-based position of ticket `id` in `group`'s queue (priority first, then age).
    fn position(&self, group: &str, id: u64) -> usize {
        let Some(q) = self.queues.get(group) else {
            return 1;
        };
        let Some(me) = q.iter().find(|t| t.id == id) else {
            return 1;
        };
        1 + q
            .iter()
            .filter(|t| (Reverse(t.priority), t.id) < (Reverse(me.priority), me.id))
            .count()
    }
}

struct Inner {
    groups: Vec<Group>,
    state: Mutex<State>,
    store: Arc<dyn AgentStore>,
    /// Cluster-wide queues and claims (`cluster.enabled`); None: this node alone.
    shared: Option<Arc<dyn SharedHunt>>,
    /// When a Redis failure was last logged as a warning (at most one per 10 s).
    last_warn: Mutex<Option<Instant>>,
    /// After a Redis failure, hunts use this node's own view until then instead of
    /// waiting for Redis at every step.
    down_until: Mutex<Option<Instant>>,
    directory: RwLock<Option<Arc<dyn Directory>>>,
    changed: watch::Sender<u64>,
    metrics: metrics::HuntMetrics,
}

/// The hunt groups: a cheap, cloneable handle.
#[derive(Clone)]
pub struct HuntGroups {
    inner: Arc<Inner>,
}

/// One agent as `huntgroup.agents` and `GET /huntgroups` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentView {
    pub agent: String,
    pub state: &'static str,
    pub presence: &'static str,
    pub missed: u32,
    pub answered: u64,
    pub last_end: f64,
}

/// One group as `GET /huntgroups` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupView {
    pub name: String,
    pub strategy: &'static str,
    pub waiting: usize,
    pub longest_wait_s: f64,
    pub answered: u64,
    pub abandoned: u64,
    pub overflowed: u64,
    pub agents: Vec<AgentView>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl HuntGroups {
    /// Builds the groups from the configuration and loads agent state from `store`.
    pub async fn start(
        config: &std::collections::BTreeMap<String, HuntGroupConfig>,
        domain: &str,
        store: Arc<dyn AgentStore>,
    ) -> Result<HuntGroups, AgentStoreError> {
        HuntGroups::start_with(config, domain, store, None).await
    }

    /// [`HuntGroups::start`], and with `shared` the queues, claims and cursors are the
    /// cluster's (see the module docs).
    pub async fn start_with(
        config: &std::collections::BTreeMap<String, HuntGroupConfig>,
        domain: &str,
        store: Arc<dyn AgentStore>,
        shared: Option<Arc<dyn SharedHunt>>,
    ) -> Result<HuntGroups, AgentStoreError> {
        let mut groups = Vec::new();
        let mut agents: HashMap<String, Agent> = HashMap::new();
        for (name, g) in config {
            let members: Vec<Member> = g
                .members
                .iter()
                .map(|m| {
                    if m.contains(':') {
                        Member::Uri { agent: m.clone() }
                    } else {
                        Member::Extension {
                            agent: m.clone(),
                            aor: format!("sip:{m}@{domain}"),
                        }
                    }
                })
                .collect();
            for m in &members {
                agents.entry(m.agent().to_owned()).or_insert_with(|| Agent {
                    rec: AgentRecord {
                        agent: m.agent().to_owned(),
                        presence: Presence::Available,
                        answered: 0,
                        period: 0,
                        last_end: 0.0,
                    },
                    ringing: 0,
                    in_call: 0,
                    wrap_until: None,
                    missed: 0,
                });
            }
            groups.push(Group {
                name: name.clone(),
                // Validated by the configuration; ring-all is the safe reading otherwise.
                strategy: Strategy::parse(&g.strategy).unwrap_or(Strategy::RingAll),
                weights: if g.weights.is_empty() {
                    vec![1; members.len()]
                } else {
                    g.weights.clone()
                },
                members,
                ring_timeout: Duration::from_secs(g.ring_timeout),
                max_wait: Duration::from_secs(g.max_wait),
                wrap_up: Duration::from_secs(g.wrap_up),
                max_missed: g.max_missed,
                announce: Duration::from_secs(g.queue_announce),
                reset_s: g.calls_reset_s.max(1),
                stats: GroupStats::default(),
            });
        }
        for rec in store.load().await? {
            if let Some(a) = agents.get_mut(&rec.agent) {
                a.rec = rec;
            }
        }
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        let hg = HuntGroups {
            inner: Arc::new(Inner {
                groups,
                state: Mutex::new(State {
                    agents,
                    queues: HashMap::new(),
                    cursors: HashMap::new(),
                    rng: StdRng::from_os_rng(),
                    next_ticket: 1,
                    held: HashMap::new(),
                    view: None,
                }),
                store,
                shared,
                last_warn: Mutex::new(None),
                down_until: Mutex::new(None),
                directory: RwLock::new(None),
                changed: watch::channel(0).0,
                metrics: metrics::HuntMetrics::new(&names),
            }),
        };
        if hg.inner.store.shared() && !hg.inner.groups.is_empty() {
            let weak = Arc::downgrade(&hg.inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH_EVERY).await;
                    let Some(inner) = weak.upgrade() else { return };
                    HuntGroups { inner }.refresh().await;
                }
            });
        }
        if hg.inner.shared.is_some() && !hg.inner.groups.is_empty() {
            cluster::spawn_loop(&hg.inner);
        }
        Ok(hg)
    }

    /// Attaches the registrar and B2BUA view (set once at start-up).
    pub fn set_directory(&self, directory: Arc<dyn Directory>) {
        *self.inner.directory.write() = Some(directory);
    }

    /// Configured group names.
    pub fn names(&self) -> Vec<String> {
        self.inner.groups.iter().map(|g| g.name.clone()).collect()
    }

    fn group(&self, name: &str) -> Option<&Group> {
        self.inner.groups.iter().find(|g| g.name == name)
    }

    fn notify(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Re-reads presence from a shared store (other nodes' logins and pauses); in a
    /// cluster the counters too (every change to them is written through to the store).
    async fn refresh(&self) {
        match self.inner.store.load().await {
            Ok(records) => {
                if self.merge_records(records) {
                    self.notify();
                }
            }
            Err(e) => tracing::warn!(error = %e, "hunt groups: re-reading agent state failed"),
        }
    }

    /// Takes stored records in: the presence, and in a cluster the whole record. Whether a
    /// presence changed.
    fn merge_records(&self, records: Vec<AgentRecord>) -> bool {
        let whole = self.inner.shared.is_some();
        let mut changed = false;
        let mut st = self.inner.state.lock();
        for rec in records {
            if let Some(a) = st.agents.get_mut(&rec.agent) {
                changed |= a.rec.presence != rec.presence;
                if whole {
                    a.rec = rec;
                } else {
                    a.rec.presence = rec.presence;
                }
            }
        }
        changed
    }

    fn save(&self, rec: AgentRecord) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.store.save(rec).await {
                tracing::warn!(error = %e, "hunt groups: saving agent state failed");
            }
        });
    }

    /// Applies `change` to `agent`'s record here and in the store: alone, by saving our
    /// copy; in a cluster, to the stored record read afresh (another node may have
    /// changed it since we read it), in the background.
    fn change_record(&self, agent: &str, change: Change) {
        let rec = {
            let mut st = self.inner.state.lock();
            let Some(a) = st.agents.get_mut(agent) else {
                return;
            };
            change.apply(&mut a.rec);
            a.rec.clone()
        };
        if self.inner.shared.is_none() {
            self.save(rec);
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.write_through(change, rec).await {
                tracing::warn!(error = %e, "hunt groups: saving agent state failed");
            }
        });
    }

    /// Read-modify-write of one stored record; `ours` (already changed) when the store
    /// has none yet. Our copy becomes the stored one.
    async fn write_through(
        &self,
        change: Change,
        ours: AgentRecord,
    ) -> Result<(), AgentStoreError> {
        let rec = match self.inner.store.load_one(&ours.agent).await? {
            Some(mut fresh) => {
                change.apply(&mut fresh);
                fresh
            }
            None => ours,
        };
        self.inner.store.save(rec.clone()).await?;
        if let Some(a) = self.inner.state.lock().agents.get_mut(&rec.agent) {
            a.rec = rec;
        }
        Ok(())
    }

    /// Per member: its agent, the URIs to ring and whether it is on a call elsewhere.
    /// Asked before taking the state lock (the directory has locks of its own).
    fn reach(&self, g: &Group) -> Vec<(String, Vec<String>, bool)> {
        let dir = self.inner.directory.read().clone();
        g.members
            .iter()
            .map(|m| match m {
                Member::Uri { agent } => {
                    let engaged = dir
                        .as_ref()
                        .is_some_and(|d| d.on_call(std::slice::from_ref(agent)));
                    (agent.clone(), vec![agent.clone()], engaged)
                }
                Member::Extension { agent, aor } => {
                    let contacts = dir.as_ref().map(|d| d.contacts(aor)).unwrap_or_default();
                    let mut all = contacts.clone();
                    all.push(aor.clone());
                    let engaged = dir.as_ref().is_some_and(|d| d.on_call(&all));
                    (agent.clone(), contacts, engaged)
                }
            })
            .collect()
    }

    /// The agents of `group` with their current state.
    pub fn agents(&self, group: &str) -> Result<Vec<AgentView>, HuntError> {
        let g = self
            .group(group)
            .ok_or_else(|| HuntError::UnknownGroup(group.to_owned()))?;
        let reach = self.reach(g);
        let now = Instant::now();
        let period = unix_now() as u64 / g.reset_s;
        let st = self.inner.state.lock();
        let view = st.view.as_ref();
        Ok(reach
            .iter()
            .filter_map(|(agent, _, engaged)| {
                let a = st.agents.get(agent)?;
                let mut state = a.state(*engaged, now);
                let mut missed = a.missed;
                if let Some(v) = view {
                    // Free here, but claimed in the cluster (by another node, or by a
                    // call of ours that is not a group's).
                    if state == AgentState::Available {
                        if let Some(c) = v.claims.get(agent) {
                            state = shared::claim_state(c);
                        }
                    }
                    missed = v.missed.get(agent).copied().unwrap_or(0);
                }
                Some(AgentView {
                    agent: agent.clone(),
                    state: state.name(),
                    presence: a.rec.presence.name(),
                    missed,
                    answered: a.answered_in(period),
                    last_end: a.rec.last_end,
                })
            })
            .collect())
    }

    /// Every group with its queue, counters and agents (`GET /huntgroups`).
    pub fn snapshot(&self) -> Vec<GroupView> {
        let now = Instant::now();
        self.inner
            .groups
            .iter()
            .map(|g| {
                let agents = self.agents(&g.name).unwrap_or_default();
                let (waiting, longest) = {
                    let st = self.inner.state.lock();
                    match st.view.as_ref().and_then(|v| v.queues.get(&g.name)) {
                        // The cluster's queue: how long its oldest ticket has waited, by
                        // the nodes' clocks.
                        Some(q) => (
                            q.waiting,
                            q.oldest_ms.map_or(Duration::ZERO, |at| {
                                Duration::from_millis(unix_ms().saturating_sub(at))
                            }),
                        ),
                        None => {
                            let q = st.queues.get(&g.name);
                            (
                                q.map_or(0, Vec::len),
                                q.and_then(|q| q.iter().map(|t| now - t.since).max())
                                    .unwrap_or_default(),
                            )
                        }
                    }
                };
                GroupView {
                    name: g.name.clone(),
                    strategy: g.strategy.name(),
                    waiting,
                    longest_wait_s: longest.as_secs_f64(),
                    answered: g.stats.answered.load(Ordering::Relaxed),
                    abandoned: g.stats.abandoned.load(Ordering::Relaxed),
                    overflowed: g.stats.overflowed.load(Ordering::Relaxed),
                    agents,
                }
            })
            .collect()
    }

    /// Login (`available`), `paused` or logout (`logged-out`), from the admin API or the
    /// script; written to the store before it returns.
    pub async fn set_state(&self, agent: &str, state: &str) -> Result<(), HuntError> {
        let presence = match state {
            "available" | "login" | "unpause" => Presence::Available,
            "paused" | "pause" => Presence::Paused,
            "logged-out" | "logout" => Presence::LoggedOut,
            other => return Err(HuntError::UnknownState(other.to_owned())),
        };
        let rec = {
            let mut st = self.inner.state.lock();
            let a = st
                .agents
                .get_mut(agent)
                .ok_or_else(|| HuntError::UnknownAgent(agent.to_owned()))?;
            a.rec.presence = presence;
            a.missed = 0;
            a.rec.clone()
        };
        match &self.inner.shared {
            None => self.inner.store.save(rec).await?,
            Some(sh) => {
                self.write_through(Change::Presence(presence), rec).await?;
                self.clear_misses(sh, agent).await;
            }
        }
        tracing::info!(agent, state = presence.name(), "hunt group agent state set");
        self.notify();
        Ok(())
    }

    /// Hunts for an agent of `group` for the call behind `leg`. Returns when an agent
    /// answered, the caller left, or `max_wait` passed (overflow).
    pub async fn hunt(
        &self,
        group: &str,
        opts: HuntOptions,
        leg: Arc<dyn HuntLeg>,
    ) -> Result<HuntOutcome, HuntError> {
        let g = self
            .group(group)
            .ok_or_else(|| HuntError::UnknownGroup(group.to_owned()))?;
        let strategy = opts.strategy.unwrap_or(g.strategy);
        let ring_timeout = opts.ring_timeout.unwrap_or(g.ring_timeout);
        let max_wait = opts.max_wait.unwrap_or(g.max_wait);
        let start = Instant::now();
        let deadline = start + max_wait;
        let mut changed = self.inner.changed.subscribe();
        let id = {
            let mut st = self.inner.state.lock();
            let id = st.next_ticket;
            st.next_ticket += 1;
            st.queues.entry(g.name.clone()).or_default().push(Ticket {
                id,
                priority: opts.priority,
                since: start,
            });
            id
        };
        // In a cluster the ticket's place is its score: priority, then arrival time.
        let ticket = self.inner.shared.as_ref().map(|sh| SharedTicket {
            id: format!("{}#{id}", sh.holder()),
            score: shared::queue_score(opts.priority, unix_ms()),
        });
        // Should the hunt be dropped half-way (its hook abandoned), the ticket leaves the
        // queue and agents it was ringing are released, instead of staying "ringing".
        let mut guard = HuntGuard {
            hg: self.clone(),
            group: g.name.clone(),
            id,
            ticket: ticket.as_ref().map(|t| t.id.clone()),
            ringing: Vec::new(),
        };
        let ticket = ticket.as_ref();
        let mut tried: HashSet<String> = HashSet::new();
        let mut queued = false;
        let mut next_announce = start;
        let mut last_status: Option<(u16, String)> = None;
        let outcome =
            |answered, status, reason: String, agent, overflow, abandoned, queued| HuntOutcome {
                answered,
                status,
                reason,
                agent,
                queued,
                waited: start.elapsed().as_secs_f64(),
                overflow,
                abandoned,
            };
        loop {
            changed.borrow_and_update();
            if leg.is_gone() {
                self.leave(&g.name, id, ticket);
                guard.ticket = None;
                g.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                return Ok(outcome(
                    false,
                    487,
                    "Request Terminated".into(),
                    None,
                    false,
                    true,
                    queued,
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                self.leave(&g.name, id, ticket);
                guard.ticket = None;
                g.stats.overflowed.fetch_add(1, Ordering::Relaxed);
                let (status, reason) =
                    last_status.unwrap_or((480, "Temporarily Unavailable".into()));
                return Ok(outcome(false, status, reason, None, true, false, queued));
            }
            let take = match (self.shared_up(), ticket) {
                (Some(sh), Some(t)) => self.take_shared(sh, g, strategy, id, t, &mut tried).await,
                _ => self.try_take(g, strategy, id, &mut tried, now),
            };
            match take {
                Take::Ring(picked) => {
                    let mut targets = Vec::new();
                    let mut owner = Vec::new();
                    for (agent, uris) in &picked {
                        for u in uris {
                            targets.push(u.clone());
                            owner.push(agent.clone());
                        }
                    }
                    guard.ringing = picked.iter().map(|(a, _)| a.clone()).collect();
                    let rung = leg.ring(targets, ring_timeout).await;
                    guard.ringing.clear();
                    let winner = rung
                        .winner
                        .filter(|_| rung.answered)
                        .and_then(|i| owner.get(i).cloned());
                    let agents: Vec<String> = picked.into_iter().map(|(a, _)| a).collect();
                    let missed = self.after_ring(g, &agents, winner.as_deref(), rung.status);
                    if let (Some(sh), Some(t)) = (&self.inner.shared, ticket) {
                        self.settle_ring(sh, g, &agents, winner.as_deref(), &missed, t)
                            .await;
                    }
                    if rung.answered {
                        self.leave(&g.name, id, ticket);
                        guard.ticket = None;
                        g.stats.answered.fetch_add(1, Ordering::Relaxed);
                        self.inner
                            .metrics
                            .answer_seconds(&g.name, start.elapsed().as_secs_f64());
                        if let Some(agent) = winner.clone() {
                            let this = self.clone();
                            let wrap_up = g.wrap_up;
                            let ended = leg.ended();
                            tokio::spawn(async move {
                                ended.await;
                                this.call_ended(&agent, wrap_up).await;
                            });
                        }
                        return Ok(outcome(
                            true,
                            rung.status,
                            rung.reason,
                            winner,
                            false,
                            false,
                            queued,
                        ));
                    }
                    last_status = Some((rung.status, rung.reason));
                    tried.extend(agents);
                    self.requeue(&g.name, id, opts.priority, start);
                }
                Take::Wait { position, wake } => {
                    if now >= next_announce {
                        queued = true;
                        leg.queued(position);
                        next_announce = now + g.announce;
                    }
                    let mut until = deadline.min(next_announce).min(now + POLL_EVERY);
                    if let Some(w) = wake {
                        until = until.min(w);
                    }
                    let ended = leg.ended();
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = ended => {}
                    }
                }
            }
        }
    }

    fn dequeue(&self, group: &str, id: u64) {
        let mut st = self.inner.state.lock();
        if let Some(q) = st.queues.get_mut(group) {
            q.retain(|t| t.id != id);
        }
        drop(st);
        self.notify();
    }

    /// The hunt is over: its ticket leaves this node's queue and the cluster's.
    fn leave(&self, group: &str, id: u64, ticket: Option<&SharedTicket>) {
        self.dequeue(group, id);
        if let (Some(sh), Some(t)) = (self.inner.shared.clone(), ticket) {
            // In the background: the caller's outcome does not wait for Redis.
            let (this, group, ticket) = (self.clone(), group.to_owned(), t.id.clone());
            tokio::spawn(async move {
                if let Err(e) = sh.dequeue(group, ticket).await {
                    this.degraded("leaving the queue", &e);
                }
            });
        }
    }

    fn requeue(&self, group: &str, id: u64, priority: i64, since: Instant) {
        let mut st = self.inner.state.lock();
        let q = st.queues.entry(group.to_owned()).or_default();
        if !q.iter().any(|t| t.id == id) {
            q.push(Ticket {
                id,
                priority,
                since,
            });
        }
    }

    /// Takes agents for ticket `id` when it is first in its queue and some are available;
    /// they are marked ringing and the ticket leaves the queue (it comes back, with its
    /// place, if nobody answers).
    fn try_take(
        &self,
        g: &Group,
        strategy: Strategy,
        id: u64,
        tried: &mut HashSet<String>,
        now: Instant,
    ) -> Take {
        let reach = self.reach(g);
        let period = unix_now() as u64 / g.reset_s;
        let mut st = self.inner.state.lock();
        let position = st.position(&g.name, id);
        let wake = st.wake(&reach, now);
        if position > 1 {
            return Take::Wait { position, wake };
        }
        let mut cursor = st.cursors.get(&g.name).copied().unwrap_or(0);
        let picked = st.pick(
            g,
            strategy,
            &reach,
            &HashSet::new(),
            tried,
            &mut cursor,
            (now, period),
        );
        if picked.is_empty() {
            return Take::Wait { position, wake };
        }
        st.cursors.insert(g.name.clone(), cursor);
        if let Some(q) = st.queues.get_mut(&g.name) {
            q.retain(|t| t.id != id);
        }
        Take::Ring(picked)
    }

    /// This node's bookkeeping after a ring: ringing → in call for the winner (one more
    /// answered call), a miss for each agent that let it ring out, and alone a pause after
    /// `max_missed` misses. Returns the agents that missed (in a cluster the misses are
    /// counted, and the pause decided, cluster-wide by `settle_ring`).
    fn after_ring(
        &self,
        g: &Group,
        agents: &[String],
        winner: Option<&str>,
        status: u16,
    ) -> Vec<String> {
        let alone = self.inner.shared.is_none();
        let period = unix_now() as u64 / g.reset_s;
        let mut changes = Vec::new();
        let mut missed = Vec::new();
        {
            let mut st = self.inner.state.lock();
            for agent in agents {
                let Some(a) = st.agents.get_mut(agent) else {
                    continue;
                };
                a.ringing = a.ringing.saturating_sub(1);
                if winner == Some(agent.as_str()) {
                    a.in_call += 1;
                    a.missed = 0;
                    changes.push((agent.clone(), Change::Answered { period }));
                } else if winner.is_none() && matches!(status, 408 | 480) {
                    // Ring-no-answer (the dial's timeout). A loser of ring-all that was
                    // CANCELled because someone else answered has not missed anything.
                    a.missed += 1;
                    missed.push(agent.clone());
                    if alone && g.max_missed > 0 && a.missed >= g.max_missed {
                        tracing::info!(
                            agent = %agent,
                            group = %g.name,
                            missed = a.missed,
                            "agent paused after unanswered calls in a row"
                        );
                        a.missed = 0;
                        changes.push((agent.clone(), Change::Presence(Presence::Paused)));
                    }
                }
            }
        }
        for (agent, change) in changes {
            self.change_record(&agent, change);
        }
        self.notify();
        missed
    }

    async fn call_ended(&self, agent: &str, wrap_up: Duration) {
        {
            let mut st = self.inner.state.lock();
            let Some(a) = st.agents.get_mut(agent) else {
                return;
            };
            a.in_call = a.in_call.saturating_sub(1);
            let until = Instant::now() + wrap_up;
            a.wrap_until = Some(a.wrap_until.map_or(until, |t| t.max(until)));
        }
        self.change_record(agent, Change::Ended { at: unix_now() });
        if let Some(sh) = &self.inner.shared {
            self.wrap_up(sh, agent, wrap_up).await;
        }
        self.notify();
    }

    /// Brings the `strowger_huntgroup_*` series up to date (at each scrape).
    fn refresh_metrics(&self) {
        for v in self.snapshot() {
            let mut by_state: HashMap<&str, i64> = HashMap::new();
            for a in &v.agents {
                *by_state.entry(a.state).or_default() += 1;
            }
            self.inner.metrics.set_group(
                &v.name,
                v.waiting as i64,
                v.longest_wait_s,
                [v.answered, v.abandoned, v.overflowed],
                &by_state,
            );
        }
    }

    /// Registers the `strowger_huntgroup_*` families on `telemetry`, brought up to date
    /// at each scrape.
    pub fn register_metrics(
        &self,
        telemetry: &crate::metrics::Telemetry,
    ) -> Result<(), crate::metrics::Error> {
        self.inner.metrics.register(telemetry)?;
        let groups = self.clone();
        telemetry.on_scrape(move || groups.refresh_metrics());
        Ok(())
    }
}

/// A hunt's ticket in the cluster's queue.
struct SharedTicket {
    /// `<holder>#<local id>`: unique in the cluster.
    id: String,
    /// [`shared::queue_score`] of its priority and arrival.
    score: f64,
}

struct HuntGuard {
    hg: HuntGroups,
    group: String,
    id: u64,
    /// The cluster ticket, when there is a cluster.
    ticket: Option<String>,
    ringing: Vec<String>,
}

impl Drop for HuntGuard {
    fn drop(&mut self) {
        {
            let mut st = self.hg.inner.state.lock();
            if let Some(q) = st.queues.get_mut(&self.group) {
                q.retain(|t| t.id != self.id);
            }
            for agent in &self.ringing {
                if let Some(a) = st.agents.get_mut(agent) {
                    a.ringing = a.ringing.saturating_sub(1);
                }
            }
        }
        if let Some(ticket) = self.ticket.take() {
            self.hg.abandon_shared(self.group.clone(), ticket);
        }
        self.hg.notify();
    }
}

enum Take {
    Ring(Vec<(String, Vec<String>)>),
    Wait {
        position: usize,
        wake: Option<Instant>,
    },
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;
