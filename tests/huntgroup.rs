//! Hunt groups end to end: SIPp agents (UAS instances on their own ports) and SIPp or raw
//! UDP callers through the server, a Lua dial plan calling `call:hunt`, the admin API for
//! states and counters; the agent-state stores against a real SQLite file and a real
//! redis-server. Who answered a call is read from the caller's log (each agent's SDP names
//! its port). Short timers (ring 1-5 s, wrap-up 0-2 s) keep the whole file near a minute.

mod common;
#[path = "common/hunt.rs"]
mod hunt;

use common::redis::start_redis;
use common::sipp::{self, received};
use common::*;
use hunt::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use strowger::config::Config;
use strowger::huntgroup::HuntGroupConfig;
use strowger::huntgroup::{AgentRecord, AgentStore, Presence, RedisAgentStore, SqliteAgentStore};
use strowger::registrar::RegistrarStore;

const LIMIT: Duration = Duration::from_secs(40);

/// The dial plan: `direct` dials `direct_target` (a call from no group), `pause` is a
/// feature code pausing `feature_agent` from the script, anything else hunts the group of
/// that name; a hunt that fails is rejected 486 with what the script learnt.
fn plan(dir: &Path, direct_target: &str, feature_agent: &str) -> PathBuf {
    let path = dir.join("plan.lua");
    std::fs::write(
        &path,
        format!(
            r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "direct" then
    call:dial("{direct_target}", {{ timeout = 10 }})
  elseif u == "pause" then
    huntgroup.set_state("{feature_agent}", "paused")
    call:reject(403, "agent paused")
  elseif u == "pause-in-coroutine" then
    -- Only the hook's own coroutine can wait for the store: refused, nothing changed.
    local ok, err = pcall(coroutine.wrap(function()
      return huntgroup.set_state("{feature_agent}", "paused")
    end))
    call:reject(403, ok and "paused" or
      (string.find(err, "cannot wait here", 1, true) and "refused" or err))
  else
    local r = call:hunt(u, {{ priority = 0 }})
    if not r.answered then
      call:reject(486, string.format("hunt %d overflow=%s queued=%s agents=%d",
        r.status, tostring(r.overflow), tostring(r.queued), #huntgroup.agents(u)))
    end
  end
end
"#
        ),
    )
    .unwrap();
    path
}

fn group(strategy: &str, members: &[String]) -> HuntGroupConfig {
    HuntGroupConfig {
        strategy: strategy.into(),
        members: members.to_vec(),
        ring_timeout: 5,
        max_wait: 30,
        wrap_up: 0,
        ..HuntGroupConfig::default()
    }
}

fn config(dir: &Path, groups: Vec<(&str, HuntGroupConfig)>, direct: &str, feature: &str) -> Config {
    let mut c = test_config();
    // `POST /huntgroups/agent` without a token (loopback, the operator's opt-in).
    c.http.open_local_writes = true;
    c.script.path = plan(dir, direct, feature).display().to_string();
    for (name, g) in groups {
        c.huntgroups.insert(name.into(), g);
    }
    c
}

async fn server(dir: &Path, groups: Vec<(&str, HuntGroupConfig)>) -> TestServer {
    start_with(config(dir, groups, "sip:nobody@127.0.0.1:9", "none")).await
}

fn count(answers: &[u16], port: u16) -> usize {
    answers.iter().filter(|p| **p == port).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_three_agents_a_third_each() {
    let dir = sipp::workdir("hunt-rr");
    let agents: Vec<Peer> = (1..=3).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let s = server(&dir, vec![("rr", group("round-robin", &members))]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "rr", 9, 50).await;
    assert_eq!(answers.len(), 9, "{answers:?}");
    let ports: Vec<u16> = agents.iter().map(|a| a.port).collect();
    for p in &ports {
        assert_eq!(count(&answers, *p), 3, "each a third: {answers:?}");
    }
    // Resuming after the last agent tried: strictly in turn.
    let expected: Vec<u16> = (0..9).map(|i| ports[i % 3]).collect();
    assert_eq!(answers, expected);
    let g = group_json(&s, "rr").await;
    assert_eq!(g["answered"], 9);
}

async fn group_json(s: &TestServer, name: &str) -> serde_json::Value {
    hunt::group(s.handle.admin_addr(), name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_tries_the_first_free_agent_first_and_skips_a_busy_one() {
    let dir = sipp::workdir("hunt-linear");
    let agents: Vec<Peer> = (1..=3).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let s = start_with(config(
        &dir,
        vec![("lin", group("linear", &members))],
        &members[0],
        "none",
    ))
    .await;
    let answers = sequential_calls(&dir, "caller1", s.udp, "lin", 4, 50).await;
    assert_eq!(answers, vec![agents[0].port; 4]);

    // Agent 1 on a call that is not from the group (a direct dial): busy, so skipped.
    let direct = sipp(
        &dir,
        "direct",
        "hunt_caller.xml",
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "direct", "-m", "1", "-d", "3000"],
    );
    let admin = s.handle.admin_addr();
    let agent1 = members[0].clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let agent1 = agent1.clone();
            async move { agent_state(admin, "lin", &agent1).await == "in-call" }
        })
        .await,
        "agent 1 shows in-call during its direct call"
    );
    let answers = sequential_calls(&dir, "caller2", s.udp, "lin", 1, 50).await;
    assert_eq!(answers, vec![agents[1].port], "busy agent 1 skipped");
    direct.success(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_being_rung_by_another_call_is_skipped() {
    let dir = sipp::workdir("hunt-ringing");
    // Agent 1 lets a call ring 3 s before answering.
    let slow = agent(&dir, "a1", 3000);
    let fast = agent(&dir, "a2", 0);
    let members = vec![slow.uri(), fast.uri()];
    let s = start_with(config(
        &dir,
        vec![("lin", group("linear", &members))],
        &members[0],
        "none",
    ))
    .await;
    let direct = sipp(
        &dir,
        "direct",
        "hunt_caller.xml",
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "direct", "-m", "1", "-d", "200"],
    );
    let admin = s.handle.admin_addr();
    let agent1 = members[0].clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            let agent1 = agent1.clone();
            async move { agent_state(admin, "lin", &agent1).await == "in-call" }
        })
        .await,
        "agent 1 counts as busy while a direct call rings it"
    );
    let answers = sequential_calls(&dir, "caller", s.udp, "lin", 1, 50).await;
    assert_eq!(answers, vec![fast.port], "the ringing agent 1 is skipped");
    direct.success(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recent_picks_the_longest_idle_and_fewest_calls_the_least_loaded() {
    let dir = sipp::workdir("hunt-idle");
    let agents: Vec<Peer> = (1..=3).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let p: Vec<u16> = agents.iter().map(|a| a.port).collect();
    let s = server(
        &dir,
        vec![
            ("lin", group("linear", &members)),
            ("lr", group("least-recent", &members)),
            ("fc", group("fewest-calls", &members)),
        ],
    )
    .await;
    // Agent 1 takes one call through the linear group: it is now the most recently busy.
    let first = sequential_calls(&dir, "c1", s.udp, "lin", 1, 50).await;
    assert_eq!(first, vec![p[0]]);
    // Least-recent: agents 2 and 3 never had a call (idle longest, in list order), then 1.
    let lr = sequential_calls(&dir, "c2", s.udp, "lr", 3, 50).await;
    assert_eq!(lr, vec![p[1], p[2], p[0]], "least-recent order");
    // Answered so far: 1 → 2 calls, 2 → 1, 3 → 1. Fewest-calls: 2 (tie with 3, the first
    // listed wins), then 3, then all have 2: the first listed, agent 1.
    let fc = sequential_calls(&dir, "c3", s.udp, "fc", 3, 50).await;
    assert_eq!(fc, vec![p[1], p[2], p[0]], "fewest-calls order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_random_follows_the_weights() {
    let dir = sipp::workdir("hunt-weighted");
    let agents: Vec<Peer> = (1..=2).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let mut g = group("weighted", &members);
    g.weights = vec![3, 1];
    let s = server(&dir, vec![("w", g)]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "w", 40, 0).await;
    assert_eq!(answers.len(), 40);
    // Expected share of agent 1: 3/4. Tolerance ±0.2 (about three standard deviations of
    // a binomial share over 40 calls, sqrt(0.75*0.25/40) = 0.068).
    let share = count(&answers, agents[0].port) as f64 / 40.0;
    assert!(
        (share - 0.75).abs() <= 0.2,
        "agent 1 answered {share:.2} of the calls, expected 0.75 ± 0.2: {answers:?}"
    );
    assert_eq!(
        count(&answers, agents[0].port) + count(&answers, agents[1].port),
        40
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_calls_over_every_agent() {
    let dir = sipp::workdir("hunt-random");
    let agents: Vec<Peer> = (1..=3).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let s = server(&dir, vec![("r", group("random", &members))]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "r", 30, 0).await;
    assert_eq!(answers.len(), 30);
    // Expected 10 each; 2..=19 is more than three standard deviations (2.6) either side.
    for a in &agents {
        let n = count(&answers, a.port);
        assert!(
            (2..=19).contains(&n),
            "agent {} got {n}: {answers:?}",
            a.port
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_all_connects_the_first_to_answer_and_cancels_the_rest() {
    let dir = sipp::workdir("hunt-ringall");
    // Agent 1 rings until CANCELled (its scenario fails without the CANCEL); agent 2
    // answers after half a second.
    let a1_port = sipp::free_udp_port();
    let a1 = sipp(
        &dir,
        "a1",
        "uas_ring_cancel.xml",
        a1_port,
        None,
        &["-m", "1"],
    );
    let a2 = agent(&dir, "a2", 500);
    let members = vec![format!("sip:agent@127.0.0.1:{a1_port}"), a2.uri()];
    let s = server(&dir, vec![("all", group("ring-all", &members))]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "all", 1, 100).await;
    assert_eq!(answers, vec![a2.port]);
    let seen = a1.success(LIMIT).await;
    let got = received(&seen);
    assert!(
        got.contains(&"CANCEL".to_owned()),
        "loser got CANCEL: {got:?}"
    );
    // Not a miss: a loser of ring-all is not paused or counted.
    let g = group_json(&s, "all").await;
    assert_eq!(g["agents"][0]["missed"], 0, "{g}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_no_answer_skips_to_the_next_and_pauses_after_misses() {
    let dir = sipp::workdir("hunt-rna");
    let a1_port = sipp::free_udp_port();
    // Agent 1 never answers: rung twice (then paused), CANCELled both times.
    let a1 = sipp(
        &dir,
        "a1",
        "uas_ring_cancel.xml",
        a1_port,
        None,
        &["-m", "2"],
    );
    let a2 = agent(&dir, "a2", 0);
    let a1_uri = format!("sip:agent@127.0.0.1:{a1_port}");
    let members = vec![a1_uri.clone(), a2.uri()];
    let mut g = group("linear", &members);
    g.ring_timeout = 1;
    g.max_missed = 2;
    let s = server(&dir, vec![("lin", g)]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "lin", 3, 50).await;
    assert_eq!(answers, vec![a2.port; 3]);
    let seen = a1.success(LIMIT).await;
    let invites = received(&seen).iter().filter(|k| *k == "INVITE").count();
    assert_eq!(invites, 2, "agent 1 rung twice, then paused");
    let admin = s.handle.admin_addr();
    assert_eq!(agent_state(admin, "lin", &a1_uri).await, "paused");
    // Logged back in from the admin API.
    let (status, body) = set_agent(admin, &a1_uri, "available").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(agent_state(admin, "lin", &a1_uri).await, "available");
    let (status, _) = set_agent(admin, "sip:nobody@example.com", "paused").await;
    assert_eq!(status, 404);
    let (status, _) = set_agent(admin, &a1_uri, "asleep").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_up_is_respected() {
    let dir = sipp::workdir("hunt-wrap");
    let agents: Vec<Peer> = (1..=2).map(|i| agent(&dir, &format!("a{i}"), 0)).collect();
    let members: Vec<String> = agents.iter().map(Peer::uri).collect();
    let mut g = group("linear", &members);
    g.wrap_up = 2;
    let s = server(&dir, vec![("lin", g)]).await;
    let admin = s.handle.admin_addr();
    let answers = sequential_calls(&dir, "c1", s.udp, "lin", 2, 50).await;
    assert_eq!(
        answers,
        vec![agents[0].port, agents[1].port],
        "agent 1 in wrap-up"
    );
    assert_eq!(agent_state(admin, "lin", &members[0]).await, "wrap-up");
    let m0 = members[0].clone();
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(4), || {
            let m0 = m0.clone();
            async move { agent_state(admin, "lin", &m0).await == "available" }
        })
        .await
    );
    assert!(started.elapsed() > Duration::from_millis(1000));
    let answers = sequential_calls(&dir, "c2", s.udp, "lin", 1, 50).await;
    assert_eq!(answers, vec![agents[0].port], "agent 1 back after wrap-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_caller_gets_182_and_connects_when_an_agent_frees_up() {
    let dir = sipp::workdir("hunt-queue");
    let a1 = agent(&dir, "a1", 0);
    let s = server(&dir, vec![("q", group("linear", &[a1.uri()]))]).await;
    let admin = s.handle.admin_addr();
    let first = sipp(
        &dir,
        "first",
        "hunt_caller.xml",
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "q", "-m", "1", "-d", "2500"],
    );
    let uri = a1.uri();
    assert!(
        eventually(Duration::from_secs(5), || {
            let uri = uri.clone();
            async move { agent_state(admin, "q", &uri).await == "in-call" }
        })
        .await
    );
    let second = sipp(
        &dir,
        "second",
        "hunt_caller_queued.xml",
        sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "q", "-m", "1", "-d", "100"],
    );
    assert!(
        eventually(Duration::from_secs(3), || async move {
            hunt::group(admin, "q").await["waiting"] == 1
        })
        .await,
        "the second caller waits in the queue"
    );
    first.success(LIMIT).await;
    let seen = second.success(LIMIT).await;
    let queued = seen
        .iter()
        .find(|m| !m.sent && m.kind() == "182")
        .expect("182 Queued");
    assert_eq!(queued.header("X-Queue-Position"), Some("1"));
    assert_eq!(
        queued.header("Warning"),
        Some("399 strowger \"queue position 1\"")
    );
    assert_eq!(answered_by(&seen), vec![a1.port]);
    let g = hunt::group(admin, "q").await;
    assert_eq!(g["answered"], 2);
    assert_eq!(g["waiting"], 0);
}

/// A raw UDP caller: INVITE to `user` at the server.
struct RawCaller {
    peer: UdpPeer,
    branch: String,
    call_id: String,
    ruri: String,
}

impl RawCaller {
    async fn invite(server: std::net::SocketAddr, user: &str) -> RawCaller {
        let peer = UdpPeer::bind("127.0.0.1").await;
        let c = RawCaller {
            branch: format!("z9hG4bK{}", unique("q")),
            call_id: unique("hunt-raw"),
            ruri: format!("sip:{user}@{server}"),
            peer,
        };
        let msg = c.request("INVITE", "Content-Type: application/sdp\r\n", "v=0\r\n");
        c.peer.send(server, msg.as_bytes()).await;
        c
    }

    fn request(&self, method: &str, extra: &str, body: &str) -> String {
        format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch={branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:caller@example.com>;tag=raw1\r\nTo: <{ruri}>\r\n\
             Call-ID: {cid}\r\nCSeq: 1 {method}\r\nContact: <sip:caller@{addr}>\r\n{extra}\
             Content-Length: {len}\r\n\r\n{body}",
            ruri = self.ruri,
            addr = self.peer.addr,
            branch = self.branch,
            cid = self.call_id,
            len = body.len(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_queued_is_counted_as_abandoned() {
    let dir = sipp::workdir("hunt-abandon");
    let agent_uri = format!("sip:agent@127.0.0.1:{}", sipp::free_udp_port());
    let mut g = group("linear", std::slice::from_ref(&agent_uri));
    g.queue_announce = 1;
    let s = server(&dir, vec![("q", g)]).await;
    let admin = s.handle.admin_addr();
    assert_eq!(set_agent(admin, &agent_uri, "logout").await.0, 200);
    assert_eq!(agent_state(admin, "q", &agent_uri).await, "logged-out");

    let caller = RawCaller::invite(s.udp, "q").await;
    // 182 at once, and again after queue_announce (1 s): the INVITE stays pending.
    let mut queued = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while queued.len() < 2 && tokio::time::Instant::now() < deadline {
        if let Some(m) = caller.peer.recv(Duration::from_millis(500)).await {
            assert!(status(&m) < 200, "no final answer while queued: {m}");
            if status(&m) == 182 {
                queued.push(m);
            }
        }
    }
    assert_eq!(queued.len(), 2, "182 repeated while queued");
    assert_eq!(header(&queued[0], "X-Queue-Position"), Some("1"));
    assert_eq!(reason(&queued[0]), "Queued");
    assert_eq!(hunt::group(admin, "q").await["waiting"], 1);

    let cancel = caller.request("CANCEL", "", "");
    caller.peer.send(s.udp, cancel.as_bytes()).await;
    let mut finals = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while finals.len() < 2 && tokio::time::Instant::now() < deadline {
        if let Some(m) = caller.peer.recv(Duration::from_millis(500)).await {
            if status(&m) >= 200 {
                finals.push(m);
            }
        }
    }
    let codes: Vec<(u16, Option<&str>)> = finals
        .iter()
        .map(|m| (status(m), header(m, "CSeq")))
        .collect();
    assert!(codes.contains(&(200, Some("1 CANCEL"))), "{codes:?}");
    assert!(codes.contains(&(487, Some("1 INVITE"))), "{codes:?}");
    // The call answers the CANCEL and the INVITE at once; the hunt (on the Lua thread)
    // counts the abandoned caller when it sees the call end, a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut g = hunt::group(admin, "q").await;
    while g["abandoned"] != 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        g = hunt::group(admin, "q").await;
    }
    assert_eq!(g["abandoned"], 1, "{g}");
    assert_eq!(g["waiting"], 0, "{g}");
    let metrics = strowger::admin::get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("strowger_huntgroup_abandoned_total{group=\"q\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("strowger_huntgroup_agents{group=\"q\",state=\"logged-out\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_after_max_wait_reaches_the_script() {
    let dir = sipp::workdir("hunt-overflow");
    let agent_uri = format!("sip:agent@127.0.0.1:{}", sipp::free_udp_port());
    let mut g = group("linear", std::slice::from_ref(&agent_uri));
    g.max_wait = 1;
    let s = start_with(config(
        &dir,
        vec![("ov", g)],
        "sip:x@127.0.0.1:9",
        &agent_uri,
    ))
    .await;
    let admin = s.handle.admin_addr();
    let wrapped = RawCaller::invite(s.udp, "pause-in-coroutine").await;
    let answer = wrapped.peer.recv_final(WAIT).await.expect("answer");
    assert_eq!(
        (status(&answer), reason(&answer)),
        (403, "refused"),
        "{answer}"
    );
    assert_ne!(agent_state(admin, "ov", &agent_uri).await, "paused");
    // The feature code pauses the only agent from the dial plan (huntgroup.set_state).
    let pause = RawCaller::invite(s.udp, "pause").await;
    let answer = pause.peer.recv_final(WAIT).await.expect("answer");
    assert_eq!(status(&answer), 403, "{answer}");
    assert_eq!(agent_state(admin, "ov", &agent_uri).await, "paused");

    let started = std::time::Instant::now();
    let caller = RawCaller::invite(s.udp, "ov").await;
    let mut saw_182 = false;
    let mut last = None;
    while let Some(m) = caller.peer.recv(Duration::from_secs(3)).await {
        if status(&m) == 182 {
            saw_182 = true;
        }
        if status(&m) >= 200 {
            last = Some(m);
            break;
        }
    }
    let last = last.expect("a final answer after max_wait");
    assert!(saw_182);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(status(&last), 486, "{last}");
    assert_eq!(
        reason(&last),
        "hunt 480 overflow=true queued=true agents=1",
        "the script saw the overflow"
    );
    assert_eq!(hunt::group(admin, "ov").await["overflowed"], 1);
}

fn persistent_config(dir: &Path, members: &[String]) -> Config {
    let mut c = config(
        dir,
        vec![("support", group("ring-all", members))],
        "sip:x@127.0.0.1:9",
        "none",
    );
    c.storage.dir = dir.join("store").display().to_string();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_state_survives_a_restart() {
    let dir = sipp::workdir("hunt-restart");
    let members = vec!["1001".to_owned(), "sip:agent@127.0.0.1:9".to_owned()];
    let s = start_with(persistent_config(&dir, &members)).await;
    let admin = s.handle.admin_addr();
    assert_eq!(set_agent(admin, "1001", "pause").await.0, 200);
    assert_eq!(set_agent(admin, &members[1], "logout").await.0, 200);
    s.handle.shutdown(Duration::from_millis(100)).await;

    let s = start_with(persistent_config(&dir, &members)).await;
    let admin = s.handle.admin_addr();
    assert_eq!(agent_state(admin, "support", "1001").await, "paused");
    assert_eq!(
        agent_state(admin, "support", &members[1]).await,
        "logged-out"
    );
    assert!(dir.join("store/huntgroups.sqlite").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shares_agent_state_between_nodes() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = sipp::workdir("hunt-redis");
    let members = vec!["2001".to_owned(), "2002".to_owned()];
    let node = |d: &str| {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        let mut c = persistent_config(&dir.join(d), &members);
        c.registrar.store = RegistrarStore::Redis;
        c.redis.url = redis.url();
        c
    };
    let n1 = start_with(node("n1")).await;
    let n2 = start_with(node("n2")).await;
    assert_eq!(
        set_agent(n1.handle.admin_addr(), "2001", "paused").await.0,
        200
    );
    let a2 = n2.handle.admin_addr();
    assert!(
        eventually(Duration::from_secs(6), || async move {
            agent_state(a2, "support", "2001").await == "paused"
        })
        .await,
        "node 2 sees node 1's pause"
    );
    n2.handle.shutdown(Duration::from_millis(100)).await;
    let n2 = start_with(node("n2")).await;
    assert_eq!(
        agent_state(n2.handle.admin_addr(), "support", "2001").await,
        "paused"
    );
    assert_eq!(
        agent_state(n2.handle.admin_addr(), "support", "2002").await,
        "available"
    );
}

/// A node of a cluster on `redis_url` (its own directory, plan and store), lease 3 s.
fn cluster_node(dir: &Path, name: &str, redis_url: &str, members: &[String]) -> Config {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut c = config(
        &d,
        vec![("q", group("linear", members))],
        "sip:x@127.0.0.1:9",
        "none",
    );
    c.cluster.enabled = true;
    c.cluster.node = name.into();
    c.cluster.lease_s = 3;
    c.redis.url = redis_url.into();
    c
}

/// A caller holding its call `hold_ms` once answered; 182 optional.
fn caller(dir: &Path, name: &str, node: &TestServer, scenario: &str, hold_ms: u64) -> Peer {
    sipp(
        dir,
        name,
        scenario,
        sipp::free_udp_port(),
        Some(node.udp),
        &["-s", "q", "-m", "1", "-d", &hold_ms.to_string()],
    )
}

fn got_182(seen: &[sipp::SeenMessage]) -> bool {
    seen.iter().any(|m| !m.sent && m.kind() == "182")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rings_an_agent_from_one_node_at_a_time() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = sipp::workdir("hunt-cluster-one");
    // Rings 0.5 s before answering: two nodes ringing at once would overlap.
    let a1 = agent(&dir, "a1", 500);
    let members = [a1.uri()];
    let n1 = start_with(cluster_node(&dir, "n1", &redis.url(), &members)).await;
    let n2 = start_with(cluster_node(&dir, "n2", &redis.url(), &members)).await;
    let c1 = caller(&dir, "c1", &n1, "hunt_caller.xml", 800);
    let c2 = caller(&dir, "c2", &n2, "hunt_caller.xml", 800);
    let (s1, s2) = (c1.success(LIMIT).await, c2.success(LIMIT).await);
    assert_eq!(answered_by(&s1), vec![a1.port]);
    assert_eq!(answered_by(&s2), vec![a1.port]);
    assert!(
        got_182(&s1) ^ got_182(&s2),
        "exactly one caller queued while the other's call went on"
    );
    let seen = sipp::read_messages(&a1.messages);
    assert_eq!(offered_from(&seen).len(), 2, "{:?}", offered_from(&seen));
    assert_eq!(
        overlapping_calls(&seen),
        0,
        "the agent was never offered two calls at once"
    );
    let mut answered = 0;
    for n in [&n1, &n2] {
        answered += group_json(n, "q").await["answered"].as_u64().unwrap();
    }
    assert_eq!(answered, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_serves_callers_of_both_nodes_first_come_first_served() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = sipp::workdir("hunt-cluster-fifo");
    let a1 = agent(&dir, "a1", 0);
    let members = [a1.uri()];
    let n1 = start_with(cluster_node(&dir, "n1", &redis.url(), &members)).await;
    let n2 = start_with(cluster_node(&dir, "n2", &redis.url(), &members)).await;
    let (m1, m2) = (n1.handle.admin_addr(), n2.handle.admin_addr());
    let first = caller(&dir, "first", &n1, "hunt_caller.xml", 2500);
    let uri = a1.uri();
    assert!(
        eventually(Duration::from_secs(5), || {
            let uri = uri.clone();
            async move { agent_state(m2, "q", &uri).await == "in-call" }
        })
        .await,
        "node 2 sees the agent on node 1's call"
    );
    // Queued alternately on the two nodes, 300 ms apart.
    let mut queued = Vec::new();
    for (i, node) in [&n2, &n1, &n2].into_iter().enumerate() {
        queued.push(caller(
            &dir,
            &format!("q{}", i + 1),
            node,
            "hunt_caller_queued.xml",
            300,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for m in [m1, m2] {
        assert!(
            eventually(Duration::from_secs(2), || async move {
                hunt::group(m, "q").await["waiting"] == 3
            })
            .await,
            "every node shows the cluster's queue: {}",
            hunt::group(m, "q").await
        );
    }
    let metrics = strowger::admin::get(m1, "/metrics").await.unwrap();
    assert!(
        metrics.contains("strowger_huntgroup_waiting{group=\"q\"} 3"),
        "{metrics}"
    );
    let g = hunt::group(m1, "q").await;
    assert!(g["longest_wait_s"].as_f64().unwrap() >= 0.5, "{g}");
    first.success(LIMIT).await;
    let mut seen = Vec::new();
    for q in queued {
        let port = q.port;
        let s = q.success(LIMIT).await;
        let position = s
            .iter()
            .find(|m| !m.sent && m.kind() == "182")
            .and_then(|m| m.header("X-Queue-Position").map(str::to_owned));
        seen.push((port, position));
    }
    let positions: Vec<Option<String>> = seen.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(
        positions,
        [Some("1".into()), Some("2".into()), Some("3".into())],
        "positions in the cluster's queue"
    );
    // The agent was offered the calls in arrival order, whichever node they came through.
    let offered = offered_from(&sipp::read_messages(&a1.messages));
    assert_eq!(offered.len(), 4, "{offered:?}");
    for (i, (port, _)) in seen.iter().enumerate() {
        assert!(
            offered[i + 1].contains(&format!(":{port}")),
            "call {} from the caller on port {port}: {offered:?}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_gone_nodes_claim_expires_after_the_lease() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = sipp::workdir("hunt-cluster-lease");
    let a1 = agent(&dir, "a1", 0);
    let members = [a1.uri()];
    // Node 1 reaches Redis through a relay that the test cuts: from then on it can
    // neither renew nor release its claim, as if it had died.
    let relay = Relay::start(redis.port).await;
    let n1 = start_with(cluster_node(&dir, "n1", &relay.url(), &members)).await;
    let n2 = start_with(cluster_node(&dir, "n2", &redis.url(), &members)).await;
    let m2 = n2.handle.admin_addr();
    let c1 = caller(&dir, "c1", &n1, "hunt_caller.xml", 15_000);
    let uri = a1.uri();
    assert!(
        eventually(Duration::from_secs(5), || {
            let uri = uri.clone();
            async move { agent_state(m2, "q", &uri).await == "in-call" }
        })
        .await
    );
    relay.cut().await;
    let cut = std::time::Instant::now();
    drop(n1);
    let c2 = caller(&dir, "c2", &n2, "hunt_caller_queued.xml", 100);
    let seen = c2.success(LIMIT).await;
    let waited = cut.elapsed();
    assert_eq!(answered_by(&seen), vec![a1.port]);
    // The claim was renewed at most a third of the lease (1 s) before the cut and lives
    // a lease (3 s) from its last renewal; then node 2 looks within 0.5 s.
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    drop(c1);
}

/// The same store suite on both stores: an unknown agent reads as nothing, a saved record
/// reads back whole, a second save replaces it.
async fn store_suite(store: &dyn AgentStore) {
    assert!(store.load().await.unwrap().is_empty());
    let mut rec = AgentRecord {
        agent: "sip:agent@127.0.0.1:5071".into(),
        presence: Presence::Paused,
        answered: 4,
        period: 20_000,
        last_end: 1_700_000_000.5,
    };
    store.save(rec.clone()).await.unwrap();
    store
        .save(AgentRecord {
            agent: "1001".into(),
            presence: Presence::LoggedOut,
            answered: 0,
            period: 0,
            last_end: 0.0,
        })
        .await
        .unwrap();
    rec.presence = Presence::Available;
    rec.answered = 5;
    store.save(rec.clone()).await.unwrap();
    let all = store.load().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].agent, "1001");
    assert_eq!(all[0].presence, Presence::LoggedOut);
    assert_eq!(all[1], rec);
}

#[tokio::test]
async fn sqlite_agent_store() {
    let dir = sipp::workdir("hunt-store");
    store_suite(&SqliteAgentStore::open(&dir).unwrap()).await;
    // And again after reopening the file.
    let again = SqliteAgentStore::open(&dir).unwrap();
    assert_eq!(again.load().await.unwrap().len(), 2);
}

#[tokio::test]
async fn redis_agent_store() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let store = RedisAgentStore::connect_with_prefix(&redis.url(), "test:hunt")
        .await
        .unwrap();
    store_suite(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_members_are_rung_at_their_registered_contacts() {
    let dir = sipp::workdir("hunt-ext");
    let a1 = agent(&dir, "a1", 0);
    let s = server(&dir, vec![("ext", group("linear", &["3001".to_owned()]))]).await;
    let admin = s.handle.admin_addr();
    // Not registered: nobody to ring, so the caller would wait; register the agent's phone.
    let peer = UdpPeer::bind("127.0.0.1").await;
    let contact = format!("Contact: <sip:3001@127.0.0.1:{}>;expires=300\r\n", a1.port);
    let reg = request(
        "REGISTER",
        "sip:strowger.test",
        peer.addr,
        "UDP",
        &unique("reg"),
        &contact,
        "",
    )
    .replace("<sip:bob@strowger.test>", "<sip:3001@strowger.test>");
    peer.send(s.udp, reg.as_bytes()).await;
    let r = peer.recv_final(WAIT).await.expect("REGISTER answered");
    assert_eq!(status(&r), 200, "{r}");
    let answers = sequential_calls(&dir, "caller", s.udp, "ext", 2, 50).await;
    assert_eq!(answers, vec![a1.port; 2]);
    assert_eq!(hunt::group(admin, "ext").await["answered"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huntgroup_endpoints_need_the_bearer_token() {
    let dir = sipp::workdir("hunt-token");
    let mut c = config(
        &dir,
        vec![("support", group("linear", &["1001".to_owned()]))],
        "sip:x@127.0.0.1:9",
        "none",
    );
    c.http.token = "s3cret-token".into();
    let s = start_with(c).await;
    let admin = s.handle.admin_addr();
    use hyper::Method;
    let r = strowger::admin::send(admin, Method::GET, "/huntgroups", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = strowger::admin::send(admin, Method::GET, "/huntgroups", Some("wrong"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = strowger::admin::send(admin, Method::POST, "/huntgroups/agent", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = strowger::admin::send(admin, Method::GET, "/huntgroups", Some("s3cret-token"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(body[0]["name"], "support");
    assert_eq!(body[0]["strategy"], "linear");
    assert_eq!(body[0]["agents"][0]["agent"], "1001");
    assert_eq!(body[0]["agents"][0]["state"], "available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_all_acks_and_byes_a_second_2xx() {
    let dir = sipp::workdir("hunt-2xx");
    // Both agents answer at once with no 1xx, so neither can be CANCELled first: one 200
    // wins, the other is a second 2xx (each scenario fails without its ACK and BYE).
    let ports = [sipp::free_udp_port(), sipp::free_udp_port()];
    let agents: Vec<Peer> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            sipp(
                &dir,
                &format!("a{i}"),
                "hunt_agent_2xx.xml",
                *p,
                None,
                &["-m", "1"],
            )
        })
        .collect();
    let members: Vec<String> = ports
        .iter()
        .map(|p| format!("sip:agent@127.0.0.1:{p}"))
        .collect();
    let s = server(&dir, vec![("all", group("ring-all", &members))]).await;
    let answers = sequential_calls(&dir, "caller", s.udp, "all", 1, 300).await;
    assert_eq!(
        answers.len(),
        1,
        "the caller is connected once: {answers:?}"
    );
    assert!(ports.contains(&answers[0]));
    for a in agents {
        let got = received(&a.success(LIMIT).await);
        assert_eq!(
            got,
            vec!["INVITE", "ACK", "BYE"],
            "each 2xx ACKed, then BYEd"
        );
    }
    let g = group_json(&s, "all").await;
    assert_eq!(g["answered"], 1);
}
