//! Unit tests of the hunt loop with an in-process leg (no SIP): queue order, ring-no-answer,
//! wrap-up, abandonment, overflow; on tokio's paused clock where timing matters.

use super::*;
use std::collections::BTreeMap;

/// An in-memory store (the real ones are tested in tests/huntgroup.rs).
#[derive(Default)]
struct MemStore(Mutex<HashMap<String, AgentRecord>>);

impl AgentStore for MemStore {
    fn load(&self) -> BoxFuture<'_, Result<Vec<AgentRecord>, AgentStoreError>> {
        let all = self.0.lock().values().cloned().collect();
        Box::pin(async move { Ok(all) })
    }
    fn save(&self, record: AgentRecord) -> BoxFuture<'_, Result<(), AgentStoreError>> {
        self.0.lock().insert(record.agent.clone(), record);
        Box::pin(async { Ok(()) })
    }
}

/// A call as the hunt sees it: rings are answered at once by the first target unless
/// `answer` is false; records the queue positions it was told; ends when told to.
struct Leg {
    name: &'static str,
    answer: bool,
    log: Arc<Mutex<Vec<&'static str>>>,
    positions: Mutex<Vec<usize>>,
    ended: watch::Sender<bool>,
}

impl Leg {
    fn new(name: &'static str, answer: bool, log: &Arc<Mutex<Vec<&'static str>>>) -> Arc<Leg> {
        Arc::new(Leg {
            name,
            answer,
            log: log.clone(),
            positions: Mutex::new(Vec::new()),
            ended: watch::channel(false).0,
        })
    }
    fn hang_up(&self) {
        self.ended.send_replace(true);
    }
}

impl HuntLeg for Leg {
    fn ring(&self, _targets: Vec<String>, timeout: Duration) -> BoxFuture<'static, Rung> {
        self.log.lock().push(self.name);
        let answer = self.answer;
        Box::pin(async move {
            if answer {
                Rung {
                    answered: true,
                    status: 200,
                    reason: "OK".into(),
                    winner: Some(0),
                }
            } else {
                tokio::time::sleep(timeout).await;
                Rung {
                    answered: false,
                    status: 480,
                    reason: "No Answer".into(),
                    winner: None,
                }
            }
        })
    }
    fn queued(&self, position: usize) {
        self.positions.lock().push(position);
    }
    fn is_gone(&self) -> bool {
        *self.ended.borrow()
    }
    fn ended(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.ended.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|e| *e).await;
        })
    }
}

async fn groups(g: HuntGroupConfig) -> HuntGroups {
    let mut map = BTreeMap::new();
    map.insert("q".to_owned(), g);
    HuntGroups::start(&map, "example.com", Arc::new(MemStore::default()))
        .await
        .unwrap()
}

fn one_agent() -> HuntGroupConfig {
    HuntGroupConfig {
        strategy: "linear".into(),
        members: vec!["sip:a@192.0.2.1".into()],
        wrap_up: 0,
        max_wait: 600,
        queue_announce: 20,
        ..HuntGroupConfig::default()
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_longest_waiting_caller_of_the_highest_priority_goes_first() {
    let hg = groups(one_agent()).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let first = Leg::new("first", true, &log);
    let out = hg
        .hunt("q", HuntOptions::default(), first.clone())
        .await
        .unwrap();
    assert!(out.answered && !out.queued);
    assert_eq!(out.agent.as_deref(), Some("sip:a@192.0.2.1"));

    // The agent is on that call: three callers queue, the last with a higher priority.
    let mut tasks = Vec::new();
    let mut legs = Vec::new();
    for (name, priority) in [("old", 0), ("newer", 0), ("vip", 5)] {
        let leg = Leg::new(name, true, &log);
        legs.push(leg.clone());
        let hg = hg.clone();
        tasks.push(tokio::spawn(async move {
            hg.hunt(
                "q",
                HuntOptions {
                    priority,
                    ..HuntOptions::default()
                },
                leg,
            )
            .await
            .unwrap()
        }));
        settle().await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    settle().await;
    assert_eq!(hg.snapshot()[0].waiting, 3);
    assert_eq!(*legs[0].positions.lock(), vec![1]);
    assert_eq!(*legs[1].positions.lock(), vec![2]);
    assert_eq!(*legs[2].positions.lock(), vec![1], "vip is told position 1");
    assert_eq!(hg.agents("q").unwrap()[0].state, "in-call");

    // Each call that ends frees the agent for the next caller in order.
    first.hang_up();
    let vip = tasks.pop().unwrap().await.unwrap();
    assert!(vip.answered && vip.queued);
    legs[2].hang_up();
    let old = tasks.remove(0).await.unwrap();
    assert!(old.answered);
    legs[0].hang_up();
    let newer = tasks.remove(0).await.unwrap();
    assert!(newer.answered);
    assert_eq!(*log.lock(), vec!["first", "vip", "old", "newer"]);
    assert_eq!(hg.snapshot()[0].answered, 4);
}

#[tokio::test(start_paused = true)]
async fn queued_callers_hear_182_again_and_overflow_after_max_wait() {
    let mut g = one_agent();
    g.queue_announce = 5;
    g.max_wait = 12;
    let hg = groups(g).await;
    hg.set_state("sip:a@192.0.2.1", "logout").await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let leg = Leg::new("caller", true, &log);
    let out = hg
        .hunt("q", HuntOptions::default(), leg.clone())
        .await
        .unwrap();
    assert!(out.overflow && out.queued && !out.answered);
    assert!((12.0..12.5).contains(&out.waited), "{}", out.waited);
    // At 0, 5 and 10 s.
    assert_eq!(*leg.positions.lock(), vec![1, 1, 1]);
    assert!(log.lock().is_empty(), "a logged-out agent is never rung");
    assert_eq!(hg.snapshot()[0].overflowed, 1);
    // The per-call max_wait wins over the group's.
    let out = hg
        .hunt(
            "q",
            HuntOptions {
                max_wait: Some(Duration::from_secs(2)),
                ..HuntOptions::default()
            },
            leg.clone(),
        )
        .await
        .unwrap();
    assert!(out.overflow && out.waited < 2.5);
}

#[tokio::test(start_paused = true)]
async fn a_caller_who_leaves_while_queued_is_abandoned() {
    let hg = groups(one_agent()).await;
    hg.set_state("sip:a@192.0.2.1", "paused").await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let leg = Leg::new("caller", true, &log);
    let task = {
        let (hg, leg) = (hg.clone(), leg.clone());
        tokio::spawn(async move { hg.hunt("q", HuntOptions::default(), leg).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    leg.hang_up();
    let out = task.await.unwrap();
    assert!(out.abandoned && !out.answered);
    assert_eq!(out.status, 487);
    let snap = &hg.snapshot()[0];
    assert_eq!((snap.abandoned, snap.waiting), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn ring_no_answer_pauses_after_max_missed_and_unknowns_are_errors() {
    let mut g = one_agent();
    g.max_missed = 2;
    g.ring_timeout = 1;
    g.max_wait = 30;
    let hg = groups(g).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let leg = Leg::new("caller", false, &log);
    let out = hg.hunt("q", HuntOptions::default(), leg).await.unwrap();
    // Rung twice (missed twice), then paused: the caller waits until max_wait.
    assert_eq!(log.lock().len(), 2);
    assert!(out.overflow);
    assert_eq!((out.status, out.reason.as_str()), (480, "No Answer"));
    assert_eq!(hg.agents("q").unwrap()[0].state, "paused");
    assert!(matches!(
        hg.set_state("nobody", "paused").await,
        Err(HuntError::UnknownAgent(_))
    ));
    assert!(matches!(
        hg.set_state("sip:a@192.0.2.1", "asleep").await,
        Err(HuntError::UnknownState(_))
    ));
    assert!(matches!(hg.agents("nope"), Err(HuntError::UnknownGroup(_))));
    let leg = Leg::new("x", true, &log);
    assert!(matches!(
        hg.hunt("nope", HuntOptions::default(), leg).await,
        Err(HuntError::UnknownGroup(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_hunt_dropped_half_way_releases_its_agent_and_its_place() {
    let mut g = one_agent();
    g.ring_timeout = 30;
    let hg = groups(g).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let leg = Leg::new("never answered", false, &log);
    let task = {
        let hg = hg.clone();
        tokio::spawn(async move { hg.hunt("q", HuntOptions::default(), leg).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hg.agents("q").unwrap()[0].state, "ringing");
    task.abort();
    let _ = task.await;
    assert_eq!(hg.agents("q").unwrap()[0].state, "available");
    assert_eq!(hg.snapshot()[0].waiting, 0);
}
