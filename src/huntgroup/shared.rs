//! The cluster-wide part of hunt groups (`cluster.enabled`): the queues, the agent claims
//! and the round-robin cursors every node shares, behind the [`SharedHunt`] port, with its
//! Redis adapter [`RedisSharedHunt`]. The hunting itself (`super::cluster`) only calls the
//! port; the values it stores (claims, queue scores) are encoded and decoded here by pure
//! functions.
//!
//! Redis layout (prefix `strowger:hunt`, beside the agents hash `<prefix>:agents`):
//! - `<prefix>:queue:<group>`: sorted set of waiting tickets, score [`queue_score`]
//!   (priority first, then arrival in Unix ms), member = ticket id (`<holder>#<n>`).
//! - `<prefix>:ticket:<ticket>`: a waiting ticket's lease (PX = the cluster lease), renewed
//!   by its hunt at each look at the queue (at least every 0.5 s). A ticket whose lease
//!   is gone (its node died) is dropped from the queue by whoever reads the queue next.
//! - `<prefix>:claim:<agent>`: who has the agent, a [`Claim`] (`ring|call|busy <holder>
//!   [<ticket>]`, or `wrap <holder>`), set with `SET NX PX` so only one node gets it.
//!   Ringing, in-call and busy claims are renewed every third of the lease by their node;
//!   a wrap-up claim simply expires after `wrap_up`. Released or changed only by a Lua
//!   compare-and-set (only while the value is still ours).
//! - `<prefix>:cursor:<group>`: the round-robin position (a member index).
//! - `<prefix>:missed`: hash, agent → unanswered rings in a row (HINCRBY).
//!
//! The scripts build the ticket-lease key names from the prefix, so the keys must live on
//! one Redis (standalone or Sentinel, not Redis Cluster), as the other shared stores do.

use super::store::BoxFuture;
use super::AgentState;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;

/// A Redis operation that takes longer than this is treated as failed: the hunt falls
/// back to this node's own view rather than keep a caller waiting on Redis.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Priorities are clamped to ±this in a queue score, so that priority × `PRIORITY_STEP`
/// plus a Unix time in ms stays an exact integer in a double (below 2^53).
pub const MAX_PRIORITY: i64 = 400;
/// Room for Unix ms (until the year 2286) under one step of priority.
const PRIORITY_STEP: f64 = 1e13;

/// The sorted-set score of a ticket: lower goes first, so higher priority is lower, and
/// among equals the earlier arrival.
pub fn queue_score(priority: i64, arrival_ms: u64) -> f64 {
    let p = priority.clamp(-MAX_PRIORITY, MAX_PRIORITY) as f64;
    -p * PRIORITY_STEP + (arrival_ms as f64).min(PRIORITY_STEP - 1.0)
}

/// The arrival time (Unix ms) in a [`queue_score`].
pub fn score_arrival(score: f64) -> u64 {
    score.rem_euclid(PRIORITY_STEP) as u64
}

/// What a claim holds an agent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// Being rung by a hunt.
    Ring,
    /// On a call a hunt connected.
    Call,
    /// On a call that is no group's (seen by the node carrying it).
    Busy,
    /// In wrap-up after a group call.
    Wrap,
}

impl ClaimKind {
    fn tag(self) -> &'static str {
        match self {
            ClaimKind::Ring => "ring",
            ClaimKind::Call => "call",
            ClaimKind::Busy => "busy",
            ClaimKind::Wrap => "wrap",
        }
    }

    /// The agent's state while the claim stands.
    pub fn state(self) -> AgentState {
        match self {
            ClaimKind::Ring => AgentState::Ringing,
            ClaimKind::Call | ClaimKind::Busy => AgentState::InCall,
            ClaimKind::Wrap => AgentState::WrapUp,
        }
    }
}

/// The value of `<prefix>:claim:<agent>`: `<kind> <holder>[ <ticket>]`. Node names have
/// no spaces (`cluster.node` is checked), so spaces separate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub kind: ClaimKind,
    /// The node instance holding it ([`SharedHunt::holder`]).
    pub holder: String,
    /// The hunt's ticket (ring and call claims).
    pub ticket: Option<String>,
}

impl Claim {
    pub fn new(kind: ClaimKind, holder: &str, ticket: Option<&str>) -> Claim {
        Claim {
            kind,
            holder: holder.to_owned(),
            ticket: ticket.map(str::to_owned),
        }
    }

    pub fn encode(&self) -> String {
        match &self.ticket {
            Some(t) => format!("{} {} {t}", self.kind.tag(), self.holder),
            None => format!("{} {}", self.kind.tag(), self.holder),
        }
    }

    /// None for a value no node of ours wrote (it then counts as a claim of unknown kind:
    /// see [`claim_state`]).
    pub fn parse(value: &str) -> Option<Claim> {
        let mut parts = value.split(' ');
        let kind = match parts.next()? {
            "ring" => ClaimKind::Ring,
            "call" => ClaimKind::Call,
            "busy" => ClaimKind::Busy,
            "wrap" => ClaimKind::Wrap,
            _ => return None,
        };
        let holder = parts.next().filter(|h| !h.is_empty())?.to_owned();
        let ticket = parts.next().map(str::to_owned);
        if parts.next().is_some() {
            return None;
        }
        Some(Claim {
            kind,
            holder,
            ticket,
        })
    }
}

/// The state an agent shows while some claim value stands: an unreadable value still
/// means the agent is taken (in-call), never that it is free.
pub fn claim_state(value: &str) -> AgentState {
    Claim::parse(value).map_or(AgentState::InCall, |c| c.kind.state())
}

/// One group's queue across the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueView {
    pub waiting: usize,
    /// Arrival (Unix ms) of the longest-waiting ticket.
    pub oldest_ms: Option<u64>,
}

/// What `GET /huntgroups` and the metrics show of the cluster, read in one round trip.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub queues: HashMap<String, QueueView>,
    /// Agent → claim value, for the agents that have one.
    pub claims: HashMap<String, String>,
    /// Agent → unanswered rings in a row.
    pub missed: HashMap<String, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("hunt-group cluster state (redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("hunt-group cluster state (redis): no answer within {0:?}")]
    Timeout(Duration),
}

/// The cluster-wide hunt state. Arguments are owned so that futures need no borrows.
pub trait SharedHunt: Send + Sync + 'static {
    /// This node instance: its node name and a random suffix (unique even if two nodes
    /// were given the same name, or one restarts while its old claims live).
    fn holder(&self) -> &str;
    /// How long a claim or a ticket lives without renewal.
    fn lease(&self) -> Duration;
    /// Puts `ticket` in `group`'s queue with `score` unless it is there, renews its lease,
    /// drops tickets ahead of it whose lease is gone; its 0-based rank.
    fn position(
        &self,
        group: String,
        ticket: String,
        score: f64,
    ) -> BoxFuture<'_, Result<usize, SharedError>>;
    /// Takes `ticket` out of `group`'s queue (served, gone, ringing).
    fn dequeue(&self, group: String, ticket: String) -> BoxFuture<'_, Result<(), SharedError>>;
    /// `SET claim NX PX ttl`: whether we got the agent.
    fn claim(
        &self,
        agent: String,
        value: String,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<bool, SharedError>>;
    /// If the agent's claim is still `ours`: replaces it with `new` (value, ttl), or
    /// deletes it when `new` is None. Whether it was still ours.
    fn replace(
        &self,
        agent: String,
        ours: String,
        new: Option<(String, Duration)>,
    ) -> BoxFuture<'_, Result<bool, SharedError>>;
    /// Extends each (agent, value) claim by the lease while it is still that value;
    /// returns the agents whose claim was no longer ours.
    fn renew(&self, held: Vec<(String, String)>)
        -> BoxFuture<'_, Result<Vec<String>, SharedError>>;
    /// The claim values of `agents`, in order.
    fn claims(
        &self,
        agents: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Option<String>>, SharedError>>;
    /// `group`'s round-robin cursor (0 when never set).
    fn cursor(&self, group: String) -> BoxFuture<'_, Result<usize, SharedError>>;
    fn set_cursor(&self, group: String, cursor: usize) -> BoxFuture<'_, Result<(), SharedError>>;
    /// Counts one more unanswered ring of `agent`; the count in a row.
    fn miss(&self, agent: String) -> BoxFuture<'_, Result<u32, SharedError>>;
    /// The agent answered, or was paused or logged in: its misses start again from 0.
    fn clear_misses(&self, agent: String) -> BoxFuture<'_, Result<(), SharedError>>;
    /// The queues of `groups` (dead tickets dropped), and the claims and misses of
    /// `agents`.
    fn view(
        &self,
        groups: Vec<String>,
        agents: Vec<String>,
    ) -> BoxFuture<'_, Result<ClusterView, SharedError>>;
}

/// KEYS[1] = the queue; ARGV = ticket, score, ticket-key prefix, lease ms.
const POSITION_SCRIPT: &str = r#"
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('SET', ARGV[3] .. ARGV[1], '1', 'PX', ARGV[4])
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if rank > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, rank - 1)) do
    if redis.call('EXISTS', ARGV[3] .. m) == 0 then
      redis.call('ZREM', KEYS[1], m)
      rank = rank - 1
    end
  end
end
return rank
"#;

/// KEYS[1] = the claim; ARGV = ours, new value ('' = delete), ttl ms.
const REPLACE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"#;

/// KEYS = claims; ARGV[1] = lease ms, ARGV[1 + i] = our value of KEYS[i]. Returns the
/// indexes (1-based) no longer ours.
const RENEW_SCRIPT: &str = r#"
local lost = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i + 1] then
    redis.call('PEXPIRE', k, ARGV[1])
  else
    table.insert(lost, i)
  end
end
return lost
"#;

/// KEYS = n queues, then the claims of the agents, then the misses hash; ARGV[1] = n,
/// ARGV[2] = ticket-key prefix, ARGV[3..] = the agents. Returns {{waiting, oldest ms}
/// per queue, claim values, misses}; dead tickets are dropped on the way.
const VIEW_SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local queues = {}
for i = 1, n do
  local all = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  local count, oldest = 0, 0
  for j = 1, #all, 2 do
    if redis.call('EXISTS', ARGV[2] .. all[j]) == 0 then
      redis.call('ZREM', KEYS[i], all[j])
    else
      count = count + 1
      local s = tonumber(all[j + 1])
      local at = s - math.floor(s / 1e13) * 1e13
      if oldest == 0 or at < oldest then oldest = at end
    end
  end
  table.insert(queues, count)
  table.insert(queues, oldest)
end
local agents = #ARGV - 2
local claims, missed = {}, {}
if agents > 0 then
  local ck = {}
  for i = 1, agents do ck[i] = KEYS[n + i] end
  claims = redis.call('MGET', unpack(ck))
  missed = redis.call('HMGET', KEYS[n + agents + 1], unpack(ARGV, 3))
end
return {queues, claims, missed}
"#;

/// The shared hunt state in Redis.
pub struct RedisSharedHunt {
    con: ConnectionManager,
    prefix: String,
    holder: String,
    lease: Duration,
    position: redis::Script,
    replace: redis::Script,
    renew: redis::Script,
    view: redis::Script,
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, SharedError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SharedError::Timeout(OP_TIMEOUT)),
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl RedisSharedHunt {
    /// Connects to `url`; `prefix` as the agents hash's (`strowger:hunt`), `node` this
    /// node's name, `lease` the cluster lease (`cluster.lease_s`).
    pub async fn connect(
        url: &str,
        prefix: &str,
        node: &str,
        lease: Duration,
    ) -> Result<RedisSharedHunt, SharedError> {
        let client = redis::Client::open(url)?;
        // The manager reconnects by itself after a connection loss.
        let con = client.get_connection_manager().await?;
        let node = if node.is_empty() { "node" } else { node };
        Ok(RedisSharedHunt {
            con,
            prefix: prefix.to_owned(),
            holder: format!("{}~{:08x}", node.replace(' ', "_"), rand::random::<u32>()),
            lease: lease.max(Duration::from_secs(1)),
            position: redis::Script::new(POSITION_SCRIPT),
            replace: redis::Script::new(REPLACE_SCRIPT),
            renew: redis::Script::new(RENEW_SCRIPT),
            view: redis::Script::new(VIEW_SCRIPT),
        })
    }

    fn queue_key(&self, group: &str) -> String {
        format!("{}:queue:{group}", self.prefix)
    }

    fn ticket_prefix(&self) -> String {
        format!("{}:ticket:", self.prefix)
    }

    fn claim_key(&self, agent: &str) -> String {
        format!("{}:claim:{agent}", self.prefix)
    }

    fn missed_key(&self) -> String {
        format!("{}:missed", self.prefix)
    }
}

impl SharedHunt for RedisSharedHunt {
    fn holder(&self) -> &str {
        &self.holder
    }

    fn lease(&self) -> Duration {
        self.lease
    }

    fn position(
        &self,
        group: String,
        ticket: String,
        score: f64,
    ) -> BoxFuture<'_, Result<usize, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let rank: i64 = bounded(
                self.position
                    .key(self.queue_key(&group))
                    .arg(&ticket)
                    .arg(score)
                    .arg(self.ticket_prefix())
                    .arg(ms(self.lease))
                    .invoke_async(&mut con),
            )
            .await?;
            Ok(rank.max(0) as usize)
        })
    }

    fn dequeue(&self, group: String, ticket: String) -> BoxFuture<'_, Result<(), SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("ZREM")
                .arg(self.queue_key(&group))
                .arg(&ticket)
                .ignore()
                .cmd("DEL")
                .arg(format!("{}{ticket}", self.ticket_prefix()))
                .ignore();
            bounded(pipe.query_async::<()>(&mut con)).await
        })
    }

    fn claim(
        &self,
        agent: String,
        value: String,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<bool, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let set: Option<String> = bounded(
                redis::cmd("SET")
                    .arg(self.claim_key(&agent))
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms(ttl))
                    .query_async(&mut con),
            )
            .await?;
            Ok(set.is_some())
        })
    }

    fn replace(
        &self,
        agent: String,
        ours: String,
        new: Option<(String, Duration)>,
    ) -> BoxFuture<'_, Result<bool, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let (value, ttl) = new.map_or((String::new(), 1), |(v, t)| (v, ms(t)));
            let done: i64 = bounded(
                self.replace
                    .key(self.claim_key(&agent))
                    .arg(ours)
                    .arg(value)
                    .arg(ttl)
                    .invoke_async(&mut con),
            )
            .await?;
            Ok(done == 1)
        })
    }

    fn renew(
        &self,
        held: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<String>, SharedError>> {
        Box::pin(async move {
            if held.is_empty() {
                return Ok(Vec::new());
            }
            let mut con = self.con.clone();
            let mut inv = self.renew.prepare_invoke();
            inv.arg(ms(self.lease));
            for (agent, value) in &held {
                inv.key(self.claim_key(agent)).arg(value);
            }
            let lost: Vec<usize> = bounded(inv.invoke_async(&mut con)).await?;
            Ok(lost
                .into_iter()
                .filter_map(|i| held.get(i.checked_sub(1)?).map(|(a, _)| a.clone()))
                .collect())
        })
    }

    fn claims(
        &self,
        agents: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Option<String>>, SharedError>> {
        Box::pin(async move {
            if agents.is_empty() {
                return Ok(Vec::new());
            }
            let mut con = self.con.clone();
            let keys: Vec<String> = agents.iter().map(|a| self.claim_key(a)).collect();
            // MGET of one key still answers an array.
            bounded(redis::cmd("MGET").arg(keys).query_async(&mut con)).await
        })
    }

    fn cursor(&self, group: String) -> BoxFuture<'_, Result<usize, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let v: Option<u64> = bounded(
                redis::cmd("GET")
                    .arg(format!("{}:cursor:{group}", self.prefix))
                    .query_async(&mut con),
            )
            .await?;
            Ok(v.unwrap_or(0) as usize)
        })
    }

    fn set_cursor(&self, group: String, cursor: usize) -> BoxFuture<'_, Result<(), SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            bounded(
                redis::cmd("SET")
                    .arg(format!("{}:cursor:{group}", self.prefix))
                    .arg(cursor as u64)
                    .query_async::<()>(&mut con),
            )
            .await
        })
    }

    fn miss(&self, agent: String) -> BoxFuture<'_, Result<u32, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let n: i64 = bounded(
                redis::cmd("HINCRBY")
                    .arg(self.missed_key())
                    .arg(agent)
                    .arg(1)
                    .query_async(&mut con),
            )
            .await?;
            Ok(n.clamp(0, i64::from(u32::MAX)) as u32)
        })
    }

    fn clear_misses(&self, agent: String) -> BoxFuture<'_, Result<(), SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            bounded(
                redis::cmd("HDEL")
                    .arg(self.missed_key())
                    .arg(agent)
                    .query_async::<()>(&mut con),
            )
            .await
        })
    }

    fn view(
        &self,
        groups: Vec<String>,
        agents: Vec<String>,
    ) -> BoxFuture<'_, Result<ClusterView, SharedError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let mut inv = self.view.prepare_invoke();
            for g in &groups {
                inv.key(self.queue_key(g));
            }
            for a in &agents {
                inv.key(self.claim_key(a));
            }
            inv.key(self.missed_key());
            inv.arg(groups.len()).arg(self.ticket_prefix());
            for a in &agents {
                inv.arg(a);
            }
            let (queues, claims, missed): (Vec<i64>, Vec<Option<String>>, Vec<Option<u32>>) =
                bounded(inv.invoke_async(&mut con)).await?;
            let mut view = ClusterView::default();
            for (g, pair) in groups.iter().zip(queues.chunks(2)) {
                let waiting = pair.first().copied().unwrap_or(0).max(0) as usize;
                let oldest = pair.get(1).copied().unwrap_or(0);
                view.queues.insert(
                    g.clone(),
                    QueueView {
                        waiting,
                        oldest_ms: (waiting > 0 && oldest > 0).then_some(oldest as u64),
                    },
                );
            }
            for (a, c) in agents.iter().zip(claims) {
                if let Some(c) = c {
                    view.claims.insert(a.clone(), c);
                }
            }
            for (a, m) in agents.iter().zip(missed) {
                if let Some(m) = m.filter(|m| *m > 0) {
                    view.missed.insert(a.clone(), m);
                }
            }
            Ok(view)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_order_priority_then_arrival_and_keep_the_arrival() {
        let t = 1_700_000_000_123u64;
        let vip = queue_score(5, t + 10_000);
        let old = queue_score(0, t);
        let newer = queue_score(0, t + 1);
        let low = queue_score(-3, t - 60_000);
        assert!(vip < old && old < newer && newer < low);
        for (s, at) in [
            (vip, t + 10_000),
            (old, t),
            (newer, t + 1),
            (low, t - 60_000),
        ] {
            assert_eq!(score_arrival(s), at);
        }
        // Out-of-range priorities are clamped, still ordered, still exact.
        let top = queue_score(i64::MAX, t);
        assert_eq!(top, queue_score(MAX_PRIORITY, t));
        assert_eq!(score_arrival(top), t);
        assert_eq!(score_arrival(queue_score(i64::MIN, t)), t);
        assert!(top < vip);
    }

    #[test]
    fn claims_round_trip_and_strangers_count_as_taken() {
        for c in [
            Claim::new(ClaimKind::Ring, "udp:10.0.0.1:5060~0a0b0c0d", Some("n~1#7")),
            Claim::new(ClaimKind::Call, "n2~ffffffff", Some("n2~ffffffff#1")),
            Claim::new(ClaimKind::Busy, "n3~00000001", None),
            Claim::new(ClaimKind::Wrap, "n3~00000001", None),
        ] {
            assert_eq!(Claim::parse(&c.encode()), Some(c.clone()));
        }
        assert_eq!(claim_state("ring n~1 n~1#2"), AgentState::Ringing);
        assert_eq!(claim_state("call n~1 n~1#2"), AgentState::InCall);
        assert_eq!(claim_state("busy n~1"), AgentState::InCall);
        assert_eq!(claim_state("wrap n~1"), AgentState::WrapUp);
        for odd in ["", "ring", "ring ", "nap n~1", "ring a b c"] {
            assert_eq!(Claim::parse(odd), None, "{odd:?}");
            assert_eq!(claim_state(odd), AgentState::InCall);
        }
    }
}
