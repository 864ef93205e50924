//! The hunt across a cluster (`cluster.enabled`): the shared queue decides who goes
//! first, claims decide who gets an agent, and one loop per node keeps its claims alive,
//! publishes its agents' non-group calls and reads the cluster's queues and claims for
//! snapshots and scrapes. Every Redis failure falls back to this node's own view (logged),
//! so a caller is never left waiting on Redis.

use super::shared::{Claim, ClaimKind, SharedError, SharedHunt};
use super::{Change, Group, HuntGroups, Inner, Presence, SharedTicket, Strategy, Take, POLL_EVERY};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A fresh read of the agents' records taking longer is given up (the copy is used).
const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// After a Redis failure, hunts go on with this node's view for this long before they
/// try Redis again (each try may take [`super::shared`]'s 1 s bound).
const DOWN_FOR: Duration = Duration::from_secs(2);
/// At most one warning per this long about Redis failures (the rest at debug level).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Starts the node's cluster loop: every [`POLL_EVERY`] it publishes busy agents and
/// refreshes the cluster view; every third of the lease it renews its claims. It ends with
/// the hunt groups.
pub(super) fn spawn_loop(inner: &Arc<Inner>) {
    let Some(lease) = inner.shared.as_ref().map(|sh| sh.lease()) else {
        return;
    };
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let renew_every = lease / 3;
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            let Some(inner) = weak.upgrade() else { return };
            let hg = HuntGroups { inner };
            let Some(sh) = hg.inner.shared.clone() else {
                return;
            };
            hg.publish_busy(&sh).await;
            if renewed.elapsed() >= renew_every {
                renewed = Instant::now();
                hg.renew(&sh).await;
            }
            hg.refresh_view(&sh).await;
        }
    });
}

impl HuntGroups {
    /// Logs a Redis failure during hunting, rate-limited: the hunt goes on with this
    /// node's own view.
    pub(super) fn degraded(&self, doing: &str, e: &SharedError) {
        let now = Instant::now();
        *self.inner.down_until.lock() = Some(now + DOWN_FOR);
        let loud = {
            let mut last = self.inner.last_warn.lock();
            let loud = last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
            if loud {
                *last = Some(now);
            }
            loud
        };
        if loud {
            tracing::warn!(
                error = %e,
                doing,
                "hunt groups: cluster state unavailable, going on with this node's view"
            );
        } else {
            tracing::debug!(error = %e, doing, "hunt groups: cluster state unavailable");
        }
    }

    /// The shared hunt state, unless there is none or Redis failed a moment ago.
    pub(super) fn shared_up(&self) -> Option<&Arc<dyn SharedHunt>> {
        let down = self
            .inner
            .down_until
            .lock()
            .is_some_and(|t| Instant::now() < t);
        if down {
            None
        } else {
            self.inner.shared.as_ref()
        }
    }

    /// Records (or forgets) a claim we hold, in the held set and the cached view.
    fn hold(&self, agent: &str, value: Option<String>) {
        let mut st = self.inner.state.lock();
        match &value {
            Some(v) => {
                st.held.insert(agent.to_owned(), v.clone());
            }
            None => {
                st.held.remove(agent);
            }
        }
        if let Some(view) = st.view.as_mut() {
            match value {
                Some(v) => {
                    view.claims.insert(agent.to_owned(), v);
                }
                None => {
                    view.claims.remove(agent);
                }
            }
        }
    }

    /// [`HuntGroups::try_take`] across the cluster: the ticket must head the shared queue,
    /// agents claimed anywhere are not available, the round-robin cursor and the agents'
    /// counters are read fresh from Redis, and each pick is claimed before it is rung
    /// (an agent another node won is skipped; ring-all rings those it won).
    pub(super) async fn take_shared(
        &self,
        sh: &Arc<dyn SharedHunt>,
        g: &Group,
        strategy: Strategy,
        id: u64,
        ticket: &SharedTicket,
        tried: &mut HashSet<String>,
    ) -> Take {
        let reach = self.reach(g);
        let now = Instant::now();
        let wake = self.inner.state.lock().wake(&reach, now);
        let position = match sh
            .position(g.name.clone(), ticket.id.clone(), ticket.score)
            .await
        {
            Ok(rank) => rank + 1,
            Err(e) => {
                self.degraded("reading the queue", &e);
                return self.try_take(g, strategy, id, tried, Instant::now());
            }
        };
        if position > 1 {
            return Take::Wait { position, wake };
        }
        let agents: Vec<String> = reach.iter().map(|(a, _, _)| a.clone()).collect();
        let mut blocked = HashSet::new();
        match sh.claims(agents.clone()).await {
            Ok(values) => {
                for (agent, value) in agents.iter().zip(values) {
                    if value.is_some() {
                        blocked.insert(agent.clone());
                    }
                }
            }
            Err(e) => {
                self.degraded("reading agent claims", &e);
                return self.try_take(g, strategy, id, tried, Instant::now());
            }
        }
        if blocked.len() == agents.len() {
            return Take::Wait { position, wake };
        }
        // Least-recent and fewest-calls compare counters other nodes change: read them
        // (and logins, pauses) now rather than from the copy re-read every 2 s.
        match tokio::time::timeout(STORE_TIMEOUT, self.inner.store.load()).await {
            Ok(Ok(records)) => {
                self.merge_records(records);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "hunt groups: re-reading agent state failed"),
            Err(_) => tracing::warn!("hunt groups: re-reading agent state timed out"),
        }
        let mut cursor = 0;
        if strategy == Strategy::RoundRobin {
            cursor = match sh.cursor(g.name.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    self.degraded("reading the round-robin cursor", &e);
                    self.inner
                        .state
                        .lock()
                        .cursors
                        .get(&g.name)
                        .copied()
                        .unwrap_or(0)
                }
            };
        }
        let period = super::unix_now() as u64 / g.reset_s;
        // Each lost claim removes one candidate, so this ends.
        for _ in 0..=reach.len() {
            let picked = self.inner.state.lock().pick(
                g,
                strategy,
                &reach,
                &blocked,
                tried,
                &mut cursor,
                (Instant::now(), period),
            );
            if picked.is_empty() {
                break;
            }
            let mut won = Vec::new();
            for (agent, uris) in picked {
                let value = Claim::new(ClaimKind::Ring, sh.holder(), Some(&ticket.id)).encode();
                match sh.claim(agent.clone(), value.clone(), sh.lease()).await {
                    Ok(true) => {
                        self.hold(&agent, Some(value));
                        won.push((agent, uris));
                    }
                    Ok(false) => {
                        // Another node got there first.
                        if let Some(a) = self.inner.state.lock().agents.get_mut(&agent) {
                            a.ringing = a.ringing.saturating_sub(1);
                        }
                        blocked.insert(agent);
                    }
                    Err(e) => {
                        // Rung unclaimed: better a rare double ring than a caller left
                        // waiting because Redis is away.
                        self.degraded("claiming an agent", &e);
                        won.push((agent, uris));
                    }
                }
            }
            if won.is_empty() {
                continue;
            }
            {
                let mut st = self.inner.state.lock();
                st.cursors.insert(g.name.clone(), cursor);
                if let Some(q) = st.queues.get_mut(&g.name) {
                    q.retain(|t| t.id != id);
                }
            }
            if strategy == Strategy::RoundRobin {
                if let Err(e) = sh.set_cursor(g.name.clone(), cursor).await {
                    self.degraded("saving the round-robin cursor", &e);
                }
            }
            // Out of the queue while it rings, so the next caller can take another agent;
            // it comes back with the same score (its place) if nobody answers.
            if let Err(e) = sh.dequeue(g.name.clone(), ticket.id.clone()).await {
                self.degraded("leaving the queue", &e);
            }
            return Take::Ring(won);
        }
        Take::Wait { position, wake }
    }

    /// The cluster's side of [`HuntGroups::after_ring`]: the winner's claim becomes an
    /// in-call claim, the others are released, misses are counted cluster-wide and an
    /// agent that reached `max_missed` is paused.
    pub(super) async fn settle_ring(
        &self,
        sh: &Arc<dyn SharedHunt>,
        g: &Group,
        agents: &[String],
        winner: Option<&str>,
        missed: &[String],
        ticket: &SharedTicket,
    ) {
        for agent in agents {
            let ours = self.inner.state.lock().held.get(agent).cloned();
            let ours = ours.filter(|v| {
                Claim::parse(v).is_some_and(|c| {
                    c.kind == ClaimKind::Ring && c.ticket.as_deref() == Some(&ticket.id)
                })
            });
            let Some(ours) = ours else {
                continue; // Rung unclaimed (Redis was away).
            };
            if winner == Some(agent.as_str()) {
                let call = Claim::new(ClaimKind::Call, sh.holder(), Some(&ticket.id)).encode();
                match sh
                    .replace(agent.clone(), ours, Some((call.clone(), sh.lease())))
                    .await
                {
                    Ok(true) => self.hold(agent, Some(call)),
                    Ok(false) => {
                        // Our ringing claim lapsed (Redis unreachable past the lease);
                        // take the agent again if it is free.
                        tracing::warn!(agent = %agent, "hunt groups: ringing claim lost before the answer");
                        let got = sh
                            .claim(agent.clone(), call.clone(), sh.lease())
                            .await
                            .unwrap_or(false);
                        self.hold(agent, got.then_some(call));
                    }
                    Err(e) => {
                        self.degraded("marking an agent in call", &e);
                        self.hold(agent, None);
                    }
                }
                self.clear_misses(sh, agent).await;
            } else {
                if let Err(e) = sh.replace(agent.clone(), ours, None).await {
                    self.degraded("releasing an agent", &e);
                }
                self.hold(agent, None);
            }
        }
        for agent in missed {
            let count = match sh.miss(agent.clone()).await {
                Ok(n) => n,
                Err(e) => {
                    self.degraded("counting a missed ring", &e);
                    self.inner
                        .state
                        .lock()
                        .agents
                        .get(agent)
                        .map_or(0, |a| a.missed)
                }
            };
            if g.max_missed > 0 && count >= g.max_missed {
                tracing::info!(
                    agent = %agent,
                    group = %g.name,
                    missed = count,
                    "agent paused after unanswered calls in a row"
                );
                if let Some(a) = self.inner.state.lock().agents.get_mut(agent) {
                    a.missed = 0;
                }
                self.change_record(agent, Change::Presence(Presence::Paused));
                self.clear_misses(sh, agent).await;
            }
        }
        self.notify();
    }

    /// A group call ended: the in-call claim becomes a wrap-up claim lasting `wrap_up`
    /// (or goes, without wrap-up).
    pub(super) async fn wrap_up(&self, sh: &Arc<dyn SharedHunt>, agent: &str, wrap_up: Duration) {
        let ours = self.inner.state.lock().held.get(agent).cloned();
        let Some(ours) =
            ours.filter(|v| Claim::parse(v).is_some_and(|c| c.kind == ClaimKind::Call))
        else {
            return;
        };
        let wrap = (!wrap_up.is_zero()).then(|| {
            (
                Claim::new(ClaimKind::Wrap, sh.holder(), None).encode(),
                wrap_up,
            )
        });
        // Not renewed: it just runs out, on whichever node.
        self.hold(agent, None);
        if let Some((v, _)) = &wrap {
            if let Some(view) = self.inner.state.lock().view.as_mut() {
                view.claims.insert(agent.to_owned(), v.clone());
            }
        }
        if let Err(e) = sh.replace(agent.to_owned(), ours, wrap).await {
            self.degraded("starting an agent's wrap-up", &e);
        }
    }

    pub(super) async fn clear_misses(&self, sh: &Arc<dyn SharedHunt>, agent: &str) {
        if let Err(e) = sh.clear_misses(agent.to_owned()).await {
            self.degraded("clearing missed rings", &e);
        }
        if let Some(view) = self.inner.state.lock().view.as_mut() {
            view.missed.remove(agent);
        }
    }

    /// A hunt dropped half-way: its ticket leaves the cluster's queue and every claim it
    /// holds (ringing, or in call before the call's end was being watched) is released:
    /// nobody would release it otherwise, and we would renew it for ever. In the
    /// background: this runs in a `Drop`.
    pub(super) fn abandon_shared(&self, group: String, ticket: String) {
        let Some(sh) = self.inner.shared.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // No runtime left: the leases will run out.
        };
        let mine: Vec<(String, String)> = {
            let st = self.inner.state.lock();
            st.held
                .iter()
                .filter(|(_, v)| {
                    Claim::parse(v).is_some_and(|c| c.ticket.as_deref() == Some(&ticket))
                })
                .map(|(a, v)| (a.clone(), v.clone()))
                .collect()
        };
        for (agent, _) in &mine {
            self.hold(agent, None);
        }
        let this = self.clone();
        rt.spawn(async move {
            if let Err(e) = sh.dequeue(group, ticket).await {
                this.degraded("leaving the queue", &e);
            }
            for (agent, value) in mine {
                if let Err(e) = sh.replace(agent, value, None).await {
                    this.degraded("releasing an agent", &e);
                }
            }
            this.notify();
        });
    }

    /// Agents on a call through this node that no group call of ours explains (a direct
    /// call, or one rung by another call) get a busy claim, so that other nodes do not
    /// ring them; the claim goes when the call does.
    async fn publish_busy(&self, sh: &Arc<dyn SharedHunt>) {
        if self.inner.directory.read().is_none() {
            return;
        }
        let mut engaged = HashSet::new();
        for g in &self.inner.groups {
            for (agent, _, on_call) in self.reach(g) {
                if on_call {
                    engaged.insert(agent);
                }
            }
        }
        let (take, free): (Vec<String>, Vec<(String, String)>) = {
            let st = self.inner.state.lock();
            let take = engaged
                .iter()
                .filter(|a| !st.held.contains_key(*a))
                .cloned()
                .collect();
            let free = st
                .held
                .iter()
                .filter(|(a, v)| {
                    !engaged.contains(*a)
                        && Claim::parse(v).is_some_and(|c| c.kind == ClaimKind::Busy)
                })
                .map(|(a, v)| (a.clone(), v.clone()))
                .collect();
            (take, free)
        };
        for agent in take {
            let busy = Claim::new(ClaimKind::Busy, sh.holder(), None).encode();
            // NX: a claim already there (a ring or wrap-up of any node) says enough.
            match sh.claim(agent.clone(), busy.clone(), sh.lease()).await {
                Ok(true) => self.hold(&agent, Some(busy)),
                Ok(false) => {}
                Err(e) => self.degraded("marking an agent busy", &e),
            }
        }
        for (agent, value) in free {
            self.hold(&agent, None);
            if let Err(e) = sh.replace(agent, value, None).await {
                self.degraded("releasing a busy agent", &e);
            }
        }
    }

    /// Extends every claim this node holds; forgets those that were lost (expired while
    /// Redis was unreachable, and taken since).
    async fn renew(&self, sh: &Arc<dyn SharedHunt>) {
        let held: Vec<(String, String)> = self
            .inner
            .state
            .lock()
            .held
            .iter()
            .map(|(a, v)| (a.clone(), v.clone()))
            .collect();
        match sh.renew(held.clone()).await {
            Ok(lost) => {
                for agent in lost {
                    tracing::warn!(agent = %agent, "hunt groups: an agent claim of this node was lost");
                    let mut st = self.inner.state.lock();
                    if st.held.get(&agent) == held.iter().find(|(a, _)| *a == agent).map(|(_, v)| v)
                    {
                        st.held.remove(&agent);
                    }
                }
            }
            Err(e) => self.degraded("renewing agent claims", &e),
        }
    }

    /// Reads the cluster's queues, claims and misses for snapshots and scrapes (which
    /// are synchronous and must stay cheap): one round trip per [`POLL_EVERY`].
    async fn refresh_view(&self, sh: &Arc<dyn SharedHunt>) {
        let groups = self.names();
        let agents: Vec<String> = {
            let mut a: Vec<String> = self.inner.state.lock().agents.keys().cloned().collect();
            a.sort();
            a
        };
        let view = match sh.view(groups, agents).await {
            Ok(v) => Some(v),
            Err(e) => {
                // This node's own view until Redis is back.
                self.degraded("reading the cluster view", &e);
                None
            }
        };
        let changed = {
            let mut st = self.inner.state.lock();
            let changed = st.view != view;
            st.view = view;
            changed
        };
        // Claims gone or queues moved: waiting hunts look again now.
        if changed {
            self.notify();
        }
    }
}
