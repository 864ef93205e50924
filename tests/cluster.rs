//! Issue 18: a cluster behind a SIP load balancer. The reference deployment of `deploy/`
//! runs here on loopback: Debian's Kamailio with the dispatcher module in front (the
//! repository's `deploy/kamailio.cfg`, only its three `#!substdef` lines rewritten),
//! probing two Strowger nodes (the real binary, `[cluster] enabled = true`) that share one
//! redis-server. Callers (SIPp) call Kamailio; the nodes' dial plan sends each call to a
//! SIPp callee.
//!
//! Skipped, saying why, when `kamailio` or `redis-server` is not installed (the test
//! command installs both).

mod common;

use common::eventually;
use common::sipp::{self, free_udp_port};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds between the dispatcher's OPTIONS probes in these tests.
const PROBE_S: u64 = 1;
/// The nodes' liveness lease.
const LEASE_S: u64 = 3;
const TOKEN: &str = common::CLUSTER_TOKEN;

/// A child the test started, stopped by its PID when dropped.
struct Proc(Option<Child>);

impl Proc {
    /// SIGTERM, and the exit status once the process has stopped (None if it is still
    /// running after `limit`: then it is killed).
    fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// SIGKILL: the node dies without a word to anyone.
    fn kill_9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Kamailio: its main process forks the workers, and SIGKILL of the main one would leave
/// them running. Started in a process group of its own; stopped with SIGTERM (Kamailio
/// then stops its workers), and SIGKILL to that group if it is still there after 2 s.
struct Kamailio(Child);

impl Drop for Kamailio {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The group is the one this test made for its Kamailio (process_group(0)).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One Strowger node: the binary with its own config, data directory and call records.
struct Node {
    name: String,
    sip: SocketAddr,
    http: SocketAddr,
    records: PathBuf,
    log: PathBuf,
    config: PathBuf,
    proc: Proc,
}

impl Node {
    fn start(dir: &Path, name: &str, redis: &str, plan: &Path, extra: &str) -> Node {
        let f = common::cluster_node_files(dir, name, redis, plan, LEASE_S, extra);
        let mut node = Node {
            name: name.into(),
            sip: f.sip,
            http: f.http,
            records: f.records,
            log: f.log,
            config: f.config,
            proc: Proc(None),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        self.proc = Proc(Some(common::spawn_strowger(&self.config, &self.log)));
    }

    /// Lines of the node's call-record file (one per ended call).
    fn records(&self) -> Vec<serde_json::Value> {
        common::read_records(&self.records)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http(self.http, "GET", path).await
    }

    /// Calls up on this node (`GET /calls`).
    async fn calls(&self) -> usize {
        let (code, body) = self.get("/calls").await;
        if code != 200 {
            return 0;
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 exchange with an admin endpoint (bearer token sent); (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return (0, String::new());
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Kamailio from `deploy/kamailio.cfg`, listening on a free port, the nodes as set 1.
struct Balancer {
    addr: SocketAddr,
    log: PathBuf,
    _proc: Kamailio,
}

impl Balancer {
    fn start(dir: &Path, nodes: &[&Node]) -> Balancer {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let kdir = dir.join("kamailio");
        std::fs::create_dir_all(&kdir).unwrap();
        let list = kdir.join("dispatcher.list");
        let mut text = String::new();
        for n in nodes {
            text.push_str(&format!("1 sip:{} 0 0\n", n.sip));
        }
        std::fs::write(&list, text).unwrap();
        let cfg = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kamailio.cfg"),
        )
        .unwrap();
        let mut rewritten = 0;
        let cfg: String = cfg
            .lines()
            .map(|l| {
                let new = if l.starts_with("#!substdef \"!LB_LISTEN!") {
                    format!("#!substdef \"!LB_LISTEN!udp:{addr}!g\"")
                } else if l.starts_with("#!substdef \"!DISPATCHER_LIST!") {
                    format!("#!substdef \"!DISPATCHER_LIST!{}!g\"", list.display())
                } else if l.starts_with("#!substdef \"!PROBE_INTERVAL!") {
                    format!("#!substdef \"!PROBE_INTERVAL!{PROBE_S}!g\"")
                } else {
                    return format!("{l}\n");
                };
                rewritten += 1;
                format!("{new}\n")
            })
            .collect();
        assert_eq!(
            rewritten, 3,
            "deploy/kamailio.cfg has its three #!substdef lines"
        );
        let path = kdir.join("kamailio.cfg");
        std::fs::write(&path, cfg).unwrap();
        let log = kdir.join("kamailio.log");
        let err = std::fs::File::create(&log).unwrap();
        // -D: stay in the foreground (its PID is ours to stop); -E: log to stderr.
        let child = Command::new("kamailio")
            .arg("-f")
            .arg(&path)
            .args(["-D", "-E", "-m", "64", "-M", "8"])
            .arg("-Y")
            .arg(&kdir)
            .arg("-w")
            .arg(&kdir)
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("kamailio starts");
        Balancer {
            addr,
            log,
            _proc: Kamailio(child),
        }
    }
}

/// The cluster of one test: Redis, two nodes, Kamailio in front, a callee.
struct Cluster {
    dir: PathBuf,
    _redis: common::redis::RedisServer,
    redis_url: String,
    nodes: Vec<Node>,
    lb: Balancer,
}

/// Everything the cluster needs, or why the test cannot run here.
fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = ["kamailio", "redis-server", "sipp"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// A dial plan: `reg-<name>` rings the phones registered as `<reg-name>@strowger.test`,
/// `hunt-<group>` hunts the group, a number N rings the callee on 127.0.0.1:N (each SIPp
/// callee of a test has its own port).
fn write_plan(dir: &Path) -> PathBuf {
    let plan = dir.join("plan.lua");
    std::fs::write(
        &plan,
        r#"function on_invite(call)
  local user = call.ruri.user
  if user:sub(1, 4) == "reg-" then
    local phones = registrar.lookup("sip:" .. user .. "@strowger.test")
    if #phones == 0 then return call:reject(404, "Not registered") end
    local r = call:dial(phones, { timeout = 10 })
    if not r.answered then call:reject(r.status, r.reason) end
    return
  end
  if user:sub(1, 5) == "hunt-" then
    local r = call:hunt(user:sub(6))
    if not r.answered then call:reject(r.status, r.reason) end
    return
  end
  local r = call:dial("sip:callee@127.0.0.1:" .. user, { timeout = 10 })
  if not r.answered then call:reject(r.status, r.reason) end
end
"#,
    )
    .unwrap();
    plan
}

impl Cluster {
    async fn start(tag: &str, extra: &str) -> Option<Cluster> {
        if let Some(m) = missing_tools() {
            eprintln!("skipped: {m} not installed (tests/setup-and-run.sh installs them)");
            return None;
        }
        let dir = sipp::workdir(tag);
        let redis = common::redis::start_redis().expect("redis-server starts");
        let plan = write_plan(&dir);
        let a = Node::start(&dir, "node-a", &redis.url(), &plan, extra);
        let b = Node::start(&dir, "node-b", &redis.url(), &plan, extra);
        for n in [&a, &b] {
            let up = eventually(Duration::from_secs(10), || async {
                n.get("/healthz").await.0 == 200
            })
            .await;
            assert!(up, "{} did not start:\n{}", n.name, n.log_text());
        }
        let lb = Balancer::start(&dir, &[&a, &b]);
        let cluster = Cluster {
            dir,
            redis_url: redis.url(),
            _redis: redis,
            nodes: vec![a, b],
            lb,
        };
        // The dispatcher has probed both nodes (OPTIONS answered 200) when calls work on
        // both: wait for two probe rounds.
        tokio::time::sleep(Duration::from_secs(2 * PROBE_S + 1)).await;
        Some(cluster)
    }

    fn kamailio_log(&self) -> String {
        std::fs::read_to_string(&self.lb.log).unwrap_or_default()
    }

    /// `calls` calls of `hold_ms` each from SIPp's uac through the balancer, answered by
    /// SIPp's uas; panics (with the logs) unless every call completed.
    async fn calls(&self, name: &str, calls: usize, hold_ms: u64) {
        let callee = free_udp_port();
        let uas = sipp::start(
            &self.dir,
            &format!("{name}-uas"),
            Path::new("uas_answer.xml"),
            callee,
            None,
            &["-m", &calls.to_string()],
        );
        let uac = sipp::start(
            &self.dir,
            &format!("{name}-uac"),
            Path::new("uac_call_routed.xml"),
            free_udp_port(),
            Some(self.lb.addr),
            &[
                "-m",
                &calls.to_string(),
                "-r",
                "10",
                "-d",
                &hold_ms.to_string(),
                "-s",
                &callee.to_string(),
            ],
        );
        let limit = Duration::from_secs(20 + calls as u64 / 5);
        uac.expect_success(limit).await;
        uas.expect_success(limit).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_the_nodes_and_a_drained_node_gets_none() {
    let Some(mut c) = Cluster::start("cluster-drain", "").await else {
        return;
    };
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // Round-robin over both nodes.
    c.calls("spread", 10, 100).await;
    let (ra, rb) = (a.records().len(), b.records().len());
    assert_eq!(ra + rb, 10, "every call has one record");
    assert!(
        ra >= 3 && rb >= 3,
        "calls spread over both nodes: {ra} on {}, {rb} on {}",
        a.name,
        b.name
    );

    // A long call up on node A before it is drained.
    let callee = free_udp_port();
    let uas = sipp::start(
        &c.dir,
        "long-uas",
        Path::new("uas_answer.xml"),
        callee,
        None,
        &[],
    );
    // Sent to node A directly: which node a call lands on is the balancer's choice.
    let long = sipp::start(
        &c.dir,
        "long-uac",
        Path::new("uac_call.xml"),
        free_udp_port(),
        Some(a.sip),
        &["-d", "4000", "-s", &callee.to_string()],
    );
    assert!(
        eventually(Duration::from_secs(5), || async { a.calls().await == 1 }).await,
        "the long call is up on {}",
        a.name
    );

    // Drain node A: its readiness and its answer to the dispatcher's probe turn 503.
    let (code, body) = http(a.http, "POST", "/drain").await;
    assert_eq!(code, 200, "POST /drain: {body}");
    assert_eq!(a.get("/readyz").await.0, 503, "/readyz of a drained node");
    let probe = common::UdpPeer::bind("127.0.0.1").await;
    let options = common::request(
        "OPTIONS",
        &format!("sip:{}", a.sip),
        probe.addr,
        "UDP",
        &common::unique("probe"),
        "",
        "",
    );
    probe.send(a.sip, options.as_bytes()).await;
    let answer = probe
        .recv_final(Duration::from_secs(2))
        .await
        .unwrap_or_default();
    assert_eq!(
        common::status(&answer),
        503,
        "a drained node answers OPTIONS 503"
    );
    // The dispatcher sees it at its next probe.
    tokio::time::sleep(Duration::from_secs(2 * PROBE_S + 1)).await;

    let before_a = a.records().len();
    c.calls("after-drain", 6, 100).await;
    assert_eq!(
        b.records().len(),
        rb + 6,
        "every new call went to the node not drained; kamailio log {}:\n{}",
        c.lb.log.display(),
        c.kamailio_log()
    );

    // The drained node's own call carried on to its normal end (the caller's BYE).
    long.expect_success(Duration::from_secs(15)).await;
    uas.expect_success(Duration::from_secs(15)).await;
    let records = a.records();
    assert_eq!(
        records.len(),
        before_a + 1,
        "the drained node recorded its call"
    );
    let last = records.last().unwrap();
    assert_eq!(last["final_status"], 200, "{last}");
    assert_eq!(last["hangup_by"], "caller", "{last}");

    // Stopped after its last call, the drained node loses nothing: a clean exit, every
    // record written, and it has left the cluster (no survivor will wait for its lease).
    let mut a_proc = std::mem::replace(&mut c.nodes[0].proc, Proc(None));
    let status = a_proc.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the drained node stops cleanly: {status:?}\n{}",
        c.nodes[0].log_text()
    );
    assert_eq!(c.nodes[0].records().len(), before_a + 1);
    let mut con = redis::Client::open(c.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("strowger:cluster:nodes")
        .query_async(&mut con)
        .await
        .unwrap();
    members.sort();
    assert_eq!(members, ["node-b"], "the stopped node left the cluster");
    let calls_left: u64 = redis::cmd("HLEN")
        .arg("strowger:cluster:calls:node-a")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        calls_left, 0,
        "no call of the stopped node left to take over"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_call_is_ended_by_a_survivor_and_new_calls_go_to_it() {
    let Some(mut c) = Cluster::start("cluster-crash", "").await else {
        return;
    };
    let callee = free_udp_port();
    // The callee and the caller both wait for a BYE (neither hangs up).
    let uas = sipp::start(
        &c.dir,
        "crash-uas",
        Path::new("uas_answer.xml"),
        callee,
        None,
        &[],
    );
    let uac = sipp::start(
        &c.dir,
        "crash-uac",
        Path::new("uac_wait_bye_routed.xml"),
        free_udp_port(),
        Some(c.lb.addr),
        &["-s", &callee.to_string()],
    );
    let mut up_on = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while up_on.is_none() && Instant::now() < deadline {
        for (i, n) in c.nodes.iter().enumerate() {
            if n.calls().await == 1 {
                up_on = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up_on.is_some(), "the call is up on a node");
    let dead = up_on.unwrap();
    let survivor = 1 - dead;
    // Let the node's record of the established call reach Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    c.nodes[dead].proc.kill_9();

    // Both parties get a BYE from the survivor once the dead node's lease has run out.
    let limit = Duration::from_secs(LEASE_S + 6);
    let caller_saw = uac.expect_success(limit).await;
    let callee_saw = uas.expect_success(limit).await;
    let took = killed.elapsed();
    let survivor_addr = c.nodes[survivor].sip.to_string();
    for (who, seen) in [("caller", &caller_saw), ("callee", &callee_saw)] {
        let bye = seen
            .iter()
            .find(|m| !m.sent && m.first_line().starts_with("BYE "))
            .unwrap_or_else(|| panic!("the {who} got no BYE"));
        assert!(
            bye.text.contains(&survivor_addr),
            "the {who}'s BYE came from the survivor {survivor_addr}:\n{}",
            bye.text
        );
    }
    assert!(
        took <= Duration::from_secs(LEASE_S + 5),
        "BYEs within the lease plus a few seconds: {took:?}"
    );
    let records = c.nodes[survivor].records();
    let taken = records
        .iter()
        .find(|r| r["hangup_by"] == "takeover")
        .unwrap_or_else(|| panic!("the survivor recorded the call it ended: {records:?}"));
    assert_eq!(taken["final_status"], 200, "{taken}");
    assert_eq!(taken["taken_over_from"], c.nodes[dead].name, "{taken}");

    // The dispatcher sends the next calls to the survivor.
    let before = c.nodes[survivor].records().len();
    c.calls("after-crash", 3, 100).await;
    assert_eq!(
        c.nodes[survivor].records().len(),
        before + 3,
        "new calls went to the survivor; kamailio log {}:\n{}",
        c.lb.log.display(),
        c.kamailio_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_two_callers_through_different_nodes_rung_one_at_a_time() {
    if missing_tools().is_some() {
        eprintln!("skipped: kamailio, redis-server or sipp not installed");
        return;
    }
    let agent_port = free_udp_port();
    let group = format!(
        "[huntgroups.support]\nstrategy = \"linear\"\n\
         members = [\"sip:agent@127.0.0.1:{agent_port}\"]\n\
         ring_timeout = 10\nmax_wait = 30\nwrap_up = 0\nqueue_announce = 5\n"
    );
    let Some(c) = Cluster::start("cluster-hunt", &group).await else {
        return;
    };
    // The agent answers after 200 ms of ringing; each caller holds its call for 2 s.
    let agent = sipp::start(
        &c.dir,
        "agent",
        Path::new("hunt_agent.xml"),
        agent_port,
        None,
        &["-m", "2", "-d", "200"],
    );
    let first = sipp::start(
        &c.dir,
        "caller-1",
        Path::new("uac_call_routed.xml"),
        free_udp_port(),
        Some(c.lb.addr),
        &["-s", "hunt-support", "-d", "2000"],
    );
    // The balancer sends the next new call to the other node (round-robin).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = sipp::start(
        &c.dir,
        "caller-2",
        Path::new("hunt_caller_queued_routed.xml"),
        free_udp_port(),
        Some(c.lb.addr),
        &["-s", "hunt-support", "-d", "500"],
    );
    // Both callers are on the switch at once, one on each node.
    let spread = eventually(Duration::from_secs(3), || async {
        c.nodes[0].calls().await == 1 && c.nodes[1].calls().await == 1
    })
    .await;
    assert!(spread, "one caller on each node");
    first.expect_success(Duration::from_secs(20)).await;
    second.expect_success(Duration::from_secs(20)).await;
    let seen = agent.expect_success(Duration::from_secs(20)).await;
    // The agent's ladder: the second INVITE only after the first call's BYE.
    let order: Vec<String> = seen
        .iter()
        .filter(|m| !m.sent)
        .map(|m| m.first_line().split(' ').next().unwrap_or("").to_owned())
        .collect();
    let invites: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, m)| *m == "INVITE")
        .map(|(i, _)| i)
        .collect();
    let first_bye = order.iter().position(|m| m == "BYE");
    assert_eq!(invites.len(), 2, "the agent was rung twice: {order:?}");
    assert!(
        first_bye.is_some_and(|b| b < invites[1]),
        "the agent was rung by one node at a time: {order:?}"
    );
    // Each node recorded one of the two calls.
    assert_eq!(c.nodes[0].records().len(), 1);
    assert_eq!(c.nodes[1].records().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_registered_through_the_balancer_is_called_from_either_node() {
    let Some(c) = Cluster::start("cluster-register", "").await else {
        return;
    };
    let phone = free_udp_port();
    // The phone registers through the balancer (Kamailio adds a Path naming itself).
    sipp::start(
        &c.dir,
        "register",
        Path::new("register.xml"),
        phone,
        Some(c.lb.addr),
        &["-s", "reg-ann"],
    )
    .expect_success(Duration::from_secs(10))
    .await;
    // Then answers two calls on the same port: the balancer sends one to each node, and
    // each node finds the phone in the shared registrations.
    let uas = sipp::start(
        &c.dir,
        "phone",
        Path::new("uas_answer_routed.xml"),
        phone,
        None,
        &["-m", "2"],
    );
    let uac = sipp::start(
        &c.dir,
        "caller",
        Path::new("uac_call_routed.xml"),
        free_udp_port(),
        Some(c.lb.addr),
        &["-m", "2", "-r", "1", "-d", "200", "-s", "reg-ann"],
    );
    uac.expect_success(Duration::from_secs(20)).await;
    let seen = uas.expect_success(Duration::from_secs(20)).await;
    assert_eq!(c.nodes[0].records().len(), 1, "one call through each node");
    assert_eq!(c.nodes[1].records().len(), 1, "one call through each node");
    // Both INVITEs came to the phone through the balancer (its Via on top), as the Path
    // of the registration said.
    let lb = c.lb.addr.to_string();
    let invites: Vec<&sipp::SeenMessage> = seen
        .iter()
        .filter(|m| !m.sent && m.first_line().starts_with("INVITE "))
        .collect();
    assert_eq!(invites.len(), 2);
    for m in invites {
        let top_via = m.header("Via").unwrap_or("");
        assert!(
            top_via.contains(&lb),
            "the INVITE came through the balancer {lb}: {}",
            m.text
        );
    }
}
