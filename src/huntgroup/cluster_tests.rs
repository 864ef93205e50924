//! The hunt across a cluster with in-process legs and a real redis-server: two
//! [`HuntGroups`] on one Redis are two nodes. Real clock (Redis runs in real time); short
//! rings and calls keep each test to a few seconds.

use super::*;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;

/// A redis-server on a free port, killed when dropped.
struct Redis {
    child: Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis() -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (installed by tests/setup-and-run.sh)");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server starts");
        std::thread::sleep(Duration::from_millis(20));
    }
    Redis {
        child,
        url: format!("redis://127.0.0.1:{port}/"),
    }
}

const LEASE: Duration = Duration::from_secs(3);

async fn shared(url: &str, node: &str) -> Arc<RedisSharedHunt> {
    Arc::new(
        RedisSharedHunt::connect(url, "t:hunt", node, LEASE)
            .await
            .unwrap(),
    )
}

/// A node: hunt groups over the shared agents hash and shared hunt state.
async fn node(url: &str, name: &str, group: HuntGroupConfig) -> HuntGroups {
    let mut map = BTreeMap::new();
    map.insert("q".to_owned(), group);
    let store = RedisAgentStore::connect_with_prefix(url, "t:hunt")
        .await
        .unwrap();
    HuntGroups::start_with(
        &map,
        "example.com",
        Arc::new(store),
        Some(shared(url, name).await),
    )
    .await
    .unwrap()
}

fn group(strategy: &str, members: &[&str]) -> HuntGroupConfig {
    HuntGroupConfig {
        strategy: strategy.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        ring_timeout: 5,
        wrap_up: 0,
        max_wait: 20,
        queue_announce: 20,
        ..HuntGroupConfig::default()
    }
}

/// The agents' phones: a target being rung or on a call is busy; ringing a busy one is
/// a double ring (counted). Each answered call is held `hold`, then hung up.
#[derive(Default)]
struct Phones {
    busy: Mutex<HashMap<String, usize>>,
    double: AtomicUsize,
    /// (caller, target) in the order rung.
    rung: Mutex<Vec<(String, String)>>,
}

impl Phones {
    fn start(&self, target: &str) {
        let mut busy = self.busy.lock();
        let n = busy.entry(target.to_owned()).or_default();
        if *n > 0 {
            self.double.fetch_add(1, Ordering::SeqCst);
        }
        *n += 1;
    }
    fn stop(&self, target: &str) {
        if let Some(n) = self.busy.lock().get_mut(target) {
            *n = n.saturating_sub(1);
        }
    }
}

struct Caller {
    name: String,
    phones: Arc<Phones>,
    /// None: never answered (the ring times out).
    answer_after: Option<Duration>,
    hold: Duration,
    positions: Mutex<Vec<usize>>,
    ended: watch::Sender<bool>,
}

impl Caller {
    fn new(name: &str, phones: &Arc<Phones>, answer_after: Option<Duration>) -> Arc<Caller> {
        Caller::holding(name, phones, answer_after, Duration::from_millis(300))
    }

    fn holding(
        name: &str,
        phones: &Arc<Phones>,
        answer_after: Option<Duration>,
        hold: Duration,
    ) -> Arc<Caller> {
        Arc::new(Caller {
            name: name.to_owned(),
            phones: phones.clone(),
            answer_after,
            hold,
            positions: Mutex::new(Vec::new()),
            ended: watch::channel(false).0,
        })
    }
}

impl HuntLeg for Caller {
    fn ring(&self, targets: Vec<String>, timeout: Duration) -> BoxFuture<'static, Rung> {
        let target = targets[0].clone();
        self.phones.start(&target);
        self.phones
            .rung
            .lock()
            .push((self.name.clone(), target.clone()));
        let (phones, answer, hold, ended) = (
            self.phones.clone(),
            self.answer_after,
            self.hold,
            self.ended.clone(),
        );
        Box::pin(async move {
            match answer {
                Some(after) if after < timeout => {
                    tokio::time::sleep(after).await;
                    tokio::spawn(async move {
                        tokio::time::sleep(hold).await;
                        phones.stop(&target);
                        ended.send_replace(true);
                    });
                    Rung {
                        answered: true,
                        status: 200,
                        reason: "OK".into(),
                        winner: Some(0),
                    }
                }
                _ => {
                    tokio::time::sleep(timeout).await;
                    phones.stop(&target);
                    Rung {
                        answered: false,
                        status: 480,
                        reason: "No Answer".into(),
                        winner: None,
                    }
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

fn spawn_hunt(
    hg: &HuntGroups,
    leg: &Arc<Caller>,
) -> tokio::task::JoinHandle<Result<HuntOutcome, HuntError>> {
    let (hg, leg) = (hg.clone(), leg.clone());
    tokio::spawn(async move { hg.hunt("q", HuntOptions::default(), leg).await })
}

const AGENT: &str = "sip:agent@192.0.2.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_is_rung_by_one_node_at_a_time_and_the_other_caller_waits() {
    let r = redis();
    let a = node(&r.url, "a", group("linear", &[AGENT])).await;
    let b = node(&r.url, "b", group("linear", &[AGENT])).await;
    let phones = Arc::new(Phones::default());
    let ca = Caller::new("ca", &phones, Some(Duration::from_millis(200)));
    let cb = Caller::new("cb", &phones, Some(Duration::from_millis(200)));
    let (ta, tb) = (spawn_hunt(&a, &ca), spawn_hunt(&b, &cb));
    let (oa, ob) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    assert!(oa.answered && ob.answered, "{oa:?} {ob:?}");
    assert_eq!(phones.double.load(Ordering::SeqCst), 0, "never rung twice");
    assert_eq!(phones.rung.lock().len(), 2);
    // One of them waited (182, position 1) for the other's call to end.
    assert!(oa.queued ^ ob.queued, "{oa:?} {ob:?}");
    let waited = if oa.queued { oa } else { ob };
    assert!(waited.waited >= 0.5, "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_on_two_nodes_are_served_in_arrival_order() {
    let r = redis();
    let a = node(&r.url, "a", group("linear", &[AGENT])).await;
    let b = node(&r.url, "b", group("linear", &[AGENT])).await;
    let phones = Arc::new(Phones::default());
    let answer = Some(Duration::from_millis(50));
    let first = Caller::holding("first", &phones, answer, Duration::from_millis(1500));
    let t0 = spawn_hunt(&a, &first);
    // The agent is on `first`'s call: c1 (a), c2 (b), c3 (a), c4 (b) queue, in that order.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut tasks = Vec::new();
    let mut legs = Vec::new();
    for (i, hg) in [&a, &b, &a, &b].into_iter().enumerate() {
        let leg = Caller::new(&format!("c{}", i + 1), &phones, answer);
        tasks.push(spawn_hunt(hg, &leg));
        legs.push(leg);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // The cluster's queue as each node shows it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for hg in [&a, &b] {
        let v = &hg.snapshot()[0];
        assert_eq!(v.waiting, 4, "{v:?}");
        assert!(v.longest_wait_s > 0.4, "{v:?}");
        assert_eq!(v.agents[0].state, "in-call", "{v:?}");
    }
    // Their positions across the nodes, told with the first 182.
    for (i, leg) in legs.iter().enumerate() {
        assert_eq!(leg.positions.lock().first(), Some(&(i + 1)), "{}", leg.name);
    }
    assert!(t0.await.unwrap().unwrap().answered);
    for t in tasks {
        assert!(t.await.unwrap().unwrap().answered);
    }
    let order: Vec<String> = phones.rung.lock().iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(order, ["first", "c1", "c2", "c3", "c4"]);
    assert_eq!(phones.double.load(Ordering::SeqCst), 0);
    assert_eq!(a.snapshot()[0].answered + b.snapshot()[0].answered, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_claim_and_ticket_expire_after_the_lease() {
    let r = redis();
    let b = node(&r.url, "b", group("linear", &[AGENT])).await;
    // Node "dead" claimed the agent for ringing and had a caller queued before b's, then
    // died: nothing renews either.
    let dead = shared(&r.url, "dead").await;
    let ticket = format!("{}#1", dead.holder());
    let ring = shared::Claim::new(shared::ClaimKind::Ring, dead.holder(), Some(&ticket));
    assert!(dead
        .claim(AGENT.into(), ring.encode(), dead.lease())
        .await
        .unwrap());
    let score = shared::queue_score(0, unix_ms() - 1000);
    assert_eq!(
        dead.position("q".into(), format!("{}#2", dead.holder()), score)
            .await
            .unwrap(),
        0
    );
    let started = Instant::now();
    let phones = Arc::new(Phones::default());
    let caller = Caller::new("c", &phones, Some(Duration::from_millis(50)));
    let task = spawn_hunt(&b, &caller);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v = &b.snapshot()[0];
    assert_eq!(v.agents[0].state, "ringing", "the dead node's claim: {v:?}");
    assert_eq!(v.waiting, 2, "{v:?}");
    assert_eq!(
        *caller.positions.lock(),
        vec![2],
        "behind the dead node's caller"
    );
    let out = task.await.unwrap().unwrap();
    assert!(out.answered && out.queued, "{out:?}");
    let waited = started.elapsed();
    assert!(
        waited >= LEASE - Duration::from_millis(400) && waited < LEASE + Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_fewest_calls_follow_the_whole_clusters_history() {
    let r = redis();
    let agents = ["sip:a1@192.0.2.1", "sip:a2@192.0.2.1", "sip:a3@192.0.2.1"];
    let a = node(&r.url, "a", group("round-robin", &agents)).await;
    let b = node(&r.url, "b", group("round-robin", &agents)).await;
    let phones = Arc::new(Phones::default());
    for i in 0..6 {
        let hg = if i % 2 == 0 { &a } else { &b };
        let leg = Caller::holding(
            &format!("c{i}"),
            &phones,
            Some(Duration::ZERO),
            Duration::ZERO,
        );
        assert!(spawn_hunt(hg, &leg).await.unwrap().unwrap().answered);
        // The call is over before the next one (a busy agent would be skipped).
        let _ = leg.ended().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let order: Vec<String> = phones.rung.lock().iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(
        order,
        [0, 1, 2, 0, 1, 2].map(|i| agents[i]),
        "in turn across nodes"
    );

    // fewest-calls on a fresh pair: a1 answered twice through node a, a2 once through
    // node b; node b's next call goes to a3, then a2, never a1.
    let r = redis();
    let a = node(&r.url, "a", group("linear", &agents)).await;
    let b = node(&r.url, "b", group("fewest-calls", &agents)).await;
    let phones = Arc::new(Phones::default());
    for hg in [&a, &a] {
        let leg = Caller::new("x", &phones, Some(Duration::ZERO));
        assert!(spawn_hunt(hg, &leg).await.unwrap().unwrap().answered);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    b.set_state(agents[0], "paused").await.unwrap();
    let leg = Caller::new("y", &phones, Some(Duration::ZERO));
    assert!(spawn_hunt(&b, &leg).await.unwrap().unwrap().answered);
    b.set_state(agents[0], "available").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let leg = Caller::new("z", &phones, Some(Duration::ZERO));
    assert!(spawn_hunt(&b, &leg).await.unwrap().unwrap().answered);
    let order: Vec<String> = phones.rung.lock().iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(order, [agents[0], agents[0], agents[1], agents[2]]);
    // Both nodes count a1's two calls (and the pause did not lose them).
    let counts = |hg: &HuntGroups| -> Vec<u64> {
        hg.agents("q").unwrap().iter().map(|v| v.answered).collect()
    };
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen = counts(&a);
        if seen == [2, 1, 1] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, [2, 1, 1]);
    assert_eq!(counts(&b), [2, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_count_across_nodes_and_wrap_up_is_seen_everywhere() {
    let r = redis();
    let mut g = group("linear", &[AGENT]);
    g.ring_timeout = 1;
    g.max_missed = 2;
    // One ring per hunt.
    g.max_wait = 1;
    let a = node(&r.url, "a", g.clone()).await;
    let b = node(&r.url, "b", g).await;
    let phones = Arc::new(Phones::default());
    // One miss on each node: the second pauses the agent, on every node.
    for hg in [&a, &b] {
        let leg = Caller::new("nobody answers", &phones, None);
        let out = spawn_hunt(hg, &leg).await.unwrap().unwrap();
        assert!(out.overflow && !out.answered, "{out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(phones.rung.lock().len(), 2);
    let mut presence = "";
    for _ in 0..30 {
        presence = a.agents("q").unwrap()[0].presence;
        if presence == "paused" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(presence, "paused", "node a sees node b's pause");

    // Wrap-up after a call on node a holds the agent on node b too.
    let mut g = group("linear", &[AGENT]);
    g.wrap_up = 2;
    let r = redis();
    let a = node(&r.url, "a", g.clone()).await;
    let b = node(&r.url, "b", g).await;
    let leg = Caller::new("call", &phones, Some(Duration::ZERO));
    assert!(spawn_hunt(&a, &leg).await.unwrap().unwrap().answered);
    let _ = leg.ended().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(b.agents("q").unwrap()[0].state, "wrap-up");
    let started = Instant::now();
    let leg = Caller::new("after", &phones, Some(Duration::ZERO));
    assert!(spawn_hunt(&b, &leg).await.unwrap().unwrap().answered);
    assert!(started.elapsed() >= Duration::from_millis(600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hunt_goes_on_without_redis() {
    let r = redis();
    let a = node(&r.url, "a", group("linear", &[AGENT])).await;
    drop(r);
    let phones = Arc::new(Phones::default());
    let leg = Caller::new("c", &phones, Some(Duration::ZERO));
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(15), spawn_hunt(&a, &leg))
        .await
        .expect("no hang")
        .unwrap()
        .unwrap();
    assert!(out.answered, "{out:?}");
    // The first Redis call fails (at most its 1 s bound), then this node's view.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.snapshot()[0].waiting, 0);
}

/// Node-local calls as the B2BUA would report them.
#[derive(Default)]
struct Calls(Mutex<HashSet<String>>);

impl Directory for Calls {
    fn contacts(&self, _aor: &str) -> Vec<String> {
        Vec::new()
    }
    fn on_call(&self, uris: &[String]) -> bool {
        let calls = self.0.lock();
        uris.iter().any(|u| calls.contains(u))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_direct_call_through_one_node_is_not_rung_by_another() {
    let r = redis();
    let a = node(&r.url, "a", group("linear", &[AGENT])).await;
    let b = node(&r.url, "b", group("linear", &[AGENT])).await;
    let calls = Arc::new(Calls::default());
    a.set_directory(calls.clone());
    calls.0.lock().insert(AGENT.to_owned());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        b.agents("q").unwrap()[0].state,
        "in-call",
        "node a's busy claim"
    );
    let phones = Arc::new(Phones::default());
    let leg = Caller::new("c", &phones, Some(Duration::ZERO));
    let task = spawn_hunt(&b, &leg);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        phones.rung.lock().is_empty(),
        "not rung while busy on node a"
    );
    assert_eq!(*leg.positions.lock(), vec![1]);
    calls.0.lock().clear();
    let hung_up = Instant::now();
    let out = task.await.unwrap().unwrap();
    assert!(out.answered && out.queued, "{out:?}");
    assert!(hung_up.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hunt_dropped_half_way_releases_its_claim_and_its_ticket() {
    let r = redis();
    let mut g = group("linear", &[AGENT]);
    g.ring_timeout = 30;
    let a = node(&r.url, "a", g.clone()).await;
    let b = node(&r.url, "b", g).await;
    let phones = Arc::new(Phones::default());
    let ringing = Caller::new("never answered", &phones, None);
    let task = spawn_hunt(&a, &ringing);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = Caller::new("waiting", &phones, Some(Duration::ZERO));
    let waiting_task = spawn_hunt(&b, &waiting);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(b.agents("q").unwrap()[0].state, "ringing");
    task.abort();
    let _ = task.await;
    // Released at once, not after the lease: node b gets the agent within its polling.
    let aborted = Instant::now();
    let out = waiting_task.await.unwrap().unwrap();
    assert!(out.answered, "{out:?}");
    assert!(aborted.elapsed() < Duration::from_millis(1500));
}
